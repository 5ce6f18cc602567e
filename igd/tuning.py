"""Choose the chunk size (path points per forward+backward) by measuring the real model,
keep it in a cache, and measure what the opt-in modes (memory format, TF32, compiling)
change; warm-up runs all of it.

No chunk size suits every model on a CPU: EfficientNet-Lite0 at 224x224 runs fastest in
chunks of 4 to 16 and slows down beyond (caches), while BiT-R101x3 at 32x32 pays about
half a second per call whatever its size (its 380M weights re-laid out for oneDNN) and
wants the largest chunk memory allows. On a GPU large chunks win until memory runs out.
So the daemon searches at warm-up, on the loaded model, input size and device, within
its memory budget, and caches the answer. The weights' memory format and the compiler
are choices for the user instead: channels-last made EfficientNet-Lite0's path about a
quarter faster on this project's CPU (BiT's slower), but moved its IG by about 1e-4
(relative L2) and a random LaNet's by far more: other kernels, other rounding, amplified
by the ReLU kinks along the path; torch.compile moves it too. Strict eager stays the
default; the opt-ins report their deviation.
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from importlib import resources
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor, nn

from igd.attribution import attribute, evaluation_mode, strict_float32
from igd.files import UnreadableInput, foreign, read_regular_file, write_atomically
from igd.imaging import decode_image
from igd.logs import log
from igd.memory import memory_budget, release_free_memory
from igd.models import LoadedModel, ModelError

CPU_CEILING = 64
CUDA_CEILING = 1024


@dataclass(frozen=True)
class ChunkChoice:
    """A chunk size and how it was reached: the time per point of every size tried (in
    the order tried), the memory cap that bounded the search, and what the search cost."""

    max_batch: int
    seconds_per_point: dict[int, float] = field(default_factory=dict)  # size tried -> s per point
    bytes_per_point: int = 0
    memory_cap: int = 0  # the largest chunk the memory budget allows
    search_seconds: float = 0.0
    measured: str = ""  # when (ISO 8601 UTC)
    busy_cores: float = 0.0  # cores other processes kept busy when the search began
    search_threads: int = 0  # the threads it timed with (fewer than served with where cores were busy)

    def describe(self) -> str:
        """E.g. "sizes 2, 8, 32, 4, 16 at 56, 44, 84, 50, 48 ms per point; memory cap 64;
        search 7.6 s"."""
        sizes = ", ".join(map(str, self.seconds_per_point))
        times = ", ".join(f"{seconds * 1000:.0f}" for seconds in self.seconds_per_point.values())
        busy = (f"; {self.busy_cores:.1f} cores busy elsewhere, timed with {self.search_threads} threads"
                if self.busy_cores >= 0.5 else "")
        return (f"sizes {sizes} at {times} ms per point; memory cap {self.memory_cap}; search {self.search_seconds:.1f} s"
                + busy)

    def to_json(self) -> dict[str, Any]:
        return {"max_batch": self.max_batch,
                "ms_per_point": {str(size): round(seconds * 1000, 2) for size, seconds in self.seconds_per_point.items()},
                "memory_cap": self.memory_cap, "mb_per_point": round(self.bytes_per_point / 1e6, 1),
                "search_s": round(self.search_seconds, 2), "measured": self.measured, "busy_cores": self.busy_cores,
                "search_threads": self.search_threads}

    @classmethod
    def from_json(cls, entry: object) -> ChunkChoice:
        """The inverse of :meth:`to_json`. A ValueError saying why if ``entry`` is not one
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
        return cls(max_batch, seconds_per_point, int(_number(entry, "mb_per_point", 0.0, 1e9) * 1e6), cap,
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


def saved_bytes_per_point(module: nn.Module, sample: Tensor) -> int:
    """Bytes autograd keeps per extra path point for the backward pass, for points like
    ``sample`` (1, C, H, W): measured at 1 and 2 points, so what every chunk saves
    whatever its size (e.g. standardised weights) is not counted per point."""
    one, two = _saved_bytes(module, sample, 1), _saved_bytes(module, sample, 2)
    return max(two - one, 1)


def _saved_bytes(module: nn.Module, sample: Tensor, points: int) -> int:
    seen: dict[tuple[int, torch.device], int] = {}

    def pack(tensor: Tensor) -> Tensor:
        storage = tensor.untyped_storage()
        seen[(storage.data_ptr(), tensor.device)] = storage.nbytes()
        return tensor

    with evaluation_mode([module]), torch.enable_grad():
        batch = sample.detach().expand(points, *sample.shape[1:]).clone().requires_grad_(True)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            out = module(batch)
        del out
    return sum(seen.values())


def memory_cap(module: nn.Module, sample: Tensor, *, budget_bytes: int | None = None, limit: int | None = None,
               per_point: int | None = None) -> int:
    """The largest chunk of points like ``sample`` (1, C, H, W) that the memory budget
    allows, at most CPU_CEILING / CUDA_CEILING (and ``limit``)."""
    device = sample.device
    per_point = per_point or saved_bytes_per_point(module, sample)
    budget = memory_budget(device) if budget_bytes is None else budget_bytes
    ceiling = CUDA_CEILING if device.type == "cuda" else CPU_CEILING
    return max(1, min(budget // (per_point * 2), ceiling, limit or ceiling))  # x2: gradients, allocator slack


# A size at least this much slower per point than the best so far means the curve has
# turned: larger sizes are not tried.
TURNED = 1.2
# The cap is not tried after a size this close below it (e.g. 16 when the cap is 18).
NEAR = 1.25
# Sizes within this share of the fastest are timed once more before the choice.
CLOSE = 1.15
# Of the sizes within this share of the fastest, the smallest is taken: timings vary by
# a few per cent from run to run, and a smaller chunk needs less memory.
EQUAL = 1.05
# Small sizes are timed for at least this long (several calls, the fastest kept), so
# that their cost does not depend on how slow they are and noise stays small.
TIMED_SECONDS = 0.5
# A first call at least this long is the measurement itself: building kernels and
# caches is a small part of it (seen on full-size BiT and LaNet: within the spread of
# the calls after it), and timing it again would double the search's largest costs.
LONG_CALL_SECONDS = 2.0


def choose_max_batch(
    module: nn.Module,
    sample: Tensor,
    *,
    limit: int | None = None,
    budget_bytes: int | None = None,
    allow_tf32: bool = False,
    report: Callable[[str], None] = lambda step: None,
    eager: nn.Module | None = None,
) -> ChunkChoice:
    """The chunk size (points like ``sample`` (1, C, H, W) per forward+backward of
    ``module``) with the least time per point within the memory budget (see
    :func:`search_chunk`).

    Each size gets one call that builds its kernels and caches, then timed calls for
    TIMED_SECONDS or at least one, the fastest kept (a first call of LONG_CALL_SECONDS
    is the measurement); a size timed again gets no building call. On a CPU where other
    processes keep cores busy, it times with the threads that have a core to themselves.
    ``limit`` caps the sizes (e.g. at the most points one pass can have);
    ``allow_tf32`` times the chunks the way they will run (see :data:`PRECISIONS`);
    ``report`` hears each size; ``eager``: the module whose saved activations bound the
    memory, when ``module`` is its compiled form (whose saved tensors the hooks that
    count them cannot see).
    """
    started = time.perf_counter()
    per_point = saved_bytes_per_point(eager or module, sample)
    cap = memory_cap(eager or module, sample, budget_bytes=budget_bytes, limit=limit, per_point=per_point)
    threads = torch.get_num_threads()
    busy = busy_cores_elsewhere() if sample.device.type == "cpu" else 0.0
    # Another process on our cores makes every parallel operator wait for a descheduled
    # thread: small chunks (more operators per point) look several times slower than
    # they are, and the search would pick the largest chunk for good. With the threads
    # that have a core to themselves the ranking stays close to the quiet machine's.
    search_threads = max(1, min(threads, len(os.sched_getaffinity(0)) - math.ceil(busy - 0.5)))

    built: set[int] = set()

    def measure(size: int) -> float | None:
        report(f"measuring chunks of {size}" + (" again" if size in built else ""))
        try:
            seconds = _seconds_per_point(module, sample, size, allow_tf32, size in built)
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            return None
        built.add(size)
        return seconds

    torch.set_num_threads(search_threads)
    try:
        chosen, timings, cap = search_chunk(measure, cap)
    finally:
        torch.set_num_threads(threads)
    # Rounded as the cache keeps them, so that a cached choice describes itself alike.
    return ChunkChoice(chosen, {size: round(seconds, 5) for size, seconds in timings.items()}, per_point, cap,
                       round(time.perf_counter() - started, 2), _now(), round(busy, 2), search_threads)


def busy_cores_elsewhere(seconds: float = 0.5) -> float:
    """How many cores other processes kept busy over the next ``seconds`` (this one
    idles meanwhile), from /proc/stat; 0.0 where there is no /proc."""
    def busy_ticks() -> int:
        with open("/proc/stat", encoding="ascii") as stat:
            user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, stat.readline().split()[1:9])
        return user + nice + system + irq + softirq + steal  # guest time is inside user and nice

    try:
        before, started = busy_ticks(), time.monotonic()
        time.sleep(seconds)
        ticks, elapsed = busy_ticks() - before, time.monotonic() - started
    except (OSError, ValueError, IndexError):
        return 0.0
    return max(0.0, ticks / os.sysconf("SC_CLK_TCK") / elapsed)


def search_chunk(measure: Callable[[int], float | None], cap: int) -> tuple[int, dict[int, float], int]:
    """The size in [1, cap] with the least ``measure(size)`` (time per point; None: out
    of device memory), with every size tried (its best time) and the cap (lower when the
    device ran out of memory first):

    1. Sizes 2, 4, 8, ... and the cap (unless within NEAR of the last), until one is
       TURNED slower than the best so far; a size that seems to be is timed once more
       first (a first call can be slow for reasons of its own: fresh memory, another
       process).
    2. The (up to three) fastest sizes within CLOSE of the fastest are timed once more,
       each keeping its better time, so that a machine whose speed drifts does not
       decide between near-equal sizes.

    Of the sizes within EQUAL of the fastest, the smallest is taken. At most
    log2(cap) sizes are tried, each a few calls: how slow the small ones are (a fixed
    cost per call, e.g. BiT's weights re-laid out for oneDNN) hardly changes what the
    search costs, and its largest sizes, which cost most, are tried once.
    """
    timings: dict[int, float] = {}

    def tried(size: int) -> bool:
        seconds = measure(size)
        if seconds is not None:
            timings[size] = min(seconds, timings.get(size, seconds))
        return seconds is not None

    def turned(size: int) -> bool:
        return timings[size] > min(timings.values()) * TURNED

    # Never 1 where 2 fits: one-point calls take other convolution kernels on a CPU, whose
    # rounding differs (3.9e-3 relative L2 of IG on a full-size BiT-R101x3).
    size = min(2, cap)
    while tried(size):
        if turned(size):
            tried(size)  # once more: a first call can be slow for reasons of its own
            if turned(size):
                break
        if size >= cap:
            break
        size = cap if size * 2 * NEAR > cap else size * 2
    else:
        cap = max(1, size // 2)  # the device's memory ran out before the budget
    if not timings:
        return 1, timings, 1
    fastest = min(timings.values())
    for size in sorted((size for size, seconds in timings.items() if seconds <= fastest * CLOSE),
                       key=timings.__getitem__)[:3]:
        tried(size)
    fastest = min(timings.values())
    return min(size for size, seconds in timings.items() if seconds <= fastest * EQUAL), timings, cap


def _seconds_per_point(module: nn.Module, sample: Tensor, size: int, allow_tf32: bool, built: bool) -> float:
    """Seconds per point of forward+backward in chunks of ``size``: the fastest of calls
    for TIMED_SECONDS (at least one) after one that builds the size's kernels and caches
    (none when ``built``: the size ran before), or that first call alone if it took
    LONG_CALL_SECONDS."""
    first = time_chunk(module, sample, size, allow_tf32)
    if first >= LONG_CALL_SECONDS and not built:
        return first / size
    calls = max(1, min(20, round(TIMED_SECONDS / max(first, 1e-6))))
    timed = [first] if built else []
    timed += [time_chunk(module, sample, size, allow_tf32) for _ in range(calls - len(timed))]
    return min(timed) / size


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


MEMORY_FORMATS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}

# float32: strict IEEE float32 everywhere (exact against captum). tf32: CUDA's tensor
# cores may round convolution and matmul inputs to TF32 (10-bit mantissa); on an H100
# up to 6x the throughput, but the ReLU kinks along the path amplify the rounding: IG
# moved by 4-9 % (relative L2) on every model tried. No effect on a CPU.
PRECISIONS = ("float32", "tf32")


def use_memory_format(module: nn.Module, sample: Tensor, name: str) -> float:
    """Convert ``module`` in place to the memory format ``name`` and return how far that
    moves IG on ``sample`` (1, C, H, W): relative L2 against the contiguous layout."""
    module.to(memory_format=torch.contiguous_format)
    reference = attribute(module, sample, 0, n_steps=8).integrated_grads
    module.to(memory_format=MEMORY_FORMATS[name])
    if name == "contiguous":
        return 0.0
    moved = attribute(module, sample, 0, n_steps=8).integrated_grads
    return float((moved - reference).norm() / reference.norm().clamp_min(1e-30))


class CompileError(ModelError):
    """torch.compile could not compile the model (no C++ compiler, an unsupported operation)."""


def compile_module(module: nn.Module, sample: Tensor) -> tuple[nn.Module, float, float]:
    """``module`` compiled by torch.compile (inductor; forward and backward, dynamic in the
    number of points), the seconds its first attribution on ``sample`` (1, C, H, W) took
    (most of it compiling), and how far it moves IG: relative L2 against eager. Raises
    CompileError."""
    reference = attribute(module, sample, 0, n_steps=8).integrated_grads
    compiled = torch.compile(module, dynamic=True)
    started = time.perf_counter()
    try:
        moved = attribute(compiled, sample, 0, n_steps=8).integrated_grads
    except Exception as error:  # inductor raises many kinds; each means the same to a user
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CompileError(f"--compile: torch.compile failed ({reason[:300]}); start without --compile "
                           "(it needs a C++ compiler, e.g. g++)") from error
    seconds = time.perf_counter() - started
    return compiled, seconds, float((moved - reference).norm() / reference.norm().clamp_min(1e-30))


def tf32_deviation(module: nn.Module, sample: Tensor) -> float:
    """How far TF32 moves IG on ``sample`` (1, C, H, W): relative L2 against strict float32."""
    strict = attribute(module, sample, 0, n_steps=8).integrated_grads
    fast = attribute(module, sample, 0, n_steps=8, allow_tf32=True).integrated_grads
    return float((fast - strict).norm() / strict.norm().clamp_min(1e-30))


def time_chunk(module: nn.Module, sample: Tensor, size: int, allow_tf32: bool = False) -> float:
    """Seconds of one forward+backward of ``size`` copies of ``sample`` (1, C, H, W), as a
    pass runs its chunks (eval mode, strict float32 unless ``allow_tf32``)."""
    points = sample.detach().expand(size, *sample.shape[1:]).clone()
    with strict_float32(not allow_tf32), evaluation_mode([module]), torch.enable_grad():
        _synchronize(sample.device)
        start = time.perf_counter()
        points.requires_grad_(True)
        out = module(points)
        torch.autograd.grad(out[:, 0].sum(), points)
        _synchronize(sample.device)
        return time.perf_counter() - start


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass(frozen=True)
class WarmUp:
    """What warm-up found: the chunk size and how it was chosen, and how far the opt-in
    modes move IG (relative L2; 0.0 when not in use)."""

    max_batch: int
    chunk_source: str  # "given" (--max-batch N), "cached" or "measured"
    chunk: ChunkChoice | None = None  # the search that chose it (now, or the cached one)
    memory_format_deviation: float = 0.0
    tf32_deviation: float = 0.0
    seconds: float = 0.0
    compiler: str = "eager"  # or "inductor"
    compiled: nn.Module | None = None  # the compiled module the worker runs, with compile
    compile_deviation: float = 0.0
    compile_seconds: float = 0.0


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
                return ChunkChoice.from_json(entries[key])
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
                kept[other] = ChunkChoice.from_json(entry).to_json()
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


def warm_up(model: LoadedModel, max_batch: int | None, memory_format: str = "contiguous",
            precision: str = "float32", report: Callable[[str], None] = lambda step: None,
            remeasure: bool = False, compile: bool = False) -> WarmUp:
    """Put the model in ``memory_format``, compile it if asked (the compiled module is
    the WarmUp's ``compiled``), choose the chunk size (given; else the cached
    measurement; else measure and cache it; ``remeasure`` skips the cache) in
    ``precision``, and run one small attribution end to end. ``report`` hears each step
    as it starts (for `igctl status` during start-up)."""
    sample = resources.files("igd").joinpath("data", "chelsea.jpg").read_bytes()
    x = model.preprocess(decode_image(sample))
    started = time.perf_counter()
    format_moved = tf32_moved = 0.0
    if memory_format != "contiguous":
        report(f"measuring {memory_format}")
        format_moved = use_memory_format(model.module, x, memory_format)
        log("memory_format", memory_format=memory_format, ig_deviation=f"{format_moved:.1e}")
    allow_tf32 = precision == "tf32"
    if allow_tf32 and model.device.type != "cuda":
        log("precision", level=30, precision=precision, note="tf32 only changes CUDA kernels; none here")
    elif allow_tf32:
        report("measuring tf32")
        tf32_moved = tf32_deviation(model.module, x)
        log("precision", precision=precision, ig_deviation=f"{tf32_moved:.1e}")
    module, compiled, compile_moved, compile_s = model.module, None, 0.0, 0.0
    if compile:
        report("compiling the model (torch.compile, inductor)")
        compiled, compile_s, compile_moved = compile_module(model.module, x)
        module = compiled
        log("compiled", compiler="inductor", seconds=round(compile_s, 1), ig_deviation=f"{compile_moved:.1e}")
    compiler = "inductor" if compile else "eager"
    choice, source = None, "given"
    if max_batch is None:
        cache, key = ChunkCache(cache_directory()), ChunkCache.key(model, memory_format, precision, compiler)
        choice = None if remeasure else cache.get(key)
        if choice is not None and choice.max_batch <= memory_cap(model.module, x):
            max_batch, source = choice.max_batch, "cached"
            log("chunk_size_cached", max_batch=max_batch, cache=str(cache.path), measured=choice.measured)
        else:
            report("measuring the fastest chunk size")
            choice = choose_max_batch(module, x, allow_tf32=allow_tf32, report=report, eager=model.module)
            max_batch, source = choice.max_batch, "measured"
            log("chunk_size_measured", max_batch=max_batch,
                ms_per_point={size: round(s * 1000, 1) for size, s in choice.seconds_per_point.items()},
                memory_cap=choice.memory_cap, mb_per_point=round(choice.bytes_per_point / 1e6, 1),
                search_s=round(choice.search_seconds, 1))
            cache.put(key, choice)
    report("a first attribution")
    attribute(module, x, 0, n_steps=2, max_batch=max_batch, allow_tf32=allow_tf32)
    release_free_memory()  # the measurement's large chunks are done with
    seconds = time.perf_counter() - started
    log("warmed_up", seconds=round(seconds, 2), max_batch=max_batch, chunk_source=source, compiler=compiler)
    return WarmUp(max_batch, source, choice, format_moved, tf32_moved, seconds, compiler, compiled, compile_moved,
                  compile_s)
