"""The accept loop and the connections: framing, per-request tasks, shutdown.

One asyncio loop on the main thread reads frames from every connection; each request
runs as its own task (a connection may pipeline requests; responses carry their id).
Header violations are answered and the connection closed; a bad body is answered and
the connection kept. A client that vanishes has its queued work cancelled.
"""

from __future__ import annotations

import asyncio
import logging
import os
import select
import signal
import socket
import time
from typing import Any, Awaitable, Callable

from igd import protocol
from igd.serve import systemd
from igd.serve.access import AccessPolicy, peer_of
from igd.logs import log
from igd.protocol import (
    BAD_REQUEST,
    FORBIDDEN,
    INTERNAL,
    REQUEST,
    SHUTTING_DOWN,
    TIMEOUT,
    ProtocolError,
)
from igd.request import RequestFailed
from igd.serve.service import Service
from igd.serve.ledger import Ledger, Reservation
from igd.serve.socket_file import LISTEN_BACKLOG, OwnedPath

# Bodies larger than this are decoded off the event loop.
_INLINE_BYTES = 1 << 20
# Large frames are written in slices of this size, each drained before the next.
_SLICE_BYTES = 1 << 20


class Connection:
    """One client's connection: reads its frames, writes its responses one at a time."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, idle_timeout: float) -> None:
        self.reader = reader
        self.writer = writer
        self.idle_timeout = idle_timeout
        self.credentials = peer_of(writer.get_extra_info("socket"))
        self.peer = self.credentials.log_fields() if self.credentials else {}
        self.tasks: set[asyncio.Task[None]] = set()
        self.broken = False  # a response was cut off: the stream can carry nothing more
        self._lock = asyncio.Lock()
        self._posted: list[bytes] = []  # events that wait for the frame being written

    async def read_body(self, max_body: int, ledger: Ledger) -> tuple[bytes, Reservation]:
        """The next request's body, and its reservation of the memory budget (taken before
        the body is read: a large frame waits for room). Raises ProtocolError for a bad
        header, TimeoutError when the client is idle (nothing pending) or sends one frame
        too slowly, IncompleteReadError when it leaves."""
        while True:
            try:
                header = await asyncio.wait_for(self.reader.readexactly(protocol.HEADER_SIZE), self.idle_timeout)
                break
            except asyncio.TimeoutError:
                if not self.tasks:
                    raise
                # Requests pending: the client is waiting for answers, not idle.
        _kind, length = protocol.parse_header(header, max_body, (REQUEST,))
        reservation = await ledger.room_for(length)
        try:
            return await asyncio.wait_for(self.reader.readexactly(length), self.idle_timeout), reservation
        except BaseException:
            reservation.release()
            raise

    async def send(self, frame: bytes | list[bytes]) -> bool:
        """Write one whole frame (bytes, or a list of parts); False if it could not be
        delivered. Large frames go in slices, each drained before the next, so that the
        transport never holds a second copy of an answer. A client that stops reading
        for the idle timeout, or a write cut short, ends the connection: a partial frame
        must never be followed by another."""
        async with self._lock:
            if self.broken:
                return False
            try:
                for part in [frame] if isinstance(frame, bytes) else frame:
                    view = memoryview(part)
                    for start in range(0, len(view), _SLICE_BYTES):
                        self.writer.write(view[start : start + _SLICE_BYTES])
                        await asyncio.wait_for(self.writer.drain(), self.idle_timeout)
                self._write_posted()
                return True
            except asyncio.TimeoutError:
                log("client_not_reading", timeout_s=self.idle_timeout, **self.peer)
                self.abort()
            except (ConnectionError, OSError):
                self.abort()
            except asyncio.CancelledError:
                self.abort()
                raise
            return False

    def post(self, frame: bytes) -> None:
        """Queue a small frame (an event) without waiting for it to be sent; while a
        frame is being written it waits for that frame's end (frames never interleave)."""
        if self.broken or self.writer.is_closing():
            return
        if self._lock.locked():
            self._posted.append(frame)
        else:
            self.writer.write(frame)

    def _write_posted(self) -> None:
        for frame in self._posted:
            self.writer.write(frame)
        self._posted.clear()

    async def refuse(self, error: ProtocolError) -> None:
        """Answer ``error`` and end the connection so that the client can read the answer:
        closing with its unread bytes pending would reset the connection instead, so
        shut our side, then discard what it still sends for a moment."""
        if not await self.send(protocol.error_response(None, error)):
            return
        try:
            self.writer.write_eof()
            await asyncio.wait_for(self._discard_input(), 1.0)
        except (asyncio.TimeoutError, ConnectionError, OSError):
            pass

    async def _discard_input(self) -> None:
        while await self.reader.read(1 << 16):
            pass

    def abort(self) -> None:
        self.broken = True
        self.writer.transport.abort()

    def hung_up(self) -> bool:
        """After EOF: did the peer close entirely (POLLHUP), or only its sending side?"""
        sock = self.writer.get_extra_info("socket")
        if sock is None or self.writer.is_closing():
            return True
        poller = select.poll()
        poller.register(sock.fileno(), select.POLLIN)  # POLLHUP and POLLERR are always reported
        return any(events & (select.POLLHUP | select.POLLERR) for _fd, events in poller.poll(0))


class Server:
    """Serves ``service`` on ``listener`` from the start of start-up until SIGTERM/SIGINT,
    then drains and exits."""

    def __init__(
        self,
        service: Service,
        listener: socket.socket,
        *,
        owned: OwnedPath | None,
        drain_timeout: float = 30.0,
        access: AccessPolicy = AccessPolicy(),
    ) -> None:
        self.service = service
        self.access = access
        self.listener = listener
        self.owned = owned
        self.drain_timeout = drain_timeout
        self.stopping = False
        self.startup_error: BaseException | None = None
        self._stop = asyncio.Event()
        self._connections: dict[asyncio.Task[None], Connection] = {}

    async def run(
        self,
        start: Callable[[Callable[[], bool]], Awaitable[None]],
        stop_requested: Callable[[], bool] = lambda: False,
    ) -> None:
        """Accept connections at once, run ``start(stopped)`` (load the model, warm up,
        hand the worker to the service; it checks ``stopped()`` between its stages), report
        READY=1 once it is done, and serve until a stop signal. An exception from
        ``start`` is raised after a clean shutdown."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)  # handlers only set a flag
        loop.add_signal_handler(signal.SIGHUP, _hangup)
        if stop_requested():  # a signal arrived before these handlers
            self._stop.set()
        server = await asyncio.start_unix_server(self._connection, sock=self.listener, backlog=LISTEN_BACKLOG)
        starting = asyncio.create_task(start(self._stop.is_set))
        stop = asyncio.create_task(self._stop.wait())
        await asyncio.wait({starting, stop}, return_when=asyncio.FIRST_COMPLETED)
        if not starting.done():
            log("stopping", reason="signal during start-up; it ends after the current stage")
            await asyncio.wait({starting})
        self.startup_error = starting.exception()
        model = self.service.model
        if self.startup_error is None and model is not None and not self._stop.is_set():
            systemd.notify("READY=1", f"STATUS=serving {model.name} on {model.device}")
            log("ready", model=model.name, device=str(model.device), pid=os.getpid())
            await self._stop.wait()
        stop.cancel()
        await self._shutdown(server)
        if self.startup_error is not None:
            raise self.startup_error

    async def _shutdown(self, server: asyncio.base_events.Server) -> None:
        self.stopping = True
        systemd.notify("STOPPING=1", "STATUS=draining")
        requests = self._requests()
        worker = self.service.worker
        log("stopping", in_flight=len(requests), queued=worker.queue_depth if worker else 0)
        server.close()
        rejected = 0
        if worker is not None:
            worker.close()
            loop = asyncio.get_running_loop()
            rejected = await loop.run_in_executor(None, worker.drain, self.drain_timeout)
            # A pass still running past the drain stops at its next chunk; its requests
            # answer shutting_down. The compute thread must end before the process does.
            cancelled = worker.cancel_running()
            if cancelled:
                log("stopping", note="the pass in progress stops at its next chunk", requests=cancelled)
            await loop.run_in_executor(None, worker.join, None)
        requests = self._requests()
        if requests:
            # Give answered work a moment to be written, then end what is left: each
            # cancelled request answers shutting_down.
            await asyncio.wait(requests, timeout=5.0)
            for task in requests:
                task.cancel()
            await asyncio.gather(*requests, return_exceptions=True)
        for connection in self._connections.values():
            connection.writer.close()
        if self._connections:
            await asyncio.wait(list(self._connections), timeout=5.0)
            for task in self._connections:
                task.cancel()
            await asyncio.gather(*self._connections, return_exceptions=True)
        self.service.close()
        if self.owned is not None:
            self.owned.unlink()
        log("stopped", rejected=rejected, served=sum(self.service.served.values()),
            reason="start-up failed" if self.startup_error else ("signal during start-up" if worker is None else "signal"))

    def _requests(self) -> list[asyncio.Task[None]]:
        return [task for connection in self._connections.values() for task in connection.tasks]

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connection = Connection(reader, writer, self.service.limits.idle_timeout)
        this = asyncio.current_task()
        assert this is not None
        self._connections[this] = connection
        self.service.connections += 1
        try:
            await self._serve(connection)
        finally:
            self.service.connections -= 1
            del self._connections[this]
            writer.close()

    async def _serve(self, connection: Connection) -> None:
        peer = connection.peer
        if not self.access.allows(connection.credentials):
            who = f"uid {connection.credentials.uid}" if connection.credentials else "an unidentified peer"
            error = ProtocolError(FORBIDDEN, f"{who} may not use this igd (allowed: {self.access.describe()})")
            log("forbidden", **peer)
            self.service.failed[FORBIDDEN] += 1
            await connection.refuse(error)
            return
        cap = self.service.limits.max_outstanding
        while not self.stopping and not connection.broken:
            if len(connection.tasks) >= cap:
                # Backpressure: read nothing more from this client until an answer is out.
                await asyncio.wait(set(connection.tasks), return_when=asyncio.FIRST_COMPLETED)
                continue
            try:
                payload, reservation = await connection.read_body(self.service.limits.max_frame_bytes,
                                                                  self.service.ledger)
            except asyncio.IncompleteReadError as error:
                if error.partial:
                    log("client_gone", reason="half a frame", received=len(error.partial), **peer)
                break
            except asyncio.TimeoutError:
                log("client_idle", timeout_s=connection.idle_timeout, **peer)
                break
            except ProtocolError as error:
                # The framing is lost: answer once, then close.
                self.service.failed[error.code] += 1
                log("bad_frame", code=error.code, message=error.message, **peer)
                await connection.refuse(error)
                break
            except (ConnectionError, OSError):
                break
            task = asyncio.create_task(self._request(connection, payload, reservation))
            del payload  # the task holds it now, and drops it once decoded
            connection.tasks.add(task)
            task.add_done_callback(connection.tasks.discard)
        if connection.tasks and connection.hung_up():
            log("client_gone", reason="disconnected with requests pending", pending=len(connection.tasks), **peer)
            for task in connection.tasks:
                task.cancel()
        if connection.tasks:
            await asyncio.gather(*connection.tasks, return_exceptions=True)

    async def _request(self, connection: Connection, payload: bytes, reservation: Reservation) -> None:
        started = time.perf_counter()
        request_id: int | None = None
        op = "?"
        notes: dict[str, Any] = {}
        service = self.service
        service.in_flight += 1
        events = RequestEvents(connection)

        try:
            try:
                if len(payload) > _INLINE_BYTES:
                    body = await service.in_pool(protocol.decode_body, payload)
                else:
                    body = protocol.decode_body(payload)
                del payload
                request_id = events.request_id = _request_id(body)
                op, args = _op_and_args(body)
                del body
                if request_id is None:
                    raise ProtocolError(BAD_REQUEST, "a request needs an integer id", {"field": "id"})
                if self.stopping and op in protocol.COMPUTE_OPS:
                    raise ProtocolError(SHUTTING_DOWN, "the daemon is shutting down")
                result = await asyncio.wait_for(service.handle(op, args, notes, events, reservation),
                                                service.limits.request_timeout)
                frame = await service.in_pool(_ok_frame, request_id, result)
                del result
                outcome = "ok"
            except ProtocolError as error:
                frame, outcome = protocol.error_response(request_id, error), error.code
            except RequestFailed as failure:
                error = ProtocolError(failure.code, failure.message, failure.details)
                frame, outcome = protocol.error_response(request_id, error), error.code
            except asyncio.TimeoutError:
                error = ProtocolError(TIMEOUT, f"no result within {service.limits.request_timeout:g} s (--request-timeout)")
                frame, outcome = protocol.error_response(request_id, error), TIMEOUT
            except asyncio.CancelledError:
                if not self.stopping:
                    raise  # the client is gone: nobody to answer
                reason = (f"igd could not start: {self.startup_error}" if self.startup_error
                          else "the daemon shut down before this request finished")
                frame, outcome = protocol.error_response(request_id, ProtocolError(SHUTTING_DOWN, reason)), SHUTTING_DOWN
            except Exception as error:  # noqa: BLE001 - never a traceback to the client
                log("internal_error", level=40, exc_info=True, op=op, id=request_id)
                frame = protocol.error_response(
                    request_id, ProtocolError(INTERNAL, "internal error (logged on the daemon)", {"error": type(error).__name__})
                )
                outcome = INTERNAL
            events.answered = True
            reservation.settle(sum(map(len, frame)) if isinstance(frame, list) else len(frame))  # until it is written out, the frame is what this request holds
            delivered = await connection.send(frame)
            compute = op in protocol.COMPUTE_OPS
            if outcome == "ok" and delivered:
                (service.served if compute else service.queries)[op] += 1
            elif outcome != "ok":
                service.failed[outcome] += 1
            # hello and status answered: debug, or `igctl status --wait`'s polls would flood the log
            log("request", level=logging.INFO if compute or outcome != "ok" else logging.DEBUG, op=op,
                id=request_id, outcome=outcome if delivered else f"{outcome}_undelivered",
                ms=round((time.perf_counter() - started) * 1000, 1), **connection.peer, **notes)
        except asyncio.CancelledError:
            log("request", op=op, id=request_id, outcome="cancelled", **connection.peer, **notes)
            raise
        finally:
            reservation.release()
            service.in_flight -= 1


class RequestEvents:
    """The event frames of one request: small ones posted without waiting (progress),
    large ones sent with backpressure (result data); none after its response."""

    def __init__(self, connection: Connection) -> None:
        self.connection = connection
        self.request_id: int | None = None
        self.answered = False

    def emit(self, name: str, fields: dict[str, Any]) -> None:
        if not self.answered and self.request_id is not None:
            self.connection.post(protocol.event(self.request_id, name, **fields))

    async def send(self, name: str, fields: dict[str, Any]) -> bool:
        """Write the event and wait until it is out; False if the client is gone."""
        if self.answered or self.request_id is None:
            return False
        return await self.connection.send(protocol.event(self.request_id, name, **fields))


def _hangup() -> None:
    log("sighup_ignored", level=30, note="igd has no configuration to reload: restart it to change settings")


def _ok_frame(request_id: int, result: dict[str, Any]) -> list[bytes]:
    """The success frame; a result over the frame format's 4 GiB becomes a clear error."""
    try:
        return protocol.ok_response(request_id, result)
    except protocol.FrameTooLarge as error:
        raise ProtocolError(INTERNAL, f"{error}; ask for fewer steps", {"error": "result_too_large"}) from None


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
