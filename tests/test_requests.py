"""One request path: the same options get the same decision and the same message from the
daemon (wire), igctl and `igd batch` (igd/request.py is their one definition)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from daemon import IGCTL, IGD, Igd, short_tempdir
from igd import request as spec
from wire import WireClient

# (wire arguments, the problem; None: accepted). Every entry point names the option its own
# way (args.n_steps, --steps); what follows the name must be the same.
CASES = [
    ({"n_steps": 4}, None),
    ({"n_steps": 4, "method": "riemann_trapezoid"}, None),
    ({"n_steps": 4, "baseline": "blur", "blur_sigma": 1.5}, None),
    ({"n_steps": 4, "baseline": "uniform", "seed": 7, "format": "npz", "gzip_level": 9}, None),
    ({"n_steps": 0}, "must be between 1 and 1024, got 0"),
    ({"n_steps": 5000}, "must be between 1 and 1024, got 5000"),
    ({"n_steps": 1, "method": "riemann_left"}, "must be at least 2 for riemann_left, got 1"),
    ({"method": "simpson"}, "must be one of gausslegendre, riemann_left, riemann_right, riemann_middle, "
                            "riemann_trapezoid, got 'simpson'"),
    ({"baseline": "grey"}, "must be one of zero, black, white, blur, uniform, got 'grey'"),
    ({"baseline": "blur", "blur_sigma": -1.0}, "must be between 0 and 1000, got -1"),
    ({"gzip_level": 10}, "must be between 0 and 9, got 10"),
    ({"format": "png"}, "must be one of torch, npz, got 'png'"),
    ({"tolerance": 0.05, "n_steps": 40}, None),
    ({"tolerance": 0.0}, "must be between 0.0001 and 1, got 0"),
    ({"tolerance": 2}, "must be between 0.0001 and 1, got 2"),
    ({"tolerance": 0.05, "method": "riemann_left"}, "cannot be given with a tolerance, which places the points itself"),
    ({"tolerance": 0.05, "n_steps": 8}, "must be at least 18 with a tolerance (its first look along the path and its ends), got 8"),
]


def problem_of(message: str, args: dict) -> str:
    """The message without the option's name, which each entry point writes its own way."""
    for name in args:
        option = spec.BY_NAME[name]
        for label in (f"args.{name} ", f"{option.flag} "):
            if message.startswith(label):
                return message[len(label):]
    raise AssertionError(f"{message!r} names none of {list(args)}")


def flags(args: dict) -> list[str]:
    return [part for name, value in args.items() for part in (spec.BY_NAME[name].flag, str(value))]


def usage_error(stderr: str) -> str:
    return stderr.strip().splitlines()[-1].removeprefix("Error: ")


@pytest.fixture(scope="module")
def setting(fixtures: Path, bit_tiny: Igd):
    work = short_tempdir()
    (work / "in").mkdir()
    shutil.copy(fixtures / "images" / "chelsea.png", work / "in" / "cat.png")
    yield bit_tiny, work, fixtures  # the session's BiT daemon (conftest): -bp bit-tiny.pth --max-batch 16
    shutil.rmtree(work, ignore_errors=True)


# An accepted case runs a whole `igd batch` (torch, the model, the pass): slow; a refused one
# is refused before torch is imported.
@pytest.mark.parametrize("args, problem", [
    pytest.param(args, problem, id=str(i), marks=[pytest.mark.slow] if problem is None else [])
    for i, (args, problem) in enumerate(CASES)])
def test_one_decision_and_message_everywhere(setting: tuple, args: dict, problem: str | None) -> None:
    igd, work, fixtures = setting
    image = work / "in" / "cat.png"
    with WireClient(str(igd.socket)) as client:
        wire = client.call("attribute", {"image": image.read_bytes(), "target": "cat", **args})
    run = subprocess.run([IGCTL, "--socket", str(igd.socket), "attribute", str(image), "cat", "-o", "-", *flags(args)],
                         capture_output=True, text=True, errors="replace", timeout=120)
    out = work / f"batch-{abs(hash(str(args)))}"
    batch = subprocess.run([IGD, "batch", str(work / "in"), str(out), "-bp", str(fixtures / "bit-tiny.pth"),
                            "--max-batch", "16", "-t", "cat", *flags(args)], capture_output=True, text=True, timeout=300)
    if problem is None:
        assert wire["ok"], wire
        assert run.returncode == 0, run.stderr
        assert batch.returncode == 0, batch.stderr
        return
    assert not wire["ok"] and wire["error"]["code"] == "bad_request"
    assert wire["error"]["details"]["arg"] in args
    assert problem_of(wire["error"]["message"], args) == problem
    assert run.returncode == 2 and problem_of(usage_error(run.stderr), args) == problem
    if "format" in args:  # batch also writes parquet, so its list of formats is longer
        assert batch.returncode == 2 and "--format must be one of torch, npz, parquet, got 'png'" in batch.stderr
        return
    assert batch.returncode == 2 and problem_of(usage_error(batch.stderr), args) == problem
    assert not out.exists()  # refused before anything was loaded or written
