"""An independent protocol-v1 client written from docs/protocol.md alone.

struct + msgpack + socket; deliberately imports nothing from igd, so the tests check
the documented wire format rather than our own encoder agreeing with itself.
"""

from __future__ import annotations

import socket
import struct
from typing import Any

import msgpack

HEADER = ">2sBBI"


class WireClient:
    def __init__(self, path: str, timeout: float = 300.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.next_id = 1

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send(self, body: Any, *, magic: bytes = b"IG", version: int = 1, kind: int = 0) -> None:
        payload = msgpack.packb(body, use_bin_type=True)
        self.send_raw(struct.pack(HEADER, magic, version, kind, len(payload)) + payload)

    def request(self, op: str, args: dict[str, Any] | None = None) -> int:
        request_id = self.next_id
        self.next_id += 1
        self.send({"id": request_id, "op": op, "args": args or {}})
        return request_id

    def receive(self) -> dict[str, Any]:
        """The next response, skipping events. Raises EOFError if the daemon closed."""
        while True:
            magic, version, kind, length = struct.unpack(HEADER, self._exactly(8))
            assert magic == b"IG" and version == 1, (magic, version)
            body = msgpack.unpackb(self._exactly(length), raw=False)
            if kind == 1:
                return body
            assert kind == 2, kind

    def receive_frame(self) -> tuple[int, dict[str, Any]]:
        """The next frame, whatever its kind: (kind, body)."""
        magic, version, kind, length = struct.unpack(HEADER, self._exactly(8))
        assert magic == b"IG" and version == 1, (magic, version)
        return kind, msgpack.unpackb(self._exactly(length), raw=False)

    def receive_with_events(self) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """The events that come before the next response, and the response."""
        events = []
        while True:
            magic, version, kind, length = struct.unpack(HEADER, self._exactly(8))
            assert magic == b"IG" and version == 1, (magic, version)
            body = msgpack.unpackb(self._exactly(length), raw=False)
            if kind == 1:
                return events, body
            assert kind == 2, kind
            events.append(body)

    def call(self, op: str, args: dict[str, Any] | None = None) -> dict[str, Any]:
        request_id = self.request(op, args)
        response = self.receive()
        assert response["id"] == request_id, response
        return response

    def closed_by_peer(self) -> bool:
        try:
            return self.sock.recv(1) == b""
        except (ConnectionResetError, TimeoutError):
            return True

    def _exactly(self, size: int) -> bytes:
        data = b""
        while len(data) < size:
            chunk = self.sock.recv(size - len(data))
            if not chunk:
                raise EOFError(f"closed after {len(data)} of {size} bytes")
            data += chunk
        return data

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> WireClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
