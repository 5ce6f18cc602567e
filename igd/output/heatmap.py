"""A heatmap of |IG| over the image the user sent, as PNG bytes: one, or one per target side by
side. Normalisation and colours are igd.output.rendering's (as `igctl show` draws them).

The photo is drawn at most MAX_SIDE pixels on its longer side (a 49 Mpx photo would
otherwise take gigabytes per panel to draw; the attribution itself is a few hundred pixels)."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance
from torch import Tensor

from igd.models import Preprocessing
from igd.output.rendering import DEFAULT_OUTLIER_PERC, colorize, normalize, png, side_by_side


MAX_SIDE = 1024


def canvas(image: Image.Image) -> Image.Image:
    """The photo the heatmap is drawn on: ``image``, reduced to at most MAX_SIDE pixels
    on its longer side."""
    longer = max(image.size)
    if longer <= MAX_SIDE:
        return image
    scale = MAX_SIDE / longer
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.Resampling.BILINEAR, reducing_gap=2.0)


def drawing_bytes(width: int, height: int, panels: int) -> int:
    """The most memory drawing ``panels`` heatmaps on a photo of ``width`` x ``height``
    takes: the photo reduced by :func:`canvas`, the copies one panel's drawing makes
    (RGB, dimmed, RGBA, the overlay), each panel kept for the sheet, the sheet, and its PNG."""
    scale = min(1.0, MAX_SIDE / max(width, height, 1))
    pixels = (width * scale + 1) * (height * scale + 1)
    return int(pixels * 4 * (8 + 3 * panels))


def heatmap_png(integrated_grads: Tensor, image: Image.Image, preprocessing: Preprocessing) -> bytes:
    """Overlay the attribution magnitude of ``integrated_grads`` (1, C, H, W) or (C, H, W)
    on ``image`` (the decoded original), over the region the model saw. The PNG has the
    image's size; the image is dimmed so the overlay stands out."""
    return png(_overlay(integrated_grads, image, preprocessing))


def heatmap_grid_png(panels: list[Tensor], image: Image.Image, preprocessing: Preprocessing,
                     labels: list[str] | None = None) -> bytes:
    """One heatmap per attribution of ``panels`` (each (C, H, W)), side by side, each
    captioned with its label; a single unlabelled panel is :func:`heatmap_png`'s image."""
    sheet = side_by_side([_overlay(panel, image, preprocessing) for panel in panels])
    if labels:
        draw = ImageDraw.Draw(sheet)
        for i, label in enumerate(labels):
            draw.text((i * image.width + 4, 4), label, fill=(255, 255, 255))
    return png(sheet)


def _overlay(integrated_grads: Tensor, image: Image.Image, preprocessing: Preprocessing) -> Image.Image:
    """igd.output.rendering's absolute-value heat map of IG, over the region of ``image`` the model
    saw, opaque where the attribution is (the image dimmed, so the overlay stands out)."""
    attribution = integrated_grads.detach().float().cpu().numpy().reshape(-1, *integrated_grads.shape[-2:])
    level = normalize(attribution, "absolute_value", DEFAULT_OUTLIER_PERC)
    rgb = colorize(level, "absolute_value") * 255
    alpha = np.sqrt(level) * 220
    overlay = Image.fromarray(np.dstack([rgb, alpha]).round().astype(np.uint8), "RGBA")

    left, top, right, bottom = preprocessing.source_box(image.size)
    overlay = overlay.resize((max(right - left, 1), max(bottom - top, 1)), Image.Resampling.BILINEAR)
    canvas = ImageEnhance.Brightness(image.convert("RGB")).enhance(0.6).convert("RGBA")
    canvas.alpha_composite(overlay, dest=(left, top))
    return canvas.convert("RGB")
