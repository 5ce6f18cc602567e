"""XRAI (`--regions xrai`): igd's region ranking equals PAIR's saliency package (used only
here, as the reference) on the same image and base attribution, through the daemon and igctl
as well as in-process; the IG keys of the result keep their meaning."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from daemon import IGCTL, IGD, Igd
from reference import read_result
from igd.engine.xrai import rank_regions, segments, xrai

saliency = pytest.importorskip("saliency.core", reason="PAIR's saliency package is a test dependency")


def package_xrai(image: np.ndarray, attribution: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The package's map and ranks for ``image`` and ``attribution`` (both C x H x W), given
    as it takes them: H x W x C."""
    output = saliency.XRAI().GetMaskWithDetails(
        image.transpose(1, 2, 0), None, base_attribution=attribution.transpose(1, 2, 0),
        extra_parameters=saliency.XRAIParameters(return_xrai_segments=True))
    return output.attribution_mask, output.segments


@pytest.mark.parametrize("fixture", ["lanet-tiny", "bit-tiny"])
def test_the_fixtures_regions_equal_the_packages(fixtures: Path, fixture: str) -> None:
    """The original code's IG on chelsea (the fixtures), ranked by both."""
    reference = np.load(fixtures / f"{fixture}.reference.npz")
    image, attribution = reference["input"][0], reference["integrated_grads"][0]
    ours = xrai(image, attribution)
    theirs, ranks = package_xrai(image, attribution)
    assert ours.map.dtype == np.float32 and ours.map.shape == image.shape[1:]
    assert np.array_equal(ours.map, theirs.astype(np.float32)) and np.array_equal(ours.ranks, ranks)
    assert ours.ranks.min() == 1 and len(np.unique(ours.ranks)) > 3  # several regions, ranked


def test_a_ranking_of_overlapping_regions_by_hand() -> None:
    """On a 10 x 20 image: the densest region first, then the next by the density of what it
    adds; a region adding fewer than 50 new pixels is dropped; what no region took gets its
    own mean and the last rank."""
    attribution = np.ones((10, 20), dtype=np.float32)
    attribution[:, :5] = 2.0  # the left quarter: dense
    attribution[:, 19] = 0.5
    left = np.zeros((10, 20), dtype=bool)
    left[:, :5] = True
    middle = np.zeros((10, 20), dtype=bool)
    middle[:, 3:19] = True  # overlaps left; adds 10 x 14 pixels of density 1 once left is taken
    middle[9, 18] = False
    inside_left = np.zeros((10, 20), dtype=bool)
    inside_left[:5, :5] = True  # adds nothing once left is taken
    regions = rank_regions(attribution, [middle, inside_left, left])
    assert regions.map[0, 0] == 2.0 and regions.ranks[0, 0] == 1
    assert regions.map[0, 4] == 2.0 and regions.ranks[0, 4] == 1  # the overlap went to left, taken first
    assert regions.map[0, 10] == 1.0 and regions.ranks[0, 10] == 2
    untaken = np.float32((10 * 0.5 + 1.0) / 11)  # column 19 and the middle's missing corner
    assert regions.map[9, 18] == untaken and regions.map[0, 19] == untaken and regions.ranks[0, 19] == 3
    assert set(np.unique(regions.ranks)) == {1, 2, 3}


@pytest.mark.slow  # the full-size default model, two segmentations at 224 x 224
def test_the_default_models_regions_equal_the_packages() -> None:
    """EfficientNet-Lite0's 224 x 224 input: the package's full segmentation, a real IG."""
    from igd.engine.attribution import attribute
    from igd.models import load_model

    model = load_model()
    with Image.open(Path(__file__).parent / "fixtures" / "images" / "coffee.png") as photo:
        inputs = model.preprocessing(photo.convert("RGB"))
    ig = attribute(model.module, inputs, 967, n_steps=4).integrated_grads[0]
    image, attribution = inputs[0].numpy(), ig.numpy()
    masks = segments(image.transpose(1, 2, 0))
    assert len(masks) > 100  # six scales of a 224 x 224 photo
    ours = rank_regions(attribution.max(axis=0), masks)
    theirs, ranks = package_xrai(image, attribution)
    assert np.array_equal(ours.map, theirs.astype(np.float32)) and np.array_equal(ours.ranks, ranks)


def test_regions_through_the_daemon(lanet: Igd, fixtures: Path, workdir: Path) -> None:
    """`igctl attribute --regions xrai`: the result's xrai is the package's GetMask on the
    result's own input and xrai_attribution; IG from black and white, its keys as ever."""
    out = workdir / "regions.gzip"
    run = lanet.igctl("attribute", str(fixtures / "images" / "chelsea.png"), "-t", "cat", "-t", "dog", "--regions", "xrai",
                      "--steps", "8", "-o", str(out))
    assert run.returncode == 0, run.stderr.decode()
    result = read_result(out)
    assert result["path_names"] == ["black", "white"] and result["axes"] == ["target", "path"]
    assert result["xrai"].shape == (2, 32, 32) and result["xrai_segments"].shape == (2, 32, 32)
    assert result["xrai_attribution"].shape == (2, 3, 32, 32)
    torch.testing.assert_close(result["xrai_attribution"], result["integrated_grads"][:, 0], rtol=0, atol=0)
    image = result["input"][0].numpy()
    for t in range(2):
        theirs, ranks = package_xrai(image, result["xrai_attribution"][t].numpy())
        assert np.array_equal(result["xrai"][t].numpy(), theirs.astype(np.float32))
        assert np.array_equal(result["xrai_segments"][t].numpy(), ranks)
    one = lanet.igctl("attribute", str(fixtures / "images" / "chelsea.png"), "cat", "--regions", "xrai",
                      "--baseline", "zero", "--steps", "8", "-o", str(workdir / "one.gzip"))
    assert one.returncode == 0, one.stderr.decode()
    single = read_result(workdir / "one.gzip")  # one target, one path: the predecessor's layout
    assert single["xrai"].shape == (32, 32) and single["xrai_attribution"].shape == (3, 32, 32)
    assert single["integrated_grads"].shape == (1, 3, 32, 32)


def test_regions_are_refused_clearly_where_they_cannot_go(lanet: Igd, fixtures: Path) -> None:
    image = str(fixtures / "images" / "chelsea.png")
    unknown = subprocess.run([IGCTL, "--socket", str(lanet.socket), "attribute", image, "--regions", "grid"],
                             capture_output=True, text=True, timeout=60)
    assert unknown.returncode == 2 and "--regions must be one of xrai, got 'grid'" in unknown.stderr
    adaptive = lanet.igctl("attribute", image, "--regions", "xrai", "--tolerance", "0.05", "-o", "-")
    assert adaptive.returncode == 2
    assert b"--regions ranks IG from the black and white baselines" in adaptive.stderr
    listed = subprocess.run([IGD, "batch", "--help"], capture_output=True, text=True, timeout=60)
    assert "--regions [xrai]" in listed.stdout


def test_the_regions_picture(lanet: Igd, fixtures: Path, workdir: Path) -> None:
    """`igctl show --style regions`: the top 30 % of the area in the photo's colours, the rest
    grey; a result without regions is refused with the way to get them."""
    from igd.output.figure import CAPTION_HEIGHT, Look, figure, result_photo

    with_regions, without = workdir / "r.gzip", workdir / "plain.gzip"
    for out, extra in ((with_regions, ("--regions", "xrai")), (without, ())):
        run = lanet.igctl("attribute", str(fixtures / "images" / "coffee.png"), *extra, "--steps", "8", "-o", str(out))
        assert run.returncode == 0, run.stderr.decode()
    drawn = subprocess.run([IGCTL, "show", str(with_regions), "--heatmap", str(workdir / "r.png"), "--style",
                            "regions"], capture_output=True, text=True, timeout=60)
    assert drawn.returncode == 0, drawn.stderr
    result = read_result(with_regions)
    picture = np.asarray(Image.open(workdir / "r.png"))
    assert np.array_equal(picture, np.asarray(figure(result, Look(style="regions"))))
    centres = picture[CAPTION_HEIGHT + 7::14, 7::14].astype(int)  # each input pixel's middle
    ranking = result["xrai"][0].numpy()
    top, rest = ranking >= np.percentile(ranking, 90), ranking < np.percentile(ranking, 70)
    photo = np.round(result_photo(result) * 255)
    assert np.abs(centres[top] - photo[top]).mean() < 12  # the photo's own colours (bicubic-scaled)
    assert (centres[rest].max(axis=-1) - centres[rest].min(axis=-1)).max() <= 1  # grey
    refused = subprocess.run([IGCTL, "show", str(without), "--heatmap", str(workdir / "p.png"), "--style",
                              "regions"], capture_output=True, text=True, timeout=60)
    assert refused.returncode == 1 and "attribute with --regions xrai" in refused.stderr
