"""Attribution maps in the styles captum's ``visualize_image_attr`` made familiar (igd.output.figure
draws them, and its own default, into the picture of a result).

Normalisation (as captum's): the attribution is summed over channels; ``sign`` keeps all
of it, its positive part, its negative part or its absolute value; the scale is the value
below which ``100 - outlier_perc`` % of the (absolute) attribution mass lies, summing the
sorted values (so the top ``outlier_perc`` % of the mass saturates), and the map is
divided by it and clipped to [-1, 1]. Colours: ``all`` runs red (negative) - white - green
(positive), ``positive`` white to green, ``negative`` white to red, ``absolute_value``
white to blue. Styles: ``heat_map`` (the colours alone), ``blended_heat_map`` (over the
image in grey), ``masked_image`` (the image times |map|), ``alpha_scaling`` (the image
with |map| as its opacity). numpy and Pillow only (igctl uses it without torch).
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from igd.output.styles import DEFAULT_OUTLIER_PERC, DEFAULT_SIGN, OVERLAY, REGIONS, SIGNS, STYLES

BLEND = 0.5  # the heat map's weight over the grey image
CAPTUM_STYLES = tuple(style for style in STYLES if style not in (OVERLAY, REGIONS))

_WHITE = np.array([1.0, 1.0, 1.0])
_ENDS = {"positive": np.array([0.0, 0.5, 0.0]), "negative": np.array([0.8, 0.0, 0.0]),
         "absolute_value": np.array([0.03, 0.19, 0.42])}


def normalize(attribution: np.ndarray, sign: str = DEFAULT_SIGN, outlier_perc: float = DEFAULT_OUTLIER_PERC) -> np.ndarray:
    """(H, W) in [-1, 1] from an attribution (C, H, W) (module docstring)."""
    if sign not in SIGNS:
        raise ValueError(f"sign must be one of {', '.join(SIGNS)}, got {sign!r}")
    if not 0 <= outlier_perc < 100:
        raise ValueError(f"outlier_perc must be in [0, 100), got {outlier_perc}")
    combined = np.asarray(attribution, dtype=np.float64).sum(axis=0)
    if sign == "positive":
        combined = np.where(combined > 0, combined, 0.0)
    elif sign == "negative":
        combined = np.where(combined < 0, combined, 0.0)
    elif sign == "absolute_value":
        combined = np.abs(combined)
    scale = mass_threshold(np.abs(combined), 100 - outlier_perc)
    if scale == 0.0:
        return np.zeros_like(combined)
    return np.clip(combined / scale, -1.0, 1.0)


def mass_threshold(values: np.ndarray, percent: float) -> float:
    """The smallest of ``values`` (>= 0) at which the running sum of the sorted values
    reaches ``percent`` % of their total."""
    ordered = np.sort(values.ravel())
    running = np.cumsum(ordered)
    if running.size == 0 or running[-1] == 0.0:
        return 0.0
    return float(ordered[np.searchsorted(running, running[-1] * percent / 100)])


def colorize(level: np.ndarray, sign: str = DEFAULT_SIGN) -> np.ndarray:
    """(H, W, 3) colours in [0, 1] of a normalised map (H, W) (module docstring)."""
    if sign == "all":
        positive = np.clip(level, 0, 1)[..., None]
        negative = np.clip(-level, 0, 1)[..., None]
        return _WHITE - positive * (_WHITE - _ENDS["positive"]) - negative * (_WHITE - _ENDS["negative"])
    amount = np.abs(level)[..., None]
    return _WHITE - amount * (_WHITE - _ENDS[sign])


def render(attribution: np.ndarray, image: np.ndarray | None = None, style: str = "blended_heat_map",
           sign: str = DEFAULT_SIGN, outlier_perc: float = DEFAULT_OUTLIER_PERC) -> Image.Image:
    """The picture of an attribution (C, H, W) over ``image`` (H, W, 3) in [0, 1] (needed
    by every style but ``heat_map``), in one of captum's styles."""
    if style not in CAPTUM_STYLES:
        raise ValueError(f"style must be one of {', '.join(CAPTUM_STYLES)}, got {style!r}")
    level = normalize(attribution, sign, outlier_perc)
    if style == "heat_map":
        return _image(colorize(level, sign))
    if image is None:
        raise ValueError(f"the {style} style draws over the image, which needs the input and its normalisation "
                         "(files from before igd recorded provenance lack it); use the heat_map style")
    image = np.clip(np.asarray(image, dtype=np.float64), 0, 1)
    if style == "blended_heat_map":
        grey = image.mean(axis=2, keepdims=True).repeat(3, axis=2)
        return _image((1 - BLEND) * grey + BLEND * colorize(level, sign))
    amount = np.abs(level)[..., None]
    if style == "masked_image":
        return _image(image * amount)
    return Image.fromarray(np.round(np.concatenate([image, amount], axis=2) * 255).astype(np.uint8), "RGBA")


def side_by_side(pictures: list[Image.Image]) -> Image.Image:
    """Pictures of one size next to each other (one per target)."""
    if len(pictures) == 1:
        return pictures[0]
    width, height = pictures[0].size
    sheet = Image.new(pictures[0].mode, (width * len(pictures), height))
    for i, picture in enumerate(pictures):
        sheet.paste(picture, (i * width, 0))
    return sheet


def png(picture: Image.Image) -> bytes:
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()


def _image(rgb: np.ndarray) -> Image.Image:
    return Image.fromarray(np.round(np.clip(rgb, 0, 1) * 255).astype(np.uint8), "RGB")
