"""Accuracy you can see and order: the error estimate of every result against the true
error (a fine reference integral computed independently here), and adaptive quadrature
to a tolerance; then the same through a real daemon, igctl and `igd batch`."""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import pytest
import torch

import nets
from daemon import IGD, Igd, short_tempdir
from reference import read_result
from igd.engine import accuracy
from igd.engine.adaptive import START_POINTS, attribute_adaptive
from igd.engine.attribution import attribute, quadrature
from wire import WireClient

REFERENCE_POINTS = 8192


def reference_ig(model: torch.nn.Module, x: torch.Tensor, target: int) -> torch.Tensor:
    """IG of one input (1, *F) from zero by the midpoint rule on REFERENCE_POINTS panels,
    written here from the definition (no igd code): the "true" integral of these tests."""
    total = torch.zeros_like(x[0], dtype=torch.float64)
    for start in range(0, REFERENCE_POINTS, 512):
        alphas = (torch.arange(start, start + 512, dtype=torch.float64) + 0.5) / REFERENCE_POINTS
        points = (alphas.view(-1, 1, 1, 1) * x).float().requires_grad_(True)
        model(points)[:, target].sum().backward()
        total += points.grad.double().sum(0)
    return (x[0].double() * total / REFERENCE_POINTS).float()


def relative_error(ig: torch.Tensor, reference: torch.Tensor) -> float:
    return float((ig.double() - reference.double()).norm() / reference.double().norm())


@pytest.fixture(scope="module")
def relu_net() -> tuple[torch.nn.Module, torch.Tensor, int]:
    """A piecewise-linear network (conv, BatchNorm, ReLU) and an input whose IG needs
    many points: the case the estimate is built for."""
    model = nets.batchnorm_cnn().eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    x = nets.images(1, seed=11) * 3
    return model, x, int(model(x).argmax())


@pytest.fixture(scope="module")
def reference(relu_net: tuple) -> torch.Tensor:
    return reference_ig(*relu_net)


@pytest.mark.parametrize("method", ["gausslegendre", "riemann_middle", "riemann_trapezoid", "riemann_left"])
@pytest.mark.parametrize("n_steps", [8, 32, 128])
def test_the_estimate_tracks_the_true_error(relu_net: tuple, reference: torch.Tensor, method: str,
                                            n_steps: int) -> None:
    model, x, target = relu_net
    result = attribute(model, x, target, n_steps=n_steps, rule=method)
    true = relative_error(result.integrated_grads[0], reference)
    estimate = float(result.error_estimate[0])
    assert true / 3 <= estimate <= 3 * true, (true, estimate)


def test_the_target_logit_along_the_path_is_the_models(relu_net: tuple) -> None:
    model, x, target = relu_net
    result = attribute(model, x, target, n_steps=10)
    expected = model(result.intermediates[0])[:, target]
    assert result.path_logits.shape == (1, 10)
    torch.testing.assert_close(result.path_logits[0], expected, rtol=1e-5, atol=1e-5)


def test_a_tolerance_is_met_with_the_true_error_near_it(relu_net: tuple, reference: torch.Tensor) -> None:
    model, x, target = relu_net
    for tolerance in (0.02, 0.005):
        (result,) = attribute_adaptive(lambda p, _i: model(p), x, target, tolerance=tolerance, max_steps=1024,
                                       max_batch=64, modules=[model])
        true = relative_error(result.integrated_grads[0], reference)
        assert result.tolerance_met and float(result.error_estimate[0]) <= tolerance
        assert true <= 1.5 * tolerance, (tolerance, true, result.n_steps)
        assert START_POINTS < result.n_steps < 1024 and result.rule == "adaptive"


def test_adaptive_answers_follow_the_documented_formula(relu_net: tuple) -> None:
    model, x, target = relu_net
    (result,) = attribute_adaptive(lambda p, _i: model(p), x, target, tolerance=0.03, max_steps=300, modules=[model])
    alphas, weights = result.alphas, result.step_sizes
    assert alphas[0] == 0 and alphas[-1] == 1 and bool((alphas[1:] > alphas[:-1]).all())
    assert math.isclose(float(weights.double().sum()), 1.0, rel_tol=1e-6)
    recomputed = x * (result.directional_grads[0] * weights.view(-1, 1, 1, 1)).sum(0)
    torch.testing.assert_close(result.integrated_grads[0], recomputed[0], rtol=1e-5, atol=1e-6)
    # the per-step gradients are the model's at the path points it reports
    points = result.intermediates[0][::7].requires_grad_(True)
    model(points)[:, target].sum().backward()
    torch.testing.assert_close(result.directional_grads[0][::7], points.grad, rtol=1e-4, atol=1e-6)
    expected_logits = model(result.intermediates[0])[:, target]
    torch.testing.assert_close(result.path_logits[0], expected_logits, rtol=1e-5, atol=1e-5)


def test_a_rise_at_tiny_alphas_is_found() -> None:
    """BiT's shape: a bias-free convolution into GroupNorm is scale-invariant along a
    zero-baseline path, so the target logit rises only where alpha * sigma is near
    sqrt(eps). With eps 1e-14 that is at alphas near 1e-7, below a 2^-20 grid; adaptive
    must put nodes there and get near the tolerance against a reference graded down to
    1e-12, where a fixed rule (first node at 5.7e-4) misses much of the rise."""
    torch.manual_seed(4)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, bias=False), torch.nn.GroupNorm(2, 8, eps=1e-14),
                                torch.nn.Flatten(), torch.nn.Linear(8 * 14 * 14, 16), torch.nn.ReLU(),
                                torch.nn.Linear(16, 5)).eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    x = nets.images(1, seed=2)
    target = int(model(x).argmax())
    nodes = torch.cat([torch.zeros(1, dtype=torch.float64), torch.logspace(-12, 0, 2400, dtype=torch.float64)])
    points = (nodes.view(-1, 1, 1, 1) * x.double()).float().requires_grad_(True)
    model(points)[:, target].sum().backward()
    widths = nodes[1:] - nodes[:-1]
    weights = torch.zeros_like(nodes)
    weights[:-1] += widths / 2
    weights[1:] += widths / 2
    reference = (x[0].double() * (points.grad.double() * weights.view(-1, 1, 1, 1)).sum(0)).float()
    (result,) = attribute_adaptive(lambda p, _i: model(p), x, target, tolerance=0.05, max_steps=1024,
                                   modules=[model])
    true = relative_error(result.integrated_grads[0], reference)
    assert result.tolerance_met and float(result.alphas[1]) < 2.0 ** -20
    assert true <= 3 * float(result.error_estimate[0]) and true <= 0.15, true
    gaussian = attribute(model, x, target, n_steps=50)
    assert relative_error(gaussian.integrated_grads[0], reference) > 0.3  # 44 %


@pytest.fixture(scope="module")
def smooth_net() -> tuple[torch.nn.Module, torch.Tensor, int]:
    """A smooth network (softplus, average pooling), as ViTs are along the path (GELU,
    softmax, LayerNorm): Gauss-Legendre converges spectrally there (a large input, so that
    8 points are off by more than float32's rounding)."""
    model = nets.smooth_cnn().eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    x = nets.images(1, seed=12) * 100
    return model, x, int(model(x).argmax())


def test_on_a_smooth_net_the_estimate_follows_gauss_legendre(smooth_net: tuple) -> None:
    """The jump model would call an 8-point answer tens of times worse than it is; the
    Legendre coefficients' decay says how far it is, within a factor of a few."""
    model, x, target = smooth_net
    truth = reference_ig(model, x, target)
    for n in (8, 10, 12):
        result = attribute(model, x, target, n_steps=n)
        true = relative_error(result.integrated_grads[0], truth)
        estimate = float(result.error_estimate[0])
        assert bool(result.smooth[0]) and true / 3 <= estimate <= 10 * true, (n, estimate, true)


def test_on_a_smooth_net_adaptive_steps_are_gauss_legendres(smooth_net: tuple) -> None:
    """Where its first look is smooth and good enough, an adaptive answer is that look:
    Gauss-Legendre on 16 points, as accurate as Gauss-Legendre gets at that cost."""
    model, x, target = smooth_net
    (adaptive,) = attribute_adaptive(lambda p, _i: model(p), x, target, tolerance=0.02, max_steps=256,
                                     modules=[model])
    fixed = attribute(model, x, target, n_steps=16)
    assert adaptive.n_steps == 16 and adaptive.tolerance_met and bool(adaptive.smooth[0])
    torch.testing.assert_close(adaptive.alphas, fixed.alphas)
    torch.testing.assert_close(adaptive.integrated_grads, fixed.integrated_grads, rtol=1e-5, atol=1e-7)
    assert relative_error(adaptive.integrated_grads[0], reference_ig(model, x, target)) < 1e-3


def test_the_bit_fixture_from_the_zero_baseline(fixtures: Path) -> None:
    """BiT's GroupNorm after bias-free standardised convolutions: from the zero baseline
    the action lies at alphas of 1e-6 to 1e-2, with many kinks. A tolerance of 2 % is met
    within 3 % of a reference dense in log alpha (trapezoid, 200 nodes a decade down to
    1e-12; 100 a decade agrees to 1e-2) with at most 512 points, and a 50-point
    Gauss-Legendre answer's estimate is not below a third of its true error (~30 %)."""
    from PIL import Image

    from igd.models import load_model

    loaded = load_model(bit_path=fixtures / "bit-tiny.pth")
    model = loaded.module
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    x = loaded.preprocess(Image.open(fixtures / "images" / "chelsea.png").convert("RGB"))
    target = 3
    nodes = torch.cat([torch.zeros(1, dtype=torch.float64), torch.logspace(-12, 0, 2401, dtype=torch.float64)])
    gradients = torch.cat([_gradients(model, x, target, nodes[start : start + 512])
                           for start in range(0, len(nodes), 512)])

    def trapezoid(index: torch.Tensor) -> torch.Tensor:
        widths = nodes[index][1:] - nodes[index][:-1]
        weights = torch.zeros(len(index), dtype=torch.float64)
        weights[:-1] += widths / 2
        weights[1:] += widths / 2
        return x[0].double() * (weights.view(-1, 1, 1, 1) * gradients[index]).sum(0)

    reference = trapezoid(torch.arange(len(nodes)))
    coarse = trapezoid(torch.cat([torch.arange(0, len(nodes) - 1, 2), torch.tensor([len(nodes) - 1])]))
    assert relative_error(coarse, reference) < 1e-2  # converged enough to judge 3 %
    (adaptive,) = attribute_adaptive(lambda p, _i: model(p), x, target, tolerance=0.02, max_steps=1024,
                                     max_batch=64, modules=[model])
    assert adaptive.tolerance_met and adaptive.n_steps <= 512 and not bool(adaptive.smooth[0])
    assert relative_error(adaptive.integrated_grads[0], reference) <= 0.03
    fixed = attribute(model, x, target, n_steps=50)
    true = relative_error(fixed.integrated_grads[0], reference)
    assert true > 0.2 and float(fixed.error_estimate[0]) >= true / 3


def _gradients(model: torch.nn.Module, x: torch.Tensor, target: int, alphas: torch.Tensor) -> torch.Tensor:
    """(n, *F) float64: the target logit's gradient at alpha * x for each alpha (n,)."""
    points = (alphas.view(-1, 1, 1, 1) * x.double()).float().requires_grad_(True)
    model(points)[:, target].sum().backward()
    return points.grad.double()


def test_the_cap_bounds_the_points_and_says_so(relu_net: tuple) -> None:
    model, x, target = relu_net
    (result,) = attribute_adaptive(lambda p, _i: model(p), x, target, tolerance=1e-4, max_steps=40, modules=[model])
    assert result.n_steps <= 40 and result.tolerance_met is False
    assert float(result.error_estimate[0]) > 1e-4


def test_images_of_one_pass_stop_at_their_own_points(relu_net: tuple) -> None:
    model, _, _ = relu_net
    inputs = nets.images(3, seed=5) * 3
    targets = [int(t) for t in model(inputs).argmax(1)]
    shared = attribute_adaptive(lambda p, _i: model(p), inputs, targets, tolerance=[0.1, 0.003, 0.01],
                                max_steps=[400, 400, 30], max_batch=16, modules=[model])
    for i, result in enumerate(shared):
        (alone,) = attribute_adaptive(lambda p, _i: model(p), inputs[i : i + 1], targets[i],
                                      tolerance=[0.1, 0.003, 0.01][i], max_steps=[400, 400, 30][i], max_batch=16,
                                      modules=[model])
        assert result.n_steps == alone.n_steps and torch.equal(result.alphas, alone.alphas)
        torch.testing.assert_close(result.integrated_grads, alone.integrated_grads, rtol=1e-5, atol=1e-7)
    assert shared[2].n_steps <= 30 and shared[0].n_steps < shared[1].n_steps


def test_panel_errors_and_trapezoid_weights_by_hand() -> None:
    alphas = torch.tensor([0.0, 0.25, 1.0])
    directional = torch.tensor([[0.0, 0.0], [3.0, 4.0], [3.0, 4.0]])
    errors = accuracy.panel_errors(alphas, directional, torch.ones(2))
    # panel 1: h 0.25, |J| 5 -> 0.25 / 2 * 5 / sqrt(3); panel 2: no jump
    assert torch.allclose(errors, torch.tensor([0.625 / math.sqrt(3), 0.0], dtype=torch.float64))
    assert accuracy.trapezoid_weights(alphas).tolist() == [0.125, 0.5, 0.375]
    nodes, _ = quadrature("riemann_middle", 4)
    assert accuracy.trapezoid_weights(torch.tensor(nodes)).tolist() == pytest.approx([0.25] * 4)
    assert accuracy.completeness_gap(-1.0, -4.0) == -0.25 and accuracy.completeness_gap(0.0, 0.0) == 0.0
    assert accuracy.completeness_gap(1.0, 0.0) == math.inf


def test_completeness_gap_of_a_rise_lost_in_rounding() -> None:
    """A model whose logit moves by one ulp along the path (tests/nets.py's slow model:
    F(x) = F(b) = 0.0105 to 1e-9) has sum(IG) = 0 exactly right, not a -100 % gap."""
    ulp = 2.0 ** -30  # of 0.0105 in float32
    assert accuracy.completeness_gap(-ulp, ulp, 0.0105) == 0.0
    resolution = accuracy.ROUNDING_ULPS * torch.finfo(torch.float32).eps * 0.0105
    assert accuracy.completeness_gap(-2 * resolution, ulp, 0.0105) == pytest.approx(-2.0)
    # logits of 10 moving by 4: the floor (8e-5) is far below, the gap is plain delta / rise
    assert accuracy.completeness_gap(-1.0, 4.0, 10.0) == -0.25
    assert accuracy.completeness_gap(1e-5, 4.0, 10.0) == 0.0


# --- through a real daemon ---------------------------------------------------------------


@pytest.fixture(scope="module")
def bit(fixtures: Path):
    with Igd("-bp", str(fixtures / "bit-tiny.pth"), "--max-batch", "16") as igd:
        yield igd


def test_tolerance_through_igctl(bit: Igd, fixtures: Path) -> None:
    work = short_tempdir()
    image = fixtures / "images" / "chelsea.png"
    run = bit.igctl("attribute", str(image), "cat", "--tolerance", "0.05", "-o", str(work / "cat.gzip"))
    assert run.returncode == 0, run.stderr
    line = run.stdout.decode()
    assert "estimated error" in line and "completeness gap" in line, line
    result = read_result(work / "cat.gzip")
    n = result["n_steps"]
    assert result["method"] == "adaptive" and result["tolerance"] == 0.05 and result["tolerance_met"] is True
    assert result["error_estimate"] <= 0.05 and START_POINTS <= n
    assert result["path_logits"].shape == (n,) and result["integrated_directional_grads"].shape[0] == n
    assert result["path_logits"][-1].item() == pytest.approx(result["output"][0, 3].item(), rel=1e-4, abs=1e-4)
    assert f"{n} steps" in line

    coarse = bit.igctl("attribute", str(image), "cat", "--steps", "2", "-o", str(work / "coarse.gzip"), "--json")
    record = json.loads(coarse.stdout)
    assert record["error_estimate"] > 0.05  # two points are far off
    assert "warning" in coarse.stderr.decode() and "--tolerance 0.025" in coarse.stderr.decode()

    capped = bit.igctl("attribute", str(image), "cat", "--tolerance", "0.0001", "--steps", "20",
                       "-o", str(work / "capped.gzip"), "--json")
    record = json.loads(capped.stdout)
    assert capped.returncode == 0 and record["tolerance_met"] is False and record["n_steps"] <= 20
    assert "the tolerance 0.0001 was not met within 20 points; it would take about" in capped.stderr.decode()


def test_tolerance_on_the_wire_and_fixed_rules_unchanged(bit: Igd, fixtures: Path) -> None:
    image = (fixtures / "images" / "chelsea.png").read_bytes()
    with WireClient(str(bit.socket)) as client:
        adaptive = client.call("attribute", {"image": image, "target": 3, "tolerance": 0.05,
                                             "format": "npz"})["result"]
        fixed = client.call("attribute", {"image": image, "target": 3, "n_steps": 50})["result"]
    assert adaptive["method"] == "adaptive" and adaptive["tolerance_met"] and adaptive["error_estimate"] <= 0.05
    assert fixed["method"] == "gausslegendre" and fixed["n_steps"] == 50 and "tolerance" not in fixed
    assert isinstance(fixed["error_estimate"], float) and isinstance(fixed["completeness_gap"], float)
    result = read_result(fixed["data"])
    assert result["error_estimate"] == fixed["error_estimate"] and result["path_logits"].shape == (50,)


@pytest.mark.slow  # an igd batch run
def test_tolerance_through_igd_batch(fixtures: Path) -> None:
    work = short_tempdir()
    (work / "in").mkdir()
    for name in ("chelsea.png", "coffee.png"):
        (work / "in" / name).write_bytes((fixtures / "images" / name).read_bytes())
    run = subprocess.run([IGD, "batch", str(work / "in"), str(work / "out"), "-bp", str(fixtures / "bit-tiny.pth"),
                          "--max-batch", "16", "-t", "cat", "--tolerance", "0.05"], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr
    rows = [json.loads(line) for line in (work / "out" / "status.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(row["tolerance_met"] and row["error_estimate"] <= 0.05 for row in rows)
    assert all(row["n_steps"] >= START_POINTS and "completeness_gap" in row for row in rows)


def test_igctls_warning_fires_on_the_estimate_and_names_a_fix_for_the_net() -> None:
    from igctl.records import accuracy_warning

    fixed = {"image": "cat.png", "n_steps": 8, "method": "gausslegendre", "error_estimate": 0.08,
             "completeness_gap": 0.3}
    assert "estimated error 8.0 % above 5 %" in accuracy_warning({**fixed, "integrand": "smooth"})
    assert "Gauss-Legendre converges fast: --steps 16" in accuracy_warning({**fixed, "integrand": "smooth"})
    assert "leave out --steps (adaptive steps to 0.05)" in accuracy_warning({**fixed, "integrand": "kinked"})
    # a completeness gap alone is no alarm: on ReLU nets it is often several times the true error
    assert accuracy_warning({**fixed, "error_estimate": 0.04}) is None
    capped = {**fixed, "method": "adaptive", "tolerance": 0.05, "tolerance_met": False, "n_steps": 256,
              "error_estimate": 0.07}
    assert "was not met within 256 points; about 368 would (--steps 368)" in accuracy_warning(capped)
    assert "beyond igd's default --max-steps" in accuracy_warning({**capped, "error_estimate": 0.5})
