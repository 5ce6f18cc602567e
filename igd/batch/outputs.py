"""Where `igd batch` puts results, and how it knows what is already done.

``OUT_DIR/status.jsonl`` (``status.shard-I-of-N.jsonl`` for a shard, so that shards may
share a directory) holds one JSON line per (image, target): ``ok`` with the output, or
the error code and message. Outputs are written before their status line, each file
atomically, so after a crash a status line never points at a missing or partial file;
``--resume`` keeps the pairs recorded ok whose output is present, rewrites the status
file with those alone (one line per pair) and does the rest. The status file is never
followed through a symbolic link (which could lead outside OUT_DIR). Temporaries that a
run killed while writing left behind (``.<name>.<random>.part``) are removed by the
next run of the same OUT_DIR (and shard).
"""

from __future__ import annotations

import errno
import json
import os
import re
import stat
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Iterable

from igd.batch.inputs import InputError, Pair
from igd.output.files import temporary_target, write_atomically
from igd.output.keys import FACTS, PARQUET_ARRAYS, PARQUET_STEP_ARRAYS
from igd.protocol import BAD_REQUEST, INTERNAL

# The fields of a status line, whichever backend, shard or batch produced it: the pair, its
# outcome, and on success the answer's facts (igd.output.keys; the arrays are in the result
# files); on failure the error's code and message.
PAIR_FIELDS = ("id", "path", "target", "ok", "output")
STATUS_FIELDS = (*PAIR_FIELDS, *(fact.name for fact in FACTS), "code", "message")
# Parquet: the pair, the facts, and the arrays (the result file's shape of IG, and its arrays).
PARQUET_COLUMNS = (*PAIR_FIELDS[:3], *(fact.name for fact in FACTS), "shape", *PARQUET_ARRAYS,
                   *PARQUET_STEP_ARRAYS)
PARQUET_ROWS_PER_FILE = 256


def status_name(shard: tuple[int, int] | None) -> str:
    return "status.jsonl" if shard is None else f"status.shard-{shard[0]}-of-{shard[1]}.jsonl"


def parquet_prefix(shard: tuple[int, int] | None) -> str:
    return "part" if shard is None else f"part-shard-{shard[0]}-of-{shard[1]}"


class StatusLog:
    """The append-only status file; reopened for appending after a resume's rewrite."""

    def __init__(self, out_dir: Path, shard: tuple[int, int] | None) -> None:
        self.path = out_dir / status_name(shard)
        self.out_dir = out_dir

    def check(self) -> None:
        """InputError unless the status file is absent or a regular file (a symbolic link
        could lead outside OUT_DIR; a FIFO or a device would block or never end)."""
        try:
            info = os.lstat(self.path)
        except FileNotFoundError:
            return
        if stat.S_ISLNK(info.st_mode):
            raise InputError(f"{self.path} is a symbolic link; igd batch writes its status only to a regular file "
                             "in OUT_DIR (remove the link)")
        if not stat.S_ISREG(info.st_mode):
            raise InputError(f"{self.path} is not a regular file; igd batch writes its status there (remove it)")

    def _open(self, flags: int) -> int:
        """The status file opened with ``flags``, never through a symbolic link, and only
        if it is a regular file."""
        try:
            fd = os.open(self.path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o666)
        except OSError as error:
            if error.errno == errno.ELOOP:
                self.check()  # says so
            raise
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            self.check()
            raise InputError(f"{self.path} is not a regular file")
        return fd

    def done(self) -> dict[str, dict[str, Any]]:
        """The last record of each pair that is ok and whose output exists."""
        records: dict[str, dict[str, Any]] = {}
        try:
            fd = self._open(os.O_RDONLY)
        except FileNotFoundError:
            return records
        with os.fdopen(fd, "r", encoding="utf-8") as f:
            text = f.read()
        for line in text.splitlines():
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
        write_atomically(self.path, b"".join(_line(record) for record in records))

    def append(self, records: list[dict[str, Any]]) -> None:
        with os.fdopen(self._open(os.O_WRONLY | os.O_APPEND | os.O_CREAT), "ab") as f:
            f.write(b"".join(_line(record) for record in records))
            f.flush()
            os.fsync(f.fileno())


def _line(record: dict[str, Any]) -> bytes:
    return (json.dumps({k: record[k] for k in STATUS_FIELDS if k in record}, sort_keys=True) + "\n").encode()


class ResultFiles:
    """One result file per pair (torch or npz), at the pair's output name (see
    igd.batch.inputs.name_outputs): ``cats/001.png`` attributed to ``cat`` goes to
    ``OUT_DIR/cats/001.cat.gzip``. Folders are created below OUT_DIR only: a symbolic
    link on the way (which could lead outside) makes that pair an error row instead."""

    def __init__(self, out_dir: Path, suffix: str) -> None:
        self.out_dir = out_dir
        self.root = out_dir.resolve()
        self.suffix = suffix

    def write(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Write the results of ``rows``; returns the rows whose status line is due (all)."""
        for row in rows:
            if row["ok"]:
                relative = row["output"] + self.suffix
                data = row.pop("data")
                try:
                    write_atomically(self._inside(relative), data)
                except (OSError, Escape) as error:
                    row.update(ok=False, code=INTERNAL if isinstance(error, OSError) else BAD_REQUEST,
                               message=f"cannot write {relative}: {error}")
                    row.pop("output")
                    continue
                row["output"] = relative
        return rows

    def close(self) -> list[dict[str, Any]]:
        return []

    def _inside(self, relative: str) -> Path:
        """OUT_DIR/relative, creating its folders, none of which may be a symlink."""
        folder = self.root
        *folders, name = PurePosixPath(relative).parts
        for part in folders:
            folder = folder / part
            if folder.is_symlink():
                raise Escape(f"{folder} is a symbolic link; results stay inside {self.out_dir}")
            folder.mkdir(exist_ok=True)
        path = folder / name
        if path.is_symlink():
            raise Escape(f"{path} is a symbolic link; results stay inside {self.out_dir}")
        return path


class Escape(ValueError):
    """A result path that would lead out of OUT_DIR."""


class ParquetShards:
    """Rows in parquet files of up to 256 rows: ``OUT_DIR/<prefix>-00000.parquet``, ...
    Columns (:data:`PARQUET_COLUMNS`, those the rows have): id, path, target, the answer's
    facts (igd.output.keys: target_index, target_name, prediction, probability,
    convergence_delta, completeness_gap, error_estimate, the metrics' areas, n_steps, ...),
    shape, integrated_grads (flat; float16 unless --dtype float32), idgi (with --idgi), and
    with --with-steps directional_grads (flat, n_steps x C x H x W) and step_sizes."""

    def __init__(self, out_dir: Path, shard: tuple[int, int] | None) -> None:
        import pyarrow  # noqa: F401 - fail at start, not after the first batch

        self.out_dir = out_dir
        self.prefix = parquet_prefix(shard)
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
        columns = [c for c in PARQUET_COLUMNS if any(c in row for row in rows)]
        table = pa.table({c: [row.get(c) for row in rows] for c in columns})
        buffer = io.BytesIO()
        pq.write_table(table, buffer)
        write_atomically(self.out_dir / name, buffer.getvalue())
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


def remove_stale_temporaries(out_dir: Path, ours: Callable[[str], bool] | None = None) -> int:
    """Remove the temporaries of igd's atomic writes (``.<name>.<8 characters>.part``,
    see igd.output.files.AtomicFile) that a run killed while writing left anywhere in OUT_DIR,
    and return how many. Only regular files of that pattern; symbolic links are neither
    followed nor removed. ``ours`` says which results (paths relative to OUT_DIR) belong
    to this run, where other runs (other shards) may be writing theirs right now; None:
    every one (no other run can be)."""
    removed = 0
    for folder, _folders, names in os.walk(out_dir):  # never into a symlinked folder
        for name in names:
            target = temporary_target(name)
            if target is None:
                continue
            if ours is not None and not ours(Path(folder, target).relative_to(out_dir).as_posix()):
                continue
            path = Path(folder, name)
            try:
                if stat.S_ISREG(os.lstat(path).st_mode):
                    path.unlink()
                    removed += 1
            except FileNotFoundError:
                continue
    return removed


def shard_outputs(pairs: list[Pair], suffix: str, shard: tuple[int, int] | None) -> Callable[[str], bool]:
    """Whether a path relative to OUT_DIR is one this shard writes: a result of one of its
    ``pairs``, its status file or one of its parquet files."""
    results = {pair.output + suffix for pair in pairs}
    parquet = re.compile(re.escape(parquet_prefix(shard)) + r"-\d+\.parquet")
    return lambda relative: (relative in results or relative == status_name(shard)
                             or parquet.fullmatch(relative) is not None)


def pending(pairs: list[Pair], done: dict[str, dict[str, Any]]) -> list[Pair]:
    return [pair for pair in pairs if pair.key not in done]
