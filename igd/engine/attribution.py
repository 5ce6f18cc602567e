"""Integrated Gradients and integrated directional gradients from one gradient pass.

For inputs ``x``, baselines ``b`` and a quadrature rule with nodes ``a_k`` and weights
``w_k`` (k = 0..n-1), the path points are ``x_k = b + a_k (x - b)`` and the per-step
("directional") gradients are ``g_k = dF_t/dx (x_k)`` for the target logit ``F_t``.
Integrated Gradients is ``IG = (x - b) * sum_k w_k g_k``. Both come from the same
gradients, so one forward+backward over the path points gives everything; the
predecessor walked the path twice (once for the per-step gradients, once for IG).

The five rules and their nodes and weights are captum's, bit for bit, so results agree
with ``captum.attr.IntegratedGradients``.

Several targets cost one forward per path point: every logit is computed there anyway,
and each target adds one backward through the retained graph (measured on CPU faster than
batching the k vector-Jacobian products with ``is_grads_batched``; docs/benchmarks.md).
An attribution's *rows* are (image, target) pairs, image-major: row ``i * T + t``.
Other paths than the straight line (Blur IG) come in as a :class:`~igd.engine.paths.Curve`.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass, replace
from typing import Callable, Iterable, Iterator, Sequence, Union

import numpy as np
import torch
from torch import Tensor, nn

from igd.engine import accuracy
from igd.engine.paths import STRAIGHT, Curve
from igd.request import RULES  # the rules' names belong to the request vocabulary

DEFAULT_RULE = RULES[0]  # gausslegendre

# One int for all images, one per image, or (B, T): T targets per image.
Target = Union[int, Sequence[int], Sequence[Sequence[int]], Tensor]
Forward = Callable[[Tensor], Tensor]
# Maps path points (M, *F) and, for each point, the index of its image in the batch
# (M,) to logits (M, K). The index lets callers pick per-image extra arguments.
PointForward = Callable[[Tensor, Tensor], Tensor]
# Called after every chunk with (path points done, path points in all); it may raise to
# abandon the pass (e.g. when nobody wants the result any more).
ChunkCallback = Callable[[int, int], None]


@dataclass(frozen=True)
class Attribution:
    """The result of :func:`attribute` for R rows of feature shape F: one row per (image,
    target) pair, image-major (B images with T targets each: R = B * T, row i * T + t).

    For image models F is (C, H, W). All tensors are detached and live on the inputs'
    device; ``n = n_steps``, ``K`` the number of model outputs. Per-image tensors
    (inputs, logits, ...) are repeated for each of the image's targets.
    """

    integrated_grads: Tensor  # (R, *F)
    directional_grads: Tensor  # (R, n, *F): g_k at every path point
    alphas: Tensor  # (n,): the nodes a_k in [0, 1]
    step_sizes: Tensor  # (n,): the weights w_k
    logits: Tensor  # (R, K) at the inputs
    baseline_logits: Tensor  # (R, K) at the baselines (the paths' starts)
    convergence_delta: Tensor  # (R,): sum(IG) - (F_t(x) - F_t(b))
    inputs: Tensor  # (R, *F)
    baselines: Tensor  # (R, *F): the paths' starts
    targets: Tensor  # (R,) int64
    rule: str  # the quadrature rule: one of RULES, or "adaptive" (igd.engine.adaptive)
    path_logits: Tensor  # (R, n): the target logit F_t at every path point
    error_estimate: Tensor  # (R,) float64: the estimated relative L2 error of IG (igd.engine.accuracy)
    smooth: Tensor  # (R,) bool: whether the estimate found the integrand smooth (spectral), not kinked
    tolerance: float | None = None  # adaptive: the error asked for (then one image: R == T)
    tolerance_met: bool | None = None  # adaptive: whether error_estimate <= tolerance
    curve: Curve = STRAIGHT  # the path: the straight line, or Blur IG's (igd.engine.paths)

    @property
    def n_steps(self) -> int:
        return int(self.alphas.shape[0])

    @property
    def intermediates(self) -> Tensor:
        """(R, n, *F): the path points (x_k = b + a_k (x - b) on the straight line), the
        very values the model saw. Computed on each access (as large as ``directional_grads``)."""
        return self.curve.points(self.inputs, self.baselines, self.alphas)

    def rows(self, start: int, stop: int) -> Attribution:
        """Rows ``start:stop`` as an Attribution of their own: copies, so that they do not
        keep the other rows' memory alive (a pass over several images, answered one by one)."""
        per_row = {name: tensor[start:stop].clone() for name, tensor in vars(self).items()
                   if isinstance(tensor, Tensor) and name not in ("alphas", "step_sizes")}
        return replace(self, **per_row)

    def intermediates_of(self, row: int, alphas: slice = slice(None)) -> Tensor:
        """(n, *F): row ``row``'s path points (see :attr:`intermediates`), or those of the
        nodes ``alphas``."""
        one = slice(row, row + 1)
        return self.curve.points(self.inputs[one], self.baselines[one], self.alphas[alphas])[0]


@dataclass(frozen=True)
class AttributionSlice:
    """One job's rows of a pass's (CPU) Attribution, and the chunk size that pass ran with
    (path points per forward+backward; results can differ in the last bits with it).

    The job's P paths with T targets each are rows ``index + p * T + t``; ``logits`` (K,)
    are those at its image when its paths do not end there (noise), else None."""

    attribution: Attribution
    index: int
    max_batch: int = 0
    paths: int = 1
    width: int = 1
    logits: Tensor | None = None

    def row(self, path: int = 0, target: int = 0) -> int:
        return self.index + path * self.width + target


def quadrature(rule: str, n_steps: int) -> tuple[list[float], list[float]]:
    """Nodes ``a_k`` in [0, 1] and weights ``w_k`` of a quadrature rule, as captum has them.

    Riemann rules use ``w_k = 1/n`` (the trapezoid halves the first and last, so its
    weights sum to (n-1)/n: captum's bias, kept for agreement). Gauss-Legendre maps
    numpy's ``leggauss(n)`` from [-1, 1] to [0, 1].
    """
    if rule not in RULES:
        raise ValueError(f"unknown rule {rule!r}; choose one of {', '.join(RULES)}")
    if isinstance(n_steps, bool) or not isinstance(n_steps, int):
        raise ValueError(f"n_steps must be an int, got {type(n_steps).__name__}")
    if rule == "gausslegendre":
        if n_steps < 1:
            raise ValueError(f"n_steps must be >= 1 for gausslegendre, got {n_steps}")
        nodes, weights = _gauss_legendre(n_steps)
        return list(nodes), list(weights)
    if n_steps < 2:
        raise ValueError(f"n_steps must be >= 2 for {rule}, got {n_steps}")
    n = n_steps
    start, end = {
        "riemann_left": (0.0, 1 - 1 / n),
        "riemann_right": (1 / n, 1.0),
        "riemann_middle": (1 / (2 * n), 1 - 1 / (2 * n)),
        "riemann_trapezoid": (0.0, 1.0),
    }[rule]
    # captum builds Riemann nodes with a float32 linspace; doing the same keeps them
    # identical to the last bit.
    alphas = torch.linspace(start, end, n).tolist()
    weights = [1 / n] * n
    if rule == "riemann_trapezoid":
        weights[0] /= 2
        weights[-1] /= 2
    return alphas, weights


@functools.lru_cache(maxsize=16)
def _gauss_legendre(n: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """numpy's ``leggauss(n)`` mapped to [0, 1], kept: it solves an n x n eigenproblem
    (0.4 s at n = 1024, 17 s at 4096 on a 2-core machine)."""
    nodes, weights = np.polynomial.legendre.leggauss(n)
    return tuple((0.5 * (1 + nodes)).tolist()), tuple((0.5 * weights).tolist())


def attribute(
    forward: Forward,
    inputs: Tensor,
    target: Target,
    *,
    baselines: Tensor | float | None = None,
    n_steps: int = 50,
    rule: str = DEFAULT_RULE,
    max_batch: int | None = None,
    allow_tf32: bool = False,
    on_chunk: ChunkCallback | None = None,
    curve: Curve = STRAIGHT,
) -> Attribution:
    """IG and the per-step gradients of ``forward`` for a batch of inputs, in one pass.

    Args:
        forward: maps (N, *F) to logits (N, K). If it is an ``nn.Module`` (or a bound
            method of one), it runs in eval mode with its parameters frozen for the
            duration; both are restored afterwards, also on error.
        inputs: (B, *F) floating point, e.g. (B, C, H, W) preprocessed images.
        target: the logit to explain: one int for all images, one per image, or (B, T)
            ints: T targets per image, from one forward per path point (rows i * T + t).
        baselines: None (zeros in input space) or a tensor broadcastable to ``inputs``:
            the paths' starts (for Blur IG, ``curve.start(inputs)``).
        n_steps: number of path points per image.
        rule: the quadrature rule, one of :data:`RULES` (captum calls it ``method``).
        max_batch: at most this many path points per forward+backward (a memory and
            speed knob; results equal the unchunked run). None: all B x n at once.
        allow_tf32: let CUDA use TF32 for float32 matmuls and convolutions. Off by
            default, so that results are exact against captum; ``igd serve --precision
            tf32`` measures and logs how far it moves IG on its model.
        on_chunk: called after each forward+backward chunk with (points done, points
            in all); an exception it raises abandons the pass and propagates.
        curve: the path (igd.engine.paths): the straight line, or Blur IG's.
    """
    return attribute_points(
        lambda points, _image_index: forward(points),
        inputs,
        target,
        baselines=baselines,
        n_steps=n_steps,
        rule=rule,
        max_batch=max_batch,
        allow_tf32=allow_tf32,
        modules=_modules_of(forward),
        on_chunk=on_chunk,
        curve=curve,
    )


def attribute_points(
    forward: PointForward,
    inputs: Tensor,
    target: Target,
    *,
    baselines: Tensor | float | None = None,
    n_steps: int = 50,
    rule: str = DEFAULT_RULE,
    max_batch: int | None = None,
    allow_tf32: bool = False,
    modules: Iterable[nn.Module] = (),
    on_chunk: ChunkCallback | None = None,
    curve: Curve = STRAIGHT,
) -> Attribution:
    """:func:`attribute` for a forward that also receives each point's image index.

    ``forward(points, image_index)`` maps points (M, *F) and image indices (M,) to
    logits (M, K); ``modules`` are put in eval mode with frozen parameters meanwhile.
    """
    if not isinstance(inputs, Tensor) or not inputs.is_floating_point() or inputs.dim() < 2:
        raise ValueError("inputs must be a floating point tensor of shape (B, ...)")
    alphas_list, weights_list = quadrature(rule, n_steps)
    check_max_batch(max_batch)
    batch, device, dtype = inputs.shape[0], inputs.device, inputs.dtype
    chunk = balanced_chunk(batch * n_steps, max_batch)

    with engine_mode(allow_tf32, modules):
        path = Path(forward, inputs, baselines, target, chunk, curve)
        width = path.width
        alphas = torch.tensor(alphas_list, dtype=dtype, device=device)
        weights = torch.tensor(weights_list, dtype=dtype, device=device)
        directional = torch.empty((batch, width, n_steps, *inputs.shape[1:]), dtype=dtype, device=device)
        path_logits = torch.empty((batch, width, n_steps), dtype=dtype, device=device)

        def store(part: slice, grads: Tensor, logits: Tensor) -> None:
            # Point (i, k) sits at flat index i * n + k; its gradients go to rows (i, t).
            flat = torch.arange(part.start, part.start + len(grads), device=device)
            image, step = flat // n_steps, flat % n_steps
            directional[image, :, step] = grads
            path_logits[image, :, step] = logits

        point_image = torch.arange(batch, device=device).repeat_interleave(n_steps)
        path.walk(point_image, alphas.repeat(batch), store, on_chunk)

    rows = batch * width
    directional = directional.view(rows, n_steps, *inputs.shape[1:])
    path_logits = path_logits.view(rows, n_steps)
    integrated, estimates, smooth = _integrate(path, alphas, weights, directional, path_logits, rule)
    return Attribution(
        integrated_grads=integrated,
        directional_grads=directional,
        alphas=alphas,
        step_sizes=weights,
        logits=path.rows(path.logits),
        baseline_logits=path.rows(path.baseline_logits),
        convergence_delta=path.convergence_delta(integrated),
        inputs=path.rows(path.inputs),
        baselines=path.rows(path.baselines),
        targets=path.targets.reshape(-1),
        rule=rule,
        path_logits=path_logits,
        error_estimate=estimates,
        smooth=smooth,
        curve=curve,
    )


def _integrate(path: Path, alphas: Tensor, weights: Tensor, directional: Tensor, path_logits: Tensor,
               rule: str) -> tuple[Tensor, Tensor, Tensor]:
    """IG of every row, ``sum_k w_k g_k * gamma'(a_k)`` (R, *F), its estimated relative
    error (R,) float64 and whether that found the integrand smooth (R,) bool
    (igd.engine.accuracy.error_estimate), from the per-step gradients (R, n, *F) and the
    target logits there (R, n). On the straight line gamma' is x - b at every node and IG
    is ``(x - b) * sum_k w_k g_k``, captum's arithmetic; on another curve the derivatives
    (n, *F) are made once per image and serve all its targets."""
    ends, starts = path.rows(path.inputs), path.rows(path.baselines)
    index = torch.arange(len(path.inputs), device=ends.device).repeat_interleave(path.width)
    targets = path.targets.reshape(-1)
    end_logits, start_logits = path.logits[index, targets], path.baseline_logits[index, targets]
    scales = torch.maximum(end_logits.abs(), start_logits.abs()).tolist()
    # the target logit at start, nodes and end of each row, for the Gauss-Legendre estimate
    logits = (torch.cat([start_logits.view(-1, 1), path_logits, end_logits.view(-1, 1)], dim=1)
              if rule == "gausslegendre" else None)
    if path.curve is STRAIGHT:
        delta = ends - starts
        integrated = delta * weighted_sum(directional, weights)
        deltas = path.convergence_delta(integrated).tolist()
        found = [accuracy.error_estimate(alphas, weights, directional[r], delta[r], integrated[r],
                                         logits=None if logits is None else logits[r], convergence_delta=deltas[r],
                                         logit_scale=scales[r])
                 for r in range(len(ends))]
        return integrated, *_estimates(found)
    integrated = torch.empty_like(ends)
    integrands = []
    for image in range(len(path.inputs)):
        velocities = path.curve.velocities(path.inputs[image], path.baselines[image], alphas)
        for row in range(image * path.width, (image + 1) * path.width):
            integrand = directional[row] * velocities
            integrated[row] = weighted_sum(integrand.unsqueeze(0), weights)[0]
            integrands.append(integrand)
    deltas = path.convergence_delta(integrated).tolist()
    found = [accuracy.error_estimate(alphas, weights, integrand, torch.ones_like(ends[row]), integrated[row],
                                     logits=None if logits is None else logits[row], convergence_delta=deltas[row],
                                     logit_scale=scales[row])
             for row, integrand in enumerate(integrands)]
    return integrated, *_estimates(found)


def _estimates(found: list[tuple[float, bool]]) -> tuple[Tensor, Tensor]:
    """(R,) float64 estimates and (R,) bool smoothness from accuracy.error_estimate's pairs."""
    return (torch.tensor([estimate for estimate, _ in found], dtype=torch.float64),
            torch.tensor([smooth for _, smooth in found], dtype=torch.bool))


def check_max_batch(max_batch: int | None) -> None:
    if max_batch is not None and (isinstance(max_batch, bool) or max_batch < 1):
        raise ValueError(f"max_batch must be None or >= 1, got {max_batch!r}")


@contextlib.contextmanager
def engine_mode(allow_tf32: bool, modules: Iterable[nn.Module]) -> Iterator[None]:
    """What every gradient pass runs under: gradients enabled even when the caller runs
    under no_grad or inference_mode (every tensor autograd may save is made inside), strict
    float32 unless TF32 is allowed, and the modules in eval mode with frozen parameters."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.inference_mode(False))
        stack.enter_context(torch.enable_grad())
        stack.enter_context(strict_float32(not allow_tf32))
        stack.enter_context(evaluation_mode(modules))
        yield


class Path:
    """The paths from baselines (starts) to inputs of a batch, and the model along them.

    Made inside :func:`engine_mode`. ``inputs``, ``baselines`` and ``delta`` (x - b) are
    (B, *F), ``targets`` (B, T); ``logits`` and ``baseline_logits`` (B, K) are known after
    the first call of :meth:`walk` (they ride along with its first chunk when they are few
    next to it: one model call fewer, and a call has a fixed cost: BiT-R101x3 re-lays out
    380M weights in every one).
    """

    def __init__(self, forward: PointForward, inputs: Tensor, baselines: Tensor | float | None,
                 target: Target, chunk: int, curve: Curve = STRAIGHT) -> None:
        self.forward = forward
        self.inputs = inputs.detach().clone() if inputs.is_inference() else inputs.detach()
        self.baselines = _broadcast_baselines(baselines, self.inputs)
        self.delta = self.inputs - self.baselines
        batch = self.inputs.shape[0]
        self.targets = _target_matrix(target, batch, inputs.device)
        self.chunk = chunk
        self.curve = curve
        self._end_logits: Tensor | None = None

    @property
    def width(self) -> int:
        """T, the targets per image."""
        return int(self.targets.shape[1])

    def rows(self, per_image: Tensor) -> Tensor:
        """(B * T, ...): a per-image tensor (B, ...) repeated for each image's targets."""
        return per_image if self.width == 1 else per_image.repeat_interleave(self.width, dim=0)

    @property
    def logits(self) -> Tensor:
        assert self._end_logits is not None, "no gradients computed yet"
        return self._end_logits[: len(self.inputs)]

    @property
    def baseline_logits(self) -> Tensor:
        assert self._end_logits is not None, "no gradients computed yet"
        return self._end_logits[len(self.inputs) :]

    def gradients(self, point_image: Tensor, point_alpha: Tensor,
                  on_chunk: ChunkCallback | None = None) -> tuple[Tensor, Tensor]:
        """For M path points, each given by its image (M,) int64 and its node a (M,):
        the gradients of the targets' logits there (M, T, *F) and the logits themselves
        (M, T) (see :meth:`walk`)."""
        x = self.inputs
        grads = torch.empty((len(point_image), self.width, *x.shape[1:]), dtype=x.dtype, device=x.device)
        path_logits = torch.empty((len(point_image), self.width), dtype=x.dtype, device=x.device)

        def store(part: slice, part_grads: Tensor, part_logits: Tensor) -> None:
            grads[part], path_logits[part] = part_grads, part_logits

        self.walk(point_image, point_alpha, store, on_chunk)
        return grads, path_logits

    def walk(self, point_image: Tensor, point_alpha: Tensor, store: Callable[[slice, Tensor, Tensor], None],
             on_chunk: ChunkCallback | None = None) -> None:
        """For M path points, each given by its image (M,) int64 and its node a (M,), hand
        ``store(part, grads, logits)`` the gradients of the targets' logits (m, T, *F) and
        those logits (m, T) for each chunk ``part`` of at most ``chunk`` points, one forward
        and T backwards each. The points are made chunk by chunk, so that only the
        gradients take (M, T, *F) memory."""
        x, b = self.inputs, self.baselines
        ends: tuple[Tensor, Tensor] | None = None
        if self._end_logits is None:
            image_index = torch.arange(len(x), device=x.device)
            ends = (torch.cat([x, b]), image_index.repeat(2))
            if len(ends[0]) * 4 > self.chunk:  # too many to ride along: calls of their own
                with torch.no_grad():
                    self._end_logits = _forward_chunks(self.forward, *ends, self.chunk)
                _check_targets(self.targets, self._end_logits.shape[1])
                ends = None
        total = len(point_image)
        for start in range(0, total, self.chunk):
            part = slice(start, min(start + self.chunk, total))
            images = point_image[part]
            points = self.curve.at(x[images], b[images], point_alpha[part])
            grads, logits, end_logits = _target_gradients(
                self.forward, points, images, self.targets, ends if start == 0 else None)
            del points
            store(part, grads, logits)
            del grads
            if end_logits is not None:
                self._end_logits = end_logits
            if on_chunk is not None:
                on_chunk(part.stop, total)

    def convergence_delta(self, integrated: Tensor, images: slice = slice(None)) -> Tensor:
        """sum(IG) - (F_t(x) - F_t(b)) for IG (R, *F) of the rows of the images ``images``
        (default all), in float64, then the inputs' dtype: (R,)."""
        index = torch.arange(len(self.inputs), device=self.inputs.device)[images].repeat_interleave(self.width)
        targets = self.targets[images].reshape(-1)
        rise = self.logits[index, targets] - self.baseline_logits[index, targets]
        return (integrated.flatten(1).double().sum(1) - rise.double()).to(self.inputs.dtype)


# Above this, weighted_sum works through the features in blocks (see there).
_WHOLE_PRODUCT_BYTES = 64 << 20
_FEATURE_BLOCK = 1 << 14


def weighted_sum(directional: Tensor, weights: Tensor) -> Tensor:
    """sum_k w_k g_k: (B, *F) from gradients (B, n, *F) and weights (n,), exactly as
    ``(directional * w).sum(dim=1)`` (captum's arithmetic, to the bit). A large product
    is formed a block of features at a time, so that it never takes a second (B, n, *F)
    of memory: the same elementwise products, summed over k in the same order (blocks
    of 2^14 features keep the vectorised reduction's lanes aligned; tested to the bit)."""
    batch, n = directional.shape[:2]
    if directional.numel() * directional.element_size() <= _WHOLE_PRODUCT_BYTES:
        return (directional * weights.view(1, n, *(1,) * (directional.dim() - 2))).sum(dim=1)
    flat = directional.reshape(batch, n, -1)
    total = torch.empty((batch, flat.shape[2]), dtype=directional.dtype, device=directional.device)
    column = weights.view(1, n, 1)
    for start in range(0, flat.shape[2], _FEATURE_BLOCK):
        block = slice(start, start + _FEATURE_BLOCK)
        total[:, block] = (flat[:, :, block] * column).sum(dim=1)
    return total.view(batch, *directional.shape[2:])


def balanced_chunk(total: int, max_batch: int | None) -> int:
    """The chunk size that splits ``total`` points into the fewest chunks of at most
    ``max_batch``, all (nearly) equal: 50 points at most 32 go as 25 + 25, not 32 + 18."""
    if not max_batch or max_batch >= total:
        return max(total, 1)
    chunks = -(-total // max_batch)
    return -(-total // chunks)


def _target_gradients(
    forward: PointForward,
    points: Tensor,
    image_index: Tensor,
    targets: Tensor,
    extra: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """d logit_t / d point for each of the points (M, *F) and each of their image's targets
    (``targets`` (B, T)): (M, T, *F), one forward and T backward passes through the retained
    graph; the target logits there (M, T); and the logits (E, K) of ``extra`` points
    (E, *F) run in the same forward call, if given."""
    leaf = points.detach().requires_grad_(True)
    if extra is None:
        out = _checked_logits(forward(leaf, image_index), len(leaf))
        extra_logits = None
    else:
        rows, rows_index = extra
        both = _checked_logits(forward(torch.cat([rows, leaf]), torch.cat([rows_index, image_index])), len(rows) + len(leaf))
        _check_targets(targets, both.shape[1])
        extra_logits, out = both[: len(rows)].detach(), both[len(rows) :]
    picked = out.gather(1, targets[image_index])  # (M, T)
    if not picked.requires_grad:
        raise RuntimeError(
            "the model output does not depend on its input through autograd "
            "(is the forward running under torch.no_grad or detaching its input?)"
        )
    width = picked.shape[1]
    grads = torch.empty((len(leaf), width, *leaf.shape[1:]), dtype=leaf.dtype, device=leaf.device)
    for t in range(width):
        (grad,) = torch.autograd.grad(picked[:, t].sum(), leaf, allow_unused=True, retain_graph=t < width - 1)
        grads[:, t] = 0.0 if grad is None else grad
    return grads, picked.detach(), extra_logits


def _forward_chunks(forward: PointForward, points: Tensor, image_index: Tensor, chunk: int) -> Tensor:
    """Logits (M, K) for points (M, *F), at most ``chunk`` points per call."""
    parts = []
    for start in range(0, len(points), chunk):
        part = slice(start, start + chunk)
        parts.append(_checked_logits(forward(points[part], image_index[part]), len(points[part])))
    return torch.cat(parts).detach()


def _checked_logits(out: object, rows: int) -> Tensor:
    if not isinstance(out, Tensor) or out.dim() != 2 or out.shape[0] != rows:
        shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(f"forward must return logits of shape ({rows}, K), got {shape}")
    return out


def _broadcast_baselines(baselines: Tensor | float | None, inputs: Tensor) -> Tensor:
    if baselines is None:
        return torch.zeros_like(inputs)
    base = torch.as_tensor(baselines, dtype=inputs.dtype, device=inputs.device)
    try:
        expanded = torch.broadcast_to(base, inputs.shape)
    except RuntimeError:
        raise ValueError(
            f"baselines of shape {tuple(base.shape)} do not broadcast to inputs of shape "
            f"{tuple(inputs.shape)}"
        ) from None
    # A copy of our own: never an inference tensor or a view of the caller's memory.
    return expanded.detach().clone(memory_format=torch.contiguous_format)


def _target_matrix(target: Target, batch: int, device: torch.device) -> Tensor:
    """The int64 targets of each image, (B, T): from one int, one per image (T = 1), or
    (B, T) of them."""
    if isinstance(target, bool):
        raise ValueError("target must be an int, one int per image or (B, T) ints, got a bool")
    if isinstance(target, int):
        return torch.full((batch, 1), target, dtype=torch.long, device=device)
    try:
        values = torch.as_tensor(target, device=device)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"target must be an int, one int per image or (B, T) ints, got {target!r}") from None
    if values.dim() == 0:
        values = values.expand(batch)
    if values.dim() not in (1, 2) or values.shape[0] != batch or values.numel() == 0:
        raise ValueError(
            f"target must be one int or {batch} ints (one per image, or {batch} rows of ints), "
            f"got shape {tuple(values.shape)}"
        )
    if values.dim() == 1:
        values = values.unsqueeze(1)
    if values.is_floating_point() or values.dtype == torch.bool:
        raise ValueError(f"targets must be integers, got {values.dtype}")
    return values.long().clone()


def _check_targets(targets: Tensor, num_outputs: int) -> None:
    bad = (targets < 0) | (targets >= num_outputs)
    if bool(bad.any()):
        raise ValueError(
            f"target {int(targets[bad][0])} is out of range: the model has {num_outputs} "
            f"outputs (0..{num_outputs - 1})"
        )


def _modules_of(forward: object) -> list[nn.Module]:
    """The module behind ``forward``: itself, or the owner of a bound method."""
    if isinstance(forward, nn.Module):
        return [forward]
    owner = getattr(forward, "__self__", None)
    return [owner] if isinstance(owner, nn.Module) else []


@contextlib.contextmanager
def evaluation_mode(modules: Iterable[nn.Module]) -> Iterator[None]:
    """Eval mode and frozen parameters for the duration; every flag restored after.

    Only input gradients are needed, so parameters need none; restoring per module and
    per parameter keeps models that mix train/eval submodules exactly as they were.
    """
    modules = list(modules)
    training = [(m, m.training) for top in modules for m in top.modules()]
    trainable = [(p, p.requires_grad) for top in modules for p in top.parameters()]
    try:
        for top in modules:
            top.eval()
        for param, _ in trainable:
            param.requires_grad_(False)
        yield
    finally:
        for module, was_training in training:
            module.training = was_training
        for param, required in trainable:
            param.requires_grad_(required)


@contextlib.contextmanager
def strict_float32(strict: bool = True) -> Iterator[None]:
    """For the duration: full-precision float32 matmuls and convolutions on CUDA (TF32
    off), or with ``strict=False`` TF32 allowed for both (PyTorch's own default allows
    it for convolutions only). The caller's settings are restored afterwards.

    Uses PyTorch's ``fp32_precision`` switches where they exist (2.9+; mixing them with
    the legacy ``allow_tf32`` flags is an error there), else the legacy flags.
    """
    backends = torch.backends
    if hasattr(backends.cudnn, "conv") and hasattr(backends.cuda.matmul, "fp32_precision"):
        switches = [backends.cuda.matmul, backends.cudnn.conv, backends.cudnn.rnn]
        saved = [s.fp32_precision for s in switches]
        try:
            for s in switches:
                s.fp32_precision = "ieee" if strict else "tf32"
            yield
        finally:
            for s, value in zip(switches, saved):
                s.fp32_precision = value
    else:  # pragma: no cover - torch < 2.9
        saved_legacy = (backends.cuda.matmul.allow_tf32, backends.cudnn.allow_tf32)
        try:
            backends.cuda.matmul.allow_tf32 = not strict
            backends.cudnn.allow_tf32 = not strict
            yield
        finally:
            backends.cuda.matmul.allow_tf32, backends.cudnn.allow_tf32 = saved_legacy
