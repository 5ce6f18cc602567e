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
from igd.output.figure import CAPTION_HEIGHT, MAX_LONG_SIDE, Look, captions_of, figure, result_photo, scale_factor
from igd.output.rendering import CAPTUM_STYLES, mass_threshold, normalize, render
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
        for style in (style for style in STYLES if style != "regions"):  # regions: tests/test_xrai.py
            out = workdir / f"{name}.{style}.png"
            drawn = subprocess.run([IGCTL, "show", str(workdir / name), "--heatmap", str(out), "--style", style],
                                   capture_output=True, text=True, timeout=60)
            assert drawn.returncode == 0, drawn.stderr
            assert f"heatmap written to {out}" in drawn.stdout
            assert Image.open(out).size == (448, 448 + CAPTION_HEIGHT)  # 32 x 32 scaled by 14, and its caption
    two = subprocess.run([IGCTL, "show", str(workdir / "two.gzip"), "--heatmap", str(workdir / "two.png"), "--json"],
                         capture_output=True, text=True, timeout=60)
    assert len(json.loads(two.stdout)["targets"]) == 2 and json.loads(two.stdout)["heatmap"] == str(workdir / "two.png")
    assert Image.open(workdir / "two.png").size == (2 * 448, 448 + CAPTION_HEIGHT)
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


# --- The default picture ------------------------------------------------------------------------

LANET_MEAN, LANET_STD = [0.49139968, 0.48215827, 0.44653124], [0.24703233, 0.24348505, 0.26158768]


def lanet_result(fixtures: Path) -> dict:
    """The LaNet fixture's reference IG on chelsea as a result dict (from the original code)."""
    reference = np.load(fixtures / "lanet-tiny.reference.npz")
    return {"integrated_grads": reference["integrated_grads"], "input": reference["input"], "mean": LANET_MEAN,
            "std": LANET_STD, "output": reference["logits"].reshape(1, -1), "target_class": 3, "target_name": "cat",
            "error_estimate": 0.0412}


def chroma(pixels: np.ndarray) -> np.ndarray:
    """How far from grey each RGB pixel (..., 3) is: its largest channel minus its smallest."""
    return pixels.max(axis=-1).astype(int) - pixels.min(axis=-1).astype(int)


def test_the_default_picture_shows_where_the_attribution_is(fixtures: Path) -> None:
    """Where the top 2 % of the attribution mass lies the picture is strongly coloured; where
    there is (almost) none it is the grey photo; the model's 32 x 32 input is drawn 448 px
    wide, under a caption that names the target, its probability and the estimated error."""
    result = lanet_result(fixtures)
    picture = np.asarray(figure(result))
    assert picture.shape == (448 + CAPTION_HEIGHT, 448, 3)
    drawn = picture[CAPTION_HEIGHT:]
    magnitude = np.abs(np.asarray(result["integrated_grads"][0]).sum(axis=0))  # (32, 32)
    top = magnitude >= mass_threshold(magnitude, 98)  # the saturated 2 % of the mass
    faint = magnitude <= 0.01 * magnitude.max()
    assert top.sum() >= 3 and faint.sum() >= 30
    centres = drawn[7::14, 7::14]  # the middle of each input pixel's 14 x 14 block
    assert chroma(centres[top]).min() >= 60, chroma(centres[top])
    assert np.median(chroma(centres[faint])) <= 12
    grey = np.asarray(Image.fromarray(np.round(result_photo(result) * 255).astype(np.uint8)).convert("L"))
    brightness = centres[faint].mean(axis=-1)
    assert np.corrcoef(brightness, grey[faint])[0, 1] > 0.8  # the photo shows through where nothing is
    band = picture[:CAPTION_HEIGHT]
    assert (band.mean(axis=-1) > 150).sum() > 100  # text drawn in the caption band
    probability = float(np.exp(result["output"][0, 3]) / np.exp(result["output"][0]).sum())
    assert captions_of(result, 1) == [f"cat   p {probability:.2f}   error 4.1 %"]


def test_pictures_are_large_enough_to_read_and_never_huge() -> None:
    assert [scale_factor(32, 32), scale_factor(224, 224), scale_factor(300, 451), scale_factor(5000, 5000)] == [14, 2, 2, 1]
    assert scale_factor(1, 1000) * 1000 <= MAX_LONG_SIDE  # odd proportions: the longer side bounds it


def test_pictures_of_several_targets_have_a_caption_each(fixtures: Path) -> None:
    one = lanet_result(fixtures)
    two = {**one, "integrated_grads": np.stack([one["integrated_grads"], -one["integrated_grads"]]),
           "target_class": [3, 5], "target_name": ["cat", "dog"], "error_estimate": np.array([0.02, np.inf])}
    captions = captions_of(two, 2)
    assert captions[0].startswith("cat   p ") and captions[1].startswith("dog   p ")
    assert captions[1].endswith("error unbounded")
    picture = np.asarray(figure(two))
    assert picture.shape == (448 + CAPTION_HEIGHT, 896, 3)
    assert np.array_equal(picture[:, :448], np.asarray(figure({**one, "error_estimate": 0.02})))
    for left in (0, 448):
        assert (picture[:CAPTION_HEIGHT, left:left + 448].mean(axis=-1) > 150).sum() > 100


def test_smoothing_and_captums_styles_stay_available(fixtures: Path) -> None:
    result = lanet_result(fixtures)
    plain, smooth = np.asarray(figure(result)), np.asarray(figure(result, Look(smooth=1.5)))
    assert plain.shape == smooth.shape and not np.array_equal(plain, smooth)
    # smoothing spreads the map: fewer pixels saturate at the top of the colour map
    assert (chroma(smooth[CAPTION_HEIGHT:]) > 60).sum() != (chroma(plain[CAPTION_HEIGHT:]) > 60).sum()
    for style in CAPTUM_STYLES:
        captum = np.asarray(figure(result, Look(style=style, sign="all")))
        assert captum.shape == plain.shape
        drawn = captum[CAPTION_HEIGHT:]
        expected = np.asarray(render(result["integrated_grads"][0], result_photo(result), style, "all").convert("RGB"))
        if style != "alpha_scaling":  # drawn over white
            assert np.array_equal(drawn[7::14, 7::14], expected)


@pytest.mark.parametrize("targets", [("cat",), ("--top-k", "2")], ids=["one target", "two targets"])
def test_the_daemon_and_show_draw_the_same_picture(lanet: Igd, fixtures: Path, workdir: Path,
                                                   targets: tuple[str, ...]) -> None:
    name = "-".join(targets).strip("-")
    result, sent, redrawn = workdir / f"{name}.gzip", workdir / f"{name}.daemon.png", workdir / f"{name}.show.png"
    run = lanet.igctl("attribute", str(fixtures / "images" / "chelsea.png"), *targets, "--steps", "6", "-o",
                      str(result), "--heatmap", str(sent))
    assert run.returncode == 0, run.stderr.decode()
    assert f"heatmap {sent}" in run.stdout.decode()  # igctl says where it wrote it
    shown = subprocess.run([IGCTL, "show", str(result), "--heatmap", str(redrawn)], capture_output=True, text=True,
                           timeout=60)
    assert shown.returncode == 0, shown.stderr
    assert sent.read_bytes() == redrawn.read_bytes()
    assert Image.open(sent).width == 448 * (2 if "--top-k" in targets else 1)
