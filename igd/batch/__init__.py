"""`igd batch`: attribute a whole dataset, resumably, locally, in shards or on Ray."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from igd.batch.backends import run_local, run_ray
from igd.batch.inputs import InputError, Pair, discover, in_shard
from igd.batch.lock import OutDirLock
from igd.batch.report import BatchReport
from igd.batch.outputs import (ParquetShards, ResultFiles, StatusLog, drop_incomplete_parquet, pending,
                               remove_stale_temporaries, shard_outputs)
from igd.batch.runner import BatchOptions
from igd.logs import log
from igd.request import SUFFIXES

__all__ = ["BatchOptions", "InputError", "Summary", "run_batch"]


@dataclass(frozen=True)
class Summary:
    pairs: int  # in this run's shard
    skipped: int  # already done (--resume)
    ok: int
    failed: int
    temporaries_removed: int = 0  # left in OUT_DIR by a run killed while writing
    report: Path | None = None  # OUT_DIR's report.html, with --report


def run_batch(
    source: str,
    out_dir: Path,
    *,
    targets: tuple[str, ...],
    model_args: dict[str, Any],
    options: BatchOptions,
    shard: tuple[int, int] | None = None,
    resume: bool = False,
    backend: str = "local",
    address: str | None = None,
    workers: int = 2,
    gpus_per_worker: float = 0.0,
) -> Summary:
    pairs = [pair for pair in discover(source, targets) if in_shard(pair, shard)]
    out_dir.mkdir(parents=True, exist_ok=True)
    with OutDirLock(out_dir, shard):  # a second run of this OUT_DIR (shard) stops here, at once
        return _run(pairs, out_dir, model_args=model_args, options=options, shard=shard, resume=resume,
                    backend=backend, address=address, workers=workers, gpus_per_worker=gpus_per_worker)


def _run(
    pairs: list[Pair],
    out_dir: Path,
    *,
    model_args: dict[str, Any],
    options: BatchOptions,
    shard: tuple[int, int] | None,
    resume: bool,
    backend: str,
    address: str | None,
    workers: int,
    gpus_per_worker: float,
) -> Summary:
    status = StatusLog(out_dir, shard)
    status.check()
    # Only temporaries of what this run writes: other shards may be writing theirs now,
    # and OUT_DIR may hold files of other programs.
    removed = remove_stale_temporaries(out_dir, shard_outputs(pairs, SUFFIXES.get(options.fmt, ""), shard))
    if removed:
        log("stale_temporaries_removed", level=30, count=removed, out_dir=str(out_dir),
            note="partial files of a run that was killed while writing")
    writer: ResultFiles | ParquetShards = (
        ParquetShards(out_dir, shard) if options.fmt == "parquet" else ResultFiles(out_dir, SUFFIXES[options.fmt])
    )
    if resume:
        done = status.done()
        if isinstance(writer, ParquetShards):
            done = drop_incomplete_parquet(out_dir, done, writer.prefix)
        status.rewrite(done.values())  # one line per pair from here on
        todo = pending(pairs, done)
    else:
        if status.path.exists() and status.path.stat().st_size:
            raise InputError(f"{status.path} exists: continue with --resume, or use a fresh OUT_DIR")
        todo = pairs
    counts = {"ok": 0, "failed": 0}
    report = BatchReport(out_dir, shard, f"igd batch: {out_dir.name}") if options.report else None
    if report is not None:
        report.start(resume)

    def sink(rows: list[dict[str, Any]]) -> None:
        if report is not None:
            report.take(rows)  # the pictures out of the rows
        due = writer.write(rows)
        status.append(due)
        if report is not None:
            report.add(due)
        for row in due:
            counts["ok" if row["ok"] else "failed"] += 1

    if todo:
        if backend == "ray":
            run_ray(todo, model_args, options, sink, address=address, workers=workers,
                    gpus_per_worker=gpus_per_worker)
        else:
            run_local(todo, model_args, options, sink)
    last = writer.close()
    status.append(last)
    counts["ok"] += len(last)
    if report is not None:
        report.add(last)
        report.close()
    return Summary(len(pairs), len(pairs) - len(todo), counts["ok"], counts["failed"], removed,
                   report.path if report is not None else None)
