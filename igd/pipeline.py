"""The steps of a request's path, which the daemon, `igd batch` and `igd check` each take in turn.

    bytes --decode--> image --prepare--> engine inputs --job--> Worker --answer--> result

An :class:`~igd.request.AttributeRequest` (validated by igd.request wherever it came from)
and a decoded image become a :class:`~igd.worker.Job`; the worker's result becomes an
:class:`Answer`: the result dict, the bytes of its file, a heatmap, and the facts every
entry point reports. Each step raises :class:`~igd.request.RequestFailed` in the stable
error vocabulary; entry points keep only what is theirs (the socket, the dataset, the
self-test) and turn failures into wire errors or status rows.
"""

from __future__ import annotations

import contextlib
import datetime
import math
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any, BinaryIO, Iterator, Union

from PIL import Image
import torch
from torch import Tensor

from igd.engine import faithfulness
from igd.engine.accuracy import completeness_gap
from igd.engine.baselines import Paths, make_paths
from igd.engine.faithfulness import Curves
from igd.output.heatmap import canvas as heatmap_canvas
from igd.output.heatmap import drawing_bytes, heatmap_grid_png
from igd.imaging import ImageError, ImageHeader, ImageTooLarge, decode_image
from igd.imaging import probe as probe_image
from igd.models import LoadedModel, UnknownClass
from igd.output.provenance import ComputeFacts, now, provenance
from igd.protocol import BAD_IMAGE, BAD_REQUEST, IMAGE_TOO_LARGE, INTERNAL, OVERLOADED, SHUTTING_DOWN, UNKNOWN_TARGET
from igd.request import TARGET, AttributeRequest, RequestError, RequestFailed, check_targets
from igd.output.results import Result, combined_result_dict, encode, idgi_of, result_dict, write_result
from igd.worker import (
    AttributionSlice,
    ComputeFailed,
    Attribute,
    Forward,
    JobListener,
    PassCancelled,
    QueueFull,
    WorkerClosed,
    WorkerError,
)


def decode(data: bytes, max_pixels: int) -> Image.Image:
    """The RGB image in ``data``; ``bad_image`` or ``image_too_large`` otherwise."""
    with _image_errors(max_pixels):
        return decode_image(data, max_pixels=max_pixels)


def probe(data: bytes, max_pixels: int) -> ImageHeader:
    """The header of the image in ``data`` (size and mode, no pixels decoded): what
    decoding it will cost; the errors of :func:`decode`."""
    with _image_errors(max_pixels):
        return probe_image(data, max_pixels=max_pixels)


@contextlib.contextmanager
def _image_errors(max_pixels: int) -> Iterator[None]:
    try:
        yield
    except ImageTooLarge as error:
        raise RequestFailed(IMAGE_TOO_LARGE, str(error), {"max_pixels": max_pixels}) from None
    except ImageError as error:
        raise RequestFailed(BAD_IMAGE, str(error)) from None


Targets = Union[int, tuple[int, ...], None]  # one class, several, or the predicted class (or top_k)


def resolve_targets(model: LoadedModel, target: Any, top_k: int | None = None) -> Targets:
    """The class indices ``target`` names: a name or an index (one int), a list of them (a
    tuple of ints, or one int for a list of one), or None: the predicted class, or the
    ``top_k`` most likely."""
    try:
        checked = check_targets(target, top_k)
    except RequestError as error:
        raise error.failed() from None
    classes = len(model.class_names)
    if top_k is not None and top_k > classes:
        raise RequestFailed(BAD_REQUEST, f"args.top_k must be at most {classes}, the model's classes, got {top_k}",
                            {"arg": "top_k"})
    if checked is None:
        return None
    try:
        indices = tuple(model.class_index(item) for item in checked)
    except UnknownClass as error:
        raise RequestFailed(UNKNOWN_TARGET, str(error), {"num_classes": len(model.class_names)}) from None
    if len(set(indices)) != len(indices):
        names = ", ".join(repr(model.class_names[i]) for i in indices)
        raise RequestFailed(BAD_REQUEST, f"args.target names a class twice: {names}", {"arg": TARGET.name})
    return indices[0] if len(indices) == 1 else indices


@dataclass(frozen=True)
class Prepared:
    """An image ready for the engine: its paths in the model's input space (igd.engine.baselines),
    and, only if a heatmap will be drawn, the photo to draw it on (igd.output.heatmap.canvas: at
    most MAX_SIDE pixels on its longer side)."""

    paths: Paths
    image: Image.Image | None

    @property
    def inputs(self) -> Tensor:
        """(1, C, H, W): the image in input space."""
        return self.paths.inputs

    @property
    def baseline(self) -> Tensor:
        """(P, C, H, W): the paths' starts."""
        return self.paths.starts


def prepare(image: Image.Image, request: AttributeRequest, model: LoadedModel) -> Prepared:
    return Prepared(make_paths(image, model.preprocessing, request), heatmap_canvas(image) if request.heatmap else None)


@dataclass(frozen=True)
class Footprint:
    """The most memory one request holds at once, known before anything runs, by part
    (bytes): decoding its image, the attribution (path points, per-step gradients, the
    result's copies and its encoded file), the faithfulness images, IDGI and the heatmap.
    The parts are added: a bound, not a forecast."""

    image: int = 0
    attribution: int = 0
    metrics: int = 0
    idgi: int = 0
    heatmap: int = 0

    @property
    def total(self) -> int:
        return self.image + self.attribution + self.metrics + self.idgi + self.heatmap

    def parts(self) -> dict[str, int]:
        """The non-zero parts, for error details and logs."""
        return {name: value for name, value in vars(self).items() if value}

    def describe(self) -> str:
        """E.g. "attribution 120 MiB, heatmap 30 MiB"."""
        return ", ".join(f"{name} {value / 2**20:,.0f} MiB" for name, value in self.parts().items())


def footprint(request: AttributeRequest, model: LoadedModel, targets: int = 1,
              image: ImageHeader | None = None) -> Footprint:
    """What one attribution of ``targets`` targets on an image with header ``image`` may
    hold at its largest (igd.serve.ledger reserves it before anything is decoded).

    The attribution: for each path its points and the per-step gradients of each target
    (n_steps x C x H x W float32 each), with several paths the result's copy of those
    gradients, on Blur IG's path its derivative, each (path, target) row's IG and its copies
    of the path's start and end, the few per-path tensors, and the encoded file, which is no
    larger than what it encodes (x2). The faithfulness images of one
    target at a time (and the worker's copy); IDGI's per-row work; the heatmap's drawing
    (igd.output.heatmap.drawing_bytes)."""
    c, h, w = model.input_shape
    plane = c * h * w * 4
    paths, steps = request.paths, request.n_steps
    per_step = paths * (targets + 1) * steps  # gradients of each target and the points, per path
    if paths > 1:
        per_step += targets * paths * steps  # the result's (T, P, n, ...) copy of the gradients
    if request.path != "straight":
        per_step += paths * steps  # the path's derivative at every node
    rows = targets * paths  # (target, path) rows: each has its IG, and its path's start and end repeated
    tensors = (per_step + 3 * rows + 4 * paths) * plane  # and the few per-path tensors
    attribution = 2 * (tensors + 4 * len(model.class_names) * 4 * paths)
    metrics = 2 * 2 * (faithfulness.STEPS + 1) * plane if request.metrics else 0
    idgi = (2 * steps + targets * paths + targets) * plane if request.idgi else 0
    heatmap = 0
    if request.heatmap and image is not None:
        heatmap = drawing_bytes(image.width, image.height, targets)
    return Footprint(image.decoding_bytes() if image is not None else 0, attribution, metrics, idgi, heatmap)


def job(prepared: Prepared, targets: Targets, request: AttributeRequest,
        listener: JobListener | None = None) -> Attribute:
    paths = prepared.paths
    return Attribute(inputs=paths.ends, baseline=paths.starts, target=targets, n_steps=request.n_steps,
                     rule=request.method, tolerance=request.tolerance, listener=listener, top_k=request.top_k,
                     curve=paths.curve, clean=paths.inputs if request.noise else None)


@dataclass(frozen=True)
class TargetFacts:
    """One target's accuracy facts, over the mean of its paths' attributions."""

    index: int
    name: str
    convergence_delta: float  # sum(IG) - (F_t(x) - F_t(b)), both means over the paths
    completeness_gap: float  # the delta relative to the rise (igd.engine.accuracy.completeness_gap)
    error_estimate: float  # the estimated relative L2 error of the mean IG

    def summary(self) -> dict[str, Any]:
        return {"index": self.index, "name": self.name, "convergence_delta": self.convergence_delta,
                "completeness_gap": finite_or_none(self.completeness_gap),
                "error_estimate": finite_or_none(self.error_estimate)}


@dataclass(frozen=True)
class Answer:
    """What one attribution produced: the result file's content and the facts about it.

    One target on one path gives the predecessor's result dict; several targets or paths
    the combined dict (igd.output.results.combined_result_dict)."""

    part: AttributionSlice
    request: AttributeRequest
    model: LoadedModel
    image: Image.Image | None  # for the heatmap
    path_names: tuple[str, ...] = ()
    inputs: Tensor | None = None  # (1, C, H, W): the image in input space
    provenance: dict[str, Any] = field(default_factory=dict)  # igd.output.provenance: what made it
    curves: tuple[Curves, ...] = ()  # the faithfulness curves of each target, once measured (with_metrics)

    @property
    def combined(self) -> bool:
        """Several targets or paths, or a path that does not end at the image (noise)."""
        return self.part.paths > 1 or self.part.width > 1 or self.request.noise > 0

    @property
    def rows(self) -> list[list[int]]:
        """rows[t][p]: the attribution's row of target t on path p."""
        return [[self.part.row(p, t) for p in range(self.part.paths)] for t in range(self.part.width)]

    @property
    def target_index(self) -> int:
        return self.targets[0].index

    @property
    def target_name(self) -> str:
        return self.targets[0].name

    @cached_property
    def targets(self) -> list[TargetFacts]:
        return [self._facts_of(rows) for rows in self.rows]

    @cached_property
    def prediction(self) -> tuple[int, str, float]:
        """(index, name, probability) of the most likely class of the input."""
        (top,) = self.model.top_classes(self.logits, 1)
        return top

    @property
    def logits(self) -> Tensor:
        """(K,): the logits at the image."""
        part = self.part
        return part.logits if part.logits is not None else part.attribution.logits[part.index]

    @property
    def convergence_delta(self) -> float:
        return self.targets[0].convergence_delta

    @property
    def error_estimate(self) -> float:
        return self.targets[0].error_estimate

    @property
    def completeness_gap(self) -> float:
        return self.targets[0].completeness_gap

    def _facts_of(self, rows: list[int]) -> TargetFacts:
        attribution = self.part.attribution
        target = int(attribution.targets[rows[0]])
        if len(rows) == 1:  # the engine's own figures, as they always were
            delta = float(attribution.convergence_delta[rows[0]])
            estimate = float(attribution.error_estimate[rows[0]])
        else:
            integrated = attribution.integrated_grads[rows].double()
            mean = integrated.mean(dim=0)
            sizes = integrated.flatten(1).norm(dim=1)
            estimates = attribution.error_estimate[rows]
            size = float(mean.norm())
            # The paths share their nodes, so their errors need not be independent: add them.
            absolute = torch.where(sizes > 0, estimates * sizes, torch.where(estimates > 0, math.inf, 0.0))
            estimate = float(absolute.sum()) / len(rows) / size if size else math.inf
        ends = attribution.logits[rows, target].double()
        starts = attribution.baseline_logits[rows, target].double()
        rise = float((ends - starts).mean())
        if len(rows) > 1:
            delta = float(mean.sum()) - rise
        scale = float(torch.cat([ends, starts]).abs().max())
        eps = float(torch.finfo(attribution.logits.dtype).eps)
        return TargetFacts(target, self.model.class_names[target], delta,
                           completeness_gap(delta, rise, scale, eps), estimate)

    def result(self, defer_intermediates: bool = False) -> Result:
        """The result dict (the predecessor's keys and igd's additions)."""
        attribution, request = self.part.attribution, self.request
        if not self.combined:
            result = result_dict(attribution, self.part.index, model=self.model.name, target_name=self.target_name,
                                 baseline_name=request.baseline, defer_intermediates=defer_intermediates)
            result.update(max_batch=self.part.max_batch, completeness_gap=self.completeness_gap)
            if request.idgi:
                result["idgi"] = idgi_of(attribution, self.rows)[0]
        else:
            assert self.inputs is not None
            result = combined_result_dict(
                attribution, self.rows, inputs=self.inputs, logits=self.logits, noisy=request.noise > 0,
                model=self.model.name, target_names=[t.name for t in self.targets], baseline_name=request.baseline,
                path_names=list(self.path_names), defer_intermediates=defer_intermediates)
            result["convergence_delta"] = torch.tensor([t.convergence_delta for t in self.targets])
            result["completeness_gap"] = torch.tensor([t.completeness_gap for t in self.targets])
            result["error_estimate"] = torch.tensor([t.error_estimate for t in self.targets])
            if request.idgi:
                result["idgi"] = idgi_of(attribution, self.rows)
            result["max_batch"] = self.part.max_batch
        if request.samples > 1 or request.noise:
            result.update(samples=request.samples, noise=request.noise)
        index, name, probability = self.prediction
        result.update(prediction_index=index, prediction_name=name, prediction_probability=probability)
        result.update(self._metric_keys())
        result.update(self.provenance)
        return result

    def _metric_keys(self) -> dict[str, Any]:
        """``metric_fractions`` (STEPS + 1,), and per metric asked for its curve and area:
        (STEPS + 1,) and a float, or with a target axis (T, STEPS + 1) and (T,)."""
        if not self.curves:
            return {}
        keys: dict[str, Any] = {"metric_fractions": self.curves[0].fractions.float()}
        for metric in self.request.metrics:
            curve = torch.stack([getattr(c, metric) for c in self.curves]).float()
            areas = [getattr(c, f"{metric}_area") for c in self.curves]
            keys[f"{metric}_curve"] = curve if self.combined else curve[0]
            keys[f"{metric}_area"] = torch.tensor(areas) if self.combined else areas[0]
        return keys

    def metric_areas(self, target: int = 0) -> dict[str, float]:
        """{metric: area} of a target's curves, for the metrics asked for."""
        if not self.curves:
            return {}
        return {metric: getattr(self.curves[target], f"{metric}_area") for metric in self.request.metrics}

    def mean_attributions(self) -> list[Tensor]:
        """Each target's IG, the mean over its paths: (C, H, W) each."""
        attribution = self.part.attribution
        return [attribution.integrated_grads[rows].mean(dim=0) for rows in self.rows]

    def file_bytes(self) -> bytes:
        """The result file in the request's format, exactly what igctl writes."""
        return encode(self.result(), self.request.format, self.request.gzip_level)

    def write_file(self, out: BinaryIO) -> None:
        """Write the result file to ``out`` as it is made (the same bytes as
        :meth:`file_bytes`), at the least memory: the path points are made only when
        their turn comes, and each large tensor is freed once written, so this answer
        (its per-step gradients included) is unusable afterwards."""
        write_result(self.result(defer_intermediates=True), self.request.format, self.request.gzip_level, out,
                     consume=True)

    def heatmap_png(self) -> bytes | None:
        """The heatmap over the image: one panel per target, side by side, of the mean IG."""
        if self.image is None:
            return None
        return heatmap_grid_png(self.mean_attributions(), self.image, self.model.preprocessing,
                                [t.name for t in self.targets] if self.combined else None)

    def summary(self) -> dict[str, Any]:
        """The facts an entry point reports beside the file (wire result, JSON lines, rows)."""
        index, name, probability = self.prediction
        attribution = self.part.attribution
        first = self.targets[0]
        summary = {
            "target": {"index": first.index, "name": first.name},
            "prediction": {"index": index, "name": name, "probability": probability},
            "convergence_delta": first.convergence_delta,
            "completeness_gap": finite_or_none(first.completeness_gap),
            "error_estimate": finite_or_none(first.error_estimate),
            "baseline": self.request.baseline,
            "n_steps": attribution.n_steps,
            "method": attribution.rule,
        }
        if self.curves:
            summary["metrics"] = self.metric_areas()
        if self.combined:
            summary["targets"] = [t.summary() for t in self.targets]
            if self.curves:
                for i, facts in enumerate(summary["targets"]):
                    facts["metrics"] = self.metric_areas(i)
            summary["paths"] = self.part.paths
        if self.request.path != "straight":
            summary["path"] = self.request.path
        if attribution.tolerance is not None:
            summary.update(tolerance=attribution.tolerance, tolerance_met=attribution.tolerance_met)
        return summary


def finite_or_none(value: float) -> float | None:
    """JSON has no infinity: an unbounded estimate is reported as null."""
    return value if math.isfinite(value) else None


def answer(part: AttributionSlice, request: AttributeRequest, model: LoadedModel, prepared: Prepared,
           compute: ComputeFacts = ComputeFacts(), created: datetime.datetime | None = None) -> Answer:
    """The answer to ``request`` on ``prepared``, with its provenance (``created``: when the
    request arrived; default now)."""
    facts = provenance(model, request, compute, created or now())
    return Answer(part, request, model, prepared.image, prepared.paths.names, prepared.inputs, facts)


def metric_jobs(answer: Answer) -> Iterator[Forward]:
    """The forward passes of the faithfulness curves (igd.engine.faithfulness), one job per
    target, each made only when the previous one is done with (a target's images are
    2 (STEPS + 1) images; all targets at once would be 16 times that); none when the
    request asks for no metrics. The fill is the first path's start."""
    if not answer.request.metrics:
        return
    assert answer.inputs is not None
    fill = answer.part.attribution.baselines[answer.part.row()]
    for ig in answer.mean_attributions():
        yield Forward(inputs=faithfulness.perturbed(answer.inputs[0], fill, ig))


def with_metrics(answer: Answer, logits: list[Tensor]) -> Answer:
    """``answer`` with its curves, from the logits (2 (STEPS + 1), K) of each of
    :func:`metric_jobs`' jobs."""
    curves = tuple(faithfulness.curves(target_logits, facts.index)
                   for target_logits, facts in zip(logits, answer.targets, strict=True))
    return replace(answer, curves=curves)


def worker_failure(error: WorkerError) -> RequestFailed:
    """A worker's refusal or failure, in the request vocabulary."""
    if isinstance(error, QueueFull):
        return RequestFailed(OVERLOADED, str(error))
    if isinstance(error, WorkerClosed):
        return RequestFailed(SHUTTING_DOWN, str(error))
    if isinstance(error, PassCancelled):  # while someone still waits for it: igd is stopping
        return RequestFailed(SHUTTING_DOWN, f"the daemon is shutting down: {error}")
    reason = error.reason if isinstance(error, ComputeFailed) else type(error).__name__
    return RequestFailed(INTERNAL, str(error), {"error": reason})
