"""Chunk-size and memory-format measurement on real (small) models."""

from __future__ import annotations

import torch

import nets
from igd.attribution import attribute
from igd.tuning import choose_max_batch, saved_bytes_per_point, use_memory_format


def test_saved_bytes_grow_with_the_points_not_with_the_weights() -> None:
    net = nets.batchnorm_cnn()
    small, large = torch.randn(1, 3, 16, 16), torch.randn(1, 3, 32, 32)
    per_point = saved_bytes_per_point(net, small)
    assert per_point > 3 * 16 * 16 * 4  # at least the input itself
    assert 3.5 < saved_bytes_per_point(net, large) / per_point < 4.5  # activations scale with pixels


def test_chunk_choice_respects_limit_and_memory_budget() -> None:
    net = nets.groupnorm_cnn()
    sample = torch.randn(1, 3, 16, 16)
    choice = choose_max_batch(net, sample, limit=8, time_budget_s=5)
    assert 1 <= choice.max_batch <= 8 and set(choice.seconds_per_point) <= {1, 2, 4, 8}
    assert all(seconds > 0 for seconds in choice.seconds_per_point.values())
    tight = choose_max_batch(net, sample, budget_bytes=3 * 2 * saved_bytes_per_point(net, sample), time_budget_s=5)
    assert tight.memory_cap == 3 and tight.max_batch <= 2


def test_memory_format_is_applied_and_its_deviation_reported() -> None:
    net = nets.batchnorm_cnn()
    x = nets.images()
    before = attribute(net, x, [0, 1, 2], n_steps=6)
    assert use_memory_format(net, x[:1], "contiguous") == 0.0
    deviation = use_memory_format(net, x[:1], "channels_last")
    assert net[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert 0.0 <= deviation < 1e-3
    after = attribute(net, x, [0, 1, 2], n_steps=6)
    torch.testing.assert_close(after.integrated_grads, before.integrated_grads, rtol=1e-3, atol=1e-6)
