"""BiT ResNetV2: the pre-activation ResNet of Google's "Big Transfer" (Kolesnikov et al. 2019).

Origin: the PyTorch ResNetV2 of github.com/google-research/big_transfer
(``bit_pytorch/models.py``), which the predecessor server vendored as
``intgrads_images/models/bit_model.py``. Rewritten here; the module names are
kept so that the original checkpoints load with ``strict=True``.

Facts that are easy to get wrong (all checked against the original):

- Every convolution except the head's is weight-standardised per output channel
  over (in, kh, kw) with the *biased* variance and eps 1e-10 *inside* the sqrt:
  ``w = (w - mean) / sqrt(var + 1e-10)``. The head is a plain 1x1 conv with bias.
- GroupNorm(32, C) everywhere, PyTorch defaults (eps 1e-5, affine).
- The bottleneck puts its stride on the 3x3 conv (``conv2``), not on ``conv1``.
- The projection shortcut (``downsample``, a 1x1 standardised conv carrying the
  unit's stride) takes the pre-activated input ``relu(gn1(x))``, not ``x``. It
  exists iff stride != 1 or cin != cout, which is exactly every ``unit01``.
- Root: std-conv 7x7/2 (padding 3) -> zero pad 1 -> max-pool 3/2 without padding.
  ``MaxPool2d(3, 2, padding=1)`` is *not* equivalent: it pads with -inf, while the
  zero pad lets 0 win the max at the borders (the root output is not rectified).
- Head: GroupNorm -> ReLU -> global average pool -> 1x1 conv with bias.
- Checkpoints saved through ``nn.DataParallel`` prefix every key with
  ``module.``; the caller strips it before ``load_state_dict``.

Family members (block units, width factor): R50 (3, 4, 6, 3), R101 (3, 4, 23, 3),
R152 (3, 8, 36, 3); widths x1..x4. BiT-S-R101x3 has 381,851,338 parameters.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from igd.models.standardized import StandardizedConv2d

__all__ = ["BitConfig", "PreActBottleneck", "ResNetV2", "StdConv2d", "infer_bit_config"]

_STD_EPS = 1e-10
_GROUPS = 32
_NUM_BLOCKS = 4


class StdConv2d(StandardizedConv2d):
    """Conv2d whose weight is standardised per output channel: biased variance, eps in the sqrt."""

    def standardize(self, weight: Tensor) -> Tensor:
        var, mean = torch.var_mean(weight, dim=(1, 2, 3), keepdim=True, correction=0)
        return (weight - mean) / torch.sqrt(var + _STD_EPS)


def _conv1x1(cin: int, cout: int, stride: int = 1) -> StdConv2d:
    return StdConv2d(cin, cout, kernel_size=1, stride=stride, padding=0, bias=False)


class PreActBottleneck(nn.Module):
    """Pre-activation (v2) bottleneck unit: GN-ReLU-conv1x1, GN-ReLU-conv3x3, GN-ReLU-conv1x1."""

    downsample: StdConv2d | None

    def __init__(self, cin: int, cout: int, cmid: int, stride: int = 1) -> None:
        super().__init__()
        self.gn1 = nn.GroupNorm(_GROUPS, cin)
        self.conv1 = _conv1x1(cin, cmid)
        self.gn2 = nn.GroupNorm(_GROUPS, cmid)
        self.conv2 = StdConv2d(cmid, cmid, kernel_size=3, stride=stride, padding=1, bias=False)
        self.gn3 = nn.GroupNorm(_GROUPS, cmid)
        self.conv3 = _conv1x1(cmid, cout)
        if stride != 1 or cin != cout:
            self.downsample = _conv1x1(cin, cout, stride)
        else:
            self.downsample = None

    def forward(self, x: Tensor) -> Tensor:
        """(N, cin, H, W) -> (N, cout, H / stride, W / stride)."""
        out = F.relu(self.gn1(x))
        shortcut = x if self.downsample is None else self.downsample(out)
        out = self.conv1(out)
        out = self.conv2(F.relu(self.gn2(out)))
        out = self.conv3(F.relu(self.gn3(out)))
        return out + shortcut


class ResNetV2(nn.Module):
    """BiT ResNetV2 classifier.

    Args:
        block_units: units in each of the four blocks, e.g. (3, 4, 23, 3) for R101.
        width_factor: channel multiplier; the root has 64 * width_factor channels.
        head_size: number of classes.
    """

    def __init__(self, block_units: Sequence[int], width_factor: int, head_size: int) -> None:
        super().__init__()
        if len(block_units) != _NUM_BLOCKS or min(block_units) < 1:
            raise ValueError(f"block_units must be 4 positive counts, got {list(block_units)}")
        if width_factor < 1 or head_size < 1:
            raise ValueError(
                f"width_factor and head_size must be positive, got {width_factor}, {head_size}"
            )
        wf = width_factor
        self.root = nn.Sequential(
            OrderedDict(
                conv=StdConv2d(3, 64 * wf, kernel_size=7, stride=2, padding=3, bias=False),
                pad=nn.ConstantPad2d(1, 0.0),
                pool=nn.MaxPool2d(kernel_size=3, stride=2, padding=0),
            )
        )

        blocks: OrderedDict[str, nn.Module] = OrderedDict()
        cin = 64 * wf
        for b, n_units in enumerate(block_units):
            cmid = 64 * wf * 2**b
            cout = 4 * cmid
            units: OrderedDict[str, nn.Module] = OrderedDict()
            for u in range(1, n_units + 1):
                stride = 2 if b > 0 and u == 1 else 1
                units[f"unit{u:02d}"] = PreActBottleneck(cin, cout, cmid, stride)
                cin = cout
            blocks[f"block{b + 1}"] = nn.Sequential(units)
        self.body = nn.Sequential(blocks)

        self.head = nn.Sequential(
            OrderedDict(
                gn=nn.GroupNorm(_GROUPS, cin),
                relu=nn.ReLU(),
                avg=nn.AdaptiveAvgPool2d(output_size=1),
                conv=nn.Conv2d(cin, head_size, kernel_size=1, bias=True),
            )
        )

    def forward(self, x: Tensor) -> Tensor:
        """(N, 3, H, W) float32 -> (N, head_size) logits."""
        return self.head(self.body(self.root(x))).flatten(1)


@dataclass(frozen=True)
class BitConfig:
    """Constructor arguments of a ResNetV2."""

    block_units: tuple[int, ...]
    width_factor: int
    head_size: int


_UNIT_KEY = re.compile(r"^body\.block(\d+)\.unit(\d+)\.")


def infer_bit_config(state_dict: Mapping[str, Tensor]) -> BitConfig:
    """Read the ResNetV2 variant off a state dict whose keys carry no ``module.`` prefix.

    Units per block come from the ``body.blockB.unitUU.`` key names, the width from
    the root conv's 64 * width_factor output channels, the head size from the head
    conv's output channels. Raises ValueError if this is not a BiT ResNetV2 state dict.
    """
    root = state_dict.get("root.conv.weight")
    if root is None:
        hint = ""
        if "module.root.conv.weight" in state_dict:
            hint = " (the keys still carry the 'module.' prefix; strip it first)"
        raise ValueError(f"not a BiT ResNetV2 state dict: no 'root.conv.weight'{hint}")
    if root.ndim != 4 or tuple(root.shape[1:]) != (3, 7, 7) or root.shape[0] % 64 != 0:
        raise ValueError(
            "not a BiT ResNetV2 state dict: 'root.conv.weight' has shape "
            f"{tuple(root.shape)}, expected (64 * width_factor, 3, 7, 7)"
        )
    width_factor = root.shape[0] // 64

    units: dict[int, set[int]] = {b: set() for b in range(1, _NUM_BLOCKS + 1)}
    for key in state_dict:
        match = _UNIT_KEY.match(key)
        if match is None:
            continue
        block = int(match.group(1))
        if block not in units:
            raise ValueError(f"not a BiT ResNetV2 state dict: unexpected block in key {key!r}")
        units[block].add(int(match.group(2)))
    block_units = []
    for block, found in units.items():
        if not found:
            raise ValueError(f"not a BiT ResNetV2 state dict: no units under 'body.block{block}.'")
        if sorted(found) != list(range(1, len(found) + 1)):
            raise ValueError(
                f"not a BiT ResNetV2 state dict: units of 'body.block{block}' are "
                f"{sorted(found)}, expected 1..{len(found)}"
            )
        block_units.append(len(found))

    head = state_dict.get("head.conv.weight")
    if head is None:
        raise ValueError("not a BiT ResNetV2 state dict: no 'head.conv.weight'")
    if head.ndim != 4 or head.shape[1] != 2048 * width_factor:
        raise ValueError(
            f"not a BiT ResNetV2 state dict: 'head.conv.weight' has shape {tuple(head.shape)}, "
            f"expected (head_size, {2048 * width_factor}, 1, 1)"
        )
    return BitConfig(tuple(block_units), width_factor, int(head.shape[0]))
