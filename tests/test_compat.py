"""igd.engine.compat against the engine (same tensors, the old package's layout) and captum."""

from __future__ import annotations

import pytest
import torch
from captum.attr import LayerIntegratedGradients

import nets
from igd.engine.attribution import attribute
from igd.engine.compat import IntermediateGradients, LayerIntermediateGradients

TARGETS = [1, 0, 4]


def model_forward(inputs: torch.Tensor, model: torch.nn.Module) -> torch.Tensor:
    """The predecessor's style: the model travels in additional_forward_args."""
    return model(inputs)


def test_intermediate_gradients_match_the_engine_in_package_layout() -> None:
    net = nets.batchnorm_cnn().train()
    x = nets.images()
    grads, step_sizes, intermediates = IntermediateGradients(model_forward).attribute(
        x, None, TARGETS, (net,), 10, "riemann_middle"
    )
    assert net.training and all(p.requires_grad for p in net.parameters())
    expected = attribute(net, x, TARGETS, n_steps=10, rule="riemann_middle")
    assert grads.shape == (10 * 3, 3, 16, 16)
    assert step_sizes.shape == (10, 1)
    assert intermediates.shape == (10 * 3, 3, 16, 16)
    for step in (0, 4, 9):
        for image in range(3):
            row = step * 3 + image  # step-major, as the package returned them
            torch.testing.assert_close(grads[row], expected.directional_grads[image, step])
            torch.testing.assert_close(intermediates[row], expected.intermediates[image, step])
    torch.testing.assert_close(step_sizes.view(-1), expected.step_sizes)


def test_per_image_forward_args_follow_their_images() -> None:
    net = nets.groupnorm_cnn()
    x = nets.images()
    scale = torch.tensor([0.5, 1.0, 2.0])

    def scaled(inputs: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
        return net(inputs) * factors.view(-1, 1)

    grads, _, _ = IntermediateGradients(scaled).attribute(
        x, 0.0, TARGETS, additional_forward_args=scale, n_steps=4, max_batch=5
    )
    plain, _, _ = IntermediateGradients(net).attribute(x, 0.0, TARGETS, n_steps=4)
    expected = plain.view(4, 3, -1) * scale.view(1, 3, 1)
    torch.testing.assert_close(grads.view(4, 3, -1), expected)


def test_missing_target_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="target is required"):
        IntermediateGradients(nets.groupnorm_cnn()).attribute(nets.images(), None, None)


def layer_activations(net: torch.nn.Module, layer: torch.nn.Module, x: torch.Tensor, of_input: bool) -> torch.Tensor:
    seen: list[torch.Tensor] = []
    hook = (
        layer.register_forward_pre_hook(lambda _m, i: seen.append(i[0]))
        if of_input
        else layer.register_forward_hook(lambda _m, _i, o: seen.append(o))
    )
    with torch.no_grad():
        net(x)
    hook.remove()
    return seen[0]


@pytest.mark.parametrize("of_input", [False, True])
@pytest.mark.parametrize("method,n_steps", [("gausslegendre", 20), ("riemann_trapezoid", 7)])
def test_layer_gradients_rebuild_captums_layer_integrated_gradients(
    of_input: bool, method: str, n_steps: int
) -> None:
    net = nets.batchnorm_cnn().eval()
    layer = net[3]  # a conv layer
    x = nets.images()
    baselines = torch.full_like(x, -0.3)
    grads, step_sizes, intermediates = LayerIntermediateGradients(net, layer).attribute(
        x, baselines, None, target=TARGETS, n_steps=n_steps, method=method,
        attribute_to_layer_input=of_input,
    )
    at_inputs = layer_activations(net, layer, x, of_input)
    at_baselines = layer_activations(net, layer, baselines, of_input)
    assert grads.shape == (n_steps * 3, *at_inputs.shape[1:])
    weighted = (grads.view(n_steps, 3, -1) * step_sizes.view(n_steps, 1, 1)).sum(0)
    ours = weighted.view_as(at_inputs) * (at_inputs - at_baselines)
    theirs = LayerIntegratedGradients(net, layer).attribute(
        x, baselines, target=TARGETS, n_steps=n_steps, method=method,
        attribute_to_layer_input=of_input,
    )
    assert float((ours - theirs).norm() / theirs.norm()) < 1e-5
    last = intermediates.view(n_steps, 3, *at_inputs.shape[1:])[-1]
    assert float((last - at_inputs).norm() / at_inputs.norm()) < 0.2  # the path ends near x
