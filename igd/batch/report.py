"""`igd batch --report`: OUT_DIR/report.html (igd.output.report), kept up to date as results
land, so that a long run can be watched in a browser (the page reloads itself while the run
goes on). Each answered row brings its picture (drawn where it was computed); the pictures
and the report's rows are kept in OUT_DIR/report-files/, so a resumed run's report shows
every pair, the earlier runs' included."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

from igd.batch.runner import PANELS, PICTURE, PROVENANCE
from igd.output import report as pages

RELOAD_SECONDS = 10  # how often a browser reloads the page of a run still going
WRITE_EVERY_SECONDS = 2.0  # the page is rewritten at most this often while results land


class BatchReport:
    """The report of one OUT_DIR (or one shard's: report.shard-I-of-N.html)."""

    def __init__(self, out_dir: Path, shard: tuple[int, int] | None, title: str) -> None:
        name = "report.html" if shard is None else f"report.shard-{shard[0]}-of-{shard[1]}.html"
        self.path = out_dir / name
        self.rows_path = pages.files_dir(self.path) / "rows.jsonl"
        self.title = title
        self.rows: dict[str, dict[str, Any]] = {}  # by pair: a retried pair's row replaces its failure
        self.pending: dict[str, tuple[bytes, int, dict[str, Any]]] = {}  # pictures of rows not yet written
        self.written = 0.0

    def start(self, resume: bool) -> None:
        """A fresh report, or with --resume the earlier runs' rows."""
        self.rows_path.parent.mkdir(parents=True, exist_ok=True)
        if resume and self.rows_path.exists():
            for line in self.rows_path.read_text(encoding="utf-8").splitlines():
                row = json.loads(line)
                self.rows[row["key"]] = row
        else:
            self.rows_path.write_text("", encoding="utf-8")
        self._write(live=True)

    def take(self, rows: list[dict[str, Any]]) -> None:
        """Take each answered row's report fields out before it is written (status lines and
        parquet never see them); they wait until the row's status line is due (:meth:`add`)."""
        for row in rows:
            if PICTURE in row:
                self.pending[_key(row)] = (row.pop(PICTURE), int(row.pop(PANELS, 1)),
                                           json.loads(row.pop(PROVENANCE, None) or "{}"))

    def add(self, rows: list[dict[str, Any]]) -> None:
        """The rows whose status lines were just written: save their pictures, keep their
        report rows, and rewrite the page if it is due."""
        added = []
        for row in rows:
            key = _key(row)
            picture, panels, provenance = self.pending.pop(key, (None, 1, {}))
            pictures: tuple[str | None, str | None] = (None, None)
            if picture is not None and row.get("ok"):  # named by the pair: no name from the input reaches a path
                name = hashlib.sha256(key.encode("utf-8")).hexdigest()[:24]
                pictures = pages.save_pictures(picture, panels, self.path, name)
            added.append({**pages.row_of_status(row, *pictures, provenance=provenance), "key": key})
        with self.rows_path.open("a", encoding="utf-8") as saved:
            for row in added:
                saved.write(pages.json_line(row) + "\n")
                self.rows[row["key"]] = row
        if time.monotonic() - self.written >= WRITE_EVERY_SECONDS:
            self._write(live=True)

    def close(self) -> None:
        """The final page: no more reloading."""
        self._write(live=False)

    def _write(self, live: bool) -> None:
        pages.write_report(self.path, self.rows.values(), self.title, live_seconds=RELOAD_SECONDS if live else 0)
        self.written = time.monotonic()


def _key(row: dict[str, Any]) -> str:
    """One pair (image id and target) as a string."""
    return json.dumps([row.get("id"), row.get("target")])
