"""GPU: igd's engine vs the predecessor's compute path on one CUDA device.

    python bench/gpu.py                 # needs CUDA; about 3 minutes on an H100
    python bench/gpu.py --device cpu --smoke    # a seconds-long check that the script runs

Prints one table: for BiT-S-R101x3 and LaNet (C=128, 24 layers; random weights, 32x32),
per-request latency of both paths, throughput with 1, 8 and 32 images per pass, peak
GPU memory; and, on the pretrained EfficientNet-Lite0, how far TF32 moves IG from
strict float32 (relative L2) and how much faster it is.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
from models import IMAGE, build
from PIL import Image
from predecessor import predecessor_attribute

from igd.attribution import attribute
from igd.tuning import choose_max_batch


def synchronized(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_time(fn, device: torch.device, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        synchronized(device)
        start = time.perf_counter()
        fn()
        synchronized(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_memory(fn, device: torch.device) -> float:
    if device.type != "cuda":
        return float("nan")
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    return torch.cuda.max_memory_allocated(device) / 2**30


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, to check the script itself")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device: run this where one is present (or --device cpu --smoke)")
    steps, batches, repeats = (4, (1, 2), 1) if args.smoke else (50, (1, 8, 32), args.repeats)
    image = Image.open(IMAGE).convert("RGB")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"# GPU benchmark on {name}, {steps} steps, strict float32 unless noted, median of {repeats}")
    print("| model | measure | igd | predecessor | ratio |")
    print("|---|---|---|---|---|")
    for model_name in (["bit"] if args.smoke else ["bit", "lanet"]):
        built = build(model_name)
        model = built.module.to(device)
        x = built.preprocess(image).to(device)
        chunk = choose_max_batch(model, x, limit=steps * max(batches), time_budget_s=20).max_batch
        ours = median_time(lambda: attribute(model, x, built.target, n_steps=steps, max_batch=chunk), device, repeats)
        theirs = median_time(lambda: predecessor_attribute(model, x, built.target, steps), device, repeats)
        print(f"| {model_name} | latency, 1 image (ms) | {ours * 1e3:.1f} | {theirs * 1e3:.1f} | {theirs / ours:.2f}x |")
        tf32 = median_time(lambda: attribute(model, x, built.target, n_steps=steps, max_batch=chunk, allow_tf32=True),
                           device, repeats)
        print(f"| {model_name} | latency, 1 image, TF32 (ms) | {tf32 * 1e3:.1f} | {theirs * 1e3:.1f} | {theirs / tf32:.2f}x |")
        for batch in batches:
            xs = x.expand(batch, -1, -1, -1).contiguous()
            seconds = median_time(lambda: attribute(model, xs, built.target, n_steps=steps, max_batch=chunk), device, repeats)
            print(f"| {model_name} | images/s, {batch} per pass | {batch / seconds:.1f} | {1 / theirs:.1f} | "
                  f"{batch / seconds * theirs:.1f}x |")
        ours_peak = peak_memory(lambda: attribute(model, x.expand(batches[-1], -1, -1, -1).contiguous(), built.target,
                                                  n_steps=steps, max_batch=chunk), device)
        theirs_peak = peak_memory(lambda: predecessor_attribute(model, x, built.target, steps), device)
        print(f"| {model_name} | peak memory (GiB), igd {batches[-1]} images / predecessor 1 | {ours_peak:.1f} | "
              f"{theirs_peak:.1f} | |")
        print(f"| {model_name} | chunk (path points per pass) | {chunk} | {steps} | |")
        del model, built
        if device.type == "cuda":
            torch.cuda.empty_cache()
    default = build("effnet")
    model = default.module.to(device)
    x = default.preprocess(image).to(device)
    strict = attribute(model, x, default.target, n_steps=steps, max_batch=25)
    fast = attribute(model, x, default.target, n_steps=steps, max_batch=25, allow_tf32=True)
    error = float((fast.integrated_grads - strict.integrated_grads).norm() / strict.integrated_grads.norm())
    strict_s = median_time(lambda: attribute(model, x, default.target, n_steps=steps, max_batch=25), device, repeats)
    fast_s = median_time(lambda: attribute(model, x, default.target, n_steps=steps, max_batch=25, allow_tf32=True),
                         device, repeats)
    print(f"| effnet | TF32 vs float32: IG rel. L2 {error:.1e}; time (ms) | {fast_s * 1e3:.1f} | {strict_s * 1e3:.1f} "
          f"(float32) | {strict_s / fast_s:.2f}x |")


if __name__ == "__main__":
    main()
