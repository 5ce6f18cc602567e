"""The seam for attribution paths: a path added inside this test alone (its curve in the
registry of igd.engine.paths, its name among the PATH option's choices, both monkeypatched)
runs a real request through the real code, and its answer is checked against a reference
computed here with torch.autograd on the path's two segments.

The path: two straight segments through a midpoint ``m = (x + b) / 2 + bend * wiggle``,
``b -> m`` for a in [0, 1/2] and ``m -> x`` for a in [1/2, 1]; it is not the straight line.
IG along it is ``(m - b) * int_0^1 g(b + u (m - b)) du + (x - m) * int_0^1 g(m + u (x - m)) du``,
with g the gradient of the target logit: dense Gauss-Legendre on each segment, in float64,
is the converged reference.
"""

from __future__ import annotations

import asyncio
import copy
import io
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import pytest
import torch
from PIL import Image
from torch import Tensor

import nets
from igd import request as spec
from igd.engine import paths
from igd.request import AttributeRequest, RequestError, parse_attribute
from igd.serve.ledger import Reservation
from igd.serve.service import Limits, Service
from igd.worker import Worker
from reference import read_result
from test_worker import loaded

NAME = "twosegment"
BEND = 4.0  # far enough off the line that IG along it differs from the straight line's by ~30 %
TARGET = 2


def wiggle(shape: tuple[int, ...] | torch.Size) -> Tensor:
    """(*shape) float64: a fixed pattern in [-1, 1], the midpoint's step off the straight line."""
    return torch.sin(torch.arange(int(np.prod(shape)), dtype=torch.float64) * 0.7).view(*shape)


@dataclass(frozen=True)
class TwoSegments:
    """The new path, as igd.engine.paths.Curve asks: b -> m -> x, m bent off the midpoint."""

    bend: float = BEND
    name: str = NAME
    needs_derivative: ClassVar[bool] = True

    @classmethod
    def from_request(cls, request: AttributeRequest, shape: tuple[int, ...] | torch.Size) -> TwoSegments:
        return cls()

    @property
    def label(self) -> str:
        return f"two segments bend={self.bend:g}"

    def record(self) -> dict[str, Any]:
        return {"path": self.name, "path_bend": self.bend}

    def start(self, inputs: Tensor) -> Tensor:
        raise TypeError("two segments start from a baseline")

    def midpoint(self, inputs: Tensor, starts: Tensor) -> Tensor:
        """(M, *F): m of each path, from its end and start (M, *F)."""
        return (inputs + starts) / 2 + self.bend * wiggle(inputs.shape[1:]).to(inputs)

    def at(self, inputs: Tensor, starts: Tensor, alphas: Tensor) -> Tensor:
        """(M, *F): path i at ``alphas[i]`` (M,)."""
        a = alphas.to(inputs.dtype).view(-1, *(1,) * (inputs.dim() - 1))
        m = self.midpoint(inputs, starts)
        return torch.where(a < 0.5, starts + 2 * a * (m - starts), m + (2 * a - 1) * (inputs - m))

    def points(self, inputs: Tensor, starts: Tensor, alphas: Tensor) -> Tensor:
        """(M, n, *F): every path at every node of ``alphas`` (n,)."""
        n = len(alphas)
        flat = self.at(inputs.repeat_interleave(n, 0), starts.repeat_interleave(n, 0), alphas.repeat(len(inputs)))
        return flat.view(len(inputs), n, *inputs.shape[1:])

    def velocities(self, image: Tensor, start: Tensor, alphas: Tensor) -> Tensor:
        """(n, *F): 2 (m - b) on the first half, 2 (x - m) on the second."""
        m = self.midpoint(image.unsqueeze(0), start.unsqueeze(0))[0]
        a = alphas.view(-1, *(1,) * image.dim())
        return torch.where(a < 0.5, 2 * (m - start), 2 * (image - m))


@pytest.fixture
def registered(monkeypatch: pytest.MonkeyPatch) -> None:
    """The new path, for this test only: in the registry, and among --path's choices (the
    Option is frozen; its __dict__ is what a change to the table would change)."""
    monkeypatch.setitem(paths.PATH_KINDS, NAME, TwoSegments)
    monkeypatch.setitem(vars(spec.PATH), "choices", (*spec.PATH.choices, NAME))


# --- the reference, written here ----------------------------------------------------------


def gradients(net: torch.nn.Module, points: Tensor) -> Tensor:
    """(N, *F) float64: d logit_TARGET / d input at each of ``points`` (N, *F)."""
    points = points.detach().clone().requires_grad_(True)
    net(points)[:, TARGET].sum().backward()
    assert points.grad is not None
    return points.grad


def segment_ig(net: torch.nn.Module, p: Tensor, q: Tensor, nodes: int = 48) -> Tensor:
    """(*F): ``(q - p) * int_0^1 g(p + u (q - p)) du`` by Gauss-Legendre with ``nodes`` nodes."""
    u, w = np.polynomial.legendre.leggauss(nodes)
    u, w = torch.from_numpy((u + 1) / 2), torch.from_numpy(w / 2)
    grads = gradients(net, p + u.view(-1, *(1,) * p.dim()) * (q - p))
    return (q - p) * (w.view(-1, *(1,) * p.dim()) * grads).sum(0)


def midpoint(x: Tensor, b: Tensor) -> Tensor:
    return (x + b) / 2 + BEND * wiggle(x.shape)


def reference_ig(net: torch.nn.Module, x: Tensor, b: Tensor) -> Tensor:
    """(*F) float64: IG along b -> m -> x, each segment integrated densely."""
    m = midpoint(x, b)
    return segment_ig(net, b, m) + segment_ig(net, m, x)


def reference_at_nodes(net: torch.nn.Module, x: Tensor, b: Tensor, alphas: Tensor,
                       weights: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The path points (n, *F), derivatives (n, *F) and ``sum_k w_k g_k gamma'(a_k)`` (*F) at
    the result's own nodes ``alphas`` (n,) and weights (n,), float64."""
    m = midpoint(x, b)
    a = alphas.double().view(-1, *(1,) * x.dim())
    first = a < 0.5
    points = torch.where(first, b + 2 * a * (m - b), m + (2 * a - 1) * (x - m))
    velocities = torch.where(first, 2 * (m - b), 2 * (x - m))
    ig = (weights.double().view(-1, *(1,) * x.dim()) * gradients(net, points) * velocities).sum(0)
    return points, velocities, ig


def relative(a: Tensor, b: Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


# --- a real request, in process --------------------------------------------------------------


def picture() -> bytes:
    generator = torch.Generator().manual_seed(11)
    pixels = (torch.rand(16, 16, 3, generator=generator) * 255).to(torch.uint8).numpy()
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "PNG")
    return out.getvalue()


def ask(net: torch.nn.Module, args: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The daemon's attribute op in process (igd.serve.service, a real worker, the model
    ``net``): its answer, and the result file it sent, read back."""
    service = Service(Limits(memory_budget=1 << 30), max_pending=8)
    worker = Worker(loaded(net), max_batch=8)
    worker.start()
    service.serve(loaded(net), worker)
    try:
        answer = asyncio.run(service.attribute({"image": picture(), "target": TARGET, **args}, {}, None,
                                               Reservation(service.ledger, 0)))
    finally:
        service.close()
        worker.close()
        worker.drain(5)
    return answer, read_result(b"".join(answer.pop("data").pieces))


# (rule, steps, the largest relative L2 error against the converged reference, and the
# largest completeness gap relative to F(x) - F(b)). The midpoint rule with an even n puts
# n / 2 nodes on each segment (second order); Gauss-Legendre straddles the kink at 1/2.
# Measured: 7e-5 and 2.3e-4 off the reference, gaps of 1e-5 and less.
RULES = [("riemann_middle", 32, 1e-3, 1e-3), ("gausslegendre", 32, 3e-3, 1e-3)]


@pytest.mark.parametrize("rule, steps, error, gap", RULES)
def test_a_path_added_in_the_test_alone_runs_through_the_real_code(registered: None, rule: str, steps: int,
                                                                    error: float, gap: float) -> None:
    net = nets.smooth_cnn()
    answer, result = ask(net, {"path": NAME, "method": rule, "n_steps": steps})
    assert answer["path"] == NAME
    # The result records the path's name and its parameters, and its derivative at every node.
    assert result["path"] == NAME and result["path_bend"] == BEND
    assert result["path_derivative"].shape == (steps, 3, 16, 16)
    assert "blur_sigma" not in result

    net64 = copy.deepcopy(net).double().eval()
    x, b = result["input"][0].double(), result["baseline"][0].double()
    ig = result["integrated_grads"][0]
    # The same nodes, by the path's formula here: the points the model saw, the derivative
    # recorded, and sum_k w_k g_k gamma'(a_k).
    points, velocities, at_nodes = reference_at_nodes(net64, x, b, result["alphas"], result["step_sizes"].view(-1))
    assert relative(result["intermediates"], points) <= 1e-6
    assert relative(result["path_derivative"], velocities) <= 1e-6
    assert relative(ig, at_nodes) <= 1e-4

    # Converged: dense Gauss-Legendre on each segment.
    reference = reference_ig(net64, x, b)
    assert relative(ig, reference) <= error
    straight = segment_ig(net64, b, x)
    assert relative(straight, reference) > 20 * error  # the two segments are not the straight line

    # Completeness: sum(IG) = F(x) - F(b), for the reference to rounding, for the answer to
    # the rule's accuracy; and the answer's own convergence delta says how far it is.
    with torch.no_grad():
        rise = float(net64(x.unsqueeze(0))[0, TARGET] - net64(b.unsqueeze(0))[0, TARGET])
    assert float(reference.sum()) == pytest.approx(rise, rel=1e-6)
    delta = float(ig.double().sum()) - rise
    assert abs(delta) <= gap * abs(rise)
    assert result["convergence_delta"] == pytest.approx(delta, abs=1e-4 * abs(rise))


def test_the_new_path_takes_baselines_and_names_its_paths(registered: None) -> None:
    """Not a path that makes its own start: each baseline starts one, and the names say so."""
    net = nets.smooth_cnn()
    _, result = ask(net, {"path": NAME, "method": "riemann_middle", "n_steps": 16, "baseline": "black,white"})
    assert result["path_names"] == ["two segments bend=4 from black", "two segments bend=4 from white"]
    assert result["path"] == NAME and result["path_derivative"].shape == (2, 16, 3, 16, 16)
    net64 = copy.deepcopy(net).double().eval()
    x = result["input"][0].double()
    for p in range(2):
        b = result["baseline"][p].double()
        _, velocities, at_nodes = reference_at_nodes(net64, x, b, result["alphas"], result["step_sizes"].view(-1))
        assert relative(result["path_derivative"][p], velocities) <= 1e-6
        assert relative(result["path_integrated_grads"][0, p], at_nodes) <= 1e-4


def test_parse_attribute_accepts_the_new_path_only_while_registered(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(RequestError, match=f"--path must be one of straight, blur, got '{NAME}'"):
        parse_attribute({"path": NAME})
    with monkeypatch.context() as patched:
        patched.setitem(paths.PATH_KINDS, NAME, TwoSegments)
        patched.setitem(vars(spec.PATH), "choices", (*spec.PATH.choices, NAME))
        request = parse_attribute({"path": NAME, "baseline": "white"})
        assert request.path == NAME and request.baselines == ("white",)
        with pytest.raises(RequestError, match="cannot be given with a tolerance"):
            parse_attribute({"path": NAME, "tolerance": 0.05})
    with pytest.raises(RequestError, match=f"got '{NAME}'"):
        parse_attribute({"path": NAME})


def test_the_registry_and_the_option_table_name_the_same_paths() -> None:
    assert set(paths.PATH_KINDS) == set(spec.PATHS) == set(spec.PATH.choices)
    assert set(spec.OWN_STARTS) <= set(spec.PATHS)
    assert spec.PATH.default == spec.PATHS[0] and paths.make_curve(AttributeRequest(), (1, 3, 16, 16)) is paths.STRAIGHT
    # The straight line records nothing, so its results stay the predecessor's byte for byte.
    assert paths.STRAIGHT.record() == {} and not paths.STRAIGHT.needs_derivative
    blur = paths.make_curve(AttributeRequest(path="blur", blur_sigma=3.0), (1, 3, 16, 16))
    assert blur.record() == {"path": "blur", "blur_sigma": 3.0} and blur.needs_derivative
    assert paths.make_curve(AttributeRequest(path="blur"), (1, 3, 16, 32)).record()["blur_sigma"] == 4.0
