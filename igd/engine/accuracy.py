"""How far an IG answer is from the exact integral, estimated from the answer itself.

BiT, LaNet and EfficientNet-Lite are piecewise-linear networks (ReLU, ReLU6): along the
path the gradient is piecewise constant, with very many small jumps. A quadrature panel
of width h over which the integrand ``f(a) = (x - b) * g(a)`` jumps by ``J`` at a place
no node sees is off by ``h J (u - 1/2)``, u uniform in [0, 1]: root mean square
``h |J| / sqrt(12)``. The jumps of different panels fall independently, so their errors
add in quadrature. With ``J_k = f(a_{k+1}) - f(a_k)`` between neighbouring nodes this
gives the *random* part of the error, with no constant fitted to any model:

    R^2 = sum_k (h_k / 2 * |J_k| / sqrt(3))^2          (h_k / 2 * |J_k|: the trapezoid's
                                                         worst case; rms / worst = 1/sqrt(3))

A rule can also be *biased*: Riemann left and right rules lean to one end, captum's
trapezoid has weights summing to (n-1)/n. That part is ``D = sum_k (w_k - t_k) f(a_k)``,
the rule against the trapezoid through the same nodes (extended flat to 0 and 1), zero
for the midpoint and trapezoid rules. The estimate of the relative L2 error of IG is
``sqrt(|D|^2 + R^2) / |IG|``.

bench/accuracy.py measures how well it tracks the true error (docs/benchmarks.md).
"""

from __future__ import annotations

import math

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
    """(n-1,) float64: the rms error ``h_k / 2 * |J_k| / sqrt(3)`` of each panel between
    neighbouring nodes, for nodes ``alphas`` (n,) in increasing order, per-step gradients
    (n, *F) and ``delta`` = x - b (*F)."""
    n = len(alphas)
    widths = (alphas[1:] - alphas[:-1]).double()
    jumps = torch.empty(max(n - 1, 0), dtype=torch.float64)
    for start in range(0, n - 1, _STEP_BLOCK):
        stop = min(start + _STEP_BLOCK, n - 1)
        block = (directional[start + 1 : stop + 1] - directional[start:stop]) * delta
        jumps[start:stop] = torch.linalg.vector_norm(block.flatten(1).double(), dim=1).cpu()
    return JUMP_RMS * widths.cpu() / 2 * jumps


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


def error_estimate(alphas: Tensor, weights: Tensor, directional: Tensor, delta: Tensor, integrated: Tensor) -> float:
    """The estimated relative L2 error of ``integrated`` (IG, *F) from its own nodes (n,),
    weights (n,), per-step gradients (n, *F) and ``delta`` = x - b (*F) (module docstring).
    0.0 for a zero IG with nothing left to integrate, inf for a zero IG with something."""
    order = torch.argsort(alphas)
    if not bool((order == torch.arange(len(alphas), device=order.device)).all()):
        alphas, weights, directional = alphas[order], weights[order], directional[order]
    squared = float(panel_errors(alphas, directional, delta).square().sum())
    bias_weights = weights.double().cpu() - trapezoid_weights(alphas)
    if bool((bias_weights.abs() > 1e-7).any()):
        bias = torch.zeros_like(delta, dtype=torch.float64)
        shape = (-1, *(1,) * delta.dim())
        for start in range(0, len(alphas), _STEP_BLOCK):
            block = slice(start, start + _STEP_BLOCK)
            bias += (bias_weights[block].to(directional.device).view(shape) * directional[block]).sum(0).double()
        squared += float(torch.linalg.vector_norm(bias * delta)) ** 2
    return relative(math.sqrt(squared), integrated)


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
