"""The framing module shared by igd and igctl (torch-free)."""

from __future__ import annotations

import struct

import msgpack
import pytest

from igd import protocol
from igd.protocol import ProtocolError


def test_frame_layout_is_the_documented_one() -> None:
    frame = protocol.request(7, "attribute", {"image": b"\x00\x01", "target": "cat"})
    magic, version, kind, length = struct.unpack(">2sBBI", frame[:8])
    assert (magic, version, kind, length) == (b"IG", 1, 0, len(frame) - 8)
    body = msgpack.unpackb(frame[8:], raw=False)
    assert body == {"id": 7, "op": "attribute", "args": {"image": b"\x00\x01", "target": "cat"}}
    assert frame[8:].find(b"\xc4\x02\x00\x01") > 0  # bytes travel as msgpack bin 8


@pytest.mark.parametrize(
    "header,code",
    [
        (struct.pack(">2sBBI", b"GI", 1, 0, 3), "bad_frame"),
        (struct.pack(">2sBBI", b"IG", 2, 0, 3), "unsupported_version"),
        (struct.pack(">2sBBI", b"IG", 1, 1, 3), "bad_frame"),
        (struct.pack(">2sBBI", b"IG", 1, 0, 101), "frame_too_large"),
        (b"IG\x01", "bad_frame"),
    ],
)
def test_headers_are_checked_before_the_body(header: bytes, code: str) -> None:
    with pytest.raises(ProtocolError) as error:
        protocol.parse_header(header, 100, (protocol.REQUEST,))
    assert error.value.code == code
    assert protocol.parse_header(struct.pack(">2sBBI", b"IG", 1, 0, 100), 100, (0,)) == (0, 100)


@pytest.mark.parametrize("payload", [b"\xc1", msgpack.packb([1, 2]), msgpack.packb({1: "int key"}), b""])
def test_bodies_must_be_maps_with_string_keys(payload: bytes) -> None:
    with pytest.raises(ProtocolError, match="bad_frame"):
        protocol.decode_body(payload)


def test_errors_round_trip_as_dicts() -> None:
    error = ProtocolError("unknown_target", "no such class", {"num_classes": 10})
    frame = protocol.error_response(3, error)
    body = protocol.decode_body(frame[8:])
    assert body["ok"] is False and body["id"] == 3
    again = ProtocolError.from_wire(body["error"])
    assert again == error and str(again) == "unknown_target: no such class"
    assert ProtocolError.from_wire("junk").code == "bad_frame"


@pytest.mark.parametrize("size", [0, 1, 255, 256, 65535, 65536, 300_000])
def test_frames_in_parts_equal_whole_frames(size: int) -> None:
    data = bytes(range(256)) * (size // 256) + bytes(size % 256)
    body = {"id": 3, "ok": True, "result": {"data": data, "format": "torch", "n": 1.5}}
    pieces = [data[i : i + 1000] for i in range(0, len(data), 1000)]
    parts = protocol.encode_frame_parts(protocol.RESPONSE, {**body, "result": {**body["result"], "data": protocol.Blob(pieces)}})
    assert b"".join(parts) == protocol.encode_frame(protocol.RESPONSE, body)
