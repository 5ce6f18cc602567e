"""`igd check`: a loaded model through the daemon's own warm-up, worker and request path
(igd.pipeline), on one image, with what happened as (label, value) lines."""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from dataclasses import dataclass
from typing import Any

from igd.engine.attribution import Attribution
from igd.models import LoadedModel
from igd.pipeline import Pipeline
from igd.request import DEFAULT_MAX_PIXELS, AttributeRequest
from igd.worker import ComputeSettings, Worker


# Beyond this estimated error or completeness gap (relative), `igd check` fails: the
# attribution it made is not to be trusted as it stands (more steps, a tolerance, or
# another baseline; the accuracy line says which figure).
TRUSTED = 0.5


@dataclass(frozen=True)
class CheckReport:
    rows: list[tuple[str, str]]  # (label, value) lines for people
    problems: list[str]  # why the check failed; none: it passed


def run_check(model: LoadedModel, data: bytes, label: str, request: AttributeRequest,
              compute: ComputeSettings) -> CheckReport:
    """Warm up, classify the image in ``data`` (called ``label``), attribute it to its
    most likely class, and judge the attribution's accuracy (:data:`TRUSTED`). Raises
    RequestFailed (a bad image, or the worker's failure); the worker is stopped either way."""
    started = time.perf_counter()
    worker = Worker.warmed_up(model, compute)
    warm_s = time.perf_counter() - started
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pipeline = Pipeline(model, worker, pool, DEFAULT_MAX_PIXELS)
        try:
            notes: dict[str, Any] = {}  # decode_ms, compute_ms, ... of the classification
            top = asyncio.run(pipeline.classify(data, 5, notes=notes))
            targets = None if request.top_k else top[0][0]  # --top-k: the model's most likely classes
            attributed: dict[str, Any] = {}
            answer = asyncio.run(pipeline.attribute(data, request, targets, notes=attributed))
        finally:
            worker.close()
            worker.join()
    attribution, first = answer.attribution, answer.targets[0]
    delta = first.convergence_delta
    found = worker.warm_up
    assert found is not None
    c, h, w = model.input_shape
    device = str(model.device)
    if found.memory_format_deviation:
        device += f", {compute.memory_format} (IG moved by {found.memory_format_deviation:.1e})"
    if compute.precision == "tf32" and model.device.type == "cuda":
        device += f", tf32 (IG moved by {found.tf32_deviation:.1e})"
    if compute.compile:
        device += f", compiled (IG moved by {found.compile_deviation:.1e})"
    chunk = f"chunks of {found.max_batch} ({found.chunk_source})"
    search = found.chunk.describe() + (f", {found.chunk.measured}" if found.chunk_source == "cached" else "") \
        if found.chunk is not None else "given with --max-batch"
    rows = [
        ("model", f"{model.name}: {model.description}"),
        ("source", model.source),
        ("weights", f"sha256 {model.weights_sha256}"),
        ("classes from", model.classes_source),
        ("parameters", f"{model.num_parameters:,}"),
        ("input", f"{c}x{h}x{w} ({model.preprocessing.describe()})"),
        ("input from", model.preprocessing.origin),
        ("device", device),
        ("classes", _class_list(model.class_names)),
        ("image", f"{label} ({notes['image']})"),
        ("top-5", "; ".join(f"{name} ({index}) {p:.3f}" for index, name, p in top)),
        ("attribution", f"target {first.name!r}, {attribution.n_steps} {attribution.rule} steps, "
                        f"{request.baseline} baseline, {chunk}"),
        ("chunk search", search),
        ("accuracy", f"estimated error {first.error_estimate:.1%}{_tolerance(attribution)}, completeness gap "
                     f"{first.completeness_gap:+.1%} (delta {delta:+.4g} = sum(IG) - (F(x) - F(b)))"),
        ("timings", f"warm-up {warm_s:.2f} s, decode {notes['decode_ms']:.0f} ms, classify {notes['compute_ms']:.0f} ms, "
                    f"attribute {attributed['compute_ms'] / 1000:.2f} s"),
    ]
    return CheckReport(rows, _problems(first.error_estimate, first.completeness_gap))


def _problems(error_estimate: float, completeness_gap: float) -> list[str]:
    found = []
    if not error_estimate <= TRUSTED:  # NaN and infinity included
        found.append(f"the estimated error of the attribution is {error_estimate:.0%}, above {TRUSTED:.0%}")
    if not abs(completeness_gap) <= TRUSTED:
        found.append(f"the completeness gap of the attribution is {completeness_gap:+.0%}, beyond {TRUSTED:.0%}")
    if found:
        found.append("ask for more --steps or a --tolerance (or another --baseline) and check again")
    return found


def _class_list(names: tuple[str, ...]) -> str:
    shown = ", ".join(names[:10])
    return f"{len(names)}: {shown}" + (", ..." if len(names) > 10 else "")


def _tolerance(attribution: Attribution) -> str:
    if attribution.tolerance is None:
        return ""
    return f" ({'meets' if attribution.tolerance_met else 'misses'} the tolerance {attribution.tolerance:g})"
