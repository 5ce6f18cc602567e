"""What one attribution answered, in one shape, and every form it is handed out in.

An :class:`Answer` always holds T targets on P paths (one of each is the common case).
Its facts come from igd.output.keys' one table; the result file is the arrays of
igd.output.results with those facts and the provenance, in the predecessor's layout
where the answer is one target on one path (:func:`~igd.output.results.predecessor_layout`,
at the edge where it is written); the daemon's answer map and `igd batch`'s rows carry
the same facts under their names there.
"""

from __future__ import annotations

import datetime
import math
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, BinaryIO

import numpy as np
import torch
from torch import Tensor

from igd.engine.accuracy import completeness_gap
from igd.engine.attribution import Attribution, AttributionSlice
from igd.engine.faithfulness import Curves
from igd.engine.paths import STRAIGHT
from igd.engine.xrai import Regions
from igd.models import LoadedModel
from igd.output.figure import figure_png
from igd.output.keys import FACTS, Fact, json_safe, nested_set
from igd.output.provenance import ComputeFacts, now, provenance
from igd.output.results import (Result, encode, file_arrays, idgi_of, mean_integrated_grads, predecessor_layout,
                                write_result)
from igd.request import AttributeRequest


@dataclass(frozen=True)
class TargetFacts:
    """One target's facts, over the mean of its paths' attributions."""

    index: int
    name: str
    convergence_delta: float  # sum(IG) - (F_t(x) - F_t(b)), both means over the paths
    completeness_gap: float  # the delta relative to the rise (igd.engine.accuracy.completeness_gap)
    error_estimate: float  # the estimated relative L2 error of the mean IG
    integrand: str  # "smooth" where the estimate found it so on every path (spectral), else "kinked"
    metrics: dict[str, float] = field(default_factory=dict)  # {metric: area}, once measured


@dataclass(frozen=True)
class Answer:
    """What one attribution produced: the part of a pass that is this image's, what was
    asked, the model, and what was added after the pass (faithfulness ``curves``)."""

    part: AttributionSlice
    request: AttributeRequest
    model: LoadedModel
    path_names: tuple[str, ...] = ()
    inputs: Tensor | None = None  # (1, C, H, W): the image in input space
    compute: ComputeFacts = ComputeFacts()  # how the worker computed it
    created: datetime.datetime = field(default_factory=now)  # when the request arrived
    curves: tuple[Curves, ...] = ()  # the faithfulness curves of each target, once measured
    regions: tuple[Regions, ...] = ()  # XRAI's regions of each target, once ranked

    @cached_property
    def provenance(self) -> dict[str, Any]:
        """What made it (igd.output.provenance): weights, preprocessing, precision, versions, when."""
        return provenance(self.model, self.request, self.compute, self.created)

    @property
    def attribution(self) -> Attribution:
        return self.part.attribution

    @property
    def combined(self) -> bool:
        """Several targets or paths, or a path that does not end at the image (noise): not
        the predecessor's layout."""
        return self.part.paths > 1 or self.part.width > 1 or self.request.noise > 0

    @property
    def rows(self) -> list[list[int]]:
        """rows[t][p]: the attribution's row of target t on path p."""
        return [[self.part.row(p, t) for p in range(self.part.paths)] for t in range(self.part.width)]

    @property
    def curve_name(self) -> str | None:
        """The path's name, unless it is the straight line."""
        curve = self.attribution.curve
        return None if curve is STRAIGHT else curve.name

    @cached_property
    def targets(self) -> list[TargetFacts]:
        return [self._facts_of(t, rows) for t, rows in enumerate(self.rows)]

    @cached_property
    def prediction(self) -> tuple[int, str, float]:
        """(index, name, probability) of the most likely class of the input."""
        (top,) = self.model.top_classes(self.logits, 1)
        return top

    @property
    def logits(self) -> Tensor:
        """(K,): the logits at the image."""
        part = self.part
        return part.logits if part.logits is not None else part.attribution.logits[part.index]

    def _facts_of(self, t: int, rows: list[int]) -> TargetFacts:
        attribution = self.attribution
        target = int(attribution.targets[rows[0]])
        if len(rows) == 1:  # the engine's own figures, as they always were
            delta = float(attribution.convergence_delta[rows[0]])
            estimate = float(attribution.error_estimate[rows[0]])
        else:
            integrated = attribution.integrated_grads[rows].double()
            mean = integrated.mean(dim=0)
            sizes = integrated.flatten(1).norm(dim=1)
            estimates = attribution.error_estimate[rows]
            size = float(mean.norm())
            # The paths share their nodes, so their errors need not be independent: add them.
            absolute = torch.where(sizes > 0, estimates * sizes, torch.where(estimates > 0, math.inf, 0.0))
            estimate = float(absolute.sum()) / len(rows) / size if size else math.inf
        ends = attribution.logits[rows, target].double()
        starts = attribution.baseline_logits[rows, target].double()
        rise = float((ends - starts).mean())
        if len(rows) > 1:
            delta = float(mean.sum()) - rise
        scale = float(torch.cat([ends, starts]).abs().max())
        eps = float(torch.finfo(attribution.logits.dtype).eps)
        metrics = ({metric: getattr(self.curves[t], f"{metric}_area") for metric in self.request.metrics}
                   if self.curves else {})
        integrand = "smooth" if bool(attribution.smooth[rows].all()) else "kinked"
        return TargetFacts(target, self.model.class_names[target], delta,
                           completeness_gap(delta, rise, scale, eps), estimate, integrand, metrics)

    def facts(self) -> list[tuple[Fact, Any]]:
        """Each fact the answer has, with its value: a list of one per target for the
        per-target facts."""
        found = []
        for fact in FACTS:
            if fact.per_target:
                value: Any = [fact.value(self, target) for target in self.targets]
                if all(v is None for v in value):
                    continue
            else:
                value = fact.value(self, None)
                if value is None:
                    continue
            found.append((fact, value))
        return found

    def result(self, defer_intermediates: bool = False) -> Result:
        """The result dict: the arrays, the facts under their file names, the provenance."""
        attribution, request = self.attribution, self.request
        assert self.inputs is not None
        result = file_arrays(attribution, self.rows, inputs=self.inputs, logits=self.logits,
                             path_names=list(self.path_names), noisy=request.noise > 0,
                             defer_intermediates=defer_intermediates)
        if request.idgi:
            result["idgi"] = idgi_of(attribution, self.rows)
        if self.curves:
            result["metric_fractions"] = self.curves[0].fractions.float()
            for metric in request.metrics:
                result[f"{metric}_curve"] = torch.stack([getattr(c, metric) for c in self.curves]).float()
        if self.regions:
            result["xrai"] = torch.from_numpy(np.stack([regions.map for regions in self.regions]))
            result["xrai_segments"] = torch.from_numpy(np.stack([regions.ranks for regions in self.regions]))
            result["xrai_attribution"] = mean_integrated_grads(attribution, self.rows)[:, 0]
        for fact, value in self.facts():
            if fact.file is not None:
                result[fact.file] = _file_value(value) if self.combined and fact.per_target else value
        result.update(self.provenance)
        return result if self.combined else predecessor_layout(result)

    def summary(self) -> dict[str, Any]:
        """The facts an entry point reports beside the file: the daemon's answer map (and
        with several targets or paths, each target's facts in ``targets``)."""
        summary: dict[str, Any] = {}
        facts = self.facts()
        for fact, value in facts:
            if fact.wire is not None:
                nested_set(summary, fact.wire, json_safe(value[0] if fact.per_target else value))
        if self.combined:
            entries: list[dict[str, Any]] = [{} for _ in self.targets]
            for fact, value in facts:
                if fact.target_wire is not None:
                    for entry, each in zip(entries, value):
                        nested_set(entry, fact.target_wire, json_safe(each))
            summary["targets"] = entries
        return summary

    def row(self) -> dict[str, Any]:
        """The facts by their flat names, the first target's of per-target ones: `igd
        batch`'s status line and parquet row."""
        return {fact.name: json_safe(value[0] if fact.per_target else value) for fact, value in self.facts()}

    def mean_attributions(self) -> list[Tensor]:
        """Each target's IG, the mean over its paths: (C, H, W) each."""
        attribution = self.attribution
        return [attribution.integrated_grads[rows].mean(dim=0) for rows in self.rows]

    def file_bytes(self) -> bytes:
        """The result file in the request's format, exactly what igctl writes."""
        return encode(self.result(), self.request.format, self.request.gzip_level)

    def write_file(self, out: BinaryIO) -> None:
        """Write the result file to ``out`` as it is made (the same bytes as
        :meth:`file_bytes`), at the least memory: the path points are made only when
        their turn comes, and each large tensor is freed once written, so this answer
        (its per-step gradients included) is unusable afterwards."""
        write_result(self.result(defer_intermediates=True), self.request.format, self.request.gzip_level, out,
                     consume=True)

    def heatmap_png(self) -> bytes:
        """The result's picture (igd.output.figure): drawn from the values its file holds, so
        `igctl show --heatmap` of the file draws the same bytes."""
        shown: dict[str, Any] = {fact.file: value for fact, value in self.facts()
                                 if fact.file in ("target_class", "target_name", "error_estimate")}
        assert self.inputs is not None
        shown.update(integrated_grads=mean_integrated_grads(self.attribution, self.rows),
                     input=self.inputs.detach().float().cpu(), output=self.logits.detach().float().cpu().view(1, -1),
                     mean=self.provenance["mean"], std=self.provenance["std"])
        return figure_png(shown)


def _file_value(values: list[Any]) -> Any:
    """A per-target fact of several targets in the result file: numbers as a tensor (T,),
    anything else (class indices, names) as a list."""
    if all(isinstance(v, float) for v in values):
        return torch.tensor(values)
    return values
