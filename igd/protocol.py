"""Wire protocol v1: framing, message shapes and error codes (see docs/protocol.md).

Standard library and msgpack only: igctl imports this module, and must stay light.

A frame is an 8-byte header -- magic ``b"IG"``, version (u8), kind (u8), body length
(u32, big-endian) -- followed by a msgpack map of that many bytes.
"""

from __future__ import annotations

import os
import pwd
import socket
import stat
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack

MAGIC = b"IG"
VERSION = 1
HEADER = struct.Struct(">2sBBI")
HEADER_SIZE = HEADER.size  # 8

REQUEST, RESPONSE, EVENT = 0, 1, 2
KINDS = (REQUEST, RESPONSE, EVENT)

DEFAULT_MAX_FRAME_BYTES = 64 * 1024 * 1024

# Stable error codes: clients branch on these strings; new ones may be added.
BAD_FRAME = "bad_frame"
FRAME_TOO_LARGE = "frame_too_large"
UNSUPPORTED_VERSION = "unsupported_version"
UNKNOWN_OP = "unknown_op"
BAD_REQUEST = "bad_request"
BAD_IMAGE = "bad_image"
IMAGE_TOO_LARGE = "image_too_large"
UNKNOWN_TARGET = "unknown_target"
OVERLOADED = "overloaded"
TIMEOUT = "timeout"
SHUTTING_DOWN = "shutting_down"
INTERNAL = "internal"
FORBIDDEN = "forbidden"
REQUEST_TOO_LARGE = "request_too_large"  # more memory than the daemon's budget could ever give it
ERROR_CODES = (
    BAD_FRAME, FRAME_TOO_LARGE, UNSUPPORTED_VERSION, UNKNOWN_OP, BAD_REQUEST, BAD_IMAGE,
    IMAGE_TOO_LARGE, UNKNOWN_TARGET, OVERLOADED, TIMEOUT, SHUTTING_DOWN, INTERNAL, FORBIDDEN, REQUEST_TOO_LARGE,
)  # fmt: skip

COMPUTE_OPS = ("classify", "attribute")  # the ops that need the model: admitted, queued, refused while draining
OPS = ("hello", "status", *COMPUTE_OPS)  # every op of protocol v1 (igd.service answers each, by its name)


def default_socket_path() -> Path:
    """``$IGD_SOCKET``, else /run/igd/igd.sock for root (the system service), else
    ``$XDG_RUNTIME_DIR/igd.sock`` (``/tmp/igd-UID/igd.sock`` without one: see
    :func:`check_private_directory`)."""
    configured = os.environ.get("IGD_SOCKET")
    if configured:
        return Path(configured)
    if os.geteuid() == 0:
        return Path("/run/igd/igd.sock")
    runtime = os.environ.get("XDG_RUNTIME_DIR") or fallback_runtime_directory()
    return Path(runtime) / "igd.sock"


def fallback_runtime_directory() -> Path:
    """``/tmp/igd-UID``: the user's private directory for igd's socket where there is no
    ``$XDG_RUNTIME_DIR``. Anyone can create it first in /tmp, so igd and igctl use it
    only after :func:`check_private_directory`."""
    return Path(f"/tmp/igd-{os.getuid()}")


def is_fallback_socket(path: Path) -> bool:
    """Whether ``path`` lies in :func:`fallback_runtime_directory` (default or not)."""
    return Path(os.path.abspath(path)).parent == fallback_runtime_directory()


class UnsafeDirectory(Exception):
    """The socket's private directory is not safely ours; the message (one line) says
    why and what to do."""


def check_private_directory(directory: Path, listening: bool = True) -> None:
    """Refuse (UnsafeDirectory) a private socket directory in a shared place (the /tmp
    fallback) that another user could have made or could change, since whoever controls
    it can put their own socket there and impersonate igd: it must be a directory, not a
    symbolic link, owned by this user, mode 0700 (nothing for group or others), in a
    parent that others cannot rename it out of (sticky like /tmp, or not writable by
    them). A missing directory is not an error here (connecting then finds no daemon).

    ``listening=False`` (igctl, connecting) accepts group/other read and search bits, as
    in the 0755 directory an older igd made: only write access would let someone else
    put a socket there, and igd serve makes the directory 0700 when it starts.
    """
    advice = "set XDG_RUNTIME_DIR, or --socket / IGD_SOCKET, to a directory of your own"
    try:
        info = directory.lstat()
    except FileNotFoundError:
        return
    uid = os.geteuid()
    if info.st_uid != uid:
        raise UnsafeDirectory(
            f"{directory} belongs to {_user_name(info.st_uid)}, not to you, so its owner could impersonate igd: "
            f"refusing to use it; {advice}, or ask root to remove {directory}"
        )
    if stat.S_ISLNK(info.st_mode):
        raise UnsafeDirectory(f"{directory} is a symbolic link, not igd's private directory: refusing to use it; "
                              f"remove it (rm {directory}), or {advice}")
    if not stat.S_ISDIR(info.st_mode):
        raise UnsafeDirectory(f"{directory} is not a directory: refusing to use it; remove it, or {advice}")
    if info.st_mode & (0o077 if listening else stat.S_IWGRP | stat.S_IWOTH):
        raise UnsafeDirectory(
            f"{directory} has mode {stat.S_IMODE(info.st_mode):04o}; igd's private directory must be 0700 so "
            f"that nobody else can put a socket there: chmod 700 {directory}, or {advice}"
        )
    parent = directory.parent.stat()
    if parent.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not parent.st_mode & stat.S_ISVTX:
        raise UnsafeDirectory(f"{directory.parent} is writable by others and not sticky, so {directory} could be "
                              f"swapped for another: refusing to use it; {advice}")


def _user_name(uid: int) -> str:
    try:
        return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except KeyError:
        return f"uid {uid}"


def shown(value: Any, limit: int = 80) -> str:
    """``repr(value)`` for an error message, cut to about ``limit`` characters: a client's
    megabyte of text is not echoed back to it (nor into the log)."""
    text = repr(value)
    if len(text) <= limit:
        return text
    size = f" ({len(value):,} characters)" if isinstance(value, str) else ""
    return f"{text[:limit]}...{size}"


@dataclass
class ProtocolError(Exception):
    """An error that travels: ``{"code", "message", "details"}`` on the wire."""

    code: str
    message: str
    details: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__init__(f"{self.code}: {self.message}")

    def to_wire(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "details": self.details}

    @classmethod
    def from_wire(cls, error: Any) -> ProtocolError:
        if not isinstance(error, dict):
            return cls(BAD_FRAME, f"malformed error object: {error!r}")
        details = error.get("details")
        return cls(
            str(error.get("code", INTERNAL)),
            str(error.get("message", "")),
            details if isinstance(details, dict) else {},
        )


MAX_BODY_BYTES = 2**32 - 1  # the header's u32 length


class FrameTooLarge(ValueError):
    """A body too large for any frame (over 4 GiB)."""


def encode_frame(kind: int, body: dict[str, Any]) -> bytes:
    """Header + msgpack body (``bytes`` become msgpack bin, ``str`` msgpack str)."""
    payload = msgpack.packb(body, use_bin_type=True)
    if len(payload) > MAX_BODY_BYTES:
        raise FrameTooLarge(f"a body of {len(payload):,} bytes is over the {MAX_BODY_BYTES:,}-byte frame limit")
    return HEADER.pack(MAGIC, VERSION, kind, len(payload)) + payload


class Blob:
    """A byte string kept in pieces (e.g. a result file as its encoder wrote it), sent
    as one msgpack bin by :func:`encode_frame_parts` without ever being joined."""

    def __init__(self, pieces: list[bytes]) -> None:
        self.pieces = pieces
        self.size = sum(len(piece) for piece in pieces)


def encode_frame_parts(kind: int, body: dict[str, Any]) -> list[bytes]:
    """The frame of ``body`` as a list of buffers whose concatenation is the frame: as
    :func:`encode_frame`, but Blob values (in ``body`` or maps inside it) are not copied."""
    packer = msgpack.Packer(use_bin_type=True)
    parts: list[bytes] = []
    _pack_parts(body, packer, parts)
    size = sum(len(part) for part in parts)
    if size > MAX_BODY_BYTES:
        raise FrameTooLarge(f"a body of {size:,} bytes is over the {MAX_BODY_BYTES:,}-byte frame limit")
    return [HEADER.pack(MAGIC, VERSION, kind, size), *parts]


def _pack_parts(value: Any, packer: msgpack.Packer, parts: list[bytes]) -> None:
    if isinstance(value, Blob):
        parts.append(_bin_header(value.size))
        parts.extend(value.pieces)
    elif isinstance(value, dict) and _holds_blob(value):
        parts.append(packer.pack_map_header(len(value)))
        for key, item in value.items():
            parts.append(packer.pack(key))
            _pack_parts(item, packer, parts)
    else:
        parts.append(packer.pack(value))


def _bin_header(size: int) -> bytes:
    """msgpack's bin 8/16/32 header (the msgpack package has no call for it alone)."""
    if size < 1 << 8:
        return struct.pack(">BB", 0xC4, size)
    if size < 1 << 16:
        return struct.pack(">BH", 0xC5, size)
    return struct.pack(">BI", 0xC6, size)


def _holds_blob(value: Any) -> bool:
    return isinstance(value, Blob) or (isinstance(value, dict) and any(_holds_blob(v) for v in value.values()))


def parse_header(header: bytes, max_body: int, expected_kinds: tuple[int, ...]) -> tuple[int, int]:
    """Check a header before any body byte is read: returns (kind, body length)."""
    if len(header) != HEADER_SIZE:
        raise ProtocolError(BAD_FRAME, f"truncated frame header ({len(header)} of {HEADER_SIZE} bytes)")
    magic, version, kind, length = HEADER.unpack(header)
    if magic != MAGIC:
        raise ProtocolError(BAD_FRAME, f"bad magic {magic!r}; frames start with {MAGIC!r}")
    if version != VERSION:
        raise ProtocolError(
            UNSUPPORTED_VERSION,
            f"protocol version {version} is not supported; this side speaks version {VERSION}",
            {"supported": [VERSION]},
        )
    if kind not in expected_kinds:
        raise ProtocolError(BAD_FRAME, f"unexpected frame kind {kind}; expected one of {list(expected_kinds)}")
    if length > max_body:
        raise ProtocolError(
            FRAME_TOO_LARGE,
            f"frame body of {length:,} bytes is over the limit of {max_body:,}",
            {"limit": max_body},
        )
    return kind, length


def decode_body(payload: bytes) -> dict[str, Any]:
    """A msgpack map with string keys, or ProtocolError(bad_frame)."""
    try:
        body = msgpack.unpackb(payload, raw=False, strict_map_key=True)
    except Exception as error:  # noqa: BLE001 - msgpack raises several unrelated types
        raise ProtocolError(BAD_FRAME, f"the body is not valid msgpack ({type(error).__name__})") from None
    if not isinstance(body, dict):
        raise ProtocolError(BAD_FRAME, f"the body must be a msgpack map, got {type(body).__name__}")
    return body


def request(request_id: int, op: str, args: dict[str, Any] | None = None) -> bytes:
    return encode_frame(REQUEST, {"id": request_id, "op": op, "args": args or {}})


def ok_response(request_id: int | None, result: dict[str, Any]) -> list[bytes]:
    """The success frame, in parts (see :func:`encode_frame_parts`)."""
    return encode_frame_parts(RESPONSE, {"id": request_id, "ok": True, "result": result})


def error_response(request_id: int | None, error: ProtocolError) -> bytes:
    return encode_frame(RESPONSE, {"id": request_id, "ok": False, "error": error.to_wire()})


def event(request_id: int, name: str, **fields: Any) -> bytes:
    return encode_frame(EVENT, {"id": request_id, "event": name, **fields})


def read_frame(sock: socket.socket, max_body: int, expected_kinds: tuple[int, ...]) -> tuple[int, dict[str, Any]]:
    """Blocking read of one frame from ``sock``: (kind, body). EOFError if the peer closed."""
    kind, length = parse_header(_recv_exactly(sock, HEADER_SIZE), max_body, expected_kinds)
    return kind, decode_body(_recv_exactly(sock, length))


def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    chunks, remaining = [], size
    while remaining:
        chunk = sock.recv(min(remaining, 1 << 20))
        if not chunk:
            raise EOFError(f"connection closed with {remaining} of {size} bytes unread")
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)
