"""The one-pass engine against captum, against its own definition, and its contracts."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from captum.attr import IntegratedGradients
from captum.attr._utils.approximation_methods import approximation_parameters

import nets
from igd.engine.attribution import RULES, attribute, quadrature

TARGETS = [0, 3, 4]
NETS = {"batchnorm": nets.batchnorm_cnn, "groupnorm": nets.groupnorm_cnn}
CASES = [
    (method, n)
    for method, n in itertools.product(RULES, (1, 2, 17, 50))
    if n > 1 or method == "gausslegendre"
]


def rel_l2(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).norm() / expected.norm())


@pytest.mark.parametrize("method,n_steps", CASES)
def test_quadrature_is_captums(method: str, n_steps: int) -> None:
    step_sizes, alphas = approximation_parameters(method)
    assert quadrature(method, n_steps) == (alphas(n_steps), step_sizes(n_steps))


@pytest.mark.parametrize("net_name", NETS)
@pytest.mark.parametrize("method,n_steps", CASES)
def test_integrated_grads_equal_captum(net_name: str, method: str, n_steps: int) -> None:
    net = NETS[net_name]().eval()
    x = nets.images()
    baselines = torch.full_like(x, 0.25)
    ours = attribute(net, x, TARGETS, baselines=baselines, n_steps=n_steps, rule=method)
    theirs = IntegratedGradients(net).attribute(
        x, baselines=baselines, target=TARGETS, n_steps=n_steps, method=method
    )
    assert theirs.abs().sum() > 0
    assert rel_l2(ours.integrated_grads, theirs) < 1e-5


@pytest.mark.parametrize("method", RULES)
def test_directional_grads_rebuild_integrated_grads(method: str) -> None:
    net = nets.groupnorm_cnn()
    x = nets.images()
    baselines = torch.randn_like(x) * 0.1
    result = attribute(net, x, TARGETS, baselines=baselines, n_steps=9, rule=method)
    n = result.n_steps
    assert result.directional_grads.shape == (3, n, 3, 16, 16)
    weights = result.step_sizes.view(1, n, 1, 1, 1)
    rebuilt = (weights * result.directional_grads).sum(1) * (x - baselines)
    assert rel_l2(rebuilt, result.integrated_grads) < 1e-6
    path = baselines.unsqueeze(1) + result.alphas.view(1, n, 1, 1, 1) * (x - baselines).unsqueeze(1)
    torch.testing.assert_close(result.intermediates, path, rtol=0, atol=1e-6)
    expected_alphas, expected_steps = quadrature(method, n)
    assert result.alphas.tolist() == pytest.approx(expected_alphas, abs=1e-7)
    assert result.step_sizes.tolist() == pytest.approx(expected_steps, abs=1e-7)


def test_directional_grads_are_the_gradients_at_the_path_points() -> None:
    net = nets.batchnorm_cnn().eval()
    x = nets.images()
    result = attribute(net, x, TARGETS, n_steps=4)
    for image, step in [(0, 0), (1, 3), (2, 2)]:
        point = result.intermediates[image, step].unsqueeze(0).requires_grad_()
        (grad,) = torch.autograd.grad(net(point)[0, TARGETS[image]], point)
        torch.testing.assert_close(result.directional_grads[image, step], grad[0])


@pytest.mark.parametrize("max_batch", [1, 7, 64])
def test_chunked_equals_unchunked(max_batch: int) -> None:
    net = nets.batchnorm_cnn()
    x = nets.images()
    whole = attribute(net, x, TARGETS, n_steps=17)
    chunked = attribute(net, x, TARGETS, n_steps=17, max_batch=max_batch)
    for field in ("integrated_grads", "directional_grads", "logits", "convergence_delta"):
        torch.testing.assert_close(getattr(chunked, field), getattr(whole, field), rtol=1e-5, atol=1e-6)


def test_completeness_on_a_smooth_model() -> None:
    net = nets.smooth_cnn()
    x = nets.images() * 2
    result = attribute(net, x, TARGETS, n_steps=50)
    rows = torch.arange(3)
    rise = result.logits[rows, TARGETS] - result.baseline_logits[rows, TARGETS]
    assert rise.abs().min() > 1e-3
    assert torch.all(result.convergence_delta.abs() / rise.abs() < 1e-3)
    torch.testing.assert_close(result.logits, net(x).detach())
    torch.testing.assert_close(result.baseline_logits, net(torch.zeros_like(x)).detach())


def test_convergence_delta_is_sum_minus_rise() -> None:
    net = nets.batchnorm_cnn()
    x = nets.images()
    result = attribute(net, x, TARGETS, n_steps=3, rule="riemann_left")
    rows = torch.arange(3)
    rise = result.logits[rows, TARGETS] - result.baseline_logits[rows, TARGETS]
    expected = result.integrated_grads.flatten(1).sum(1) - rise
    torch.testing.assert_close(result.convergence_delta, expected, rtol=1e-4, atol=1e-5)
    assert result.convergence_delta.abs().max() > 1e-3  # 3 Riemann steps are coarse


def test_one_target_for_all_images_and_scalar_baseline() -> None:
    net = nets.groupnorm_cnn()
    x = nets.images()
    result = attribute(net, x, 2, baselines=0.5, n_steps=5)
    assert result.targets.tolist() == [2, 2, 2]
    torch.testing.assert_close(result.baselines, torch.full_like(x, 0.5))
    per_image = attribute(net, x, torch.tensor([2, 2, 2]), baselines=torch.full_like(x, 0.5), n_steps=5)
    torch.testing.assert_close(result.integrated_grads, per_image.integrated_grads)


def test_batch_results_equal_single_image_results() -> None:
    net = nets.batchnorm_cnn()
    x = nets.images()
    batch = attribute(net, x, TARGETS, n_steps=8)
    for i, target in enumerate(TARGETS):
        alone = attribute(net, x[i : i + 1], target, n_steps=8)
        torch.testing.assert_close(batch.integrated_grads[i : i + 1], alone.integrated_grads)
        torch.testing.assert_close(batch.directional_grads[i : i + 1], alone.directional_grads)


def test_model_state_is_restored() -> None:
    net = nets.batchnorm_cnn().train()
    net[1].eval()  # a model that mixes modes must come back mixed
    net[3].weight.requires_grad_(False)
    before_modes = [m.training for m in net.modules()]
    before_flags = [p.requires_grad for p in net.parameters()]
    seen: dict[str, object] = {}

    def spy(module: torch.nn.Module, _inputs: object, _output: object) -> None:
        seen["training"] = module.training
        seen["requires_grad"] = [p.requires_grad for p in net.parameters()]

    net[0].register_forward_hook(spy)
    attribute(net, nets.images(), TARGETS, n_steps=3)
    assert seen == {"training": False, "requires_grad": [False] * len(before_flags)}
    assert [m.training for m in net.modules()] == before_modes
    assert [p.requires_grad for p in net.parameters()] == before_flags
    assert all(p.grad is None for p in net.parameters())


def test_model_state_is_restored_when_it_raises() -> None:
    net = nets.batchnorm_cnn().train()
    calls = 0

    def fail_on_path_pass(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        nonlocal calls
        calls += 1
        if calls > 1:
            raise RuntimeError("boom")

    hook = net[4].register_forward_pre_hook(fail_on_path_pass)
    with pytest.raises(RuntimeError, match="boom"):
        attribute(net, nets.images(), TARGETS, n_steps=3)
    hook.remove()
    assert all(m.training for m in net.modules())
    assert all(p.requires_grad for p in net.parameters())
    with pytest.raises(ValueError, match="out of range"):
        attribute(net, nets.images(), 9, n_steps=3)
    assert all(m.training for m in net.modules())
    assert all(p.requires_grad for p in net.parameters())


@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode])
def test_works_under_callers_no_grad_and_inference_mode(context: type) -> None:
    net = nets.groupnorm_cnn()
    x = nets.images()
    expected = attribute(net, x, TARGETS, n_steps=5)
    with context():
        inside = attribute(net, x.clone(), TARGETS, n_steps=5)
    torch.testing.assert_close(inside.integrated_grads, expected.integrated_grads)


def test_float64_inputs_stay_float64() -> None:
    net = nets.smooth_cnn().double()
    x = nets.images().double()
    result = attribute(net, x, TARGETS, n_steps=20)
    assert result.integrated_grads.dtype == torch.float64
    assert result.convergence_delta.dtype == torch.float64
    theirs = IntegratedGradients(net).attribute(x, target=TARGETS, n_steps=20)
    # captum rounds its step sizes to float32 even for float64 inputs; we do not.
    assert rel_l2(result.integrated_grads, theirs) < 1e-7


@pytest.mark.parametrize("allow_tf32,expected", [(False, "ieee"), (True, "tf32")])
def test_tf32_switches_are_set_then_restored(allow_tf32: bool, expected: str) -> None:
    """Both switches take the requested mode whatever PyTorch's defaults (which allow TF32
    for convolutions only), and the caller's settings come back."""
    matmul = torch.backends.cuda.matmul.fp32_precision
    conv = torch.backends.cudnn.conv.fp32_precision
    seen: list[tuple[str, str]] = []
    net = nets.groupnorm_cnn()
    net[0].register_forward_hook(
        lambda *_: seen.append((torch.backends.cudnn.conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision))
    )
    attribute(net, nets.images(), TARGETS, n_steps=2, allow_tf32=allow_tf32)
    assert set(seen) == {(expected, expected)}
    assert torch.backends.cuda.matmul.fp32_precision == matmul
    assert torch.backends.cudnn.conv.fp32_precision == conv


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"n_steps": 0}, "n_steps must be >= 1"),
        ({"n_steps": 1, "rule": "riemann_left"}, "n_steps must be >= 2"),
        ({"n_steps": 2.5}, "n_steps must be an int"),
        ({"rule": "simpson"}, "unknown rule 'simpson'"),
        ({"target": 5}, "target 5 is out of range"),
        ({"target": -1}, "target -1 is out of range"),
        ({"target": [0, 1]}, "one int or 3 ints"),
        ({"target": [0.0, 1.0, 2.0]}, "must be integers"),
        ({"target": "cat"}, "target must be an int"),
        ({"baselines": torch.zeros(2, 3, 16, 16)}, "do not broadcast"),
        ({"max_batch": 0}, "max_batch must be None or >= 1"),
        ({"inputs": torch.zeros(3, 3, 16, 16, dtype=torch.long)}, "floating point"),
        ({"forward": lambda x: x.sum((1, 2, 3))}, r"logits of shape \(6, K\)"),
        ({"forward": lambda x: (x.mean((2, 3)),)}, "got tuple"),
    ],
)
def test_bad_arguments_raise_value_errors(kwargs: dict[str, object], message: str) -> None:
    call: dict[str, object] = {
        "forward": nets.groupnorm_cnn(),
        "inputs": nets.images(),
        "target": TARGETS,
        "n_steps": 4,
    }
    call.update(kwargs)
    forward, inputs, target = call.pop("forward"), call.pop("inputs"), call.pop("target")
    with pytest.raises(ValueError, match=message):
        attribute(forward, inputs, target, **call)  # type: ignore[arg-type]


def test_forward_without_autograd_gets_a_clear_error() -> None:
    net = nets.groupnorm_cnn()

    def detached(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return net(x)

    with pytest.raises(RuntimeError, match="does not depend on its input through autograd"):
        attribute(detached, nets.images(), TARGETS, n_steps=2)


def test_gauss_legendre_weights_sum_to_one_and_trapezoid_is_biased() -> None:
    assert sum(quadrature("gausslegendre", 50)[1]) == pytest.approx(1.0)
    assert sum(quadrature("riemann_trapezoid", 10)[1]) == pytest.approx(0.9)
    nodes, _ = quadrature("gausslegendre", 7)
    assert np.all(np.diff(nodes) > 0) and 0 < nodes[0] and nodes[-1] < 1


@pytest.mark.parametrize(
    "total,max_batch,expected",
    [(50, None, 50), (50, 64, 50), (50, 32, 25), (50, 7, 7), (50, 10, 10), (150, 64, 50), (3, 1, 1)],
)
def test_chunks_are_balanced(total: int, max_batch: int | None, expected: int) -> None:
    from igd.engine.attribution import balanced_chunk

    assert balanced_chunk(total, max_batch) == expected


@pytest.mark.parametrize("max_batch,calls", [(10, 1), (5, 3), (4, 4)])
def test_end_logits_ride_along_with_the_first_chunk(max_batch: int, calls: int) -> None:
    """Inputs and baselines share the first model call when they are few next to the chunk
    (here 2 rows: at chunks of 8 or more); the logits are the same either way."""
    net = nets.groupnorm_cnn()
    seen: list[int] = []
    net.register_forward_pre_hook(lambda _m, args: seen.append(len(args[0])))
    x = nets.images(1)
    result = attribute(net, x, 2, n_steps=10, max_batch=max_batch)
    assert len(seen) == calls, seen
    torch.testing.assert_close(result.logits, net(x).detach())
    torch.testing.assert_close(result.baseline_logits, net(torch.zeros_like(x)).detach())
    reference = attribute(net, x, 2, n_steps=10)
    torch.testing.assert_close(result.integrated_grads, reference.integrated_grads)


@pytest.mark.parametrize("shape", [(1, 1024, 3, 32, 32), (2, 700, 3, 17, 23), (1, 64, 3, 224, 224), (3, 5, 1, 7, 3)])
def test_weighted_sum_in_blocks_is_exact(shape: tuple[int, ...], monkeypatch: pytest.MonkeyPatch) -> None:
    """Large products are summed a block of features at a time (no second copy of the
    gradients); the result must be the whole product's, to the bit."""
    from igd.engine import attribution

    monkeypatch.setattr(attribution, "_WHOLE_PRODUCT_BYTES", 0)  # every size takes the blocked path
    generator = torch.Generator().manual_seed(5)
    directional = torch.randn(shape, generator=generator)
    weights = torch.rand(shape[1], generator=generator)
    whole = (directional * weights.view(1, -1, 1, 1, 1)).sum(dim=1)
    assert torch.equal(attribution.weighted_sum(directional, weights), whole)
