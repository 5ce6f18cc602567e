"""igd.output.reader trusts nothing: hostile result files, made here byte by byte, are refused
with one line (``not an igd result (why)``), never read past a buffer, never inflated
without bound, never executed; genuine files still read exactly as torch.load reads them.
Plus a fuzzer over mutated and generated torch and npz results."""

from __future__ import annotations

import gzip
import io
import json
import os
import random
import struct
import subprocess
import threading
import time
import tracemalloc
import zlib
from pathlib import Path
from typing import Any, Callable, NamedTuple

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import READER_OUTCOME, record_hardening
from daemon import IGCTL
import reference  # read_result there is the plain gunzip + torch.load these are checked against
from igctl.show import describe, summary
from igd.output import reader
from igd.output.reader import MAX_RESULT_BYTES, UnreadableResult, read_result
from igd.output.results import encode

# pickletools' scan decodes protocol-0 strings (refused after) with codecs.escape_decode.
pytestmark = pytest.mark.filterwarnings("ignore:invalid escape sequence:DeprecationWarning")

# ------------------------------------------------------------------ result files by hand


class Tensor(NamedTuple):
    """A pickled ``torch._utils._rebuild_tensor_v2`` call, its values whatever a test says."""

    key: str
    numel: int
    size: tuple
    stride: tuple
    offset: int = 0
    kind: str = "FloatStorage"


class Raw(NamedTuple):
    """Pickle opcodes written as they are."""

    data: bytes


def _int(value: int) -> bytes:
    if 0 <= value < 256:
        return b"K" + bytes([value])
    if -(2**31) <= value < 2**31:
        return b"J" + struct.pack("<i", value)
    body = value.to_bytes((value.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(body)]) + body


def _global(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def opcodes(value: Any) -> bytes:
    """``value`` as protocol-2 pickle opcodes, the way torch.save writes tensors."""
    if isinstance(value, Raw):
        return value.data
    if isinstance(value, Tensor):
        storage = b"(" + opcodes("storage") + _global("torch", value.kind) + opcodes(value.key) + opcodes("cpu") \
            + _int(value.numel) + b"t"
        return (_global("torch._utils", "_rebuild_tensor_v2") + b"(" + storage + b"Q" + _int(value.offset)
                + opcodes(tuple(value.size)) + opcodes(tuple(value.stride)) + b"\x89"
                + _global("collections", "OrderedDict") + b")R" + b"tR")
    if value is None:
        return b"N"
    if isinstance(value, bool):
        return b"\x88" if value else b"\x89"
    if isinstance(value, int):
        return _int(value)
    if isinstance(value, float):
        return b"G" + struct.pack(">d", value)
    if isinstance(value, str):
        data = value.encode("utf-8", "surrogatepass")
        return b"X" + struct.pack("<I", len(data)) + data
    if isinstance(value, list):
        return b"](" + b"".join(opcodes(v) for v in value) + b"e"
    if isinstance(value, tuple):
        return b"(" + b"".join(opcodes(v) for v in value) + b"t"
    if isinstance(value, dict):
        return b"}(" + b"".join(opcodes(k) + opcodes(v) for k, v in value.items()) + b"u"
    raise TypeError(type(value))


def pickled(value: Any) -> bytes:
    return b"\x80\x02" + opcodes(value) + b"."


class Member(NamedTuple):
    """A zip entry; ``size``/``crc`` as the headers should claim them (None: the truth)."""

    name: str
    data: bytes
    method: int = 0  # 0 stored, 8 deflated (``data`` then is the raw deflate stream)
    size: int | None = None
    crc: int | None = None
    flags: int = 0


def zipped(members: list[Member]) -> bytes:
    """A zip archive written field by field, so that its headers can lie."""
    out, directory = io.BytesIO(), io.BytesIO()
    for m in members:
        name = m.name.encode()
        crc = zlib.crc32(m.data) if m.crc is None else m.crc
        size = len(m.data) if m.size is None else m.size
        offset = out.tell()
        out.write(struct.pack("<4s5H3L2H", b"PK\x03\x04", 20, m.flags, m.method, 0, 0x21, crc, len(m.data), size,
                              len(name), 0) + name + m.data)
        directory.write(struct.pack("<4s6H3L5HLL", b"PK\x01\x02", 20, 20, m.flags, m.method, 0, 0x21, crc,
                                    len(m.data), size, len(name), 0, 0, 0, 0, 0, offset) + name)
    start = out.tell()
    out.write(directory.getvalue())
    out.write(struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, len(members), len(members), len(directory.getvalue()),
                          start, 0))
    return out.getvalue()


def torch_archive(pkl: bytes, storages: dict[str, bytes], extra: list[Member] = (), byteorder: bytes = b"little",
                  ) -> bytes:
    """A torch.save archive: data.pkl, byteorder, the storages' members, version."""
    members = [Member("archive/data.pkl", pkl), Member("archive/byteorder", byteorder)]
    members += [Member(f"archive/data/{key}", data) for key, data in storages.items()]
    return zipped(members + list(extra) + [Member("archive/version", b"3\n")])


def torch_file(value: Any, storages: dict[str, bytes], extra: list[Member] = ()) -> bytes:
    return gzip.compress(torch_archive(pickled(value), storages, extra), compresslevel=1, mtime=0)


def floats(*values: float) -> bytes:
    return np.asarray(values, dtype="<f4").tobytes()


def npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, array, allow_pickle=True)
    return buffer.getvalue()


def npy_declaring(header: str, data: bytes) -> bytes:
    """An .npy member whose header says ``header`` (a dict literal), then ``data``."""
    text = header.encode("latin1")
    text += b" " * (63 - (10 + len(text)) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(text)) + text + data


def npz_file(members: dict[str, bytes]) -> bytes:
    return zipped([Member(f"{key}.npy", data) for key, data in members.items()])


# ------------------------------------------------------------- the hand-made corpus

ONE = {"0": floats(1.0)}


def _shared_sublists(levels: int, width: int = 2) -> Any:
    """l = [l] * width, ``levels`` times: a few hundred bytes that stand for width**levels lists."""
    ops = b"]q\x00"  # level 0: an empty list, memo 0
    for level in range(levels):
        ops += b"0](" + (b"h" + bytes([level])) * width + b"eq" + bytes([level + 1])  # pop, then [l] * width
    return Raw(ops)


def _nested(levels: int) -> Raw:
    return Raw(b"]" * levels + b"a" * (levels - 1))


CORPUS: dict[str, tuple[Callable[[], bytes], str]] = {
    # name: (the file's bytes, what the refusal says)
    "view past the storage": (lambda: torch_file({"x": Tensor("0", 1, (64,), (1,))}, ONE), "past the storage"),
    "1-byte storage as 16 KiB": (
        lambda: torch_file({"x": Tensor("0", 1, (16384,), (1,), kind="ByteStorage")}, {"0": b"\x07"}),
        "past the storage"),
    "negative stride": (lambda: torch_file({"x": Tensor("0", 4, (4,), (-1,), offset=3)}, {"0": floats(1, 2, 3, 4)}),
                        "negative strides"),
    "zero stride asking 8 GiB": (lambda: torch_file({"x": Tensor("0", 1, (2**31,), (0,))}, ONE), "zero"),
    "stride 2**40": (lambda: torch_file({"x": Tensor("0", 4, (2, 2), (2**40, 1))}, {"0": floats(1, 2, 3, 4)}),
                     "not a dense block"),
    "huge size": (lambda: torch_file({"x": Tensor("0", 1, (2**62,), (1,))}, ONE), "has the shape"),
    "huge size in many dimensions": (lambda: torch_file({"x": Tensor("0", 1, (2**20,) * 5, (1,) * 5)}, ONE),
                                     "elements"),
    "offset past the end": (lambda: torch_file({"x": Tensor("0", 1, (1,), (1,), offset=100)}, ONE), "offset"),
    "overlapping dimensions": (lambda: torch_file({"x": Tensor("0", 4, (2, 2), (1, 1))}, {"0": floats(1, 2, 3, 4)}),
                               "not a dense block"),
    "member larger than declared": (lambda: torch_file({"x": Tensor("0", 1, (1,), (1,))}, {"0": floats(1, 2)}),
                                    "declares 4"),
    "member smaller than declared": (lambda: torch_file({"x": Tensor("0", 16, (16,), (1,))}, {"0": floats(1, 2)}),
                                     "declares 64"),
    "member missing": (lambda: torch_file({"x": Tensor("0", 1, (1,), (1,))}, {}), "no member"),
    "storage declared twice, differently": (
        lambda: torch_file({"x": Tensor("0", 1, (1,), (1,)), "y": Tensor("0", 2, (2,), (1,))}, ONE),
        "declared twice"),
    "shared sub-list bomb": (lambda: torch_file({"model": _shared_sublists(60)}, {}), "nested over 16 deep"),
    "shared sub-list bomb, shallow": (lambda: torch_file({"model": _shared_sublists(5, 100)}, {}),
                                      "counting every visit"),
    "deep nesting, 100,000 levels": (lambda: torch_file({"model": _nested(100_000)}, {}), "opcodes"),
    "deep nesting, 1,000 levels": (lambda: torch_file({"model": _nested(1_000)}, {}), "nested over"),
    "a list at the top": (lambda: torch_file([1, 2, 3], {}), "a list, not a dict"),
    "a key that is not a string": (lambda: torch_file({1: 2}, {}), "a key of type int"),
    "a huge integer": (lambda: torch_file({"n_steps": 2**100}, {}), "64 bits"),
    "os.system": (lambda: torch_file({"x": Raw(_global("os", "system") + b"(" + opcodes("touch PWNED") + b"tR")}, {}),
                  "os.system is not part of a result file"),
    "builtins.eval": (lambda: torch_file({"x": Raw(_global("builtins", "eval") + b"(" + opcodes("1") + b"tR")}, {}),
                      "builtins.eval"),
    "a storage type called": (lambda: torch_file({"x": Raw(_global("torch", "FloatStorage") + b"(" + opcodes([1.0])
                                                           + b"tR")}, {}), "not callable"),
    "BUILD": (lambda: torch_file({"x": Raw(b"}" + b"}b")}, {}), "BUILD"),
    "NEWOBJ": (lambda: torch_file({"x": Raw(_global("collections", "OrderedDict") + b")\x81")}, {}), "NEWOBJ"),
    "a memo index of 2**31": (lambda: torch_file({"x": Raw(b"Nr" + struct.pack("<I", 2**31))}, {}), "memo index"),
    "a bytes value": (lambda: torch_file({"x": Raw(b"C\x03abc")}, {}), "SHORT_BINBYTES"),
    "a string persistent id": (lambda: torch_file({"x": Raw(b"Pfoo\n")}, {}), "PERSID"),
    "a truncated length prefix": (lambda: gzip.compress(torch_archive(b"\x80\x02}X\xff\xff\xff\x7f", {})),
                                  "remain"),
    "no data.pkl": (lambda: gzip.compress(zipped([Member("archive/version", b"3\n")])), "no data.pkl"),
    "an odd byte order": (lambda: gzip.compress(torch_archive(pickled({"x": Tensor("0", 1, (1,), (1,))}), ONE,
                                                              byteorder=b"middle")), "byte order"),
    "an encrypted member": (lambda: gzip.compress(zipped([Member("archive/data.pkl", pickled({}), flags=1)])),
                            "encrypted"),
    "a bzip2 member": (lambda: gzip.compress(zipped([Member("archive/data.pkl", pickled({}), method=12)])),
                       "compressed in a way"),
    "a central directory of 4 GiB": (
        lambda: gzip.compress(zipped([Member("archive/data.pkl", pickled({}))])[:-22]
                              + struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, 1, 1, 2**32 - 1, 0, 0)),
        "zip directory"),
    "5,000 members": (lambda: gzip.compress(zipped([Member(f"archive/x{i}", b"") for i in range(5000)])),
                      "zip members"),
    "a data.pkl of 2 MiB": (lambda: torch_file({"x": "a" * (2 << 20)}, {}), "data.pkl of"),
    "a truncated gzip": (lambda: torch_file({"x": 1}, {})[:-9], "gzip"),
    "gzip then junk": (lambda: torch_file({"x": 1}, {}) + b"junk", "gzip"),
    "neither gzip nor zip": (lambda: b"hello", "neither"),
    "an empty file": (lambda: b"", "neither"),
    "npz: a header shape of 2**40": (
        lambda: npz_file({"x": npy_declaring("{'descr': '<f4', 'fortran_order': False, 'shape': (1099511627776,), }",
                                             floats(1))}), "has the shape"),
    "npz: a shape bigger than the member": (
        lambda: npz_file({"x": npy_declaring("{'descr': '<f4', 'fortran_order': False, 'shape': (1000,), }",
                                             floats(1))}), "declares 4,000 bytes"),
    "npz: an object dtype": (lambda: npz_file({"x": npy(np.array([{"a": 1}, None], dtype=object))}), "holds object"),
    "npz: a structured dtype": (lambda: npz_file({"x": npy(np.zeros(2, dtype=[("a", "<f4"), ("b", "<i4")]))}),
                                "not numbers"),
    "npz: bytes": (lambda: npz_file({"x": npy(np.array([b"ab"]))}), "not numbers"),
    "npz: a member that is not .npy": (lambda: zipped([Member("x.txt", b"hello")]), "not an .npy"),
    "npz: a negative dimension": (
        lambda: npz_file({"x": npy_declaring("{'descr': '<f4', 'fortran_order': False, 'shape': (-1,), }",
                                             floats(1))}), "shape"),
    "npz: a huge header": (lambda: npz_file({"x": b"\x93NUMPY\x02\x00" + struct.pack("<I", 2**31) + b"{"}),
                           "header"),
}

@pytest.mark.parametrize("name", sorted(CORPUS))
def test_hostile_file_is_refused_in_one_line(name: str, tmp_path: Path) -> None:
    make, said = CORPUS[name]
    path = tmp_path / ("result.npz" if name.startswith("npz") else "result.gzip")
    path.write_bytes(make())
    with pytest.raises(UnreadableResult) as refused:
        read_result(path)
    message = str(refused.value)
    assert message.startswith("not an igd result (") and message.endswith(")") and "\n" not in message, message
    assert said in message, message
    assert not (tmp_path / "PWNED").exists() and not Path("PWNED").exists()
    record_hardening(HAND_MADE, 1, READER_OUTCOME)


HAND_MADE = "hand-made hostile result files and special files"


# ------------------------------------------------------------------ special files

SPECIAL_FILES = ("fifo", "/dev/zero", "directory", "symlink to /dev/zero", "socket")


def special_file(kind: str, folder: Path) -> Path:
    if kind == "fifo":
        os.mkfifo(folder / "fifo.gzip")
        return folder / "fifo.gzip"
    if kind == "/dev/zero":
        return Path("/dev/zero")
    if kind == "directory":
        (folder / "dir.gzip").mkdir()
        return folder / "dir.gzip"
    if kind == "symlink to /dev/zero":
        (folder / "zero.gzip").symlink_to("/dev/zero")
        return folder / "zero.gzip"
    import socket

    path = folder / "sock.gzip"
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(path))
    return path


def within(seconds: float, call: Callable[[], Any]) -> Any:
    """``call()``'s answer or exception, failing the test if it takes over ``seconds``."""
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["value"] = call()
        except BaseException as error:  # noqa: BLE001 - handed to the test
            outcome["error"] = error

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still running after {seconds} s"
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


@pytest.mark.parametrize("kind", SPECIAL_FILES)
def test_special_files_are_refused_without_reading(kind: str, tmp_path: Path) -> None:
    path = special_file(kind, tmp_path)
    said = r"^not an igd result \((the file is a .*, not a result file|cannot read the file: .*)\)$"
    with pytest.raises(UnreadableResult, match=said):
        within(10, lambda: read_result(path))
    record_hardening(HAND_MADE, 1, READER_OUTCOME)


SHOWN = ["view past the storage", "1-byte storage as 16 KiB", "negative stride", "zero stride asking 8 GiB",
         "stride 2**40", "huge size", "shared sub-list bomb", "os.system", "npz: a header shape of 2**40",
         "npz: an object dtype", "a central directory of 4 GiB"]


@pytest.mark.parametrize("name", SHOWN + [f"special: {kind}" for kind in SPECIAL_FILES])
def test_igctl_show_refuses_in_one_line(name: str, tmp_path: Path) -> None:
    if name.startswith("special: "):
        path = special_file(name[len("special: "):], tmp_path)
    else:
        path = tmp_path / ("r.npz" if name.startswith("npz") else "r.gzip")
        path.write_bytes(CORPUS[name][0]())
    shown = subprocess.run([IGCTL, "show", str(path)], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert shown.returncode == 1, (shown.returncode, shown.stderr)
    lines = shown.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"igctl: {path}: not an igd result ("), shown.stderr
    assert "Traceback" not in shown.stderr and shown.stdout == ""
    assert not (tmp_path / "PWNED").exists()


def test_igctl_show_goes_on_after_a_hostile_file(tmp_path: Path) -> None:
    good, bad = tmp_path / "good.gzip", tmp_path / "bad.gzip"
    good.write_bytes(encode({"integrated_grads": torch.zeros(1, 3, 2, 2), "target_class": 3, "n_steps": 4,
                             "method": "gausslegendre"}, "torch"))
    bad.write_bytes(CORPUS["view past the storage"][0]())
    shown = subprocess.run([IGCTL, "show", str(bad), str(good), "--json"], capture_output=True, text=True, timeout=60)
    assert shown.returncode == 1 and len(shown.stderr.splitlines()) == 1
    assert json.loads(shown.stdout)["targets"] == [{"index": 3, "name": None}]


# --------------------------------------------------- bombs: bounded time and memory

# A raw deflate stream of 1 GiB of zeros, made from one compressed MiB repeated (a full
# flush makes each piece stand alone): about 1 MB that inflates 1000-fold.
_MIB = 1 << 20


def deflated_zeros(mebibytes: int) -> tuple[bytes, int]:
    """(the raw deflate stream of ``mebibytes`` MiB of zeros, their CRC-32)."""
    squeezer = zlib.compressobj(9, zlib.DEFLATED, -15)
    squeezer.compress(bytes(_MIB))
    squeezer.flush(zlib.Z_FULL_FLUSH)
    piece = squeezer.compress(bytes(_MIB)) + squeezer.flush(zlib.Z_FULL_FLUSH)
    crc, zeros = 0, bytes(_MIB)
    for _ in range(mebibytes):
        crc = zlib.crc32(zeros, crc)
    return piece * mebibytes + squeezer.flush(zlib.Z_FINISH), crc


@pytest.fixture(scope="module")
def gigabyte_of_zeros() -> tuple[bytes, int]:
    stream, crc = deflated_zeros(1024)
    assert len(stream) < 2 * _MIB and zlib.decompressobj(-15).decompress(stream, 100) == bytes(100)
    return stream, crc


def bounded(call: Callable[[], Any]) -> tuple[Any, float, int]:
    """(``call()``'s answer or exception, seconds, peak bytes allocated meanwhile)."""
    tracemalloc.start()
    began = time.monotonic()
    try:
        answer: Any = call()
    except UnreadableResult as error:
        answer = error
    seconds = time.monotonic() - began
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return answer, seconds, peak


@pytest.mark.parametrize("header", ["honest", "lying"])
def test_member_inflating_to_a_gibibyte_is_refused_without_inflating_it(
        header: str, gigabyte_of_zeros: tuple[bytes, int], tmp_path: Path) -> None:
    """A deflated storage member of 1 GiB behind a 1-element storage: refused by its size
    (honest headers), or after the 4 bytes the storage declares fail its CRC (lying ones)."""
    stream, crc = gigabyte_of_zeros
    size = 1 << 30 if header == "honest" else 4
    member = Member("archive/data/0", stream, method=8, size=size, crc=crc)
    archive = zipped([Member("archive/data.pkl", pickled({"x": Tensor("0", 1, (1,), (1,))})), member])
    path = tmp_path / "bomb.gzip"
    path.write_bytes(gzip.compress(archive, compresslevel=1))
    answer, seconds, peak = bounded(lambda: read_result(path))
    assert isinstance(answer, UnreadableResult), answer
    assert ("declares 4" if header == "honest" else "CRC") in str(answer)
    assert seconds < 10 and peak < 32 * _MIB, (seconds, peak)


def test_big_storage_is_read_only_as_far_as_its_tensor_reaches(
        gigabyte_of_zeros: tuple[bytes, int], tmp_path: Path) -> None:
    """A tensor of 2 elements of a storage of 1 GiB (as torch.save writes a view): 8 bytes
    are read and inflated, not the gibibyte."""
    stream, crc = gigabyte_of_zeros
    member = Member("archive/data/0", stream, method=8, size=1 << 30, crc=crc)
    pkl = pickled({"x": Tensor("0", 1 << 28, (2,), (1,), offset=0)})
    path = tmp_path / "view.gzip"
    path.write_bytes(gzip.compress(zipped([Member("archive/data.pkl", pkl), member]), compresslevel=1))
    answer, seconds, peak = bounded(lambda: read_result(path))
    assert isinstance(answer, dict) and answer["x"].tolist() == [0.0, 0.0]
    assert seconds < 10 and peak < 32 * _MIB, (seconds, peak)


def test_the_caps_hold(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """With the cap lowered to 1 MiB: a gzip inflating past it, tensors or npz arrays
    needing more, are refused after at most about the cap's memory."""
    monkeypatch.setattr(reader, "MAX_RESULT_BYTES", _MIB)
    stream, _crc = deflated_zeros(8)
    bomb = tmp_path / "bomb.gzip"
    bomb.write_bytes(b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff" + stream + struct.pack("<LL", 0, 0))
    shared = np.zeros(150_000, dtype=np.float32)  # 600 kB, two tensors of it: 1.8 MB read and copied
    tensors = tmp_path / "tensors.gzip"
    tensors.write_bytes(torch_file({"x": Tensor("0", shared.size, shared.shape, (1,)),
                                    "y": Tensor("0", shared.size, shared.shape, (1,))}, {"0": shared.tobytes()}))
    member = npy(np.zeros(300_000, dtype=np.float32))  # 1.2 MB, deflated to about 1 kB
    squeezer = zlib.compressobj(9, zlib.DEFLATED, -15)
    npz = tmp_path / "big.npz"
    npz.write_bytes(zipped([Member("x.npy", squeezer.compress(member) + squeezer.flush(), method=8,
                                   size=len(member), crc=zlib.crc32(member))]))
    for path, said in ((bomb, "inflates to over 1,048,576 bytes"), (tensors, "need 1,800,000 bytes"),
                       (npz, "arrays hold over")):
        answer, _seconds, peak = bounded(lambda: read_result(path))
        assert isinstance(answer, UnreadableResult) and said in str(answer), answer
        assert peak < 12 * _MIB, (path, peak)


# ------------------------------------------------ genuine files read as torch reads them

GENUINE = {
    "contiguous": torch.arange(24, dtype=torch.float32).reshape(2, 3, 4),
    "transposed": torch.arange(6, dtype=torch.float32).reshape(2, 3).t(),
    "permuted": torch.arange(24, dtype=torch.float64).reshape(2, 3, 4).permute(2, 0, 1),
    "zero_d": torch.tensor(3.5),
    "empty": torch.empty(0, 3),
    "bool": torch.tensor([True, False, True]),
    "int64": torch.tensor([[1, -2], [3, 2**40]]),
    "float16": torch.tensor([0.5, -1.25, 65504.0], dtype=torch.float16),
    "int8": torch.tensor([-128, 127], dtype=torch.int8),
    "uint8": torch.tensor([0, 255], dtype=torch.uint8),
    "column": torch.arange(5, dtype=torch.float32).view(-1, 1),
    "a view of a larger storage": torch.arange(10, dtype=torch.float32)[3:7],
    "zero stride of a unit dimension": torch.arange(3, dtype=torch.float32).as_strided((1, 3), (0, 1)),
    "target_class": 3,
    "target_name": ["cat", "dog"],
    "convergence_delta": 0.125,
    "tolerance_met": True,
    "nothing": None,
    "input_size": [3, 224, 224],
    "pair": (1, 2.5),
}


def test_genuine_torch_files_read_as_torch_load_reads_them(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    torch.save(GENUINE, buffer)
    path = tmp_path / "genuine.gzip"
    path.write_bytes(gzip.compress(buffer.getvalue()))
    loaded = reference.read_result(path)
    read = read_result(path)
    assert list(read) == list(loaded)
    for key, value in loaded.items():
        if isinstance(value, torch.Tensor):
            expected = value.numpy()
            assert read[key].dtype == expected.dtype and read[key].shape == expected.shape, key
            assert np.array_equal(read[key], expected), key
            assert read[key].flags.writeable and read[key].flags.owndata, key
        else:
            assert read[key] == value and type(read[key]) is type(value), key


def test_igd_written_results_read_identically_in_both_formats(tmp_path: Path) -> None:
    result = {"integrated_grads": torch.randn(1, 3, 8, 8), "integrated_directional_grads": torch.randn(5, 3, 8, 8),
              "step_sizes": torch.full((5, 1), 0.2), "output": torch.randn(1, 10), "target_class": [3, 5],
              "target_name": ["cat", "dog"], "n_steps": 5, "method": "gausslegendre", "tolerance_met": False,
              "convergence_delta": torch.tensor([0.5, -0.25]), "model": "lanet", "mean": [0.5, 0.5, 0.5]}
    for fmt in ("torch", "npz"):
        path = tmp_path / f"r.{fmt}"
        path.write_bytes(encode(result, fmt))
        read = read_result(path)
        for key, value in result.items():
            if isinstance(value, torch.Tensor):
                assert np.array_equal(read[key], value.numpy()) and read[key].dtype == np.float32, (fmt, key)
            elif fmt == "torch":
                assert read[key] == value, key
            else:
                assert np.asarray(read[key]).tolist() == value, key
        facts = summary(path, read)
        json.dumps(facts)
        assert facts["targets"] == [{"index": 3, "name": "cat"}, {"index": 5, "name": "dog"}]
        assert describe(facts)[0].startswith(f"{path}: 'cat' (3), 'dog' (5)")


def test_describe_escapes_what_a_file_could_send_to_a_terminal(tmp_path: Path) -> None:
    path = tmp_path / "r.gzip"
    path.write_bytes(torch_file({"target_class": 1, "target_name": "\x1b]0;owned\x07cat\nline", "n_steps": 1,
                                 "method": "x\ud800", "model_description": "evil\x1b[2J"}, {}))
    lines = describe(summary(path, read_result(path)))
    assert all(line.isprintable() for line in lines) and "\\x1b]0;owned\\x07cat\\nline" in lines[0]
    assert "x\\ud800 steps" in lines[1] and "evil\\x1b[2J" in "\n".join(lines)


# ------------------------------------------------------------------------ the fuzzer

FUZZ = dict(derandomize=True, deadline=None, database=None, suppress_health_check=list(HealthCheck))
BASE_PICKLE = pickled({
    "integrated_grads": Tensor("0", 12, (1, 3, 2, 2), (12, 4, 2, 1)),
    "step_sizes": Tensor("1", 2, (2, 1), (1, 1)),
    "transposed": Tensor("2", 6, (3, 2), (1, 3), kind="DoubleStorage"),
    "flags": Tensor("3", 2, (2,), (1,), kind="BoolStorage"),
    "target_class": [3], "target_name": ["cat"], "n_steps": 2, "method": "gausslegendre",
    "mean": [0.5, 0.5, 0.5], "input_size": (3, 2, 2), "model": None, "prediction_index": 3,
    "prediction_name": "cat", "prediction_probability": 0.75, "convergence_delta": -0.5,
})
BASE_STORAGES = {"0": floats(*range(12)), "1": floats(0.5, 0.5), "2": np.arange(6.0).tobytes(), "3": b"\x01\x00"}
BASE_NPZ = {
    "integrated_grads": npy(np.arange(12, dtype=np.float32).reshape(1, 3, 2, 2)),
    "fortran": npy(np.asfortranarray(np.arange(6, dtype=np.int64).reshape(2, 3))),
    "target_name": npy(np.array(["cat", "dog"])), "n_steps": npy(np.array(4)), "method": npy(np.array("gl")),
    "output": npy(np.linspace(0, 1, 10, dtype=np.float32).reshape(1, 10)), "ok": npy(np.array(True)),
}
INTERESTING = [0, 1, 2, 0x7F, 0x80, 0xFF, ord("("), ord("t"), ord("R"), ord("Q"), ord("K"), ord("J"), ord("."),
               ord("h"), ord("q"), ord("]"), ord("e"), 0x8A]


# Hypothesis draws a seed and a few choices; the edits follow from the seed (cheaper to
# draw than each byte, so that thousands of cases fit in seconds).
EDITS = st.tuples(st.integers(0, 2**32 - 1), st.integers(1, 6), st.sampled_from(["none", "cut", "insert"]))


def mutated(data: bytes, edits: tuple[int, int, str]) -> bytes:
    """``data`` with ``count`` bytes replaced (by interesting values or any) where the seed
    says, then maybe cut short or with up to 8 random bytes inserted."""
    seed, count, splice = edits
    chooser = random.Random(seed)
    out = bytearray(data)
    for _ in range(count):
        value = chooser.choice(INTERESTING) if chooser.random() < 0.5 else chooser.randrange(256)
        out[chooser.randrange(len(out))] = value
    position = chooser.randrange(len(out) + 1)
    if splice == "cut":
        out = out[:position]
    elif splice == "insert":
        out = out[:position] + chooser.randbytes(chooser.randrange(1, 9)) + out[position:]
    return bytes(out)


class Fuzz:
    """Reads each generated file and checks the contract: a dict within the caps, whose
    summary and description succeed or are refused, or an UnreadableResult; nothing else."""

    def __init__(self, folder: Path) -> None:
        self.count, self.read, self.path = 0, 0, folder / "fuzz.bin"

    def check(self, data: bytes) -> dict[str, Any] | None:
        self.count += 1
        self.path.write_bytes(data)
        try:
            result = read_result(self.path)
        except UnreadableResult as error:
            assert str(error).startswith("not an igd result (") and "\n" not in str(error)
            return None
        self.read += 1
        assert type(result) is dict
        arrays = {id(v): v for v in _values(result) if isinstance(v, np.ndarray)}
        assert sum(a.nbytes for a in arrays.values()) <= MAX_RESULT_BYTES
        try:
            facts = summary(self.path, result)
            json.dumps(facts)
            describe(facts)
        except UnreadableResult:
            pass
        return result


def _values(value: Any) -> list[Any]:
    if isinstance(value, dict):
        return [v for item in value.values() for v in _values(item)]
    if isinstance(value, (list, tuple)):
        return [v for item in value for v in _values(item)]
    return [value]


FUZZ_CASES = {"torch": 4000, "npz": 2500, "opcodes": 2500, "tensors": 1500}


@pytest.mark.slow  # 4,000 generated files
def test_fuzz_mutated_torch_results(tmp_path: Path) -> None:
    fuzz = Fuzz(tmp_path)
    archive = torch_archive(BASE_PICKLE, BASE_STORAGES)
    assert read_result_of(gzip.compress(archive), tmp_path)["target_name"] == ["cat"]

    @settings(max_examples=FUZZ_CASES["torch"], **FUZZ)
    @given(where=st.sampled_from(["pickle", "pickle", "pickle", "storage", "archive"]), edits=EDITS,
           key=st.sampled_from(sorted(BASE_STORAGES)))
    def case(where: str, edits: tuple[int, int, str], key: str) -> None:
        if where == "pickle":  # the zip stays valid: the mutation reaches the unpickler
            edited = torch_archive(mutated(BASE_PICKLE, edits), BASE_STORAGES)
        elif where == "storage":
            edited = torch_archive(BASE_PICKLE, dict(BASE_STORAGES, **{key: mutated(BASE_STORAGES[key], edits)}))
        else:
            edited = mutated(archive, edits)
        fuzz.check(gzip.compress(edited, compresslevel=0, mtime=0))

    case()
    record_hardening("fuzzed result files (mutated torch archives)", fuzz.count, READER_OUTCOME)
    assert fuzz.count >= FUZZ_CASES["torch"] and fuzz.read > fuzz.count // 20


@pytest.mark.slow  # 2,500 generated files
def test_fuzz_mutated_npz_results(tmp_path: Path) -> None:
    fuzz = Fuzz(tmp_path)
    whole = npz_file(BASE_NPZ)
    assert read_result_of(whole, tmp_path)["target_name"].tolist() == ["cat", "dog"]

    @settings(max_examples=FUZZ_CASES["npz"], **FUZZ)
    @given(where=st.sampled_from(["member", "member", "data", "data", "archive"]), edits=EDITS,
           key=st.sampled_from(sorted(BASE_NPZ)))
    def case(where: str, edits: tuple[int, int, str], key: str) -> None:
        member = BASE_NPZ[key]
        if where == "member":  # a valid zip of one mutated .npy (header or data)
            edited = npz_file(dict(BASE_NPZ, **{key: mutated(member, edits)}))
        elif where == "data":  # the header kept, the array's bytes changed in place
            header = member.index(b"\n") + 1
            array = mutated(member[header:], edits[:2] + ("none",))
            edited = npz_file(dict(BASE_NPZ, **{key: member[:header] + array}))
        else:
            edited = mutated(whole, edits)
        fuzz.check(edited)

    case()
    record_hardening("fuzzed result files (mutated npz)", fuzz.count, READER_OUTCOME)
    assert fuzz.count >= FUZZ_CASES["npz"] and fuzz.read > fuzz.count // 20


GLOBALS = [("torch._utils", "_rebuild_tensor_v2"), ("torch", "FloatStorage"), ("torch", "ByteStorage"),
           ("collections", "OrderedDict"), ("os", "system"), ("builtins", "getattr"), ("numpy", "float32"),
           ("torch._utils", "_rebuild_parameter"), ("torch", "Tensor")]
SIMPLE_OPCODES = [b"(", b")", b"]", b"}", b"N", b"\x88", b"\x89", b"t", b"\x85", b"\x86", b"\x87", b"l", b"d", b"a",
                  b"e", b"s", b"u", b"0", b"1", b"2", b"R", b"Q", b"\x94", b"\x93", b"b", b"\x81", b"o", b"P0\n",
                  b"C\x01x", b"\x8f", b"\x90", b"\x91", b"I01\n", b"L12\n", b"F1.5\n", b"V\\u1234\n", b"S'a\\s'\n"]


def opcode_piece(chooser: random.Random) -> bytes:
    """One opcode with its argument, or a storage's persistent id, as the seed falls."""
    kind = chooser.randrange(11)
    if kind == 0:
        return b"K" + bytes([chooser.randrange(256)])
    if kind == 1:
        return b"J" + struct.pack("<i", chooser.randrange(-(2**31), 2**31))
    if kind == 2:
        return _int(chooser.randrange(-(2**70), 2**70))
    if kind == 3:
        return b"G" + struct.pack(">d", chooser.choice([0.0, -1.5, 1e308, float("inf"), float("nan")]))
    if kind == 4:
        return opcodes("".join(chr(chooser.choice([65, 0x1B, 0xE9, 0xD800, 0x10FFFF])) for _ in range(3)))
    if kind == 5:
        return chooser.choice([b"q", b"h"]) + bytes([chooser.randrange(13)])
    if kind == 6:
        return chooser.choice([b"r", b"j"]) + struct.pack("<I", chooser.choice([0, 1, 2**31, 2**32 - 1]))
    if kind == 7:
        return _global(*chooser.choice(GLOBALS))
    if kind == 8:
        storage = chooser.choice(["FloatStorage", "ByteStorage", "HalfStorage", "LongStorage"])
        return (b"(" + opcodes("storage") + _global("torch", storage) + opcodes(chooser.choice(["0", "1", "x"]))
                + opcodes("cpu") + _int(chooser.randrange(-1, 71)) + b"tQ")
    return chooser.choice(SIMPLE_OPCODES)


SHOWN_KEYS = ["target_class", "target_name", "n_steps", "step_sizes", "method", "baseline_name", "output",
              "prediction_index", "prediction_name", "prediction_probability", "convergence_delta", "error_estimate",
              "completeness_gap", "tolerance_met", "path", "blur_sigma", "model", "max_batch", "mean", "std",
              "input_size", "model_family", "integrated_grads", "input", "created"]


class Grammar:
    """Pickles of dicts with values of every shape a reader meets (mostly well-formed, so
    that they load; memoised values shared, lists that hold themselves, now and then a
    random opcode spliced in)."""

    WEIGHTS = [3, 3, 2, 3, 4, 2, 3, 3, 0.3, 0.3, 1]  # of each kind of value below

    def __init__(self, chooser: random.Random) -> None:
        self.chooser, self.memo = chooser, 0

    def value(self, depth: int) -> bytes:
        chooser = self.chooser
        if chooser.random() < 0.03:
            return opcode_piece(chooser)
        kind = chooser.choices(range(11) if depth < 4 else range(6), self.WEIGHTS[: 11 if depth < 4 else 6])[0]
        if kind == 0:
            ops = chooser.choice([b"N", b"\x88", b"\x89"])
        elif kind == 1:
            ops = _int(chooser.choice([0, 3, -1, 255, 2**31, 2**63, -(2**64 - 1), 2**64 - 1, 2**64, 1, 2, 7]))
        elif kind == 2:
            ops = opcodes(chooser.choice([0.5, -0.0, float("nan"), float("inf"), 1e308]))
        elif kind == 3:
            ops = opcodes(chooser.choice(["cat", "", "gausslegendre", "blur", "\x1b[2J", "a\nb", "\ud800", "9" * 5000]))
        elif kind == 4:
            size = tuple(chooser.randrange(4) for _ in range(chooser.randrange(5)))
            stride = tuple(np.cumprod((1,) + size[:0:-1])[::-1].tolist()) if size else ()
            offset = chooser.randrange(3)
            storage = chooser.choice([("0", "FloatStorage", 70), ("1", "ByteStorage", 70)])
            ops = opcodes(Tensor(storage[0], storage[2], size, stride, offset, storage[1]))
        elif kind == 5 and self.memo:
            return b"h" + bytes([chooser.randrange(self.memo)])
        elif kind == 5:
            ops = b"N"
        elif kind in (6, 7):
            items = b"".join(self.value(depth + 1) for _ in range(chooser.randrange(4)))
            ops = b"](" + items + b"e" if kind == 6 else b"(" + items + b"t"
        elif kind == 8:
            ops = b"}(" + b"".join(opcodes(chooser.choice(SHOWN_KEYS)) + self.value(depth + 1)
                                   for _ in range(chooser.randrange(3))) + b"u"
        elif kind == 9 and self.memo < 250:  # a list that holds itself
            self.memo += 1
            return b"]q" + bytes([self.memo - 1]) + b"h" + bytes([self.memo - 1]) + b"a"
        else:
            ops = b"(" + self.value(depth + 1) + self.value(depth + 1) + b"l"
        if self.memo < 250 and chooser.random() < 0.3:
            self.memo += 1
            ops += b"q" + bytes([self.memo - 1])
        return ops

    def result(self) -> bytes:
        keys = self.chooser.sample(SHOWN_KEYS, self.chooser.randrange(1, 8))
        return b"\x80\x02}(" + b"".join(opcodes(key) + self.value(1) for key in keys) + b"u."


@pytest.mark.slow  # 2,500 generated files
def test_fuzz_generated_pickles(tmp_path: Path) -> None:
    fuzz = Fuzz(tmp_path)
    storages = {"0": floats(*range(70)), "1": bytes(range(70))}

    @settings(max_examples=FUZZ_CASES["opcodes"], **FUZZ)
    @given(seed=st.integers(0, 2**32 - 1), soup=st.integers(0, 3), length=st.integers(0, 40),
           protocol=st.sampled_from([2, 4, 5]))
    def case(seed: int, soup: int, length: int, protocol: int) -> None:
        chooser = random.Random(seed)
        if soup == 0:  # opcodes at random, as one value of a dict
            body = b"".join(opcode_piece(chooser) for _ in range(length))
            pkl = bytes([0x80, protocol]) + b"}(" + opcodes("k") + body + b"u."
        else:
            pkl = Grammar(chooser).result()
        fuzz.check(gzip.compress(torch_archive(pkl, storages), compresslevel=0, mtime=0))

    case()
    record_hardening("fuzzed result files (generated pickles)", fuzz.count, READER_OUTCOME)
    assert fuzz.count >= FUZZ_CASES["opcodes"] and fuzz.read > fuzz.count // 10


SIZES = st.one_of(st.integers(0, 6), st.integers(-3, 80), st.sampled_from([2**31, 2**40, 2**62, 2**64 + 1]))


@pytest.mark.slow  # 1,500 generated files, each also read by torch.load
def test_fuzz_tensor_geometry_against_torch(tmp_path: Path) -> None:
    """Random storage declarations, sizes, strides, offsets and member lengths: refused,
    or read exactly as torch.load reads the same file."""
    fuzz = Fuzz(tmp_path)
    itemsizes = {"FloatStorage": 4, "ByteStorage": 1, "HalfStorage": 2, "LongStorage": 8, "BoolStorage": 1}

    tensor = st.tuples(st.sampled_from(sorted(itemsizes)), st.sampled_from(["0", "1"]), st.integers(0, 40) | SIZES,
                       st.lists(SIZES, max_size=4), st.lists(SIZES, max_size=4), st.integers(0, 10) | SIZES,
                       st.integers(-2, 2), st.booleans())

    @settings(max_examples=FUZZ_CASES["tensors"], **FUZZ)
    @given(tensors=st.lists(tensor, min_size=1, max_size=3), dense=st.booleans())
    def case(tensors: list[tuple], dense: bool) -> None:
        value, storages = {}, {}
        for i, (kind, key, numel, size, stride, offset, slack, permute) in enumerate(tensors):
            if dense:
                key = str(i)  # mostly valid: contiguous strides (maybe permuted), a storage that fits
                size = [abs(s) % 5 for s in size]
                stride = list(np.cumprod([1] + size[::-1])[:-1][::-1].tolist()) if size else []
                if permute and len(size) > 1:
                    size, stride = size[::-1], stride[::-1]
                offset = abs(offset) % 4
                numel = offset + int(np.prod(size)) + abs(slack)
            value[f"t{i}"] = Tensor(key, numel, tuple(size), tuple(stride), offset, kind)
            length = max(0, min(numel, 1000) * itemsizes[kind] + slack * (not dense))
            storages[key] = np.arange(length, dtype=np.uint8).tobytes()
        data = gzip.compress(torch_archive(pickled(value), storages), compresslevel=0, mtime=0)
        result = fuzz.check(data)
        if result is not None:
            loaded = reference.read_result(data)
            for key, tensor in loaded.items():
                expected = tensor.numpy()
                assert result[key].shape == expected.shape and result[key].dtype == expected.dtype
                assert result[key].tobytes() == expected.tobytes()  # NaNs too

    case()
    record_hardening("fuzzed result files (tensor geometry, checked against torch.load)", fuzz.count, READER_OUTCOME)
    assert fuzz.count >= FUZZ_CASES["tensors"] and fuzz.read > fuzz.count // 10


def read_result_of(data: bytes, folder: Path) -> dict[str, Any]:
    path = folder / "base.bin"
    path.write_bytes(data)
    return read_result(path)
