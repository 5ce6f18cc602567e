"""Blocking socket I/O with one igd: connect, call, read the answer.

Standard library, msgpack and igd's torch-free protocol module only.
"""

from __future__ import annotations

import os
import pwd
import socket
import struct
import time
from pathlib import Path
from typing import Any, Callable

from igd import protocol
from igd.protocol import ProtocolError

# Exit statuses, documented in `igctl --help` and README (EXIT_TABLE is both).
EXIT_OK, EXIT_REFUSED, EXIT_USAGE, EXIT_NO_DAEMON, EXIT_DAEMON_FAILED, EXIT_STARTING = 0, 1, 2, 3, 4, 5
EXIT_UNTRUSTED = 6
EXIT_TABLE = (
    (EXIT_OK, "success"),
    (EXIT_REFUSED, "the daemon refused a request (bad image, unknown target, ...), or a file could not be read or written"),
    (EXIT_USAGE, "usage error"),
    (EXIT_NO_DAEMON, "no daemon reachable at the socket (the message names the path and how to start one)"),
    (EXIT_DAEMON_FAILED, "the daemon failed (internal error, timeout, overloaded, shutting down, stopped mid-request)"),
    (EXIT_STARTING, "`igctl status`: the daemon is still starting (loading or warming up); `--wait` waits for it"),
    (EXIT_UNTRUSTED, "the socket is not igd's: its directory or the server behind it belongs to another user "
                     "(nothing was sent)"),
    (130, "interrupted by Ctrl-C (SIGINT; 143 for SIGTERM): requests are cancelled on the daemon, nothing is written"),
)

# Codes that mean "your request was wrong"; everything else means the daemon failed.
REFUSALS = {
    protocol.BAD_FRAME, protocol.FRAME_TOO_LARGE, protocol.UNSUPPORTED_VERSION, protocol.UNKNOWN_OP,
    protocol.BAD_REQUEST, protocol.BAD_IMAGE, protocol.IMAGE_TOO_LARGE, protocol.UNKNOWN_TARGET,
    protocol.REQUEST_TOO_LARGE,
}  # fmt: skip


class ClientError(Exception):
    """A failure with the exit status igctl should end with."""

    exit_status = EXIT_DAEMON_FAILED


class NoDaemon(ClientError):
    exit_status = EXIT_NO_DAEMON


class UntrustedSocket(ClientError):
    """The socket may be someone else's impersonating igd: its /tmp directory is not the
    user's own, or the server's kernel-recorded uid is not trusted. Nothing was sent."""

    exit_status = EXIT_UNTRUSTED


# The system service's user (systemd/igd.sysusers, User= in igd.service).
SERVICE_USER = "igd"


def trusted_server_uids() -> set[int]:
    """The uids whose igd this client talks to: its own (its igd, or its own ssh -L
    forwarding), root (systemd creates socket-activated sockets, the listening side, so
    they report uid 0; root can read everything anyway) and igd's service user, which
    only root can create and become. Nobody else's: a server run by another user could
    read the images and options and return any result."""
    uids = {os.getuid(), os.geteuid(), 0}
    try:
        uids.add(pwd.getpwnam(SERVICE_USER).pw_uid)
    except KeyError:
        pass
    return uids


class OutputClosed(Exception):
    """What igctl writes to (its stdout) was closed by the reader, e.g. ``igctl ... | head``:
    not the daemon's doing. Raised from event handlers; igctl then ends quietly."""


class ConnectionLost(ClientError):
    """The connection ended; ``sent`` says whether the request had been fully sent
    (if not, the daemon never saw it and it is safe to retry on a new connection)."""

    def __init__(self, message: str, sent: bool) -> None:
        super().__init__(message)
        self.sent = sent


class RequestFailed(ClientError):
    """The daemon answered with an error object."""

    def __init__(self, error: ProtocolError) -> None:
        super().__init__(f"{error.code}: {error.message}")
        self.error = error
        self.code = error.code  # the stable error code (docs/protocol.md), e.g. "unknown_target"
        self.details = error.details
        self.exit_status = EXIT_REFUSED if error.code in REFUSALS else EXIT_DAEMON_FAILED


class Client:
    """One connection to igd. Not thread-safe: use one per thread."""

    def __init__(self, path: Path, timeout: float | None = None) -> None:
        self.path = path
        self._next_id = 1
        if protocol.is_fallback_socket(path):
            try:
                protocol.check_private_directory(path.parent, listening=False)
            except protocol.UnsafeDirectory as error:
                raise UntrustedSocket(f"not connecting to {path}: {error}") from None
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        try:
            self._connect(timeout)
        except (FileNotFoundError, ConnectionRefusedError, NotADirectoryError) as error:
            self._sock.close()
            raise NoDaemon(
                f"no igd is listening on {path} ({error.strerror}); start one with `igd serve` "
                "(or `systemctl start igd`), or point --socket / IGD_SOCKET at a running one"
            ) from None
        except PermissionError:
            self._sock.close()
            raise NoDaemon(f"permission denied on {path}: ask to be added to the socket's group (igd)") from None
        except OSError as error:
            self._sock.close()
            raise NoDaemon(f"cannot connect to {path}: {error.strerror or error}") from None
        self._check_server()
        self._hello: dict[str, Any] | None = None

    def _check_server(self) -> None:
        """Before the first byte is sent: the kernel's record of who listens on the other
        side (SO_PEERCRED: pid, uid, gid) must name a trusted uid (trusted_server_uids)."""
        try:
            creds = self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            pid, uid, _gid = struct.unpack("3i", creds)
        except OSError as error:
            self._sock.close()
            raise UntrustedSocket(
                f"cannot tell who serves {self.path} ({error.strerror or error}); nothing was sent") from None
        if uid not in trusted_server_uids():
            self._sock.close()
            try:
                owner = f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
            except KeyError:
                owner = f"uid {uid}"
            raise UntrustedSocket(
                f"refusing the server at {self.path}: it runs as {owner} (pid {pid}), not as you, root or "
                f"igd's service user, so it could be impersonating igd; nothing was sent"
            )

    def _connect(self, timeout: float | None) -> None:
        """Connect; while igd's listen backlog is full (it is busy accepting), retry for up
        to ``timeout`` seconds rather than take a busy daemon for an absent one."""
        deadline = time.monotonic() + (timeout if timeout is not None else float("inf"))
        while True:
            try:
                self._sock.connect(os.fspath(self.path))
                return
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    self._sock.close()
                    raise ClientError(
                        f"igd at {self.path} is busy: its queue of new connections stayed full for "
                        f"{timeout:g} s (--timeout)"
                    ) from None
                time.sleep(0.05)

    def call(
        self, op: str, args: dict[str, Any] | None = None, on_event: Callable[[dict[str, Any]], None] | None = None
    ) -> dict[str, Any]:
        """Send one request and return its result map; RequestFailed if the daemon refused.
        ``on_event`` receives the request's event frames (progress), if any come."""
        request_id = self._next_id
        self._next_id += 1
        frame = protocol.request(request_id, op, args)
        try:
            self._sock.sendall(frame)
        except (BrokenPipeError, ConnectionResetError) as error:
            raise ConnectionLost(f"igd closed the connection ({error.strerror})", sent=False) from None
        except TimeoutError:
            raise ClientError(f"igd took more than {self._sock.gettimeout():g} s to accept the request (--timeout)") from None
        try:
            while True:
                kind, body = protocol.read_frame(self._sock, protocol.MAX_BODY_BYTES, (protocol.RESPONSE, protocol.EVENT))
                if kind == protocol.RESPONSE and body.get("id") in (request_id, None):
                    break
                if kind == protocol.EVENT and on_event is not None and body.get("id") == request_id:
                    try:
                        on_event(body)
                    except BrokenPipeError:  # igctl's own output, not the socket
                        raise OutputClosed() from None
        except TimeoutError:
            raise ClientError(f"no answer from igd within {self._sock.gettimeout():g} s (--timeout)") from None
        except (EOFError, ConnectionError) as error:
            raise ConnectionLost(f"igd closed the connection before answering ({error}); did it stop?", sent=True) from None
        except ProtocolError as error:
            raise ClientError(f"garbled answer from {self.path}: {error.message}") from None
        if body.get("ok") is True and isinstance(body.get("result"), dict):
            return body["result"]
        raise RequestFailed(ProtocolError.from_wire(body.get("error")))

    def hello(self) -> dict[str, Any]:
        """The daemon's hello (asked once per connection): version, capabilities, model."""
        if self._hello is None:
            self._hello = self.call("hello", {"client": "igctl"})
        return self._hello

    def max_image_bytes(self) -> int:
        """Largest image that fits the daemon's frame limit (minus room for the other args)."""
        limits = self.hello().get("capabilities", {}).get("limits", {})
        return int(limits.get("max_frame_bytes", protocol.DEFAULT_MAX_FRAME_BYTES)) - 4096

    def abort(self) -> None:
        """End the connection now, from any thread: a call blocked on it returns at once
        (ConnectionLost), and igd, seeing the client gone, cancels its requests."""
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
