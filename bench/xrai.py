"""What `--regions xrai` costs beside the attribution, and against PAIR's saliency package.

    python bench/xrai.py                  # EfficientNet-Lite0's 224 x 224 input of the fixture photos
    python bench/xrai.py --repeats 5 --json docs/benchmarks/xrai.json

For each photo: the model's input and a real IG (8 Gauss-Legendre points from the black
baseline; XRAI ranks whatever attribution it is given), then, timed, igd's segmentation
(igd.engine.xrai.segments), igd's ranking (rank_regions), and the package's GetMask with
that base attribution (its own segmentation and ranking), medians of ``--repeats``. The
maps are checked equal (they are, bit for bit; tests/test_xrai.py asserts it). Not a
test: no asserts on time.
"""

from __future__ import annotations

import argparse
import json
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
    parser.add_argument("--json", type=Path, help="also write the rows here (bench/report.py renders them)")
    args = parser.parse_args()
    import saliency.core as saliency

    model = load_model()
    machine = (f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch "
               f"{torch.__version__}, medians of {args.repeats}")
    rows = []
    for photo in ("chelsea.png", "coffee.png"):
        with Image.open(PHOTOS / photo) as image:
            inputs = model.preprocessing(image.convert("RGB"))
        logits = model.module(inputs)
        ig = attribute(model.module, inputs, int(logits.argmax()), baselines=float(inputs.min()), n_steps=8)
        image_hwc = inputs[0].numpy().transpose(1, 2, 0)
        attribution = ig.integrated_grads[0].numpy()
        segmenting, masks = timed(lambda: segments(image_hwc), args.repeats)
        ranking, ours = timed(lambda: rank_regions(attribution.max(axis=0), masks), args.repeats)
        package, theirs = timed(lambda: saliency.XRAI().GetMask(image_hwc, None,
                                                                base_attribution=attribution.transpose(1, 2, 0)),
                                args.repeats)
        rows.append({"photo": photo, "regions": len(masks), "segments_s": segmenting, "ranking_s": ranking,
                     "package_s": package, "equal": bool(np.array_equal(ours.map, np.asarray(theirs, np.float32)))})
    print(f"machine: {machine}")
    print("\n".join(table({"rows": rows})))
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "rows": rows}, indent=1))


def table(data: dict) -> list[str]:
    """The rows as a Markdown table (bench/report.py uses it too)."""
    lines = ["| photo | regions | igd: segments | igd: ranking | igd: total | saliency package | package / igd | "
             "maps equal |", "|---|---|---|---|---|---|---|---|"]
    for r in data["rows"]:
        total = r["segments_s"] + r["ranking_s"]
        lines.append(f"| {r['photo']} | {r['regions']} | {r['segments_s']:.2f} s | {r['ranking_s']:.2f} s | "
                     f"{total:.2f} s | {r['package_s']:.2f} s | {r['package_s'] / total:.2f}x | {r['equal']} |")
    return lines


if __name__ == "__main__":
    main()
