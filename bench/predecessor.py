"""A faithful re-creation of the predecessor's compute path, for benchmarks only.

The predecessor (kh8fb/int-gradients-image-server, ``run_models.py``) ran, per request:
``IntermediateGradients.attribute`` (the ``intermediate-gradients`` package: every path
point in one batch, gradients via captum) and then captum's ``IntegratedGradients``
over the same path again, with trainable parameters. This module does the same with
today's captum; the old package no longer installs, so its pass is rewritten here.
The model runs in eval mode (the predecessor switched LaNet to train mode, which made
results batch-dependent; eval keeps the comparison exact).
"""

from __future__ import annotations

import torch
from captum.attr import IntegratedGradients
from captum.attr._utils.approximation_methods import approximation_parameters
from torch import Tensor, nn


def predecessor_attribute(model: nn.Module, x: Tensor, target: int, n_steps: int = 50) -> dict[str, Tensor]:
    """The predecessor's result dict for one image x (1, C, H, W), zero baseline."""
    baseline = x * 0
    step_sizes_of, alphas_of = approximation_parameters("gausslegendre")
    step_sizes, alphas = step_sizes_of(n_steps), alphas_of(n_steps)
    # intermediate-gradients: all path points in one batch, one backward.
    scaled = torch.cat([baseline + a * (x - baseline) for a in alphas]).requires_grad_()
    (grads,) = torch.autograd.grad(model(scaled)[:, target].sum(), scaled)
    # ...then captum walks the same path again for IG.
    integrated = IntegratedGradients(model).attribute(x, baseline, target=target, n_steps=n_steps)
    with torch.no_grad():
        output = model(x)
    return {
        "integrated_grads": integrated.detach(),
        "integrated_directional_grads": grads.detach(),
        "step_sizes": torch.tensor(step_sizes).view(n_steps, 1),
        "intermediates": scaled.detach(),
        "output": output,
        "target_class": target,
    }
