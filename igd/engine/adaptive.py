"""Integrated Gradients to a tolerance: a Gauss-Legendre look first, then nodes placed where
the integrand needs them.

**Smooth integrands** (GELU/softmax nets such as ViTs): the first look is Gauss-Legendre
on FIRST_LOOK nodes, and its error estimate (igd.engine.accuracy.legendre_error, from the
decay of the Legendre coefficients the nodes determine) tells whether the integrand is
smooth there. If it is and the estimate meets the tolerance, that is the answer: Gauss-
Legendre's accuracy, which no other rule matches at the same points.

**Kinked integrands** (ReLU nets: the gradient jumps along the path) and integrands whose
action the look misses (BiT's GroupNorm after bias-free standardised convolutions makes
the net scale-invariant along a zero-baseline path: its target logit rises at alphas of
1e-7 to 1e-2): the look's nodes, with 0 and 1 added, become the first nodes of the
trapezoid rule, refined in rounds. Each round bisects the quarter of the intervals between
neighbouring nodes with the largest estimated error, reusing every gradient already
computed, until the estimated relative L2 error of IG is at most the tolerance or the
image has used its cap of points. An interval's error is the larger of
- the jump model's ``h/2 |J| / sqrt(3)`` (igd.engine.accuracy; J the jump of
  ``(x - b) * g`` across it): many small jumps, optimally placed by greedy bisection
  (panel widths go as the cube root of the jumps' density);
- what its completeness check proves missing: the trapezoid's ``sum(f)`` over the
  interval against ``F(end) - F(start)`` from the path's logits (free with the
  gradients), a lower bound of its L1 error, scaled to L2 as IG's own norms are. This
  catches a rise no node sees.
Intervals near 0 go down to 2^-60 wide (float32 resolves alphas there), so a rise
concentrated at the baseline is followed down.

``IG = (x - b) * sum_k w_k g_k`` holds exactly with the returned ``alphas`` (increasing)
and ``step_sizes``, as for the fixed rules. All images of a pass share each round's
forward+backward chunks; an image that is done takes no more points. An image with several
targets has one set of nodes for all of them (one forward per point): it stays with
Gauss-Legendre only if every target's integrand is smooth and meets the tolerance; an
interval's priority adds its errors relative to each target's IG in quadrature, and the
image is done when every target meets the tolerance.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import torch
from torch import Tensor, nn

from igd.engine import accuracy
from igd.engine.attribution import (
    Attribution, ChunkCallback, Path, PointForward, Target, check_max_batch, engine_mode, quadrature, weighted_sum,
)
from igd.request import ADAPTIVE, ADAPTIVE_START

START_POINTS = ADAPTIVE_START  # the fewest points an adaptive request may be capped at
FIRST_LOOK = START_POINTS - 2  # Gauss-Legendre nodes of the first look (and then 0 and 1: START_POINTS)
SPLIT_FRACTION = 0.25  # of an image's intervals, bisected per round at most
ENOUGH_MARGIN = 0.8  # a round bisects what should bring the estimate to this fraction of the tolerance
# The narrowest interval that is bisected (float32 resolves alphas this small near the
# baseline); a midpoint must also be a float32 strictly between its ends, so that the path
# points are exactly the reported alphas.
_SMALLEST = 2.0**-60


@dataclass
class _Image:
    """One image's refinement: its nodes (alphas, increasing, exact in float32), the rows
    of the pass's store holding their gradients and logits, and what the last round found."""

    index: int
    tolerance: float
    cap: int
    nodes: list[float]
    rows: dict[float, int] = field(default_factory=dict)  # node -> row in the store
    estimates: list[float] = field(default_factory=list)  # one per target
    gauss_legendre: bool = True  # still the first look's rule
    done: bool = False

    @property
    def estimate(self) -> float:
        """The largest of the targets' estimated errors."""
        return max(self.estimates, default=math.inf)

    def weights(self) -> Tensor:
        """(n,) float64: the rule's weights at :attr:`nodes`."""
        if self.gauss_legendre:
            return torch.tensor(quadrature("gausslegendre", len(self.nodes))[1], dtype=torch.float64)
        return accuracy.trapezoid_weights(torch.tensor(self.nodes, dtype=torch.float64))

    def next_nodes(self, store: _Store, delta: Tensor, ends: Tensor) -> list[float]:
        """The nodes to add next (empty when done), after estimating every target's error
        from the nodes so far (``delta``: x - b (*F); ``ends``: (T, 2) float64, each target's
        logit at the image and at the start)."""
        rows = [self.rows[k] for k in self.nodes]
        alphas = torch.tensor(self.nodes, dtype=torch.float64)
        if self.gauss_legendre:
            smooth = self._gauss_legendre(store, rows, alphas, delta, ends)
            if smooth and self.estimate <= self.tolerance:
                self.done = True
                return []
            self.gauss_legendre = False
            return [0.0, 1.0]  # the trapezoid's ends: its first round
        priority = self._trapezoid(store, rows, alphas, delta)
        room = self.cap - len(self.nodes)
        if self.estimate <= self.tolerance or room <= 0:
            self.done = True
            return []
        for k, (a, b) in enumerate(zip(self.nodes, self.nodes[1:])):
            if _midpoint(a, b) is None:
                priority[k] = -1.0  # as fine as float32 goes
        count = min(room, max(1, math.ceil(SPLIT_FRACTION * len(priority))), self._enough(priority))
        picked = [int(i) for i in torch.argsort(priority, descending=True)[:count] if priority[i] > 0]
        if not picked:
            self.done = True
        return [_midpoint(self.nodes[i], self.nodes[i + 1]) for i in picked]

    def _enough(self, priority: Tensor) -> int:
        """How many of the worst intervals to bisect for the estimate to meet the tolerance,
        if each bisected interval's error halves (two halves of a quarter of the jumps' error
        each, in quadrature) and the rest stays: the last round takes no more than it needs."""
        squared = priority.clamp(min=0).square().sort(descending=True).values
        rest = max(self.estimate**2 - float(squared.sum()), 0.0)  # what no bisection changes
        remaining = float(squared.sum())
        for count, part in enumerate(squared.tolist(), start=1):
            remaining -= 0.75 * part
            if rest + remaining <= (ENOUGH_MARGIN * self.tolerance) ** 2:
                return count
        return len(squared)

    def _gauss_legendre(self, store: _Store, rows: list[int], alphas: Tensor, delta: Tensor, ends: Tensor) -> bool:
        """Estimate the first look's error per target; whether every target's integrand is
        smooth. ``ends``: (T, 2) float64, each target's logit at the image and at the start."""
        weights = self.weights().to(delta)
        self.estimates, smooth = [], True
        for t in range(store.width):
            directional = store.grads(rows, t)
            integrated = delta * weighted_sum(directional.unsqueeze(0), weights)[0]
            logits = torch.cat([ends[t, 1:], store.logits(rows, t), ends[t, :1]])  # start, nodes, end
            error = accuracy.legendre_error(alphas, weights, directional, delta, integrated, logits)
            smooth = smooth and error is not None
            self.estimates.append(math.inf if error is None else accuracy.relative(error, integrated))
        return smooth

    def _trapezoid(self, store: _Store, rows: list[int], alphas: Tensor, delta: Tensor) -> Tensor:
        """Estimate the trapezoid's error per target; each interval's priority (n-1,)."""
        weights = self.weights()
        priority = torch.zeros(len(self.nodes) - 1, dtype=torch.float64)
        self.estimates = []
        for t in range(store.width):
            directional = store.grads(rows, t)
            integrated = delta * weighted_sum(directional.unsqueeze(0), weights.to(delta))[0]
            norms = accuracy.Norms.of(integrated)
            errors = torch.maximum(accuracy.panel_errors(alphas, directional, delta),
                                   accuracy.missed(alphas, directional, delta, store.logits(rows, t), norms))
            self.estimates.append(accuracy.relative(float(errors.square().sum().sqrt()), integrated))
            # A target whose IG is still zero makes any interval with an error the most urgent.
            priority += (errors / norms.l2).square() if norms.l2 > 0 else torch.where(errors > 0, math.inf, 0.0)
        return priority.sqrt()


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
    # The look's nodes as float32 has them: the path points are made at exactly these alphas.
    look = torch.tensor(quadrature("gausslegendre", FIRST_LOOK)[0], dtype=torch.float32).double().tolist()
    images = [_Image(i, t, c, []) for i, (t, c) in enumerate(zip(tolerances, caps))]
    budget = sum(caps)

    with engine_mode(allow_tf32, modules):
        path = Path(forward, inputs, baselines, target, max_batch or budget)
        store = _Store()
        wanted = {image.index: look for image in images}
        while wanted:
            point_image = torch.tensor([i for i, nodes in wanted.items() for _ in nodes], device=inputs.device)
            point_node = [k for nodes in wanted.values() for k in nodes]
            point_alpha = torch.tensor(point_node, dtype=torch.float64).to(inputs.device, inputs.dtype)
            counted = None if on_chunk is None else _Offset(on_chunk, store.size, budget)
            grads, path_logits = path.gradients(point_image, point_alpha, counted)
            rows = store.add(grads, path_logits.double().cpu())
            del grads
            for row, i, k in zip(rows, point_image.tolist(), point_node):
                images[i].rows[k] = row
            for i, nodes in wanted.items():
                images[i].nodes = sorted(images[i].nodes + nodes)
            wanted = {}
            for image in images:
                if not image.done:
                    more = image.next_nodes(store, path.delta[image.index], _end_logits(path, image.index))
                    if more:
                        wanted[image.index] = more
        return [_answer(path, image, store) for image in images]


class _Store:
    """The gradients (rows, T, *F) and target logits (rows, T) float64 of a pass, a round's
    worth at a time (memory grows with the points taken, not with the caps)."""

    def __init__(self) -> None:
        self._grads: list[Tensor] = []
        self._logits: list[Tensor] = []
        self._first: list[int] = []  # each round's first row
        self.size = 0

    @property
    def width(self) -> int:
        """T, the targets per image."""
        return int(self._grads[0].shape[1])

    def add(self, grads: Tensor, logits: Tensor) -> range:
        """Store a round's rows; their row numbers."""
        self._grads.append(grads)
        self._logits.append(logits)
        self._first.append(self.size)
        self.size += len(grads)
        return range(self.size - len(grads), self.size)

    def grads(self, rows: list[int], target: int | slice = slice(None)) -> Tensor:
        """(len(rows), *F) gradients of ``rows`` for ``target``, or (len(rows), T, *F) for all."""
        return torch.stack([self._grads[part][offset, target] for part, offset in self._where(rows)])

    def logits(self, rows: list[int], target: int | slice = slice(None)) -> Tensor:
        """(len(rows),) float64 target logits of ``rows`` for ``target``, or (len(rows), T)."""
        return torch.stack([self._logits[part][offset, target] for part, offset in self._where(rows)])

    def _where(self, rows: list[int]) -> list[tuple[int, int]]:
        places = []
        for row in rows:
            part = bisect.bisect_right(self._first, row) - 1
            places.append((part, row - self._first[part]))
        return places


def _answer(path: Path, image: _Image, store: _Store) -> Attribution:
    """Image ``image``'s result, one row per target: its rule on its nodes."""
    i, width = image.index, path.width
    rows = [image.rows[k] for k in image.nodes]
    directional = store.grads(rows).transpose(0, 1).contiguous()  # (T, n, *F), in node order
    dtype, device = directional.dtype, directional.device
    weights = image.weights().to(dtype).to(device)
    delta = path.delta[i : i + 1]
    integrated = delta * weighted_sum(directional, weights)
    one = slice(i, i + 1)
    return Attribution(
        integrated_grads=integrated,
        directional_grads=directional,
        alphas=torch.tensor(image.nodes, dtype=dtype, device=device),
        step_sizes=weights,
        logits=path.rows(path.logits[one]),
        baseline_logits=path.rows(path.baseline_logits[one]),
        convergence_delta=path.convergence_delta(integrated, one),
        inputs=path.rows(path.inputs[one]),
        baselines=path.rows(path.baselines[one]),
        targets=path.targets[i],
        rule=ADAPTIVE,
        path_logits=store.logits(rows).to(dtype).transpose(0, 1).contiguous(),
        error_estimate=torch.tensor(image.estimates, dtype=torch.float64).view(width),
        smooth=torch.full((width,), image.gauss_legendre),
        tolerance=image.tolerance,
        tolerance_met=image.estimate <= image.tolerance,
    )


def _end_logits(path: Path, image: int) -> Tensor:
    """(T, 2) float64: each of the image's targets' logit at the image and at the path's start."""
    targets = path.targets[image]
    return torch.stack([path.logits[image, targets], path.baseline_logits[image, targets]], dim=1).double().cpu()


def _midpoint(start: float, end: float) -> float | None:
    """The midpoint of two nodes rounded to float32, if it lies strictly between them (and
    the interval is at least _SMALLEST wide); else None."""
    if end - start < _SMALLEST:
        return None
    middle = float(torch.tensor((start + end) / 2, dtype=torch.float32))
    return middle if start < middle < end else None


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
