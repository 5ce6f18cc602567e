"""A model's preprocessing: PIL image -> (1, C, H, W) tensor, in two halves.

``to_pixels`` does the geometry (resize, crop) and scales to [0, 1]; ``normalize``
maps pixels to the model's input space. Keeping them apart lets pixel-space baselines
(black, white, blurred, noise) go through exactly the model's own normalisation.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Literal

import torch
from PIL import Image
from torch import Tensor
from torchvision import transforms

# ImageNet-trained networks commonly resize the shorter side to 256 and crop 224.
CROP_RATIO = 0.875
ResizePolicy = Literal["stretch", "crop"]


@dataclass(frozen=True)
class Preprocessing:
    """Resize policy, input size and normalisation of one model.

    ``stretch``: resize to exactly (H, W), ignoring the aspect ratio (the CIFAR models).
    ``crop``: resize the shorter side to ``resize_to`` (default H / 0.875), then
    centre-crop (H, W) (ImageNet models).
    """

    input_size: tuple[int, int]  # (H, W)
    mean: tuple[float, ...]
    std: tuple[float, ...]
    resize: ResizePolicy = "stretch"
    resize_to: int | None = None

    def __post_init__(self) -> None:
        if self.resize not in ("stretch", "crop"):
            raise ValueError(f"resize must be 'stretch' or 'crop', got {self.resize!r}")
        if len(self.mean) != len(self.std) or any(s <= 0 for s in self.std):
            raise ValueError("mean and std need one value per channel, std > 0")

    @functools.cached_property
    def _geometry(self) -> transforms.Compose:
        height, width = self.input_size
        if self.resize == "stretch":
            steps = [transforms.Resize((height, width))]
        else:
            shorter = self.resize_to or round(min(height, width) / CROP_RATIO)
            steps = [transforms.Resize(shorter), transforms.CenterCrop((height, width))]
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
        if longer <= 4 * shorter:
            return image
        keep = 2 * shorter
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

    def source_box(self, size: tuple[int, int]) -> tuple[int, int, int, int]:
        """The region (left, top, right, bottom) of an image of ``size`` (width, height)
        that the model sees: all of it when stretching, the centre crop otherwise."""
        width, height = size
        if self.resize == "stretch":
            return (0, 0, width, height)
        crop_h, crop_w = self.input_size
        shorter = self.resize_to or round(min(crop_h, crop_w) / CROP_RATIO)
        scale = shorter / min(width, height)
        # torchvision: Resize keeps the aspect ratio (truncating), CenterCrop rounds offsets.
        resized_w, resized_h = (shorter, int(shorter * height / width)) if width <= height else (int(shorter * width / height), shorter)
        left = round((resized_w - crop_w) / 2) / scale
        top = round((resized_h - crop_h) / 2) / scale
        return (round(left), round(top), round(left + crop_w / scale), round(top + crop_h / scale))

    def describe(self) -> str:
        height, width = self.input_size
        if self.resize == "stretch":
            return f"resize to {height}x{width}"
        shorter = self.resize_to or round(min(height, width) / CROP_RATIO)
        return f"resize shorter side to {shorter}, centre-crop {height}x{width}"
