"""A model's preprocessing: PIL image -> (1, C, H, W) tensor, in two halves.

``to_pixels`` does the geometry (resize, crop) and scales to [0, 1]; ``normalize``
maps pixels to the model's input space. Keeping them apart lets pixel-space baselines
(black, white, blurred, noise) go through exactly the model's own normalisation.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Literal

import torch
from PIL import Image
from torch import Tensor
from torchvision import transforms
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as F

# ImageNet-trained networks commonly resize the shorter side to 256 and crop 224.
CROP_RATIO = 0.875
ResizePolicy = Literal["stretch", "crop"]
# The resamplers igd offers, by the names timm uses (HF's PIL ``resample`` codes map onto them).
# On a PIL image torchvision resizes with PIL itself, antialiased as PIL always is: exactly
# what timm's transforms (and HF's PIL-based processors) do.
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "lanczos")
_MODES = {
    "nearest": InterpolationMode.NEAREST,
    "bilinear": InterpolationMode.BILINEAR,
    "bicubic": InterpolationMode.BICUBIC,
    "lanczos": InterpolationMode.LANCZOS,
}
MAX_CROP_PCT = 2.0  # timm's largest is 1.15 (VOLO); 87.5 or 256 here is a unit mistake
# Where a centre crop starts: "round" is torchvision's CenterCrop (round((size - crop) / 2),
# half to even; timm uses it), "floor" is transformers' (size - crop) // 2. They part by one
# pixel where the margin is 3 mod 4.
CROP_OFFSETS = ("round", "floor")


@dataclass(frozen=True)
class Preprocessing:
    """Resize policy, input size and normalisation of one model.

    ``stretch``: resize to exactly (H, W), ignoring the aspect ratio (the CIFAR models).
    ``crop``: resize the shorter side to ``resize_to``, else ``floor(min(H, W) / crop_pct)``
    (timm's rounding), else ``round(min(H, W) / 0.875)``, then centre-crop (H, W) (ImageNet
    models). With ``crop_pct`` and no ``resize_to`` a non-square (H, W) follows timm's
    ``ResizeKeepRatio``: the image is scaled, keeping its aspect ratio, until it covers
    ``(floor(H / crop_pct), floor(W / crop_pct))``, then centre-cropped.
    ``stretch`` with ``crop_pct`` is timm's ``crop_mode="squash"``: resize to exactly
    ``(floor(H / crop_pct), floor(W / crop_pct))``, then centre-crop (H, W).

    ``crop_offsets`` is where every centre crop starts: ``round`` is torchvision's (and timm's)
    CenterCrop, ``round((size - crop) / 2)`` half to even; ``floor`` is transformers'
    ``floor((size - crop) / 2)`` (one pixel apart where the margin is 3 mod 4).

    ``interpolation`` is the resampler (antialiased, as PIL resizes); ``origin`` says where
    these settings came from, for people and provenance (it does not take part in ``==``).
    """

    input_size: tuple[int, int]  # (H, W)
    mean: tuple[float, ...]
    std: tuple[float, ...]
    resize: ResizePolicy = "stretch"
    resize_to: int | None = None
    interpolation: str = "bilinear"  # one of INTERPOLATIONS
    crop_pct: float | None = None  # the fraction of the resized image the crop keeps (timm, HF ConvNeXt)
    crop_offsets: str = "round"  # one of CROP_OFFSETS: torchvision's/timm's centre crop, or transformers'
    # e.g. "built-in", "sidecar /x/net.pt.json", "timm data config (resnet18)"; not part of ==
    origin: str = field(default="built-in", compare=False)

    def __post_init__(self) -> None:
        if self.resize not in ("stretch", "crop"):
            raise ValueError(f"resize must be 'stretch' or 'crop', got {self.resize!r}")
        if len(self.mean) != len(self.std) or any(s <= 0 for s in self.std):
            raise ValueError("mean and std need one value per channel, std > 0")
        if not isinstance(self.interpolation, str) or self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {', '.join(INTERPOLATIONS)}, got {self.interpolation!r}")
        if self.crop_pct is not None:
            pct = self.crop_pct
            if isinstance(pct, bool) or not isinstance(pct, (int, float)) or not 0 < pct <= MAX_CROP_PCT:
                raise ValueError(
                    f"crop_pct must be a fraction in (0, {MAX_CROP_PCT:g}] (e.g. 0.875: the crop keeps 87.5 % "
                    f"of the resized image), got {pct!r}"
                )
        if not isinstance(self.crop_offsets, str) or self.crop_offsets not in CROP_OFFSETS:
            raise ValueError(
                f"crop_offsets must be 'round' (torchvision's and timm's centre crop) or 'floor' "
                f"(transformers'), got {self.crop_offsets!r}"
            )
        if not isinstance(self.origin, str) or not self.origin:
            raise ValueError(f"origin must be a non-empty string, got {self.origin!r}")

    @property
    def _mode(self) -> InterpolationMode:
        return _MODES[self.interpolation]

    def _shorter(self) -> int:
        """``crop``: the side the image's shorter side is resized to."""
        height, width = self.input_size
        if self.resize_to:
            return self.resize_to
        if self.crop_pct:
            return math.floor(min(height, width) / self.crop_pct)
        return round(min(height, width) / CROP_RATIO)

    def _scale_size(self) -> tuple[int, int] | None:
        """(H', W') that the image is squashed to (``stretch``) or scaled to cover (``crop``,
        non-square), as timm's ``floor(x / crop_pct)``; None where the shorter side rule applies."""
        height, width = self.input_size
        if self.crop_pct is None or (self.resize == "crop" and (self.resize_to or height == width)):
            return None
        return (math.floor(height / self.crop_pct), math.floor(width / self.crop_pct))

    def _offset(self, margin: int) -> int:
        """Where a centre crop starts on an axis ``margin`` pixels longer than the crop."""
        return margin // 2 if self.crop_offsets == "floor" else round(margin / 2)

    @functools.cached_property
    def _geometry(self) -> transforms.Compose:
        height, width = self.input_size
        scale_size = self._scale_size()
        crop = _FloorCrop(height, width) if self.crop_offsets == "floor" else transforms.CenterCrop((height, width))
        if self.resize == "stretch":
            if scale_size is None:
                steps = [transforms.Resize((height, width), interpolation=self._mode)]
            else:
                steps = [transforms.Resize(scale_size, interpolation=self._mode), crop]
        elif scale_size is None:
            steps = [transforms.Resize(self._shorter(), interpolation=self._mode), crop]
        else:
            steps = [_KeepRatio(scale_size, self._mode), crop]
        return transforms.Compose([*steps, transforms.ToTensor()])

    def to_pixels(self, image: Image.Image) -> Tensor:
        """RGB image -> (1, 3, H, W) float32 in [0, 1], resized as the model expects."""
        return self._geometry(self._within_reason(image)).unsqueeze(0)

    def _within_reason(self, image: Image.Image) -> Image.Image:
        """For ``crop``, cut an image of extreme aspect ratio (say 1 x 100000) to its
        centre before resizing: resizing its shorter side to 256 would first make a
        256 x 25,600,000 image. The cut keeps twice what the centre crop uses, so the
        crop sees the same pixels; images up to 1:4 are never cut."""
        if self.resize != "crop":
            return image
        width, height = image.size
        shorter, longer = min(width, height), max(width, height)
        keep = 2 * shorter * math.ceil(max(self.input_size) / min(self.input_size))  # a wide crop uses more
        if longer <= 2 * keep:
            return image
        start = (longer - keep) // 2
        box = (start, 0, start + keep, height) if width > height else (0, start, width, start + keep)
        return image.crop(box)

    def normalize(self, pixels: Tensor) -> Tensor:
        """(N, C, H, W) pixels in [0, 1] -> the model's input space."""
        mean = torch.tensor(self.mean, dtype=pixels.dtype, device=pixels.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=pixels.dtype, device=pixels.device).view(1, -1, 1, 1)
        return (pixels - mean) / std

    def __call__(self, image: Image.Image) -> Tensor:
        """RGB image -> (1, C, H, W) model input."""
        return self.normalize(self.to_pixels(image))

    def describe(self) -> str:
        """One line for people, e.g. ``resize shorter side to 235 (bicubic), centre-crop 224x224
        (crop_pct 0.95)``; the interpolation is named when it is not bilinear, the crop's
        offsets when they are floored (transformers')."""
        height, width = self.input_size
        how = "" if self.interpolation == "bilinear" else f" ({self.interpolation})"
        scale_size = self._scale_size()
        notes = [f"crop_pct {self.crop_pct:g}"] if self.crop_pct is not None and not self.resize_to else []
        notes += ["offsets floored"] if self.crop_offsets == "floor" else []
        pct = f" ({', '.join(notes)})" if notes else ""
        if self.resize == "stretch":
            if scale_size is None:
                return f"resize to {height}x{width}{how}"
            return f"resize to {scale_size[0]}x{scale_size[1]}{how}, centre-crop {height}x{width}{pct}"
        if scale_size is not None:
            return f"resize to cover {scale_size[0]}x{scale_size[1]}{how}, centre-crop {height}x{width}{pct}"
        return f"resize shorter side to {self._shorter()}{how}, centre-crop {height}x{width}{pct}"


class _FloorCrop:
    """Centre crop (height, width) of a PIL image at offsets floor((size - crop) / 2), as
    transformers does; a crop larger than the image is padded with zeros, as CenterCrop pads."""

    def __init__(self, height: int, width: int) -> None:
        self.height, self.width = height, width

    def __call__(self, image: Image.Image) -> Image.Image:
        left, top = (image.width - self.width) // 2, (image.height - self.height) // 2
        return image.crop((left, top, left + self.width, top + self.height))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(height={self.height}, width={self.width})"


class _KeepRatio:
    """timm's ``ResizeKeepRatio`` (eval, ``longest=0``): scale the image, keeping its aspect
    ratio, by the smaller of the two ratios to ``size`` (H, W), rounding each side."""

    def __init__(self, size: tuple[int, int], mode: InterpolationMode) -> None:
        self.size = size
        self.mode = mode

    def __call__(self, image: Image.Image) -> Image.Image:
        width, height = image.size
        ratio = min(height / self.size[0], width / self.size[1])
        return F.resize(image, [round(height / ratio), round(width / ratio)], self.mode)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size}, interpolation={self.mode.value})"
