"""What made a result, recorded in it: which weights, preprocessing, rule, baseline, precision,
device and software, and when.

Every value is a str, an int, a float or a list of them, so that the torch format loads
with ``weights_only=True`` and the npz format without pickles. A result file can then be
traced back months later: two files with the same ``weights_sha256`` came from the same
weights file, byte for byte, whatever the model was called.
"""

from __future__ import annotations

import datetime
import importlib.metadata
from dataclasses import dataclass
from typing import Any

import torch

from igd import __version__
from igd.models import LoadedModel
from igd.request import OWN_STARTS, AttributeRequest

# From the installed package's metadata: importing torchvision takes seconds, and a daemon
# of most models never needs it.
_TORCHVISION_VERSION = importlib.metadata.version("torchvision")



@dataclass(frozen=True)
class ComputeFacts:
    """How the worker computed: its precision mode, memory format, compiler and where
    its chunk size came from (the size itself is each result's ``max_batch``)."""

    precision: str = "float32"
    memory_format: str = "contiguous"
    compiler: str = "eager"  # or "inductor" (--compile)
    chunk_source: str = "given"  # "given" (--max-batch N), "measured" or "cached"


def provenance(model: LoadedModel, request: AttributeRequest, compute: ComputeFacts,
               created: datetime.datetime) -> dict[str, Any]:
    """The provenance keys of one result (``created``: when the request arrived)."""
    preprocessing = model.preprocessing
    facts: dict[str, Any] = {
        "weights_sha256": model.weights_sha256,
        "model_family": model.family,
        "model_description": model.description,
        "classes_source": model.classes_source,
        "input_size": list(preprocessing.input_size),
        "resize": preprocessing.resize,
        "resize_to": preprocessing.resize_to or 0,  # 0: no separate resize (stretch)
        "mean": list(preprocessing.mean),
        "std": list(preprocessing.std),
        "interpolation": preprocessing.interpolation,
        "crop_pct": preprocessing.crop_pct or 0.0,  # 0.0: no crop fraction (resize_to, or the 0.875 default)
        "preprocessing_source": preprocessing.origin,  # built-in, a sidecar, timm's data config, an HF processor
        "seed": request.seed,
        "precision": compute.precision,
        "memory_format": compute.memory_format,
        "compiler": compute.compiler,
        "chunk_source": compute.chunk_source,
        "device_type": model.device.type,
        "igd_version": __version__,
        "torch_version": str(torch.__version__),  # a str subclass that weights_only loading refuses
        "torchvision_version": _TORCHVISION_VERSION,
        "created": created.astimezone(datetime.timezone.utc).isoformat(timespec="milliseconds"),
    }
    # The blur baseline's one sigma (a path that makes its own start records its own keys: igd.engine.paths).
    if request.path not in OWN_STARTS and "blur" in request.baselines and request.samples == 1:
        facts["blur_sigma"] = request.blur_sigma if request.blur_sigma is not None else min(preprocessing.input_size) / 16
    return facts


def now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)
