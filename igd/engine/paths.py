"""The paths an attribution integrates along, and the registry that makes each from a request.

A path ``gamma(a)``, a in [0, 1], runs from a start (a = 0) to the input (a = 1). IG along
it is ``sum_k w_k g_k * gamma'(a_k)``, with ``g_k`` the gradient of the target logit at
``gamma(a_k)``. On the straight line ``gamma(a) = b + a (x - b)``, ``gamma' = x - b`` is
the same at every node, and IG is the familiar ``(x - b) * sum_k w_k g_k`` (computed in
exactly that order, so results stay captum's to the bit).

Blur IG (Xu et al., CVPR 2020) walks from a strongly blurred image to the image through
decreasing blur: ``gamma(a) = blur(x, sigma_max (1 - a))``, whose derivative
``-sigma_max d blur / d sigma`` is computed exactly from the derivative of the Gaussian
kernel (no finite differences). Its start, ``blur(x, sigma_max)``, plays the baseline's part.

A new path is a class here (a :class:`Curve`, with ``from_request``) and its entry in
:data:`PATH_KINDS`, plus its name among igd.request's PATHS (and OWN_STARTS, if it makes its
own start); the paths of a request (igd.engine.baselines), the result's keys
(igd.output.results) and its provenance ask the curve, never its name.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

if TYPE_CHECKING:
    from igd.request import AttributeRequest


class Curve(Protocol):
    """A family of paths, one per (input, start) pair: inputs and starts (M, *F).

    What it records: ``record()``, the result keys that name it and its parameters (none
    for the straight line, whose results stay the predecessor's), and, when
    ``needs_derivative``, its derivative at every node as ``path_derivative``."""

    name: str  # the request's path name (igd.request.PATHS), its key in PATH_KINDS
    needs_derivative: ClassVar[bool]  # gamma' differs along the path: IG needs it at every node, the result holds it

    @classmethod
    def from_request(cls, request: AttributeRequest, shape: tuple[int, ...] | torch.Size) -> Curve:
        """The curve ``request`` asks for, on images of ``shape`` (1, C, H, W)."""

    @property
    def label(self) -> str:
        """The path for people, in the result's path names: "" for the straight line."""

    def record(self) -> dict[str, Any]:
        """The result keys that describe the path (str, int, float values): "path" (its name)
        and its parameters, e.g. ``{"path": "blur", "blur_sigma": 56.0}``; {} for the straight line."""

    def start(self, inputs: Tensor) -> Tensor:
        """(M, *F): the starts of the paths to ``inputs`` (M, *F), for a path that makes its
        own (igd.request.OWN_STARTS) rather than starting from a baseline."""

    def at(self, inputs: Tensor, starts: Tensor, alphas: Tensor) -> Tensor:
        """(M, *F): the point at ``alphas[i]`` (M,) of path i."""

    def points(self, inputs: Tensor, starts: Tensor, alphas: Tensor) -> Tensor:
        """(M, n, *F): the points of every path at every node of ``alphas`` (n,)."""

    def velocities(self, image: Tensor, start: Tensor, alphas: Tensor) -> Tensor:
        """(n, *F): gamma'(a_k) of one path (its end and start (*F)) at the nodes (n,)."""


def _features(tensor: Tensor) -> tuple[int, ...]:
    return (1,) * (tensor.dim() - 1)


@dataclass(frozen=True)
class StraightLine:
    """``b + a (x - b)``: the path of Integrated Gradients. Records nothing: its results are
    the predecessor's, byte for byte."""

    name: str = "straight"
    needs_derivative: ClassVar[bool] = False

    @classmethod
    def from_request(cls, request: AttributeRequest, shape: tuple[int, ...] | torch.Size) -> StraightLine:
        return STRAIGHT  # the one instance: the engine knows the straight line by identity

    @property
    def label(self) -> str:
        return ""

    def record(self) -> dict[str, Any]:
        return {}

    def start(self, inputs: Tensor) -> Tensor:
        raise TypeError("the straight line starts from a baseline")

    def at(self, inputs: Tensor, starts: Tensor, alphas: Tensor) -> Tensor:
        return starts + alphas.view(-1, *_features(inputs)) * (inputs - starts)

    def points(self, inputs: Tensor, starts: Tensor, alphas: Tensor) -> Tensor:
        return starts.unsqueeze(1) + alphas.view(1, -1, *_features(inputs)) * (inputs - starts).unsqueeze(1)

    def velocities(self, image: Tensor, start: Tensor, alphas: Tensor) -> Tensor:
        return (image - start).expand(len(alphas), *image.shape)


STRAIGHT = StraightLine()


@dataclass(frozen=True)
class BlurPath:
    """``blur(x, sigma_max (1 - a))`` for images (M, C, H, W): a Gaussian of the given
    sigma in pixels of the model input, separable, with reflect padding and one kernel
    size for the whole path (``blur_kernel_size(sigma_max)``), as torchvision's
    ``gaussian_blur`` makes it. Sigma 0 is the image itself."""

    sigma_max: float
    name: str = "blur"
    needs_derivative: ClassVar[bool] = True

    @classmethod
    def from_request(cls, request: AttributeRequest, shape: tuple[int, ...] | torch.Size) -> BlurPath:
        """sigma_max: the request's ``blur_sigma``, else :func:`default_blur_path_sigma`."""
        return cls(request.blur_sigma if request.blur_sigma is not None else default_blur_path_sigma(shape))

    @property
    def label(self) -> str:
        return f"blur path sigma={self.sigma_max:g}"

    def record(self) -> dict[str, Any]:
        return {"path": self.name, "blur_sigma": self.sigma_max}

    def start(self, inputs: Tensor) -> Tensor:
        """(M, C, H, W): the path's start, the image blurred by ``sigma_max``."""
        return self.at(inputs, inputs, torch.zeros(len(inputs), dtype=inputs.dtype, device=inputs.device))

    def at(self, inputs: Tensor, starts: Tensor, alphas: Tensor) -> Tensor:
        return torch.stack([self._blur(image, float(a))[0] for image, a in zip(inputs, alphas.tolist())])

    def points(self, inputs: Tensor, starts: Tensor, alphas: Tensor) -> Tensor:
        return torch.stack([torch.stack([self._blur(image, a)[0] for a in alphas.tolist()]) for image in inputs])

    def velocities(self, image: Tensor, start: Tensor, alphas: Tensor) -> Tensor:
        return torch.stack([self.velocity(image, a) for a in alphas.tolist()])

    def velocity(self, image: Tensor, alpha: float) -> Tensor:
        """(C, H, W): d gamma / d alpha at ``alpha``, i.e. -sigma_max d blur / d sigma."""
        return -self.sigma_max * self._blur(image, alpha, derivative=True)[1]

    def _blur(self, image: Tensor, alpha: float, derivative: bool = False) -> tuple[Tensor, Tensor]:
        """The image (C, H, W) blurred at ``alpha`` and, with ``derivative``, d blur / d sigma
        there (else an empty tensor). Kernels are made in float64, convolved in the image's dtype."""
        sigma = self.sigma_max * (1 - alpha)
        size = blur_kernel_size(self.sigma_max, image.shape[-2:])
        if sigma <= 0 or size == 1:
            return image.clone(), torch.zeros_like(image)
        kernel, slope = (k.to(image.dtype) for k in gaussian_kernel(sigma, size, image.device))
        x = image.unsqueeze(0)
        blurred = _separable(x, kernel, kernel)[0]
        if not derivative:
            return blurred, torch.empty(0)
        return blurred, (_separable(x, slope, kernel) + _separable(x, kernel, slope))[0]


def blur_kernel_size(sigma: float, shape: tuple[int, ...] | torch.Size) -> int:
    """An odd kernel spanning 3 sigma each side, and less than twice the shorter side
    (what reflect padding allows)."""
    largest = 2 * (min(shape) // 2) - 1
    return max(1, min(2 * math.ceil(3 * sigma) + 1, largest))


def gaussian_kernel(sigma: float, size: int, device: torch.device | None = None) -> tuple[Tensor, Tensor]:
    """(size,) float64: the normalised Gaussian ``e_t / sum e`` with ``e_t = exp(-t^2 / 2 sigma^2)``
    at t = -(size // 2) .. size // 2, and its derivative with respect to sigma."""
    t = torch.arange(size, dtype=torch.float64, device=device) - size // 2
    e = torch.exp(-0.5 * (t / sigma) ** 2)
    de = e * t**2 / sigma**3
    total = e.sum()
    return e / total, (de * total - e * de.sum()) / total**2


def _separable(x: Tensor, vertical: Tensor, horizontal: Tensor) -> Tensor:
    """(1, C, H, W) convolved with ``vertical`` along H and ``horizontal`` along W (reflect)."""
    channels, half = x.shape[1], len(vertical) // 2
    padded = F.pad(x, [half, half, half, half], mode="reflect")
    rows = F.conv2d(padded, vertical.view(1, 1, -1, 1).expand(channels, 1, -1, 1), groups=channels)
    return F.conv2d(rows, horizontal.view(1, 1, 1, -1).expand(channels, 1, 1, -1), groups=channels)


def default_blur_path_sigma(shape: tuple[int, ...] | torch.Size) -> float:
    """Blur IG's sigma_max when none is given: a quarter of the shorter side (56 px at
    224 x 224; Xu et al. and PAIR's saliency library use 50 px on images of that size)."""
    return min(shape[-2:]) / 4


# The paths a request may take, by the request's path name (igd.request.PATHS): each entry's
# ``from_request`` makes its curve, and its ``needs_derivative`` is known before any image is.
PATH_KINDS: dict[str, type[Curve]] = {StraightLine.name: StraightLine, BlurPath.name: BlurPath}


def make_curve(request: AttributeRequest, shape: tuple[int, ...] | torch.Size) -> Curve:
    """The curve of ``request``'s path (PATH_KINDS) on images of ``shape`` (1, C, H, W)."""
    kind = PATH_KINDS.get(request.path)
    if kind is None:
        raise ValueError(f"unknown path {request.path!r}; choose one of {', '.join(PATH_KINDS)}")
    return kind.from_request(request, shape)
