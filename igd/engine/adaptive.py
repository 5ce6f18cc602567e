"""Integrated Gradients to a tolerance: nodes placed where the integrand needs them.

Every image starts from the trapezoid rule on 17 evenly spaced nodes (0 and 1 among
them) and is refined in rounds. Each round bisects the quarter of its panels with the
largest estimated error (igd.engine.accuracy: ``h/2 |J| / sqrt(3)`` per panel, J the jump of
``(x - b) * g`` across it), reusing every gradient already computed, until the estimated
relative L2 error of IG is at most the tolerance or the image has used its cap of
points. Greedy bisection equalises the panels' errors, which is the optimal placement for
an integrand made of many small jumps (panel widths proportional to the cube root of the
jumps' density): on EfficientNet-Lite0 the jumps crowd near the baseline, and the nodes
follow them (docs/benchmarks.md, "Accuracy").

The answer is the trapezoid rule on the nodes used: ``IG = (x - b) * sum_k w_k g_k``
holds exactly with the returned ``alphas`` (increasing) and ``step_sizes``, as for the
fixed rules. All images of a pass share each round's forward+backward chunks; an image
that is done takes no more points. An image with several targets has one set of nodes
for all of them (one forward per point): a panel's priority adds its errors relative to
each target's IG in quadrature, and the image is done when every target meets the
tolerance.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import torch
from torch import Tensor, nn

from igd.engine import accuracy
from igd.engine.attribution import (
    Attribution, ChunkCallback, Path, PointForward, Target, check_max_batch, engine_mode, weighted_sum,
)
from igd.request import ADAPTIVE, ADAPTIVE_START

START_POINTS = ADAPTIVE_START  # the first look, and the fewest points an adaptive request may be capped at
FIRST_PANELS = START_POINTS - 1  # a power of two: the nodes lie on the grid below
SPLIT_FRACTION = 0.25  # of an image's panels, bisected per round
# Nodes are multiples of 2^-60, and a panel is bisected only while its midpoint is exact in
# float32 (so the path points are exactly the reported alphas): panels go down to 2^-60
# near 0 and to 2^-24 near 1. The fine end matters: BiT's GroupNorm after bias-free
# standardised convolutions makes the network scale-invariant along a zero-baseline path,
# and the target logit makes its whole rise at alphas of 1e-7 to 1e-2.
_GRID = 1 << 60


@dataclass
class _Image:
    """One image's refinement: its nodes (grid positions, increasing), their gradients
    (rows of the pass's gradient store) and target logits, and its panels' errors."""

    index: int
    tolerance: float
    cap: int
    nodes: list[int] = field(default_factory=list)
    rows: dict[int, int] = field(default_factory=dict)  # node -> row in the store
    estimates: list[float] = field(default_factory=list)  # one per target
    done: bool = False

    @property
    def estimate(self) -> float:
        """The largest of the targets' estimated errors."""
        return max(self.estimates, default=math.inf)

    def next_nodes(self, store: Tensor, delta: Tensor) -> list[int]:
        """Midpoints of the panels to bisect next (empty when done), after updating the
        estimates from the nodes so far. ``store``: (rows, T, *F)."""
        directional = store[[self.rows[k] for k in self.nodes]]
        alphas = torch.tensor(self.nodes, dtype=torch.float64) / _GRID
        weights = accuracy.trapezoid_weights(alphas).to(store.dtype).to(store.device)
        priority = torch.zeros(len(self.nodes) - 1, dtype=torch.float64)
        self.estimates = []
        for t in range(directional.shape[1]):
            errors = accuracy.panel_errors(alphas, directional[:, t], delta)
            integrated = delta * weighted_sum(directional[:, t].unsqueeze(0), weights)[0]
            self.estimates.append(accuracy.relative(float(errors.square().sum().sqrt()), integrated))
            size = float(torch.linalg.vector_norm(integrated.double()))
            # A target whose IG is still zero makes any panel with an error the most urgent.
            priority += (errors / size).square() if size > 0 else torch.where(errors > 0, math.inf, 0.0)
        errors = priority.sqrt()
        room = self.cap - len(self.nodes)
        if self.estimate <= self.tolerance or room <= 0:
            self.done = True
            return []
        for k, (a, b) in enumerate(zip(self.nodes, self.nodes[1:])):
            if not _splittable(a, b):
                errors[k] = -1.0  # as fine as float32 goes
        count = min(room, max(1, math.ceil(SPLIT_FRACTION * len(errors))))
        picked = [int(i) for i in torch.argsort(errors, descending=True)[:count] if errors[i] > 0]
        if not picked:
            self.done = True
        return [(self.nodes[i] + self.nodes[i + 1]) // 2 for i in picked]


def attribute_adaptive(
    forward: PointForward,
    inputs: Tensor,
    target: Target,
    *,
    tolerance: float | Sequence[float],
    max_steps: int | Sequence[int],
    baselines: Tensor | float | None = None,
    max_batch: int | None = None,
    allow_tf32: bool = False,
    modules: Iterable[nn.Module] = (),
    on_chunk: ChunkCallback | None = None,
) -> list[Attribution]:
    """IG of each of B inputs (B, *F) to ``tolerance`` (relative L2 error of IG, one for
    all or one per image) with at most ``max_steps`` path points each (likewise), in
    shared rounds of forward+backward chunks of at most ``max_batch`` points.

    Returns one single-image :class:`Attribution` per input (their numbers of points
    differ; one row per target of the image), with method ``"adaptive"``, ``tolerance``
    and ``tolerance_met`` (every target's) set.
    ``on_chunk(done, total)`` counts points against the sum of the caps.
    """
    batch = inputs.shape[0]
    tolerances = _per_image(tolerance, batch, "tolerance")
    caps = [int(c) for c in _per_image(max_steps, batch, "max_steps")]
    if any(not 0 < t <= 1 for t in tolerances) or any(c < START_POINTS for c in caps):
        raise ValueError(f"tolerance must be in (0, 1] and max_steps at least {START_POINTS}")
    check_max_batch(max_batch)
    images = [_Image(i, t, c) for i, (t, c) in enumerate(zip(tolerances, caps))]
    first = [k * (_GRID // FIRST_PANELS) for k in range(FIRST_PANELS + 1)]
    budget = sum(caps)

    with engine_mode(allow_tf32, modules):
        path = Path(forward, inputs, baselines, target, max_batch or budget)
        store = torch.empty((budget, path.width, *inputs.shape[1:]), dtype=inputs.dtype, device=inputs.device)
        logits = torch.empty((budget, path.width), dtype=torch.float64)
        used = 0
        wanted = {image.index: first for image in images}
        while wanted:
            point_image = torch.tensor([i for i, nodes in wanted.items() for _ in nodes], device=inputs.device)
            point_node = [k for nodes in wanted.values() for k in nodes]
            point_alpha = torch.tensor(point_node, dtype=torch.float64) / _GRID
            counted = None if on_chunk is None else _Offset(on_chunk, used, budget)
            grads, path_logits = path.gradients(point_image, point_alpha.to(inputs.device, inputs.dtype), counted)
            rows = range(used, used + len(point_node))
            store[used : used + len(point_node)] = grads
            logits[used : used + len(point_node)] = path_logits.double().cpu()
            used += len(point_node)
            del grads
            for row, i, k in zip(rows, point_image.tolist(), point_node):
                images[i].rows[k] = row
            for i, nodes in wanted.items():
                images[i].nodes = sorted(images[i].nodes + nodes)
            wanted = {}
            for image in images:
                if not image.done:
                    more = image.next_nodes(store, path.delta[image.index])
                    if more:
                        wanted[image.index] = more
        return [_answer(path, image, store, logits) for image in images]


def _answer(path: Path, image: _Image, store: Tensor, logits: Tensor) -> Attribution:
    """Image ``image``'s result, one row per target: the trapezoid rule on its nodes."""
    i, dtype, width = image.index, store.dtype, path.width
    rows = [image.rows[k] for k in image.nodes]
    alphas64 = torch.tensor(image.nodes, dtype=torch.float64) / _GRID
    directional = store[rows].transpose(0, 1).contiguous()  # (T, n, *F), a copy in node order
    weights = accuracy.trapezoid_weights(alphas64).to(dtype).to(store.device)
    delta = path.delta[i : i + 1]
    integrated = delta * weighted_sum(directional, weights)
    one = slice(i, i + 1)
    return Attribution(
        integrated_grads=integrated,
        directional_grads=directional,
        alphas=alphas64.to(dtype).to(store.device),
        step_sizes=weights,
        logits=path.rows(path.logits[one]),
        baseline_logits=path.rows(path.baseline_logits[one]),
        convergence_delta=path.convergence_delta(integrated, one),
        inputs=path.rows(path.inputs[one]),
        baselines=path.rows(path.baselines[one]),
        targets=path.targets[i],
        rule=ADAPTIVE,
        path_logits=logits[rows].to(dtype).transpose(0, 1).contiguous(),
        error_estimate=torch.tensor(image.estimates, dtype=torch.float64).view(width),
        tolerance=image.tolerance,
        tolerance_met=image.estimate <= image.tolerance,
    )


def _splittable(start: int, end: int) -> bool:
    """Whether the panel between grid nodes ``start`` < ``end`` has a midpoint on the grid
    whose alpha is exact in float32 (and so differs from both ends)."""
    if (start + end) % 2:
        return False
    alpha = (start + end) // 2 / _GRID
    return float(torch.tensor(alpha, dtype=torch.float32)) == alpha


@dataclass(frozen=True)
class _Offset:
    """A round's chunk callback: its points counted after the ``before`` already done,
    against the ``budget`` of the whole pass."""

    on_chunk: ChunkCallback
    before: int
    budget: int

    def __call__(self, done: int, _total: int) -> None:
        self.on_chunk(self.before + done, self.budget)


def _per_image(value: float | Sequence[float], batch: int, name: str) -> list[float]:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return [float(value)] * batch
    values = [float(v) for v in value]
    if len(values) != batch:
        raise ValueError(f"{name}: one value or {batch} (one per image), got {len(values)}")
    return values
