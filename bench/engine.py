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
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from PIL import Image
from predecessor import predecessor_attribute

from igd.attribution import attribute
from igd.models import bit, lanet, load_model
from igd.models.registry import BIT_PREPROCESSING, LANET_PREPROCESSING
from igd.tuning import choose_max_batch

IMAGE = Path(__file__).resolve().parents[1] / "igd" / "data" / "chelsea.jpg"


def build(name: str) -> tuple[torch.nn.Module, torch.Tensor, int, str]:
    """(model in eval mode, preprocessed chelsea (1, 3, H, W), target, label)."""
    image = Image.open(IMAGE).convert("RGB")
    torch.manual_seed(0)
    if name == "lanet":
        model = calibrated(lanet.NetworkCIFAR(128, 10, 24, auxiliary=True))
        return model.eval(), LANET_PREPROCESSING(image), 3, "LaNet C=128, 24 layers (random init), 32x32"
    if name == "bit":
        model = bit.ResNetV2((3, 4, 23, 3), 3, 10)
        return model.eval(), BIT_PREPROCESSING(image), 3, "BiT-S-R101x3 (random init), 32x32"
    loaded = load_model()
    x = loaded.preprocess(image)
    with torch.no_grad():
        target = int(loaded.module(x).argmax())
    module = loaded.module.requires_grad_(True)  # load_model freezes; the predecessor did not
    return module, x, target, "EfficientNet-Lite0 (pretrained), 224x224"


def calibrated(model: torch.nn.Module) -> torch.nn.Module:
    """Give a randomly initialised model's BatchNorm layers the statistics of its own
    activations (a few train-mode forwards on noise). With the init statistics (mean 0,
    var 1) 24 cells of skip connections overflow to inf, and NaN arithmetic would make
    the timings meaningless."""
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None  # a cumulative average
    model.train()
    with torch.no_grad():
        for _ in range(4):
            model(torch.randn(16, 3, 32, 32))
    return model.eval()


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench(name: str, repeats: int, n_steps: int) -> dict[str, object]:
    model, x, target, label = build(name)
    choice = choose_max_batch(model, x, limit=n_steps)
    ours_fn = lambda: attribute(model, x, target, n_steps=n_steps, max_batch=choice.max_batch)  # noqa: E731
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
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    machine = f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, CPU"
    print(f"# compute path, {args.steps} Gauss-Legendre steps, median of {args.repeats} ({machine})")
    print(f"| model | igd (s) | predecessor (s) | speedup | chunk | IG rel. L2 vs predecessor |")
    print("|---|---|---|---|---|---|")
    rows = []
    for name in args.models.split(","):
        row = bench(name.strip(), args.repeats, args.steps)
        rows.append(row)
        print(
            f"| {row['model']} | {row['ours_s']:.2f} | {row['predecessor_s']:.2f} | "
            f"{row['speedup']:.1f}x | {row['chunk']} | {row['ig_rel_l2_vs_predecessor']:.1e} |",
            flush=True,
        )
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
