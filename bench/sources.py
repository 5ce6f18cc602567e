"""`igd check` on each model source: what a new user runs first, and how long it takes.

Each source gets a model as its library saves it, with random weights (nothing is
downloaded): timm (resnet18, convnext_atto, deit_tiny as safetensors), a Hugging Face
ViT-Base-sized ViT saved with save_pretrained and its image processor, torchvision's
resnet18 with a state dict, and the same resnet18 as TorchScript with a sidecar. Prints
one row per source: the median wall time of `igd check` (a fresh process: import, load,
warm-up, classify, attribute with 50 steps), its min and max, and where igd says the
preprocessing came from.

    python bench/sources.py [--runs 3] [--json docs/benchmarks/sources.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import timm
import torch
import torchvision
from safetensors.torch import save_file
from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

IGD = str(Path(sys.executable).parent / "igd")
CLASSES = [f"kind {i}" for i in range(10)]


def make_sources(folder: Path) -> dict[str, list[str]]:
    """The `igd check` arguments of each source, its files written under ``folder``."""
    classes = folder / "classes.txt"
    classes.write_text("\n".join(CLASSES) + "\n")
    sources: dict[str, list[str]] = {}
    for name in ("resnet18", "convnext_atto", "deit_tiny_patch16_224"):
        weights = folder / f"{name}.safetensors"
        save_file(timm.create_model(name, pretrained=False, num_classes=10).state_dict(), str(weights))
        sources[f"timm:{name}"] = ["--model", f"timm:{name}", "--weights", str(weights), "--classes", str(classes)]
    vit = folder / "vit"
    config = ViTConfig(image_size=224, patch_size=16, hidden_size=192, num_hidden_layers=6, num_attention_heads=3,
                       intermediate_size=768, num_labels=10, id2label=dict(enumerate(CLASSES)),
                       label2id={name: i for i, name in enumerate(CLASSES)})
    ViTForImageClassification(config).save_pretrained(vit)
    ViTImageProcessor(size={"height": 224, "width": 224}).save_pretrained(vit)
    sources["Hugging Face ViT (6 layers, 192 wide)"] = ["--model", str(vit)]
    resnet = torchvision.models.resnet18(num_classes=10).eval()
    state = folder / "resnet18.pth"
    torch.save(resnet.state_dict(), state)
    sources["torchvision resnet18"] = ["--model", "resnet18", "--weights", str(state), "--classes", str(classes)]
    scripted = folder / "resnet18.pt"
    torch.jit.script(resnet).save(str(scripted))
    (folder / "resnet18.pt.json").write_text(json.dumps({"input_size": [224, 224], "resize": "crop",
                                                         "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
                                                         "classes": CLASSES}))
    sources["TorchScript resnet18 + sidecar"] = ["--model", str(scripted)]
    return sources


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(dir="/tmp") as folder:
        sources = make_sources(Path(folder))
        for label, flags in sources.items():
            seconds, origin, verdict = [], "", ""
            for _ in range(args.runs):
                started = time.perf_counter()
                # --max-batch: the chunk search is timed elsewhere (bench/chunks.py); here the source.
                run = subprocess.run([IGD, "check", *flags, "--cpu", "--max-batch", "8", "--steps", "50"], capture_output=True,
                                     text=True, timeout=900)
                seconds.append(time.perf_counter() - started)
                if run.returncode not in (0, 1) or "input from" not in run.stdout:
                    raise SystemExit(f"{label}: igd check failed\n{run.stdout}\n{run.stderr}")
                origin = next(line[12:].strip() for line in run.stdout.splitlines() if line.startswith("input from"))
                verdict = "ok" if run.returncode == 0 else "refused: accuracy"  # random weights may be beyond 50 %
            rows.append({"source": label, "median_s": statistics.median(seconds), "min_s": min(seconds),
                         "max_s": max(seconds), "preprocessing": origin, "check": verdict})
    print(f"igd check per model source, {args.runs} runs each ({platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__})")
    print(f"{'source':<40} {'median s':>9} {'min':>6} {'max':>6}  {'check':<18} preprocessing from")
    for row in rows:
        print(f"{row['source']:<40} {row['median_s']:>9.1f} {row['min_s']:>6.1f} {row['max_s']:>6.1f}  "
              f"{row['check']:<18} {row['preprocessing']}")
    if args.json:
        args.json.write_text(json.dumps({"runs": args.runs, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
