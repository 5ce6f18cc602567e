"""GPU: igd's engine vs the predecessor's compute path on one CUDA device.

    python bench/gpu.py --json docs/benchmarks/gpu.json   # needs CUDA; about 3 minutes on an H100
    python bench/gpu.py --device cpu --smoke               # a seconds-long check that the script runs

Prints one table: for BiT-S-R101x3 and LaNet (C=128, 24 layers; random weights, 32x32),
per-request latency of both paths in strict float32 and with TF32 allowed (each side in
the same mode), images/s with 1, 8 and 32 images per pass against the predecessor's one
request at a time, and peak GPU memory; then, on the pretrained EfficientNet-Lite0, how far
TF32 moves IG from strict float32 (relative L2) and what it gains.

PyTorch's own default allows TF32 for convolutions (not matmuls); the predecessor ran with
that default. Here each mode is set explicitly for both sides (igd.engine.attribution.strict_float32).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
from models import IMAGE, build
from PIL import Image
from predecessor import predecessor_attribute

from igd.engine.attribution import attribute, strict_float32
from igd.tuning.search import choose_max_batch

MODES = {"float32": False, "tf32": True}  # name -> allow_tf32


def synchronized(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_time(fn: Callable[[], Any], device: torch.device, repeats: int) -> float:
    fn()  # warm-up: kernels, cuDNN plans, allocator
    times = []
    for _ in range(repeats):
        synchronized(device)
        start = time.perf_counter()
        fn()
        synchronized(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_memory_gib(fn: Callable[[], Any], device: torch.device) -> float:
    if device.type != "cuda":
        return float("nan")
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    return torch.cuda.max_memory_allocated(device) / 2**30


def relative_l2(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).norm() / expected.norm())


def bench_model(name: str, device: torch.device, steps: int, batches: tuple[int, ...], repeats: int,
                rows: list[dict[str, Any]]) -> None:
    built = build(name)
    model = built.module.to(device)
    x = built.preprocess(Image.open(IMAGE).convert("RGB")).to(device)
    target = built.target
    for mode, allow_tf32 in MODES.items():
        chunk = choose_max_batch(model, x, limit=steps * max(batches), allow_tf32=allow_tf32).max_batch

        def ours(images: int = 1) -> Any:
            xs = x.expand(images, -1, -1, -1).contiguous()
            return attribute(model, xs, target, n_steps=steps, max_batch=chunk, allow_tf32=allow_tf32)

        def theirs() -> Any:
            with strict_float32(not allow_tf32):
                return predecessor_attribute(model, x, target, steps)

        ours_s = median_time(ours, device, repeats)
        theirs_s = median_time(theirs, device, repeats)
        row: dict[str, Any] = {
            "model": built.label, "mode": mode, "chunk": chunk, "ours_s": ours_s, "predecessor_s": theirs_s,
            "speedup": theirs_s / ours_s, "images_per_s": {}, "throughput_ratio": {},
        }
        for images in batches:
            seconds = median_time(lambda: ours(images), device, repeats)
            row["images_per_s"][images] = images / seconds
            row["throughput_ratio"][images] = images / seconds * theirs_s
        row["ours_peak_gib"] = peak_memory_gib(lambda: ours(batches[-1]), device)
        row["predecessor_peak_gib"] = peak_memory_gib(theirs, device)
        row["peak_images"] = batches[-1]
        rows.append(row)
        print_row(row, batches)
    del model, built
    if device.type == "cuda":
        torch.cuda.empty_cache()


def print_row(row: dict[str, Any], batches: tuple[int, ...]) -> None:
    throughput = ", ".join(f"{n}: {row['images_per_s'][n]:.1f} ({row['throughput_ratio'][n]:.1f}x)" for n in batches)
    print(f"| {row['model']} | {row['mode']} | {row['ours_s'] * 1e3:.0f} | {row['predecessor_s'] * 1e3:.0f} | "
          f"**{row['speedup']:.2f}x** | {throughput} | {row['ours_peak_gib']:.1f} / {row['predecessor_peak_gib']:.1f} | "
          f"{row['chunk']} |", flush=True)


def bench_precision(device: torch.device, steps: int, repeats: int) -> dict[str, Any]:
    """TF32 against strict float32 on the pretrained default model: IG error and speed."""
    default = build("effnet")
    model = default.module.to(device)
    x = default.preprocess(Image.open(IMAGE).convert("RGB")).to(device)
    result: dict[str, Any] = {"model": default.label}
    runs = {}
    for mode, allow_tf32 in MODES.items():
        chunk = choose_max_batch(model, x, limit=steps * 8, allow_tf32=allow_tf32).max_batch
        runs[mode] = attribute(model, x, default.target, n_steps=steps, max_batch=chunk, allow_tf32=allow_tf32)
        xs = x.expand(8, -1, -1, -1).contiguous()
        result[f"{mode}_s"] = median_time(
            lambda: attribute(model, x, default.target, n_steps=steps, max_batch=chunk, allow_tf32=allow_tf32),
            device, repeats)
        result[f"{mode}_images_per_s_8"] = 8 / median_time(
            lambda: attribute(model, xs, default.target, n_steps=steps, max_batch=chunk, allow_tf32=allow_tf32),
            device, repeats)
    result["ig_rel_l2"] = relative_l2(runs["tf32"].integrated_grads, runs["float32"].integrated_grads)
    result["idg_rel_l2"] = relative_l2(runs["tf32"].directional_grads, runs["float32"].directional_grads)
    print(f"\n{default.label}: TF32 moves IG by {result['ig_rel_l2']:.1e} (per-step gradients "
          f"{result['idg_rel_l2']:.1e}) relative L2 against strict float32; one image "
          f"{result['float32_s'] * 1e3:.0f} -> {result['tf32_s'] * 1e3:.0f} ms, 8 per pass "
          f"{result['float32_images_per_s_8']:.1f} -> {result['tf32_images_per_s_8']:.1f} images/s", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, to check the script itself")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device: run this where one is present (or --device cpu --smoke)")
    steps, batches, repeats = (4, (1, 2), 1) if args.smoke else (50, (1, 8, 32), args.repeats)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "CPU"
    machine = f"{name}, torch {torch.__version__}"
    print(f"# GPU benchmark on {machine}; {steps} steps; medians of {repeats}; each side in the same precision mode")
    print("| model | mode | igd, 1 image (ms) | predecessor (ms) | speedup | igd images/s by images per pass "
          "(x predecessor's throughput) | peak GiB, igd "
          f"{batches[-1]} images / predecessor 1 | chunk |")
    print("|---|---|---|---|---|---|---|---|", flush=True)
    rows: list[dict[str, Any]] = []
    for model_name in (["bit"] if args.smoke else ["bit", "lanet"]):
        bench_model(model_name, device, steps, batches, repeats, rows)
    precision = bench_precision(device, steps, repeats)
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "steps": steps, "rows": rows, "precision": precision},
                                        indent=2))


if __name__ == "__main__":
    main()
