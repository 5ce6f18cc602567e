"""The models igd serves: the predecessor's BiT and LaNet checkpoints, the built-in
EfficientNet-Lite0, and the user's own (timm, Hugging Face, torchvision, TorchScript, torch.export)."""

from igd.models.checkpoints import ModelError
from igd.models.preprocessing import Preprocessing
from igd.models.registry import (
    CIFAR10_CLASSES,
    DEFAULT_MODEL,
    LoadedModel,
    UnknownClass,
    load_model,
    resolve_device,
)

__all__ = [
    "CIFAR10_CLASSES",
    "DEFAULT_MODEL",
    "LoadedModel",
    "ModelError",
    "Preprocessing",
    "UnknownClass",
    "load_model",
    "resolve_device",
]
