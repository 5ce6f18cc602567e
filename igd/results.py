"""The result file: the predecessor's dict of tensors, gzip'd ``torch.save`` or ``.npz``.

Readers of the predecessor's files do::

    with gzip.open(path, "rb") as f:
        result = torch.load(BytesIO(f.read()))  # weights_only=True works

Keys are only ever added, never renamed or removed (the key table in README.md).
"""

from __future__ import annotations

import gzip
import io
from typing import Any

import numpy as np
import torch
from torch import Tensor

from igd.attribution import Attribution
from igd.request import DEFAULT_GZIP_LEVEL, FORMATS


# The predecessor's keys, which its users' analysis code reads.
PREDECESSOR_KEYS = (
    "integrated_grads",
    "integrated_directional_grads",
    "step_sizes",
    "intermediates",
    "output",
    "target_class",
)

Result = dict[str, Any]


def result_dict(
    attribution: Attribution,
    index: int = 0,
    *,
    model: str | None = None,
    target_name: str | None = None,
    baseline_name: str = "zero",
) -> Result:
    """The result dict of image ``index`` of a batch attribution.

    Shapes for an input of C x H x W, K classes and n steps: ``integrated_grads``,
    ``input`` and ``baseline`` (1, C, H, W); ``integrated_directional_grads`` and
    ``intermediates`` (n, C, H, W); ``step_sizes`` (n, 1); ``alphas`` (n,);
    ``output`` and ``baseline_output`` (1, K); all float32 on the CPU, each with storage
    of its own (``torch.save`` of a view would write the whole batch).
    """
    if not 0 <= index < attribution.inputs.shape[0]:
        raise IndexError(f"index {index} out of range for a batch of {attribution.inputs.shape[0]}")
    one = slice(index, index + 1)
    result: Result = {
        "integrated_grads": _own(attribution.integrated_grads[one]),
        "integrated_directional_grads": _own(attribution.directional_grads[index]),
        "step_sizes": _own(attribution.step_sizes.view(-1, 1)),
        "intermediates": _own(attribution.intermediates[index]),
        "output": _own(attribution.logits[one]),
        "target_class": int(attribution.targets[index]),
        "alphas": _own(attribution.alphas),
        "input": _own(attribution.inputs[one]),
        "baseline": _own(attribution.baselines[one]),
        "baseline_output": _own(attribution.baseline_logits[one]),
        "convergence_delta": float(attribution.convergence_delta[index]),
        "method": attribution.method,
        "n_steps": attribution.n_steps,
        "baseline_name": baseline_name,
    }
    if model is not None:
        result["model"] = model
    if target_name is not None:
        result["target_name"] = target_name
    return result


def _own(tensor: Tensor) -> Tensor:
    return tensor.detach().to("cpu", torch.float32).clone(memory_format=torch.contiguous_format)


def encode(result: Result, fmt: str = "torch", gzip_level: int = DEFAULT_GZIP_LEVEL) -> bytes:
    """The bytes of a result file in ``fmt`` (one of :data:`FORMATS`)."""
    if fmt == "torch":
        return encode_torch(result, gzip_level)
    if fmt == "npz":
        return encode_npz(result)
    raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")


def encode_torch(result: Result, compresslevel: int = DEFAULT_GZIP_LEVEL) -> bytes:
    """gzip(torch.save(result)); ``mtime=0`` makes equal results give equal bytes.

    Gradients compress poorly: measured on EfficientNet-Lite0's 62 MB result, level 1
    gave 39 MB in 1.6 s, level 6 37 MB in 4.0 s, level 0 (stored, still gzip) 62 MB in
    0.06 s. Level 1 is the default; requests may ask for another."""
    buffer = io.BytesIO()
    torch.save(result, buffer)
    return gzip.compress(buffer.getvalue(), compresslevel=compresslevel, mtime=0)


def encode_npz(result: Result) -> bytes:
    """An uncompressed ``.npz`` with the same keys; scalars and strings as 0-d arrays,
    so ``numpy.load`` reads it without ``allow_pickle``."""
    arrays = {
        key: value.numpy() if isinstance(value, Tensor) else np.asarray(value)
        for key, value in result.items()
    }
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def decode_torch(data: bytes) -> Result:
    """Read a torch result file's bytes the way the predecessor's users do."""
    with gzip.open(io.BytesIO(data), "rb") as f:
        return torch.load(io.BytesIO(f.read()), weights_only=True)
