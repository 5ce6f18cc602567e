"""The compute worker in-process: out-of-memory retries and one bad request among many.

A GPU cannot run here, so device out-of-memory is played by a model that raises
PyTorch's own OutOfMemoryError for chunks above a size; everything else is real.
"""

from __future__ import annotations

import concurrent.futures
import weakref

import pytest
import torch
from torch import nn

import nets
from igd.engine.attribution import attribute
from igd.models import Preprocessing
from igd.models.registry import LoadedModel
from igd.worker import Attribute, ComputeFailed, PassCancelled, QueueFull, Worker, WorkerClosed


class Fragile(nn.Module):
    """Wraps a net; raises OOM above ``max_points`` points, and fails on poisoned inputs."""

    def __init__(self, net: nn.Module, max_points: int) -> None:
        super().__init__()
        self.net = net
        self.max_points = max_points

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > self.max_points:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        if torch.isinf(x).any():
            raise RuntimeError("poisoned input")
        return self.net(x)


def loaded(module: nn.Module) -> LoadedModel:
    return LoadedModel(
        module=module.eval(),
        preprocessing=Preprocessing((16, 16), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
        class_names=tuple(f"c{i}" for i in range(5)),
        name="test", family="test", description="test", source="memory", device=torch.device("cpu"),
    )


def job(x: torch.Tensor, target: int | None, n_steps: int = 6) -> Attribute:
    return Attribute(inputs=x.unsqueeze(0), baseline=torch.zeros_like(x).unsqueeze(0), target=target, n_steps=n_steps)


def test_out_of_memory_retries_with_smaller_chunks() -> None:
    net = nets.groupnorm_cnn()
    worker = Worker(loaded(Fragile(net, max_points=4)), max_batch=32)
    worker.start()
    x = nets.images(2)
    futures = [worker.submit(job(x[i], i)) for i in range(2)]
    results = [f.result(60) for f in futures]
    worker.close()
    worker.drain(5)
    assert worker.oom_retries >= 1 and worker.max_batch == 32  # lowered for those passes only
    for i, part in enumerate(results):
        alone = attribute(net, x[i : i + 1], i, n_steps=6)
        torch.testing.assert_close(part.attribution.integrated_grads[part.index], alone.integrated_grads[0])


class Hoarding(nn.Module):
    """Allocates a large activation, then runs out of memory above ``max_points``; records
    whether any earlier failed attempt's activation is still alive when a new one starts."""

    def __init__(self, net: nn.Module, max_points: int) -> None:
        super().__init__()
        self.net, self.max_points = net, max_points
        self.failed: list[weakref.ref[torch.Tensor]] = []
        self.alive_at_start: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.alive_at_start.append(sum(ref() is not None for ref in self.failed))
        activation = torch.empty(x.shape[0], 1 << 16)
        if x.shape[0] > self.max_points:
            self.failed.append(weakref.ref(activation))
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.net(x)


def test_retries_do_not_keep_the_failed_attempts_memory() -> None:
    """On a real GPU (tests/test_cuda.py) a retry held the failed pass's tensors through the
    exception's traceback, and ran out of memory even one point at a time."""
    model = Hoarding(nets.groupnorm_cnn(), max_points=3)
    worker = Worker(loaded(model), max_batch=32)
    x = nets.images(2)
    futures = [worker.submit(job(x[i], i)) for i in range(2)]  # one pass of two images first
    worker.start()
    assert all(f.result(60) for f in futures)
    worker.close()
    worker.drain(5)
    assert len(model.failed) >= 3 and worker.oom_retries >= 2
    assert set(model.alive_at_start) == {0}, model.alive_at_start


def test_out_of_memory_at_one_point_is_an_internal_error() -> None:
    worker = Worker(loaded(Fragile(nets.groupnorm_cnn(), max_points=0)), max_batch=8)
    worker.start()
    future = worker.submit(job(nets.images(1)[0], 0))
    with pytest.raises(ComputeFailed) as error:
        future.result(60)
    assert error.value.reason == "out_of_memory" and "out of memory" in str(error.value)
    worker.close()
    worker.drain(5)


def test_one_failing_image_does_not_fail_its_batch_mates() -> None:
    net = nets.groupnorm_cnn()
    worker = Worker(loaded(Fragile(net, max_points=10_000)), max_batch=64, max_images=8)
    x = nets.images(4)
    poisoned = x.clone()
    poisoned[2, 0, 0, 0] = float("inf")
    futures = [worker.submit(job(poisoned[i], 1)) for i in range(4)]  # queued before the thread starts
    worker.start()
    done, _ = concurrent.futures.wait(futures, timeout=60)
    assert len(done) == 4
    with pytest.raises(ComputeFailed):
        futures[2].result()
    assert worker.split_passes == 1  # the shared pass failed, was logged and rerun image by image
    for i in (0, 1, 3):
        part = futures[i].result()
        alone = attribute(net, x[i : i + 1], 1, n_steps=6)
        torch.testing.assert_close(part.attribution.integrated_grads[part.index], alone.integrated_grads[0])
    worker.close()
    worker.drain(5)


def test_pass_memory_budget_limits_images_per_pass() -> None:
    x = nets.images(1)[0]
    per_image = job(x, 0).result_bytes()
    assert per_image == 2 * 6 * 3 * 16 * 16 * 4
    worker = Worker(loaded(nets.groupnorm_cnn()), max_batch=64, max_images=8, max_pass_bytes=3 * per_image)
    jobs = [job(x, 0) for _ in range(7)]
    futures = [worker.submit(j) for j in jobs]
    worker.start()
    concurrent.futures.wait(futures, timeout=60)
    assert [j.batch_size for j in jobs] == [3, 3, 3, 3, 3, 3, 1]
    assert worker.batch_sizes == {3: 2, 1: 1}
    # each job of a shared pass gets its own rows: one answered request frees its memory alone
    assert all(f.result().attribution.inputs.shape[0] == 1 and f.result().index == 0 for f in futures)
    worker.close()
    worker.drain(5)


def test_queue_limit_and_closing() -> None:
    worker = Worker(loaded(nets.groupnorm_cnn()), max_batch=8, queue_size=2)  # not started: nothing runs
    x = nets.images(1)[0]
    worker.submit(job(x, 0))
    worker.submit(job(x, 0))
    with pytest.raises(QueueFull):
        worker.submit(job(x, 0))
    worker.close()
    with pytest.raises(WorkerClosed):
        worker.submit(job(x, 0))
    assert worker.drain(0.1) == 2  # nothing ran them: both rejected


def test_a_pass_whose_jobs_are_all_cancelled_stops_at_the_next_chunk() -> None:
    heard: list[tuple[str, int]] = []

    class CancelOnFirstProgress:
        def queued(self, ahead: int) -> None:
            heard.append(("queued", ahead))

        def progress(self, done: int, total: int) -> None:
            heard.append(("progress", done))
            doomed.cancel()  # the client leaves as soon as the pass has begun

    worker = Worker(loaded(nets.groupnorm_cnn()), max_batch=4)
    doomed = job(nets.images(1)[0], 0, n_steps=400)
    doomed.listener = CancelOnFirstProgress()
    future = worker.submit(doomed)
    worker.start()
    with pytest.raises(PassCancelled, match="after 8 of 400 path points"):
        future.result(60)
    assert heard == [("queued", 0), ("progress", 4)]
    assert worker.submit(job(nets.images(1)[0], 0)).result(60).attribution.n_steps == 6  # still serving
    worker.close()
    worker.drain(5)


class Overflowing(nn.Module):
    """A net whose logits overflow to infinity for inputs with a large first pixel."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = torch.where(x[:, :1, :1, :1].flatten(1) > 100, torch.tensor(1e38), torch.tensor(1.0))
        return self.net(x) * scale * 1e3


def test_a_non_finite_attribution_is_an_error_not_a_result() -> None:
    worker = Worker(loaded(Overflowing(nets.groupnorm_cnn())), max_batch=64, max_images=8)
    x = nets.images(3)
    x[1, 0, 0, 0] = 1000.0  # only this image overflows
    futures = [worker.submit(job(x[i], 1)) for i in range(3)]  # one shared pass
    worker.start()
    with pytest.raises(ComputeFailed) as error:
        futures[1].result(60)
    assert error.value.reason == "non_finite" and "not finite" in str(error.value)
    for i in (0, 2):
        part = futures[i].result(60)
        assert torch.isfinite(part.attribution.integrated_grads[part.index]).all()
    worker.close()
    worker.drain(5)
