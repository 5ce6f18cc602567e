"""The ops of protocol v1 on the daemon: wire arguments in, result maps out.

Runs on the event loop; decoding and encoding go to a small thread pool and the model
work to the compute :class:`~igd.worker.Worker`, so the loop never blocks on either.
What an attribution computes is igd.request's and igd.pipeline's, shared with `igd batch`
and `igd check`; this module keeps what is the daemon's: admission, start-up state,
events, timings.

The service answers from the moment the socket listens: while the model loads and warms
up, ``hello`` and ``status`` report the start-up phase and compute requests wait for
:meth:`Service.serve` to hand over the model.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import io
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Protocol, TypeVar

import torch

from igd import __version__
from igd.pipeline import Pipeline
from igd.serve.ledger import Ledger, Reservation
from igd.engine.memory import resident_bytes
from igd.models import LoadedModel
from igd.protocol import (
    BAD_REQUEST,
    COMPUTE_OPS,
    DEFAULT_MAX_FRAME_BYTES,
    OPS,
    OVERLOADED,
    UNKNOWN_OP,
    VERSION,
    Blob,
    shown,
)
from igd.request import (
    ATTRIBUTE_OPTIONS,
    BASELINE,
    CLASSIFY_OPTIONS,
    DEFAULT_CAP,
    DEFAULT_MAX_PIXELS,
    DEFAULT_TOLERANCE,
    FORMAT,
    MAX_STEPS,
    METHOD,
    PATH,
    PROGRESS,
    SAMPLES,
    STREAM,
    TOP,
    TOP_K,
    RequestError,
    RequestFailed,
    parse_attribute,
)
from igd.output.provenance import now
from igd.worker import Worker

T = TypeVar("T")

# Sends one event frame for the request being handled: emit(name, fields). Loop thread only.
Emit = Callable[[str, dict[str, Any]], None]
# The result file is streamed in data events of this size (args.stream).
DATA_EVENT_BYTES = 1 << 20


class Events(Protocol):
    """The event frames of the request being handled (the server's RequestEvents)."""

    def emit(self, name: str, fields: dict[str, Any]) -> None:
        """Post a small event; never waits."""

    async def send(self, name: str, fields: dict[str, Any]) -> bool:
        """Write an event and wait until it is out; False if the client is gone."""

STARTING, READY = "starting", "ready"
EVENTS = ("starting", "queued", "progress", "data")


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
    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_steps: int = MAX_STEPS
    request_timeout: float = 600.0
    idle_timeout: float = 300.0
    max_outstanding: int = 16  # requests of one connection between arrival and written answer
    memory_budget: int = 4 << 30  # bytes all requests together may hold (igd.serve.ledger)


class Service:
    """Answers ``hello``, ``status``, ``classify`` and ``attribute``.

    Created before the model exists (``phase`` says what start-up is doing); compute
    requests wait until :meth:`serve` hands over the loaded model and its worker."""

    def __init__(self, limits: Limits, *, max_pending: int, started: float | None = None, io_threads: int = 2) -> None:
        self.model: LoadedModel | None = None
        self.worker: Worker | None = None
        self.pipeline: Pipeline | None = None  # the path of compute requests, once the model is there
        self.limits = limits
        self.started = time.monotonic() if started is None else started  # the process's start
        self.phase = "starting"  # what start-up is doing, for people: "loading the model", ...
        self.phase_started = time.monotonic()
        self.served: collections.Counter[str] = collections.Counter()  # classify and attribute answered
        self.queries: collections.Counter[str] = collections.Counter()  # hello and status answered
        self.failed: collections.Counter[str] = collections.Counter()
        self.in_flight = 0
        self.connections = 0
        self.pending = 0  # classify/attribute requests between arrival and answer
        self.max_pending = max_pending
        self.ledger = Ledger(limits.memory_budget)
        self._ready = asyncio.Event()
        self._pool = concurrent.futures.ThreadPoolExecutor(io_threads, thread_name_prefix="igd-io")

    @property
    def state(self) -> str:
        return READY if self._ready.is_set() else STARTING

    def set_phase(self, phase: str) -> None:
        """Start-up's progress, e.g. "warming up: measuring chunk size 8" (any thread)."""
        self.phase, self.phase_started = phase, time.monotonic()

    def hold_compute(self, working_set: int) -> None:
        """Hold the compute worker's working set (bytes) in the memory budget for good;
        ValueError if that leaves requests nothing."""
        if working_set >= self.ledger.limit:
            raise ValueError(
                f"one pass of this model takes about {working_set / 2**20:,.0f} MiB, more than the "
                f"{self.ledger.limit / 2**20:,.0f} MiB memory budget (--memory-budget): raise the budget, "
                "or pass fewer path points at a time (--max-batch)")
        self.ledger.hold_compute(working_set)

    def serve(self, model: LoadedModel, worker: Worker) -> None:
        """Start-up is done: compute requests (waiting ones too) go to ``worker``."""
        self.model, self.worker = model, worker
        self.pipeline = Pipeline(model, worker, self._pool, self.limits.max_pixels)
        self._ready.set()

    def startup_facts(self) -> dict[str, Any]:
        return {"phase": self.phase, "phase_s": round(time.monotonic() - self.phase_started, 1)}

    async def handle(self, op: str, args: dict[str, Any], notes: dict[str, Any], events: Events | None = None,
                     reservation: Reservation | None = None) -> dict[str, Any]:
        """The result map of one request; RequestFailed for anything that cannot be
        answered. ``notes`` collects facts for the request's log line; ``events`` sends
        the request's event frames (progress, if asked for with ``args.progress``; the
        result file, with ``args.stream``); ``reservation`` is the request's share of the
        memory budget."""
        if op not in OPS:
            raise RequestFailed(UNKNOWN_OP, f"unknown op {shown(op)}; this server knows {', '.join(OPS)}", {"ops": list(OPS)})
        handler = getattr(self, op)  # each op is answered by the method of its name
        if op not in COMPUTE_OPS:
            return await handler(args, notes)
        # Admission: every compute request holds its image (up to a frame) from arrival to
        # answer, so their number is bounded before any decoding, not only at the queue.
        if self.pending >= self.max_pending:
            raise RequestFailed(
                OVERLOADED,
                f"{self.pending} requests are already in progress; try again shortly",
                {"max_pending": self.max_pending},
            )
        self.pending += 1
        try:
            return await handler(args, notes, events, reservation or Reservation(self.ledger, 0))
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
                "methods": list(METHOD.choices),
                "baselines": list(BASELINE.choices),
                "formats": list(FORMAT.choices),
                "paths": list(PATH.choices),
                "heatmap": True,
                "idgi": True,
                "limits": {
                    "max_frame_bytes": self.limits.max_frame_bytes,
                    "max_pixels": self.limits.max_pixels,
                    "max_steps": self.limits.max_steps,
                    "max_targets": TOP_K.high,
                    "max_paths": SAMPLES.high,
                },
                "defaults": {
                    "attribute": {option.name: option.default for option in ATTRIBUTE_OPTIONS},
                    "classify": {option.name: option.default for option in CLASSIFY_OPTIONS},
                    # what an attribution that names neither n_steps, tolerance nor method gets
                    "unnamed_rule": {"tolerance": DEFAULT_TOLERANCE, "n_steps": min(DEFAULT_CAP, self.limits.max_steps)},
                },
                "events": list(EVENTS),
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
                "queries": sum(self.queries.values()),
                "failed_by_code": dict(self.failed),
                "in_flight": self.in_flight,
                "pending": self.pending,
                "max_pending": self.max_pending,
            },
            "connections": self.connections,
        }
        if self.model is None or self.worker is None:
            answer["startup"] = self.startup_facts()
            answer["memory"] = {"rss_bytes": resident_bytes(), **self.ledger.facts()}
            return answer
        answer.update(
            device=str(self.model.device),
            precision="tf32" if self.worker.allow_tf32 else "float32",
            compiler=self.worker.compute_facts.compiler,
            model=self._model_facts(with_classes=False),
            queue_depth=self.worker.queue_depth,
            queue_size=self.worker.queue_size,
            batching=self.worker.stats(),
            memory={**_memory(self.model.device), **self.ledger.facts()},
        )
        return answer

    async def classify(self, args: dict[str, Any], notes: dict[str, Any], events: Events | None,
                       reservation: Reservation) -> dict[str, Any]:
        _check_image(args)
        top = _checked(TOP, args)
        pipeline = await self._until_ready(_progress(args, events))
        # The image leaves args in the call: the pipeline holds its only reference and drops it once decoded.
        classes = await pipeline.classify(args.pop("image"), top, budget=reservation, notes=notes)
        return {"top": [{"index": index, "name": name, "probability": p} for index, name, p in classes]}

    async def attribute(self, args: dict[str, Any], notes: dict[str, Any], events: Events | None,
                        reservation: Reservation) -> dict[str, Any]:
        created = now()
        _check_image(args)
        try:
            request = parse_attribute(args, max_steps=self.limits.max_steps)
        except RequestError as error:
            raise error.failed() from None
        emit = _progress(args, events)
        stream = events is not None and _checked(STREAM, args)
        pipeline = await self._until_ready(emit)
        listener = None if emit is None else _EventRelay(asyncio.get_running_loop(), emit)
        # The image leaves args in the call: the pipeline holds its only reference and drops it once decoded.
        answer = await pipeline.attribute(args.pop("image"), request, args.get("target"), budget=reservation,
                                          listener=listener, notes=notes, created=created)
        started = time.perf_counter()
        if stream:  # the file leaves in data events as it is written
            assert events is not None
            sink = _EventSink(asyncio.get_running_loop(), events)
            result = await pipeline.delivered(answer, sink)
            result["data_bytes"] = await self.in_pool(sink.finish)  # it waits for the loop to send
        else:
            pieces = _Pieces()
            result = await pipeline.delivered(answer, pieces)
            result["data"] = Blob(pieces.pieces)
        notes["encode_ms"] = _ms(time.perf_counter() - started)
        notes["target"] = result["target"]["name"]
        result["timing_ms"] = {k: notes[k] for k in ("decode_ms", "queue_ms", "compute_ms", "encode_ms")}
        result["timing_ms"]["batch_size"] = notes["batch_size"]
        return result

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def _until_ready(self, emit: Emit | None) -> Pipeline:
        """The pipeline, once start-up has handed over the model (``emit``: the request's
        progress events, told that it waits)."""
        if not self._ready.is_set():
            if emit is not None:
                emit("starting", self.startup_facts())
            await self._ready.wait()
        assert self.pipeline is not None
        return self.pipeline

    async def in_pool(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, lambda: fn(*args, **kwargs))

    def _model_facts(self, *, with_classes: bool) -> dict[str, Any]:
        assert self.model is not None
        facts = self.model.summary()
        if not with_classes:
            facts.pop("classes")
        return facts


class _Pieces(io.RawIOBase):
    """A write-only file that keeps what is written as a list of pieces (never joined)."""

    def __init__(self) -> None:
        super().__init__()
        self.pieces: list[bytes] = []

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        self.pieces.append(bytes(data))
        return len(data)


class _EventSink(io.RawIOBase):
    """A write-only file whose bytes leave as ``data`` events of DATA_EVENT_BYTES, from a
    worker thread: each write of a full event waits until it is out (backpressure), and
    a client that is gone ends the writing (OSError)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, events: Events) -> None:
        super().__init__()
        self._loop = loop
        self._events = events
        self._buffer = bytearray()
        self.sent = 0

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        taken = 0
        while len(self._buffer) + len(view) - taken >= DATA_EVENT_BYTES:
            needed = DATA_EVENT_BYTES - len(self._buffer)
            self._send(bytes(self._buffer) + bytes(view[taken : taken + needed]))
            self._buffer.clear()
            taken += needed
        self._buffer += view[taken:]
        return len(view)

    def finish(self) -> int:
        """Send what is left; the file's size in bytes."""
        if self._buffer:
            self._send(bytes(self._buffer))
            self._buffer.clear()
        return self.sent

    def _send(self, chunk: bytes) -> None:
        delivered = asyncio.run_coroutine_threadsafe(self._events.send("data", {"data": chunk}), self._loop).result()
        if not delivered:
            raise ConnectionAbortedError("the client is gone; the result file is not needed")
        self.sent += len(chunk)


def _progress(args: dict[str, Any], events: Events | None) -> Emit | None:
    """Where the request's progress events go: nowhere unless it asked (args.progress)."""
    return events.emit if events is not None and _checked(PROGRESS, args) else None


def _checked(option: Any, args: dict[str, Any]) -> Any:
    """One wire argument through its option's check (igd.request)."""
    try:
        return option.check(args.get(option.name))
    except RequestError as error:
        raise error.failed() from None


def _check_image(args: dict[str, Any]) -> None:
    """``bad_request`` unless ``args.image`` is the image's bytes."""
    data = args.get("image")
    if not isinstance(data, bytes):
        problem = "is required" if data is None else f"must be bytes (msgpack bin), got {type(data).__name__}"
        raise RequestFailed(BAD_REQUEST, f"args.image {problem}", {"arg": "image"})


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 1)


def _memory(device: torch.device) -> dict[str, int]:
    memory = {"rss_bytes": resident_bytes()}
    if device.type == "cuda":
        memory["cuda_allocated_bytes"] = torch.cuda.memory_allocated(device)
        memory["cuda_reserved_bytes"] = torch.cuda.memory_reserved(device)
        memory["cuda_peak_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
    return memory
