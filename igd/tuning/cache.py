"""The chunk sizes measured before, kept in one JSON file that can never stop igd from starting."""

from __future__ import annotations

import json
import math
import os
import platform
from pathlib import Path
from typing import Any

import torch

from igd.logs import log
from igd.models import LoadedModel
from igd.output.files import UnreadableInput, foreign, read_regular_file, write_atomically
from igd.tuning.search import CUDA_CEILING, ChunkChoice

def cache_directory() -> Path:
    """Where igd keeps what it measured: ``$IGD_CACHE_DIR``, else systemd's
    ``$CACHE_DIRECTORY`` (CacheDirectory=igd), else ``$XDG_CACHE_HOME/igd``, else
    ``~/.cache/igd``."""
    for variable in ("IGD_CACHE_DIR", "CACHE_DIRECTORY"):
        if os.environ.get(variable):
            return Path(os.environ[variable].split(":")[0])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "igd"

class ChunkCache:
    """Measured chunk sizes, one JSON file: a choice is measured once per model (its
    weights' SHA-256), input size, device, threads, memory, precision, memory format,
    compiler, search and torch version, so that a restart, on a busy machine or not, takes the same
    chunk and gives the same bytes for the same request.

    The cache can never stop igd from starting, however it is damaged or whoever wrote
    it: the file is read only if it is a regular file (no symlink, FIFO or device) of at
    most LIMIT bytes, owned by this user or root and not writable by every user, in a
    folder of the same kind; reading never blocks, and parsing is bounded by the size.
    Anything else (a file cut short, infinities, deep nesting, wrong types, a max_batch
    of 1, ...) means "search again", with a warning (event=chunk_cache_ignored) saying
    why; :meth:`put` then writes a clean file over it, atomically."""

    SEARCH = 2  # the version of choose_max_batch's search; a new one measures again
    LIMIT = 1 << 20  # bytes: about 2,500 entries; put drops the oldest beyond it

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.path = directory / "chunk-sizes.json"

    @classmethod
    def key(cls, model: LoadedModel, memory_format: str, precision: str, compiler: str = "eager") -> str:
        return "|".join(str(part) for part in (
            model.weights_sha256, "x".join(map(str, model.input_shape)), _device_name(model.device),
            f"threads={torch.get_num_threads()}", f"memory={_memory_gib(model.device)}G", precision, memory_format,
            compiler, f"search={cls.SEARCH}", f"torch={torch.__version__}",
        ))

    def get(self, key: str) -> ChunkChoice | None:
        """The choice cached for ``key``; None (search again) where there is none or the
        cache cannot be trusted, logged with the reason in the second case."""
        entries, damage = self._entries()
        if damage is None and key in entries:
            try:
                return checked_choice(entries[key])
            except ValueError as error:
                damage = f"its entry for this model: {error}"
        if damage is not None:
            log("chunk_cache_ignored", level=30, path=str(self.path), reason=damage,
                note="the chunk size is measured again")
        return None

    def put(self, key: str, choice: ChunkChoice) -> None:
        """Cache ``choice`` for ``key``: the file is rewritten atomically with the entries
        that are sound and this one (a damaged file is replaced by a clean one). A choice
        of 1 is not kept (:meth:`get` would not take it). Never raises: a cache that
        cannot be written is logged and the size measured again at the next start."""
        if choice.max_batch < 2:
            return
        entries, _damage = self._entries()
        kept: dict[str, dict[str, Any]] = {}
        for other, entry in entries.items():
            try:
                kept[other] = checked_choice(entry).to_json()
            except ValueError:
                continue  # damaged: dropped
        kept[key] = choice.to_json()
        data = json.dumps(dict(sorted(kept.items())), indent=1).encode()  # sizes in the order tried
        while len(data) > self.LIMIT and len(kept) > 1:
            del kept[min((other for other in kept if other != key), key=lambda other: kept[other]["measured"])]
            data = json.dumps(dict(sorted(kept.items())), indent=1).encode()
        try:
            self.directory.mkdir(mode=0o755, parents=True, exist_ok=True)
            refused = self._folder_refused()
            if refused:
                raise PermissionError(refused)
            if self.path.is_dir() and not self.path.is_symlink():
                self.path.rmdir()  # an empty folder in the file's place (a full one stays, and is an error)
            write_atomically(self.path, data, mode=0o644)
        except OSError as error:
            log("chunk_cache_unwritable", level=30, path=str(self.path), error=error.strerror or str(error),
                note="the chunk size will be measured again at the next start")

    def _entries(self) -> tuple[dict[str, object], str | None]:
        """The file's entries, and why the file cannot be trusted (None: it can; a file
        that is not there is an empty cache)."""
        refused = self._folder_refused()
        if refused:
            return {}, refused
        try:
            data = read_regular_file(str(self.path), self.LIMIT, what="chunk cache", owned=True,
                                     follow_symlinks=False)
        except UnreadableInput as error:
            if not os.path.lexists(self.path):
                return {}, None
            reason = str(error)
            return {}, "it " + reason.removeprefix(f"{self.path} ") if reason.startswith(f"{self.path} ") else reason
        try:
            entries = json.loads(data)
        except RecursionError:
            return {}, "it is nested too deeply"
        except MemoryError:
            return {}, "it is too large to parse"
        except (ValueError, OverflowError) as error:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
            return {}, f"it is not JSON ({str(error)[:200]})"
        if not isinstance(entries, dict):
            return {}, f"it holds {_json_type(entries)}, not an object"
        return entries, None

    def _folder_refused(self) -> str | None:
        """Why the cache folder cannot be trusted (another owner, writable by every user), or None."""
        try:
            info = os.stat(self.directory)
        except OSError:
            return None  # not there yet: put makes it
        refused = foreign(info)
        return f"the folder {self.directory} {refused}" if refused else None


def checked_choice(entry: object) -> ChunkChoice:
    """A cache entry back as a :class:`ChunkChoice` (the inverse of its ``to_json``). A ValueError saying why if ``entry`` is not one
    (a damaged or planted cache file): every field is checked for its type and range,
    numbers must be finite, and a ``max_batch`` of 1 is refused (see below)."""
    if not isinstance(entry, dict):
        raise ValueError(f"the entry is {_json_type(entry)}, not an object")
    max_batch = _integer(entry, "max_batch", 1, CUDA_CEILING, required=True)
    if max_batch == 1:
        # The search never tries 1 where 2 fits (one-point calls take other kernels
        # on a CPU, which round differently): a 1 is the memory's answer at best, and
        # a planted one would change the bytes of every result. Measured again.
        raise ValueError("max_batch 1 (never taken from a cache: one-point calls round differently)")
    timings = entry.get("ms_per_point", {})
    if not isinstance(timings, dict):
        raise ValueError(f"ms_per_point is {_json_type(timings)}, not an object")
    if len(timings) > CUDA_CEILING:
        raise ValueError(f"ms_per_point has {len(timings)} sizes")
    seconds_per_point = {}
    for size, ms in timings.items():
        if not (isinstance(size, str) and size.isascii() and size.isdecimal() and len(size) <= 5
                and 1 <= int(size) <= CUDA_CEILING):
            raise ValueError(f"ms_per_point has the size {str(size)[:20]!r}")
        seconds_per_point[int(size)] = _number({"ms": ms}, "ms", 0.0, 1e9, f"ms_per_point[{size}]") / 1000
    cap = _integer(entry, "memory_cap", 0, CUDA_CEILING)
    if cap and max_batch > cap:
        raise ValueError(f"max_batch {max_batch} is over its memory cap {cap}")
    measured = entry.get("measured", "")
    if not isinstance(measured, str) or len(measured) > 40:
        raise ValueError(f"measured is {_json_type(measured)}, not a time")
    return ChunkChoice(max_batch, seconds_per_point, int(_number(entry, "mb_per_point", 0.0, 1e9) * 1e6), cap,
               _number(entry, "search_s", 0.0, 1e7), measured, _number(entry, "busy_cores", 0.0, 1e5),
               _integer(entry, "search_threads", 0, 1 << 16))


def _json_type(value: object) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null",
            int: "a number", float: "a number"}.get(type(value), type(value).__name__)

def _integer(entry: dict[str, Any], name: str, low: int, high: int, *, required: bool = False) -> int:
    """``entry[name]``, an integer (not a boolean) in [low, high]; 0 where it is absent."""
    if name not in entry and not required:
        return 0
    value = entry.get(name)
    if isinstance(value, float):
        raise ValueError(f"{name} {value!r} is not an integer")
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{name} is {_json_type(value)}, not an integer")
    if not low <= value <= high:
        raise ValueError(f"{name} {value if abs(value) < 10**12 else 'of ' + str(len(str(value))) + ' digits'} "
                         f"is outside [{low}, {high}]")
    return value

def _number(entry: dict[str, Any], name: str, low: float, high: float, label: str = "") -> float:
    """``entry[name]``, a finite number (not a boolean) in [low, high]; 0.0 where it is absent."""
    label = label or name
    if name not in entry:
        return 0.0
    value = entry[name]
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise ValueError(f"{label} is {_json_type(value)}, not a number")
    if isinstance(value, int) and not low <= value <= high:
        raise ValueError(f"{label} is outside [{low:g}, {high:g}]")
    if not math.isfinite(value) or not low <= value <= high:
        raise ValueError(f"{label} {value!r} is outside [{low:g}, {high:g}]")
    return float(value)

def _memory_gib(device: torch.device) -> int:
    """The device's total memory in GiB (the RAM for a CPU): part of the cache key, since
    the memory cap bounds the search. Total, not free: free memory changes every start."""
    if device.type == "cuda":
        return round(torch.cuda.get_device_properties(device).total_memory / 2**30)
    return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30)

def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as cpuinfo:
            model = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), "")
    except OSError:
        model = ""
    return f"cpu:{model or platform.processor() or platform.machine()}"
