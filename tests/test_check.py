"""`igd check`: loads a model as the daemon would, classifies, attributes, reports."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from daemon import IGD


def igd_check(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([IGD, "check", *args], capture_output=True, text=True, timeout=600)


def fields(stdout: str) -> dict[str, str]:
    return {line[:12].strip(): line[12:].strip() for line in stdout.splitlines() if line[:12].strip()}


@pytest.mark.slow  # the full-size default model and its chunk search
def test_default_model(tmp_path: Path) -> None:
    out = igd_check("--steps", "20", "--cpu")
    assert out.returncode == 0, out.stderr
    report = fields(out.stdout)
    assert report["model"].startswith("efficientnet-lite0: EfficientNet-Lite0 pretrained on ImageNet-1k")
    assert report["device"] == "cpu"
    assert report["classes"].startswith("1000: tench")
    top_class = report["top-5"].split(" (")[0]
    assert top_class in {"tiger cat", "Egyptian cat", "tabby"}
    assert "estimated error" in report["accuracy"] and "completeness gap" in report["accuracy"]
    assert "warm-up" in report["timings"]
    assert "(measured)" in report["attribution"] or "(cached)" in report["attribution"]
    assert out.stdout.rstrip().endswith("ok")


@pytest.mark.slow  # an igd check run of its own
def test_tolerance(fixtures: Path) -> None:
    out = igd_check("-bp", str(fixtures / "bit-tiny.pth"), "--tolerance", "0.05", "--max-batch", "16",
                    "--baseline", "black")
    assert out.returncode == 0, out.stderr
    report = fields(out.stdout)
    assert " adaptive steps" in report["attribution"]
    assert "(meets the tolerance 0.05)" in report["accuracy"]


@pytest.mark.slow  # an igd check run per model, 50 steps
@pytest.mark.parametrize("flag,family", [("-bp", "bit"), ("-lp", "lanet")])
def test_fixture_checkpoints(fixtures: Path, flag: str, family: str) -> None:
    image = fixtures / "images" / "chelsea.png"
    out = igd_check(flag, str(fixtures / f"{family}-tiny.pth"), "--image", str(image), "--max-batch", "25")
    report = fields(out.stdout)
    gap = float(re.search(r"completeness gap ([+-][\d.]+)%", report["accuracy"]).group(1))
    if abs(gap) > 50:  # BiT from the zero baseline (scale-invariant): its IG is not to be trusted, and check says so
        assert out.returncode == 1 and "ok" not in out.stdout.split()
        assert f"the completeness gap of the attribution is {gap:+.0f}%, beyond 50%" in out.stderr, out.stderr
    else:
        assert out.returncode == 0 and out.stdout.rstrip().endswith("ok"), out.stderr
    assert family == "lanet" or abs(gap) > 50  # the tiny BiT fixture's gap is several times the rise
    assert report["model"].startswith(f"{family}-")
    assert report["classes"].startswith("10: airplane, automobile, bird, cat")
    assert report["input"].startswith("3x32x32") and report["input from"] == "built-in"
    assert report["image"] == f"{image} (451x300)"
    assert "chunks of 25 (given)" in report["attribution"]
    assert report["chunk search"] == "given with --max-batch"


@pytest.mark.slow  # two igd check runs, one a chunk search (30 s or more)
def test_the_chunk_search_is_shown_and_a_second_start_reuses_it(fixtures: Path) -> None:
    checkpoint = str(fixtures / "lanet-tiny.pth")
    measured = fields(igd_check("-lp", checkpoint, "--steps", "8", "--max-batch", "measure").stdout)
    chunk = re.search(r"chunks of (\d+) \(measured\)", measured["attribution"])
    assert chunk, measured
    search = re.fullmatch(r"sizes ((?:\d+, )*\d+) at ((?:\d+, )*\d+) ms per point; memory cap (\d+); "
                          r"search ([\d.]+) s(; [\d.]+ cores busy elsewhere, timed with \d+ threads)?",
                          measured["chunk search"])
    assert search, measured["chunk search"]
    sizes = [int(size) for size in search.group(1).split(", ")]
    assert sizes[0] == 2 and int(chunk.group(1)) in sizes and max(sizes) <= int(search.group(3))
    cached = fields(igd_check("-lp", checkpoint, "--steps", "8").stdout)
    assert f"chunks of {chunk.group(1)} (cached)" in cached["attribution"]
    assert cached["chunk search"].startswith(measured["chunk search"] + ", 20")  # and when it was measured


@pytest.mark.slow  # four igd check runs
def test_problems_exit_non_zero_with_one_clear_line(fixtures: Path, tmp_path: Path) -> None:
    bad = tmp_path / "model.pth"
    bad.write_text("not a checkpoint")
    out = igd_check("-bp", str(bad))
    assert out.returncode == 1
    assert out.stderr.strip() == f"Error: {bad}: not a PyTorch checkpoint"
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    out = igd_check("-bp", str(fixtures / "bit-tiny.pth"), "--image", str(text))
    assert out.returncode == 1 and "is not a JPEG, PNG, WebP, GIF, BMP or TIFF image" in out.stderr
    out = igd_check("--cuda", "--device", "cpu")
    assert out.returncode == 2 and "--cuda contradicts --device cpu" in out.stderr
    out = igd_check("--max-batch", "zero")
    assert out.returncode == 2 and "'auto', 'measure' or a positive number" in out.stderr
