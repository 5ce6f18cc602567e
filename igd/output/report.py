"""A browser report of many results: one self-contained page (no network; its pictures in a
folder beside it) with a row per result, sortable by every column, filterable by class and
by "inaccurate or failed", paged (PAGE_SIZE rows at a time, thumbnails loaded lazily), and a
click on a row shows the full picture (igd.output.figure: every target's panel) and the
provenance. `igctl show --html` makes one from result files, `igd batch --report` from its
status lines as results land.

Per result the page carries one JSON row (about a kilobyte with its provenance); beside it
are its thumbnail (a JPEG of the first panel, THUMBNAIL_WIDTH pixels wide, a few kB) and its
full picture (a PNG, fetched only when clicked). The page is rendered by Jinja2 from
igd/data/report.html.j2. numpy, Pillow and Jinja2 only: igctl makes reports without torch.
"""

from __future__ import annotations

import io
import json
import math
import os
from importlib import resources
from pathlib import Path
from typing import Any, Iterable, Mapping

from PIL import Image

from igd.output.files import write_atomically
from igd.request import WARN_ERROR

PAGE_SIZE = 100
THUMBNAIL_WIDTH = 128
INACCURATE_ABOVE = WARN_ERROR  # an estimated error above this marks a row "inaccurate", as igctl warns
FILES_SUFFIX = "-files"  # REPORT.html's pictures are in REPORT-files/


def files_dir(report: Path) -> Path:
    """Where ``report``'s pictures go: beside it, ``NAME-files/``."""
    return report.with_name(report.stem + FILES_SUFFIX)


def save_pictures(figure_png: bytes, panels: int, report: Path, name: str) -> tuple[str, str]:
    """Write a result's picture (of ``panels`` panels) and its thumbnail beside ``report``
    under ``name`` (a relative path, e.g. the result's); their hrefs relative to the report."""
    folder = files_dir(report)
    picture = folder / f"{name}.png"
    thumbnail = folder / f"{name}.thumb.jpg"
    picture.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(picture, figure_png)
    write_atomically(thumbnail, _thumbnail(figure_png, panels))
    return _href(picture, report), _href(thumbnail, report)


def row_of_summary(facts: Mapping[str, Any], href: str, picture: str | None, thumbnail: str | None) -> dict[str, Any]:
    """The report row of a result file, from `igctl show`'s summary of it."""
    targets = [t["name"] or str(t["index"]) for t in facts.get("targets", [])]
    prediction = facts.get("prediction") or {}
    return _row(href, picture, thumbnail, prediction=prediction.get("name"),
                probability=prediction.get("probability"), targets=targets,
                error=_worst(facts.get("error_estimate")), gap=_first(facts.get("completeness_gap")),
                steps=facts.get("n_steps"), insertion=_first(facts.get("insertion_area")),
                deletion=_first(facts.get("deletion_area")), provenance=facts.get("provenance") or {})


def row_of_status(status: Mapping[str, Any], picture: str | None, thumbnail: str | None,
                  provenance: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The report row of one of `igd batch`'s status lines (igd.batch.outputs)."""
    href = status.get("output") or status.get("path") or status.get("id") or "?"
    if not status.get("ok"):
        return _row(str(href), None, None, ok=False, code=status.get("code"), message=status.get("message"),
                    targets=[str(status.get("target"))] if status.get("target") is not None else [])
    return _row(str(href), picture, thumbnail, prediction=status.get("prediction"),
                probability=status.get("probability"), targets=[str(status.get("target_name"))],
                error=status.get("error_estimate"), gap=status.get("completeness_gap"), steps=status.get("n_steps"),
                insertion=status.get("insertion_area"), deletion=status.get("deletion_area"),
                provenance=dict(provenance or {}))


def failed_row(href: str, message: str) -> dict[str, Any]:
    """A result that could not be read or drawn."""
    return _row(href, None, None, ok=False, code="unreadable", message=message)


def render(rows: Iterable[Mapping[str, Any]], title: str, *, live_seconds: int = 0) -> str:
    """The page of ``rows``; ``live_seconds`` > 0 makes the browser reload it that often
    (a batch run still writing it)."""
    import jinja2

    listed = list(rows)
    failed = sum(not row["ok"] for row in listed)
    inaccurate = sum(row["ok"] and row["error"] is not None and row["error"] > INACCURATE_ABOVE for row in listed)
    summary = (f"{len(listed)} results: {len(listed) - failed} attributed ({inaccurate} with an estimated error "
               f"above {INACCURATE_ABOVE * 100:g} %), {failed} failed"
               + (f"; still running, reloaded every {live_seconds} s" if live_seconds else ""))
    template = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined).from_string(
        resources.files("igd").joinpath("data/report.html.j2").read_text(encoding="utf-8"))
    return template.render(title=title, summary=summary, rows=listed, page_size=PAGE_SIZE,
                           inaccurate_above=INACCURATE_ABOVE, live=live_seconds)


def write_report(report: Path, rows: Iterable[Mapping[str, Any]], title: str, *, live_seconds: int = 0) -> None:
    """Write the page atomically (a browser reloading it never sees half of it)."""
    write_atomically(report, render(rows, title, live_seconds=live_seconds).encode("utf-8"))


def _row(href: str, picture: str | None, thumbnail: str | None, *, ok: bool = True, code: str | None = None,
         message: str | None = None, prediction: str | None = None, probability: float | None = None,
         targets: list[str] | None = None, error: float | None = None, gap: float | None = None,
         steps: int | None = None, insertion: float | None = None, deletion: float | None = None,
         provenance: Mapping[str, Any] | None = None) -> dict[str, Any]:
    targets = targets or []
    return {
        "file": href, "picture": picture, "thumb": thumbnail, "ok": ok, "code": code, "message": message,
        "prediction": prediction, "probability": _number(probability), "targets": ", ".join(targets),
        "classes": sorted({*targets, *([prediction] if prediction else [])}),
        "error": _number(error, unbounded=True), "gap": _number(gap), "steps": steps,
        "insertion": _number(insertion), "deletion": _number(deletion),
        "provenance": {key: value for key, value in (provenance or {}).items() if _plain(value)},
    }


def _number(value: Any, unbounded: bool = False) -> float | None:
    """A JSON-ready number: None stays None; an infinite error (unbounded) is a large one."""
    if value is None:
        return None
    value = float(value)
    if not math.isfinite(value):
        return 1e300 if unbounded else None
    return value


def _first(value: Any) -> Any:
    return value[0] if isinstance(value, list) and value else value


def _worst(value: Any) -> Any:
    """The largest of a per-target value (None, infinite and all)."""
    if not isinstance(value, list):
        return value
    numbers = [float("inf") if v is None else float(v) for v in value]
    return max(numbers) if numbers else None


def _plain(value: Any) -> bool:
    return isinstance(value, (str, int, float, bool)) or (
        isinstance(value, list) and len(value) <= 16 and all(isinstance(v, (str, int, float)) for v in value))


def _thumbnail(figure_png: bytes, panels: int) -> bytes:
    """The first of a picture's ``panels`` panels (caption and image), THUMBNAIL_WIDTH pixels
    wide, as JPEG."""
    with Image.open(io.BytesIO(figure_png)) as picture:
        picture.load()
        panel = picture.crop((0, 0, picture.width // max(1, panels), picture.height)).convert("RGB")
    height = max(1, round(panel.height * THUMBNAIL_WIDTH / panel.width))
    buffer = io.BytesIO()
    panel.resize((THUMBNAIL_WIDTH, height), Image.Resampling.LANCZOS).save(buffer, format="JPEG", quality=80)
    return buffer.getvalue()


def _href(path: Path, report: Path) -> str:
    """``path`` relative to the report's folder, as a URL path."""
    return Path(os.path.relpath(path, report.parent)).as_posix()


def json_line(row: Mapping[str, Any]) -> str:
    return json.dumps(row, allow_nan=False)
