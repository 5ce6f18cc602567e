"""Weight-standardised convolutions (BiT and LaNet use two different formulas), with the
standardised weight cached for inference.

Standardising costs a pass over every weight on every forward call. For BiT-R101x3 that
is 380M numbers per call, more than the convolutions themselves at 32x32 when an
attribution runs its path in small chunks. Once the weights are frozen (eval mode, no
weight gradient) the result cannot change, so it is computed once per weight version.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class StandardizedConv2d(nn.Conv2d):
    """Conv2d with ``standardize(weight)`` applied on every call; subclasses give the formula."""

    _cached: tuple[tuple[object, ...], Tensor] | None = None

    def standardize(self, weight: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        """(N, C_in, H, W) -> (N, C_out, H', W')."""
        return F.conv2d(x, self._weight(), self.bias, self.stride, self.padding, self.dilation, self.groups)

    def _weight(self) -> Tensor:
        weight = self.weight
        if self.training or (weight.requires_grad and torch.is_grad_enabled()):
            return self.standardize(weight)
        # _version changes with every in-place update, data_ptr with .to() and loads.
        key = (weight.data_ptr(), weight._version, weight.dtype, weight.device)
        if self._cached is None or self._cached[0] != key:
            with torch.no_grad():
                self._cached = (key, self.standardize(weight))
        return self._cached[1]
