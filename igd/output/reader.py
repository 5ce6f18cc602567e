"""Result files read without torch: the gzip'd ``torch.save`` dict and the npz, as numpy.

``torch.save`` writes a zip archive: ``<name>/data.pkl`` (a pickle whose tensors refer to
raw storages by key), ``<name>/data/<key>`` (each storage's bytes, little-endian) and a
few bookkeeping records. igctl (which never imports torch) reads results with this
module; numpy is imported by the caller.

The reader trusts nothing in the file. A restricted unpickler knows only the names a
result file uses (tensors of plain dtypes, dicts, lists, numbers, strings); anything else
in the pickle is refused, never executed, and the pickle is scanned opcode by opcode
before it is loaded. Tensors are descriptions until the whole dict has been checked: each
one's size, stride and offset must lie inside its storage without overlapping itself
(igd writes contiguous tensors; a dense permuted layout such as a transpose is accepted),
each storage's zip member must have exactly the size the pickle declares, and only the
bytes the tensors use are read, through zipfile's stream. Every limit below is checked
before the memory it guards is allocated, and every refusal is an
:class:`UnreadableResult` saying ``not an igd result (why)``.
"""

from __future__ import annotations

import io
import pickle
import pickletools
import struct
import zipfile
import zlib
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from numpy.lib import format as npy_format

from igd.output.files import UnreadableInput, read_regular_file

MAX_RESULT_BYTES = 2 << 30
"""2 GiB: the most bytes of a torch result's archive once un-gzipped, of an npz file, and
of all the arrays one result holds (together). igd's largest answers are about 750 MiB
(1024 steps of a 224 x 224 model), so every real result fits with room to spare. Reading a
file costs at most about twice this (the archive or npz bytes, and the arrays read from
them), plus a few MiB."""

MAX_FILE_BYTES = MAX_RESULT_BYTES + (16 << 20)
"""The most bytes of a result file on disk: the cap above and room for gzip's framing
(a result gzip'd at level 0 is its archive plus 5 bytes per 64 KiB)."""

MAX_GZIP_MEMBERS = 16
"""gzip members one file may hold (igd writes one)."""

MAX_DIRECTORY_BYTES = 1 << 20
"""The most bytes of a zip archive's central directory (zipfile makes an object of each
entry before anything else can be checked; igd's archives have about 50 entries of about
100 bytes)."""

MAX_MEMBERS = 4096
"""Entries of one zip archive, and distinct storages one pickle may name."""

MAX_PICKLE_BYTES = 1 << 20
"""The most bytes of a torch result's ``data.pkl`` (igd's are a few KiB)."""

MAX_PICKLE_OPCODES = 100_000
"""Opcodes of ``data.pkl``, counted by a scan (:func:`pickletools.genops`) before it is
loaded; memo indices are bounded by the same number (igd's pickles have about 1,000)."""

MAX_WALK_VISITS = 100_000
"""Values the check of a loaded dict may visit, every visit counted: a list that holds
the same sub-list twice, nested, is as costly to walk (or print) as the tree it stands
for, and is refused rather than walked."""

MAX_DEPTH = 16
"""How deeply containers may nest below the result dict (igd's: a list of strings)."""

MAX_DIMS = 32
"""Dimensions of one array."""

MAX_NPY_HEADER_BYTES = 10_000
"""The most bytes of an ``.npy`` member's header (numpy's own default)."""

_CHUNK = 1 << 20  # bytes read, or inflated, at a time

# torch's legacy storage type names (what torch.save pickles) and their dtypes.
_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16, "CharStorage": np.int8,
    "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}  # fmt: skip

# npy dtypes a result's arrays may have: booleans, integers, floats, unicode strings.
_NPY_KINDS = frozenset("biufU")

# The opcodes a result's pickle may use: those torch.save writes (protocol 2) and the other
# ways of spelling None, bools, numbers, strings, lists, tuples and dicts. Not: objects
# (INST, OBJ, NEWOBJ, BUILD), extensions, text persistent ids, bytes, sets, buffers.
_OPCODES = frozenset({
    "PROTO", "FRAME", "STOP", "MARK", "POP", "POP_MARK", "DUP",
    "NONE", "NEWTRUE", "NEWFALSE", "INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "LONG4",
    "FLOAT", "BINFLOAT", "UNICODE", "SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8",
    "EMPTY_LIST", "APPEND", "APPENDS", "LIST", "EMPTY_TUPLE", "TUPLE", "TUPLE1", "TUPLE2", "TUPLE3",
    "EMPTY_DICT", "DICT", "SETITEM", "SETITEMS",
    "PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE", "GET", "BINGET", "LONG_BINGET",
    "GLOBAL", "STACK_GLOBAL", "REDUCE", "BINPERSID",
})  # fmt: skip
_MEMO_OPCODES = frozenset({"PUT", "BINPUT", "LONG_BINPUT", "GET", "BINGET", "LONG_BINGET"})

# Errors that anything in the reader may raise on a hostile file: each becomes an
# UnreadableResult. (RecursionError is a RuntimeError; UnicodeError a ValueError.)
_FAILURES = (pickle.UnpicklingError, zipfile.BadZipFile, zlib.error, struct.error, OSError, EOFError,
             ValueError, TypeError, KeyError, IndexError, AttributeError, NotImplementedError, RuntimeError,
             MemoryError, OverflowError)

# The provenance keys of every result file igd writes (igd.output.provenance makes them; README's
# key table lists them); and blur_sigma where a blur was used.
PROVENANCE_KEYS = ("weights_sha256", "model_family", "model_description", "classes_source", "input_size", "resize",
                   "resize_to", "mean", "std", "interpolation", "crop_pct", "preprocessing_source", "seed", "precision", "memory_format", "compiler", "chunk_source",
                   "device_type", "igd_version", "torch_version", "torchvision_version", "created")


class UnreadableResult(ValueError):
    """The file is not a result file igd (or the predecessor) writes; the message is
    ``not an igd result (why)``."""


def _refused(why: str) -> UnreadableResult:
    return UnreadableResult(f"not an igd result ({why})")


def read_result(path: str | Path) -> dict[str, Any]:
    """The result dict of a ``.gzip`` (torch) or ``.npz`` file: arrays as numpy, scalars
    and strings as Python values, lists as lists. Only a regular file (symlinks followed)
    of at most :data:`MAX_FILE_BYTES` is read; anything else is an UnreadableResult."""
    name = str(path)
    try:
        data = read_regular_file(name, MAX_FILE_BYTES, what="result")
    except UnreadableInput as error:  # its message names the path, which igctl names already
        said = str(error)
        for named, unnamed in ((f"{name} is ", "the file is "), (f"cannot read {name}: ", "cannot read the file: "),
                               (f"{name!r}: ", "")):
            if said.startswith(named):
                said = unnamed + said[len(named) :]
                break
        raise _refused(said) from None
    except (MemoryError, OverflowError) as error:
        raise _refused(f"cannot read it: {type(error).__name__}") from None
    if data[:2] == b"\x1f\x8b":
        try:
            archive = _gunzip(data)
        except UnreadableResult:
            raise
        except MemoryError:
            raise _refused("out of memory inflating it") from None
        except _FAILURES as error:
            raise _refused(f"not a complete gzip file: {_said(error)}") from None
        del data  # the archive alone from here on: about the cap at most, not twice
        return _read_torch(archive)
    if data[:2] == b"PK":
        return read_npz(data)
    raise _refused("neither a gzip'd torch result nor an npz file")


def read_npz(data: bytes) -> dict[str, Any]:
    """An npz file's dict: 0-d arrays (scalars, strings) as Python values, others as arrays."""
    if len(data) > MAX_RESULT_BYTES:
        raise _refused(f"an npz file of {len(data):,} bytes; at most {MAX_RESULT_BYTES:,} are read")
    try:
        return _read_npz(io.BytesIO(data))
    except UnreadableResult:
        raise
    except _FAILURES as error:
        raise _refused(f"not a readable npz file: {_said(error)}") from None


def read_torch(data: bytes) -> dict[str, Any]:
    """A ``torch.save`` archive's dict (the bytes inside the gzip), its tensors as numpy arrays."""
    if len(data) > MAX_RESULT_BYTES:
        raise _refused(f"an archive of {len(data):,} bytes; at most {MAX_RESULT_BYTES:,} are read")
    return _read_torch(io.BytesIO(data))


def _said(error: BaseException) -> str:
    """An exception as a short phrase for a refusal (its type when it says nothing)."""
    text = str(error).splitlines()[0][:200] if str(error) else ""
    return text or type(error).__name__


def _gunzip(data: bytes) -> io.BytesIO:
    """The bytes inside ``data``'s gzip members, inflated a piece at a time and never
    more than :data:`MAX_RESULT_BYTES` of them (a member may be followed by zero padding
    and another member, as :func:`gzip.decompress` allows)."""
    out, room, members = io.BytesIO(), MAX_RESULT_BYTES, 1
    source = memoryview(data)
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)  # gzip framing: header, CRC and length checked
    position, pending = 0, b""
    while True:
        if not pending:
            if position >= len(source):
                if not inflater.eof:
                    raise _refused("a gzip file that ends early")
                return out
            pending = source[position : position + _CHUNK]
            position += len(pending)
        piece = inflater.decompress(pending, room + 1)
        room -= len(piece)
        if room < 0:
            raise _refused(f"it inflates to over {MAX_RESULT_BYTES:,} bytes")
        out.write(piece)
        if not inflater.eof:
            pending = inflater.unconsumed_tail
            continue
        pending = inflater.unused_data.lstrip(b"\0")  # what follows this member
        while not pending and position < len(source):
            pending = bytes(source[position : position + _CHUNK]).lstrip(b"\0")
            position += _CHUNK
        if not pending:
            return out
        members += 1
        if members > MAX_GZIP_MEMBERS:
            raise _refused(f"more than {MAX_GZIP_MEMBERS} gzip members")
        inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)


# ---------------------------------------------------------------------------- zip archives

_END = struct.Struct("<4s4H2LH")  # end of central directory record
_END64_LOCATOR = struct.Struct("<4sLQL")
_END64 = struct.Struct("<4sQ2H2L4Q")


def _open_zip(file: BinaryIO) -> zipfile.ZipFile:
    """``file`` as a zip archive, refused before zipfile reads its central directory if
    that is over :data:`MAX_DIRECTORY_BYTES` (found where zipfile finds it: the end
    record at the very end, else the last one in the final 64 KiB, and a zip64 record
    just before it)."""
    size = file.seek(0, io.SEEK_END)
    start = max(0, size - (_END.size + 0xFFFF + _END64_LOCATOR.size + _END64.size))
    file.seek(start)
    tail = file.read()
    at = len(tail) - _END.size
    if not (at >= 0 and tail[at : at + 4] == b"PK\x05\x06" and tail[-2:] == b"\0\0"):
        at = tail.rfind(b"PK\x05\x06", max(0, len(tail) - 0x10000 - _END.size))
    if 0 <= at <= len(tail) - _END.size:
        directory = _END.unpack_from(tail, at)[5]
        locator, record = at - _END64_LOCATOR.size, at - _END64_LOCATOR.size - _END64.size
        if locator >= 0 and tail[locator : locator + 4] == b"PK\x06\x07" and record >= 0 \
                and tail[record : record + 4] == b"PK\x06\x06":
            directory = _END64.unpack_from(tail, record)[8]
        if directory > MAX_DIRECTORY_BYTES:
            raise _refused(f"a zip directory of {directory:,} bytes; at most {MAX_DIRECTORY_BYTES:,} are read")
    file.seek(0)
    archive = zipfile.ZipFile(file)
    if len(archive.infolist()) > MAX_MEMBERS:
        raise _refused(f"over {MAX_MEMBERS} zip members")
    return archive


def _member(archive: zipfile.ZipFile, name: str) -> zipfile.ZipInfo:
    """The entry ``name``, if zipfile can stream it within bounds: stored or deflated
    (whose inflating zipfile bounds to each read), never encrypted."""
    try:
        info = archive.getinfo(name)
    except KeyError:
        raise _refused(f"no member {name!r}") from None
    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED) or info.flag_bits & 0x41:
        raise _refused(f"member {name!r} is encrypted or compressed in a way igd never writes")
    return info


def _read_into(stream: BinaryIO, target: memoryview, name: str) -> None:
    """Fill ``target`` from ``stream``, a piece at a time; a stream that ends first is refused."""
    done = 0
    while done < len(target):
        piece = stream.read(min(_CHUNK, len(target) - done))
        if not piece:
            raise _refused(f"member {name!r} ends before the {len(target):,} bytes it should hold")
        target[done : done + len(piece)] = piece
        done += len(piece)


def _filled(array: np.ndarray, stream: BinaryIO, name: str) -> np.ndarray:
    """``array`` (new, C-contiguous) with its bytes read from ``stream``."""
    if array.nbytes:
        _read_into(stream, memoryview(array.reshape(-1).view(np.uint8)), name)
    return array


# -------------------------------------------------------------------------------- npz files


def _read_npz(file: BinaryIO) -> dict[str, Any]:
    """The members of an npz archive, each ``<key>.npy`` read by its header only after the
    header's shape and dtype agree with the member's real size and the budget."""
    result: dict[str, Any] = {}
    room = MAX_RESULT_BYTES
    with _open_zip(file) as archive:
        for info in archive.infolist():
            name = info.filename
            if not name.endswith(".npy"):
                raise _refused(f"npz member {name!r} is not an .npy array")
            info = _member(archive, name)
            with archive.open(info) as stream:
                shape, fortran, dtype = _npy_header(stream, name)
                if dtype.hasobject or dtype.kind not in _NPY_KINDS or dtype.fields is not None \
                        or dtype.subdtype is not None or dtype.itemsize == 0:
                    raise _refused(f"{name!r} holds {dtype}, not numbers, booleans or text")
                count = _elements(shape, name)
                nbytes = count * dtype.itemsize
                if nbytes != info.file_size - stream.tell():
                    raise _refused(f"{name!r} declares {nbytes:,} bytes of data; the member holds "
                                   f"{info.file_size - stream.tell():,}")
                room -= nbytes
                if room < 0:
                    raise _refused(f"its arrays hold over {MAX_RESULT_BYTES:,} bytes")
                flat = _filled(np.empty(count, dtype=dtype), stream, name)  # as numpy.load reads it
                if stream.read(1):  # the end of the member: zipfile checks its CRC there
                    raise _refused(f"member {name!r} holds more than its header declares")
            if dtype.kind == "U" and count and int(flat.view(f"{dtype.byteorder}u4").max()) > 0x10FFFF:
                raise _refused(f"{name!r} holds text that is not Unicode")  # Python would make broken str of it
            array = flat.reshape(shape[::-1]).transpose() if fortran else flat.reshape(shape)
            result[name[: -len(".npy")]] = _plain(array)
    _walk(result, (np.ndarray,))
    return result


def _npy_header(stream: BinaryIO, name: str) -> tuple[Any, bool, np.dtype]:
    """(shape, fortran order, dtype) of an .npy member's header, by numpy's own parser,
    which reads headers of at most MAX_NPY_HEADER_BYTES and, as a parser of Python
    literals, may fail in many ways (tokenize and syntax errors among them): each of them
    is a refusal."""
    try:
        version = npy_format.read_magic(stream)
        if version == (1, 0):
            return npy_format.read_array_header_1_0(stream, MAX_NPY_HEADER_BYTES)
        if version == (2, 0):
            return npy_format.read_array_header_2_0(stream, MAX_NPY_HEADER_BYTES)
    except Exception as error:  # noqa: BLE001 - whatever the parser raises, the header is unreadable
        raise _refused(f"{name!r} has an unreadable .npy header: {_said(error)}") from None
    raise _refused(f"{name!r} is an .npy file of version {version}")


def _elements(shape: Any, name: str) -> int:
    """The element count of ``shape``: a tuple of at most MAX_DIMS non-negative ints."""
    if type(shape) is not tuple or len(shape) > MAX_DIMS or \
            any(type(n) is not int or not 0 <= n <= MAX_RESULT_BYTES for n in shape):
        raise _refused(f"{name!r} has the shape {str(shape)[:100]}")
    count = 1
    for n in shape:
        count *= n
    if count > MAX_RESULT_BYTES:
        raise _refused(f"{name!r} has {count:,} elements; at most {MAX_RESULT_BYTES:,} bytes are read")
    return count


def _plain(array: np.ndarray) -> Any:
    """0-d arrays (the npz's scalars and strings) as Python values."""
    return array.item() if array.ndim == 0 else array


# ----------------------------------------------------------------------------- torch files


class _StorageType:
    """What a pickled ``torch.FloatStorage`` (etc.) stands for: a dtype, and nothing callable."""

    __slots__ = ("name", "dtype")

    def __init__(self, name: str, dtype: type) -> None:
        self.name, self.dtype = name, np.dtype(dtype)


_STORAGE_TYPES = {name: _StorageType(name, dtype) for name, dtype in _STORAGE_DTYPES.items()}


class _Storage:
    """A storage the pickle names: its member's key, dtype and element count (not read yet)."""

    __slots__ = ("key", "dtype", "numel", "tensors")

    def __init__(self, key: str, dtype: np.dtype, numel: int) -> None:
        self.key, self.dtype, self.numel = key, dtype, numel
        self.tensors: list[_Tensor] = []


class _Tensor:
    """A tensor the pickle describes, checked to lie densely inside its storage: elements
    ``offset .. offset + numel`` of it; ``core`` its dimensions of more than one element,
    from outermost to innermost in memory (ascending: a contiguous tensor)."""

    __slots__ = ("storage", "offset", "shape", "core", "numel")

    def __init__(self, storage: _Storage, offset: int, shape: tuple[int, ...], core: list[int], numel: int) -> None:
        self.storage, self.offset, self.shape, self.core, self.numel = storage, offset, shape, core, numel

    @property
    def contiguous(self) -> bool:
        return self.core == sorted(self.core)


def _ordered_dict() -> dict[str, Any]:
    """``collections.OrderedDict()`` (a tensor's empty backward hooks) as a plain dict."""
    return {}


def _rebuild_tensor(storage: Any, offset: Any, size: Any, stride: Any, *rest: Any) -> _Tensor:
    """``torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad,
    backward_hooks[, metadata])``: the tensor's geometry, checked against its storage's
    declared size with exact integer arithmetic before anything is read.

    Accepted: every element inside the storage, no element twice (no zero or negative
    strides), and dense: sorted by stride, the dimensions of more than one element make a
    contiguous block (a contiguous tensor, or a permutation of one such as a transpose).
    Strides of dimensions of one element are not used, as in torch."""
    if not isinstance(storage, _Storage) or len(rest) > 3:
        raise pickle.UnpicklingError("a tensor that is not built from a storage of a result file")
    if type(offset) is not int or type(size) is not tuple or type(stride) is not tuple:
        raise pickle.UnpicklingError("a tensor whose offset, size or stride is not made of integers")
    shape = size
    numel = _elements(shape, f"tensor of storage {storage.key}")
    if len(stride) != len(shape) or any(type(s) is not int for s in stride):
        raise pickle.UnpicklingError(f"a tensor of {len(shape)} dimensions with strides {str(stride)[:100]}")
    if not 0 <= offset <= storage.numel:
        raise _refused(f"a tensor at offset {offset:,} of a storage of {storage.numel:,} elements")
    core = [d for d in range(len(shape)) if shape[d] > 1]
    if numel:
        core.sort(key=lambda d: stride[d], reverse=True)
        expected = 1
        for d in reversed(core):
            if stride[d] != expected:
                raise _refused(f"a tensor of size {shape} with strides {stride}: not a dense block "
                               "(overlapping, gapped, zero or negative strides)")
            expected *= shape[d]
        if offset + numel > storage.numel:
            raise _refused(f"a tensor of {numel:,} elements at offset {offset:,} of a storage of "
                           f"{storage.numel:,}: it reaches past the storage")
    tensor = _Tensor(storage, offset, shape, core, numel)
    storage.tensors.append(tensor)
    return tensor


class _ResultUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes) -> None:
        super().__init__(io.BytesIO(data))
        self.storages: dict[str, _Storage] = {}

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild_tensor
        if module == "torch" and name in _STORAGE_TYPES:
            return _STORAGE_TYPES[name]
        if module == "collections" and name == "OrderedDict":
            return _ordered_dict
        raise pickle.UnpicklingError(f"{str(module)[:100]}.{str(name)[:100]} is not part of a result file")

    def persistent_load(self, pid: Any) -> _Storage:
        """A storage, ``('storage', storage type, key, location, numel)``; the same key
        twice is the same storage, and must be declared alike."""
        if type(pid) is not tuple or len(pid) != 5 or pid[0] != "storage":
            raise pickle.UnpicklingError(f"unknown persistent id {str(pid)[:100]}")
        _, kind, key, location, numel = pid
        if not isinstance(kind, _StorageType) or type(key) is not str or type(location) is not str \
                or type(numel) is not int or numel < 0 or len(key) > 100:
            raise pickle.UnpicklingError(f"a storage described as {str(pid)[:200]}")
        known = self.storages.get(key)
        if known is None:
            if len(self.storages) >= MAX_MEMBERS:
                raise _refused(f"over {MAX_MEMBERS} storages")
            known = self.storages[key] = _Storage(key, kind.dtype, numel)
        elif known.dtype != kind.dtype or known.numel != numel:
            raise _refused(f"storage {key!r} declared twice, differently")
        return known


def _read_torch(file: BinaryIO) -> dict[str, Any]:
    try:
        return _load_torch(file)
    except UnreadableResult:
        raise
    except _FAILURES as error:
        raise _refused(f"{_said(error)}") from None


def _load_torch(file: BinaryIO) -> dict[str, Any]:
    """A ``torch.save`` archive's dict, its tensors as numpy arrays (see the module's notes)."""
    try:
        archive = _open_zip(file)
    except zipfile.BadZipFile:
        raise _refused("not a torch.save archive (a zip file inside the gzip)") from None
    with archive:
        pickles = [name for name in archive.namelist() if name.endswith("/data.pkl")]
        if len(pickles) != 1:
            raise _refused("not a torch.save archive (no data.pkl)")
        prefix = pickles[0][: -len("data.pkl")]
        info = _member(archive, pickles[0])
        if info.file_size > MAX_PICKLE_BYTES:
            raise _refused(f"a data.pkl of {info.file_size:,} bytes; at most {MAX_PICKLE_BYTES:,} are read")
        with archive.open(info) as stream:
            data = stream.read(MAX_PICKLE_BYTES + 1)
        if len(data) > MAX_PICKLE_BYTES:
            raise _refused(f"a data.pkl of over {MAX_PICKLE_BYTES:,} bytes")
        _scan(data)
        unpickler = _ResultUnpickler(data)
        result = unpickler.load()
        del data
        tensors = _walk(result, (_Tensor,))
        byteorder = _byteorder(archive, prefix)
        arrays = _arrays(archive, prefix, unpickler.storages, tensors, byteorder)
        return {key: _with_arrays(value, arrays) for key, value in result.items()}


def _scan(data: bytes) -> None:
    """Refuse a pickle with more than MAX_PICKLE_OPCODES opcodes, an opcode outside
    _OPCODES, or a memo index past the opcode cap (the unpickler would size its memo to
    it), before it is loaded. genops also checks every length prefix against the bytes."""
    count = 0
    for opcode, argument, _position in pickletools.genops(data):
        count += 1
        if count > MAX_PICKLE_OPCODES:
            raise _refused(f"a pickle of over {MAX_PICKLE_OPCODES:,} opcodes")
        if opcode.name not in _OPCODES:
            raise _refused(f"the pickle opcode {opcode.name}, which result files never use")
        if opcode.name in _MEMO_OPCODES and not 0 <= argument <= MAX_PICKLE_OPCODES:
            raise _refused(f"a pickle memo index of {argument:,}")


def _walk(result: Any, arrays: tuple[type, ...]) -> list[Any]:
    """Check a loaded result: a dict with str keys whose values are ``arrays`` (tensors,
    or numpy arrays), bools, ints of at most 64 bits, floats, str, None, or lists and
    tuples of those nested at most MAX_DEPTH deep, at most MAX_WALK_VISITS values in
    all, every visit counted. The distinct ``arrays`` found, in order."""
    if type(result) is not dict:
        raise _refused(f"a {type(result).__name__}, not a dict")
    visits = len(result)
    if visits > MAX_WALK_VISITS:
        raise _refused(f"over {MAX_WALK_VISITS:,} values")
    for key in result:
        if type(key) is not str:
            raise _refused(f"a key of type {type(key).__name__}")
    found: dict[int, Any] = {}
    stack = [(value, 1) for value in reversed(list(result.values()))]
    while stack:
        value, depth = stack.pop()
        kind = type(value)
        if kind is list or kind is tuple:
            if depth >= MAX_DEPTH:
                raise _refused(f"values nested over {MAX_DEPTH} deep")
            visits += len(value)
            if visits > MAX_WALK_VISITS:
                raise _refused(f"over {MAX_WALK_VISITS:,} values (counting every visit of shared lists)")
            stack.extend((item, depth + 1) for item in reversed(value))
        elif kind is int:
            if value.bit_length() > 64:
                raise _refused("an integer of over 64 bits")
        elif value is None or kind is bool or kind is float or kind is str:
            pass
        elif isinstance(value, arrays):
            found.setdefault(id(value), value)
        else:
            raise _refused(f"a value of type {kind.__name__}")
    return list(found.values())


def _byteorder(archive: zipfile.ZipFile, prefix: str) -> str:
    """The byte order of the storages: ``<`` (torch's ``byteorder`` record says little, or
    is absent, as in files from before torch 1.12) or ``>``."""
    name = f"{prefix}byteorder"
    if name not in archive.NameToInfo:
        return "<"
    with archive.open(_member(archive, name)) as stream:
        said = stream.read(16)
    if said in (b"little", b"big"):
        return "<" if said == b"little" else ">"
    raise _refused(f"a byte order of {said[:16]!r}")


def _arrays(archive: zipfile.ZipFile, prefix: str, storages: dict[str, _Storage], tensors: list[_Tensor],
            byteorder: str) -> dict[int, np.ndarray]:
    """Each tensor's array, by the id of its description. The budget is checked first:
    the bytes read from storages (each only as far as its tensors reach) plus the copies
    made (of tensors that are not the whole of their storage alone, in its order) stay
    within MAX_RESULT_BYTES. Each storage's member must hold exactly the bytes its
    declaration says; a tensor that is its storage is read straight into its array."""
    used = {id(tensor) for tensor in tensors}
    mine: dict[str, list[_Tensor]] = {}
    budget = 0
    for key, storage in storages.items():
        these = [t for t in storage.tensors if id(t) in used]
        if not these:
            continue
        mine[key] = these
        reach = max(t.offset + t.numel if t.numel else 0 for t in these)
        budget += reach * storage.dtype.itemsize
        if not _whole(storage, these):
            budget += sum(t.numel for t in these) * storage.dtype.itemsize
    if budget > MAX_RESULT_BYTES:
        raise _refused(f"its tensors need {budget:,} bytes; at most {MAX_RESULT_BYTES:,} are read")
    arrays: dict[int, np.ndarray] = {}
    for key, these in mine.items():
        storage = storages[key]
        dtype = storage.dtype.newbyteorder(byteorder)
        name = f"{prefix}data/{key}"
        info = _member(archive, name)
        declared = storage.numel * dtype.itemsize
        if info.file_size != declared:
            raise _refused(f"member {name!r} holds {info.file_size:,} bytes; its storage declares {declared:,}")
        with archive.open(info) as stream:
            if _whole(storage, these):
                arrays[id(these[0])] = _filled(np.empty(these[0].shape, dtype=dtype), stream, name)
                continue
            reach = max(t.offset + t.numel if t.numel else 0 for t in these)
            flat = _filled(np.empty(reach, dtype=dtype), stream, name)
        for tensor in these:
            arrays[id(tensor)] = np.array(_view(flat, tensor))
        del flat
    return arrays


def _whole(storage: _Storage, tensors: list[_Tensor]) -> bool:
    """Whether a storage's only tensor is all of it, contiguous: its bytes are the array's."""
    return len(tensors) == 1 and tensors[0].offset == 0 and tensors[0].numel == storage.numel \
        and tensors[0].contiguous


def _view(flat: np.ndarray, tensor: _Tensor) -> np.ndarray:
    """A tensor's elements as a view of ``flat``: the checked slice, reshaped in its
    dimensions' memory order and transposed back (no strides taken from the file)."""
    block = flat[tensor.offset : tensor.offset + tensor.numel]
    if not tensor.numel:
        return block.reshape(tensor.shape)
    core = tensor.core
    ordered = block.reshape([tensor.shape[d] for d in core])
    return ordered.transpose(sorted(range(len(core)), key=core.__getitem__)).reshape(tensor.shape)


def _with_arrays(value: Any, arrays: dict[int, np.ndarray]) -> Any:
    """``value`` with each tensor description replaced by its array (the walk has bounded
    the depth and the number of values)."""
    if type(value) is list:
        return [_with_arrays(item, arrays) for item in value]
    if type(value) is tuple:
        return tuple(_with_arrays(item, arrays) for item in value)
    if isinstance(value, _Tensor):
        return arrays[id(value)]
    return value
