"""Hugging Face ``save_pretrained`` directories: ``--model DIR`` or ``--model hf:DIR``.

A saved image classifier is a directory holding ``config.json`` (architecture, ``id2label``),
its weights (``model.safetensors``, or ``pytorch_model.bin``; sharded: an index and shards)
and ``preprocessor_config.json`` (the image processor). igd builds the model with
``AutoModelForImageClassification.from_pretrained(DIR, local_files_only=True)`` (never
``trust_remote_code``: a model needing its own code is refused), serves its ``.logits``,
names its classes from ``id2label`` and translates the image processor (size, centre
crop or ConvNeXt's ``crop_pct`` rule, resample, rescale, mean, std) into a
:class:`~igd.models.preprocessing.Preprocessing`. The translation is checked at load time:
the processor (its PIL backend) and igd preprocess a few test images, and a processor igd
cannot reproduce exactly is refused, with the difference measured, never approximated.

transformers is imported only here, only when such a directory is asked for (``igd[hf]``).
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from igd.models.checkpoints import ModelError
from igd.models.parts import ModelParts
from igd.models.preprocessing import Preprocessing

INSTALL_HINT = "pip install 'igd[hf]'"
CONFIG = "config.json"
PROCESSOR_CONFIGS = ("preprocessor_config.json", "processor_config.json")  # the second: newer nested form
# What from_pretrained reads, in its order of preference (sharded checkpoints: the index names the shards).
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
WHAT_ONE_HOLDS = (
    "a save_pretrained directory holds config.json (architecture and id2label), the weights "
    "(model.safetensors or pytorch_model.bin) and preprocessor_config.json (the image processor); "
    "write one with model.save_pretrained(DIR) and image_processor.save_pretrained(DIR)"
)
# PIL's resampling filters (PIL.Image.Resampling, transformers' PILImageResampling) by value.
RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic"}
RESAMPLE_UNSUPPORTED = {4: "box", 5: "hamming"}
# ConvNeXt's processor (also used by ResNet, RegNet, CvT, ConvNeXt V2): below 384 it resizes the
# shorter side to int(shortest_edge / crop_pct) and centre-crops a square; from 384 on it stretches.
CONVNEXT_PROCESSORS = ("ConvNextImageProcessor", "ConvNextImageProcessorPil", "ConvNextImageProcessorFast")
CONVNEXT_CROP_BELOW = 384
# Largest difference between igd's tensor and the processor's pixel_values accepted at load:
# float32 rounding only. One uint8 level is 1/255/std, about 0.004 or more.
EXACT = 1e-4


def is_saved_model(path: Path) -> bool:
    """Whether ``path`` is a directory holding config.json (a ``save_pretrained`` directory
    of transformers). Cheap: looks at the file system only, imports nothing."""
    try:
        return path.is_dir() and (path / CONFIG).is_file()
    except OSError:
        return False


class HuggingFaceClassifier(nn.Module):
    """A transformers image classifier as igd runs it: pixel_values (N, C, H, W) -> logits (N, K)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: Tensor) -> Tensor:
        return self.model(pixel_values=pixel_values, return_dict=True).logits


def load_huggingface(directory: Path, weights: Path | None) -> ModelParts:
    """The image classifier saved in ``directory`` by ``save_pretrained``, with its image
    processor's preprocessing and its id2label class names."""
    directory = Path(directory)
    config = _check_directory(directory, weights)
    weights_file = _weights_file(directory)
    _processor_file(directory)
    try:
        import transformers
    except ImportError:
        raise ModelError(f"{directory}: a Hugging Face model directory needs transformers: {INSTALL_HINT}") from None
    with _quiet(transformers):
        model = _load_model(transformers, directory)
        preprocessing, processor_name = _preprocessing(transformers, directory)
    class_names = _class_names(model, directory)
    architecture = type(model).__name__
    return ModelParts(
        HuggingFaceClassifier(model).eval(),
        preprocessing,
        class_names,
        name=directory.resolve().name or str(directory),
        family="huggingface",
        description=f"Hugging Face {architecture} ({config.get('model_type', '?')}, {processor_name}) from {directory}",
        source=str(weights_file),
        classes_source=f"id2label of {directory / CONFIG}",
    )


def _check_directory(directory: Path, weights: Path | None) -> dict[str, Any]:
    """config.json of a directory igd may load, or a ModelError saying what is wrong."""
    if weights is not None:
        raise ModelError(
            f"--weights does not go with a Hugging Face directory: {directory} holds its own weights; "
            f"give --model {directory} alone"
        )
    if not directory.exists():
        raise ModelError(f"{directory}: no such directory ({WHAT_ONE_HOLDS})")
    if not directory.is_dir():
        raise ModelError(
            f"{directory} is a file, not a Hugging Face save_pretrained directory; give the directory "
            f"that holds it ({WHAT_ONE_HOLDS})"
        )
    path = directory / CONFIG
    if not path.is_file():
        raise ModelError(f"{directory} is not a Hugging Face save_pretrained directory: it has no {CONFIG}; {WHAT_ONE_HOLDS}")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ModelError(f"{path}: not a readable JSON config ({_first_line(error)})") from None
    if not isinstance(config, dict):
        raise ModelError(f"{path}: not a transformers config (a JSON object with model_type)")
    _refuse_remote_code(config, path)
    if "model_type" not in config and isinstance(config.get("architecture"), str):
        architecture = config["architecture"]
        raise ModelError(
            f"{path} is timm's (architecture {_shown(architecture)}), not a transformers config: use "
            f"--model timm:{architecture} --weights {_weights_file(directory)}"
        )
    return config


def _refuse_remote_code(config: dict[str, Any], path: Path) -> None:
    if "auto_map" in config:
        raise ModelError(
            f"{path}: this model needs its own Python code (auto_map {_shown(config['auto_map'])}), which "
            "transformers runs only with trust_remote_code; igd never runs a model's own code: use an "
            "architecture that transformers ships"
        )


def _weights_file(directory: Path) -> Path:
    for name in WEIGHT_FILES:
        if (directory / name).is_file():
            return directory / name
    others = sorted(p.name for p in directory.iterdir() if p.suffix in (".h5", ".msgpack", ".ckpt", ".pt", ".pth"))
    found = f" (found {', '.join(others)}: not a format transformers' PyTorch models load)" if others else ""
    raise ModelError(f"{directory} has {CONFIG} but no weights{found}; {WHAT_ONE_HOLDS}")


def _processor_file(directory: Path) -> Path:
    """preprocessor_config.json (or the image_processor inside processor_config.json)."""
    for name in PROCESSOR_CONFIGS:
        path = directory / name
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ModelError(f"{path}: not a readable JSON file ({_first_line(error)})") from None
        if name == PROCESSOR_CONFIGS[0]:
            section = data
        else:  # processor_config.json counts only when it holds an image processor
            section = data.get("image_processor") if isinstance(data, dict) else None
        if isinstance(section, dict):
            _refuse_remote_code(section, path)
            return path
    raise ModelError(
        f"{directory} has no preprocessor_config.json: igd takes the model's preprocessing (size, crop, "
        "resample, rescale, mean, std) from its image processor and never guesses it; save the processor "
        "the model was trained with next to it: image_processor.save_pretrained(DIR)"
    )


@contextlib.contextmanager
def _quiet(transformers: Any) -> Iterator[None]:
    """No progress bars or load reports on igd's stderr while loading (errors are ours to word)."""
    logging = transformers.utils.logging
    verbosity, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()


def _major(transformers: Any) -> int:
    try:
        return int(transformers.__version__.split(".")[0])
    except ValueError:
        return 0


def _load_model(transformers: Any, directory: Path) -> nn.Module:
    """The classifier, every weight from the directory (a missing or mis-shaped one is refused:
    transformers would initialise it at random), float32, eval mode."""
    dtype_key = "dtype" if _major(transformers) >= 5 else "torch_dtype"
    try:
        model, info = transformers.AutoModelForImageClassification.from_pretrained(
            str(directory),
            local_files_only=True,
            trust_remote_code=False,
            output_loading_info=True,
            **{dtype_key: torch.float32},
        )
    except Exception as error:  # noqa: BLE001 - transformers raises many kinds; each is a refusal
        raise ModelError(f"{directory}: transformers cannot load an image classifier from it ({_first_line(error)})") from None
    missing = sorted(info.get("missing_keys", ()))
    mismatched = sorted(str(k[0] if isinstance(k, tuple) else k) for k in info.get("mismatched_keys", ()))
    if missing or mismatched or info.get("error_msgs"):
        problems = [f"{len(missing)} weights missing ({_listed(missing)})"] if missing else []
        problems += [f"{len(mismatched)} of the wrong shape ({_listed(mismatched)})"] if mismatched else []
        problems += [_first_line(info["error_msgs"][0])] if info.get("error_msgs") else []
        raise ModelError(
            f"{directory}: the weights do not fill {type(model).__name__}: {'; '.join(problems)}. transformers "
            "would start those at random; igd refuses (was this saved from a model without this classifier head?)"
        )
    return model.float().eval()


def _class_names(model: nn.Module, directory: Path) -> tuple[str, ...]:
    config = model.config
    id2label = {int(k): str(v) for k, v in (getattr(config, "id2label", None) or {}).items()}
    count = int(getattr(config, "num_labels", len(id2label)))
    if sorted(id2label) != list(range(count)):
        raise ModelError(f"{directory / CONFIG}: id2label must name each of the {count} classes 0..{count - 1} once")
    return tuple(id2label[i] for i in range(count))


def _load_processor(transformers: Any, directory: Path) -> Any:
    """The directory's image processor, its PIL backend (the resampling igd reproduces exactly)."""
    backend = {"backend": "pil"} if _major(transformers) >= 5 else {"use_fast": False}
    try:
        return transformers.AutoImageProcessor.from_pretrained(
            str(directory), local_files_only=True, trust_remote_code=False, **backend
        )
    except Exception as error:  # noqa: BLE001
        raise ModelError(f"{directory}: transformers cannot load its image processor ({_first_line(error)})") from None


def _preprocessing(transformers: Any, directory: Path) -> tuple[Preprocessing, str]:
    processor = _load_processor(transformers, directory)
    name = type(processor).__name__.removesuffix("Pil")
    preprocessing = translate(processor, f"Hugging Face image processor ({directory})", f"{directory}: {name}")
    verify(processor, preprocessing, f"{directory}: {name}")
    return preprocessing, name


def translate(processor: Any, origin: str, what: str) -> Preprocessing:
    """igd's Preprocessing for a transformers image processor's attributes, or a ModelError
    naming the setting igd cannot reproduce. ``what`` starts each message.

    ``size`` {height, width}: stretch to it (and centre-crop ``crop_size``). {shortest_edge}: resize the shorter side to it and
    centre-crop ``crop_size``; ConvNeXt's processor instead resizes the shorter side to
    int(shortest_edge / crop_pct) and crops a shortest_edge square (from 384 on: stretches)."""
    get = lambda key: getattr(processor, key, None)  # noqa: E731
    if get("do_pad"):
        raise ModelError(f"{what}: do_pad pads images; igd resizes them to one input size (no padding)")
    if not get("do_resize"):
        raise ModelError(f"{what}: do_resize is off (the input size would follow each image's size); igd needs one input size")
    size = _size(get("size"))
    crop = _size(get("crop_size")) if get("do_center_crop") else None
    interpolation = _interpolation(get("resample"), what)
    mean, std = _normalization(processor, what)
    crop_pct = None
    if set(size) == {"height", "width"}:
        input_size, kind, resize_to = (size["height"], size["width"]), "stretch", None
        if crop is not None and set(crop) == {"height", "width"} and crop != size:  # DeiT: stretch, then crop
            crop_pct = _squash_pct((size["height"], size["width"]), (crop["height"], crop["width"]), what)
            input_size, crop = (crop["height"], crop["width"]), None
    elif set(size) == {"shortest_edge"} and type(processor).__name__ in CONVNEXT_PROCESSORS:
        shortest, crop_pct = size["shortest_edge"], get("crop_pct")
        if shortest >= CONVNEXT_CROP_BELOW:
            input_size, kind, resize_to, crop_pct = (shortest, shortest), "stretch", None, None
        elif isinstance(crop_pct, bool) or not isinstance(crop_pct, (int, float)) or not 0 < crop_pct <= 1:
            raise ModelError(f"{what}: crop_pct {crop_pct!r} must be a fraction in (0, 1]")
        else:
            input_size, kind, resize_to, crop_pct = (shortest, shortest), "crop", int(shortest / crop_pct), float(crop_pct)
    elif set(size) == {"shortest_edge"}:
        if crop is None or set(crop) != {"height", "width"}:
            raise ModelError(
                f"{what}: size {size} without a centre crop gives each image its own input size; igd needs "
                "one (do_center_crop with a crop_size of height and width)"
            )
        input_size, kind, resize_to = (crop["height"], crop["width"]), "crop", size["shortest_edge"]
    else:
        raise ModelError(f"{what}: size {size} is not a rule igd reproduces ({{height, width}} or {{shortest_edge}})")
    if crop is not None and crop != {"height": input_size[0], "width": input_size[1]}:
        raise ModelError(f"{what}: a centre crop {crop} after resizing to {input_size[0]}x{input_size[1]} is not a rule igd reproduces")
    if resize_to is not None and resize_to < max(input_size):
        raise ModelError(f"{what}: the shorter side is resized to {resize_to}, less than the {input_size[0]}x{input_size[1]} crop: it would pad")
    try:
        # transformers crops at floor((size - crop) / 2); verify() refuses a translation that differs
        return Preprocessing(
            input_size, mean, std, resize=kind, resize_to=resize_to, interpolation=interpolation, crop_pct=crop_pct,
            crop_offsets="floor", origin=origin,
        )
    except ValueError as error:
        raise ModelError(f"{what}: {error}") from None


def _squash_pct(size: tuple[int, int], crop: tuple[int, int], what: str) -> float:
    """The crop_pct with which igd's ``stretch`` (timm's squash: resize to floor(crop / crop_pct),
    then centre-crop) stretches to ``size`` and crops ``crop``, or a ModelError."""
    if crop[0] > size[0] or crop[1] > size[1]:
        raise ModelError(f"{what}: crop_size {crop[0]}x{crop[1]} is larger than the resized {size[0]}x{size[1]}: it would pad")
    pct = crop[0] / size[0]
    for _ in range(4):  # the float quotient may land just below the size: nudge the fraction down
        if all(math.floor(c / pct) == s for c, s in zip(crop, size)):
            return pct
        pct = math.nextafter(pct, 0.0)
    raise ModelError(
        f"{what}: stretching to {size[0]}x{size[1]} and cropping {crop[0]}x{crop[1]} keeps a different fraction "
        "of each side; igd's stretch-then-crop keeps one (crop_pct)"
    )


def _size(value: Any) -> dict[str, int]:
    """A processor's size or crop_size (a dict, transformers 5's SizeDict, or an int) as a dict."""
    if value is None:
        return {}
    if isinstance(value, int):
        return {"height": value, "width": value}
    try:
        pairs = dict(value)
    except (TypeError, ValueError):
        return {"?": value}
    return {str(k): v for k, v in pairs.items() if v is not None}


def _interpolation(resample: Any, what: str) -> str:
    if resample is None:  # transformers' default
        return "bilinear"
    value = getattr(resample, "value", resample)
    if isinstance(value, str) and value in RESAMPLE.values():  # a torchvision InterpolationMode
        return value
    try:
        code = int(value)
    except (TypeError, ValueError):
        code = -1
    if code in RESAMPLE:
        return RESAMPLE[code]
    name = RESAMPLE_UNSUPPORTED.get(code, repr(resample))
    raise ModelError(f"{what}: resample {name} is not one igd has (nearest, bilinear, bicubic, lanczos)")


def _normalization(processor: Any, what: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """mean and std on [0, 1] pixels: igd scales by 1/255, as rescale_factor 1/255 does."""
    factor = getattr(processor, "rescale_factor", None)
    if not getattr(processor, "do_rescale", False):
        raise ModelError(f"{what}: do_rescale is off (the model takes 0..255 values); igd feeds pixels scaled by 1/255")
    if factor is None or not math.isclose(float(factor), 1 / 255, rel_tol=1e-6):
        raise ModelError(f"{what}: rescale_factor {factor} is not 1/255, the only scaling igd applies")
    if not getattr(processor, "do_normalize", False):
        return (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)

    def channels(key: str) -> tuple[float, ...]:
        value = getattr(processor, key, None)
        values = [value] * 3 if isinstance(value, (int, float)) else list(value or ())
        if len(values) != 3:
            raise ModelError(f"{what}: {key} {value!r} needs one value per RGB channel")
        return tuple(float(v) for v in values)

    return channels("image_mean"), channels("image_std")


def verify(processor: Any, preprocessing: Preprocessing, what: str) -> None:
    """Preprocess test images with both; a ModelError with the measured difference unless
    igd's tensors equal the processor's pixel_values (float rounding aside). The images
    are shaped so that every centre-crop offset parity occurs (rounding rules differ there)."""
    for image in probe_images(preprocessing):
        ours = preprocessing(image)
        try:
            theirs = torch.as_tensor(np.asarray(processor(image, return_tensors="np")["pixel_values"]))
        except Exception as error:  # noqa: BLE001
            raise ModelError(f"{what}: the processor fails on a test image ({_first_line(error)})") from None
        if theirs.shape != ours.shape:
            raise ModelError(
                f"{what}: on a {image.width}x{image.height} test image it gives pixel_values of shape "
                f"{tuple(theirs.shape)}, igd's translation {tuple(ours.shape)}; igd cannot reproduce it"
            )
        difference = (theirs.float() - ours).abs()
        if difference.max() > EXACT:
            raise ModelError(
                f"{what}: igd cannot reproduce this processor exactly: on a {image.width}x{image.height} test "
                f"image its pixel_values differ from igd's ({preprocessing.describe()}) by up to "
                f"{difference.max():.3g} in {(difference > EXACT).float().mean():.1%} of the values"
            )


def probe_images(preprocessing: Preprocessing) -> list[Image.Image]:
    """Deterministic noise images, larger and smaller than the input, landscape and portrait,
    each with a centre-crop margin on its longer side of 3 mod 4 where one exists (floor and
    round-half-even offsets part there), all within 1:4 (igd cuts longer ones first)."""
    height, width = preprocessing.input_size
    short = min(height, width) if preprocessing.resize == "stretch" else (preprocessing.resize_to or min(height, width))
    sizes = []
    for shorter in (short + 13, max(8, short // 2 + 3)):
        for crop, landscape in ((width, True), (height, False)):
            side, longer = _odd_margin(short, shorter, crop)
            sizes.append((longer, side) if landscape else (side, longer))
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB") for w, h in sizes]


def _odd_margin(short: int, shorter: int, crop: int) -> tuple[int, int]:
    """(shorter side, longer side) of an image near ``shorter`` whose longer side, once the
    shorter is resized to ``short``, exceeds ``crop`` by 3 mod 4."""
    for side in range(shorter, shorter + 8):
        for longer in range(side + 1, 4 * side):
            if (int(short * longer / side) - crop) % 4 == 3:
                return side, longer
    return shorter, 2 * shorter


def _listed(keys: list[str], shown: int = 5) -> str:
    return ", ".join(keys[:shown]) + (f", ... ({len(keys) - shown} more)" if len(keys) > shown else "")


def _shown(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= 120 else text[:117] + "..."


def _first_line(error: object) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
