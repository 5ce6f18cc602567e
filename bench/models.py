"""The models the benchmarks use, built the same way for every script.

Full-size BiT-S-R101x3 and LaNet (C=128, 24 layers) get random weights (speed does not
depend on the values; LaNet's BatchNorm statistics are calibrated on noise so that its
activations stay finite); the default model is the real pretrained one. With
``checkpoint_dir`` the random models are also saved in the predecessor's formats, so
that an igd started with ``igd_args`` serves exactly these weights.
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from PIL import Image

from igd.models import CIFAR10_CLASSES, bit, lanet, load_model
from igd.models.registry import BIT_PREPROCESSING, LANET_PREPROCESSING

IMAGE = Path(__file__).resolve().parents[1] / "igd" / "data" / "chelsea.jpg"
NAMES = ("lanet", "bit", "effnet")


@dataclass
class BenchModel:
    label: str
    module: torch.nn.Module  # eval mode; parameters trainable, as the predecessor had them
    preprocess: Callable[[Image.Image], torch.Tensor]  # PIL -> (1, 3, H, W)
    class_names: tuple[str, ...]
    target: int  # the class benchmarks attribute to
    igd_args: list[str] = field(default_factory=list)


def describe_machine() -> str:
    """E.g. "Intel(R) Xeon(R) Processor, 2 cores, 2 torch threads": the CPU a table was measured on."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            cpu = next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor() or platform.machine()
    return f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


def calibrated(model: torch.nn.Module) -> torch.nn.Module:
    """BatchNorm statistics of the model's own activations on noise (a few train-mode
    forwards). With the init statistics, 24 LaNet cells of skip connections overflow to
    inf, and NaN arithmetic would make timings meaningless."""
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None  # a cumulative average
    model.train()
    with torch.no_grad():
        for _ in range(4):
            model(torch.randn(16, 3, 32, 32))
    return model.eval()


def build(name: str, checkpoint_dir: Path | None = None) -> BenchModel:
    torch.manual_seed(0)
    if name == "lanet":
        module = calibrated(lanet.NetworkCIFAR(128, 10, 24, auxiliary=True))
        args = []
        if checkpoint_dir is not None:
            path = checkpoint_dir / "lanet-c128-l24.pth"
            torch.save({"epoch": 0, "model_state_dict": module.state_dict()}, path)
            args = ["-lp", str(path)]
        return BenchModel("LaNet C=128, 24 layers (random init), 32x32", module, LANET_PREPROCESSING,
                          CIFAR10_CLASSES, 3, args)
    if name == "bit":
        module = bit.ResNetV2((3, 4, 23, 3), 3, 10).eval()
        args = []
        if checkpoint_dir is not None:
            path = checkpoint_dir / "bit-s-r101x3.pth"
            torch.save({f"module.{k}": v for k, v in module.state_dict().items()}, path)
            args = ["-bp", str(path)]
        return BenchModel("BiT-S-R101x3 (random init), 32x32", module, BIT_PREPROCESSING, CIFAR10_CLASSES, 3, args)
    if name == "effnet":
        loaded = load_model(device="cpu")
        module = loaded.module
        for parameter in module.parameters():  # load_model freezes; the predecessor did not
            parameter.requires_grad_(True)
        x = loaded.preprocess(Image.open(IMAGE).convert("RGB"))
        with torch.no_grad():
            target = int(module(x).argmax())
        return BenchModel("EfficientNet-Lite0 (pretrained), 224x224", module, loaded.preprocessing,
                          loaded.class_names, target, [])
    raise ValueError(f"unknown model {name!r}; choose from {NAMES}")
