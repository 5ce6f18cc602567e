"""Several answers from one pass, in the engine: targets, Blur IG's path, IDGI.

Each is checked against an independent plain implementation written here: a loop over
blur levels with torchvision's blur and finite differences, the IDGI paper's formula,
and single-target runs of the engine.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import functional as TF

import nets
from daemon import IGD, Igd
from reference import assert_same_result, read_result
from wire import WireClient
from igd.engine.adaptive import attribute_adaptive
from igd.engine.attribution import attribute, quadrature
from igd.engine.idgi import idgi
from igd.engine.paths import BlurPath, blur_kernel_size
from igd.output.figure import CAPTION_HEIGHT


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("k", [1, 3, 5])
def test_each_target_of_a_multi_target_pass_is_its_single_target_answer(k: int) -> None:
    net = nets.batchnorm_cnn()
    x = nets.images(2)
    targets = [[4, 0, 2, 1, 3][:k], [1, 3, 0, 4, 2][:k]]
    multi = attribute(net, x, targets, n_steps=12, max_batch=7)
    assert multi.directional_grads.shape == (2 * k, 12, 3, 16, 16)
    for i in range(2):
        for t, target in enumerate(targets[i]):
            alone = attribute(net, x[i : i + 1], target, n_steps=12, max_batch=7)
            row = i * k + t
            assert int(multi.targets[row]) == target
            assert relative(multi.integrated_grads[row], alone.integrated_grads[0]) <= 1e-6
            assert relative(multi.directional_grads[row], alone.directional_grads[0]) <= 1e-6
            assert torch.allclose(multi.path_logits[row], alone.path_logits[0])
            assert float(multi.convergence_delta[row]) == pytest.approx(float(alone.convergence_delta[0]), abs=1e-6)


def test_targets_out_of_range_are_refused() -> None:
    with pytest.raises(ValueError, match="target 7 is out of range"):
        attribute(nets.batchnorm_cnn(), nets.images(1), [[1, 7]], n_steps=4)


def test_adaptive_steps_serve_several_targets_from_one_set_of_nodes() -> None:
    """One set of nodes for both targets, refined until both meet the tolerance; each
    target's IG is the trapezoid rule through those nodes on its own gradients."""
    net = nets.batchnorm_cnn().eval()
    x = nets.images(1, seed=6)
    (answer,) = attribute_adaptive(lambda points, _index: net(points), x, [[1, 4]], tolerance=0.05, max_steps=400,
                                   modules=[net])
    assert answer.tolerance_met and answer.targets.tolist() == [1, 4]
    assert all(float(e) <= 0.05 for e in answer.error_estimate)
    points = (answer.alphas.view(-1, 1, 1, 1) * x).detach().requires_grad_(True)
    for row, target in enumerate([1, 4]):
        (gradients,) = torch.autograd.grad(net(points)[:, target].sum(), points)
        assert relative(answer.directional_grads[row], gradients) <= 1e-6
        integrated = x[0] * (answer.step_sizes.view(-1, 1, 1, 1) * gradients).sum(0)
        assert relative(answer.integrated_grads[row], integrated) <= 1e-6


def test_adaptive_refines_past_a_target_whose_attribution_is_zero() -> None:
    """A logit that does not depend on the input has IG zero with nothing to integrate; the
    other target still gets all the points it needs."""

    class Extra(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = nets.batchnorm_cnn().eval()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.cat([self.net(x), torch.ones(len(x), 1)], dim=1)  # logit 5: constant

    model = Extra().eval()
    x = nets.images(1, seed=6)
    (both,) = attribute_adaptive(lambda p, _i: model(p), x, [[0, 5]], tolerance=1e-3, max_steps=1024, modules=[model])
    (alone,) = attribute_adaptive(lambda p, _i: model(p), x, [[0]], tolerance=1e-3, max_steps=1024, modules=[model])
    assert both.tolerance_met and both.n_steps >= alone.n_steps
    assert float(both.error_estimate[0]) <= 1e-3 and float(both.error_estimate[1]) == 0.0


def plain_blur_ig(net: torch.nn.Module, image: torch.Tensor, target: int, sigma_max: float,
                  n_steps: int) -> torch.Tensor:
    """Blur IG as a plain loop over blur levels: torchvision's Gaussian blur for the
    points, a central finite difference in float64 for d blur / d sigma."""
    nodes, weights = quadrature("gausslegendre", n_steps)
    size = blur_kernel_size(sigma_max, image.shape[-2:])
    total = torch.zeros_like(image, dtype=torch.float64)
    for a, w in zip(nodes, weights):
        sigma = sigma_max * (1 - a)
        point = TF.gaussian_blur(image, [size, size], [sigma, sigma]).detach().requires_grad_(True)
        (gradient,) = torch.autograd.grad(net(point)[0, target], point)
        h = min(1e-4, sigma / 2)
        up = TF.gaussian_blur(image.double(), [size, size], [sigma + h, sigma + h])
        down = TF.gaussian_blur(image.double(), [size, size], [sigma - h, sigma - h])
        velocity = -sigma_max * (up - down) / (2 * h)
        total += w * gradient.double() * velocity
    return total


def test_blur_ig_matches_a_plain_loop_over_blur_levels() -> None:
    net = nets.smooth_cnn().eval()
    image = nets.images(1, seed=8)
    curve = BlurPath(3.0)
    ours = attribute(net, image, 2, baselines=curve.start(image), n_steps=16, curve=curve)
    reference = plain_blur_ig(net, image, 2, 3.0, 16)
    assert relative(ours.integrated_grads, reference) <= 1e-5
    # The path points are the blurred images, and the result says so.
    points = ours.intermediates_of(0)
    size = blur_kernel_size(3.0, image.shape[-2:])
    sigma = 3.0 * (1 - float(ours.alphas[3]))
    assert relative(points[3], TF.gaussian_blur(image, [size, size], [sigma, sigma])[0]) <= 1e-6


def test_blur_ig_becomes_complete_as_steps_grow() -> None:
    """sum(Blur IG) -> F(x) - F(blur(x, sigma_max)): the gap shrinks towards 0."""
    net = nets.smooth_cnn().eval()
    image = nets.images(1, seed=9)
    curve = BlurPath(4.0)
    gaps = []
    for n in (8, 32, 128):
        result = attribute(net, image, 1, baselines=curve.start(image), n_steps=n, curve=curve)
        rise = float(result.logits[0, 1] - result.baseline_logits[0, 1])
        gaps.append(abs(float(result.convergence_delta[0]) / rise))
    assert gaps[0] > gaps[1] > gaps[2], gaps
    assert gaps[2] < 1e-4, gaps  # measured: 69 %, 0.02 %, 0.0003 % (float32's floor)


def plain_idgi(net: torch.nn.Module, image: torch.Tensor, baseline: torch.Tensor, target: int, n: int) -> torch.Tensor:
    """The IDGI paper's Algorithm 1 on the Riemann path x_i = b + i/n (x - b), i = 0..n:
    sum over i < n of g_i^2 / sum(g_i^2) * (f(x_{i+1}) - f(x_i))."""
    values, gradients = [], []
    for i in range(n + 1):
        point = (baseline + i / n * (image - baseline)).detach().requires_grad_(True)
        value = net(point)[0, target]
        (gradient,) = torch.autograd.grad(value, point)
        values.append(float(value.detach()))
        gradients.append(gradient[0].double())
    total = torch.zeros_like(gradients[0])
    for i in range(n):
        squared = gradients[i] ** 2
        total += squared / squared.sum() * (values[i + 1] - values[i])
    return total


def test_idgi_matches_the_papers_formula() -> None:
    """In float64, so that the logits' differences along the path carry no float32
    rounding (in float32 the two agree to 3e-5: the rise is small next to the logits)."""
    net = nets.smooth_cnn().eval().double()
    image, baseline = nets.images(1, seed=4).double(), torch.zeros(1, 3, 16, 16, dtype=torch.float64)
    result = attribute(net, image, 3, baselines=baseline, n_steps=20, rule="riemann_left")
    ours = idgi(result.directional_grads[0], result.alphas, result.path_logits[0],
                float(result.baseline_logits[0, 3]), float(result.logits[0, 3]))
    assert relative(ours, plain_idgi(net, image, baseline, 3, 20)) <= 1e-9


def test_idgi_is_complete_on_any_rule() -> None:
    """Its steps add up to F(x) - F(b) by construction, whatever the nodes."""
    net = nets.batchnorm_cnn().eval()
    image = nets.images(1, seed=5)
    result = attribute(net, image, 0, n_steps=9)  # Gauss-Legendre: no node at either end
    ours = idgi(result.directional_grads[0], result.alphas, result.path_logits[0],
                float(result.baseline_logits[0, 0]), float(result.logits[0, 0]))
    rise = float(result.logits[0, 0] - result.baseline_logits[0, 0])
    assert float(ours.double().sum()) == pytest.approx(rise, rel=1e-5)


# --- through a real daemon: igctl, the wire, igd batch ---------------------------------


def attribute_file(igd: Igd, out: Path, image: Path, *args: str) -> dict:
    run = igd.igctl("attribute", str(image), "-o", str(out), "--steps", "12", *args)
    assert run.returncode == 0, run.stderr.decode()
    return read_file(out)


def read_file(path: Path) -> dict:
    if path.suffix == ".npz":
        with np.load(path) as arrays:
            return {key: torch.from_numpy(arrays[key]) if arrays[key].dtype.kind == "f" else arrays[key]
                    for key in arrays.files}
    return read_result(path)


CIFAR = ["cat", "dog", "ship", "frog", "truck"]


@pytest.mark.parametrize("k", [1, 3, 5])
def test_several_targets_in_one_request_equal_their_single_requests(lanet: Igd, fixtures: Path, workdir: Path,
                                                                    k: int) -> None:
    image = fixtures / "images" / "chelsea.png"
    flags = [arg for name in CIFAR[:k] for arg in ("-t", name)]
    multi = attribute_file(lanet, workdir / "multi.gzip", image, *flags)
    if k == 1:  # one target: the predecessor's keys and shapes, unchanged
        assert isinstance(multi["target_class"], int) and multi["integrated_grads"].shape == (1, 3, 32, 32)
        return
    assert multi["axes"] == ["target"] and multi["target_name"] == CIFAR[:k]
    assert multi["integrated_grads"].shape == (k, 1, 3, 32, 32)
    assert multi["integrated_directional_grads"].shape == (k, 12, 3, 32, 32)
    assert multi["intermediates"].shape == (12, 3, 32, 32) and multi["path_logits"].shape == (k, 12)
    for t, name in enumerate(CIFAR[:k]):
        alone = attribute_file(lanet, workdir / f"{name}.gzip", image, name)
        assert multi["target_class"][t] == alone["target_class"]
        assert relative(multi["integrated_grads"][t], alone["integrated_grads"]) <= 1e-6
        assert relative(multi["integrated_directional_grads"][t], alone["integrated_directional_grads"]) <= 1e-6
        assert float(multi["convergence_delta"][t]) == pytest.approx(alone["convergence_delta"], abs=1e-5)


def test_top_k_explains_the_most_likely_classes_in_order(lanet: Igd, fixtures: Path, workdir: Path) -> None:
    image = fixtures / "images" / "coffee.png"
    ranked = json.loads(lanet.igctl("classify", str(image), "--top", "3", "--json").stdout)["top"]
    run = lanet.igctl("attribute", str(image), "--top-k", "3", "--steps", "8", "-o", str(workdir / "top.npz"),
                       "--format", "npz", "--json", "--heatmap", str(workdir / "top.png"))
    assert run.returncode == 0, run.stderr.decode()
    record = json.loads(run.stdout)
    assert [t["name"] for t in record["targets"]] == [entry["name"] for entry in ranked]
    result = read_file(workdir / "top.npz")
    assert list(result["target_class"]) == [entry["index"] for entry in ranked]
    assert result["integrated_grads"].shape == (3, 1, 3, 32, 32)
    with Image.open(workdir / "top.png") as heatmap:
        assert heatmap.size == (3 * 448, 448 + CAPTION_HEIGHT)  # one panel per target


def test_averaged_baselines_are_the_mean_of_the_single_baselines(lanet: Igd, fixtures: Path, workdir: Path) -> None:
    image = fixtures / "images" / "chelsea.png"
    both = attribute_file(lanet, workdir / "both.gzip", image, "cat", "--baseline", "black,white")
    assert both["axes"] == ["target", "path"] and both["path_names"] == ["black", "white"]
    singles = [attribute_file(lanet, workdir / f"{name}.gzip", image, "cat", "--baseline", name)
               for name in ("black", "white")]
    mean = (singles[0]["integrated_grads"] + singles[1]["integrated_grads"]) / 2
    assert relative(both["integrated_grads"][0], mean) <= 1e-6
    for p, single in enumerate(singles):
        assert relative(both["path_integrated_grads"][0, p], single["integrated_grads"][0]) <= 1e-6
        assert relative(both["integrated_directional_grads"][0, p], single["integrated_directional_grads"]) <= 1e-6
        assert torch.equal(both["baseline"][p], single["baseline"][0])


def test_smoothgrad_ig_is_reproducible_and_the_mean_of_its_samples(lanet: Igd, fixtures: Path,
                                                                   workdir: Path) -> None:
    image = fixtures / "images" / "chelsea.png"
    args = ("cat", "--noise", "0.1", "--samples", "4", "--seed", "7")
    first = attribute_file(lanet, workdir / "a.gzip", image, *args)
    assert_same_result(first, attribute_file(lanet, workdir / "b.gzip", image, *args))  # to the bit
    assert first["integrated_grads"].shape == (1, 1, 3, 32, 32) and first["path_ends"].shape == (4, 3, 32, 32)
    samples = [attribute_file(lanet, workdir / f"s{s}.gzip", image, "cat", "--noise", "0.1", "--seed", str(7 + s))
               for s in range(4)]
    mean = sum(sample["integrated_grads"] for sample in samples) / 4
    assert samples[0]["integrated_grads"].shape == (1, 1, 3, 32, 32)  # noise: the layout with a target axis
    assert relative(first["integrated_grads"], mean) <= 1e-6
    assert not torch.equal(samples[0]["integrated_grads"], samples[1]["integrated_grads"])  # noise differs
    assert torch.equal(first["input"], samples[0]["input"])  # the image itself, without noise


def test_uniform_baselines_sampled_expected_gradients_style(lanet: Igd, fixtures: Path, workdir: Path) -> None:
    image = fixtures / "images" / "chelsea.png"
    result = attribute_file(lanet, workdir / "eg.gzip", image, "cat", "--baseline", "uniform", "--samples", "3",
                            "--seed", "5")
    alone = attribute_file(lanet, workdir / "u6.gzip", image, "cat", "--baseline", "uniform", "--seed", "6")
    assert result["path_names"] == ["uniform seed=5", "uniform seed=6", "uniform seed=7"]
    assert relative(result["path_integrated_grads"][0, 1], alone["integrated_grads"][0]) <= 1e-6


def test_blur_ig_and_idgi_through_igctl(lanet: Igd, fixtures: Path, workdir: Path) -> None:
    image = fixtures / "images" / "chelsea.png"
    result = attribute_file(lanet, workdir / "blur.gzip", image, "cat", "--path", "blur", "--blur-sigma", "6",
                            "--idgi")
    assert result["path"] == "blur" and result["blur_sigma"] == 6.0
    n = 12
    assert result["path_derivative"].shape == (n, 3, 32, 32) and result["intermediates"].shape == (n, 3, 32, 32)
    ig = (result["step_sizes"].view(n, 1, 1, 1) * result["integrated_directional_grads"]
          * result["path_derivative"]).sum(0, keepdim=True)
    assert relative(result["integrated_grads"], ig) <= 1e-5  # IG = sum_k w_k g_k gamma'(a_k), as documented
    # IDGI from the file's own per-step gradients and path logits, by the paper's formula:
    target = result["target_class"]
    values = [float(result["baseline_output"][0, target]), *result["path_logits"].tolist(),
              float(result["output"][0, target])]
    expected = torch.zeros(3, 32, 32, dtype=torch.float64)
    for k in range(n):
        squared = result["integrated_directional_grads"][k].double() ** 2
        change = values[k + 2] - values[k + 1] + (values[1] - values[0] if k == 0 else 0.0)
        expected += squared / squared.sum() * change
    assert relative(result["idgi"][0], expected) <= 1e-5
    rise = values[-1] - values[0]
    assert float(result["idgi"].double().sum()) == pytest.approx(rise, rel=1e-4)


def test_top_k_with_a_tolerance(lanet: Igd, fixtures: Path, workdir: Path) -> None:
    run = lanet.igctl("attribute", str(fixtures / "images" / "chelsea.png"), "--top-k", "2", "--tolerance", "0.05",
                       "-o", str(workdir / "adaptive.gzip"), "--json")
    assert run.returncode == 0, run.stderr.decode()
    record = json.loads(run.stdout)
    assert len(record["targets"]) == 2 and record["method"] == "adaptive"
    result = read_file(workdir / "adaptive.gzip")
    n = result["n_steps"]
    assert result["integrated_directional_grads"].shape == (2, n, 3, 32, 32) and result["tolerance"] == 0.05


def test_several_targets_on_the_wire(lanet: Igd, fixtures: Path) -> None:
    image = (fixtures / "images" / "chelsea.png").read_bytes()
    with WireClient(str(lanet.socket)) as client:
        answer = client.call("attribute", {"image": image, "target": ["cat", 5], "n_steps": 6, "idgi": True,
                                           "baseline": ["black", "white"]})
        result = answer["result"]
        assert [t["name"] for t in result["targets"]] == ["cat", "dog"] and result["paths"] == 2
        data = read_result(result["data"])
        assert data["integrated_directional_grads"].shape == (2, 2, 6, 3, 32, 32)
        assert data["idgi"].shape == (2, 1, 3, 32, 32)
        for args, message in ((["cat", "cat"], "names a class twice"), ([], "1 to 16 classes"),
                              ([3.5], "must be a class name")):
            refused = client.call("attribute", {"image": image, "target": args, "n_steps": 6})
            assert refused["error"]["code"] == "bad_request" and message in refused["error"]["message"]
        refused = client.call("attribute", {"image": image, "top_k": 2, "target": "cat", "n_steps": 6})
        assert "args.top_k cannot be given with a target" in refused["error"]["message"]
        refused = client.call("attribute", {"image": image, "samples": 3, "n_steps": 6})
        assert "needs --noise or a random baseline" in refused["error"]["message"]
        refused = client.call("attribute", {"image": image, "samples": 2, "baseline": "blur", "blur_sigma": 0.0})
        assert "needs --noise or a random baseline" in refused["error"]["message"]  # a zero sigma draws nothing
        refused = client.call("attribute", {"image": image, "top_k": 12, "n_steps": 6})  # LaNet has 10 classes
        assert refused["error"]["code"] == "bad_request" and "at most 10" in refused["error"]["message"]


@pytest.mark.slow  # an igd batch run
def test_igd_batch_takes_the_new_options(fixtures: Path, workdir: Path) -> None:
    images = workdir / "images"
    images.mkdir()
    shutil.copy(fixtures / "images" / "chelsea.png", images / "cat.png")
    run = subprocess.run([IGD, "batch", str(images), str(workdir / "out"), "-lp", str(fixtures / "lanet-tiny.pth"),
                          "--max-batch", "10", "--steps", "6", "--top-k", "2", "--baseline", "black,white",
                          "--idgi"], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    (record,) = [json.loads(line) for line in (workdir / "out" / "status.jsonl").read_text().splitlines()]
    result = read_file(workdir / "out" / record["output"])
    assert result["axes"] == ["target", "path"] and len(result["target_class"]) == 2
    assert result["integrated_directional_grads"].shape == (2, 2, 6, 3, 32, 32) and "idgi" in result
    both = subprocess.run([IGD, "batch", str(images), str(workdir / "out2"), "-lp", str(fixtures / "lanet-tiny.pth"),
                           "--top-k", "2", "-t", "cat"], capture_output=True, text=True, timeout=120)
    assert both.returncode == 2 and "give --top-k or --target, not both" in both.stderr
