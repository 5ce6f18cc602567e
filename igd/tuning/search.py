"""Choose the chunk size (path points per forward+backward) by timing the real model.

No chunk size suits every model on a CPU: EfficientNet-Lite0 at 224x224 runs fastest in
chunks of 4 to 16 and slows down beyond (caches), while BiT-R101x3 at 32x32 pays about
half a second per call whatever its size (its 380M weights re-laid out for oneDNN) and
wants the largest chunk memory allows. On a GPU large chunks win until memory runs out.
So the daemon searches at warm-up (igd.tuning.warmup), on the loaded model, input size
and device, within its memory budget, and keeps the answer (igd.tuning.cache).
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor, nn

from igd.engine.attribution import evaluation_mode, strict_float32
from igd.engine.memory import memory_budget

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

def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
