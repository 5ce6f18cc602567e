"""`igctl show`: what a saved result file says, and its picture, without a daemon.

Reads torch and npz results without torch (igd.output.reader) and draws them with igd.output.figure,
the picture igd's own heatmaps are. numpy and Pillow only.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Callable, TypeVar

import numpy as np

from igd.output.figure import Look, figure_png
from igd.output.reader import PROVENANCE_KEYS, UnreadableResult, read_result
from igd.output.styles import REGIONS

MAX_SHOWN_VALUES = 100_000
"""The most values (numbers, strings) one summary takes from a result (igd's show a few
dozen): a file holding more where a summary looks is refused rather than listed."""

_Function = TypeVar("_Function", bound=Callable[..., Any])


def _unreadable_if_odd(function: _Function) -> _Function:
    """``function`` of a result read from a file, which may hold anything the reader lets
    through (any key missing, any value of another kind or shape): what it cannot take is
    an UnreadableResult, ``not an igd result (why)``, like the reader's own refusals."""

    @functools.wraps(function)
    def checked(*args: Any, **kwargs: Any) -> Any:
        try:
            return function(*args, **kwargs)
        except UnreadableResult:
            raise
        except (TypeError, ValueError, KeyError, IndexError, AttributeError, ArithmeticError, MemoryError,
                RecursionError) as error:
            said = str(error).splitlines()[0][:200] if str(error) else ""
            raise UnreadableResult(f"not an igd result (a value it cannot show: {type(error).__name__}"
                                   f"{': ' + said if said else ''})") from None

    return checked  # type: ignore[return-value]


@_unreadable_if_odd
def summary(path: Path, result: dict[str, Any]) -> dict[str, Any]:
    """The facts of a result, JSON-ready: targets, prediction, accuracy, steps, provenance."""
    plain = _Plain()
    names, indices = plain.listed(result.get("target_name")), plain.listed(result.get("target_class"))
    facts: dict[str, Any] = {
        "file": str(path),
        "targets": [{"index": int(i), "name": n} for i, n in zip(indices, names or [None] * len(indices))],
        "n_steps": plain(result.get("n_steps", len(result.get("step_sizes", [])))),
        "method": plain(result.get("method")),
        "baseline": plain(result.get("baseline_name")),
    }
    if "prediction_name" in result:
        facts["prediction"] = {"index": int(result["prediction_index"]), "name": str(result["prediction_name"]),
                               "probability": float(result["prediction_probability"])}
    elif "output" in result:  # an older file: the most likely index only
        facts["prediction"] = {"index": int(np.argmax(np.asarray(result["output"])[0])), "name": None,
                               "probability": None}
    for key in ("convergence_delta", "completeness_gap", "error_estimate", "integrand", "tolerance", "tolerance_met",
                "insertion_area", "deletion_area", "path", "blur_sigma", "samples", "noise", "model", "path_names",
                "axes", "max_batch"):
        if key in result:
            facts[key] = plain(result[key])
    facts["provenance"] = {key: plain(result[key]) for key in PROVENANCE_KEYS if key in result}
    return facts


@_unreadable_if_odd
def describe(facts: dict[str, Any]) -> list[str]:
    """The summary as lines for people."""
    targets = ", ".join(f"{t['name']!r} ({t['index']})" if t["name"] else str(t["index"]) for t in facts["targets"])
    lines = [f"{facts['file']}: {targets}"]
    prediction = facts.get("prediction")
    if prediction:
        name = repr(prediction["name"]) if prediction["name"] else f"class {prediction['index']}"
        probability = f" {prediction['probability']:.2f}" if prediction["probability"] is not None else ""
        lines[0] += f"; prediction {name}{probability}"
    path = f" along Blur IG's path (sigma {facts['blur_sigma']:g})" if facts.get("path") == "blur" else \
        f" from the {facts['baseline']} baseline"
    lines.append(f"  {facts['n_steps']} {facts['method']} steps{path}; {_accuracy(facts)}")
    origin = facts["provenance"]
    if origin:
        lines.append(f"  model {facts.get('model', '?')} ({origin.get('model_family', '?')}): "
                     f"{origin.get('model_description', '')}; weights sha256 {origin.get('weights_sha256', '?')}")
        size = "x".join(str(int(v)) for v in origin.get("input_size", []))
        lines.append(f"  preprocessing: {origin.get('resize', '?')} to {size}, mean {_numbers(origin.get('mean'))}, "
                     f"std {_numbers(origin.get('std'))}; classes: {origin.get('classes_source', '?')}")
        lines.append(f"  computed {origin.get('created', '?')} on {origin.get('device_type', '?')} in "
                     f"{origin.get('precision', '?')} ({origin.get('memory_format', '?')}, "
                     f"{origin.get('compiler', 'eager')}), chunks of {facts.get('max_batch', '?')} "
                     f"({origin.get('chunk_source', '?')}), igd "
                     f"{origin.get('igd_version', '?')}, torch {origin.get('torch_version', '?')}, torchvision "
                     f"{origin.get('torchvision_version', '?')}")
    else:
        lines.append("  no provenance recorded (a file from before igd recorded it, or from the predecessor)")
    if facts.get("heatmap"):
        lines.append(f"  heatmap written to {facts['heatmap']}")
    return [_printable(line) for line in lines]


def picture(result: dict[str, Any], look: Look) -> bytes:
    """The result's picture as PNG (igd.output.figure: what the daemon's --heatmap draws)."""
    if look.style == REGIONS and "xrai" not in result:
        raise ValueError("no XRAI regions in this result to draw (attribute with --regions xrai)")
    return _drawn(result, look)


@_unreadable_if_odd
def _drawn(result: dict[str, Any], look: Look) -> bytes:
    return figure_png(result, look)


def load(path: Path) -> dict[str, Any]:
    return read_result(path)


def _accuracy(facts: dict[str, Any]) -> str:
    parts = []
    for key, label in (("error_estimate", "estimated error"), ("completeness_gap", "completeness gap")):
        if key in facts:
            parts.append(f"{label} {_percents(facts[key], signed=key == 'completeness_gap')}")
    if not parts and "convergence_delta" in facts:
        parts.append(f"convergence delta {_numbers(facts['convergence_delta'])}")
    return ", ".join(parts) or "no accuracy recorded"


def _percents(value: Any, signed: bool) -> str:
    values = value if isinstance(value, list) else [value]
    shown = [("unbounded" if v is None or not np.isfinite(v) else f"{v * 100:{'+' if signed else ''}.1f} %")
             for v in values]
    return ", ".join(shown)


def _numbers(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(f"{float(v):.4g}" for v in value) + "]"
    return "?" if value is None else f"{float(value):.4g}"


def _printable(line: str) -> str:
    """``line`` with control characters (a file's own escape sequences, line breaks) and
    other unprintable ones written as Python escapes."""
    if line.isprintable():
        return line
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in line)


class _Plain:
    """JSON-ready values of one summary: arrays as lists, numpy scalars as Python numbers,
    also inside lists; at most MAX_SHOWN_VALUES values in all, counted before converting."""

    def __init__(self) -> None:
        self.room = MAX_SHOWN_VALUES

    def _take(self, count: int) -> None:
        self.room -= count
        if self.room < 0:
            raise UnreadableResult(f"not an igd result (over {MAX_SHOWN_VALUES:,} values where a summary looks)")

    def __call__(self, value: Any) -> Any:
        if isinstance(value, np.ndarray):
            self._take(value.size)
            return value.tolist()
        if isinstance(value, np.generic):
            return value.item()
        if isinstance(value, (list, tuple)):
            self._take(len(value))
            return [self(item) for item in value]
        return value

    def listed(self, value: Any) -> list[Any]:
        if value is None:
            return []
        if isinstance(value, np.ndarray):
            return list(self(value)) if value.ndim else [self(value.item())]
        return self(value) if isinstance(value, (list, tuple)) else [self(value)]
