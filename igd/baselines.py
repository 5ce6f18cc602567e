"""Named IG baselines.

``zero`` is zero in the model's *input* space (after normalisation): the predecessor's
``input * 0``. The others are made in *pixel* space and pushed through the model's own
normalisation, so "black" means a black image whatever the model's mean and std.
"""

from __future__ import annotations

import math

import torch
from PIL import Image
from torch import Tensor
from torchvision.transforms import functional as TF

from igd.models import Preprocessing
from igd.request import BASELINES

DEFAULT_BASELINE = BASELINES[0]  # zero


# Below this (in pixels) a Gaussian weighs the neighbours by less than exp(-5000): no blur.
# Tinier sigmas (1e-300) would even round to 0 in float32 and give NaN kernels.
NEGLIGIBLE_SIGMA = 0.01


def default_blur_sigma(pixels: Tensor) -> float:
    """A sixteenth of the shorter side: 14 px at 224x224, 2 px at 32x32."""
    return min(pixels.shape[-2:]) / 16


def make_baseline(
    name: str,
    pixels: Tensor,
    preprocessing: Preprocessing,
    *,
    blur_sigma: float | None = None,
    seed: int = 0,
) -> Tensor:
    """The baseline (1, C, H, W), in input space, for an image's ``pixels`` (1, C, H, W) in [0, 1]."""
    if name == "zero":
        return torch.zeros_like(pixels)
    if name == "black":
        return preprocessing.normalize(torch.zeros_like(pixels))
    if name == "white":
        return preprocessing.normalize(torch.ones_like(pixels))
    if name == "blur":
        sigma = blur_sigma if blur_sigma is not None else default_blur_sigma(pixels)
        return preprocessing.normalize(gaussian_blur(pixels, sigma))
    if name == "uniform":
        generator = torch.Generator().manual_seed(seed)
        noise = torch.rand(pixels.shape, generator=generator, dtype=pixels.dtype)
        return preprocessing.normalize(noise.to(pixels.device))
    raise ValueError(f"unknown baseline {name!r}; choose one of {', '.join(BASELINES)}")


def inputs_and_baseline(
    image: Image.Image,
    preprocessing: Preprocessing,
    baseline: str = DEFAULT_BASELINE,
    *,
    blur_sigma: float | None = None,
    seed: int = 0,
) -> tuple[Tensor, Tensor]:
    """The model input (1, C, H, W) of ``image`` and its baseline, as igd computes them
    for every request (the daemon and `igd batch` alike)."""
    pixels = preprocessing.to_pixels(image)
    return preprocessing.normalize(pixels), make_baseline(baseline, pixels, preprocessing, blur_sigma=blur_sigma, seed=seed)


def gaussian_blur(pixels: Tensor, sigma: float) -> Tensor:
    """Gaussian blur of (1, C, H, W) with standard deviation ``sigma`` pixels (reflect
    padding; the kernel spans 3 sigma each side, at most the image)."""
    if sigma < NEGLIGIBLE_SIGMA:
        return pixels.clone()
    largest = 2 * (min(pixels.shape[-2:]) // 2) - 1  # reflect padding needs kernel < 2 * side
    kernel = min(2 * math.ceil(3 * sigma) + 1, max(largest, 1))
    return TF.gaussian_blur(pixels, [kernel, kernel], [sigma, sigma])
