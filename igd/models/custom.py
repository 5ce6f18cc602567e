"""Bring your own model: a TorchScript or ``torch.export`` file, or a torchvision
architecture plus a state dict, each optionally described by a sidecar file.

The sidecar is JSON or TOML beside the model file (``net.pt.json``, ``net.json``,
``net.pt.toml`` or ``net.toml``)::

    {"name": "my-net", "input_size": [224, 224], "resize": "crop",
     "interpolation": "bicubic", "crop_pct": 0.95,
     "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
     "classes": ["cat", "dog"]}

``classes_file`` (one name per line, relative to the sidecar) may replace ``classes``.
For TorchScript and export files ``input_size``, ``mean`` and ``std`` are required;
torchvision architectures default to ImageNet's 224 crop and statistics.
``interpolation`` (nearest, bilinear, bicubic, lanczos; default bilinear) and ``crop_pct``
(``crop``: the shorter side becomes ``floor(min(H, W) / crop_pct)``; ``stretch``: timm's
squash) say what timm's data config and Hugging Face's image processors say. A key those
libraries spell differently (``image_mean``, ``img_size``, ``resample``, ...) is refused
with igd's spelling. Files are told apart by content (igd.models.identify): weights given
where a model is expected are answered with the flag that takes them.
"""

from __future__ import annotations

import difflib
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from igd.models.checkpoints import ModelError, load_strict, read_checkpoint, strip_prefix, tensor_dict
from igd.models.identify import MISSING, TORCH_EXPORT, foreign_layout, identify
from igd.models.parts import ModelParts
from igd.models.preprocessing import INTERPOLATIONS, Preprocessing

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_SIDECAR_KEYS = {
    "name", "input_size", "resize", "resize_to", "interpolation", "crop_pct", "mean", "std", "classes", "classes_file",
}  # fmt: skip
_TIMM, _HF = "timm", "Hugging Face"
# Keys timm's data config or HF's image processor config spell differently: key -> (whose, igd's spelling).
SIDECAR_ALIASES = {
    "image_mean": (_HF, "'mean'"),
    "image_std": (_HF, "'std'"),
    "img_size": (_TIMM, "'input_size' ([height, width])"),
    "size": (_HF, "'input_size' ([height, width]), with 'resize' and 'resize_to' for a shorter-side resize"),
    "shortest_edge": (_HF, "'resize_to' (with \"resize\": \"crop\")"),
    "crop_size": (_HF, "'input_size' ([height, width]) with \"resize\": \"crop\""),
    "do_center_crop": (_HF, "'resize' (\"crop\" or \"stretch\")"),
    "do_resize": (_HF, "'resize' (\"crop\" or \"stretch\"; igd always resizes)"),
    "resample": (_HF, "'interpolation' (nearest, bilinear, bicubic or lanczos)"),
    "crop_mode": (_TIMM, "'resize' (\"crop\" for center, \"stretch\" with crop_pct for squash)"),
    "do_rescale": (_HF, "none: igd always scales pixels to [0, 1] before 'mean' and 'std'"),
    "rescale_factor": (_HF, "none: igd always scales pixels to [0, 1] before 'mean' and 'std'"),
    "do_normalize": (_HF, "none: igd always normalises with 'mean' and 'std'"),
    "id2label": (_HF, "'classes' (a list, index order) or 'classes_file'"),
    "label_names": (_HF, "'classes' (a list, index order) or 'classes_file'"),
    "num_classes": (_TIMM, "none: the model's output says it; name them with 'classes'"),
}
# PIL's resample codes, as Hugging Face processors store them, by igd's names.
_PIL_RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic", 1: "lanczos"}
SIDECAR_TEMPLATE = """{
  "name": "my-net",
  "input_size": [224, 224],
  "resize": "crop",
  "crop_pct": 0.875,
  "interpolation": "bilinear",
  "mean": [0.485, 0.456, 0.406],
  "std": [0.229, 0.224, 0.225],
  "classes_file": "classes.txt"
}"""


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


def sidecar_candidates(model_path: Path) -> list[Path]:
    """Where a model file's sidecar may be, in the order they are tried."""
    candidates = [
        model_path.with_name(model_path.name + ".json"),
        model_path.with_name(model_path.name + ".toml"),
        model_path.with_suffix(".json"),
        model_path.with_suffix(".toml"),
    ]
    unique = [c for i, c in enumerate(candidates) if c not in candidates[:i]]
    return [c for c in unique if c != model_path]


def find_sidecar(model_path: Path) -> Path | None:
    return next((c for c in sidecar_candidates(model_path) if c.is_file()), None)


def missing_sidecar(model_path: Path | None) -> ModelError:
    """The error for a TorchScript / torch.export file without a sidecar: where igd looked,
    and a sidecar to start from."""
    looked = ""
    example = "model.pt.json"
    if model_path is not None:
        candidates = sidecar_candidates(model_path)
        looked = f" (looked for {', '.join(str(c) for c in candidates)})"
        example = str(candidates[0])
    return ModelError(
        f"a TorchScript or torch.export model needs a sidecar file beside it giving input_size, mean and "
        f"std{looked}; for example {example}:\n{SIDECAR_TEMPLATE}\n"
        "(resize: \"crop\" or \"stretch\"; interpolation: nearest, bilinear, bicubic or lanczos; "
        "classes or classes_file optional)"
    )


def read_sidecar(path: Path | None, *, require_preprocessing: bool, model_path: Path | None = None) -> Sidecar:
    """The sidecar at ``path`` (None: there is none; an error when ``require_preprocessing``,
    naming the places searched beside ``model_path``)."""
    if path is None:
        if require_preprocessing:
            raise missing_sidecar(model_path)
        return Sidecar(None)
    try:
        text = path.read_text(encoding="utf-8")
        data = _toml().loads(text) if path.suffix == ".toml" else json.loads(text)
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise ModelError(f"{path}: cannot read the sidecar ({error})") from None
    if not isinstance(data, dict):
        raise ModelError(f"{path}: the sidecar must be a table/object of settings")
    aliases = [key for key in data if key in SIDECAR_ALIASES]
    if aliases:
        raise ModelError(f"{path}: " + "; ".join(
            f"sidecar key {key!r} is {SIDECAR_ALIASES[key][0]}'s spelling; igd's is {SIDECAR_ALIASES[key][1]}"
            for key in aliases
        ))
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
    """A TorchScript archive or a ``torch.export`` archive, told apart by content, as a module
    on the CPU; anything else a ModelError saying what the file is and the flag that takes it."""
    kind = program_kind(path)
    try:
        if kind == TORCH_EXPORT:
            return ExportedModel(torch.export.load(str(path)).module())
        return torch.jit.load(str(path), map_location="cpu")
    except Exception as error:  # noqa: BLE001 - both loaders raise many unrelated types
        what = "torch.export" if kind == TORCH_EXPORT else "TorchScript"
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ModelError(f"{path}: not a loadable {what} file ({first})") from None


def program_kind(path: Path) -> str:
    """TORCHSCRIPT or TORCH_EXPORT for a file given as ``--model FILE``; for anything else a
    ModelError that says what the file is and what to pass instead."""
    kind = identify(path)
    if kind.is_program:
        return kind.kind
    if kind.kind == MISSING:
        raise ModelError(f"{path}: no such file")
    if (path.parent / "config.json").is_file():
        raise ModelError(f"{path}: {_part_of_hf_directory(path)}")
    if kind.is_weights:
        raise ModelError(
            f"{path}: this is {kind.what}, weights without an architecture: use --model ARCH --weights {path} "
            "(ARCH: a torchvision name such as resnet50, or timm:NAME)"
        )
    raise ModelError(
        f"{path}: this is {kind.what}, not a TorchScript or torch.export model; --model takes such a "
        "file (with a sidecar), a torchvision name or timm:NAME with --weights FILE, or a Hugging Face directory"
    )


def _part_of_hf_directory(path: Path) -> str:
    return (f"this file belongs to the Hugging Face save_pretrained directory {path.parent}: "
            f"pass the directory: --model {path.parent}")


def load_file(path: Path) -> ModelParts:
    """``--model FILE``: a TorchScript or ``torch.export`` archive (by content) with its sidecar."""
    kind = program_kind(path)  # first: weights given here are answered before a missing sidecar
    sidecar = read_sidecar(find_sidecar(path), require_preprocessing=True, model_path=path)
    exported = kind == TORCH_EXPORT
    return ModelParts(
        load_program(path),
        sidecar.preprocessing or torchvision_preprocessing(),  # always set: required above
        sidecar.classes,
        name=sidecar.name or path.stem,
        family="torch.export" if exported else "torchscript",
        description=f"{'torch.export' if exported else 'TorchScript'} model {path.name}",
        source=str(path),
        classes_source=f"the sidecar {sidecar.path}" if sidecar.classes is not None else "",
    )


def torchvision_names() -> list[str]:
    """Classification architectures torchvision can build."""
    import torchvision  # only for these: importing it takes seconds

    return torchvision.models.list_models(module=torchvision.models)


def load_torchvision(name: str, weights: Path | None) -> nn.Module:
    """Build torchvision's ``name`` and load a local state dict into it (never downloads)."""
    if name not in torchvision_names():
        if Path(name).is_dir():
            raise ModelError(
                f"{name}: a directory, but not a Hugging Face save_pretrained directory (no config.json; "
                "one holds config.json, the weights (model.safetensors) and preprocessor_config.json)"
            )
        if Path(name).suffix and not Path(name).exists():
            raise ModelError(f"{name}: no such file")
        close = difflib.get_close_matches(name.casefold(), torchvision_names(), n=1, cutoff=0.75)
        hint = (f"; did you mean {close[0]}?" if close
                else f" (e.g. {', '.join(torchvision_names()[:6])}, ...)")
        raise ModelError(f"{name!r} is neither a model file nor a torchvision classification architecture{hint}")
    if weights is None:
        raise ModelError(f"--model {name} needs --weights FILE: a state dict for it (nothing is downloaded)")
    state = strip_prefix(tensor_dict(read_checkpoint(weights), weights, "a state dict"))
    import torchvision  # only for a torchvision architecture: importing it takes seconds

    probe = torchvision.models.get_model(name, weights=None)
    head = [key for key, value in probe.state_dict().items() if key.endswith(".weight") and value.dim() == 2]
    classes = state[head[-1]].shape[0] if head and head[-1] in state else 1000
    module = torchvision.models.get_model(name, weights=None, num_classes=classes)
    try:
        load_strict(module, state, weights, f"torchvision's {name}")
    except ModelError as error:
        in_hf = (weights.parent / "config.json").is_file()
        hint = _part_of_hf_directory(weights) if in_hf else foreign_layout(state, weights=str(weights))
        raise (ModelError(f"{error}; {hint}") if hint else error) from None
    return module


def torchvision_preprocessing() -> Preprocessing:
    return Preprocessing((224, 224), IMAGENET_MEAN, IMAGENET_STD, resize="crop", resize_to=256,
                         origin="built-in (torchvision's ImageNet preprocessing)")


def _preprocessing(data: dict[str, Any], path: Path, *, required: bool) -> Preprocessing | None:
    present = [key for key in ("input_size", "mean", "std") if key in data]
    settings = [key for key in ("resize", "resize_to", "interpolation", "crop_pct") if key in data]
    if not present and not settings and not required:
        return None
    missing = [key for key in ("input_size", "mean", "std") if key not in data]
    if missing:
        given = f" with {', '.join(settings)}" if settings and not present else ""
        raise ModelError(f"{path}: the sidecar needs {', '.join(missing)}{given}")
    size = data["input_size"]
    if isinstance(size, list) and len(size) == 3 and size[0] in (1, 3):
        raise ModelError(f"{path}: input_size is [height, width], without channels (timm's (3, H, W) is "
                         f"[{size[1]}, {size[2]}] here), got {size!r}")
    if not (isinstance(size, list) and len(size) == 2 and all(isinstance(v, int) and v > 0 for v in size)):
        raise ModelError(f"{path}: input_size must be [height, width] in pixels, got {size!r}")
    interpolation = data.get("interpolation", "bilinear")
    if isinstance(interpolation, int) and not isinstance(interpolation, bool) and interpolation in _PIL_RESAMPLE:
        raise ModelError(
            f"{path}: interpolation is a name ({', '.join(INTERPOLATIONS)}); {interpolation} is PIL's "
            f"code for {_PIL_RESAMPLE[interpolation]!r}"
        )
    crop_pct = data.get("crop_pct")
    if crop_pct is not None and (isinstance(crop_pct, bool) or not isinstance(crop_pct, (int, float))):
        raise ModelError(f"{path}: crop_pct must be a number such as 0.875, got {crop_pct!r}")
    try:
        return Preprocessing(
            (size[0], size[1]),
            tuple(float(v) for v in data["mean"]),
            tuple(float(v) for v in data["std"]),
            resize=data.get("resize", "stretch"),
            resize_to=_optional(data, "resize_to", int, path),
            interpolation=interpolation,
            crop_pct=None if crop_pct is None else float(crop_pct),
            origin=f"sidecar {path}",
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
