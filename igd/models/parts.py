"""A model as one source reads it, before igd places it on a device and names its classes."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from igd.models.preprocessing import Preprocessing


@dataclass(frozen=True)
class ModelParts:
    """What every model source (igd.models.registry, .custom, .timm_models, .huggingface)
    hands to :func:`~igd.models.registry.load_model`."""

    module: nn.Module  # maps (N, C, H, W) to logits (N, K)
    preprocessing: Preprocessing
    class_names: tuple[str, ...] | None  # None: the registry's fallbacks (--classes, ImageNet, CIFAR-10, indices)
    name: str
    family: str  # bit | lanet | efficientnet-lite | torchscript | torch.export | torchvision | timm | huggingface
    description: str
    source: str  # the file it came from (its SHA-256 is the result's weights_sha256)
    classes_source: str = ""  # where class_names came from, when the source named them
