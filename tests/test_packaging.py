"""The installed distribution: console scripts, and the torch-free import surface."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent


def modules_after_import(statement: str) -> set[str]:
    code = f"import sys; {statement}; print('\\n'.join(sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return set(out.stdout.split())


@pytest.mark.parametrize("statement", ["import igd", "import igd.protocol", "import igctl", "import igctl.cli"])
def test_light_imports_pull_in_neither_torch_nor_numpy(statement: str) -> None:
    loaded = modules_after_import(statement)
    assert "torch" not in loaded
    assert "numpy" not in loaded


@pytest.mark.parametrize("script", ["igd", "igctl"])
def test_console_scripts_are_installed(script: str) -> None:
    out = subprocess.run([str(BIN / script), "--version"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert script in out.stdout
