"""The single compute thread: it alone owns the model and the device.

Requests wait in one bounded queue. Each pass takes the oldest job and every queued job
it can share a pass with (:meth:`Job.batch_key`: the same kind of job, and for attributions the
same n_steps, rule, number of targets and path; adaptive ones the same number of
targets, whatever their tolerances and caps, which are per image like baselines), up to
``max_images`` and ``max_pass_bytes`` of results. Jobs that arrive while a
pass runs are batched into the next one, so batching costs no waiting. Every image gets
exactly the result it would get alone: the model runs in eval mode, so images in a pass
do not interact.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, TypeVar

import torch
from torch import Tensor

from igd.engine.adaptive import attribute_adaptive
from igd.engine.attribution import Attribution, AttributionSlice, attribute, strict_float32
from igd.engine.paths import STRAIGHT, Curve
from igd.output.provenance import ComputeFacts
from igd.request import target_count
from igd.logs import log
from igd.engine.memory import memory_budget, release_free_memory, resident_growth
from igd.models import LoadedModel
from igd.tuning.search import saved_bytes_per_point
from igd.tuning.warmup import WarmUp, warm_up


T = TypeVar("T")

# Progress reports of one job come at most this often (and once at its end).
PROGRESS_INTERVAL_S = 0.25


class JobListener(Protocol):
    """What a job's submitter hears of it, called from the worker's threads."""

    def queued(self, ahead: int) -> None:
        """The job waits behind ``ahead`` others (0: it runs next)."""

    def progress(self, done: int, total: int) -> None:
        """``done`` of the job's ``total`` path points are computed."""


class WorkerError(Exception):
    """Why the worker did not give a job its result; the message is for people. The
    daemon turns these into wire errors, `igd batch` into status rows."""


class QueueFull(WorkerError):
    """The queue holds ``queue_size`` jobs already."""


class WorkerClosed(WorkerError):
    """The worker is stopping: it takes no new jobs, and drops the queued ones."""


class ComputeFailed(WorkerError):
    """The model failed on the job (``reason``: ``out_of_memory`` or the exception's
    type; the traceback is logged)."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class PassCancelled(WorkerError):
    """Every job of a pass was cancelled; the pass stopped between chunks."""


@dataclass(frozen=True)
class ComputeSettings:
    """How the worker computes, as `igd serve`, `igd batch` and `igd check` set it."""

    max_batch: int | None = None  # path points per forward pass; None: measured at warm-up (or cached)
    remeasure: bool = False  # with max_batch None: measure even if a measurement is cached
    memory_format: str = "contiguous"  # or channels_last (igd.tuning.warmup.MEMORY_FORMATS)
    precision: str = "float32"  # or tf32 (igd.tuning.warmup.PRECISIONS)
    compile: bool = False  # torch.compile (inductor) the model at warm-up
    max_images: int = 32  # most jobs batched into one pass
    queue_size: int = 64  # jobs waiting before submit() raises QueueFull


@dataclass(eq=False, kw_only=True)
class Job:
    """One request's work for the compute thread, on the CPU in input space; a kind of job
    (:class:`Classify`, :class:`Forward`, :class:`Attribute`) says what a pass of it does.

    ``cancel()`` (from any thread) withdraws it: a queued job is never run, and a pass
    whose jobs are all cancelled stops at its next chunk."""

    inputs: Tensor
    listener: JobListener | None = None
    future: concurrent.futures.Future[Any] = field(default_factory=concurrent.futures.Future)
    batch_size: int = 0  # set by the worker: images in the pass that served this job
    queued_s: float = 0.0
    compute_s: float = 0.0
    _cancelled: threading.Event = field(default_factory=threading.Event)
    _last_report: float = 0.0

    def cancel(self) -> None:
        self._cancelled.set()
        self.future.cancel()  # succeeds only while it is still queued

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def batch_key(self) -> tuple[Any, ...]:
        """Jobs with equal keys may share a pass."""
        return (type(self),)

    def result_bytes(self) -> int:
        """Memory a pass holds for this job."""
        return self.inputs.numel() * self.inputs.element_size()


@dataclass(eq=False, kw_only=True)
class Classify(Job):
    """The logits (K,) of one image ``inputs`` (1, C, H, W)."""


@dataclass(eq=False, kw_only=True)
class Forward(Job):
    """The logits (N, K) of N images ``inputs`` (N, C, H, W), without gradients."""


@dataclass(eq=False, kw_only=True)
class Attribute(Job):
    """One image's attribution: ``inputs`` (P, C, H, W) the ends of its P paths,
    ``baseline`` their starts; answered by an :class:`AttributionSlice`."""

    baseline: Tensor
    target: int | tuple[int, ...] | None = None  # None: the predicted class (or the top_k)
    n_steps: int = 50  # with a tolerance: the cap
    rule: str = "gausslegendre"
    tolerance: float | None = None  # adaptive steps to this estimated error (igd.engine.adaptive)
    top_k: int | None = None  # with no target: the k most likely classes
    curve: Curve = STRAIGHT
    clean: Tensor | None = None  # (1, C, H, W): the image, when the paths end elsewhere (noise)

    def report(self, fraction: float) -> None:
        """Tell the listener that ``fraction`` of the job's pass is done (rate-limited)."""
        now = time.monotonic()
        if self.listener is None or (fraction < 1.0 and now - self._last_report < PROGRESS_INTERVAL_S):
            return
        self._last_report = now
        self.listener.progress(round(fraction * self.n_steps), self.n_steps)

    @property
    def width(self) -> int:
        """Targets per path."""
        return target_count(self.target, self.top_k)

    def targets(self, logits: Tensor | None) -> list[int]:
        """The job's targets, given the logits (K,) at its image when it has none of its own."""
        if isinstance(self.target, int):
            return [self.target]
        if isinstance(self.target, tuple):
            return list(self.target)
        assert logits is not None
        return logits.topk(self.width).indices.tolist() if self.top_k else [int(logits.argmax())]

    def batch_key(self) -> tuple[Any, ...]:
        if self.tolerance is not None:
            return (Attribute, "adaptive", self.width)
        return (Attribute, self.n_steps, self.rule, self.width, self.curve)

    def result_bytes(self) -> int:
        """Its path points and their gradients."""
        return (self.width + 1) * self.n_steps * self.inputs.numel() * self.inputs.element_size()


class Worker:
    """Owns the model; runs queued jobs in batched passes on one thread."""

    @classmethod
    def warmed_up(cls, model: LoadedModel, settings: ComputeSettings,
                  report: Callable[[str], None] = lambda step: None) -> Worker:
        """A started worker for ``model``, after the warm-up every entry point shares
        (memory format, chunk size, a first attribution; see igd.tuning.warmup.warm_up)."""
        found = warm_up(model, settings.max_batch, settings.memory_format, settings.precision, report,
                        remeasure=settings.remeasure, compile=settings.compile)
        if found.compiled is not None:
            model = dataclasses.replace(model, module=found.compiled)
        worker = cls(model, max_batch=found.max_batch, max_images=settings.max_images, queue_size=settings.queue_size,
                     max_pass_bytes=memory_budget(model.device) // 4, allow_tf32=settings.precision == "tf32")
        worker.warm_up = found
        worker.compute_facts = ComputeFacts(settings.precision, settings.memory_format, found.compiler,
                                            found.chunk_source)
        worker.start()
        return worker

    def __init__(
        self,
        model: LoadedModel,
        *,
        max_batch: int,
        max_images: int = 32,
        queue_size: int = 64,
        max_pass_bytes: int = 2 << 30,
        allow_tf32: bool = False,
    ) -> None:
        self.model = model
        self.allow_tf32 = allow_tf32  # CUDA may use TF32 (see igd.tuning.warmup.PRECISIONS)
        self.max_batch = max_batch  # path points per forward pass
        self.max_images = max_images
        self.max_pass_bytes = max_pass_bytes  # a pass's path points and gradients, all images
        self.queue_size = queue_size
        self._queue: collections.deque[tuple[Job, float]] = collections.deque()
        self._cond = threading.Condition()
        self._closed = False
        self._busy = False
        self._running: list[Job] = []  # the pass in progress
        self._thread = threading.Thread(target=self._run, name="igd-compute", daemon=True)
        self.passes = 0
        self.images = 0
        self.batch_sizes: collections.Counter[int] = collections.Counter()
        self.oom_retries = 0
        self.split_passes = 0  # shared passes that failed and were rerun one image at a time
        self.warm_up: WarmUp | None = None  # what warm-up found, when warmed_up() made this worker
        self.compute_facts = ComputeFacts("tf32" if allow_tf32 else "float32")  # recorded in every result
        self.compute_s = 0.0

    def start(self) -> None:
        self._thread.start()

    def working_set(self) -> int:
        """The host memory one pass of ``max_batch`` path points takes (its activations,
        saved for the backward, and gradients), measured by running one; 0 on a GPU, where
        they live in device memory. Call before serving: other work would count too."""
        if self.model.device.type != "cpu":
            return 0
        sample = torch.zeros(1, *self.model.input_shape)
        job = Attribute(inputs=sample, baseline=torch.zeros_like(sample), target=0, n_steps=max(self.max_batch, 2))
        grown = resident_growth(lambda: self.submit(job).result())
        if grown is None:  # no /proc to measure with: autograd's saved tensors, and as much again
            grown = 2 * self.max_batch * saved_bytes_per_point(self.model.module, sample)
        return grown

    def submit(self, job: Job) -> concurrent.futures.Future[Any]:
        with self._cond:
            if self._closed:
                raise WorkerClosed("the worker is stopping; no new work is accepted")
            if len(self._queue) >= self.queue_size:
                raise QueueFull(f"the queue is full ({self.queue_size} requests waiting); try again shortly")
            self._queue.append((job, time.monotonic()))
            ahead = len(self._queue) - 1 + self._busy
            self._cond.notify()
        if job.listener is not None:
            job.listener.queued(ahead)
        return job.future

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    def close(self) -> None:
        """Accept no new jobs; queued ones still run (see :meth:`drain`)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def drain(self, timeout: float) -> int:
        """Wait up to ``timeout`` s for queued and running work to finish, then fail what
        is still queued with :class:`WorkerClosed` (the daemon answers it ``shutting_down``).
        Returns how many jobs were rejected."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while (self._queue or self._busy) and time.monotonic() < deadline:
                self._cond.wait(timeout=max(0.0, min(0.1, deadline - time.monotonic())))
            rejected = list(self._queue)
            self._queue.clear()
        error = WorkerClosed("the worker stopped before this job could run")
        for job, _ in rejected:
            if job.future.set_running_or_notify_cancel():
                job.future.set_exception(error)
        return len(rejected)

    def cancel_running(self) -> int:
        """Cancel every job of the pass in progress: it stops at its next chunk. Returns
        how many were cancelled. For shutdown, after :meth:`drain`."""
        with self._cond:
            running = list(self._running)
        for job in running:
            job.cancel()
        return len(running)

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the thread to end (after :meth:`close`, once the queue is empty; None:
        however long the pass in progress needs). A thread left inside PyTorch at
        interpreter exit aborts the process."""
        if self._thread.is_alive():
            self._thread.join(timeout)
        return not self._thread.is_alive()

    def stats(self) -> dict[str, Any]:
        return {
            "passes": self.passes,
            "images": self.images,
            "batched_passes": sum(n for size, n in self.batch_sizes.items() if size > 1),
            "largest_batch": max(self.batch_sizes, default=0),
            "batch_sizes": {str(size): n for size, n in sorted(self.batch_sizes.items())},
            "max_batch_points": self.max_batch,
            "chunk_source": self.warm_up.chunk_source if self.warm_up else "given",
            "chunk_search": self.warm_up.chunk.to_json() if self.warm_up and self.warm_up.chunk else None,
            "max_images": self.max_images,
            "max_pass_bytes": self.max_pass_bytes,
            "oom_retries": self.oom_retries,
            "split_passes": self.split_passes,
            "compute_s": round(self.compute_s, 3),
        }

    def _run(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            with self._cond:
                self._running = batch
            try:
                self._run_batch(batch)
            finally:
                with self._cond:
                    self._running = []
                    self._busy = False
                    idle = not self._queue
                    self._cond.notify_all()
            if idle:
                release_free_memory()

    def _next_batch(self) -> list[Job] | None:
        """The oldest job and the queued jobs compatible with it; None once closed and empty."""
        with self._cond:
            while not self._queue:
                if self._closed:
                    return None
                self._cond.wait()
            first, queued_at = self._queue.popleft()
            picked = [(first, queued_at)]
            key = first.batch_key()
            budget = self.max_pass_bytes - first.result_bytes()
            for item in list(self._queue):
                if len(picked) >= self.max_images:
                    break
                if item[0].batch_key() == key and item[0].result_bytes() <= budget:
                    self._queue.remove(item)
                    picked.append(item)
                    budget -= item[0].result_bytes()
            self._busy = True
            waiting = [job for job, _ in self._queue if job.listener is not None]
        for ahead, job in enumerate(waiting, start=1):  # the pass now picked runs first
            job.listener.queued(ahead)  # type: ignore[union-attr]
        now = time.monotonic()
        live = []
        for job, queued in picked:
            # False: the client gave up while the job was queued.
            if not job.cancelled and job.future.set_running_or_notify_cancel():
                job.queued_s = now - queued
                live.append(job)
        return live

    def _run_batch(self, jobs: list[Job]) -> None:
        if not jobs:
            return
        if len(jobs) == 1:
            self._run_alone(jobs[0])
            return
        started = time.perf_counter()
        try:
            results = self._compute(jobs)
        except PassCancelled as cancelled:
            self._cancelled(jobs, cancelled)
            return
        except Exception as error:  # noqa: BLE001 - one request's failure must not end the daemon
            log("pass_split", level=30, images=len(jobs), error=type(error).__name__,
                note="the shared pass failed; each image runs alone")
            results = None
        if results is None:
            # Find the culprit: every other image still gets its result. Outside the except
            # block, so that the failed pass's tensors (held by the traceback) are freed:
            # after an out-of-memory error they are what the single runs need.
            self.split_passes += 1
            for job in jobs:
                self._run_alone(job)
            return
        elapsed = time.perf_counter() - started
        self.passes += 1
        self.images += len(jobs)
        self.batch_sizes[len(jobs)] += 1
        self.compute_s += elapsed
        for job, result in zip(jobs, results):
            job.batch_size = len(jobs)
            job.compute_s = elapsed
            _settle(job, result)

    def _run_alone(self, job: Job) -> None:
        started = time.perf_counter()
        try:
            (result,) = self._compute([job])
        except PassCancelled as cancelled:
            self._cancelled([job], cancelled)
            return
        except Exception as error:  # noqa: BLE001
            log("compute_failed", level=40, exc_info=True, job=type(job).__name__, error=type(error).__name__)
            job.future.set_exception(_internal(error))
            return
        elapsed = time.perf_counter() - started
        self.passes += 1
        self.images += 1
        self.batch_sizes[1] += 1
        self.compute_s += elapsed
        job.batch_size, job.compute_s = 1, elapsed
        _settle(job, result)

    def _cancelled(self, jobs: list[Job], cancelled: PassCancelled) -> None:
        log("pass_cancelled", images=len(jobs), reason=str(cancelled))
        for job in jobs:
            job.future.set_exception(cancelled)

    def _compute(self, jobs: list[Job]) -> list[Any]:
        device = self.model.device
        inputs = (jobs[0].inputs if len(jobs) == 1 else torch.cat([job.inputs for job in jobs])).to(device)
        if isinstance(jobs[0], Classify):
            logits = self._logits(inputs)
            return [logits[i] for i in range(len(jobs))]
        if isinstance(jobs[0], Forward):
            logits = self._logits(inputs)
            bounds = torch.tensor([0, *(len(job.inputs) for job in jobs)]).cumsum(0).tolist()
            return [logits[start:stop] for start, stop in zip(bounds, bounds[1:])]
        return self._attributions(inputs, jobs)  # type: ignore[arg-type]

    def _attributions(self, inputs: Tensor, jobs: list[Attribute]) -> list[AttributionSlice | ComputeFailed]:
        """One pass over the paths of every job: ``inputs`` (sum of P, C, H, W) on the device."""
        device = self.model.device
        job_logits = self._image_logits(jobs)
        job_targets = [job.targets(logits) for job, logits in zip(jobs, job_logits)]
        targets = [ts for job, ts in zip(jobs, job_targets) for _ in range(len(job.inputs))]  # (paths, T)
        baselines = torch.cat([job.baseline for job in jobs]).to(device)
        if jobs[0].tolerance is not None:  # one straight path each (igd.request)
            answers, chunk = self._attribute(lambda max_batch: attribute_adaptive(
                lambda points, _index: self.model.module(points), inputs, job_targets, baselines=baselines,
                tolerance=[job.tolerance for job in jobs], max_steps=[job.n_steps for job in jobs],
                max_batch=max_batch, allow_tf32=self.allow_tf32, modules=[self.model.module], on_chunk=_watch(jobs),
            ), len(jobs))
            for job, answer in zip(jobs, answers):  # its progress ends at the points it took
                if job.listener is not None:
                    job.listener.progress(answer.n_steps, answer.n_steps)
            return [_finite(AttributionSlice(_to_cpu(answer), 0, chunk, width=job.width))
                    for job, answer in zip(jobs, answers)]
        result, chunk = self._attribute(lambda max_batch: attribute(
            self.model.module, inputs, targets, baselines=baselines, n_steps=jobs[0].n_steps,
            rule=jobs[0].rule, max_batch=max_batch, allow_tf32=self.allow_tf32, on_chunk=_watch(jobs),
            curve=jobs[0].curve,
        ), len(jobs))
        cpu = _to_cpu(result)
        del result
        parts, row = [], 0
        for job, logits in zip(jobs, job_logits):
            keep = logits if job.clean is not None else None
            rows = len(job.inputs) * job.width
            # In a shared pass each job gets its rows of its own, freed when its request is answered.
            own = cpu if len(jobs) == 1 else cpu.rows(row, row + rows)
            parts.append(_finite(AttributionSlice(own, 0, chunk, len(job.inputs), job.width, keep)))
            row += rows
        return parts

    def _image_logits(self, jobs: list[Attribute]) -> list[Tensor | None]:
        """The logits (K,) at each job's image, for the jobs that need them: to find their
        targets, or because their paths do not end at the image (noise). One forward for all."""
        wanted = [i for i, job in enumerate(jobs) if job.target is None or job.clean is not None]
        found: list[Tensor | None] = [None] * len(jobs)
        if wanted:
            images = torch.cat([jobs[i].clean if jobs[i].clean is not None else jobs[i].inputs[:1] for i in wanted])
            for i, row in zip(wanted, self._logits(images.to(self.model.device))):
                found[i] = row
        return found

    def _logits(self, images: Tensor) -> Tensor:
        """float32 logits (N, K) on the CPU of images (N, C, H, W) on the device, without
        gradients, as many images per call as a pass has path points (big batches are slow
        on a CPU)."""
        step = max(self.max_batch, 1)
        with torch.no_grad(), strict_float32(not self.allow_tf32):
            return torch.cat([self.model.module(images[start : start + step]).float().cpu()
                              for start in range(0, len(images), step)])

    def _attribute(self, run: Callable[[int], T], images: int) -> tuple[T, int]:
        """``run(max_batch)``, and the chunk size it ran with. Out of memory with several
        images: raised, so that each image runs alone; with one image: retried in ever
        smaller chunks (for this pass only)."""
        chunk = self.max_batch
        while True:
            try:
                return run(chunk), chunk
            except (torch.cuda.OutOfMemoryError, RuntimeError) as error:
                if not _is_out_of_memory(error) or chunk == 1 or images > 1:
                    raise
            # Here, past the except block, the failed attempt's tensors are released.
            if self.model.device.type == "cuda":
                torch.cuda.empty_cache()
            self.oom_retries += 1
            chunk = max(1, chunk // 2)
            log("out_of_memory", level=30, retry_max_batch=chunk)


def _finite(part: AttributionSlice) -> AttributionSlice | ComputeFailed:
    """The image's result, or ComputeFailed if any of it is NaN or infinite (never a
    success that nobody can use)."""
    attribution, rows = part.attribution, slice(part.index, part.row(part.paths - 1, part.width - 1) + 1)
    for name, tensor in (("IG", attribution.integrated_grads[rows]), ("the per-step gradients",
                         attribution.directional_grads[rows]), ("the logits", attribution.logits[rows]),
                         ("the logits along the path", attribution.path_logits[rows])):
        if not _all_finite(tensor):
            log("non_finite", level=30, where=name)
            return ComputeFailed(f"{name} of this image are not finite (NaN or infinity): the model or the "
                                 "baseline overflowed", "non_finite")
    return part


def _all_finite(tensor: Tensor, block: int = 1 << 22) -> bool:
    """torch.isfinite(tensor).all(), a block at a time: isfinite makes an abs() copy and
    two masks as large as its input, 1.5x a maximal answer's gradients at once."""
    flat = tensor.reshape(-1)
    return all(bool(torch.isfinite(flat[start : start + block]).all()) for start in range(0, len(flat), block))


def _settle(job: Job, result: Any) -> None:
    if isinstance(result, Exception):
        job.future.set_exception(result)
    else:
        job.future.set_result(result)


def _watch(jobs: list[Attribute]) -> Callable[[int, int], None]:
    """The engine's per-chunk callback for a pass over ``jobs``: reports progress, and
    stops the pass (PassCancelled) once nobody wants any of its results."""

    def on_chunk(done: int, total: int) -> None:
        if all(job.cancelled for job in jobs):
            raise PassCancelled(f"the pass was cancelled after {done} of {total} path points")
        for job in jobs:
            job.report(done / total)

    return on_chunk


def _is_out_of_memory(error: BaseException) -> bool:
    text = str(error)
    return isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in text or "can't allocate memory" in text


def _internal(error: BaseException) -> ComputeFailed:
    if _is_out_of_memory(error):
        return ComputeFailed("out of memory even one path point at a time", "out_of_memory")
    return ComputeFailed(f"the model failed on this image ({type(error).__name__}; logged)", type(error).__name__)


def _to_cpu(result: Attribution) -> Attribution:
    moved = {
        f.name: getattr(result, f.name).cpu()
        for f in dataclasses.fields(result)
        if isinstance(getattr(result, f.name), Tensor)
    }
    return dataclasses.replace(result, **moved)
