"""The ops of protocol v1: argument checking, decoding, queueing, encoding.

Runs on the event loop; decoding and encoding go to a small thread pool and the model
work to the compute :class:`~igd.worker.Worker`, so the loop never blocks on either.
The service answers from the moment the socket listens: while the model loads and warms
up, ``hello`` and ``status`` report the start-up phase and compute requests wait for
:meth:`Service.serve` to hand over the model.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

import torch
from PIL import Image
from torch import Tensor

from igd import __version__
from igd.attribution import METHODS, quadrature
from igd.baselines import BASELINES, DEFAULT_BASELINE, inputs_and_baseline
from igd.heatmap import heatmap_png
from igd.imaging import DEFAULT_MAX_PIXELS, ImageError, ImageTooLarge, decode_image
from igd.models import LoadedModel, UnknownClass
from igd.protocol import (
    BAD_IMAGE,
    BAD_REQUEST,
    IMAGE_TOO_LARGE,
    OPS,
    OVERLOADED,
    UNKNOWN_TARGET,
    VERSION,
    ProtocolError,
)
from igd.results import DEFAULT_GZIP_LEVEL, FORMATS, encode, result_dict
from igd.worker import AttributionSlice, Job, Worker

T = TypeVar("T")
MAX_TOP = 1000

# Sends one event frame for the request being handled: emit(name, fields). Loop thread only.
Emit = Callable[[str, dict[str, Any]], None]

STARTING, READY = "starting", "ready"


class _EventRelay:
    """A job's listener: forwards the worker's reports (from its threads) as event
    frames of the request, through the event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, emit: Emit) -> None:
        self._loop = loop
        self._emit = emit

    def queued(self, ahead: int) -> None:
        self._loop.call_soon_threadsafe(self._emit, "queued", {"ahead": ahead})

    def progress(self, done: int, total: int) -> None:
        self._loop.call_soon_threadsafe(self._emit, "progress", {"done": done, "total": total})


@dataclass(frozen=True)
class Limits:
    max_frame_bytes: int = 64 * 1024 * 1024
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_steps: int = 1024
    request_timeout: float = 600.0
    idle_timeout: float = 300.0


class Service:
    """Answers ``hello``, ``status``, ``classify`` and ``attribute``.

    Created before the model exists (``phase`` says what start-up is doing); compute
    requests wait until :meth:`serve` hands over the loaded model and its worker."""

    def __init__(self, limits: Limits, *, max_pending: int, started: float | None = None, io_threads: int = 2) -> None:
        self.model: LoadedModel | None = None
        self.worker: Worker | None = None
        self.limits = limits
        self.started = time.monotonic() if started is None else started  # the process's start
        self.phase = "starting"  # what start-up is doing, for people: "loading the model", ...
        self.phase_started = time.monotonic()
        self.served: collections.Counter[str] = collections.Counter()
        self.failed: collections.Counter[str] = collections.Counter()
        self.in_flight = 0
        self.connections = 0
        self.pending = 0  # classify/attribute requests between arrival and answer
        self.max_pending = max_pending
        self._ready = asyncio.Event()
        self._pool = concurrent.futures.ThreadPoolExecutor(io_threads, thread_name_prefix="igd-io")

    @property
    def state(self) -> str:
        return READY if self._ready.is_set() else STARTING

    def set_phase(self, phase: str) -> None:
        """Start-up's progress, e.g. "warming up: measuring chunk size 8" (any thread)."""
        self.phase, self.phase_started = phase, time.monotonic()

    def serve(self, model: LoadedModel, worker: Worker) -> None:
        """Start-up is done: compute requests (waiting ones too) go to ``worker``."""
        self.model, self.worker = model, worker
        self._ready.set()

    def startup_facts(self) -> dict[str, Any]:
        return {"phase": self.phase, "phase_s": round(time.monotonic() - self.phase_started, 1)}

    async def _until_ready(self, emit: Emit | None) -> tuple[LoadedModel, Worker]:
        if not self._ready.is_set():
            if emit is not None:
                emit("starting", self.startup_facts())
            await self._ready.wait()
        assert self.model is not None and self.worker is not None
        return self.model, self.worker

    async def handle(self, op: str, args: dict[str, Any], notes: dict[str, Any], emit: Emit | None = None) -> dict[str, Any]:
        """The result map of one request; ProtocolError for anything the client did wrong.
        ``notes`` collects facts for the request's log line; ``emit`` sends the request's
        event frames (progress), if the client asked for them."""
        handler = {
            "hello": self.hello,
            "status": self.status,
            "classify": self.classify,
            "attribute": self.attribute,
        }.get(op)
        if handler is None:
            raise ProtocolError("unknown_op", f"unknown op {op!r}; this server knows {', '.join(OPS)}", {"ops": list(OPS)})
        if op in ("hello", "status"):
            return await handler(args, notes)
        if not _arg(args, "progress", bool, False):
            emit = None
        # Admission: every compute request holds its image (up to a frame) from arrival to
        # answer, so their number is bounded before any decoding, not only at the queue.
        if self.pending >= self.max_pending:
            raise ProtocolError(
                OVERLOADED,
                f"{self.pending} requests are already in progress; try again shortly",
                {"max_pending": self.max_pending},
            )
        self.pending += 1
        try:
            return await handler(args, notes, emit)
        finally:
            self.pending -= 1

    async def hello(self, args: dict[str, Any], notes: dict[str, Any]) -> dict[str, Any]:
        answer = {
            "protocol": VERSION,
            "server": "igd",
            "version": __version__,
            "state": self.state,
            "capabilities": {
                "ops": list(OPS),
                "methods": list(METHODS),
                "baselines": list(BASELINES),
                "formats": list(FORMATS),
                "heatmap": True,
                "limits": {
                    "max_frame_bytes": self.limits.max_frame_bytes,
                    "max_pixels": self.limits.max_pixels,
                    "max_steps": self.limits.max_steps,
                },
                "events": ["starting", "queued", "progress"],
            },
        }
        if self.model is None:
            answer["startup"] = self.startup_facts()
        else:
            answer["model"] = self._model_facts(with_classes=True)
        return answer

    async def status(self, args: dict[str, Any], notes: dict[str, Any]) -> dict[str, Any]:
        answer: dict[str, Any] = {
            "state": self.state,
            "uptime_s": round(time.monotonic() - self.started, 3),
            "pid": os.getpid(),
            "requests": {
                "served": sum(self.served.values()),
                "failed": sum(self.failed.values()),
                "served_by_op": dict(self.served),
                "failed_by_code": dict(self.failed),
                "in_flight": self.in_flight,
                "pending": self.pending,
                "max_pending": self.max_pending,
            },
            "connections": self.connections,
        }
        if self.model is None or self.worker is None:
            answer["startup"] = self.startup_facts()
            answer["memory"] = {"rss_bytes": _rss_bytes()}
            return answer
        answer.update(
            device=str(self.model.device),
            precision="tf32" if self.worker.allow_tf32 else "float32",
            model=self._model_facts(with_classes=False),
            queue_depth=self.worker.queue_depth,
            queue_size=self.worker.queue_size,
            batching=self.worker.stats(),
            memory=_memory(self.model.device),
        )
        return answer

    async def classify(self, args: dict[str, Any], notes: dict[str, Any], emit: Emit | None) -> dict[str, Any]:
        data = _take_image(args)
        top = _int_arg(args, "top", 5, 1, MAX_TOP)
        model, _worker = await self._until_ready(emit)
        inputs = await self._decoded(data, notes, model.preprocessing)
        del data
        logits = await self._compute(Job("classify", inputs), notes)
        return {
            "top": [
                {"index": index, "name": name, "probability": p}
                for index, name, p in model.top_classes(logits, top)
            ]
        }

    async def attribute(self, args: dict[str, Any], notes: dict[str, Any], emit: Emit | None) -> dict[str, Any]:
        data = _take_image(args)
        n_steps = _int_arg(args, "n_steps", 50, 1, self.limits.max_steps)
        method = _choice_arg(args, "method", "gausslegendre", METHODS)
        try:
            quadrature(method, n_steps)
        except ValueError as error:
            raise ProtocolError(BAD_REQUEST, str(error), {"arg": "n_steps"}) from None
        baseline_name = _choice_arg(args, "baseline", DEFAULT_BASELINE, BASELINES)
        seed = _int_arg(args, "seed", 0, -(2**63), 2**63 - 1)
        blur_sigma = _float_arg(args, "blur_sigma", None, 0.0, 1000.0)
        fmt = _choice_arg(args, "format", "torch", FORMATS)
        gzip_level = _int_arg(args, "gzip_level", DEFAULT_GZIP_LEVEL, 0, 9)
        want_heatmap = _arg(args, "heatmap", bool, False)
        model, _worker = await self._until_ready(emit)
        target = _target(model, args.get("target"))
        notes.update(target=target, n_steps=n_steps, method=method, baseline=baseline_name)

        def prepare(image: Image.Image) -> tuple[Tensor, Tensor, Image.Image | None]:
            inputs, baseline = inputs_and_baseline(
                image, model.preprocessing, baseline_name, blur_sigma=blur_sigma, seed=seed
            )
            # The decoded image (up to max_pixels) is kept only if a heatmap needs it.
            return inputs, baseline, image if want_heatmap else None

        inputs, baseline, image = await self._decoded(data, notes, prepare)
        del data
        listener = None if emit is None else _EventRelay(asyncio.get_running_loop(), emit)
        job = Job("attribute", inputs, baseline, target, n_steps, method, listener=listener)
        part: AttributionSlice = await self._compute(job, notes)
        started = time.perf_counter()

        def finish() -> dict[str, Any]:
            attribution, i = part.attribution, part.index
            target_index = int(attribution.targets[i])
            result = result_dict(
                attribution, i,
                model=model.name,
                target_name=model.class_names[target_index],
                baseline_name=baseline_name,
            )
            answer: dict[str, Any] = {"data": encode(result, fmt, gzip_level), "format": fmt}
            if image is not None:
                answer["heatmap_png"] = heatmap_png(attribution.integrated_grads[i], image, model.preprocessing)
            (index, name, probability), = model.top_classes(attribution.logits[i], 1)
            answer.update(
                target={"index": target_index, "name": model.class_names[target_index]},
                prediction={"index": index, "name": name, "probability": probability},
                convergence_delta=float(attribution.convergence_delta[i]),
                baseline=baseline_name,
                n_steps=n_steps,
                method=method,
            )
            return answer

        answer = await self.in_pool(finish)
        notes["encode_ms"] = _ms(time.perf_counter() - started)
        notes["target"] = answer["target"]["name"]
        answer["timing_ms"] = {k: notes[k] for k in ("decode_ms", "queue_ms", "compute_ms", "encode_ms")}
        answer["timing_ms"]["batch_size"] = notes["batch_size"]
        return answer

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def _decoded(self, data: bytes, notes: dict[str, Any], then: Callable[[Image.Image], T]) -> T:
        """Decode the image and apply ``then`` to it in the I/O pool; only what ``then``
        returns outlives the call."""
        started = time.perf_counter()
        notes["image_bytes"] = len(data)
        max_pixels = self.limits.max_pixels

        def decode_and_prepare() -> tuple[str, T]:
            image = decode_image(data, max_pixels=max_pixels)
            return f"{image.width}x{image.height}", then(image)

        try:
            notes["image"], prepared = await self.in_pool(decode_and_prepare)
        except ImageTooLarge as error:
            raise ProtocolError(IMAGE_TOO_LARGE, str(error), {"max_pixels": max_pixels}) from None
        except ImageError as error:
            raise ProtocolError(BAD_IMAGE, str(error)) from None
        notes["decode_ms"] = _ms(time.perf_counter() - started)
        return prepared

    async def _compute(self, job: Job, notes: dict[str, Any]) -> Any:
        assert self.worker is not None
        future = self.worker.submit(job)
        try:
            result = await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            job.cancel()  # the client left, or the request timed out: stop computing it
            raise
        notes.update(queue_ms=_ms(job.queued_s), compute_ms=_ms(job.compute_s), batch_size=job.batch_size)
        return result

    async def in_pool(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, lambda: fn(*args, **kwargs))

    def _model_facts(self, *, with_classes: bool) -> dict[str, Any]:
        assert self.model is not None
        facts = self.model.summary()
        if not with_classes:
            facts.pop("classes")
        return facts


def _target(model: LoadedModel, value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise ProtocolError(BAD_REQUEST, f"args.target must be a class name, an index or nil, got {type(value).__name__}",
                            {"arg": "target"})
    try:
        return model.class_index(value)
    except UnknownClass as error:
        raise ProtocolError(UNKNOWN_TARGET, str(error), {"num_classes": len(model.class_names)}) from None


def _take_image(args: dict[str, Any]) -> bytes:
    """The image bytes, removed from ``args`` so that the request keeps one reference."""
    data = _arg(args, "image", bytes)
    del args["image"]
    return data


def _arg(args: dict[str, Any], name: str, kind: type, default: Any = ...) -> Any:
    if name not in args or args[name] is None:
        if default is ...:
            raise ProtocolError(BAD_REQUEST, f"args.{name} is required", {"arg": name})
        return default
    value = args[name]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ProtocolError(
            BAD_REQUEST,
            f"args.{name} must be {_kind_name(kind)}, got {type(value).__name__}",
            {"arg": name},
        )
    return value


def _int_arg(args: dict[str, Any], name: str, default: int, low: int, high: int) -> int:
    value = _arg(args, name, int, default)
    if not low <= value <= high:
        raise ProtocolError(BAD_REQUEST, f"args.{name} must be between {low} and {high}, got {value}", {"arg": name})
    return value


def _float_arg(args: dict[str, Any], name: str, default: float | None, low: float, high: float) -> float | None:
    value = _arg(args, name, (int, float), default)
    if value is not None and (isinstance(value, bool) or not low <= value <= high):
        raise ProtocolError(BAD_REQUEST, f"args.{name} must be a number between {low} and {high}, got {value}", {"arg": name})
    return None if value is None else float(value)


def _choice_arg(args: dict[str, Any], name: str, default: str, choices: tuple[str, ...]) -> str:
    value = _arg(args, name, str, default)
    if value not in choices:
        raise ProtocolError(BAD_REQUEST, f"args.{name} must be one of {', '.join(choices)}, got {value!r}", {"arg": name, "choices": list(choices)})
    return value


def _kind_name(kind: type | tuple[type, ...]) -> str:
    names = {bytes: "bytes (msgpack bin)", int: "an int", str: "a string", bool: "a bool", float: "a number"}
    if isinstance(kind, tuple):
        return "a number"
    return names.get(kind, kind.__name__)


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 1)


def _memory(device: torch.device) -> dict[str, int]:
    memory = {"rss_bytes": _rss_bytes()}
    if device.type == "cuda":
        memory["cuda_allocated_bytes"] = torch.cuda.memory_allocated(device)
        memory["cuda_reserved_bytes"] = torch.cuda.memory_reserved(device)
        memory["cuda_peak_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
    return memory


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm", encoding="ascii") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0
