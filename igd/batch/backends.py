"""Where the per-batch work runs: in this process, or on a Ray cluster.

Both hand lists of pairs to a :class:`~igd.batch.runner.BatchAttributor` and feed the
rows that come back to the same sink, in this process; only the sink writes files.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Callable

from igd.batch.inputs import Pair
from igd.batch.runner import BatchAttributor, BatchOptions
from igd.progress import Progress

Rows = list[dict[str, Any]]
PAIRS_PER_CALL = 16


def run_local(pairs: list[Pair], model_args: dict[str, Any], options: BatchOptions,
              sink: Callable[[Rows], None]) -> None:
    attributor = BatchAttributor(model_args, options)
    try:
        with Progress(len(pairs)) as advance:
            for start in range(0, len(pairs), PAIRS_PER_CALL):
                part = pairs[start : start + PAIRS_PER_CALL]
                sink(attributor(part))
                advance(len(part))
    finally:
        attributor.close()


class RayAttributor:
    """The Ray Data callable class: each actor of the pool loads the model once.

    Ray's inference examples run under ``torch.inference_mode``; attributions need
    gradients, which the engine enables itself. Errors of single images come back as
    rows: an exception would drop or abort a whole block.
    """

    def __init__(self, model_args: dict[str, Any], options: BatchOptions) -> None:
        self.attributor = BatchAttributor(model_args, options)

    def __call__(self, batch: dict[str, Any]) -> dict[str, list[Any]]:
        pairs = [Pair(*(str(value) for value in values))
                 for values in zip(batch["id"], batch["path"], batch["target"], batch["output"])]
        rows = self.attributor(pairs)
        columns = sorted({key for row in rows for key in row})
        return {column: [row.get(column) for row in rows] for column in columns}


def run_ray(pairs: list[Pair], model_args: dict[str, Any], options: BatchOptions,
            sink: Callable[[Rows], None], *, address: str | None, workers: int, gpus_per_worker: float) -> None:
    try:
        import ray
    except ImportError:
        raise SystemExit("the ray backend needs Ray: pip install 'igd[ray]'") from None
    try:
        _run_ray(ray, pairs, model_args, options, sink, address=address, workers=workers,
                 gpus_per_worker=gpus_per_worker)
    except Exception as error:
        if not _is_auth_failure(error):
            raise
        raise SystemExit(_auth_advice(address)) from None


def _connect(ray: Any, address: str | None) -> None:
    """ray.init, sending the token that `ray start` uses. With RAY_AUTH_MODE unset, `ray
    start` turns token auth on when ~/.ray/auth_token exists (a local Ray run, ours
    included, writes it), but ray.init(address=...) never does: it would connect without
    the token and be refused. So, refused and holding a token, connect again with it."""
    try:
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
        return
    except Exception as error:
        if address is None or "RAY_AUTH_MODE" in os.environ or not _is_auth_failure(error):
            raise
        try:
            from ray._private.authentication.authentication_token_setup import (
                maybe_enable_token_auth_if_token_available,
            )
        except ImportError:
            raise error from None
        ray.shutdown()
        if not maybe_enable_token_auth_if_token_available(warn_if_disabled=False):
            raise
    ray.init(address=address, include_dashboard=False, log_to_driver=False)


def _is_auth_failure(error: BaseException) -> bool:
    """Whether Ray failed on its token (an AuthenticationError, or gRPC's InvalidAuthToken
    wrapped in another error), anywhere in the chain of causes."""
    while error is not None:
        if type(error).__name__ == "AuthenticationError" or "InvalidAuthToken" in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False


def _auth_advice(address: str | None) -> str:
    """One line: which token Ray sent, where it came from, and how to fix it."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        source = "the RAY_AUTH_TOKEN environment variable"
    else:
        source = os.environ.get("RAY_AUTH_TOKEN_PATH") or str(Path.home() / ".ray" / "auth_token")
    where = f"the Ray cluster at {address}" if address else "the local Ray cluster"
    return (f"{where} refused Ray's auth token ({source}; a local Ray run, `igd batch --backend ray` without "
            "--address included, writes ~/.ray/auth_token): give the cluster's own token (RAY_AUTH_TOKEN_PATH=FILE "
            "or RAY_AUTH_TOKEN), or remove that file if it is not the cluster's")


def _run_ray(ray: Any, pairs: list[Pair], model_args: dict[str, Any], options: BatchOptions,
             sink: Callable[[Rows], None], *, address: str | None, workers: int, gpus_per_worker: float) -> None:
    if not ray.is_initialized():
        _connect(ray, address)
    dataset = ray.data.from_items([dataclasses.asdict(pair) for pair in pairs])
    results = dataset.map_batches(
        RayAttributor,
        fn_constructor_kwargs={"model_args": model_args, "options": options},
        batch_size=PAIRS_PER_CALL,
        batch_format="numpy",
        concurrency=workers,
        num_gpus=gpus_per_worker,
        num_cpus=1,
    )
    with Progress(len(pairs)) as advance:
        for batch in results.iter_batches(batch_format="numpy", batch_size=None):
            rows = _rows(batch)
            sink(rows)
            advance(len(rows))


def _rows(batch: dict[str, Any]) -> Rows:
    count = len(next(iter(batch.values())))
    rows = [{key: _plain(values[i]) for key, values in batch.items()} for i in range(count)]
    return [{key: value for key, value in row.items() if value is not None} for row in rows]


def _plain(value: Any) -> Any:
    """numpy scalars and 0-d arrays from Ray as Python values; arrays and bytes as they are."""
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        return value.item()
    return value
