"""Insertion and deletion curves: on a linear model, where the faithful attribution is
known, and through a real daemon."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from daemon import Igd
from reference import read_result
from igd.engine import faithfulness
from igd.engine.attribution import attribute


def linear_model() -> nn.Module:
    torch.manual_seed(11)
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 6 * 6, 4)).eval()


def plain_deletion(model: nn.Module, image: torch.Tensor, fill: torch.Tensor, scores: torch.Tensor, target: int,
                   steps: int) -> list[float]:
    """The deletion curve, pixel by pixel: rank positions by score (most positive first),
    replace the top count by the fill, take the target's softmax probability."""
    height, width = image.shape[-2:]
    ranked = sorted(range(height * width), key=lambda p: (-float(scores.flatten()[p]), p))
    values = []
    for step in range(steps + 1):
        count = round(step / steps * height * width)
        changed = image.clone()
        for position in ranked[:count]:
            y, x = divmod(position, width)
            changed[:, y, x] = fill[:, y, x]
        with torch.no_grad():
            values.append(float(torch.softmax(model(changed[None]).double(), dim=1)[0, target]))
    return values


def measured(model: nn.Module, image: torch.Tensor, fill: torch.Tensor, attribution: torch.Tensor,
             target: int) -> faithfulness.Curves:
    with torch.no_grad():
        logits = model(faithfulness.perturbed(image, fill, attribution))
    return faithfulness.curves(logits, target)


def test_curves_on_a_linear_model() -> None:
    """IG of a linear model is exactly w_t * (x - b): deleting by it must fall fastest and
    inserting by it rise fastest, against a random ranking and the reversed one."""
    model = linear_model()
    image, fill, target = torch.randn(3, 6, 6, generator=torch.Generator().manual_seed(2)), torch.zeros(3, 6, 6), 1
    ig = attribute(model, image[None], target, n_steps=4).integrated_grads[0]
    exact = model[1].weight[target].view(3, 6, 6) * image
    assert torch.allclose(ig, exact, atol=1e-5)
    ours = measured(model, image, fill, ig, target)
    expected = plain_deletion(model, image, fill, ig.sum(dim=0), target, faithfulness.STEPS)
    assert ours.deletion.tolist() == pytest.approx(expected, abs=1e-7)
    with torch.no_grad():
        at_image, at_fill = (float(torch.softmax(model(x[None]).double(), 1)[0, target]) for x in (image, fill))
    assert ours.deletion[0] == pytest.approx(at_image) and ours.deletion[-1] == pytest.approx(at_fill)
    assert ours.insertion[0] == pytest.approx(at_fill) and ours.insertion[-1] == pytest.approx(at_image)
    shuffled = measured(model, image, fill, torch.randn(3, 6, 6, generator=torch.Generator().manual_seed(5)), target)
    reversed_ = measured(model, image, fill, -ig, target)
    assert ours.deletion_area < shuffled.deletion_area < reversed_.deletion_area
    assert ours.insertion_area > shuffled.insertion_area > reversed_.insertion_area


def test_metrics_through_igctl(lanet: Igd, fixtures: Path, workdir: Path) -> None:
    run = lanet.igctl("attribute", str(fixtures / "images" / "chelsea.png"), "cat", "-o", str(workdir / "m.gzip"),
                      "--steps", "8", "--metrics", "insertion,deletion", "--json")
    assert run.returncode == 0, run.stderr.decode()
    record = json.loads(run.stdout)
    assert set(record["metrics"]) == {"insertion", "deletion"}
    result = read_result(workdir / "m.gzip")
    steps = faithfulness.STEPS + 1
    assert result["insertion_curve"].shape == (steps,) and result["metric_fractions"].shape == (steps,)
    assert result["deletion_area"] == pytest.approx(record["metrics"]["deletion"])
    at_image = float(torch.softmax(result["output"].double(), 1)[0, 3])
    at_baseline = float(torch.softmax(result["baseline_output"].double(), 1)[0, 3])
    assert float(result["deletion_curve"][0]) == pytest.approx(at_image, rel=1e-4)
    assert float(result["insertion_curve"][0]) == pytest.approx(at_baseline, rel=1e-4)
    assert float(result["insertion_curve"][-1]) == pytest.approx(at_image, rel=1e-4)
    refused = lanet.igctl("attribute", str(fixtures / "images" / "chelsea.png"), "--metrics", "pointing-game",
                          "-o", str(workdir / "x.gzip"))
    assert refused.returncode == 2 and "--metrics must be one of insertion, deletion" in refused.stderr.decode()
