"""`igd serve --compile`: torch.compile (inductor) compiles a real model at start-up; its
results say so and stay close to the eager reference (not exact: other kernels)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from daemon import Igd
from reference import read_result


@pytest.mark.slow  # torch.compile at start-up: a minute or more
def test_a_compiled_daemon_answers_close_to_eager_and_says_it_was_compiled(fixtures: Path, tmp_path: Path) -> None:
    reference = np.load(fixtures / "lanet-tiny.reference.npz")  # eager, from the original code
    with Igd("-lp", str(fixtures / "lanet-tiny.pth"), "--compile", "--max-batch", "10", ready_timeout=900) as igd:
        out = igd.igctl("attribute", str(fixtures / "images" / "chelsea.png"), "cat", "--steps", "50", "-o",
                        str(tmp_path / "r.gzip"), timeout=900)
        assert out.returncode == 0, out.stderr
        assert "cpu, compiled (inductor)" in igd.igctl("status").stdout.decode()
        logged = re.search(r"event=compiled compiler=inductor seconds=([\d.]+) ig_deviation=(\S+)", igd.log())
        assert logged, igd.log()[-2000:]
        assert "compiler=inductor" in re.search(r"event=warmed_up .*", igd.log()).group(0)
    result = read_result(tmp_path / "r.gzip")
    assert result["compiler"] == "inductor" and result["chunk_source"] == "given"
    ours, theirs = result["integrated_grads"].numpy(), reference["integrated_grads"]
    moved = float(np.linalg.norm(ours - theirs) / np.linalg.norm(theirs))
    assert 0 <= float(logged.group(2)) < 1e-2 and moved < 1e-2, (logged.group(2), moved)
    np.testing.assert_allclose(result["output"].numpy(), reference["logits"], rtol=1e-4, atol=1e-5)
