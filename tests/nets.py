"""Small deterministic CNNs for engine tests (CPU, milliseconds per pass)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from torch import nn

CLASSES = 5


def batchnorm_cnn(seed: int = 0) -> nn.Module:
    """Conv-BN-ReLU x2 with non-trivial running statistics, (N, 3, 16, 16) -> (N, 5)."""
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 12, 3, stride=2),
        nn.BatchNorm2d(12),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(48, CLASSES),
    )
    for module in net.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    return net


def groupnorm_cnn(seed: int = 1) -> nn.Module:
    """Conv-GN-ReLU with a max pool, (N, 3, 16, 16) -> (N, 5)."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.GroupNorm(4, 8),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.GroupNorm(4, 16),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, CLASSES),
    )


def smooth_cnn(seed: int = 2) -> nn.Module:
    """Softplus activations and average pooling: smooth, so the path integral
    converges quickly and completeness can be asserted tightly."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.Softplus(),
        nn.AvgPool2d(2),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.Softplus(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, CLASSES),
    )


def images(batch: int = 3, seed: int = 3) -> torch.Tensor:
    """(batch, 3, 16, 16) standard-normal inputs."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, 16, 16, generator=generator)


class _Repeated(nn.Module):
    """One wide layer applied ``times`` times: much compute, few weights to store."""

    def __init__(self, width: int, times: int) -> None:
        super().__init__()
        self.layer = nn.Linear(width, width)
        self.times = times

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _ in range(self.times):
            x = torch.relu(self.layer(x)) / 2 + x / 2
        return x


def write_slow_model(directory: Path, width: int = 1536, times: int = 96) -> Path:
    """A TorchScript classifier with a sidecar, for tests that need long requests: tiny
    8x8 inputs (so results stay small at thousands of steps) and a costly forward pass
    (about ``times`` x width^2 multiply-adds per point). Returns the model's path."""
    torch.manual_seed(7)
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, width), _Repeated(width, times), nn.Linear(width, 10))
    path = directory / "slow.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # TorchScript is deprecated, but served
        torch.jit.save(torch.jit.script(net.eval()), str(path))
    sidecar = {"name": "slow-mlp", "input_size": [8, 8], "resize": "stretch",
               "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "classes": [f"class {i}" for i in range(10)]}
    (directory / "slow.pt.json").write_text(json.dumps(sidecar))
    return path
