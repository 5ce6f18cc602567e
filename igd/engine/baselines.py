"""Named IG baselines, and the paths of a request: baselines x samples, with noise.

``zero`` is zero in the model's *input* space (after normalisation): the predecessor's
``input * 0``. The others are made in *pixel* space and pushed through the model's own
normalisation, so "black" means a black image whatever the model's mean and std.

A request may ask for several paths per image (:func:`make_paths`): several baselines, and
``samples`` draws of each, where a draw is the noise of a ``uniform`` baseline, the sigma of
a ``blur`` baseline, and the SmoothGrad noise added to the image. Sample ``s`` draws from
seed ``seed + s`` alone, so one sample can be reproduced by itself. The curve between a
start and an end is the request's path (igd.engine.paths.make_curve); a path that makes its
own start (igd.request.OWN_STARTS) takes none of the baselines.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from PIL import Image
from torch import Tensor

from igd.models import Preprocessing
from igd.engine.paths import Curve, make_curve
from igd.request import BASELINES, OWN_STARTS, AttributeRequest

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


# Input noise draws from seed ^ this, so that it is not the uniform baseline's stream.
_NOISE_STREAM = 0x5EED_0F_5A3D


@dataclass(frozen=True)
class Paths:
    """The paths of one image: ``inputs`` (1, C, H, W) the image in input space; for each of
    P paths its end (the image, plus the sample's noise with SmoothGrad) and its start (the
    baseline), (P, C, H, W), and a name for people; and the curve between them."""

    inputs: Tensor
    ends: Tensor
    starts: Tensor
    names: tuple[str, ...]
    curve: Curve


def make_paths(image: Image.Image, preprocessing: Preprocessing, request: AttributeRequest) -> Paths:
    """The paths ``request`` asks for: for each baseline (in order), ``samples`` paths; on a
    path that makes its own start, ``samples`` paths from it."""
    pixels = preprocessing.to_pixels(image)
    inputs = preprocessing.normalize(pixels)
    curve = make_curve(request, pixels.shape)
    if request.path in OWN_STARTS:
        end = torch.cat([_noisy(inputs, pixels, preprocessing, request, s) for s in range(request.samples)])
        names = tuple(curve.label + _noise_name(request, s) for s in range(request.samples))
        return Paths(inputs, end, curve.start(end), names, curve)
    along = f"{curve.label} from " if curve.label else ""  # the straight line: the baseline's name alone
    ends, starts, names = [], [], []
    for name in request.baselines:
        for s in range(request.samples):
            sigma = request.blur_sigma
            if name == "blur" and request.samples > 1:
                drawn = torch.rand((), generator=torch.Generator().manual_seed(request.seed + s), dtype=torch.float64)
                sigma = float(1 - drawn) * 2 * (sigma if sigma is not None else default_blur_sigma(pixels))
            ends.append(_noisy(inputs, pixels, preprocessing, request, s))
            starts.append(make_baseline(name, pixels, preprocessing, blur_sigma=sigma, seed=request.seed + s))
            names.append(along + _baseline_name(name, request, s, sigma) + _noise_name(request, s))
    return Paths(inputs, torch.cat(ends), torch.cat(starts), tuple(names), curve)


def _noisy(inputs: Tensor, pixels: Tensor, preprocessing: Preprocessing, request: AttributeRequest,
           sample: int) -> Tensor:
    """The image of sample ``sample`` in input space: ``inputs`` (the image's ``pixels``
    normalised), with SmoothGrad noise if asked."""
    if request.noise == 0.0:
        return inputs
    generator = torch.Generator().manual_seed((request.seed + sample) ^ _NOISE_STREAM)
    noise = torch.randn(pixels.shape, generator=generator, dtype=pixels.dtype) * request.noise
    return preprocessing.normalize(pixels + noise.to(pixels.device))


def _baseline_name(name: str, request: AttributeRequest, sample: int, sigma: float | None) -> str:
    if name == "uniform":
        return f"uniform seed={request.seed + sample}"
    if name == "blur" and request.samples > 1:
        return f"blur sigma={sigma:.4g}"
    return name


def _noise_name(request: AttributeRequest, sample: int) -> str:
    return f" noise={request.noise:g} seed={request.seed + sample}" if request.noise else ""


def gaussian_blur(pixels: Tensor, sigma: float) -> Tensor:
    """Gaussian blur of (1, C, H, W) with standard deviation ``sigma`` pixels (reflect
    padding; the kernel spans 3 sigma each side, at most the image)."""
    if sigma < NEGLIGIBLE_SIGMA:
        return pixels.clone()
    largest = 2 * (min(pixels.shape[-2:]) // 2) - 1  # reflect padding needs kernel < 2 * side
    kernel = min(2 * math.ceil(3 * sigma) + 1, max(largest, 1))
    from torchvision.transforms import functional  # only for a blur: importing torchvision takes seconds

    return functional.gaussian_blur(pixels, [kernel, kernel], [sigma, sigma])
