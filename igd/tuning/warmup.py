"""Warm-up: the opt-in modes (memory format, TF32, compiling) measured, the chunk size
given, cached or searched, and one small attribution end to end before igd says it is ready.

The weights' memory format and the compiler are choices for the user: channels-last made
EfficientNet-Lite0's path about a quarter faster on this project's CPU (BiT's slower),
but moved its IG by about 1e-4 (relative L2) and a random LaNet's by far more: other
kernels, other rounding, amplified by the ReLU kinks along the path; torch.compile moves
it too. Strict eager stays the default; the opt-ins report their deviation.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from importlib import resources
from typing import Callable

import torch
from torch import Tensor, nn

from igd.engine.attribution import attribute
from igd.engine.memory import release_free_memory
from igd.imaging import decode_image
from igd.logs import log
from igd.models import LoadedModel, ModelError
from igd.tuning.cache import ChunkCache, cache_directory
from igd.tuning.search import ChunkChoice, choose_max_batch, memory_cap

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
