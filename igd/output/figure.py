"""The picture of a result: each target's IG over the region the model saw, large enough to
read, with a caption per panel. The daemon's ``--heatmap``, `igctl show --heatmap`, the
Python client and `igctl show --html` all draw it from the result's own arrays, so the same
result gives the same picture (the same PNG bytes) wherever it is drawn.

The default look (style ``overlay``): the model's input with its normalisation undone, in
grey and dimmed, scaled up by a whole factor to at least MIN_SHORT_SIDE pixels on its
shorter side; over it |IG| (summed over channels, captum's outlier clipping: the top
``outlier_perc`` % of the attribution mass saturates) in a perceptual colour map whose
opacity grows with the attribution, so the photo shows where the model did not look.
``smooth`` (off by default) blurs the map with a Gaussian of that many input pixels first:
a lighter look for speckled ReLU attributions, never applied to the file's numbers.
captum's styles (igd.output.rendering) stay available through ``style`` and ``sign``.
numpy and Pillow only: igctl draws without torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from igd.output.rendering import normalize, png, render, side_by_side
from igd.output.styles import DEFAULT_OUTLIER_PERC, DEFAULT_SIGN, DEFAULT_STYLE, OVERLAY, REGION_AREAS, REGIONS

MIN_SHORT_SIDE = 448  # the picture's shorter side, at least (the input scaled by a whole factor)
MAX_LONG_SIDE = 4096  # ... unless that would make its longer side larger than this
CAPTION_HEIGHT = 26  # pixels above each panel
FONT_SIZE = 15
DIM = 0.55  # brightness of the grey photo under the colours
MAX_OPACITY = 0.9

# Matplotlib's "inferno" at eighths (perceptually uniform, dark to light; readable in grey
# too), interpolated linearly. The map starts at a fifth of it: faint attribution is purple,
# not the black of the photo's shadows.
_INFERNO = np.array([(0, 0, 4), (31, 12, 72), (85, 15, 109), (136, 34, 106), (186, 54, 85), (227, 89, 51),
                     (249, 140, 10), (249, 201, 50), (252, 255, 164)], dtype=np.float64) / 255
_COLOURS_FROM = 0.2
_EDGES = _INFERNO[[4, 6, 8]]  # the 30, 20 and 10 % edges: darker to lighter


@dataclass(frozen=True)
class Look:
    """How a result is drawn (module docstring): the daemon draws the default."""

    style: str = DEFAULT_STYLE
    sign: str = DEFAULT_SIGN
    outlier_perc: float = DEFAULT_OUTLIER_PERC
    smooth: float = 0.0  # Gaussian sigma in input pixels; 0: none


def figure_png(result: Mapping[str, Any], look: Look = Look()) -> bytes:
    """:func:`figure` as PNG bytes."""
    return png(figure(result, look))


def figure(result: Mapping[str, Any], look: Look = Look()) -> Image.Image:
    """The picture of ``result`` (a result file's dict: torch tensors or numpy arrays): one
    captioned panel per target, side by side."""
    photo = result_photo(result)
    attributions = np.asarray(result["integrated_grads"], dtype=np.float32)
    panels = attributions.reshape(-1, *attributions.shape[-3:])  # (T, C, H, W): from (1, ...) or (T, 1, ...)
    captions = captions_of(result, len(panels))
    factor = scale_factor(*panels.shape[-2:])
    if look.style == REGIONS:
        if "xrai" not in result:
            raise ValueError("the regions style draws XRAI's regions, which this result lacks "
                             "(attribute with --regions xrai)")
        maps = np.asarray(result["xrai"], dtype=np.float32).reshape(-1, *panels.shape[-2:])
        drawn = [_regions(xrai_map, photo, factor) for xrai_map in maps]
    else:
        drawn = [_panel(panel, photo, look, factor) for panel in panels]
    return side_by_side([_captioned(picture, caption) for picture, caption in zip(drawn, captions)])


def scale_factor(height: int, width: int) -> int:
    """The whole factor that brings the shorter side to at least MIN_SHORT_SIDE, as long as
    the longer one stays within MAX_LONG_SIDE (an input of odd proportions is drawn smaller)."""
    wanted = math.ceil(MIN_SHORT_SIDE / max(1, min(height, width)))
    return max(1, min(wanted, MAX_LONG_SIDE // max(1, height, width)))


def drawing_bytes(height: int, width: int, panels: int) -> int:
    """The most memory drawing ``panels`` panels of an input ``height`` x ``width`` takes:
    per panel the scaled photo, the map and its colours (float64 while computed, then 8-bit
    copies), the sheet and its PNG."""
    factor = scale_factor(height, width)
    pixels = (height * factor) * (width * factor + CAPTION_HEIGHT)
    return int(pixels * (8 * 6 + 4 * 4) + pixels * 4 * 2 * panels)


def result_photo(result: Mapping[str, Any]) -> np.ndarray | None:
    """The model's input as an image (H, W, 3) in [0, 1]: ``input`` with the preprocessing's
    normalisation (``mean``, ``std``) undone; None when the result lacks them (the
    predecessor's files)."""
    if "input" not in result or "mean" not in result or "std" not in result:
        return None
    inputs = np.asarray(result["input"], dtype=np.float64)[0]  # (C, H, W)
    mean = np.asarray(result["mean"], dtype=np.float64).reshape(-1, 1, 1)
    std = np.asarray(result["std"], dtype=np.float64).reshape(-1, 1, 1)
    pixels = np.clip(inputs * std + mean, 0, 1).transpose(1, 2, 0)
    return pixels.repeat(3, axis=2) if pixels.shape[2] == 1 else pixels[..., :3]


def captions_of(result: Mapping[str, Any], count: int) -> list[str]:
    """Per target: its name (or index), its probability and the estimated error, e.g.
    "tiger cat   p 0.62   error 4.4 %"; what the result lacks is left out."""
    names, indices = _listed(result.get("target_name"), count), _listed(result.get("target_class"), count)
    errors = _listed(result.get("error_estimate"), count)
    probabilities: list[Any] = [None] * count
    if "output" in result:
        logits = np.asarray(result["output"], dtype=np.float64).reshape(-1)
        odds = np.exp(logits - logits.max())
        probabilities = [float(odds[int(i)] / odds.sum()) if i is not None and 0 <= int(i) < len(odds) else None
                         for i in indices]
    captions = []
    for name, index, probability, error in zip(names, indices, probabilities, errors):
        parts = [str(name) if name is not None else f"class {index}" if index is not None else "IG"]
        if probability is not None:
            parts.append(f"p {probability:.2f}")
        if error is not None:
            parts.append(f"error {float(error) * 100:.1f} %" if math.isfinite(float(error)) else "error unbounded")
        captions.append("   ".join(parts))
    return captions


def colours(level: np.ndarray) -> np.ndarray:
    """(H, W, 3) in [0, 1]: the colour map at each level (H, W) in [0, 1]."""
    position = (_COLOURS_FROM + (1 - _COLOURS_FROM) * np.clip(level, 0, 1)) * (len(_INFERNO) - 1)
    below = np.minimum(position.astype(int), len(_INFERNO) - 2)
    fraction = (position - below)[..., None]
    return _INFERNO[below] * (1 - fraction) + _INFERNO[below + 1] * fraction


def _panel(attribution: np.ndarray, photo: np.ndarray | None, look: Look, factor: int) -> Image.Image:
    """One target's picture (C, H, W) -> (H f, W f) RGB."""
    height, width = attribution.shape[-2:]
    size = (width * factor, height * factor)
    if look.style != OVERLAY:
        drawn = render(attribution, photo, look.style, look.sign, look.outlier_perc)
        if drawn.mode == "RGBA":  # alpha_scaling: over white, as captum's figure shows it
            drawn = Image.alpha_composite(Image.new("RGBA", drawn.size, (255, 255, 255, 255)), drawn)
        return drawn.convert("RGB").resize(size, Image.Resampling.NEAREST)
    level = np.abs(normalize(attribution, look.sign, look.outlier_perc))
    if look.smooth > 0:
        level = _smoothed(level, look.smooth)
    level = np.asarray(Image.fromarray(level.astype(np.float32), "F").resize(size, Image.Resampling.BILINEAR),
                       dtype=np.float64).clip(0, 1)
    if photo is None:
        grey = np.zeros((size[1], size[0], 1))
    else:
        scaled = Image.fromarray(np.round(photo * 255).astype(np.uint8), "RGB").resize(size, Image.Resampling.BICUBIC)
        grey = np.asarray(scaled.convert("L"), dtype=np.float64)[..., None] / 255 * DIM
    opacity = (MAX_OPACITY * np.sqrt(level))[..., None]
    drawn = grey * (1 - opacity) + colours(level) * opacity
    return Image.fromarray(np.round(np.clip(drawn, 0, 1) * 255).astype(np.uint8), "RGB")


def _regions(xrai_map: np.ndarray, photo: np.ndarray | None, factor: int) -> Image.Image:
    """XRAI's regions (H, W) over the photo: the top REGION_AREAS[-1] % of the area in the
    photo's own colours, the rest dimmed grey, the edges of the top 10, 20 and 30 % drawn
    light to dark."""
    height, width = xrai_map.shape
    size = (width * factor, height * factor)
    if photo is None:
        photo = np.full((height, width, 3), 0.5)
    scaled = Image.fromarray(np.round(photo * 255).astype(np.uint8), "RGB").resize(size, Image.Resampling.BICUBIC)
    colour = np.asarray(scaled, dtype=np.float64) / 255
    grey = np.asarray(scaled.convert("L"), dtype=np.float64)[..., None].repeat(3, axis=2) / 255 * DIM
    large = np.kron(xrai_map, np.ones((factor, factor)))  # each input pixel a factor x factor block
    drawn = grey.copy()
    for area, edge in zip(reversed(REGION_AREAS), _EDGES):
        inside = large >= np.percentile(xrai_map, 100 - area)
        drawn[inside] = colour[inside]
        drawn[_edge(inside)] = edge
    return Image.fromarray(np.round(np.clip(drawn, 0, 1) * 255).astype(np.uint8), "RGB")


def _edge(inside: np.ndarray) -> np.ndarray:
    """The pixels of ``inside`` (H, W) next to a pixel outside it, two pixels thick."""
    edge = np.zeros_like(inside)
    for shift in (1, 2):
        for axis in (0, 1):
            for direction in (shift, -shift):
                edge |= inside & ~np.roll(inside, direction, axis=axis)
    return edge


def _smoothed(level: np.ndarray, sigma: float) -> np.ndarray:
    """``level`` (H, W) blurred by a Gaussian of ``sigma`` pixels (edges repeated outward)."""
    radius = max(1, round(3 * sigma))
    offsets = np.arange(-radius, radius + 1)
    kernel = np.exp(-offsets ** 2 / (2 * sigma ** 2))
    kernel /= kernel.sum()
    padded = np.pad(level, radius, mode="edge")
    rows = np.apply_along_axis(np.convolve, 1, padded, kernel, mode="valid")
    return np.apply_along_axis(np.convolve, 0, rows, kernel, mode="valid")


def _captioned(picture: Image.Image, caption: str) -> Image.Image:
    """``picture`` under a dark band that reads ``caption``."""
    framed = Image.new("RGB", (picture.width, picture.height + CAPTION_HEIGHT), (24, 24, 24))
    framed.paste(picture, (0, CAPTION_HEIGHT))
    draw = ImageDraw.Draw(framed)
    draw.text((8, (CAPTION_HEIGHT - FONT_SIZE) // 2), caption, fill=(240, 240, 240), font=_font())
    return framed


def _font() -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """Pillow's built-in font (no font files needed) at FONT_SIZE."""
    return ImageFont.load_default(size=FONT_SIZE)


def _listed(value: Any, count: int) -> list[Any]:
    """A per-target value of the result (one value, a list, a tensor or array of T) as a
    list of ``count`` plain values (None where absent)."""
    if value is None:
        return [None] * count
    if isinstance(value, (list, tuple)):
        items = list(value)
    elif isinstance(value, str):
        items = [value]
    else:
        items = list(np.asarray(value).reshape(-1))
    plain = [item.item() if isinstance(item, np.generic) else item for item in items]
    return (plain + [None] * count)[:count]
