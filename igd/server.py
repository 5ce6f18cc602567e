"""The accept loop and the connections: framing, per-request tasks, shutdown.

One asyncio loop on the main thread reads frames from every connection; each request
runs as its own task (a connection may pipeline requests; responses carry their id).
Header violations are answered and the connection closed; a bad body is answered and
the connection kept. A client that vanishes has its queued work cancelled.
"""

from __future__ import annotations

import asyncio
import errno
import os
import select
import signal
import socket
import stat
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from igd import protocol, systemd
from igd.logs import log
from igd.protocol import (
    BAD_REQUEST,
    INTERNAL,
    REQUEST,
    SHUTTING_DOWN,
    TIMEOUT,
    ProtocolError,
)
from igd.service import Service

MAX_RESPONSE_BYTES = 2**32 - 1  # the header's u32 length


class SocketInUse(RuntimeError):
    pass


@dataclass(frozen=True)
class OwnedPath:
    """A socket file this process created; removed only while it is still that file."""

    path: Path
    inode: int

    def unlink(self) -> None:
        try:
            if self.path.lstat().st_ino == self.inode:
                self.path.unlink()
        except FileNotFoundError:
            pass


def bind_socket(path: Path) -> tuple[socket.socket, OwnedPath]:
    """A listening AF_UNIX socket at ``path``, mode 0660.

    A stale socket file (nobody accepting) is replaced; a live one, or a path that is not
    a socket, is an error rather than something to delete.
    """
    if len(os.fsencode(path)) > 107:
        raise SocketInUse(f"socket path {path} is {len(os.fsencode(path))} bytes; AF_UNIX allows 107")
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        mode = None
    if mode is not None:
        if not stat.S_ISSOCK(mode):
            raise SocketInUse(f"{path} exists and is not a socket; refusing to replace it")
        if _is_served(path):
            raise SocketInUse(f"another igd is already serving on {path} (stop it, or choose another --socket)")
        path.unlink()
        log("stale_socket_removed", path=str(path))
    if not path.parent.exists():
        path.parent.mkdir(mode=0o755, parents=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o117)  # 0660: owner and group only
    try:
        sock.bind(os.fspath(path))
    except OSError:
        sock.close()
        raise
    finally:
        os.umask(old_umask)
    sock.listen(128)
    return sock, OwnedPath(path, path.lstat().st_ino)


def _is_served(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(os.fspath(path))
        except (ConnectionRefusedError, FileNotFoundError):
            return False
        except OSError as error:
            return error.errno not in (errno.ECONNREFUSED, errno.ENOENT)
        return True


def peer_credentials(sock: socket.socket | None) -> dict[str, int]:
    if sock is None:
        return {}
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return {}
    pid, uid, gid = struct.unpack("3i", raw)
    return {"peer_pid": pid, "peer_uid": uid}


class Daemon:
    """Serves ``service`` on ``listener`` until SIGTERM/SIGINT, then drains and exits."""

    def __init__(
        self,
        service: Service,
        listener: socket.socket,
        *,
        owned: OwnedPath | None,
        drain_timeout: float = 30.0,
    ) -> None:
        self.service = service
        self.listener = listener
        self.owned = owned
        self.drain_timeout = drain_timeout
        self.stopping = False
        self._stop = asyncio.Event()
        self._requests: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)  # handlers only set a flag
        server = await asyncio.start_unix_server(self._connection, sock=self.listener)
        systemd.notify("READY=1", f"STATUS=serving {self.service.model.name} on {self.service.model.device}")
        log("ready", model=self.service.model.name, device=str(self.service.model.device), pid=os.getpid())
        await self._stop.wait()
        await self._shutdown(server)

    async def _shutdown(self, server: asyncio.base_events.Server) -> None:
        self.stopping = True
        systemd.notify("STOPPING=1", "STATUS=draining")
        log("stopping", in_flight=len(self._requests), queued=self.service.worker.queue_depth)
        server.close()
        self.service.worker.close()
        loop = asyncio.get_running_loop()
        rejected = await loop.run_in_executor(None, self.service.worker.drain, self.drain_timeout)
        if self._requests:
            # Give answered work a moment to be written, then end what is left.
            await asyncio.wait(self._requests, timeout=5.0)
            for task in list(self._requests):
                task.cancel()
            await asyncio.gather(*self._requests, return_exceptions=True)
        for writer in list(self._writers):
            writer.close()
        self.service.close()
        if self.owned is not None:
            self.owned.unlink()
        log("stopped", rejected=rejected, served=sum(self.service.served.values()))

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = peer_credentials(writer.get_extra_info("socket"))
        lock = asyncio.Lock()
        tasks: set[asyncio.Task[None]] = set()
        self._writers.add(writer)
        self.service.connections += 1
        limits = self.service.limits
        try:
            while not self.stopping:
                try:
                    header = await asyncio.wait_for(reader.readexactly(protocol.HEADER_SIZE), limits.idle_timeout)
                    _kind, length = protocol.parse_header(header, limits.max_frame_bytes, (REQUEST,))
                    payload = await asyncio.wait_for(reader.readexactly(length), limits.idle_timeout)
                except asyncio.IncompleteReadError as error:
                    if error.partial:
                        log("client_gone", reason="half a frame", received=len(error.partial), **peer)
                    break
                except (asyncio.TimeoutError, TimeoutError):
                    log("client_idle", timeout_s=limits.idle_timeout, **peer)
                    break
                except ProtocolError as error:
                    # The framing is lost: answer once, then close.
                    self.service.failed[error.code] += 1
                    log("bad_frame", code=error.code, message=error.message, **peer)
                    await self._send(writer, lock, protocol.error_response(None, error))
                    break
                except (ConnectionError, OSError):
                    break
                task = asyncio.create_task(self._request(writer, lock, payload, peer))
                tasks.add(task)
                self._requests.add(task)
                task.add_done_callback(tasks.discard)
                task.add_done_callback(self._requests.discard)
            if tasks and _peer_hung_up(writer):
                log("client_gone", reason="disconnected with requests pending", pending=len(tasks), **peer)
                for task in tasks:
                    task.cancel()
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            self.service.connections -= 1
            self._writers.discard(writer)
            writer.close()

    async def _request(self, writer: asyncio.StreamWriter, lock: asyncio.Lock, payload: bytes, peer: dict[str, int]) -> None:
        started = time.perf_counter()
        request_id: int | None = None
        op = "?"
        notes: dict[str, Any] = {}
        self.service.in_flight += 1
        try:
            try:
                body = protocol.decode_body(payload)
                request_id = _request_id(body)
                op, args = _op_and_args(body)
                if request_id is None:
                    raise ProtocolError(BAD_REQUEST, "a request needs an integer id", {"field": "id"})
                if self.stopping and op in ("classify", "attribute"):
                    raise ProtocolError(SHUTTING_DOWN, "the daemon is shutting down")
                result = await asyncio.wait_for(
                    self.service.handle(op, args, notes), self.service.limits.request_timeout
                )
                frame = protocol.ok_response(request_id, result)
                if len(frame) > MAX_RESPONSE_BYTES + protocol.HEADER_SIZE:
                    raise ProtocolError(INTERNAL, "the result is over the 4 GiB frame limit; use fewer steps")
                outcome = "ok"
                self.service.served[op] += 1
            except ProtocolError as error:
                frame, outcome = protocol.error_response(request_id, error), error.code
            except (asyncio.TimeoutError, TimeoutError):
                error = ProtocolError(TIMEOUT, f"no result within {self.service.limits.request_timeout:g} s (--request-timeout)")
                frame, outcome = protocol.error_response(request_id, error), TIMEOUT
            except asyncio.CancelledError:
                if not self.stopping:
                    raise  # the client is gone: nobody to answer
                error = ProtocolError(SHUTTING_DOWN, "the daemon shut down before this request finished")
                frame, outcome = protocol.error_response(request_id, error), SHUTTING_DOWN
            except Exception as error:  # noqa: BLE001 - never a traceback to the client
                log("internal_error", level=40, exc_info=True, op=op, id=request_id)
                frame = protocol.error_response(
                    request_id, ProtocolError(INTERNAL, "internal error (logged on the daemon)", {"error": type(error).__name__})
                )
                outcome = INTERNAL
            if outcome != "ok":
                self.service.failed[outcome] += 1
            await self._send(writer, lock, frame)
            log("request", op=op, id=request_id, outcome=outcome, ms=round((time.perf_counter() - started) * 1000, 1), **peer, **notes)
        except asyncio.CancelledError:
            log("request", op=op, id=request_id, outcome="cancelled", **peer, **notes)
            raise
        finally:
            self.service.in_flight -= 1

    async def _send(self, writer: asyncio.StreamWriter, lock: asyncio.Lock, frame: bytes) -> None:
        async with lock:
            try:
                writer.write(frame)
                await writer.drain()
            except (ConnectionError, OSError):
                pass  # the client left; its connection loop notices


def _request_id(body: dict[str, Any]) -> int | None:
    request_id = body.get("id")
    return request_id if isinstance(request_id, int) and not isinstance(request_id, bool) else None


def _op_and_args(body: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    op, args = body.get("op"), body.get("args")
    if not isinstance(op, str):
        raise ProtocolError(BAD_REQUEST, "a request needs a string op", {"field": "op"})
    if args is None:
        return op, {}
    if not isinstance(args, dict):
        raise ProtocolError(BAD_REQUEST, f"args must be a map, got {type(args).__name__}", {"field": "args"})
    return op, args


def _peer_hung_up(writer: asyncio.StreamWriter) -> bool:
    """After EOF: did the peer close entirely (POLLHUP), or only its sending side?"""
    sock = writer.get_extra_info("socket")
    if sock is None or writer.is_closing():
        return True
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN)  # POLLHUP and POLLERR are always reported
    return any(events & (select.POLLHUP | select.POLLERR) for _fd, events in poller.poll(0))
