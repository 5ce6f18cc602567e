from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


def fixtures_dir() -> Path:
    """`$IGD_FIXTURES`, else `../shared/fixtures` beside the repository."""
    configured = os.environ.get("IGD_FIXTURES")
    path = Path(configured) if configured else Path(__file__).resolve().parents[2] / "shared" / "fixtures"
    return path


@pytest.fixture(scope="session")
def fixtures() -> Path:
    """The reference fixtures; a missing directory skips locally and fails in CI."""
    path = fixtures_dir()
    if not path.is_dir():
        message = f"reference fixtures not found at {path} (set IGD_FIXTURES)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


def require_tool(name: str) -> str:
    """The path of a system tool a test needs; skips locally, fails in CI when missing
    (.ci/run installs socat and systemd's tools)."""
    import shutil

    path = shutil.which(name)
    if path is None:
        message = f"{name} is not installed (Debian: apt-get install {'socat' if name == 'socat' else 'systemd'})"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path
