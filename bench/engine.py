"""Compute path: igd's one-pass engine vs the predecessor's path, same model, same input.

    python bench/engine.py                      # LaNet C=128/24, BiT-R101x3, EfficientNet-Lite0
    python bench/engine.py --models lanet --repeats 5 --json out.json

Full-size BiT and LaNet get random weights (speed does not depend on the values); the
default model is the real pretrained one. Runs alternate between the two paths; the
table shows medians and the ratio from this one run. Not a test: no timing asserts.
Memory: the predecessor puts all 50 path points of LaNet C=128 in one batch, which
peaks near 18 GB here; make sure the machine has it.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from models import IMAGE, build
from PIL import Image
from predecessor import predecessor_attribute

from igd.engine.attribution import attribute
from igd.tuning.search import choose_max_batch
from igd.tuning.warmup import use_memory_format


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench(name: str, repeats: int, n_steps: int, memory_format: str) -> dict[str, object]:
    built = build(name)
    model, target, label = built.module, built.target, built.label
    x = built.preprocess(Image.open(IMAGE).convert("RGB"))
    ours_model = copy.deepcopy(model)  # in igd's layout; the predecessor keeps the model as built
    use_memory_format(ours_model, x, memory_format)
    choice = choose_max_batch(ours_model, x)  # as igd serve measures it
    ours_fn = lambda: attribute(ours_model, x, target, n_steps=n_steps, max_batch=choice.max_batch)  # noqa: E731
    theirs_fn = lambda: predecessor_attribute(model, x, target, n_steps=n_steps)  # noqa: E731
    ours = ours_fn()  # warm-up, and the results to compare
    theirs = theirs_fn()
    error = float((ours.integrated_grads - theirs["integrated_grads"]).norm() / theirs["integrated_grads"].norm())
    ours_s, theirs_s = [], []
    for _ in range(repeats):
        ours_s.append(timed(ours_fn))
        theirs_s.append(timed(theirs_fn))
    ours_median, theirs_median = statistics.median(ours_s), statistics.median(theirs_s)
    return {
        "model": label,
        "n_steps": n_steps,
        "chunk": choice.max_batch,
        "memory_format": memory_format,
        "ours_s": ours_median,
        "predecessor_s": theirs_median,
        "speedup": theirs_median / ours_median,
        "ig_rel_l2_vs_predecessor": error,
        "ours_runs": ours_s,
        "predecessor_runs": theirs_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="lanet,bit,effnet", help="comma-separated: lanet, bit, effnet")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--memory-format", default="contiguous", choices=["contiguous", "channels_last"],
                        help="igd's opt-in channels-last layout (faster on some CPUs, moves IG by ~1e-4)")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    machine = f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, CPU"
    print(f"# compute path, {args.steps} Gauss-Legendre steps, median of {args.repeats} ({machine})")
    print("| model | igd (s) | predecessor (s) | speedup | chunk, format | IG rel. L2 vs predecessor |")
    print("|---|---|---|---|---|---|")
    rows = []
    for name in args.models.split(","):
        row = bench(name.strip(), args.repeats, args.steps, args.memory_format)
        rows.append(row)
        print(
            f"| {row['model']} | {row['ours_s']:.2f} | {row['predecessor_s']:.2f} | "
            f"{row['speedup']:.1f}x | {row['chunk']}, {row['memory_format']} | {row['ig_rel_l2_vs_predecessor']:.1e} |",
            flush=True,
        )
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
