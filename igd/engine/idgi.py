"""IDGI (Yang et al., CVPR 2023): IG's path walk with the noise directions taken out.

IG sums ``w_k g_k * gamma'(a_k)`` along the path; most of that is movement orthogonal to
the gradient, which changes nothing in the output and shows up as noise. IDGI keeps, for
each step, only the part along the gradient: the step's change of the target logit
``d_k``, spread over the features in proportion to ``g_k^2``:

    IDGI = sum_k d_k * g_k^2 / sum(g_k^2)

It needs only what the one pass already has: the per-step gradients and the target logit
at every path point (``path_logits``), plus the logits at the path's ends. Steps follow
the nodes in increasing order: node k owns the change from its own point to the next
node's (the last node's to the input's, at a = 1), and the first node also the change from
the start (a = 0) to its point, so that the steps add up to ``F_t(x) - F_t(start)``:
IDGI is complete by construction. With riemann_left nodes (the first at the start) this is
the authors' reference implementation exactly. A step with an all-zero gradient has no
direction and contributes nothing.
"""

from __future__ import annotations

import torch
from torch import Tensor


def idgi(directional: Tensor, alphas: Tensor, path_logits: Tensor, start_logit: float, end_logit: float) -> Tensor:
    """(*F): IDGI of one row from its per-step gradients (n, *F) at nodes ``alphas`` (n,),
    the target logit at each node (n,) and at the path's start and end. float64 sums,
    returned in the gradients' dtype."""
    order = torch.argsort(alphas)
    logits = path_logits.double().cpu()[order.cpu()]
    following = torch.cat([logits[1:], torch.tensor([end_logit], dtype=torch.float64)])
    changes = following - logits
    changes[0] += logits[0] - start_logit
    total = torch.zeros(directional.shape[1:], dtype=torch.float64, device=directional.device)
    for k, change in zip(order.tolist(), changes.tolist()):
        squared = directional[k].double().square()
        norm = float(squared.sum())
        if norm > 0.0:
            total += squared * (change / norm)
    return total.to(directional.dtype)
