"""Result files read without torch: the gzip'd ``torch.save`` dict and the npz, as numpy.

``torch.save`` writes a zip archive: ``<name>/data.pkl`` (a pickle whose tensors refer to
raw storages by key), ``<name>/data/<key>`` (each storage's bytes, little-endian) and a
few bookkeeping records. A restricted unpickler that knows only the names a result
file uses (tensors of plain dtypes, dicts, lists, numbers, strings) turns each tensor into
a numpy array; anything else in the pickle is refused, never executed. igctl (which never
imports torch) reads results with this; numpy is imported by the caller.
"""

from __future__ import annotations

import gzip
import io
import pickle
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

# torch's legacy storage type names (what torch.save pickles) and their dtypes.
_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16, "CharStorage": np.int8,
    "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}  # fmt: skip


# The provenance keys of every result file igd writes (igd.provenance makes them; README's
# key table lists them); and blur_sigma where a blur was used.
PROVENANCE_KEYS = ("weights_sha256", "model_family", "model_description", "classes_source", "input_size", "resize",
                   "resize_to", "mean", "std", "seed", "precision", "memory_format", "compiler", "chunk_source",
                   "device_type", "igd_version", "torch_version", "torchvision_version", "created")


class UnreadableResult(ValueError):
    """The file is not a result file igd (or the predecessor) writes."""


def read_result(path: str | Path) -> dict[str, Any]:
    """The result dict of a ``.gzip`` (torch) or ``.npz`` file: arrays as numpy, scalars
    and strings as Python values, lists as lists."""
    data = Path(path).read_bytes()
    if data[:2] == b"\x1f\x8b":
        try:
            return read_torch(gzip.decompress(data))
        except (OSError, EOFError) as error:
            raise UnreadableResult(f"{path}: not a complete gzip file ({error})") from None
    if data[:2] == b"PK":
        return read_npz(data)
    raise UnreadableResult(f"{path}: neither a gzip'd torch result nor an npz file")


def read_npz(data: bytes) -> dict[str, Any]:
    with np.load(io.BytesIO(data), allow_pickle=False) as archive:
        return {key: _plain(archive[key]) for key in archive.files}


def read_torch(data: bytes) -> dict[str, Any]:
    """A ``torch.save`` archive's dict, its tensors as numpy arrays."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile:
        raise UnreadableResult("not a torch.save archive (a zip file inside the gzip)") from None
    with archive:
        pickles = [name for name in archive.namelist() if name.endswith("/data.pkl")]
        if len(pickles) != 1:
            raise UnreadableResult("not a torch.save archive (no data.pkl)")
        prefix = pickles[0][: -len("data.pkl")]
        unpickler = _ResultUnpickler(io.BytesIO(archive.read(pickles[0])), archive, prefix)
        try:
            result = unpickler.load()
        except (pickle.UnpicklingError, KeyError, ValueError, TypeError, EOFError) as error:
            raise UnreadableResult(f"not an igd result: {error}") from None
    if not isinstance(result, dict):
        raise UnreadableResult(f"not an igd result: a {type(result).__name__}, not a dict")
    return result


class _ResultUnpickler(pickle.Unpickler):
    def __init__(self, file: io.BytesIO, archive: zipfile.ZipFile, prefix: str) -> None:
        super().__init__(file)
        self._archive = archive
        self._prefix = prefix

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild_tensor
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        if module == "collections" and name == "OrderedDict":
            return dict
        raise pickle.UnpicklingError(f"{module}.{name} is not part of a result file")

    def persistent_load(self, pid: Any) -> np.ndarray:
        """A storage, ``('storage', dtype, key, location, numel)``, as a flat array."""
        if not isinstance(pid, tuple) or len(pid) != 5 or pid[0] != "storage":
            raise pickle.UnpicklingError(f"unknown persistent id {pid!r}")
        _, dtype, key, _location, numel = pid
        raw = self._archive.read(f"{self._prefix}data/{key}")
        return np.frombuffer(raw, dtype=np.dtype(dtype).newbyteorder("<"), count=numel)


def _rebuild_tensor(storage: np.ndarray, offset: int, size: tuple[int, ...], stride: tuple[int, ...],
                    *_rest: Any) -> np.ndarray:
    """A tensor's values: ``size`` elements with ``stride`` from ``offset`` in its storage."""
    item = storage.itemsize
    view = np.lib.stride_tricks.as_strided(storage[offset:], shape=tuple(size),
                                           strides=tuple(s * item for s in stride), writeable=False)
    return np.array(view)


def _plain(array: np.ndarray) -> Any:
    """0-d arrays (the npz's scalars and strings) as Python values."""
    return array.item() if array.ndim == 0 else array
