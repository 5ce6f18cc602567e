"""Chunk-size and memory-format measurement on real (small) models, and the chunk search
on the time-per-point curves bench/chunks.py measured on full-size models."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import nets
from igd.engine.attribution import attribute
from igd.models import load_model
from igd.tuning.cache import ChunkCache
from igd.tuning.search import ChunkChoice, busy_cores_elsewhere, choose_max_batch, saved_bytes_per_point, search_chunk
from igd.tuning.warmup import use_memory_format

# ms per point of forward+backward at each chunk size, measured on this project's 2-core
# CPU (bench/chunks.py sweeps; sizes between two measured ones are interpolated).
CURVES = {
    # a fixed cost per call (380M weights re-laid out): bigger is better up to the cap
    "bit-r101x3": ({1: 416, 2: 314, 4: 185, 8: 111, 12: 90, 16: 82, 24: 69, 32: 68, 48: 64, 64: 60}, 64),
    # flat from 4 to 16, then caches overflow
    "efficientnet-lite0": ({1: 69, 2: 56, 3: 52, 4: 50, 5: 48, 6: 52, 8: 44, 10: 49, 12: 47, 16: 48, 24: 68,
                            32: 84, 48: 103, 64: 150}, 64),
    # jagged, one clear best, capped by memory at 18
    "lanet-c128": ({1: 744, 2: 587, 3: 576, 4: 543, 5: 511, 6: 486, 8: 433, 10: 484, 12: 484, 16: 576,
                    18: 580}, 18),
    "flat": ({1: 10, 64: 10.2}, 64),
    "small chunks slow": ({1: 5000, 2: 4000, 64: 100}, 64),
}


def curve(points: dict[int, float]):
    """ms per point at any size: log-linear between the measured sizes."""
    sizes = sorted(points)

    def at(size: int) -> float:
        if size in points:
            return points[size]
        low = max(s for s in sizes if s < size)
        high = min(s for s in sizes if s > size)
        share = (math.log(size) - math.log(low)) / (math.log(high) - math.log(low))
        return points[low] + share * (points[high] - points[low])

    return at


@pytest.mark.parametrize("name", sorted(CURVES))
def test_the_search_picks_within_ten_percent_of_the_best_size_in_a_few_tries(name: str) -> None:
    points, cap = CURVES[name]
    at, calls = curve(points), []

    def measure(size: int) -> float:
        calls.append(size)
        return at(size)

    chosen, timings, final_cap = search_chunk(measure, cap)
    best = min(at(size) for size in range(2, cap + 1))
    assert at(chosen) <= best * 1.10, (chosen, timings)
    assert final_cap == cap and 2 <= chosen <= cap
    assert 1 not in calls and max(calls) <= cap  # one-point calls round differently
    assert len(set(calls)) <= math.log2(cap) + 1 and len(calls) <= len(set(calls)) + 4  # a few calls per size


def test_the_search_takes_the_smallest_of_equal_sizes_and_stops_where_memory_runs_out() -> None:
    assert search_chunk(lambda size: 1.0, 64)[0] == 2  # all equal: the least memory
    out_of_memory_above = 20
    chosen, timings, cap = search_chunk(lambda size: None if size > out_of_memory_above else 10 / size, 64)
    assert (chosen, cap, sorted(timings)) == (16, 16, [2, 4, 8, 16])  # 32 did not fit: the cap halves
    noisy = {2: [1.0], 4: [0.9], 8: [3.0, 0.7], 16: [0.85]}  # 8's first call is slow for a reason of its own
    chosen, timings, _ = search_chunk(lambda size: noisy[size].pop(0) if len(noisy[size]) > 1 else noisy[size][0], 64)
    assert chosen == 8 and timings == {2: 1.0, 4: 0.9, 8: 0.7, 16: 0.85}  # 8 timed again; 16 turned, 32 not tried
    assert search_chunk(lambda size: None, 64) == (1, {}, 1)  # not even 2 fits
    assert search_chunk(lambda size: 1.0, 1) == (1, {1: 1.0}, 1)  # the budget allows one point


def test_the_cache_keeps_the_search_and_is_keyed_by_what_changes_the_answer(tmp_path: Path, fixtures: Path) -> None:
    model = load_model(lanet_path=fixtures / "lanet-tiny.pth")
    key = ChunkCache.key(model, "contiguous", "float32")
    assert model.weights_sha256 in key and "3x32x32" in key and f"threads={torch.get_num_threads()}" in key
    assert "memory=" in key and f"search={ChunkCache.SEARCH}" in key and "eager" in key
    assert len({key, ChunkCache.key(model, "channels_last", "float32"), ChunkCache.key(model, "contiguous", "tf32"),
                ChunkCache.key(model, "contiguous", "float32", "inductor")}) == 4
    choice = ChunkChoice(8, {2: 0.05, 8: 0.04, 32: 0.09, 4: 0.045, 16: 0.041}, 12_000_000, 64, 7.6,
                         "2026-12-03T18:00:00Z")
    cache = ChunkCache(tmp_path)
    cache.put("key", choice)
    assert cache.get("key") == choice and cache.get("other") is None
    assert list(cache.get("key").seconds_per_point) == [2, 8, 32, 4, 16]  # in the order tried
    cache.path.write_text(json.dumps({"key": {"max_batch": "eight"}}))
    assert cache.get("key") is None  # a damaged entry is measured again, not trusted
    cache.path.write_text("not json")
    assert cache.get("key") is None


def test_saved_bytes_grow_with_the_points_not_with_the_weights() -> None:
    net = nets.batchnorm_cnn()
    small, large = torch.randn(1, 3, 16, 16), torch.randn(1, 3, 32, 32)
    per_point = saved_bytes_per_point(net, small)
    assert per_point > 3 * 16 * 16 * 4  # at least the input itself
    assert 3.5 < saved_bytes_per_point(net, large) / per_point < 4.5  # activations scale with pixels


def test_chunk_choice_respects_limit_and_memory_budget() -> None:
    net = nets.groupnorm_cnn()
    sample = torch.randn(1, 3, 16, 16)
    heard: list[str] = []
    choice = choose_max_batch(net, sample, limit=8, report=heard.append)
    assert 2 <= choice.max_batch <= 8 and set(choice.seconds_per_point) <= {2, 4, 8}
    assert all(seconds > 0 for seconds in choice.seconds_per_point.values())
    sizes_heard = {int(step.removeprefix("measuring chunks of ").removesuffix(" again")) for step in heard}
    assert sizes_heard == set(choice.seconds_per_point)
    assert choice.search_seconds > 0 and choice.measured.endswith("Z") and choice.memory_cap == 8
    tight = choose_max_batch(net, sample, budget_bytes=3 * 2 * saved_bytes_per_point(net, sample))
    assert tight.memory_cap == 3 and tight.max_batch in (2, 3) and set(tight.seconds_per_point) <= {2, 3}


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


def test_busy_cores_are_seen_and_the_search_times_with_the_free_ones() -> None:
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        assert busy_cores_elsewhere(1.0) >= 0.7
        threads = torch.get_num_threads()
        choice = choose_max_batch(nets.groupnorm_cnn(), torch.randn(1, 3, 16, 16), limit=4)
        assert choice.busy_cores >= 0.5
        assert choice.search_threads == max(1, min(threads, len(os.sched_getaffinity(0)) - 1))
        assert torch.get_num_threads() == threads  # restored for serving
        assert "cores busy elsewhere, timed with" in choice.describe()
    finally:
        spinner.kill()
        spinner.wait()


@pytest.mark.parametrize("source", ["bit", "lanet", pytest.param("default", marks=pytest.mark.slow)])
def test_a_result_does_not_depend_on_the_chunk_the_search_picks(fixtures: Path, source: str) -> None:
    """Any chunk of 2 or more gives the same bytes (the search never picks 1 where 2
    fits), so where it lands on a busy or a quiet machine changes speed, not results."""
    model = {"bit": lambda: load_model(bit_path=fixtures / "bit-tiny.pth"),
             "lanet": lambda: load_model(lanet_path=fixtures / "lanet-tiny.pth"),
             "default": load_model}[source]()
    x = model.preprocess(Image.open(fixtures / "images" / "chelsea.png").convert("RGB"))
    # Chunks of 2, 5 and 13 and one of all points; 24 points leave no last chunk of 1 (which
    # takes another kernel path and rounds differently, as a chunk of 1 does).
    steps = 12 if source == "default" else 24
    chunks = [chunk for chunk in (2, 5, 13) if chunk < steps] + [steps + 2]
    results = [attribute(model.module, x, 3, n_steps=steps, max_batch=chunk) for chunk in chunks]
    for other in results[1:]:
        assert torch.equal(other.integrated_grads, results[0].integrated_grads)
        assert torch.equal(other.directional_grads, results[0].directional_grads)
