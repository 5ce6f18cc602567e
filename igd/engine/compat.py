"""Drop-in replacements for the ``intermediate-gradients`` package the predecessor used.

That package pinned 2020 captum internals and no longer installs; its users switch with
one changed import::

    # from intermediate_gradients.intermediate_gradients import IntermediateGradients
    from igd.engine.compat import IntermediateGradients

Return values keep the package's layout: path points step-major, i.e. row
``k * B + i`` holds step k of image i, so grads are (n_steps * B, *F) and step sizes
(n_steps, 1). Both classes run on :func:`igd.engine.attribution.attribute_points`: one pass,
eval mode, frozen parameters (of ``forward_func`` if it is a module, and of any module
passed in ``additional_forward_args``).
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import torch
from torch import Tensor, nn

from igd.engine.attribution import (
    DEFAULT_RULE,
    Attribution,
    Target,
    attribute_points,
    evaluation_mode,
)

ForwardFunc = Callable[..., Tensor]
Gradients = tuple[Tensor, Tensor, Tensor]


class IntermediateGradients:
    """Per-step gradients along the IG path, in the ``intermediate-gradients`` layout."""

    def __init__(self, forward_func: ForwardFunc) -> None:
        self.forward_func = forward_func

    def attribute(
        self,
        inputs: Tensor,
        baselines: Tensor | float | None = None,
        target: Target | None = None,
        additional_forward_args: Any = None,
        n_steps: int = 50,
        method: str = DEFAULT_RULE,
        max_batch: int | None = None,
    ) -> Gradients:
        """Returns ``(grads, step_sizes, intermediates)``.

        grads, intermediates: (n_steps * B, *F), step-major; step_sizes: (n_steps, 1).
        ``max_batch`` (new) bounds the path points per forward pass.
        """
        args = _as_args(additional_forward_args)
        batch = inputs.shape[0]

        def forward(points: Tensor, image_index: Tensor) -> Tensor:
            return self.forward_func(points, *_rows(args, image_index, batch))

        result = attribute_points(
            forward,
            inputs,
            _required(target),
            baselines=baselines,
            n_steps=n_steps,
            rule=method,
            max_batch=max_batch,
            modules=_modules_in(self.forward_func, args),
        )
        return _package_layout(result)


class LayerIntermediateGradients:
    """Per-step gradients with respect to a layer's output (or input), along the IG path
    between the layer's activations at the baselines and at the inputs.

    Summing ``step_sizes * grads`` over the steps and multiplying by the layer's
    (input - baseline) activations gives captum's ``LayerIntegratedGradients``.
    """

    def __init__(self, forward_func: ForwardFunc, layer: nn.Module) -> None:
        self.forward_func = forward_func
        self.layer = layer

    def attribute(
        self,
        inputs: Tensor,
        baselines: Tensor | float | None = None,
        additional_forward_args: Any = None,
        target: Target | None = None,
        n_steps: int = 50,
        method: str = DEFAULT_RULE,
        attribute_to_layer_input: bool = False,
        max_batch: int | None = None,
    ) -> Gradients:
        """Returns ``(grads, step_sizes, intermediates)`` in the layer's activation space.

        grads, intermediates: (n_steps * B, *L) for layer activations of shape (B, *L),
        step-major; step_sizes: (n_steps, 1).
        """
        args = _as_args(additional_forward_args)
        batch = inputs.shape[0]
        modules = _modules_in(self.forward_func, args) + [self.layer]
        base = torch.zeros_like(inputs) if baselines is None else torch.broadcast_to(
            torch.as_tensor(baselines, dtype=inputs.dtype, device=inputs.device), inputs.shape
        )
        with evaluation_mode(modules), torch.no_grad():
            layer_inputs = self._activations(inputs, args, attribute_to_layer_input)
            layer_baselines = self._activations(base, args, attribute_to_layer_input)

        def forward(points: Tensor, image_index: Tensor) -> Tensor:
            with self._substituted(points, attribute_to_layer_input):
                return self.forward_func(inputs[image_index], *_rows(args, image_index, batch))

        result = attribute_points(
            forward,
            layer_inputs,
            _required(target),
            baselines=layer_baselines,
            n_steps=n_steps,
            rule=method,
            max_batch=max_batch,
            modules=modules,
        )
        return _package_layout(result)

    def _activations(self, inputs: Tensor, args: tuple[Any, ...], of_input: bool) -> Tensor:
        """The layer's output (or first input) when the model runs on ``inputs``, (B, *L)."""
        seen: list[Tensor] = []

        def record(_module: nn.Module, hook_inputs: tuple[Any, ...], output: Any = None) -> None:
            value = hook_inputs[0] if of_input else output
            if not isinstance(value, Tensor):
                raise ValueError(
                    f"the layer's {'input' if of_input else 'output'} must be one tensor, "
                    f"got {type(value).__name__}"
                )
            seen.append(value.detach())

        hook = (
            self.layer.register_forward_pre_hook(record)
            if of_input
            else self.layer.register_forward_hook(record)
        )
        try:
            self.forward_func(inputs, *args)
        finally:
            hook.remove()
        if len(seen) != 1:
            raise ValueError(f"the layer ran {len(seen)} times in one forward; it must run once")
        return seen[0]

    @contextlib.contextmanager
    def _substituted(self, activations: Tensor, of_input: bool) -> Iterator[None]:
        """Make the layer see (input) or produce (output) ``activations`` meanwhile."""
        if of_input:
            hook = self.layer.register_forward_pre_hook(
                lambda _m, hook_inputs: (activations, *hook_inputs[1:])
            )
        else:
            hook = self.layer.register_forward_hook(lambda _m, _i, _o: activations)
        try:
            yield
        finally:
            hook.remove()


def _package_layout(result: Attribution) -> Gradients:
    """(B, n, *F) -> step-major (n * B, *F), and step sizes as (n, 1)."""
    n = result.n_steps

    def step_major(per_image: Tensor) -> Tensor:
        return per_image.transpose(0, 1).reshape(-1, *per_image.shape[2:])

    return (
        step_major(result.directional_grads),
        result.step_sizes.view(n, 1),
        step_major(result.intermediates),
    )


def _required(target: Target | None) -> Target:
    if target is None:
        raise ValueError("target is required: the index of the output to explain")
    return target


def _as_args(additional_forward_args: Any) -> tuple[Any, ...]:
    if additional_forward_args is None:
        return ()
    if isinstance(additional_forward_args, tuple):
        return additional_forward_args
    return (additional_forward_args,)


def _rows(args: tuple[Any, ...], image_index: Tensor, batch: int) -> tuple[Any, ...]:
    """Per-point extra arguments: tensors with one row per image are indexed by the
    points' images (as captum repeats them per step); anything else passes unchanged."""
    return tuple(
        arg[image_index.to(arg.device)]
        if isinstance(arg, Tensor) and arg.dim() > 0 and arg.shape[0] == batch
        else arg
        for arg in args
    )


def _modules_in(forward_func: ForwardFunc, args: tuple[Any, ...]) -> list[nn.Module]:
    candidates = [forward_func, getattr(forward_func, "__self__", None), *args]
    return [c for c in candidates if isinstance(c, nn.Module)]
