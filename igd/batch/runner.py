"""The per-batch work of `igd batch`, one code path for every backend.

A :class:`BatchAttributor` loads the model once, measures the chunk size as the daemon
does, and owns the daemon's batching :class:`~igd.worker.Worker`. Called with a list
of pairs it returns one row per pair: the result (the very bytes igctl would write, or
the arrays for parquet) or the error, never an exception for one bad image or target.
"""

from __future__ import annotations

import concurrent.futures
from dataclasses import dataclass
from typing import Any

import numpy as np

from igd.baselines import inputs_and_baseline
from igd.batch.inputs import PREDICTED, Pair
from igd.imaging import ImageError, ImageTooLarge, decode_image
from igd.models import UnknownClass, load_model
from igd.protocol import BAD_IMAGE, IMAGE_TOO_LARGE, INTERNAL, UNKNOWN_TARGET, ProtocolError
from igd.results import DEFAULT_GZIP_LEVEL, encode, result_dict
from igd.memory import memory_budget
from igd.tuning import warm_up
from igd.worker import AttributionSlice, Job, Worker

MISSING = "missing"  # the image file cannot be read


@dataclass(frozen=True)
class BatchOptions:
    n_steps: int = 50
    method: str = "gausslegendre"
    baseline: str = "zero"
    seed: int = 0
    blur_sigma: float | None = None
    fmt: str = "torch"  # torch | parquet
    dtype: str = "float16"  # parquet: of the stored gradients
    with_steps: bool = False  # parquet: also the per-step gradients
    max_pixels: int = 50_000_000
    memory_format: str = "contiguous"
    precision: str = "float32"  # or tf32 (igd.tuning.PRECISIONS)
    gzip_level: int = DEFAULT_GZIP_LEVEL  # torch: compression of the result files


class BatchAttributor:
    """Model, worker and options; ``attributor(pairs) -> rows``."""

    def __init__(self, model_args: dict[str, Any], options: BatchOptions, max_batch: int | None = None,
                 max_images: int = 32) -> None:
        self.model = load_model(**model_args)
        self.options = options
        chunk = warm_up(self.model, max_batch, options.memory_format, options.precision)
        self.worker = Worker(self.model, max_batch=chunk, max_images=max_images, queue_size=1 << 30,
                             max_pass_bytes=memory_budget(self.model.device) // 4,
                             allow_tf32=options.precision == "tf32")
        self.worker.start()

    def __call__(self, pairs: list[Pair]) -> list[dict[str, Any]]:
        """One row per pair, in order; images shared by several pairs are decoded once."""
        rows: list[dict[str, Any] | None] = [None] * len(pairs)
        pending: list[tuple[int, concurrent.futures.Future[Any]]] = []
        prepared: dict[str, tuple[Any, Any] | ProtocolError] = {}
        for i, pair in enumerate(pairs):
            if pair.path not in prepared:
                prepared[pair.path] = self._prepare(pair.path)
            ready = prepared[pair.path]
            if isinstance(ready, ProtocolError):
                rows[i] = error_row(pair, ready)
                continue
            try:
                target = None if pair.target == PREDICTED else self.model.class_index(pair.target)
            except UnknownClass as error:
                rows[i] = error_row(pair, ProtocolError(UNKNOWN_TARGET, str(error)))
                continue
            inputs, baseline = ready
            job = Job("attribute", inputs, baseline, target, self.options.n_steps, self.options.method)
            pending.append((i, self.worker.submit(job)))
        for i, future in pending:
            try:
                rows[i] = self._row(pairs[i], future.result())
            except ProtocolError as error:
                rows[i] = error_row(pairs[i], error)
        return rows  # type: ignore[return-value]

    def close(self) -> None:
        self.worker.close()
        self.worker.drain(60)
        self.worker.join(60)

    def _prepare(self, path: str) -> tuple[Any, Any] | ProtocolError:
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as error:
            return ProtocolError(MISSING, f"cannot read {path}: {error.strerror}")
        try:
            image = decode_image(data, max_pixels=self.options.max_pixels)
        except ImageTooLarge as error:
            return ProtocolError(IMAGE_TOO_LARGE, str(error))
        except ImageError as error:
            return ProtocolError(BAD_IMAGE, str(error))
        return inputs_and_baseline(image, self.model.preprocessing, self.options.baseline,
                                   blur_sigma=self.options.blur_sigma, seed=self.options.seed)

    def _row(self, pair: Pair, part: AttributionSlice) -> dict[str, Any]:
        attribution, i = part.attribution, part.index
        target_index = int(attribution.targets[i])
        (prediction, name, probability), = self.model.top_classes(attribution.logits[i], 1)
        row = {
            **base_row(pair),
            "ok": True,
            "target_index": target_index,
            "target_name": self.model.class_names[target_index],
            "prediction": name,
            "probability": probability,
            "convergence_delta": float(attribution.convergence_delta[i]),
        }
        if self.options.fmt == "torch":
            result = result_dict(attribution, i, model=self.model.name, target_name=row["target_name"],
                                 baseline_name=self.options.baseline)
            row["data"] = encode(result, "torch", self.options.gzip_level)
        else:
            dtype = np.float16 if self.options.dtype == "float16" else np.float32
            row["shape"] = list(attribution.integrated_grads.shape[1:])
            row["integrated_grads"] = attribution.integrated_grads[i].numpy().astype(dtype).ravel()
            if self.options.with_steps:
                row["directional_grads"] = attribution.directional_grads[i].numpy().astype(dtype).ravel()
                row["step_sizes"] = attribution.step_sizes.numpy().astype(np.float32)
        return row


def base_row(pair: Pair) -> dict[str, Any]:
    return {"id": pair.id, "path": pair.path, "target": pair.target}


def error_row(pair: Pair, error: ProtocolError) -> dict[str, Any]:
    return {**base_row(pair), "ok": False, "code": error.code or INTERNAL, "message": error.message}

