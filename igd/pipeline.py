"""The one path of an attribution, which the daemon, `igd batch` and `igd check` all take.

    bytes --probe--> header --reserve--> --decode, prepare--> paths --Attribute job--> Worker
          --> AttributionSlice --answer--> Answer (--Forward jobs--> faithfulness curves)

:class:`Pipeline` holds what every step needs (the model, the compute worker, a thread
pool for the work that must not run where requests are read) and turns (image bytes,
request) into an :class:`~igd.output.answer.Answer` in one call, or a classification.
An :class:`~igd.request.AttributeRequest` comes validated by igd.request, wherever it
came from. Each step raises :class:`~igd.request.RequestFailed` in the stable error
vocabulary; entry points keep only what is theirs (the socket, the dataset, the
self-test) and turn failures into wire errors or status rows.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import datetime
import time
from dataclasses import dataclass, replace
from typing import Any, BinaryIO, Callable, Iterator, Protocol, TypeVar, Union

from PIL import Image
from torch import Tensor

from igd.engine import faithfulness, xrai
from igd.engine.baselines import Paths, make_paths
from igd.engine.paths import PATH_KINDS
from igd.imaging import ImageError, ImageHeader, ImageTooLarge, decode_image
from igd.imaging import probe as probe_image
from igd.models import LoadedModel, UnknownClass
from igd.output.answer import Answer
from igd.output.figure import drawing_bytes
from igd.output.provenance import now
from igd.output.results import mean_integrated_grads
from igd.protocol import BAD_IMAGE, BAD_REQUEST, IMAGE_TOO_LARGE, INTERNAL, OVERLOADED, SHUTTING_DOWN, UNKNOWN_TARGET
from igd.request import TARGET, AttributeRequest, RequestError, RequestFailed, check_targets, target_count
from igd.worker import (
    Attribute,
    Classify,
    ComputeFailed,
    Forward,
    Job,
    JobListener,
    PassCancelled,
    QueueFull,
    Worker,
    WorkerClosed,
    WorkerError,
)

T = TypeVar("T")


class Budget(Protocol):
    """A request's share of a memory budget (igd.serve.ledger.Reservation): ``admit``
    raises RequestFailed when ``needed`` does not fit."""

    def admit(self, needed: Footprint) -> None: ...


@dataclass(frozen=True)
class Pipeline:
    """The steps of a request for one model: ``await pipeline.attribute(data, request, target)``.

    ``pool`` runs decoding, preparing, the faithfulness images and encoding, so that the
    caller's thread (the daemon's event loop) only waits; ``max_pixels`` bounds decoding."""

    model: LoadedModel
    worker: Worker
    pool: concurrent.futures.Executor
    max_pixels: int

    async def attribute(self, data: bytes, request: AttributeRequest, target: Any = None, *,
                        budget: Budget | None = None, listener: JobListener | None = None,
                        notes: dict[str, Any] | None = None, created: datetime.datetime | None = None) -> Answer:
        """The answer to ``request`` on the image in ``data`` for ``target`` (a name, an
        index, a list of them; None: the predicted class, or the top_k). Before decoding,
        ``budget`` admits what the request will hold at most; ``listener`` hears its job's
        queue and progress; ``notes`` collects facts for the log line (image, timings,
        batch size); ``created``: when the request arrived (default now).
        :meth:`ready` then :meth:`answer`, in one call."""
        notes = {} if notes is None else notes
        ready = await self.ready(data, request, target, budget=budget, notes=notes)
        del data
        return await self.answer(ready, listener=listener, notes=notes, created=created)

    async def ready(self, data: bytes, request: AttributeRequest, target: Any = None, *,
                    budget: Budget | None = None, notes: dict[str, Any] | None = None) -> Ready:
        """The request ready for the worker: its targets resolved, its memory admitted,
        its image decoded into paths (`igd batch` readies all of its pairs before any
        job is submitted, so that they share passes in its order, whatever decoded first)."""
        notes = {} if notes is None else notes
        model = self.model
        targets, needed = await self._off_loop(plan, data, request, target, model, self.max_pixels)
        if budget is not None:
            budget.admit(needed)
        notes.update(target=targets, **request.log_fields())
        # Decoding hands the image straight to the paths: the photo is not kept.
        paths = await self._decoded(data, notes, lambda image: make_paths(image, model.preprocessing, request))
        return Ready(request, targets, paths)

    async def answer(self, ready: Ready, *, listener: JobListener | None = None,
                     notes: dict[str, Any] | None = None, created: datetime.datetime | None = None) -> Answer:
        """The answer to a :meth:`ready` request: its job is submitted at once (before this
        coroutine first waits), then its faithfulness jobs and XRAI's regions, if asked for."""
        notes = {} if notes is None else notes
        request, paths = ready.request, ready.paths
        part = await self._computed(job(paths, ready.targets, request, listener), notes)
        answer = Answer(part, request, self.model, paths.names, paths.inputs,
                        self.worker.compute_facts, created or now())
        del part, paths, ready
        if request.metrics:  # each target's images are made in the pool, the next once its pass is done
            jobs, logits = metric_jobs(answer), []
            while (metric_job := await self._off_loop(next, jobs, None)) is not None:
                logits.append(await self._computed(metric_job, {}))
            answer = await self._off_loop(with_metrics, answer, logits)  # each target's facts: not on the loop
        if request.regions:  # segmenting and ranking: seconds of CPU, in the pool
            answer = await self._off_loop(with_regions, answer)
        return answer

    async def classify(self, data: bytes, top: int, *, budget: Budget | None = None,
                       notes: dict[str, Any] | None = None) -> list[tuple[int, str, float]]:
        """The ``top`` most likely classes of the image in ``data``: (index, name, probability)."""
        notes = {} if notes is None else notes
        header = await self._off_loop(probe, data, self.max_pixels)
        if budget is not None:
            budget.admit(Footprint(image=header.decoding_bytes()))
        inputs = await self._decoded(data, notes, self.model.preprocessing)
        del data
        logits = await self._computed(Classify(inputs=inputs), notes)
        return self.model.top_classes(logits, top)

    async def delivered(self, answer: Answer, out: BinaryIO) -> dict[str, Any]:
        """Write ``answer``'s result file to ``out`` (which may block: in the pool) and
        return what is reported beside it: its facts and, if asked for, the heatmap. The
        answer is spent afterwards (igd.output.answer.Answer.write_file)."""

        def written() -> dict[str, Any]:
            reported: dict[str, Any] = {"format": answer.request.format, **answer.summary()}
            if answer.request.heatmap:
                reported["heatmap_png"] = answer.heatmap_png()
            answer.write_file(out)
            return reported

        return await self._off_loop(written)

    async def _decoded(self, data: bytes, notes: dict[str, Any], then: Callable[[Image.Image], T]) -> T:
        """Decode the image and apply ``then`` to it in the pool; only what ``then``
        returns outlives the call."""
        started = time.perf_counter()
        notes["image_bytes"] = len(data)
        max_pixels = self.max_pixels

        def decode_and_prepare() -> tuple[str, T]:
            image = decode(data, max_pixels)
            return f"{image.width}x{image.height}", then(image)

        notes["image"], prepared = await self._off_loop(decode_and_prepare)
        notes["decode_ms"] = _ms(time.perf_counter() - started)
        return prepared

    async def _computed(self, job: Job, notes: dict[str, Any]) -> Any:
        """``job``'s result from the worker; a cancelled wait (the client left, a
        deadline) withdraws the job."""
        try:
            result = await asyncio.wrap_future(self.worker.submit(job))
        except WorkerError as error:
            raise worker_failure(error) from None
        except asyncio.CancelledError:
            job.cancel()
            raise
        notes.update(queue_ms=_ms(job.queued_s), compute_ms=_ms(job.compute_s), batch_size=job.batch_size)
        return result

    async def _off_loop(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 1)


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


def plan(data: bytes, request: AttributeRequest, target: Any, model: LoadedModel,
         max_pixels: int) -> tuple[Targets, Footprint]:
    """The classes ``target`` names (:func:`resolve_targets`) and the most memory the
    request will hold (:func:`footprint`), from the image's header alone: nothing decoded."""
    targets = resolve_targets(model, target, request.top_k)
    header = probe(data, max_pixels)
    return targets, footprint(request, model, target_count(targets, request.top_k), header)


@dataclass(frozen=True)
class Ready:
    """A request ready for the worker (:meth:`Pipeline.ready`)."""

    request: AttributeRequest
    targets: Targets
    paths: Paths


@dataclass(frozen=True)
class Footprint:
    """The most memory one request holds at once, known before anything runs, by part
    (bytes): decoding its image, the attribution (path points, per-step gradients, the
    result's copies and its encoded file), the faithfulness images, IDGI, the heatmap and XRAI's regions.
    The parts are added: a bound, not a forecast."""

    image: int = 0
    attribution: int = 0
    metrics: int = 0
    idgi: int = 0
    heatmap: int = 0
    regions: int = 0

    @property
    def total(self) -> int:
        return self.image + self.attribution + self.metrics + self.idgi + self.heatmap + self.regions

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
    gradients, on a path that needs it (Blur IG's) its derivative, each (path, target) row's IG and its copies
    of the path's start and end, the few per-path tensors, and the encoded file, which is no
    larger than what it encodes (x2). The faithfulness images of one
    target at a time (and the worker's copy); IDGI's per-row work; the heatmap's drawing
    (igd.output.figure.drawing_bytes: the model's input, scaled up); XRAI's masks and maps
    (igd.engine.xrai.working_bytes)."""
    c, h, w = model.input_shape
    plane = c * h * w * 4
    paths, steps = request.paths, request.n_steps
    per_step = paths * (targets + 1) * steps  # gradients of each target and the points, per path
    if paths > 1:
        per_step += targets * paths * steps  # the result's (T, P, n, ...) copy of the gradients
    if PATH_KINDS[request.path].needs_derivative:
        per_step += paths * steps  # the path's derivative at every node
    rows = targets * paths  # (target, path) rows: each has its IG, and its path's start and end repeated
    tensors = (per_step + 3 * rows + 4 * paths) * plane  # and the few per-path tensors
    attribution = 2 * (tensors + 4 * len(model.class_names) * 4 * paths)
    metrics = 2 * 2 * (faithfulness.STEPS + 1) * plane if request.metrics else 0
    idgi = (2 * steps + targets * paths + targets) * plane if request.idgi else 0
    heatmap = drawing_bytes(h, w, targets) if request.heatmap else 0
    regions = xrai.working_bytes(h, w, c, targets) if request.regions else 0
    return Footprint(image.decoding_bytes() if image is not None else 0, attribution, metrics, idgi, heatmap,
                     regions)


def job(paths: Paths, targets: Targets, request: AttributeRequest, listener: JobListener | None = None) -> Attribute:
    """The compute job of ``request`` on ``paths`` (igd.engine.baselines)."""
    return Attribute(inputs=paths.ends, baseline=paths.starts, target=targets, n_steps=request.n_steps,
                     rule=request.method, tolerance=request.tolerance, listener=listener, top_k=request.top_k,
                     curve=paths.curve, clean=paths.inputs if request.noise else None)


def metric_jobs(answer: Answer) -> Iterator[Forward]:
    """The forward passes of the faithfulness curves (igd.engine.faithfulness), one job per
    target, each made only when the previous one is done with (a target's images are
    2 (STEPS + 1) images; all targets at once would be 16 times that); none when the
    request asks for no metrics. The fill is the first path's start."""
    if not answer.request.metrics:
        return
    assert answer.inputs is not None
    fill = answer.attribution.baselines[answer.part.row()]
    for ig in answer.mean_attributions():
        yield Forward(inputs=faithfulness.perturbed(answer.inputs[0], fill, ig))


def with_metrics(answer: Answer, logits: list[Tensor]) -> Answer:
    """``answer`` with its curves, from the logits (2 (STEPS + 1), K) of each of
    :func:`metric_jobs`' jobs."""
    curves = tuple(faithfulness.curves(target_logits, facts.index)
                   for target_logits, facts in zip(logits, answer.targets, strict=True))
    return replace(answer, curves=curves)


def with_regions(answer: Answer) -> Answer:
    """``answer`` with XRAI's regions (igd.engine.xrai) of each target's IG (the mean over its
    paths, as the file's ``xrai_attribution``): the image is segmented once for all targets."""
    assert answer.inputs is not None
    masks = xrai.segments(answer.inputs[0].detach().float().cpu().numpy().transpose(1, 2, 0))
    attributions = mean_integrated_grads(answer.attribution, answer.rows)[:, 0].numpy()  # (T, C, H, W)
    return replace(answer, regions=tuple(xrai.rank_regions(a.max(axis=0), masks) for a in attributions))


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
