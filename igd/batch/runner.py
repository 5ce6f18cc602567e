"""The per-batch work of `igd batch`, one code path for every backend.

A :class:`BatchAttributor` loads the model once, warms up and starts the daemon's
batching :class:`~igd.worker.Worker`, and sends each (image, target) pair down the
daemon's own request path (igd.pipeline). Called with a list of pairs it returns one
row per pair: the result (the very bytes igctl would write, or the arrays for parquet)
or the error in the daemon's vocabulary, never an exception for one bad image or target.
"""

from __future__ import annotations

import concurrent.futures
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from igd import pipeline
from igd.batch.inputs import PREDICTED, Pair
from igd.output.files import UnreadableInput, read_regular_file
from igd.models import load_model
from igd.protocol import BAD_IMAGE, DEFAULT_MAX_FRAME_BYTES
from igd.request import DEFAULT_MAX_PIXELS, AttributeRequest, RequestFailed
from igd.output.provenance import now
from igd.worker import ComputeSettings, Worker, WorkerError

FORMATS = ("torch", "npz", "parquet")


@dataclass(frozen=True)
class BatchOptions:
    request: AttributeRequest = AttributeRequest()  # what to compute, as any request
    fmt: str = "torch"  # torch | npz: one result file per pair, as igctl writes; parquet: rows
    dtype: str = "float16"  # parquet: of the stored gradients
    with_steps: bool = False  # parquet: also the per-step gradients
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_image_bytes: int = DEFAULT_MAX_FRAME_BYTES  # larger input files are refused, as igd serve does
    compute: ComputeSettings = field(default_factory=lambda: ComputeSettings(queue_size=1 << 30))


class BatchAttributor:
    """Model, worker and options; ``attributor(pairs) -> rows``."""

    def __init__(self, model_args: dict[str, Any], options: BatchOptions) -> None:
        self.model = load_model(**model_args)
        self.options = options
        self.worker = Worker.warmed_up(self.model, options.compute)

    def __call__(self, pairs: list[Pair]) -> list[dict[str, Any]]:
        """One row per pair, in order; images shared by several pairs are decoded once."""
        request = self.options.request
        created = now()
        rows: list[dict[str, Any] | None] = [None] * len(pairs)
        pending: list[tuple[int, pipeline.Prepared, concurrent.futures.Future[Any]]] = []
        prepared: dict[str, pipeline.Prepared | RequestFailed] = {}
        for i, pair in enumerate(pairs):
            if pair.path not in prepared:
                prepared[pair.path] = self._prepare(pair.path)
            ready = prepared[pair.path]
            try:
                if isinstance(ready, RequestFailed):
                    raise ready
                target = pipeline.resolve_targets(self.model, None if pair.target == PREDICTED else pair.target,
                                                  self.options.request.top_k)
                pending.append((i, ready, self.worker.submit(pipeline.job(ready, target, request))))
            except RequestFailed as failure:
                rows[i] = error_row(pair, failure)
            except WorkerError as error:
                rows[i] = error_row(pair, pipeline.worker_failure(error))
        for i, ready, future in pending:
            try:
                answer = pipeline.answer(future.result(), request, self.model, ready, self.worker.compute_facts, created)
                if request.metrics:
                    answer = pipeline.with_metrics(answer, [self.worker.submit(job).result()
                                                            for job in pipeline.metric_jobs(answer)])
                rows[i] = self._row(pairs[i], answer)
            except WorkerError as error:
                rows[i] = error_row(pairs[i], pipeline.worker_failure(error))
        return rows  # type: ignore[return-value]

    def close(self) -> None:
        self.worker.close()
        self.worker.drain(60)
        self.worker.join()

    def _prepare(self, path: str) -> pipeline.Prepared | RequestFailed:
        try:
            data = read_regular_file(path, self.options.max_image_bytes)
            return pipeline.prepare(pipeline.decode(data, self.options.max_pixels), self.options.request, self.model)
        except UnreadableInput as error:
            return RequestFailed(BAD_IMAGE, str(error))
        except RequestFailed as failure:
            return failure

    def _row(self, pair: Pair, answer: pipeline.Answer) -> dict[str, Any]:
        _index, prediction, probability = answer.prediction
        row = {
            **base_row(pair),
            "ok": True,
            "target_index": answer.target_index,
            "target_name": answer.target_name,
            "prediction": prediction,
            "probability": probability,
            "convergence_delta": answer.convergence_delta,
            "completeness_gap": pipeline.finite_or_none(answer.completeness_gap),
            "error_estimate": pipeline.finite_or_none(answer.error_estimate),
            "n_steps": answer.part.attribution.n_steps,
        }
        if answer.part.attribution.tolerance is not None:
            row["tolerance_met"] = answer.part.attribution.tolerance_met
        if self.options.fmt != "parquet":
            row["data"] = answer.file_bytes()
        else:
            row.update(_arrays(answer, self.options))
        return row


def _arrays(answer: pipeline.Answer, options: BatchOptions) -> dict[str, Any]:
    """The parquet columns of one result: IG flat, and optionally the per-step gradients;
    with several targets or paths, the result file's ``integrated_grads`` (T, 1, C, H, W)
    and ``integrated_directional_grads`` (T, [P,] n, C, H, W), flat, ``shape`` IG's."""
    dtype = np.float16 if options.dtype == "float16" else np.float32
    attribution, i = answer.part.attribution, answer.part.index
    if answer.combined:
        result = answer.result()
        integrated, directional = result["integrated_grads"], result["integrated_directional_grads"]
    else:
        integrated, directional = attribution.integrated_grads[i], attribution.directional_grads[i]
    columns: dict[str, Any] = {
        "shape": list(integrated.shape),
        "integrated_grads": integrated.numpy().astype(dtype).ravel(),
    }
    if options.with_steps:
        columns["directional_grads"] = directional.numpy().astype(dtype).ravel()
        columns["step_sizes"] = attribution.step_sizes.numpy().astype(np.float32)
    return columns


def base_row(pair: Pair) -> dict[str, Any]:
    return {"id": pair.id, "path": pair.path, "target": pair.target, "output": pair.output}


def error_row(pair: Pair, failure: RequestFailed) -> dict[str, Any]:
    return {"id": pair.id, "path": pair.path, "target": pair.target, "ok": False, "code": failure.code,
            "message": failure.message}
