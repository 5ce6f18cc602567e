"""What `--regions xrai` costs beside the attribution, and against PAIR's saliency package.

    python bench/xrai.py                  # EfficientNet-Lite0's 224 x 224 input of the fixture photos
    python bench/xrai.py --repeats 5

For each photo: the model's input and a real IG (8 Gauss-Legendre points from the black
baseline; XRAI ranks whatever attribution it is given), then, timed, igd's segmentation
(igd.engine.xrai.segments), igd's ranking (rank_regions), and the package's GetMask with
that base attribution (its own segmentation and ranking), medians of ``--repeats``. The
maps are checked equal (they are, bit for bit; tests/test_xrai.py asserts it). Not a
test: no asserts on time.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from igd.engine.attribution import attribute
from igd.engine.xrai import rank_regions, segments
from igd.models import load_model

PHOTOS = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "images"


def timed(function, repeats: int) -> tuple[float, object]:
    times, value = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        value = function()
        times.append(time.perf_counter() - started)
    return statistics.median(times), value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    import saliency.core as saliency

    torch.set_num_threads(max(1, torch.get_num_threads()))
    model = load_model()
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads; "
          f"medians of {args.repeats}")
    print("| photo | regions | igd: segments | igd: ranking | igd: total | saliency package | package / igd | equal |")
    print("|---|---|---|---|---|---|---|---|")
    for photo in ("chelsea.png", "coffee.png"):
        with Image.open(PHOTOS / photo) as image:
            inputs = model.preprocessing(image.convert("RGB"))
        logits = model.module(inputs)
        ig = attribute(model.module, inputs, int(logits.argmax()), baselines=float(inputs.min()), n_steps=8)
        image_hwc = inputs[0].numpy().transpose(1, 2, 0)
        attribution = ig.integrated_grads[0].numpy()
        segmenting, masks = timed(lambda: segments(image_hwc), args.repeats)
        ranking, ours = timed(lambda: rank_regions(attribution.max(axis=0), masks), args.repeats)
        theirs_s, theirs = timed(lambda: saliency.XRAI().GetMask(image_hwc, None,
                                                                 base_attribution=attribution.transpose(1, 2, 0)),
                                 args.repeats)
        equal = np.array_equal(ours.map, np.asarray(theirs, dtype=np.float32))
        total = segmenting + ranking
        print(f"| {photo} | {len(masks)} | {segmenting:.2f} s | {ranking:.2f} s | {total:.2f} s | {theirs_s:.2f} s | "
              f"{theirs_s / total:.2f}x | {equal} |")


if __name__ == "__main__":
    main()
