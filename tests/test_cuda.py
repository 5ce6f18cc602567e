"""On a CUDA device: the engine, the checkpoints and the daemon where GPU users run them.

CI has no GPU, so these are marked ``cuda`` and left out of `make test`; `make test-cuda`
runs them (bench/device_check.sh does, on a lent GPU). ``IGD_TEST_DEVICE=cpu`` runs the
same checks on the CPU, to test the tests. ``IGD_TEST_REPORT=file`` appends the measured
deviations there as JSON lines.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from captum.attr import IntegratedGradients
from PIL import Image

from daemon import Igd
from reference import read_result
from igd.engine.attribution import attribute, strict_float32
from igd.models import lanet, load_model
from igd.worker import Attribute, Worker

pytestmark = pytest.mark.cuda
DEVICE = os.environ.get("IGD_TEST_DEVICE", "cuda")
TIGER_CAT = 282


@pytest.fixture(scope="module", autouse=True)
def device_present() -> None:
    if DEVICE.startswith("cuda") and not torch.cuda.is_available():
        pytest.fail("no CUDA device here: run these where one is (or set IGD_TEST_DEVICE=cpu)")


def record(check: str, **values: Any) -> None:
    report = os.environ.get("IGD_TEST_REPORT")
    if report:
        with open(report, "a", encoding="utf-8") as fobj:
            fobj.write(json.dumps({"check": check, "device": DEVICE, **values}) + "\n")


def rel_l2(actual: torch.Tensor | np.ndarray, expected: torch.Tensor | np.ndarray) -> float:
    a, e = torch.as_tensor(actual).double().cpu(), torch.as_tensor(expected).double().cpu()
    return float((a - e).norm() / e.norm())


@pytest.fixture(scope="module")
def chelsea(fixtures: Path) -> Path:
    return fixtures / "images" / "chelsea.jpg"


@pytest.fixture(scope="module")
def default_on_cpu(chelsea: Path) -> dict[str, Any]:
    """The default model's IG on the CPU in float64 (the reference) and float32.

    IG of a ReLU6 network is sensitive to rounding: float32 on the CPU is already about
    1.5e-3 (relative L2) from float64, because path points near an activation's kink
    flip with the last bits. A GPU's float32 kernels round differently, so the fair
    test of a device is its distance to float64 against the CPU's.
    """
    model = load_model(device="cpu")
    x = model.preprocess(Image.open(chelsea).convert("RGB"))
    float64 = attribute(copy.deepcopy(model.module).double(), x.double(), TIGER_CAT, n_steps=32, max_batch=16)
    float32 = attribute(model.module, x, TIGER_CAT, n_steps=32, max_batch=16)
    return {"float64": float64, "float32_error": rel_l2(float32.integrated_grads, float64.integrated_grads)}


def within_float32_noise(error: float, cpu_error: float) -> bool:
    """A device's float32 IG is as good as the CPU's up to a small factor."""
    return error < 5 * max(cpu_error, 1e-4)


def test_engine_matches_captum_and_float64(chelsea: Path, default_on_cpu: dict[str, Any]) -> None:
    model = load_model(device=DEVICE)
    x = model.preprocess(Image.open(chelsea).convert("RGB"))
    ours = attribute(model.module, x, TIGER_CAT, n_steps=32, max_batch=16)
    with strict_float32():
        theirs = IntegratedGradients(model.module).attribute(x, target=TIGER_CAT, n_steps=32, internal_batch_size=16)
    double = attribute(copy.deepcopy(model.module).double(), x.double(), TIGER_CAT, n_steps=32, max_batch=16)
    reference = default_on_cpu["float64"].integrated_grads
    vs_captum = rel_l2(ours.integrated_grads, theirs)
    float64_vs_cpu = rel_l2(double.integrated_grads, reference)  # the same function, computed exactly
    float32_error = rel_l2(ours.integrated_grads, reference)
    record("engine", ig_vs_captum=vs_captum, float64_vs_cpu_float64=float64_vs_cpu, float32_vs_float64=float32_error,
           cpu_float32_vs_float64=default_on_cpu["float32_error"])
    assert ours.integrated_grads.device.type == torch.device(DEVICE).type
    assert vs_captum < 1e-5 and float64_vs_cpu < 1e-9
    assert within_float32_noise(float32_error, default_on_cpu["float32_error"])


def test_tf32_reaches_the_kernels_and_is_undone(chelsea: Path, default_on_cpu: dict[str, Any]) -> None:
    """TF32 is opt-in because it moves IG far more than float32 rounding does."""
    model = load_model(device=DEVICE)
    x = model.preprocess(Image.open(chelsea).convert("RGB"))
    before = attribute(model.module, x, TIGER_CAT, n_steps=32, max_batch=16).integrated_grads
    fast = attribute(model.module, x, TIGER_CAT, n_steps=32, max_batch=16, allow_tf32=True).integrated_grads
    after = attribute(model.module, x, TIGER_CAT, n_steps=32, max_batch=16).integrated_grads
    moved, strict_spread = rel_l2(fast, before), rel_l2(after, before)
    record("tf32", ig_vs_float32=moved, tf32_vs_float64=rel_l2(fast, default_on_cpu["float64"].integrated_grads),
           float32_twice=strict_spread)
    if DEVICE.startswith("cuda"):
        assert moved > 0, "TF32 changed nothing: the switch did not reach the kernels"
        assert strict_spread < 0.1 * moved, "strict float32 after a TF32 call still looks like TF32"
    else:
        assert moved == 0 and strict_spread == 0


@pytest.mark.parametrize("family", ["bit", "lanet"])
def test_fixture_checkpoints_through_the_daemon(fixtures: Path, workdir: Path, family: str) -> None:
    """The predecessor's checkpoints, served on the device, give the original code's results."""
    reference = np.load(fixtures / f"{family}-tiny.reference.npz")
    with Igd(f"--{family}-path", str(fixtures / f"{family}-tiny.pth"), "--device", DEVICE) as igd:
        out = igd.igctl("attribute", str(fixtures / "images" / "chelsea.png"), "cat", "-o", str(workdir / "r.gzip"))
        assert out.returncode == 0, out.stderr
        status = json.loads(igd.igctl("status", "--json").stdout)
    assert status["device"].startswith(DEVICE) and status["precision"] == "float32"
    result = read_result(workdir / "r.gzip")
    deviations = {key: rel_l2(result[key].numpy(), reference[ref]) for key, ref in [
        ("integrated_grads", "integrated_grads"), ("integrated_directional_grads", "integrated_directional_grads"),
        ("intermediates", "intermediates"), ("output", "logits")]}
    record(f"fixture-{family}", max_batch=status["batching"]["max_batch_points"], **deviations)
    # The same inputs and logits; gradients within float32's sensitivity on these nets
    # (LaNet's per-step gradients move by ~1e-3 between the CPU's float32 and float64).
    assert deviations["intermediates"] < 1e-6 and deviations["output"] < 1e-5, deviations
    assert deviations["integrated_grads"] < 5e-3 and deviations["integrated_directional_grads"] < 1e-2, deviations


def test_default_model_through_the_daemon_in_both_precisions(chelsea: Path, workdir: Path,
                                                             default_on_cpu: dict[str, Any]) -> None:
    results = {}
    for precision in ("float32", "tf32"):
        with Igd("--device", DEVICE, "--precision", precision) as igd:
            out = igd.igctl("attribute", str(chelsea), "tiger cat", "--steps", "32", "-o", str(workdir / f"{precision}.gzip"))
            assert out.returncode == 0, out.stderr
            status = json.loads(igd.igctl("status", "--json").stdout)
            assert status["precision"] == precision
            if precision == "tf32" and DEVICE.startswith("cuda"):
                assert "event=precision" in igd.log() and "ig_deviation=" in igd.log()
        results[precision] = read_result(workdir / f"{precision}.gzip")["integrated_grads"]
        if DEVICE.startswith("cuda"):
            assert status["memory"]["cuda_peak_allocated_bytes"] > 0
    reference = default_on_cpu["float64"].integrated_grads
    strict, fast = rel_l2(results["float32"], reference), rel_l2(results["tf32"], reference)
    record("daemon-default", float32_vs_float64=strict, tf32_vs_float64=fast)
    assert within_float32_noise(strict, default_on_cpu["float32_error"])
    if DEVICE.startswith("cuda"):
        assert fast > strict


def full_size_lanet_checkpoint(directory: Path) -> Path:
    """LaNet C=128, 24 layers, random weights with BatchNorm statistics calibrated on noise
    (the init statistics overflow to inf through 24 cells), in the predecessor's format."""
    torch.manual_seed(0)
    net = lanet.NetworkCIFAR(128, 10, 24, auxiliary=True).to(DEVICE)
    for module in net.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None
    net.train()
    with torch.no_grad():
        for _ in range(4):
            net(torch.randn(16, 3, 32, 32, device=DEVICE))
    path = directory / "lanet-c128-l24.pth"
    torch.save({"epoch": 0, "model_state_dict": net.eval().cpu().state_dict()}, path)
    return path


def test_full_size_lanet_serves_eight_concurrent_images(fixtures: Path, workdir: Path) -> None:
    checkpoint = full_size_lanet_checkpoint(workdir)
    base = Image.open(fixtures / "images" / "chelsea.png").convert("RGB")
    images = []
    for i, variant in enumerate([base, base.rotate(15), base.transpose(Image.Transpose.FLIP_LEFT_RIGHT),
                                 base.crop((40, 0, 340, 300)), base.rotate(-20), base.convert("L").convert("RGB"),
                                 base.crop((0, 0, 300, 300)), base.rotate(90, expand=True)]):
        path = workdir / f"img{i}.png"
        variant.save(path)
        images.append(path)
    listing = "".join(f"{p}\n" for p in images).encode()
    with Igd("-lp", str(checkpoint), "--device", DEVICE) as igd:
        together = igd.igctl("attribute", "--files-from", "-", "--target", "cat", "--jobs", "8",
                             "--out-dir", str(workdir / "together"), input=listing)
        assert together.returncode == 0, together.stderr
        status = json.loads(igd.igctl("status", "--json").stdout)
        alone = []
        for path in images:
            out = igd.igctl("attribute", str(path), "cat", "-o", str(workdir / f"{path.stem}-alone.gzip"))
            assert out.returncode == 0, out.stderr
            alone.append(read_result(workdir / f"{path.stem}-alone.gzip"))
    batching = status["batching"]
    assert status["requests"]["failed"] == 0 and status["requests"]["served"] >= 8
    assert batching["oom_retries"] == 0, batching
    deviations = []
    for path, single in zip(images, alone):
        shared = read_result(workdir / "together" / f"{path.stem}.gzip")
        assert torch.isfinite(shared["integrated_grads"]).all()
        deviations.append(rel_l2(shared["integrated_grads"], single["integrated_grads"]))
    record("lanet-full-8", largest_batch=batching["largest_batch"], batch_sizes=batching["batch_sizes"],
           max_batch=batching["max_batch_points"], max_deviation=max(deviations),
           cuda_peak_gib=status["memory"].get("cuda_peak_allocated_bytes", 0) / 2**30)
    assert batching["largest_batch"] > 1, batching
    assert max(deviations) < 1e-3, deviations


@pytest.mark.skipif(not DEVICE.startswith("cuda"), reason="a real CUDA out-of-memory needs a CUDA device")
def test_out_of_memory_retries_with_smaller_chunks(chelsea: Path) -> None:
    """A real CUDA OOM: the process may use too little memory for chunks of 50 points.
    Two queued images OOM together, then run alone, each retrying in smaller chunks."""
    device = torch.device(DEVICE).index or 0
    model = load_model(device=DEVICE)
    x = model.preprocess(Image.open(chelsea).convert("RGB"))
    reference = attribute(model.module, x, TIGER_CAT, n_steps=50, max_batch=5).integrated_grads.cpu()

    def peak(chunk: int) -> int:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        attribute(model.module, x, TIGER_CAT, n_steps=50, max_batch=chunk)
        return torch.cuda.max_memory_allocated(device) - before

    small, large = peak(5), peak(50)
    allowed = torch.cuda.memory_allocated(device) + small + 0.4 * (large - small)
    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(device).total_memory
    worker = Worker(model, max_batch=50)
    jobs = [Attribute(inputs=x.cpu(), baseline=torch.zeros_like(x.cpu()), target=TIGER_CAT, n_steps=50) for _ in range(2)]
    torch.cuda.set_per_process_memory_fraction(allowed / total, device)
    try:
        for job in jobs:
            worker.submit(job)  # both queued before the thread starts: one pass of two images
        worker.start()
        results = [job.future.result(timeout=300) for job in jobs]
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, device)
        worker.close()
        worker.join(60)
    deviations = [rel_l2(r.attribution.integrated_grads[r.index], reference) for r in results]
    record("oom-retry", oom_retries=worker.oom_retries, peak_5_mib=small / 2**20, peak_50_mib=large / 2**20,
           deviations=deviations)
    assert worker.oom_retries >= 2 and all(size == 1 for size in worker.batch_sizes), worker.stats()
    assert max(deviations) < 1e-5
