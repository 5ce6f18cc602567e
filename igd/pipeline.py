"""The one path of a request, shared by the daemon, `igd batch` and `igd check`.

    bytes --decode--> image --prepare--> engine inputs --job--> Worker --answer--> result

An :class:`~igd.request.AttributeRequest` (validated by igd.request wherever it came from)
and a decoded image become a :class:`~igd.worker.Job`; the worker's result becomes an
:class:`Answer`: the result dict, the bytes of its file, a heatmap, and the facts every
entry point reports. Each step raises :class:`~igd.request.RequestFailed` in the stable
error vocabulary; entry points keep only what is theirs (the socket, the dataset, the
self-test) and turn failures into wire errors or status rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import Any, BinaryIO

from PIL import Image
import torch
from torch import Tensor

from igd.accuracy import completeness_gap
from igd.baselines import inputs_and_baseline
from igd.heatmap import heatmap_png
from igd.imaging import ImageError, ImageTooLarge, decode_image
from igd.models import LoadedModel, UnknownClass
from igd.protocol import BAD_IMAGE, IMAGE_TOO_LARGE, INTERNAL, OVERLOADED, SHUTTING_DOWN, UNKNOWN_TARGET
from igd.request import AttributeRequest, RequestError, RequestFailed, check_target
from igd.results import Result, encode, result_dict, write_result
from igd.worker import (
    AttributionSlice,
    ComputeFailed,
    Job,
    JobListener,
    PassCancelled,
    QueueFull,
    WorkerClosed,
    WorkerError,
)


def decode(data: bytes, max_pixels: int) -> Image.Image:
    """The RGB image in ``data``; ``bad_image`` or ``image_too_large`` otherwise."""
    try:
        return decode_image(data, max_pixels=max_pixels)
    except ImageTooLarge as error:
        raise RequestFailed(IMAGE_TOO_LARGE, str(error), {"max_pixels": max_pixels}) from None
    except ImageError as error:
        raise RequestFailed(BAD_IMAGE, str(error)) from None


def resolve_target(model: LoadedModel, target: Any) -> int | None:
    """The class index ``target`` names (a name, an index, or None: the predicted class)."""
    try:
        checked = check_target(target)
    except RequestError as error:
        raise error.failed() from None
    if checked is None:
        return None
    try:
        return model.class_index(checked)
    except UnknownClass as error:
        raise RequestFailed(UNKNOWN_TARGET, str(error), {"num_classes": len(model.class_names)}) from None


@dataclass(frozen=True)
class Prepared:
    """An image ready for the engine: ``inputs`` and ``baseline`` (1, C, H, W) in the
    model's input space, and the image itself only if a heatmap will be drawn on it."""

    inputs: Tensor
    baseline: Tensor
    image: Image.Image | None


def prepare(image: Image.Image, request: AttributeRequest, model: LoadedModel) -> Prepared:
    inputs, baseline = inputs_and_baseline(
        image, model.preprocessing, request.baseline, blur_sigma=request.blur_sigma, seed=request.seed
    )
    return Prepared(inputs, baseline, image if request.heatmap else None)


def footprint(request: AttributeRequest, model: LoadedModel) -> int:
    """Bytes one attribution may hold at its largest, known before it runs: its path points
    and per-step gradients (n_steps x C x H x W float32 each), the few single-image
    tensors, and the encoded file, which is no larger than what it encodes."""
    c, h, w = model.input_shape
    tensors = (2 * request.n_steps + 4) * c * h * w * 4 + 4 * len(model.class_names) * 4
    return 2 * tensors


def job(prepared: Prepared, target: int | None, request: AttributeRequest,
        listener: JobListener | None = None) -> Job:
    return Job("attribute", prepared.inputs, prepared.baseline, target, request.n_steps, request.method,
               tolerance=request.tolerance, listener=listener)


@dataclass(frozen=True)
class Answer:
    """What one attribution produced: the result file's content and the facts about it."""

    part: AttributionSlice
    request: AttributeRequest
    model: LoadedModel
    image: Image.Image | None  # for the heatmap

    @property
    def target_index(self) -> int:
        return int(self.part.attribution.targets[self.part.index])

    @property
    def target_name(self) -> str:
        return self.model.class_names[self.target_index]

    @cached_property
    def prediction(self) -> tuple[int, str, float]:
        """(index, name, probability) of the most likely class of the input."""
        (top,) = self.model.top_classes(self.part.attribution.logits[self.part.index], 1)
        return top

    @property
    def convergence_delta(self) -> float:
        return float(self.part.attribution.convergence_delta[self.part.index])

    @property
    def error_estimate(self) -> float:
        return float(self.part.attribution.error_estimate[self.part.index])

    @property
    def completeness_gap(self) -> float:
        attribution, i = self.part.attribution, self.part.index
        target = self.target_index
        end, start = float(attribution.logits[i, target]), float(attribution.baseline_logits[i, target])
        eps = float(torch.finfo(attribution.logits.dtype).eps)
        return completeness_gap(self.convergence_delta, end - start, max(abs(end), abs(start)), eps)

    def result(self) -> Result:
        """The result dict (the predecessor's keys and igd's additions)."""
        result = result_dict(self.part.attribution, self.part.index, model=self.model.name,
                             target_name=self.target_name, baseline_name=self.request.baseline)
        result.update(self._facts())
        return result

    def _facts(self) -> dict[str, Any]:
        """The result's keys that the attribution alone does not know."""
        return {"max_batch": self.part.max_batch, "completeness_gap": self.completeness_gap}

    def file_bytes(self) -> bytes:
        """The result file in the request's format, exactly what igctl writes."""
        return encode(self.result(), self.request.format, self.request.gzip_level)

    def write_file(self, out: BinaryIO) -> None:
        """Write the result file to ``out`` as it is made (the same bytes as
        :meth:`file_bytes`), at the least memory: the path points are made only when
        their turn comes, and each large tensor is freed once written, so this answer
        (its per-step gradients included) is unusable afterwards."""
        result = result_dict(self.part.attribution, self.part.index, model=self.model.name,
                             target_name=self.target_name, baseline_name=self.request.baseline,
                             defer_intermediates=True)
        result.update(self._facts())
        write_result(result, self.request.format, self.request.gzip_level, out, consume=True)

    def heatmap_png(self) -> bytes | None:
        if self.image is None:
            return None
        return heatmap_png(self.part.attribution.integrated_grads[self.part.index], self.image,
                           self.model.preprocessing)

    def summary(self) -> dict[str, Any]:
        """The facts an entry point reports beside the file (wire result, JSON lines, rows)."""
        index, name, probability = self.prediction
        attribution = self.part.attribution
        summary = {
            "target": {"index": self.target_index, "name": self.target_name},
            "prediction": {"index": index, "name": name, "probability": probability},
            "convergence_delta": self.convergence_delta,
            "completeness_gap": finite_or_none(self.completeness_gap),
            "error_estimate": finite_or_none(self.error_estimate),
            "baseline": self.request.baseline,
            "n_steps": attribution.n_steps,
            "method": attribution.method,
        }
        if attribution.tolerance is not None:
            summary.update(tolerance=attribution.tolerance, tolerance_met=attribution.tolerance_met)
        return summary


def finite_or_none(value: float) -> float | None:
    """JSON has no infinity: an unbounded estimate is reported as null."""
    return value if math.isfinite(value) else None


def answer(part: AttributionSlice, request: AttributeRequest, model: LoadedModel, prepared: Prepared) -> Answer:
    return Answer(part, request, model, prepared.image)


def worker_failure(error: WorkerError) -> RequestFailed:
    """A worker's refusal or failure, in the request vocabulary."""
    if isinstance(error, QueueFull):
        return RequestFailed(OVERLOADED, str(error))
    if isinstance(error, WorkerClosed):
        return RequestFailed(SHUTTING_DOWN, str(error))
    if isinstance(error, PassCancelled):  # while someone still waits for it: igd is stopping
        return RequestFailed(SHUTTING_DOWN, f"the daemon stopped before this request finished ({error})")
    reason = error.reason if isinstance(error, ComputeFailed) else type(error).__name__
    return RequestFailed(INTERNAL, str(error), {"error": reason})
