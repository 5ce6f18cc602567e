"""One description of an answer's facts, and the name each has wherever it appears.

A fact (the target, the prediction, the accuracy figures, the rule, ...) is computed once,
from an answer (igd.output.answer.Answer), and appears under its names in

- the result file (``file``: a key of the dict; per-target facts are a list, or a tensor of
  numbers, with several targets, the plain value in the predecessor's layout),
- the daemon's answer map (``wire``: a path of keys, e.g. ``("target", "index")``; per-target
  facts also in each entry of its ``targets`` list, the path without a leading "target"),
- igctl's ``--json`` records, `igd batch`'s status lines and its parquet columns (``name``).

Adding a fact here adds it to all of them. Torch-free: igctl reads the wire names from it.
The arrays of the result file are igd.output.results'; :data:`PARQUET_ARRAYS` says which of
them `igd batch --format parquet` stores as columns.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

from igd.request import METRICS

# value(answer, target): the fact of an answer; for a per-target fact, of that target (an
# igd.output.answer.TargetFacts; None for the others). None: the answer has no such fact.
Value = Callable[[Any, Any], Any]


@dataclass(frozen=True)
class Fact:
    name: str  # igctl's records, igd batch's status lines and parquet columns
    value: Value
    file: str | None = None  # its key in the result file; None: not written there
    wire: tuple[str, ...] | None = None  # where the daemon's answer map has it; None: not sent
    per_target: bool = False

    @property
    def target_wire(self) -> tuple[str, ...] | None:
        """Where each entry of the answer map's ``targets`` list has a per-target fact."""
        if self.wire is None or not self.per_target:
            return None
        return self.wire[1:] if self.wire[0] == "target" and len(self.wire) > 1 else self.wire


def _metric_area(metric: str) -> Value:
    return lambda answer, target: target.metrics.get(metric)


FACTS: tuple[Fact, ...] = (
    Fact("target_index", lambda a, t: t.index, "target_class", ("target", "index"), per_target=True),
    Fact("target_name", lambda a, t: t.name, "target_name", ("target", "name"), per_target=True),
    Fact("prediction_index", lambda a, t: a.prediction[0], "prediction_index", ("prediction", "index")),
    Fact("prediction", lambda a, t: a.prediction[1], "prediction_name", ("prediction", "name")),
    Fact("probability", lambda a, t: a.prediction[2], "prediction_probability", ("prediction", "probability")),
    Fact("convergence_delta", lambda a, t: t.convergence_delta, "convergence_delta", ("convergence_delta",),
         per_target=True),
    Fact("completeness_gap", lambda a, t: t.completeness_gap, "completeness_gap", ("completeness_gap",),
         per_target=True),
    Fact("error_estimate", lambda a, t: t.error_estimate, "error_estimate", ("error_estimate",), per_target=True),
    Fact("integrand", lambda a, t: t.integrand, "integrand", ("integrand",), per_target=True),
    *(Fact(f"{metric}_area", _metric_area(metric), f"{metric}_area", ("metrics", metric), per_target=True)
      for metric in METRICS.choices),
    Fact("baseline", lambda a, t: a.request.baseline, "baseline_name", ("baseline",)),
    Fact("n_steps", lambda a, t: a.attribution.n_steps, "n_steps", ("n_steps",)),
    Fact("method", lambda a, t: a.attribution.rule, "method", ("method",)),
    Fact("integration_path", lambda a, t: a.curve_name, None, ("path",)),  # flat "path" is igd batch's image
    Fact("paths", lambda a, t: a.part.paths if a.combined else None, None, ("paths",)),
    Fact("tolerance", lambda a, t: a.attribution.tolerance, "tolerance", ("tolerance",)),
    Fact("tolerance_met", lambda a, t: None if a.attribution.tolerance is None else bool(a.attribution.tolerance_met),
         "tolerance_met", ("tolerance_met",)),
    Fact("samples", lambda a, t: a.request.samples if a.request.samples > 1 or a.request.noise else None, "samples",
         ("samples",)),
    Fact("noise", lambda a, t: a.request.noise if a.request.samples > 1 or a.request.noise else None, "noise",
         ("noise",)),
    Fact("max_batch", lambda a, t: a.part.max_batch, "max_batch"),
    Fact("model", lambda a, t: a.model.name, "model"),
)

# The result file's arrays with a leading target axis (igd.output.results.file_arrays), and
# the per-target facts: the predecessor's layout (one target, one path) drops that axis.
TARGET_AXIS = frozenset({"integrated_grads", "integrated_directional_grads", "path_logits", "idgi",
                         "xrai", "xrai_segments", "xrai_attribution",
                         *(f"{metric}_curve" for metric in METRICS.choices),
                         *(fact.file for fact in FACTS if fact.per_target and fact.file)})
# Keys that describe the axes of a result with several targets or paths; not in the predecessor's layout.
COMBINED_ONLY = frozenset({"axes", "path_names"})

# `igd batch --format parquet`: column -> the result file's array it holds (flat), and the
# ones only stored with --with-steps.
PARQUET_ARRAYS = {"integrated_grads": "integrated_grads", "idgi": "idgi", "xrai": "xrai"}
PARQUET_STEP_ARRAYS = {"directional_grads": "integrated_directional_grads", "step_sizes": "step_sizes"}


def json_safe(value: Any) -> Any:
    """JSON has no infinity or NaN: such a float is null (e.g. an unbounded error estimate)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def nested_get(tree: dict[str, Any], path: tuple[str, ...]) -> Any:
    """``tree[path[0]][path[1]]...``, or None where any step is missing."""
    for key in path:
        if not isinstance(tree, dict) or key not in tree:
            return None
        tree = tree[key]
    return tree


def nested_set(tree: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def record_of(answer_map: dict[str, Any]) -> dict[str, Any]:
    """The facts of a daemon's answer map by their flat names (an older daemon's missing
    ones are left out): what igctl records."""
    record = {}
    for fact in FACTS:
        if fact.wire is not None:
            value = nested_get(answer_map, fact.wire)
            if value is not None or _sent_as_null(answer_map, fact.wire):
                record[fact.name] = value
    return record


def _sent_as_null(tree: dict[str, Any], path: tuple[str, ...]) -> bool:
    parent = nested_get(tree, path[:-1]) if len(path) > 1 else tree
    return isinstance(parent, dict) and path[-1] in parent
