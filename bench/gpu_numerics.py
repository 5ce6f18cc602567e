"""CUDA numerics and cuDNN settings: how exact float32 IG is on a GPU, and what each
cuDNN setting costs or gains. Needs CUDA; about 2 minutes on an H100.

    python bench/gpu_numerics.py --json docs/benchmarks/gpu_numerics.json

Accuracy: IG of the default model and of the two fixture checkpoints against a float64
reference computed on the CPU, for float32 on the CPU and for each CUDA setting (cuDNN's
default algorithm choice, deterministic algorithms, cuDNN off, TF32), plus float64 on the
GPU (same function: should agree to ~1e-12). The same request twice tells whether a
setting reproduces its bytes.

Speed: 8 images x 50 steps in one pass, strict float32, for BiT-S-R101x3 and LaNet
(full size, random weights) and the default model, under each setting.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator

import torch
from gpu import median_time
from models import IMAGE, build
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from reference import assemble  # noqa: E402

from igd.engine.attribution import attribute
from igd.models import load_model

STEPS = 32
DEVICE = torch.device("cuda")  # --device cpu --smoke checks the script itself


@contextlib.contextmanager
def cudnn_setting(name: str) -> Iterator[bool]:
    """Yields allow_tf32 for the setting; restores cuDNN's flags afterwards."""
    cudnn = torch.backends.cudnn
    saved = (cudnn.enabled, cudnn.benchmark, cudnn.deterministic)
    try:
        cudnn.enabled = name != "cudnn off"
        cudnn.benchmark = "benchmark" in name
        cudnn.deterministic = "deterministic" in name
        yield name == "tf32"
    finally:
        cudnn.enabled, cudnn.benchmark, cudnn.deterministic = saved


def relative_l2(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.double().cpu() - expected.double().cpu()).norm() / expected.double().cpu().norm())


def accuracy(fixtures: Path, smoke: bool) -> list[dict[str, Any]]:
    cases = [("EfficientNet-Lite0", {}, IMAGE, 282),
             ("BiT fixture", {"bit_path": fixtures / "bit-tiny.pth"}, fixtures / "images" / "chelsea.png", 3),
             ("LaNet fixture", {"lanet_path": fixtures / "lanet-tiny.pth"}, fixtures / "images" / "chelsea.png", 3)]
    rows = []
    for label, source, image, target in cases[2:] if smoke else cases:
        cpu = load_model(device="cpu", **source)
        x = cpu.preprocess(Image.open(image).convert("RGB"))
        reference = attribute(copy.deepcopy(cpu.module).double(), x.double(), target, n_steps=STEPS, max_batch=16)
        row: dict[str, Any] = {"model": label}
        row["cpu float32"] = relative_l2(attribute(cpu.module, x, target, n_steps=STEPS, max_batch=16).integrated_grads,
                                         reference.integrated_grads)
        gpu = load_model(device=str(DEVICE), **source)
        xg = x.to(DEVICE)
        for setting in ("cudnn default", "deterministic", "cudnn off", "tf32"):
            with cudnn_setting(setting) as allow_tf32:
                runs = [attribute(gpu.module, xg, target, n_steps=STEPS, max_batch=16, allow_tf32=allow_tf32)
                        for _ in range(2)]
            row[setting] = relative_l2(runs[0].integrated_grads, reference.integrated_grads)
            row[f"{setting} reproducible"] = bool(torch.equal(runs[0].integrated_grads, runs[1].integrated_grads))
        double = attribute(copy.deepcopy(gpu.module).double(), xg.double(), target, n_steps=STEPS, max_batch=16)
        row["cuda float64"] = relative_l2(double.integrated_grads, reference.integrated_grads)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def speed(smoke: bool) -> list[dict[str, Any]]:
    rows = []
    images, steps, repeats = (1, 4, 1) if smoke else (8, 50, 5)
    for name, chunk in (("effnet", 200),) if smoke else (("bit", 400), ("lanet", 64), ("effnet", 200)):
        built = build(name)
        model = built.module.to(DEVICE)
        xs = built.preprocess(Image.open(IMAGE).convert("RGB")).to(DEVICE).expand(images, -1, -1, -1).contiguous()
        base = None
        for setting in ("cudnn default", "benchmark", "deterministic", "benchmark deterministic", "channels_last"):
            layout = torch.channels_last if setting == "channels_last" else torch.contiguous_format
            model.to(memory_format=layout)
            inputs = xs.contiguous(memory_format=layout)
            with cudnn_setting(setting):
                run = lambda: attribute(model, inputs, built.target, n_steps=steps, max_batch=chunk)  # noqa: E731
                seconds = median_time(run, DEVICE, repeats)
                ig = run().integrated_grads
            base = base if base is not None else (seconds, ig)
            row = {"model": built.label, "setting": setting, "seconds": seconds, "images_per_s": images / seconds,
                   "vs_default": base[0] / seconds, "ig_vs_default": relative_l2(ig, base[1])}
            rows.append(row)
            print(json.dumps(row), flush=True)
        model.to(memory_format=torch.contiguous_format)
        del model, built
        if DEVICE.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--smoke", action="store_true", help="default model only, tiny sizes")
    args = parser.parse_args()
    global DEVICE
    DEVICE = torch.device(args.device)
    if DEVICE.type == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device: run this where one is present (or --device cpu --smoke)")
    fixtures = assemble(Path(tempfile.mkdtemp(prefix="igd-fixtures-")))  # tests/fixtures + the rebuilt BiT
    machine = torch.cuda.get_device_name(DEVICE) if DEVICE.type == "cuda" else "CPU"
    print(f"# CUDA numerics on {machine}, torch {torch.__version__}, {STEPS} steps", flush=True)
    results = {"machine": f"{machine}, torch {torch.__version__}", "accuracy": accuracy(fixtures, args.smoke), "speed": speed(args.smoke)}
    settings = ("cpu float32", "cudnn default", "deterministic", "cudnn off", "tf32", "cuda float64")
    print("\n| model | " + " | ".join(settings) + " |  (IG relative L2 vs CPU float64; R = same bytes twice)")
    print("|---" * (len(settings) + 1) + "|")
    for row in results["accuracy"]:
        cells = [f"{row[s]:.1e}" + (" R" if row.get(f"{s} reproducible") else "") for s in settings]
        print(f"| {row['model']} | " + " | ".join(cells) + " |")
    print(f"\n| model | setting | {8 if not args.smoke else 1} images x {50 if not args.smoke else 4} steps (ms) | images/s | vs cuDNN default | IG moved |")
    print("|---|---|---|---|---|---|")
    for row in results["speed"]:
        print(f"| {row['model']} | {row['setting']} | {row['seconds'] * 1e3:.0f} | {row['images_per_s']:.1f} | "
              f"{row['vs_default']:.2f}x | {row['ig_vs_default']:.1e} |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
