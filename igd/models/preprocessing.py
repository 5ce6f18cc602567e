"""A model's preprocessing: PIL image -> (1, C, H, W) tensor, in two halves.

``to_pixels`` does the geometry (resize, crop) and scales to [0, 1]; ``normalize``
maps pixels to the model's input space. Keeping them apart lets pixel-space baselines
(black, white, blurred, noise) go through exactly the model's own normalisation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from PIL import Image
from torch import Tensor

# ImageNet-trained networks commonly resize the shorter side to 256 and crop 224.
CROP_RATIO = 0.875
ResizePolicy = Literal["stretch", "crop"]
# The resamplers igd offers, by the names timm uses (HF's PIL ``resample`` codes map onto them).
# Resizing is Pillow's, antialiased as Pillow always is: what torchvision's transforms do on a
# PIL image (and so timm's), and HF's PIL-based processors. The geometry below is
# torchvision's Resize / CenterCrop / ToTensor on PIL images, step for step, in plain Pillow:
# importing torchvision costs every igd process 1.3-1.9 s of CPU (its ops import
# torch._dynamo), for nothing else on this path. tests/test_model_files.py holds it equal,
# bit for bit, to torchvision's transforms, timm's and the HF processors.
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "lanczos")
_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
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


    def _geometry(self, image: Image.Image) -> Image.Image:
        """The image resized and cropped to ``input_size`` (the class docstring's rules)."""
        height, width = self.input_size
        resample = _RESAMPLE[self.interpolation]
        scale_size = self._scale_size()
        if self.resize == "stretch":
            if scale_size is None:
                return _resized(image, height, width, resample)
            return self._centre_crop(_resized(image, *scale_size, resample))
        if scale_size is None:  # the shorter side to _shorter(), the longer truncated as torchvision's Resize
            shorter = self._shorter()
            long_side = int(shorter * max(image.size) / min(image.size))
            size = (shorter, long_side) if image.width <= image.height else (long_side, shorter)
            return self._centre_crop(_resized(image, size[1], size[0], resample))
        # timm's ResizeKeepRatio (eval, longest=0): one ratio for both sides, each rounded
        ratio = min(image.height / scale_size[0], image.width / scale_size[1])
        return self._centre_crop(_resized(image, round(image.height / ratio), round(image.width / ratio), resample))

    def _centre_crop(self, image: Image.Image) -> Image.Image:
        """The centre (H, W) of ``image``, its start by ``crop_offsets``; where the crop is
        larger than the image, the outside is zeros, as torchvision's CenterCrop pads
        ((crop - size) // 2 before) and transformers' crop at floor offsets."""
        height, width = self.input_size
        left = self._start(image.width - width)
        top = self._start(image.height - height)
        return image.crop((left, top, left + width, top + height))  # Pillow fills outside the image with 0

    def _start(self, margin: int) -> int:
        """Where a centre crop starts on an axis ``margin`` pixels longer than the crop (negative:
        shorter, and padded)."""
        if self.crop_offsets == "floor":
            return margin // 2
        return round(margin / 2) if margin >= 0 else -(-margin // 2)

    def to_pixels(self, image: Image.Image) -> Tensor:
        """RGB image -> (1, 3, H, W) float32 in [0, 1], resized as the model expects."""
        pixels = np.array(self._geometry(self._within_reason(image)), dtype=np.uint8, copy=True)
        if pixels.ndim == 2:  # one channel
            pixels = pixels[:, :, None]
        return torch.from_numpy(pixels).permute(2, 0, 1).contiguous().float().div(255).unsqueeze(0)

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


def _resized(image: Image.Image, height: int, width: int, resample: Image.Resampling) -> Image.Image:
    return image.resize((width, height), resample)
