"""A heatmap of |IG| over the image the user sent, as PNG bytes: one, or one per target side by
side. Normalisation and colours are igd.rendering's (as `igctl show` draws them)."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance
from torch import Tensor

from igd.models import Preprocessing
from igd.rendering import DEFAULT_OUTLIER_PERC, colorize, normalize, png, side_by_side


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
    """igd.rendering's absolute-value heat map of IG, over the region of ``image`` the model
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
