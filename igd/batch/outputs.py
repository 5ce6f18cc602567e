"""Where `igd batch` puts results, and how it knows what is already done.

``OUT_DIR/status.jsonl`` (``status.shard-I-of-N.jsonl`` for a shard, so that shards may
share a directory) holds one JSON line per (image, target): ``ok`` with the output, or
the error code and message. Outputs are written before their status line, each file
atomically, so after a crash a status line never points at a missing or partial file;
``--resume`` keeps the pairs recorded ok whose output is present, rewrites the status
file with those alone (one line per pair) and does the rest.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Iterable

from igd.batch.inputs import Pair

# No floats: a status line is the same whichever backend, shard or batch produced it
# (the values themselves are in the result files).
STATUS_FIELDS = ("id", "path", "target", "ok", "output", "target_index", "target_name", "prediction", "code", "message")
PARQUET_ROWS_PER_FILE = 256


def status_name(shard: tuple[int, int] | None) -> str:
    return "status.jsonl" if shard is None else f"status.shard-{shard[0]}-of-{shard[1]}.jsonl"


def atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


class StatusLog:
    """The append-only status file; reopened for appending after a resume's rewrite."""

    def __init__(self, out_dir: Path, shard: tuple[int, int] | None) -> None:
        self.path = out_dir / status_name(shard)
        self.out_dir = out_dir

    def done(self) -> dict[str, dict[str, Any]]:
        """The last record of each pair that is ok and whose output exists."""
        records: dict[str, dict[str, Any]] = {}
        if not self.path.exists():
            return records
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a crash
            key = f"{record['id']}\t{record['target']}"
            if record.get("ok") and (self.out_dir / record["output"]).exists():
                records[key] = record
            else:
                records.pop(key, None)
        return records

    def rewrite(self, records: Iterable[dict[str, Any]]) -> None:
        atomic_write(self.path, b"".join(_line(record) for record in records))

    def append(self, records: list[dict[str, Any]]) -> None:
        with self.path.open("ab") as f:
            f.write(b"".join(_line(record) for record in records))
            f.flush()
            os.fsync(f.fileno())


def _line(record: dict[str, Any]) -> bytes:
    return (json.dumps({k: record[k] for k in STATUS_FIELDS if k in record}, sort_keys=True) + "\n").encode()


class TorchFiles:
    """One gzip'd torch file per pair, mirroring the input's relative paths:
    ``cats/001.png`` attributed to ``cat`` goes to ``OUT_DIR/cats/001.cat.gzip``."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = out_dir

    def write(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Write the results of ``rows``; returns the rows whose status line is due (all)."""
        for row in rows:
            if row["ok"]:
                relative = output_name(row["id"], row["target"])
                atomic_write(self.out_dir / relative, row.pop("data"))
                row["output"] = relative
        return rows

    def close(self) -> list[dict[str, Any]]:
        return []


def output_name(image_id: str, target: str) -> str:
    safe = re.sub(r"[^\w.-]+", "_", target)
    stem = Path(image_id).with_suffix("")
    return str(stem.parent / f"{stem.name}.{safe}.gzip")


class ParquetShards:
    """Rows in parquet files of up to 256 rows: ``OUT_DIR/<prefix>-00000.parquet``, ...
    Columns: id, path, target, target_index, target_name, prediction, probability,
    convergence_delta, shape, integrated_grads (flat; float16 unless --dtype float32),
    and with --with-steps directional_grads (flat, n_steps x C x H x W) and step_sizes."""

    def __init__(self, out_dir: Path, shard: tuple[int, int] | None) -> None:
        import pyarrow  # noqa: F401 - fail at start, not after the first batch

        self.out_dir = out_dir
        self.prefix = "part" if shard is None else f"part-shard-{shard[0]}-of-{shard[1]}"
        self.rows: list[dict[str, Any]] = []
        existing = [int(p.stem.rsplit("-", 1)[1]) for p in out_dir.glob(f"{self.prefix}-*.parquet")]
        self.written = max(existing, default=-1) + 1

    def write(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Buffer the results of ``rows``; returns the rows whose status line is due: the
        errors, and the results whose file has been written."""
        self.rows += [row for row in rows if row["ok"]]
        flushed = [row for row in rows if not row["ok"]]
        while len(self.rows) >= PARQUET_ROWS_PER_FILE:
            flushed += self._flush(self.rows[:PARQUET_ROWS_PER_FILE])
            self.rows = self.rows[PARQUET_ROWS_PER_FILE:]
        return flushed

    def close(self) -> list[dict[str, Any]]:
        flushed = self._flush(self.rows) if self.rows else []
        self.rows = []
        return flushed

    def _flush(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        import io

        import pyarrow as pa
        import pyarrow.parquet as pq

        name = f"{self.prefix}-{self.written:05d}.parquet"
        self.written += 1
        columns = [c for c in ("id", "path", "target", "target_index", "target_name", "prediction", "probability",
                               "convergence_delta", "shape", "integrated_grads", "directional_grads", "step_sizes")
                   if c in rows[0]]
        table = pa.table({c: [row[c] for row in rows] for c in columns})
        buffer = io.BytesIO()
        pq.write_table(table, buffer)
        atomic_write(self.out_dir / name, buffer.getvalue())
        for row in rows:
            row["output"] = name
        return rows


def drop_incomplete_parquet(out_dir: Path, done: dict[str, dict[str, Any]], prefix: str) -> dict[str, dict[str, Any]]:
    """After a crash: a parquet file some of whose rows have no ok status line would give
    those pairs twice once they are redone. Delete such files and forget their rows."""
    import pyarrow.parquet as pq

    for path in sorted(out_dir.glob(f"{prefix}-*.parquet")):
        keys = [f"{i}\t{t}" for i, t in zip(*pq.read_table(path, columns=["id", "target"]).to_pydict().values())]
        if not all(done.get(key, {}).get("output") == path.name for key in keys):
            path.unlink()
            done = {key: record for key, record in done.items() if record.get("output") != path.name}
    return done


def pending(pairs: list[Pair], done: dict[str, dict[str, Any]]) -> list[Pair]:
    return [pair for pair in pairs if pair.key not in done]
