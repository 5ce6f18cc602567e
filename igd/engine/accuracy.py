"""How far an IG answer is from the exact integral, estimated from the answer itself.

The integrand ``f(a) = (x - b) * g(a)`` along the path looks different on different nets,
and so does a rule's error (bench/accuracy.py measures each against converged references):

- **Smooth** (ViTs: GELU, softmax attention, LayerNorm): Gauss-Legendre converges
  spectrally, and its error is read off the decay of the Legendre coefficients its nodes
  determine (:func:`legendre_error`), provided the polynomial through the nodes also
  follows the path's logits, which catches a rise no node sees.
- **Kinked** (ReLU/ReLU6 nets: BiT, LaNet, EfficientNet-Lite): along the path the gradient
  is piecewise constant, with very many small jumps. A panel of width h over which f jumps
  by ``J`` at a place no node sees is off by ``h J (u - 1/2)``, u uniform in [0, 1]: root
  mean square ``h |J| / sqrt(12)``; the jumps of different panels fall independently, so
  their errors add in quadrature. With ``J_k = f(a_{k+1}) - f(a_k)`` between neighbouring
  nodes this gives the *random* part of the error, with no constant fitted to any model:

      R^2 = sum_k (h_k / 2 * |J_k| / sqrt(3))^2     (h_k / 2 * |J_k|: the trapezoid's
                                                     worst case; rms / worst = 1/sqrt(3))

  and the worst case itself where a panel's ends differ by more than their size (nothing
  is known of what lies between: BiT next to the zero baseline). A rule can also be
  *biased*: Riemann left and right rules lean to one end, captum's trapezoid has weights
  summing to (n-1)/n. That part is ``D = sum_k (w_k - t_k) f(a_k)``, the rule against the
  trapezoid through the same nodes (extended flat to 0 and 1). The estimate is
  ``sqrt(|D|^2 + R^2) / |IG|``.

Either way it is at least what the completeness gap proves missing: ``sum(IG) - (F(x) -
F(b))`` is the sum of the error's entries, so its size bounds the error's L1 norm from
below; it is scaled to L2 by IG's own ratio of the two norms.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

# rms error of a panel with one unseen jump, over its worst case h |J| / 2
JUMP_RMS = 1 / math.sqrt(3)
# How many float32 ulps of the logits a forward pass may be off by: the completeness gap's
# floor (a 96-layer test network moves its logits by 1 ulp along the whole path).
ROUNDING_ULPS = 64
# Neighbouring gradients are differenced this many steps at a time (a bounded temporary).
_STEP_BLOCK = 32


def panel_errors(alphas: Tensor, directional: Tensor, delta: Tensor) -> Tensor:
    """(n-1,) float64: the error of the trapezoid on each panel between neighbouring nodes,
    for nodes ``alphas`` (n,) in increasing order, per-step gradients (n, *F) and ``delta``
    = x - b (*F): the rms ``h_k / 2 * |J_k| / sqrt(3)`` of one jump at an unseen place, or
    the worst case ``h_k / 2 * |J_k|`` where the panel is unresolved, its ends differing by
    more than the larger of them (then the integrand inside is anybody's guess: BiT's next
    to a zero baseline)."""
    n = len(alphas)
    widths = (alphas[1:] - alphas[:-1]).double()
    jumps = torch.empty(max(n - 1, 0), dtype=torch.float64)
    sizes = torch.empty(n, dtype=torch.float64)
    for start in range(0, n, _STEP_BLOCK):
        stop = min(start + _STEP_BLOCK + 1, n)
        f = (directional[start:stop] * delta).flatten(1).double()
        sizes[start:stop] = torch.linalg.vector_norm(f, dim=1).cpu()
        jumps[start : stop - 1] = torch.linalg.vector_norm(f[1:] - f[:-1], dim=1).cpu()
    unresolved = jumps > torch.maximum(sizes[1:], sizes[:-1])
    return torch.where(unresolved, 1.0, JUMP_RMS) * widths.cpu() / 2 * jumps


@dataclass(frozen=True)
class Norms:
    """L1 and L2 norms of an IG (*F), in float64."""

    l1: float
    l2: float

    @classmethod
    def of(cls, integrated: Tensor) -> Norms:
        flat = integrated.double().flatten()
        return cls(float(flat.abs().sum()), float(torch.linalg.vector_norm(flat)))


def missed(alphas: Tensor, directional: Tensor, delta: Tensor, logits: Tensor, norms: Norms) -> Tensor:
    """(n-1,) float64: what each interval's completeness check proves the trapezoid rule
    misses, as an L2 error. Between neighbouring nodes ``alphas`` (n,) the rule's
    ``h/2 (sum(f_k) + sum(f_k+1))``, with f = (x - b) * g (``directional`` (n, *F), ``delta``
    (*F)), should add up to ``F(a_k+1) - F(a_k)`` (``logits`` (n,)): their difference
    bounds the interval's L1 error from below; it is scaled to L2 by IG's own ratio
    ``norms.l2 / norms.l1``. A difference within the logits' rounding counts as none."""
    sums = torch.cat([(directional[start : start + _STEP_BLOCK] * delta).flatten(1).double().sum(1).cpu()
                      for start in range(0, len(alphas), _STEP_BLOCK)])
    logits = logits.double().cpu()
    widths = (alphas[1:] - alphas[:-1]).double().cpu()
    difference = (widths / 2 * (sums[1:] + sums[:-1]) - (logits[1:] - logits[:-1])).abs()
    resolution = ROUNDING_ULPS * float(torch.finfo(torch.float32).eps) * float(logits.abs().max())
    if norms.l1 == 0:
        return torch.zeros_like(difference)
    return torch.where(difference > resolution, difference * norms.l2 / norms.l1, 0.0)


# --- Gauss-Legendre on a smooth integrand ------------------------------------------------

# Below this size next to IG, a Legendre coefficient is float32 rounding: the integrand is
# resolved and the rule's error is at that level.
RESOLVED = 1e-6
# Coefficients falling slower than this factor per degree (over the upper half of the
# degrees the rule sees) are not converging spectrally: kinks, or a rise the nodes miss.
SPECTRAL_DECAY = 0.85
# The interpolant of dF/da may miss the logits' steps by this fraction of their variation: a
# small ViT misses them by 0.02-0.1 at 8 Gauss-Legendre points, 2e-4-2e-3 at 16; the BiT
# fixture from the zero baseline (whose rise lies below the first node) by 1.0-2.9.
LOGIT_MISMATCH = 0.5


def legendre_error(alphas: Tensor, weights: Tensor, directional: Tensor, delta: Tensor,
                   integrated: Tensor, logits: Tensor) -> float | None:
    """The L2 error of a Gauss-Legendre rule (nodes ``alphas`` (n,) increasing, ``weights``
    (n,)) on the integrand (x - b) * g (``directional`` (n, *F), ``delta`` (*F)) whose
    answer is ``integrated`` (*F), when the integrand is smooth; else None. ``logits``
    (n + 2,): the target logit at the path's start, at each node and at its end.

    Smooth means both: the polynomial through the nodes' ``sum(f)`` (dF/da) integrates to
    the logits' steps between start, nodes and end (within LOGIT_MISMATCH of their total
    variation: a rise the nodes do not see, as BiT's below the first node, fails this),
    and the integrand's Legendre coefficients fall geometrically:

    On [-1, 1] (a = (1 + t) / 2) the rule knows the Legendre coefficients of the polynomial
    through its nodes exactly, ``c_k = (k + 1/2) sum_j W_j P_k(t_j) f_j`` for k < n, and it
    integrates P_k exactly for k < 2n: its error is that of the degrees from 2n up. When the
    coefficients fall geometrically, ``|c_k| ~ r^k`` with r from degrees n/2 .. n-1 (each
    the larger of two neighbours: odd and even parts may differ), the error is about
    ``|c_{n-1}| r^(n+1) |GL_n(P_2n)| / 2`` (GL_n(P_2n): the rule's value for P_2n, whose
    integral is 0)."""
    n = len(alphas)
    if n < 8:
        return None
    t = 2 * alphas.double().cpu() - 1
    w = 2 * weights.double().cpu()
    if not _follows_the_logits(t, w, directional, delta, logits.double().cpu()):
        return None
    high, low = n - 1, (n + 1) // 2
    degrees = (low - 1, low, high - 1, high)
    values = {}
    previous, current = torch.ones_like(t), t.clone()
    for k in range(1, 2 * n):
        if k in degrees:
            values[k] = current
        previous, current = current, ((2 * k + 1) * t * current - k * previous) / (k + 1)
    rule_on_p2n = abs(float(w @ current)) / 2  # current is P_2n
    basis = torch.stack([(k + 0.5) * w * values[k] for k in degrees]).to(directional.device)
    coefficients = torch.zeros((len(degrees), delta.numel()), dtype=torch.float64, device=directional.device)
    for start in range(0, n, _STEP_BLOCK):
        block = slice(start, start + _STEP_BLOCK)
        f = (directional[block] * delta).flatten(1).double()
        coefficients += basis[:, block].to(f) @ f
    size = torch.linalg.vector_norm(coefficients, dim=1).cpu()
    integral = float(torch.linalg.vector_norm(integrated.double()))
    late, early = float(size[2:].max()), float(size[:2].max())
    if integral == 0.0 or late <= RESOLVED * integral:
        return late
    if early == 0.0:
        return None
    decay = (late / early) ** (1 / (high - low))
    if decay > SPECTRAL_DECAY:
        return None
    return late * decay ** (n + 1) * rule_on_p2n


def _follows_the_logits(t: Tensor, w: Tensor, directional: Tensor, delta: Tensor, logits: Tensor) -> bool:
    """Whether the Legendre interpolant of dF/da = sum(f) through the Gauss-Legendre nodes
    ``t`` (n,) on [-1, 1] (weights ``w``) rises as the logits do (n + 2,: start, nodes, end)
    between the path's start, each node and its end, within LOGIT_MISMATCH of their total
    variation."""
    n = len(t)
    sums = torch.cat([(directional[start : start + _STEP_BLOCK] * delta).flatten(1).double().sum(1).cpu()
                      for start in range(0, n, _STEP_BLOCK)])
    basis = np.polynomial.legendre.legvander(t.numpy(), n - 1)  # (n, n): P_k(t_j)
    coefficients = (np.arange(n) + 0.5) * ((w.numpy() * sums.numpy()) @ basis)
    antiderivative = np.polynomial.legendre.legint(coefficients, lbnd=-1)
    rises = np.diff(np.polynomial.legendre.legval(np.concatenate([[-1.0], t.numpy(), [1.0]]), antiderivative)) / 2
    steps = np.diff(logits.numpy())
    variation = float(np.abs(steps).sum())
    return variation == 0.0 or float(np.abs(rises - steps).sum()) <= LOGIT_MISMATCH * variation


def trapezoid_weights(alphas: Tensor) -> Tensor:
    """(n,) float64 weights of the trapezoid rule through nodes ``alphas`` (n,), in
    increasing order, extended flat from the first node down to 0 and from the last up to 1
    (so they sum to 1; when the nodes include 0 and 1 this is the plain trapezoid rule)."""
    a = alphas.double().cpu()
    weights = torch.zeros_like(a)
    half = (a[1:] - a[:-1]) / 2
    weights[:-1] += half
    weights[1:] += half
    weights[0] += a[0]
    weights[-1] += 1 - a[-1]
    return weights


def error_estimate(alphas: Tensor, weights: Tensor, directional: Tensor, delta: Tensor, integrated: Tensor, *,
                   logits: Tensor | None = None, convergence_delta: float | None = None,
                   logit_scale: float = 0.0) -> tuple[float, bool]:
    """The estimated relative L2 error of ``integrated`` (IG, *F) from its own nodes (n,),
    weights (n,), per-step gradients (n, *F) and ``delta`` = x - b (*F) (module docstring):
    for a Gauss-Legendre rule on a smooth integrand :func:`legendre_error` (given the target
    logit at start, nodes and end, ``logits`` (n + 2,)), else the jump model and the rule's bias. At least what the completeness gap proves missing
    (``convergence_delta`` = sum(IG) - (F(x) - F(b)), beyond the rounding of logits of size
    ``logit_scale``): |delta| bounds the L1 error from below; scaled to L2 by IG's own ratio.
    0.0 for a zero IG with nothing left to integrate, inf for a zero IG with something.
    Also whether the integrand was found smooth (the Legendre estimate applied)."""
    order = torch.argsort(alphas)
    if not bool((order == torch.arange(len(alphas), device=order.device)).all()):
        alphas, weights, directional = alphas[order], weights[order], directional[order]
        if logits is not None:
            logits = torch.cat([logits[:1], logits[1:-1][order.to(logits.device)], logits[-1:]])
    error = None if logits is None else legendre_error(alphas, weights, directional, delta, integrated, logits)
    smooth = error is not None
    if error is None:
        error = _jump_error(alphas, weights, directional, delta)
    if convergence_delta is not None:
        resolution = ROUNDING_ULPS * float(torch.finfo(torch.float32).eps) * abs(logit_scale)
        norms = Norms.of(integrated)
        if abs(convergence_delta) > resolution and norms.l1 > 0:
            error = max(error, abs(convergence_delta) * norms.l2 / norms.l1)
    return relative(error, integrated), smooth


def _jump_error(alphas: Tensor, weights: Tensor, directional: Tensor, delta: Tensor) -> float:
    """The jump model's random part and the rule's bias, in quadrature (module docstring):
    an absolute L2 error, for nodes in increasing order."""
    squared = float(panel_errors(alphas, directional, delta).square().sum())
    bias_weights = weights.double().cpu() - trapezoid_weights(alphas)
    if bool((bias_weights.abs() > 1e-7).any()):
        bias = torch.zeros_like(delta, dtype=torch.float64)
        shape = (-1, *(1,) * delta.dim())
        for start in range(0, len(alphas), _STEP_BLOCK):
            block = slice(start, start + _STEP_BLOCK)
            bias += (bias_weights[block].to(directional.device).view(shape) * directional[block]).sum(0).double()
        squared += float(torch.linalg.vector_norm(bias * delta)) ** 2
    return math.sqrt(squared)


def relative(error: float, integrated: Tensor) -> float:
    """An absolute L2 ``error`` relative to IG (*F): 0.0 for a zero IG with nothing left
    to integrate, inf for a zero IG with something."""
    size = float(torch.linalg.vector_norm(integrated.double()))
    if size == 0.0:
        return 0.0 if error == 0.0 else math.inf
    return error / size


def completeness_gap(convergence_delta: float, rise: float, logit_scale: float = 0.0,
                     eps: float = float(torch.finfo(torch.float32).eps)) -> float:
    """``convergence_delta`` relative to ``rise`` = F_t(x) - F_t(b): how far sum(IG) falls
    short of (negative) or beyond (positive) what it should add up to.

    Logits of size ``logit_scale`` = max(|F_t(x)|, |F_t(b)|) are only known to within
    their rounding, ``ROUNDING_ULPS * eps * logit_scale`` (a model whose output barely moves
    along the path has a rise of one ulp, and sum(IG) of zero is then exact, not -100 %
    off). A delta within that resolution is a gap of 0.0; otherwise the rise is taken as
    at least the resolution. +-inf only when the delta is nonzero and the rise and the
    logits are all exactly zero."""
    resolution = ROUNDING_ULPS * eps * abs(logit_scale)
    if abs(convergence_delta) <= resolution:
        return 0.0
    denominator = max(abs(rise), resolution)
    if denominator == 0.0:
        return math.copysign(math.inf, convergence_delta)
    return convergence_delta / denominator
