"""A heatmap of |IG| over the image the user sent, as PNG bytes: one, or one per target side by side."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance
from torch import Tensor

from igd.models import Preprocessing

# An inferno-like ramp: dark purple for little attribution to pale yellow for the most.
_RAMP = np.array(
    [(0, 0, 4), (87, 16, 110), (188, 55, 84), (249, 142, 9), (252, 255, 164)], dtype=np.float64
)


def heatmap_png(integrated_grads: Tensor, image: Image.Image, preprocessing: Preprocessing) -> bytes:
    """Overlay the attribution magnitude of ``integrated_grads`` (1, C, H, W) or (C, H, W)
    on ``image`` (the decoded original), over the region the model saw. The PNG has the
    image's size; the image is dimmed so the overlay stands out."""
    return _png(_overlay(integrated_grads, image, preprocessing))


def heatmap_grid_png(panels: list[Tensor], image: Image.Image, preprocessing: Preprocessing,
                     labels: list[str] | None = None) -> bytes:
    """One heatmap per attribution of ``panels`` (each (C, H, W)), side by side, each
    captioned with its label; a single unlabelled panel is :func:`heatmap_png`'s image."""
    overlays = [_overlay(panel, image, preprocessing) for panel in panels]
    if len(overlays) == 1 and not labels:
        return _png(overlays[0])
    width, height = image.size
    grid = Image.new("RGB", (width * len(overlays), height))
    draw = ImageDraw.Draw(grid)
    for i, overlay in enumerate(overlays):
        grid.paste(overlay, (i * width, 0))
        if labels:
            draw.text((i * width + 4, 4), labels[i], fill=(255, 255, 255))
    return _png(grid)


def _overlay(integrated_grads: Tensor, image: Image.Image, preprocessing: Preprocessing) -> Image.Image:
    saliency = integrated_grads.detach().abs().sum(dim=-3).reshape(integrated_grads.shape[-2:]).float().cpu().numpy()
    scale = float(np.percentile(saliency, 99)) or float(saliency.max()) or 1.0
    level = np.clip(saliency / scale, 0.0, 1.0)
    positions = np.linspace(0.0, 1.0, len(_RAMP))
    rgb = np.stack([np.interp(level, positions, _RAMP[:, c]) for c in range(3)], axis=-1)
    alpha = np.sqrt(level) * 220
    overlay = Image.fromarray(np.dstack([rgb, alpha]).round().astype(np.uint8), "RGBA")

    left, top, right, bottom = preprocessing.source_box(image.size)
    overlay = overlay.resize((max(right - left, 1), max(bottom - top, 1)), Image.Resampling.BILINEAR)
    canvas = ImageEnhance.Brightness(image.convert("RGB")).enhance(0.6).convert("RGBA")
    canvas.alpha_composite(overlay, dest=(left, top))
    return canvas.convert("RGB")


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
