"""Reading checkpoints safely and loading them into a module with errors people can act on."""

from __future__ import annotations

import pickle
import struct
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from igd.models.identify import DIRECTORY, EMPTY, HF_DIRECTORY, MISSING, SAFETENSORS, WRAPPER_KEYS, identify

_SHOWN = 5  # how many keys of each kind an error lists


class ModelError(Exception):
    """A model could not be loaded; the message names the file and what did not match."""


def read_checkpoint(path: Path) -> Any:
    """The weights in ``path``, identified by content (igd.models.identify), every failure
    a ModelError: a safetensors file through the safetensors library (a str -> Tensor
    dict), anything else through ``torch.load(path, weights_only=True)`` on the CPU.

    Weights-only loading refuses pickled Python objects, so a malicious checkpoint
    cannot run code here; safetensors holds no code at all.
    """
    kind = identify(path, look_inside=False)
    if kind.kind == SAFETENSORS:
        return read_safetensors(path)
    if kind.kind == MISSING:
        raise ModelError(f"{path}: no such file")
    if kind.kind == HF_DIRECTORY:
        raise ModelError(f"{path}: this is a Hugging Face save_pretrained directory, not a weights file: "
                         f"pass the directory as --model {path}")
    if kind.kind == DIRECTORY:
        raise ModelError(f"{path}: a directory, not a weights file")
    if kind.kind == EMPTY:
        raise ModelError(f"{path}: the file is empty, not a PyTorch checkpoint")
    if path.suffix.lower() == ".safetensors":  # and yet no safetensors header
        raise ModelError(f"{path}: named .safetensors, but not a safetensors file ({kind.what})")
    if kind.is_program:
        raise ModelError(f"{path}: this is {kind.what} (a whole model), not weights: give it as --model {path} "
                         "(with a sidecar beside it), without --weights")
    with path.open("rb") as f:
        head = f.read(4)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if head.startswith(b"PK") or head.startswith(b"\x80"):
            raise ModelError(
                f"{path}: refused: the checkpoint holds Python objects that weights-only "
                f"loading does not allow ({_refused_global(error)}); save plain tensors "
                "with torch.save(model.state_dict(), path)"
            ) from None
        raise ModelError(f"{path}: not a PyTorch checkpoint") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, KeyError, ValueError, IndexError, TypeError,
            AttributeError, OverflowError, MemoryError, struct.error) as error:
        # Garbage that happens to start like a pickle fails inside torch's weights-only
        # unpickler in many ways (e.g. NEWOBJ on an empty stack: IndexError).
        if head.startswith(b"PK"):
            raise ModelError(f"{path}: the checkpoint is truncated or corrupt ({_first_line(error)})") from None
        raise ModelError(f"{path}: not a PyTorch checkpoint ({_first_line(error)})") from None


def read_safetensors(path: Path) -> dict[str, Tensor]:
    """A safetensors file's tensors on the CPU, with the safetensors library (no pickle)."""
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise ModelError(f"{path}: reading safetensors needs the safetensors package "
                         "(pip install safetensors)") from None
    try:
        return load_file(str(path), device="cpu")
    except Exception as error:  # noqa: BLE001 - safetensors raises its own SafetensorError and others
        raise ModelError(f"{path}: a safetensors file that cannot be read ({_first_line(error)})") from None


def tensor_dict(value: Any, path: Path, what: str) -> dict[str, Tensor]:
    """The str -> Tensor state dict in ``value`` (a state dict, or a training checkpoint
    holding one under model_state_dict/state_dict/model), or a ModelError saying what
    the file holds instead."""
    if isinstance(value, Mapping):
        inner = next((value[k] for k in WRAPPER_KEYS if isinstance(value.get(k), Mapping)), None)
        value = inner if inner is not None else value
    if not isinstance(value, Mapping):
        raise ModelError(f"{path}: expected {what}, found a {type(value).__name__}")
    tensors = {k: v for k, v in value.items() if isinstance(k, str) and isinstance(v, Tensor)}
    if not tensors:
        raise ModelError(f"{path}: expected {what}, found a dict without tensors (keys: {_keys(value)})")
    return tensors


def strip_prefix(state_dict: Mapping[str, Tensor], prefix: str = "module.") -> dict[str, Tensor]:
    """Drop ``prefix`` from every key if every key has it (checkpoints saved through DataParallel)."""
    if state_dict and all(key.startswith(prefix) for key in state_dict):
        return {key[len(prefix) :]: value for key, value in state_dict.items()}
    return dict(state_dict)


def load_strict(module: nn.Module, state_dict: Mapping[str, Tensor], path: Path, what: str) -> None:
    """``load_state_dict(strict=True)``, reporting missing, unexpected and mis-shaped keys."""
    expected = module.state_dict()
    missing = [key for key in expected if key not in state_dict]
    unexpected = [key for key in state_dict if key not in expected]
    mismatched = [
        f"{key} {tuple(state_dict[key].shape)} (expected {tuple(value.shape)})"
        for key, value in expected.items()
        if key in state_dict and state_dict[key].shape != value.shape
    ]
    problems = [
        f"{label} {_listing(keys)}"
        for label, keys in (
            ("missing keys:", missing),
            ("unexpected keys:", unexpected),
            ("shape mismatches:", mismatched),
        )
        if keys
    ]
    if problems:
        raise ModelError(f"{path} does not fit {what}: " + "; ".join(problems))
    module.load_state_dict(state_dict, strict=True)


def _listing(items: list[str]) -> str:
    shown = ", ".join(items[:_SHOWN])
    return shown if len(items) <= _SHOWN else f"{shown} and {len(items) - _SHOWN} more"


def _keys(mapping: Mapping[Any, Any]) -> str:
    return _listing([repr(key) for key in mapping])


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _refused_global(error: BaseException) -> str:
    for line in str(error).splitlines():
        if "GLOBAL" in line or "Unsupported" in line:
            return line.strip().rstrip(".")
    return "unsupported pickle content"
