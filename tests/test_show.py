"""`igctl show` and the renderer: saved results summarised and drawn, without torch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from daemon import IGCTL, Igd
from igd.output.rendering import normalize, render
from igd.output.styles import SIGNS, STYLES


def plain_normalize(attribution: np.ndarray, sign: str, outlier_perc: float) -> np.ndarray:
    """The normalisation written out loop by loop: channels summed per pixel, the sign
    kept, the scale where the sorted magnitudes' running sum reaches 100 - outlier_perc
    percent of their total, then divided and clipped."""
    channels, height, width = attribution.shape
    combined = np.zeros((height, width))
    for y in range(height):
        for x in range(width):
            total = sum(float(attribution[c, y, x]) for c in range(channels))
            if sign == "positive":
                total = max(total, 0.0)
            elif sign == "negative":
                total = min(total, 0.0)
            elif sign == "absolute_value":
                total = abs(total)
            combined[y, x] = total
    magnitudes = sorted(abs(v) for v in combined.ravel())
    goal, running, scale = sum(magnitudes) * (100 - outlier_perc) / 100, 0.0, magnitudes[-1]
    for value in magnitudes:
        running += value
        if running >= goal:
            scale = value
            break
    out = np.zeros_like(combined)
    for y in range(height):
        for x in range(width):
            out[y, x] = min(1.0, max(-1.0, combined[y, x] / scale))
    return out


@pytest.mark.parametrize("sign", SIGNS)
@pytest.mark.parametrize("outlier_perc", [0.0, 2.0, 10.0])
def test_normalisation_matches_a_plain_implementation(sign: str, outlier_perc: float) -> None:
    attribution = np.random.default_rng(3).standard_normal((3, 9, 11)) ** 3  # heavy tails: outliers matter
    assert np.allclose(normalize(attribution, sign, outlier_perc), plain_normalize(attribution, sign, outlier_perc),
                       rtol=1e-12, atol=1e-12)


def test_colours_and_styles() -> None:
    attribution = np.zeros((3, 4, 4))
    attribution[:, 0, 0], attribution[:, 3, 3] = 1.0, -1.0  # one positive, one negative pixel
    image = np.full((4, 4, 3), 0.5)
    heat = np.asarray(render(attribution, None, "heat_map", "all", 0.0))
    assert tuple(heat[0, 0]) == (0, 128, 0) and tuple(heat[3, 3]) == (204, 0, 0) and tuple(heat[1, 1]) == (255,) * 3
    masked = np.asarray(render(attribution, image, "masked_image", "positive", 0.0))
    assert tuple(masked[0, 0]) == (128,) * 3 and tuple(masked[3, 3]) == (0, 0, 0)
    alpha = render(attribution, image, "alpha_scaling", "absolute_value", 0.0)
    assert alpha.mode == "RGBA" and np.asarray(alpha)[0, 0, 3] == 255 and np.asarray(alpha)[1, 1, 3] == 0


def test_show_summarises_and_renders_torch_and_npz_results(lanet: Igd, fixtures: Path, workdir: Path) -> None:
    image = fixtures / "images" / "chelsea.png"
    for name, extra in (("one.gzip", ()), ("one.npz", ("--format", "npz")), ("two.gzip", ("--top-k", "2"))):
        target = () if name.startswith("two") else ("cat",)
        run = lanet.igctl("attribute", str(image), *target, "-o", str(workdir / name), "--steps", "6", *extra)
        assert run.returncode == 0, run.stderr.decode()
    for name in ("one.gzip", "one.npz"):
        shown = subprocess.run([IGCTL, "show", str(workdir / name)], capture_output=True, text=True, timeout=60)
        assert shown.returncode == 0, shown.stderr
        assert f"{workdir / name}: 'cat' (3); prediction" in shown.stdout
        assert "weights sha256 " in shown.stdout and "6 gausslegendre steps from the zero baseline" in shown.stdout
        assert "in float32 (contiguous, eager), chunks of 10 (given)" in shown.stdout  # the lanet fixture's
        facts = json.loads(subprocess.run([IGCTL, "show", str(workdir / name), "--json"], capture_output=True,
                                          text=True, timeout=60).stdout)
        assert facts["targets"] == [{"index": 3, "name": "cat"}] and facts["provenance"]["model_family"] == "lanet"
        for style in STYLES:
            out = workdir / f"{name}.{style}.png"
            drawn = subprocess.run([IGCTL, "show", str(workdir / name), "--heatmap", str(out), "--style", style],
                                   capture_output=True, text=True, timeout=60)
            assert drawn.returncode == 0, drawn.stderr
            assert Image.open(out).size == (32, 32)
    two = subprocess.run([IGCTL, "show", str(workdir / "two.gzip"), "--heatmap", str(workdir / "two.png"), "--json"],
                         capture_output=True, text=True, timeout=60)
    assert len(json.loads(two.stdout)["targets"]) == 2 and Image.open(workdir / "two.png").size == (64, 32)
    broken = workdir / "broken.gzip"
    broken.write_bytes(b"\x1f\x8b not really")
    refused = subprocess.run([IGCTL, "show", str(broken)], capture_output=True, text=True, timeout=60)
    assert refused.returncode == 1 and "broken.gzip" in refused.stderr


def test_show_loads_no_torch(lanet: Igd, fixtures: Path, workdir: Path) -> None:
    run = lanet.igctl("attribute", str(fixtures / "images" / "chelsea.png"), "cat", "-o", str(workdir / "r.gzip"),
                      "--steps", "4")
    assert run.returncode == 0, run.stderr.decode()
    code = ("import sys; from igctl.cli import main\n"
            f"sys.argv = ['igctl', 'show', {str(workdir / 'r.gzip')!r}, '--heatmap', {str(workdir / 'r.png')!r}]\n"
            "try:\n    main()\nexcept SystemExit:\n    pass\n"
            "print('torch' in sys.modules)")
    shown = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0 and shown.stdout.strip().endswith("False"), shown.stderr
