"""Pick the chunk size (path points per forward+backward) and the memory format by
measuring the real model.

Bigger is not better on a CPU: EfficientNet-Lite0 at 224x224 runs 50 path points fastest
in chunks of a few, and all 50 at once is slower than one at a time. On a GPU large
chunks win until memory runs out. So the daemon measures at warm-up, on the loaded
model, input size and device, and takes the fastest chunk that fits its memory budget.
The weights' memory format is a choice for the user instead: channels-last made
EfficientNet-Lite0's path about a quarter faster on this project's CPU (BiT's slower),
but moved its IG by about 1e-4 (relative L2) and a random LaNet's by far more: other
kernels, other rounding, amplified by the ReLU kinks along the path. Strict stays the
default; the opt-in reports its deviation.
"""

from __future__ import annotations

import json
import os
import platform
import time
from importlib import resources
from pathlib import Path
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor, nn

from igd.attribution import attribute, evaluation_mode, strict_float32
from igd.files import write_atomically
from igd.imaging import decode_image
from igd.logs import log
from igd.memory import memory_budget, release_free_memory
from igd.models import LoadedModel

CPU_CEILING = 64
CUDA_CEILING = 1024


@dataclass(frozen=True)
class ChunkChoice:
    max_batch: int
    seconds_per_point: dict[int, float] = field(default_factory=dict)  # candidate -> s
    bytes_per_point: int = 0
    memory_cap: int = 0  # the largest chunk the memory budget allows


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


def choose_max_batch(
    module: nn.Module,
    sample: Tensor,
    *,
    limit: int | None = None,
    budget_bytes: int | None = None,
    time_budget_s: float = 30.0,
    work_points: int = 8,
    allow_tf32: bool = False,
) -> ChunkChoice:
    """Time forward+backward in chunks of 1, 2, 4, ... points of ``sample`` (1, C, H, W)
    and return the size with the least time per point, within the memory budget.

    Each size does the same work (``work_points`` points, or one chunk if larger) after
    a warm-up call at that size, so the comparison is fair. Stops growing once two sizes
    in a row are slower than the best, or when ``time_budget_s`` is spent. ``limit``
    caps the candidates (e.g. at the most points one pass can have). ``allow_tf32``:
    time the chunks the way they will run (see :data:`PRECISIONS`).
    """
    per_point = saved_bytes_per_point(module, sample)
    cap = memory_cap(module, sample, budget_bytes=budget_bytes, limit=limit, per_point=per_point)
    timings: dict[int, float] = {}
    started = time.perf_counter()
    # Never 1 where 2 fits: one-point calls take other convolution kernels on a CPU, whose
    # rounding differs (3.9e-3 relative L2 of IG on a full-size BiT-R101x3).
    size, slower = min(2, cap), 0
    while size <= cap:
        try:
            _time_chunk(module, sample, size, allow_tf32)  # the first call at a size builds kernels and caches
            repeats = max(1, work_points // size)
            total = sum(_time_chunk(module, sample, size, allow_tf32) for _ in range(repeats))
            timings[size] = total / (repeats * size)
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            break
        best = min(timings.values())
        slower = slower + 1 if timings[size] > best * 1.05 else 0
        if slower == 2 or time.perf_counter() - started > time_budget_s:
            break
        size *= 2
    # Timings here vary by several per cent run to run: of the sizes within 5 % of the
    # fastest, take the smallest (less memory, and nothing measurably slower).
    fastest = min(timings.values())
    best_size = min(size for size, seconds in timings.items() if seconds <= fastest * 1.05)
    return ChunkChoice(best_size, timings, per_point, cap)


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


def tf32_deviation(module: nn.Module, sample: Tensor) -> float:
    """How far TF32 moves IG on ``sample`` (1, C, H, W): relative L2 against strict float32."""
    strict = attribute(module, sample, 0, n_steps=8).integrated_grads
    fast = attribute(module, sample, 0, n_steps=8, allow_tf32=True).integrated_grads
    return float((fast - strict).norm() / strict.norm().clamp_min(1e-30))


def _time_chunk(module: nn.Module, sample: Tensor, size: int, allow_tf32: bool = False) -> float:
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
    chunk: ChunkChoice | None = None  # the measurement, when there was one
    memory_format_deviation: float = 0.0
    tf32_deviation: float = 0.0
    seconds: float = 0.0


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
    weights' SHA-256), input size, device, threads, precision, memory format and torch
    version, so that a restart, on a busy machine or not, takes the same chunk and
    gives the same bytes for the same request."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / "chunk-sizes.json"

    @staticmethod
    def key(model: LoadedModel, memory_format: str, precision: str) -> str:
        return "|".join(str(part) for part in (
            model.weights_sha256, "x".join(map(str, model.input_shape)), _device_name(model.device),
            f"threads={torch.get_num_threads()}", precision, memory_format, f"torch={torch.__version__}",
        ))

    def get(self, key: str) -> int | None:
        try:
            value = json.loads(self.path.read_text()).get(key, {}).get("max_batch")
        except (OSError, ValueError, AttributeError):
            return None
        return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None

    def put(self, key: str, choice: ChunkChoice) -> None:
        try:
            entries = json.loads(self.path.read_text())
            if not isinstance(entries, dict):
                entries = {}
        except (OSError, ValueError):
            entries = {}
        entries[key] = {"max_batch": choice.max_batch,
                        "ms_per_point": {str(k): round(v * 1000, 2) for k, v in choice.seconds_per_point.items()},
                        "measured": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_atomically(self.path, json.dumps(entries, indent=1, sort_keys=True).encode())
        except OSError as error:
            log("chunk_cache_unwritable", level=30, path=str(self.path), error=error.strerror or str(error),
                note="the chunk size will be measured again at the next start")


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
            remeasure: bool = False) -> WarmUp:
    """Put the model in ``memory_format``, choose the chunk size (given; else the cached
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
    choice, source = None, "given"
    if max_batch is None:
        cache, key = ChunkCache(cache_directory()), ChunkCache.key(model, memory_format, precision)
        cached = None if remeasure else cache.get(key)
        if cached is not None and cached <= memory_cap(model.module, x):
            max_batch, source = cached, "cached"
            log("chunk_size_cached", max_batch=max_batch, cache=str(cache.path))
        else:
            report("measuring the fastest chunk size")
            choice = choose_max_batch(model.module, x, allow_tf32=allow_tf32)
            max_batch, source = choice.max_batch, "measured"
            log("chunk_size_measured", max_batch=max_batch,
                ms_per_point={size: round(s * 1000, 1) for size, s in choice.seconds_per_point.items()},
                memory_cap=choice.memory_cap, mb_per_point=round(choice.bytes_per_point / 1e6, 1))
            cache.put(key, choice)
    report("a first attribution")
    attribute(model.module, x, 0, n_steps=2, max_batch=max_batch, allow_tf32=allow_tf32)
    release_free_memory()  # the measurement's large chunks are done with
    seconds = time.perf_counter() - started
    log("warmed_up", seconds=round(seconds, 2), max_batch=max_batch, chunk_source=source)
    return WarmUp(max_batch, source, choice, format_moved, tf32_moved, seconds)
