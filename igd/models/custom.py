"""Bring your own model: a TorchScript or ``torch.export`` file, or a torchvision
architecture plus a state dict, each optionally described by a sidecar file.

The sidecar is JSON or TOML beside the model file (``net.pt.json``, ``net.json``,
``net.pt.toml`` or ``net.toml``)::

    {"name": "my-net", "input_size": [224, 224], "resize": "crop",
     "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
     "classes": ["cat", "dog"]}

``classes_file`` (one name per line, relative to the sidecar) may replace ``classes``.
For TorchScript and export files ``input_size``, ``mean`` and ``std`` are required;
torchvision architectures default to ImageNet's 224 crop and statistics.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn

from igd.models.checkpoints import ModelError, load_strict, read_checkpoint, strip_prefix, tensor_dict
from igd.models.preprocessing import Preprocessing

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_SIDECAR_KEYS = {"name", "input_size", "resize", "resize_to", "mean", "std", "classes", "classes_file"}


@dataclass(frozen=True)
class Sidecar:
    """What a model file does not say about itself."""

    path: Path | None
    name: str | None = None
    preprocessing: Preprocessing | None = None
    classes: tuple[str, ...] | None = None


def _toml() -> Any:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10
        import tomli as tomllib
    return tomllib


def find_sidecar(model_path: Path) -> Path | None:
    candidates = [
        model_path.with_name(model_path.name + ".json"),
        model_path.with_name(model_path.name + ".toml"),
        model_path.with_suffix(".json"),
        model_path.with_suffix(".toml"),
    ]
    return next((c for c in candidates if c.is_file() and c != model_path), None)


def read_sidecar(path: Path | None, *, require_preprocessing: bool) -> Sidecar:
    if path is None:
        if require_preprocessing:
            raise ModelError(
                "a TorchScript or torch.export model needs a sidecar file beside it "
                "(e.g. model.pt.json) giving input_size, mean and std; see docs"
            )
        return Sidecar(None)
    try:
        text = path.read_text(encoding="utf-8")
        data = _toml().loads(text) if path.suffix == ".toml" else json.loads(text)
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise ModelError(f"{path}: cannot read the sidecar ({error})") from None
    if not isinstance(data, dict):
        raise ModelError(f"{path}: the sidecar must be a table/object of settings")
    unknown = sorted(set(data) - _SIDECAR_KEYS)
    if unknown:
        raise ModelError(f"{path}: unknown sidecar keys {unknown}; known: {sorted(_SIDECAR_KEYS)}")
    return Sidecar(
        path,
        name=_optional(data, "name", str, path),
        preprocessing=_preprocessing(data, path, required=require_preprocessing),
        classes=_classes(data, path),
    )


def read_class_names(path: Path) -> tuple[str, ...]:
    """One class name per line; blank lines ignored."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise ModelError(f"{path}: cannot read class names ({error})") from None
    names = tuple(line.strip() for line in lines if line.strip())
    if not names:
        raise ModelError(f"{path}: no class names (expected one per line)")
    if len(set(names)) != len(names):
        raise ModelError(f"{path}: class names must be unique")
    return names


class ExportedModel(nn.Module):
    """A ``torch.export`` program as a module. Its train/eval behaviour was fixed when it
    was exported (export in eval mode), and its graph refuses ``eval()``: so this wrapper
    records the mode without reaching into the graph."""

    def __init__(self, graph: nn.Module) -> None:
        super().__init__()
        self.graph = graph

    def train(self, mode: bool = True) -> ExportedModel:
        self.training = mode
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.graph(x)


def load_program(path: Path) -> nn.Module:
    """A TorchScript archive, or a ``torch.export`` archive (``.pt2``), as a module on the CPU."""
    if not path.is_file():
        raise ModelError(f"{path}: no such file")
    try:
        if path.suffix == ".pt2":
            return ExportedModel(torch.export.load(str(path)).module())
        return torch.jit.load(str(path), map_location="cpu")
    except Exception as error:  # noqa: BLE001 - both loaders raise many unrelated types
        kind = "torch.export" if path.suffix == ".pt2" else "TorchScript"
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ModelError(f"{path}: not a loadable {kind} file ({first})") from None


def torchvision_names() -> list[str]:
    """Classification architectures torchvision can build."""
    return torchvision.models.list_models(module=torchvision.models)


def load_torchvision(name: str, weights: Path | None) -> nn.Module:
    """Build torchvision's ``name`` and load a local state dict into it (never downloads)."""
    if name not in torchvision_names():
        raise ModelError(
            f"{name!r} is neither a model file nor a torchvision classification architecture "
            f"(e.g. {', '.join(torchvision_names()[:6])}, ...)"
        )
    if weights is None:
        raise ModelError(f"--model {name} needs --weights FILE: a state dict for it (nothing is downloaded)")
    state = strip_prefix(tensor_dict(read_checkpoint(weights), weights, "a state dict"))
    probe = torchvision.models.get_model(name, weights=None)
    head = [key for key, value in probe.state_dict().items() if key.endswith(".weight") and value.dim() == 2]
    classes = state[head[-1]].shape[0] if head and head[-1] in state else 1000
    module = torchvision.models.get_model(name, weights=None, num_classes=classes)
    load_strict(module, state, weights, f"torchvision's {name}")
    return module


def torchvision_preprocessing() -> Preprocessing:
    return Preprocessing((224, 224), IMAGENET_MEAN, IMAGENET_STD, resize="crop", resize_to=256)


def _preprocessing(data: dict[str, Any], path: Path, *, required: bool) -> Preprocessing | None:
    present = [key for key in ("input_size", "mean", "std") if key in data]
    if not present and not required:
        return None
    missing = [key for key in ("input_size", "mean", "std") if key not in data]
    if missing:
        raise ModelError(f"{path}: the sidecar needs {', '.join(missing)}")
    size = data["input_size"]
    if not (isinstance(size, list) and len(size) == 2 and all(isinstance(v, int) and v > 0 for v in size)):
        raise ModelError(f"{path}: input_size must be [height, width] in pixels, got {size!r}")
    try:
        return Preprocessing(
            (size[0], size[1]),
            tuple(float(v) for v in data["mean"]),
            tuple(float(v) for v in data["std"]),
            resize=data.get("resize", "stretch"),
            resize_to=_optional(data, "resize_to", int, path),
        )
    except (TypeError, ValueError) as error:
        raise ModelError(f"{path}: {error}") from None


def _classes(data: dict[str, Any], path: Path) -> tuple[str, ...] | None:
    if "classes" in data and "classes_file" in data:
        raise ModelError(f"{path}: give classes or classes_file, not both")
    if "classes_file" in data:
        return read_class_names(path.parent / str(data["classes_file"]))
    classes = data.get("classes")
    if classes is None:
        return None
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
        raise ModelError(f"{path}: classes must be a non-empty list of names")
    return tuple(classes)


def _optional(data: dict[str, Any], key: str, kind: type, path: Path) -> Any:
    value = data.get(key)
    if value is not None and not isinstance(value, kind):
        raise ModelError(f"{path}: {key} must be a {kind.__name__}, got {value!r}")
    return value
