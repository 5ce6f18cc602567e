"""``--model timm:NAME --weights FILE``: a timm architecture by name, with the user's
weights and timm's own preprocessing for that model (its data config).

timm is an optional dependency (``pip install 'igd[timm]'``): it is imported only here,
only when such a model is asked for. Nothing is downloaded: the architecture is built
with ``pretrained=False`` and the weights come from the user's file.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from igd.models.checkpoints import ModelError, load_strict, read_checkpoint, strip_prefix, tensor_dict
from igd.models.parts import ModelParts
from igd.models.preprocessing import INTERPOLATIONS, Preprocessing

INSTALL_HINT = "pip install 'igd[timm]'"


def load_timm(name: str, weights: Path | None) -> ModelParts:
    """timm's architecture ``name`` (``resnet18``, or with a pretrained tag such as
    ``convnext_tiny.fb_in22k_ft_in1k``: the tag picks the data config), its classifier
    sized by the head in ``weights``, and the preprocessing timm's own eval transform
    (``timm.data.create_transform(**resolve_data_config({}, model=m))``) applies."""
    try:
        import timm
    except ImportError:
        raise ModelError(f"--model timm:{name} needs the timm library: {INSTALL_HINT}") from None
    name = name.strip()
    config = _check_name(timm, name)
    if weights is None:
        raise ModelError(f"timm:{name} needs --weights FILE; igd never downloads weights")
    path = Path(weights)
    state = tensor_dict(_read_weights(path), path, f"a state dict of timm's {name}")
    state = strip_prefix(strip_prefix(state), "_orig_mod.")  # DataParallel's, then torch.compile's wrapper
    num_classes = _head_size(timm, name, config, state)
    # With num_classes None (no head found in the file) timm's default is built, and
    # load_strict below says which keys the file lacks and holds instead.
    module = _build(timm, name, {} if num_classes is None else {"num_classes": num_classes})
    load_strict(module, state, path, f"timm's {name}" + ("" if num_classes is None else f" with {num_classes} classes"))
    from timm.data import resolve_data_config

    return ModelParts(
        module,
        preprocessing_from(resolve_data_config({}, model=module), name),
        None,
        name=f"timm:{name}",
        family="timm",
        description=f"timm {name}",
        source=str(path),
    )


def preprocessing_from(config: Mapping[str, Any], name: str) -> Preprocessing:
    """igd's Preprocessing equal to timm's eval transform for the data config ``config``
    (input_size, interpolation, crop_pct, crop_mode, mean, std).

    timm's crop modes: ``center`` resizes the shorter side to floor(size / crop_pct)
    (non-square inputs: its ResizeKeepRatio) and centre-crops: igd's ``crop`` with
    ``crop_pct``; ``squash`` resizes both sides to floor(size / crop_pct) and centre-crops:
    igd's ``stretch`` with ``crop_pct``. ``border`` (scale the longer side, pad with the
    mean colour) igd cannot reproduce, and refuses rather than approximate."""
    channels, height, width = (int(v) for v in config["input_size"])
    interpolation = str(config.get("interpolation") or "bilinear")
    crop_pct = float(config.get("crop_pct") or 0.875)  # timm's DEFAULT_CROP_PCT for None
    crop_mode = config.get("crop_mode") or "center"  # timm's default for None
    mean = tuple(float(v) for v in config["mean"])
    std = tuple(float(v) for v in config["std"])
    refuse = f"timm:{name}: igd cannot reproduce timm's eval transform for it exactly"
    if channels != 3 or len(mean) != 3 or len(std) != 3:
        raise ModelError(f"timm:{name} takes {channels}-channel input; igd attributes RGB images (3 channels)")
    if interpolation not in INTERPOLATIONS:
        raise ModelError(f"{refuse}: its interpolation {interpolation!r} is not one of {', '.join(INTERPOLATIONS)}")
    if crop_mode not in ("center", "squash"):
        raise ModelError(f"{refuse}: its crop_mode {crop_mode!r} is not 'center' or 'squash'")
    try:
        return Preprocessing(
            (height, width),
            mean,
            std,
            resize="crop" if crop_mode == "center" else "stretch",
            crop_pct=crop_pct,
            interpolation=interpolation,
            origin=f"timm data config ({name})",
        )
    except ValueError as error:
        raise ModelError(f"timm:{name}: its data config {dict(config)} is not usable: {error}") from None


def _read_weights(path: Path) -> Any:
    """``read_checkpoint``, also taking timm's own training checkpoints (train.py's
    ``model_best.pth.tar``): they keep the run's argparse.Namespace under 'args', a plain
    attribute bag that weights-only loading may build without running code. The weights
    are those under 'state_dict' (not 'state_dict_ema'), as timm's validate.py loads them."""
    allow = getattr(torch.serialization, "safe_globals", None)  # torch >= 2.5
    with allow([argparse.Namespace]) if allow else contextlib.nullcontext():
        return read_checkpoint(path)


def _check_name(timm: Any, name: str) -> Any:
    """timm's pretrained config of ``name``, a registered architecture with an optional
    pretrained tag (None for an architecture without one); else a ModelError with the
    names the user may have meant. Hub ids and paths (which timm would fetch or read
    configs from) are refused: igd reads only --weights."""
    if not name:
        raise ModelError("--model timm:NAME needs an architecture name, e.g. timm:resnet18 (see timm.list_models())")
    if any(c in name for c in ":/\\"):
        raise ModelError(
            f"timm:{name}: give a timm architecture name (timm.list_models(), e.g. timm:resnet18) and the "
            "weights with --weights FILE; hub ids and paths are not read (igd never downloads)"
        )
    arch, _, tag = name.partition(".")
    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=5, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else "; timm.list_models() lists them"
        raise ModelError(f"timm:{name}: timm has no architecture {arch!r}{hint}")
    try:
        return timm.models.get_pretrained_cfg(name)
    except RuntimeError:  # timm: "Invalid pretrained tag"
        known = [n.partition(".")[2] for n in timm.list_pretrained(f"{arch}.*")]
        listing = ", ".join(known[:8]) + (f" and {len(known) - 8} more" if len(known) > 8 else "")
        hint = f"its tags: {listing}" if known else f"it has none: use timm:{arch}"
        raise ModelError(f"timm:{name}: {arch} has no pretrained tag {tag!r} ({hint})") from None


def _head_size(timm: Any, name: str, config: Any, state: Mapping[str, Tensor]) -> int | None:
    """The number of classes of the classifier head in ``state`` (its key from timm's
    pretrained config 'classifier', e.g. fc, head.fc, classifier, head); None when the
    file holds no such head."""
    if config is not None:
        heads = config.classifier
    else:  # an architecture without pretrained configs: ask a default build
        heads = _build(timm, name, {}).pretrained_cfg.get("classifier")
    heads = (heads,) if isinstance(heads, str) else tuple(heads or ())
    sizes = [int(state[f"{head}.weight"].shape[0]) for head in heads if f"{head}.weight" in state]
    return sizes[0] if sizes else None


def _build(timm: Any, name: str, options: dict[str, Any]) -> Any:
    """``timm.create_model(name, pretrained=False, **options)``: random weights, no download."""
    try:
        return timm.create_model(name, pretrained=False, **options)
    except Exception as error:  # noqa: BLE001 - timm raises many kinds for a bad build
        raise ModelError(f"timm could not build {name}: {_first_line(error)}") from None


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
