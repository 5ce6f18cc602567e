"""The daemon's ops in process (igd.service with a real worker on a tiny model): what must
never run on the event loop, and what the memory budget holds for a request."""

from __future__ import annotations

import asyncio
import io
import threading
from typing import Any

import pytest
from PIL import Image

import nets
from igd import imaging, pipeline
from igd.engine import faithfulness
from igd.serve.ledger import Reservation
from igd.request import RequestFailed
from igd.serve.service import Limits, Service
from igd.worker import Worker
from test_worker import loaded


def png(width: int = 40, height: int = 30) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), (200, 120, 40)).save(out, "PNG")
    return out.getvalue()


def serving(budget: int = 1 << 30) -> Service:
    service = Service(Limits(memory_budget=budget), max_pending=8)
    model = loaded(nets.groupnorm_cnn())
    worker = Worker(model, max_batch=8)
    worker.start()
    service.serve(model, worker)
    return service


def attribute(service: Service, args: dict[str, Any]) -> dict[str, Any]:
    async def run() -> dict[str, Any]:
        return await service.attribute(args, {}, None, Reservation(service.ledger, 0))

    return asyncio.run(run())


def test_images_and_metric_images_are_made_off_the_event_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    # Building 16 targets' faithfulness images once stalled every other client for seconds.
    threads: dict[str, set[str]] = {"probe": set(), "perturbed": set()}

    def recorded(name: str, function: Any) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            threads[name].add(threading.current_thread().name)
            return function(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(faithfulness, "perturbed", recorded("perturbed", faithfulness.perturbed))
    monkeypatch.setattr(pipeline, "probe_image", recorded("probe", imaging.probe))
    service = serving()
    result = attribute(service, {"image": png(), "n_steps": 4, "top_k": 3, "metrics": ["insertion", "deletion"]})
    assert len(result["targets"]) == 3 and all("metrics" in t for t in result["targets"])
    loop_thread = threading.main_thread().name  # asyncio.run runs the loop on this thread
    assert threads["perturbed"] and loop_thread not in threads["perturbed"], threads
    assert threads["probe"] and loop_thread not in threads["probe"], threads
    service.close()


def test_what_could_never_fit_is_refused_for_good_and_what_fits_is_held() -> None:
    service = serving(budget=8 << 20)
    with pytest.raises(RequestFailed) as refused:
        attribute(service, {"image": png(4000, 3000), "n_steps": 4})  # 12 Mpx: decoding alone is over 8 MiB
    assert refused.value.code == "request_too_large"
    assert refused.value.details["needed_by_part"]["image"] >= 4000 * 3000 * 4
    assert refused.value.details["available_bytes"] == 8 << 20
    assert service.ledger.used == 0  # nothing kept of the refused request
    assert attribute(service, {"image": png(), "n_steps": 4})["n_steps"] == 4
    service.close()
