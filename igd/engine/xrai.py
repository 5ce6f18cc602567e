"""XRAI region attributions (Kapishnikov et al., ICCV 2019), exactly as PAIR's `saliency`
package computes them (saliency.core.xrai, its "full" algorithm, default parameters).

Regions: the image, rescaled to [-1, 1] by its own minimum and maximum and resized to
224 x 224 (bicubic, antialiased), is segmented by Felzenszwalb's graph method at six scales
(sigma 0.8, segments of at least 150 pixels); each segment, resized back (nearest) and
dilated by a disk of radius 5, is a candidate region, so the regions overlap. Ranking: the
attribution (C, H, W) is reduced to its largest channel per pixel; regions are taken
greedily, each time the one whose pixels not yet taken have the highest mean attribution
(its "gain"), skipping any that adds fewer than 50 new pixels, until none is left. The map
gives each pixel the gain of the region that took it (pixels no region took get their own
mean); the ranks number the taken parts by gain, 1 the highest.

Only the ranking is done differently: a region's gain is recomputed only when the region
just taken overlaps it (otherwise its new pixels, and so the same mean, are unchanged), so
the maps and ranks are the package's, bit for bit, in a fraction of its time. scikit-image
does the segmentation, as in the package. numpy only, on the CPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SCALES = (50, 100, 150, 250, 500, 1200)
SIGMA = 0.8
SEGMENTATION_SIZE = (224, 224)
MIN_SEGMENT_SIZE = 150
DILATION_RADIUS = 5
MIN_PIXEL_DIFF = 50  # a region adding fewer new pixels than this is dropped


def working_bytes(height: int, width: int, channels: int, targets: int) -> int:
    """The most memory XRAI of ``targets`` attributions of a C x H x W input holds: the
    candidate masks (at most as many as the six scales' segments of at least
    MIN_SEGMENT_SIZE pixels at SEGMENTATION_SIZE, one byte a pixel, with a working copy),
    the segmentation's float64 images, and per target its map, ranks and working arrays."""
    pixels = height * width
    masks = len(SCALES) * (SEGMENTATION_SIZE[0] * SEGMENTATION_SIZE[1] // MIN_SEGMENT_SIZE + 1)
    segmentation = 8 * SEGMENTATION_SIZE[0] * SEGMENTATION_SIZE[1] * max(channels, 1) * 4
    return 2 * masks * pixels + segmentation + 8 * pixels * max(channels, 1) + targets * 4 * 8 * pixels


@dataclass(frozen=True)
class Regions:
    """XRAI's answer for one attribution of an H x W image."""

    map: np.ndarray  # (H, W) float32: the gain of the region each pixel belongs to
    ranks: np.ndarray  # (H, W) int32: each pixel's region by rank, 1 the most important


def xrai(image: np.ndarray, attribution: np.ndarray) -> Regions:
    """XRAI of ``attribution`` (C, H, W) on ``image`` (C, H, W): the model's input, which the
    package's ``GetMask(x_value=image in H x W x C, ..., base_attribution=...)`` segments."""
    return rank_regions(attribution.max(axis=0), segments(image.transpose(1, 2, 0)))


def segments(image: np.ndarray) -> list[np.ndarray]:
    """The candidate regions of ``image`` (H, W, C): boolean masks (H, W), the six scales'
    segments in order, each dilated."""
    from skimage import segmentation, transform
    from skimage.morphology import dilation, disk

    low, high = np.min(image), np.max(image)
    scaled = (image - low) / (high - low) * 2.0 - 1.0  # to [-1, 1], in the package's order of operations
    scaled = transform.resize(scaled, SEGMENTATION_SIZE, order=3, mode="constant", preserve_range=True,
                              anti_aliasing=True)
    footprint = disk(DILATION_RADIUS)
    masks = []
    for scale in SCALES:
        labels = segmentation.felzenszwalb(scaled, scale=scale, sigma=SIGMA, min_size=MIN_SEGMENT_SIZE)
        labels = transform.resize(labels, image.shape[:2], order=0, preserve_range=True, mode="constant",
                                  anti_aliasing=False).astype(int)
        masks.extend(labels == label for label in range(labels.min(), labels.max() + 1))
    return [dilation(mask, footprint=footprint) for mask in masks]


def rank_regions(attribution: np.ndarray, masks: list[np.ndarray]) -> Regions:
    """The greedy ranking (module docstring) of ``masks`` by ``attribution`` (H, W)."""
    taken = np.zeros(attribution.shape, dtype=bool)
    gains = np.full(attribution.shape, -np.inf)
    trace: list[tuple[np.ndarray, float]] = []
    remaining = list(range(len(masks)))
    known: dict[int, float] = {}  # gains of regions whose new pixels did not change since computed
    while remaining:
        best, best_gain = None, -np.inf
        kept = []
        for index in remaining:
            if index not in known:
                added = masks[index] & ~taken
                if np.sum(added) < MIN_PIXEL_DIFF:
                    continue
                known[index] = attribution[added].mean()
            kept.append(index)
            if known[index] > best_gain:
                best, best_gain = index, known[index]
        remaining = kept
        if best is None:
            break
        added = masks[best] & ~taken
        trace.append((added, best_gain))
        taken |= masks[best]
        gains[added] = best_gain
        remaining.remove(best)
        for index in remaining:
            if index in known and np.any(masks[index] & added):
                del known[index]
    untaken = gains == -np.inf
    if np.any(untaken):
        gains[untaken] = attribution[untaken].mean()
    ordered = [mask for mask, _gain in sorted(trace, key=lambda step: -step[1])]
    if np.any(untaken):
        ordered.append(untaken)
    ranks = np.zeros(attribution.shape, dtype=np.int32)
    for rank, mask in enumerate(ordered, start=1):
        ranks[mask] = rank
    return Regions(gains.astype(np.float32), ranks)
