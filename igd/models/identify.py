"""What a model file is, told by its content, never by its name.

A user's file may be a TorchScript archive, a ``torch.export`` archive, a state dict
(``torch.save(model.state_dict())``), a training checkpoint (a dict holding one under
``model_state_dict`` / ``state_dict`` / ``model``), a safetensors file, or a Hugging Face
``save_pretrained`` directory, whatever its extension. :func:`identify` says which, so
each mistake can be answered with what the file is and the flag that takes it.

Nothing untrusted is unpickled: archives are told apart by their member names, safetensors
by its header, and torch pickles are opened only with ``torch.load(weights_only=True)``
(memory-mapped where the format allows), which refuses anything but tensors and plain data.
"""

from __future__ import annotations

import json
import pickle
import re
import struct
import warnings
import zipfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

MISSING = "missing"
EMPTY = "empty"
HF_DIRECTORY = "huggingface directory"  # a save_pretrained directory (config.json)
DIRECTORY = "directory"  # any other directory
TORCHSCRIPT = "torchscript"
TORCH_EXPORT = "torch.export"
STATE_DICT = "state dict"  # a torch file holding name -> tensor
CHECKPOINT = "training checkpoint"  # a torch file holding a state dict under a wrapper key
SAFETENSORS = "safetensors"
TORCH_OBJECTS = "torch objects"  # a torch pickle that weights-only loading refuses (e.g. torch.save(model))
TORCH_OTHER = "torch other"  # a torch file holding something else (a tensor, a list, a dict without tensors)
TORCH_FILE = "torch file"  # a torch.save file not looked inside (identify(..., look_inside=False))
UNKNOWN = "unknown"

WEIGHTS = (STATE_DICT, CHECKPOINT, SAFETENSORS)  # what --weights takes
PROGRAMS = (TORCHSCRIPT, TORCH_EXPORT)  # what --model FILE takes
WRAPPER_KEYS = ("model_state_dict", "state_dict", "model")  # where training scripts keep the weights

_ZIP = b"PK\x03\x04"
_PICKLE = b"\x80"  # PROTO: torch's legacy (non-zip) format is a sequence of pickles
_SAFETENSORS_HEADER_MAX = 100_000_000  # the format's own limit on the JSON header


@dataclass(frozen=True)
class FileKind:
    """What a path holds: ``kind`` (one of this module's constants) and ``what``, the same
    for people, e.g. "a state dict (62 tensors)" or "a TorchScript archive"."""

    kind: str
    what: str
    tensors: int = 0  # tensors in a state dict / checkpoint / safetensors file
    wrapper: str = ""  # CHECKPOINT: the key holding the weights

    @property
    def is_weights(self) -> bool:
        return self.kind in WEIGHTS

    @property
    def is_program(self) -> bool:
        return self.kind in PROGRAMS


def identify(path: Path, *, look_inside: bool = True) -> FileKind:
    """What ``path`` holds, by its content. ``look_inside=False`` leaves a ``torch.save`` file
    unopened (kind TORCH_FILE): for callers that load it next anyway."""
    path = Path(path)
    if path.is_dir():
        if (path / "config.json").is_file():
            return FileKind(HF_DIRECTORY, "a Hugging Face save_pretrained directory")
        return FileKind(DIRECTORY, "a directory")
    try:
        with path.open("rb") as f:
            head = f.read(8)
            size = path.stat().st_size
            if not head:
                return FileKind(EMPTY, "an empty file")
            if len(head) == 8 and (header := _safetensors_header(f, head, size)) is not None:
                count = sum(1 for key in header if key != "__metadata__")
                return FileKind(SAFETENSORS, f"a safetensors file ({count} tensors)", tensors=count)
    except FileNotFoundError:
        return FileKind(MISSING, "no such file")
    except OSError as error:
        return FileKind(UNKNOWN, f"an unreadable file ({error.strerror or error})")
    if head.startswith(_ZIP):
        return _zip_kind(path, look_inside)
    if head.startswith(_PICKLE):
        return _torch_kind(path, mmap=False) if look_inside else FileKind(TORCH_FILE, "a PyTorch file")
    return FileKind(UNKNOWN, "neither a PyTorch file nor a safetensors file")


def _safetensors_header(f, head: bytes, size: int) -> dict | None:  # noqa: ANN001 - a binary file
    """The JSON header of a safetensors file (8-byte little-endian length, then JSON), or None."""
    (length,) = struct.unpack("<Q", head)
    if not 2 <= length <= min(size - 8, _SAFETENSORS_HEADER_MAX):
        return None
    first = f.read(1)
    if first != b"{":
        return None
    try:
        header = json.loads(first + f.read(length - 1))
    except (UnicodeDecodeError, ValueError):
        return None
    return header if isinstance(header, dict) else None


def _zip_kind(path: Path, look_inside: bool) -> FileKind:
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError):
        return FileKind(UNKNOWN, "a damaged or non-PyTorch zip archive")
    inner = {name.split("/", 1)[1] for name in names if "/" in name}
    if any(name.startswith("code/") for name in inner) or "constants.pkl" in inner:
        return FileKind(TORCHSCRIPT, "a TorchScript archive")
    if "archive_format" in inner or "models/model.json" in inner or "serialized_exported_program.json" in inner:
        return FileKind(TORCH_EXPORT, "a torch.export archive")
    if "data.pkl" in inner:
        return _torch_kind(path, mmap=True) if look_inside else FileKind(TORCH_FILE, "a PyTorch file")
    return FileKind(UNKNOWN, "a zip archive that PyTorch did not write")


def _torch_kind(path: Path, *, mmap: bool) -> FileKind:
    """A ``torch.save`` file, opened with weights-only loading (never a full unpickle)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. "Detected pickle protocol 4": the verdict says enough
            value = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as error:
        found = re.search(r"GLOBAL ([\w.]+)", str(error))
        if found:
            return FileKind(TORCH_OBJECTS, f"a pickle of Python objects ({found.group(1)}, ...), not plain tensors")
        return FileKind(UNKNOWN, "a pickle that is not a PyTorch tensor file")
    except Exception:  # noqa: BLE001 - a damaged file fails inside torch in many ways
        return FileKind(UNKNOWN, "a damaged or unreadable PyTorch file")
    return kind_of(value)


def kind_of(value: object) -> FileKind:
    """What a value read from a torch file is: a state dict, a training checkpoint, or other."""
    if isinstance(value, Mapping):
        for key in WRAPPER_KEYS:
            inner = value.get(key)
            if isinstance(inner, Mapping) and (count := _tensor_count(inner)):
                return FileKind(CHECKPOINT, f"a training checkpoint (weights under {key!r}, {count} tensors)",
                                tensors=count, wrapper=key)
        if count := _tensor_count(value):
            return FileKind(STATE_DICT, f"a state dict ({count} tensors)", tensors=count)
        return FileKind(TORCH_OTHER, "a PyTorch file holding a dict without tensors")
    if isinstance(value, Tensor):
        return FileKind(TORCH_OTHER, f"a PyTorch file holding one tensor of shape {tuple(value.shape)}")
    return FileKind(TORCH_OTHER, f"a PyTorch file holding a {type(value).__name__}")


def _tensor_count(mapping: Mapping) -> int:
    return sum(1 for key, value in mapping.items() if isinstance(key, str) and isinstance(value, Tensor))


# Key layouts of state dicts that torchvision's architectures never have: (test, what it looks like).
_PREFIX = re.compile(r"^[A-Za-z_]\w*\.(embeddings|embedder)\.")


def foreign_layout(keys: Iterable[str], *, weights: str = "FILE") -> str | None:
    """Whose state dict this looks like when it does not fit a torchvision architecture: a
    sentence naming the flag that takes it (``weights``: the file, for the sentence), or None.
    A cheap look at a few telltale keys, worded as a guess, which is all it is."""
    keys = set(keys)

    def starts(prefix: str) -> bool:
        return any(key.startswith(prefix) for key in keys)

    if "conv_stem.weight" in keys and starts("blocks."):
        timm = "EfficientNet / MobileNet layout ('conv_stem', 'blocks'), e.g. efficientnet_b0, mobilenetv3_large_100"
    elif "cls_token" in keys and "patch_embed.proj.weight" in keys:
        timm = ("vision transformer layout ('cls_token', 'patch_embed'), "
                "e.g. vit_base_patch16_224, deit_small_patch16_224")
    elif "patch_embed.proj.weight" in keys and starts("layers."):
        timm = "Swin layout ('patch_embed', 'layers'), e.g. swin_tiny_patch4_window7_224"
    elif "stem.0.weight" in keys and starts("stages."):
        timm = "ConvNeXt layout ('stem.0', 'stages'), e.g. convnext_tiny"
    elif (starts("stem.") and starts("stages.")) or "head.fc.weight" in keys:
        timm = "layout ('stem', 'stages', 'head.fc')"
    else:
        timm = ""
    if timm:
        return (f"looks like a timm model (timm's {timm}): use --model timm:NAME --weights {weights}, "
                "NAME the architecture it was saved from")
    if any(_PREFIX.match(key) for key in keys):
        return ("looks like the weights of a Hugging Face model ('<model>.embeddings' keys): pass its "
                "save_pretrained directory (config.json beside the weights): --model DIR")
    return None
