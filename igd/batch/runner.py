"""The per-batch work of `igd batch`, one code path for every backend.

A :class:`BatchAttributor` loads the model once, warms up and starts the daemon's
batching :class:`~igd.worker.Worker`, and sends each (image, target) pair down the
daemon's own request path (igd.pipeline). Called with a list of pairs it returns one
row per pair: the result (the very bytes igctl would write, or the arrays for parquet)
or the error in the daemon's vocabulary, never an exception for one bad image or target.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import datetime
import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from igd.batch.inputs import PREDICTED, Pair
from igd.models import load_model
from igd.output.answer import Answer
from igd.output.files import UnreadableInput, read_regular_file
from igd.output.keys import PARQUET_ARRAYS, PARQUET_STEP_ARRAYS
from igd.output.provenance import now
from igd.pipeline import Pipeline, Ready
from igd.protocol import BAD_IMAGE, DEFAULT_MAX_FRAME_BYTES
from igd.request import DEFAULT_MAX_PIXELS, AttributeRequest, RequestFailed
from igd.worker import ComputeSettings, Worker

@dataclass(frozen=True)
class BatchOptions:
    request: AttributeRequest = AttributeRequest()  # what to compute, as any request
    fmt: str = "torch"  # torch | npz: one result file per pair, as igctl writes; parquet: rows
    dtype: str = "float16"  # parquet: of the stored gradients
    with_steps: bool = False  # parquet: also the per-step gradients
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_image_bytes: int = DEFAULT_MAX_FRAME_BYTES  # larger input files are refused, as igd serve does
    compute: ComputeSettings = field(default_factory=lambda: ComputeSettings(queue_size=1 << 30))
    report: bool = False  # also draw each result's picture for OUT_DIR/report.html (igd.batch.report)


class BatchAttributor:
    """Model, worker and options; ``attributor(pairs) -> rows``."""

    def __init__(self, model_args: dict[str, Any], options: BatchOptions) -> None:
        self.model = load_model(**model_args)
        self.options = options
        self.worker = Worker.warmed_up(self.model, options.compute)
        self.pool = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="igd-batch")
        self.pipeline = Pipeline(self.model, self.worker, self.pool, options.max_pixels)

    def __call__(self, pairs: list[Pair]) -> list[dict[str, Any]]:
        """One row per pair, in order. Every pair is on its way at once, so the worker
        batches them into shared passes; an image shared by several pairs is read once (and
        decoded for each of them)."""
        return asyncio.run(self._rows(pairs))

    def close(self) -> None:
        self.worker.close()
        self.worker.drain(60)
        self.worker.join()
        self.pool.shutdown()

    async def _rows(self, pairs: list[Pair]) -> list[dict[str, Any]]:
        """Every pair readied (read, decoded) at once, then submitted in order, so that the
        worker's passes hold the same pairs whatever decoded first (results can differ in
        the last bits with what shares a pass)."""
        created = now()
        files: dict[str, bytes | RequestFailed] = {}
        for pair in pairs:
            if pair.path not in files:
                files[pair.path] = self._read(pair.path)
        readied = await asyncio.gather(*(self._ready(pair, files[pair.path]) for pair in pairs))
        return list(await asyncio.gather(*(self._row(pair, ready, created) for pair, ready in zip(pairs, readied))))

    async def _ready(self, pair: Pair, data: bytes | RequestFailed) -> Ready | RequestFailed:
        try:
            if isinstance(data, RequestFailed):
                raise data
            request, target = self.options.request, None if pair.target == PREDICTED else pair.target
            return await self.pipeline.ready(data, request, target)
        except RequestFailed as failure:
            return failure

    async def _row(self, pair: Pair, ready: Ready | RequestFailed, created: datetime.datetime) -> dict[str, Any]:
        try:
            if isinstance(ready, RequestFailed):
                raise ready
            answer = await self.pipeline.answer(ready, created=created)
        except RequestFailed as failure:
            return error_row(pair, failure)
        return await asyncio.get_running_loop().run_in_executor(self.pool, self._answered, pair, answer)

    def _read(self, path: str) -> bytes | RequestFailed:
        try:
            return read_regular_file(path, self.options.max_image_bytes)
        except UnreadableInput as error:
            return RequestFailed(BAD_IMAGE, str(error))

    def _answered(self, pair: Pair, answer: Answer) -> dict[str, Any]:
        """The row of a pair answered: its facts (igd.output.keys), and the result file's
        bytes, or for parquet its arrays."""
        row = {**base_row(pair), "ok": True, **answer.row()}
        if self.options.report:  # plain values only: rows may cross a Ray cluster
            row[PICTURE] = answer.heatmap_png()
            row[PANELS] = len(answer.targets)
            row[PROVENANCE] = json.dumps({k: v for k, v in answer.provenance.items() if isinstance(v, (str, int, float))})
        if self.options.fmt != "parquet":
            row["data"] = answer.file_bytes()
        else:
            row.update(_arrays(answer, self.options))
        return row


# A row's report fields (igd.batch.report takes them out before the row is written).
PICTURE, PANELS, PROVENANCE = "report_picture_png", "report_panels", "report_provenance"


def _arrays(answer: Answer, options: BatchOptions) -> dict[str, Any]:
    """The parquet columns of one result's arrays (igd.output.keys.PARQUET_ARRAYS), flat:
    ``integrated_grads``, ``idgi`` and ``xrai`` if asked for, and with --with-steps the per-step
    gradients and step sizes (float32); ``shape`` is IG's as in the result file, without
    the predecessor layout's leading 1: (C, H, W), or (T, 1, C, H, W) with several targets
    or paths."""
    dtype = np.float16 if options.dtype == "float16" else np.float32
    result = answer.result(defer_intermediates=True)  # the path points are never made
    shape = list(result["integrated_grads"].shape)
    columns: dict[str, Any] = {"shape": shape if answer.combined else shape[1:]}
    arrays = {**PARQUET_ARRAYS, **(PARQUET_STEP_ARRAYS if options.with_steps else {})}
    for column, key in arrays.items():
        if key in result:
            stored = np.float32 if key == "step_sizes" else dtype
            columns[column] = result[key].numpy().astype(stored).ravel()
    return columns


def base_row(pair: Pair) -> dict[str, Any]:
    return {"id": pair.id, "path": pair.path, "target": pair.target, "output": pair.output}


def error_row(pair: Pair, failure: RequestFailed) -> dict[str, Any]:
    return {"id": pair.id, "path": pair.path, "target": pair.target, "ok": False, "code": failure.code,
            "message": failure.message}
