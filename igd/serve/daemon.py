"""Start-up and lifetime of `igd serve`: socket, model, warm-up, serving, exit.

Order matters: the socket comes first (socket activation hands it over; standalone, a
path another igd is serving fails fast, before minutes of model loading) and answers
``hello`` and ``status`` from then on; then the model, the chunk-size measurement and a
warm-up pass, and only then READY=1 and compute requests (which wait until then).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import signal
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from igd import pipeline
from igd.serve import systemd
from igd.serve.access import AccessPolicy
from igd.logs import log
from igd.models import ModelError, load_model
from igd.protocol import default_socket_path
from igd.request import AttributeRequest
from igd.serve.server import Server
from igd.serve.service import Limits, Service
from igd.serve.socket_file import OwnedPath, SocketUnusable, bind_socket
from igd.worker import ComputeSettings, Worker


class StartupError(RuntimeError):
    """igd cannot start; the message says why."""


@dataclass(frozen=True)
class ServeOptions:
    """`igd serve`'s settings (igd/cli.py reads them from flags and IGD_* variables)."""

    socket_path: Path | None = None  # None: igd.protocol.default_socket_path()
    compute: ComputeSettings = ComputeSettings()
    limits: Limits = Limits()
    drain_timeout: float = 30.0
    access: AccessPolicy = AccessPolicy()


class _StopFlag:
    """SIGTERM/SIGINT before the event loop runs (during loading and warm-up): the
    handler only records it; start-up stops at the next stage and exits cleanly."""

    def __init__(self) -> None:
        self.raised = False
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)  # see Server.run: logged and ignored

    def _handle(self, signum: int, _frame: object) -> None:
        self.raised = True

    def __call__(self) -> bool:
        return self.raised


def serve_forever(options: ServeOptions, model_args: dict[str, Any], started: float | None = None) -> None:
    """Serve until SIGTERM/SIGINT. Raises StartupError if igd cannot start.

    ``started``: the process's start (time.monotonic()), from which uptime counts."""
    stop = _StopFlag()
    listener, owned = _listener(options.socket_path)
    try:
        max_pending = options.compute.queue_size + options.compute.max_images
        service = Service(options.limits, max_pending=max_pending, started=started)
        server = Server(service, listener, owned=owned, drain_timeout=options.drain_timeout, access=options.access)
        asyncio.run(server.run(functools.partial(_start, service, options, model_args), stop))
    finally:
        listener.close()
        if owned is not None:
            owned.unlink()  # after serving the daemon has done it; this covers start-up failures


async def _start(service: Service, options: ServeOptions, model_args: dict[str, Any], stopped: Callable[[], bool]) -> None:
    """Load the model and warm up (off the event loop, which keeps answering hello and
    status meanwhile), then hand the model and a started worker to ``service``. A stop
    takes effect between stages."""
    loop = asyncio.get_running_loop()

    def phase(text: str) -> None:
        service.set_phase(text)
        systemd.notify(f"STATUS={text}")

    phase("loading the model")
    started = time.perf_counter()
    try:
        model = await loop.run_in_executor(None, functools.partial(load_model, **model_args))
    except ModelError as error:
        raise StartupError(str(error)) from None
    log("model_loaded", name=model.name, device=str(model.device), parameters=model.num_parameters,
        seconds=round(time.perf_counter() - started, 2), source=model.source)
    if stopped():
        return
    phase(f"warming up {model.name}")
    try:
        worker = await loop.run_in_executor(
            None, functools.partial(Worker.warmed_up, model, options.compute,
                                    report=lambda step: phase(f"warming up {model.name}: {step}"))
        )
    except ModelError as error:  # --compile failed
        raise StartupError(str(error)) from None
    if stopped():
        worker.close()
        worker.join()
        return
    phase(f"warming up {model.name}: measuring one pass's memory")
    working_set = await loop.run_in_executor(None, worker.working_set)
    try:
        service.hold_compute(working_set)
    except ValueError as error:
        worker.close()
        worker.join()
        raise StartupError(str(error)) from None
    log("compute_working_set", bytes=working_set, max_batch=worker.max_batch)
    default = pipeline.footprint(AttributeRequest(), model).total
    if default > service.ledger.for_requests:
        log("memory_budget_small", level=logging.WARNING, budget_bytes=service.ledger.limit,
            working_set_bytes=working_set, default_request_bytes=default,
            note="a request with default options can never fit: raise --memory-budget")
    service.serve(model, worker)


def _listener(socket_path: Path | None) -> tuple[socket.socket, OwnedPath | None]:
    """(listening socket, the file we created, or None when systemd passed the socket)."""
    try:
        activated = systemd.listen_socket()
    except systemd.ActivationError as error:
        raise StartupError(str(error)) from None
    if activated is not None:
        log("socket_activated", address=str(activated.getsockname()))
        return activated, None
    path = socket_path or default_socket_path()
    try:
        sock, owned = bind_socket(path)
    except SocketUnusable as error:
        raise StartupError(str(error)) from None
    except OSError as error:
        raise StartupError(f"cannot listen on {path}: {error.strerror or error}") from None
    log("listening", socket=str(path))
    return sock, owned
