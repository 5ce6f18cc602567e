"""LaNet: the DARTS-style NetworkCIFAR of LaMCTS (Wang et al. 2019) with the LaNet genotype.

Origin: facebookresearch/LaMCTS (``LaNAS/LaNet``), itself built on DARTS
(Liu et al. 2018), as vendored by the predecessor server in
``intgrads_images/models/lanet_model.py``. Rewritten here; module names and the
``nn.Sequential`` indices are kept so that the original checkpoints load with
``strict=True``.

Facts that are easy to get wrong (all checked against the original):

- The 1x1 convs inside separable convs and the cells' ``ReLUConvBN``
  preprocessing are weight-standardised differently from BiT: centre each output
  channel's weight over (in, kh, kw), divide by its *unbiased* std plus 1e-5 (the
  eps is added to the std, outside any sqrt). The depthwise convs, the
  ``FactorizedReduce`` convs, the stem and the auxiliary head use plain convs.
- Stem: conv3x3 to 3 * C channels + BatchNorm. Reduction cells sit at
  ``layers // 3`` and ``2 * layers // 3``, doubling C; in a reduction cell the ops
  reading the two cell inputs (index < 2) have stride 2 and ``skip_connect``
  becomes ``FactorizedReduce``. A cell outputs ``len(concat) * C`` channels (4C here).
- The original ``forward`` returns ``(logits, aux)``; the auxiliary head (fed
  from the cell at ``2 * layers // 3``) only runs in training mode, so in eval mode
  the original returns ``(logits, None)``. Drop-path is likewise training-only.
  Here ``forward`` always returns the logits alone and never drops paths: the
  auxiliary head is kept only so that checkpoints load.
- Checkpoints are training-script dicts; the weights are under ``model_state_dict``.
- BatchNorm layers use PyTorch defaults (eps 1e-5, momentum 0.1).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from igd.models.standardized import StandardizedConv2d

__all__ = [
    "LANET_GENOTYPE",
    "Genotype",
    "LanetConfig",
    "NetworkCIFAR",
    "infer_lanet_config",
]

_STEM_MULTIPLIER = 3
_STD_EPS = 1e-5


@dataclass(frozen=True)
class Genotype:
    """Cell wiring: op ``2i`` and ``2i + 1`` feed node ``i + 2``; (op name, input node) pairs.

    Nodes 0 and 1 are the outputs of the two previous cells; the cell output is
    the channel concatenation of the nodes listed in ``*_concat``.
    """

    normal: tuple[tuple[str, int], ...]
    normal_concat: tuple[int, ...]
    reduce: tuple[tuple[str, int], ...]
    reduce_concat: tuple[int, ...]


# The predecessor decoded this from the search code
# [2, 2, 0, 2, 1, 2, 0, 2, 2, 3, 2, 1, 2, 0, 0, 1, 1, 1, 2, 1, 1, 0, 3, 4, 3, 0, 3, 1];
# normal and reduction cells share the same wiring.
_LANET_CELL: tuple[tuple[str, int], ...] = (
    ("skip_connect", 0),
    ("skip_connect", 1),
    ("sep_conv_3x3", 1),
    ("skip_connect", 1),
    ("max_pool_3x3", 2),
    ("skip_connect", 1),
    ("sep_conv_3x3", 1),
    ("skip_connect", 0),
    ("skip_connect", 3),
    ("sep_conv_5x5", 4),
    ("skip_connect", 3),
    ("max_pool_3x3", 0),
    ("skip_connect", 3),
    ("sep_conv_3x3", 1),
)
LANET_GENOTYPE = Genotype(
    normal=_LANET_CELL,
    normal_concat=(5, 6, 7, 8),
    reduce=_LANET_CELL,
    reduce_concat=(5, 6, 7, 8),
)


class UnbiasedStdConv2d(StandardizedConv2d):
    """Conv2d with ``w = (w - mean) / (std_unbiased(w - mean) + 1e-5)`` per output channel."""

    def standardize(self, weight: Tensor) -> Tensor:
        centred = weight - weight.mean(dim=(1, 2, 3), keepdim=True)
        std = centred.flatten(1).std(dim=1, correction=1).view(-1, 1, 1, 1)
        return centred / (std + _STD_EPS)


class ReLUConvBN(nn.Module):
    """ReLU -> standardised 1x1 conv -> BatchNorm: (N, C_in, H, W) -> (N, C_out, H, W)."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.op = nn.Sequential(
            nn.ReLU(),
            UnbiasedStdConv2d(c_in, c_out, kernel_size=1, bias=False),
            nn.BatchNorm2d(c_out),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.op(x)


class SepConv(nn.Module):
    """Two rounds of ReLU -> depthwise kxk -> standardised 1x1 -> BatchNorm; stride on the first."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int) -> None:
        super().__init__()
        pad = kernel // 2
        self.op = nn.Sequential(
            nn.ReLU(),
            nn.Conv2d(c_in, c_in, kernel, stride=stride, padding=pad, groups=c_in, bias=False),
            UnbiasedStdConv2d(c_in, c_in, kernel_size=1, bias=False),
            nn.BatchNorm2d(c_in),
            nn.ReLU(),
            nn.Conv2d(c_in, c_in, kernel, stride=1, padding=pad, groups=c_in, bias=False),
            UnbiasedStdConv2d(c_in, c_out, kernel_size=1, bias=False),
            nn.BatchNorm2d(c_out),
        )

    def forward(self, x: Tensor) -> Tensor:
        """(N, C_in, H, W) -> (N, C_out, H / stride, W / stride)."""
        return self.op(x)


class FactorizedReduce(nn.Module):
    """Halve H and W with two offset 1x1/2 convs (plain, not standardised), concatenated."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        if c_out % 2 != 0:
            raise ValueError(f"FactorizedReduce needs an even number of channels, got {c_out}")
        self.relu = nn.ReLU()
        self.conv_1 = nn.Conv2d(c_in, c_out // 2, 1, stride=2, bias=False)
        self.conv_2 = nn.Conv2d(c_in, c_out // 2, 1, stride=2, bias=False)
        self.bn = nn.BatchNorm2d(c_out)

    def forward(self, x: Tensor) -> Tensor:
        """(N, C_in, H, W) -> (N, C_out, H / 2, W / 2), H and W even."""
        x = self.relu(x)
        return self.bn(torch.cat([self.conv_1(x), self.conv_2(x[:, :, 1:, 1:])], dim=1))


def _make_op(name: str, channels: int, stride: int) -> nn.Module:
    if name == "skip_connect":
        return nn.Identity() if stride == 1 else FactorizedReduce(channels, channels)
    if name == "max_pool_3x3":
        return nn.MaxPool2d(3, stride=stride, padding=1)
    if name == "sep_conv_3x3":
        return SepConv(channels, channels, 3, stride)
    if name == "sep_conv_5x5":
        return SepConv(channels, channels, 5, stride)
    raise ValueError(
        f"unknown op {name!r}; LaNet cells use skip_connect, max_pool_3x3, sep_conv_3x3, "
        "sep_conv_5x5"
    )


class Cell(nn.Module):
    """One normal or reduction cell; maps the two previous cell outputs to ``len(concat) * C``."""

    preprocess0: nn.Module

    def __init__(
        self,
        genotype: Genotype,
        c_prev_prev: int,
        c_prev: int,
        channels: int,
        reduction: bool,
        reduction_prev: bool,
    ) -> None:
        super().__init__()
        # After a reduction cell s0 is twice the resolution of s1, so bring it down too.
        if reduction_prev:
            self.preprocess0 = FactorizedReduce(c_prev_prev, channels)
        else:
            self.preprocess0 = ReLUConvBN(c_prev_prev, channels)
        self.preprocess1 = ReLUConvBN(c_prev, channels)

        wiring = genotype.reduce if reduction else genotype.normal
        if len(wiring) % 2 != 0:
            raise ValueError(f"a cell needs an even number of ops, got {len(wiring)}")
        self._indices = tuple(index for _, index in wiring)
        self._concat = genotype.reduce_concat if reduction else genotype.normal_concat
        self.multiplier = len(self._concat)
        self._ops = nn.ModuleList(
            _make_op(name, channels, 2 if reduction and index < 2 else 1) for name, index in wiring
        )

    def forward(self, s0: Tensor, s1: Tensor) -> Tensor:
        """(N, C_pp, H0, W0), (N, C_p, H, W) -> (N, multiplier * C, H', W')."""
        states = [self.preprocess0(s0), self.preprocess1(s1)]
        for i in range(0, len(self._ops), 2):
            h1 = self._ops[i](states[self._indices[i]])
            h2 = self._ops[i + 1](states[self._indices[i + 1]])
            states.append(h1 + h2)
        return torch.cat([states[i] for i in self._concat], dim=1)


class AuxiliaryHeadCIFAR(nn.Module):
    """Training-time auxiliary classifier; (N, C, 8, 8) -> (N, num_classes). Never run here."""

    def __init__(self, channels: int, num_classes: int) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.ReLU(),
            nn.AvgPool2d(5, stride=3, padding=0, count_include_pad=False),
            nn.Conv2d(channels, 128, 1, bias=False),
            nn.BatchNorm2d(128),
            nn.ReLU(),
            nn.Conv2d(128, 768, 2, bias=False),
            nn.BatchNorm2d(768),
            nn.ReLU(),
        )
        self.classifier = nn.Linear(768, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x).flatten(1))


class NetworkCIFAR(nn.Module):
    """LaMCTS / DARTS NetworkCIFAR.

    ``forward`` returns the logits only, in training and eval mode alike: the
    auxiliary head is built (when ``auxiliary``) so checkpoints load, but never
    run, and drop-path is never applied. ``drop_path_prob`` exists only because
    the original's loaders set it; it has no effect.

    Args:
        C: initial cell channels (the stem has 3 * C).
        num_classes: number of classes.
        layers: number of cells.
        auxiliary: whether the checkpoint has an ``auxiliary_head``.
        genotype: cell wiring.
    """

    def __init__(
        self,
        C: int,  # noqa: N803 - the original's name, used throughout the literature
        num_classes: int,
        layers: int,
        auxiliary: bool,
        genotype: Genotype = LANET_GENOTYPE,
    ) -> None:
        super().__init__()
        if C < 1 or num_classes < 1 or layers < 1:
            raise ValueError(
                f"C, num_classes and layers must be positive, got {C}, {num_classes}, {layers}"
            )
        self._layers = layers
        self._auxiliary = auxiliary
        self.drop_path_prob = 0.0

        c_stem = _STEM_MULTIPLIER * C
        self.stem = nn.Sequential(
            nn.Conv2d(3, c_stem, 3, padding=1, bias=False),
            nn.BatchNorm2d(c_stem),
        )

        c_prev_prev, c_prev, c_curr = c_stem, c_stem, C
        c_aux = c_prev
        self.cells = nn.ModuleList()
        reduction_prev = False
        for i in range(layers):
            reduction = i in (layers // 3, 2 * layers // 3)
            if reduction:
                c_curr *= 2
            cell = Cell(genotype, c_prev_prev, c_prev, c_curr, reduction, reduction_prev)
            self.cells.append(cell)
            reduction_prev = reduction
            c_prev_prev, c_prev = c_prev, cell.multiplier * c_curr
            if i == 2 * layers // 3:
                c_aux = c_prev

        if auxiliary:
            self.auxiliary_head = AuxiliaryHeadCIFAR(c_aux, num_classes)
        self.global_pooling = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(c_prev, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """(N, 3, H, W) float32, H and W multiples of 4 -> (N, num_classes) logits."""
        s0 = s1 = self.stem(x)
        for cell in self.cells:
            s0, s1 = s1, cell(s0, s1)
        return self.classifier(self.global_pooling(s1).flatten(1))


@dataclass(frozen=True)
class LanetConfig:
    """Constructor arguments of a NetworkCIFAR (the genotype aside)."""

    C: int
    num_classes: int
    layers: int
    auxiliary: bool


_CELL_KEY = re.compile(r"^cells\.(\d+)\.")


def infer_lanet_config(state_dict: Mapping[str, Tensor]) -> LanetConfig:
    """Read the NetworkCIFAR size off a model state dict (``checkpoint["model_state_dict"]``).

    C is the stem conv's output channels / 3, layers the number of ``cells.N.``
    indices, auxiliary the presence of ``auxiliary_head.`` keys, num_classes the
    classifier's output features. Raises ValueError if this is not a LaNet state dict.
    """
    stem = state_dict.get("stem.0.weight")
    if stem is None:
        hint = ""
        if "model_state_dict" in state_dict:
            hint = " (this is a training checkpoint; pass its 'model_state_dict')"
        elif "module.stem.0.weight" in state_dict:
            hint = " (the keys still carry the 'module.' prefix; strip it first)"
        raise ValueError(f"not a LaNet state dict: no 'stem.0.weight'{hint}")
    if stem.ndim != 4 or tuple(stem.shape[1:]) != (3, 3, 3) or stem.shape[0] % 3 != 0:
        raise ValueError(
            f"not a LaNet state dict: 'stem.0.weight' has shape {tuple(stem.shape)}, "
            "expected (3 * C, 3, 3, 3)"
        )
    channels = stem.shape[0] // _STEM_MULTIPLIER

    cells = sorted({int(m.group(1)) for k in state_dict if (m := _CELL_KEY.match(k))})
    if not cells:
        raise ValueError("not a LaNet state dict: no 'cells.N.' keys")
    if cells != list(range(len(cells))):
        raise ValueError(
            f"not a LaNet state dict: cell indices {cells} are not 0..{len(cells) - 1}"
        )

    classifier = state_dict.get("classifier.weight")
    if classifier is None:
        raise ValueError("not a LaNet state dict: no 'classifier.weight'")
    # Each reduction cell doubles C (fewer than 3 cells hold fewer than two distinct ones).
    layers = len(cells)
    n_reductions = len({layers // 3, 2 * layers // 3})
    c_final = len(LANET_GENOTYPE.normal_concat) * 2**n_reductions * channels
    if classifier.ndim != 2 or classifier.shape[1] != c_final:
        raise ValueError(
            f"not a LaNet state dict: 'classifier.weight' has shape {tuple(classifier.shape)}, "
            f"expected (num_classes, {c_final}) for C={channels}"
        )
    auxiliary = any(key.startswith("auxiliary_head.") for key in state_dict)
    return LanetConfig(channels, int(classifier.shape[0]), layers, auxiliary)
