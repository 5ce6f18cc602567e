from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Iterator

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from daemon import Igd, short_tempdir  # noqa: E402
from nets import write_slow_model  # noqa: E402
from reference import assemble  # noqa: E402

# Chunk sizes measured by the daemons of this run are cached here, not in the user's cache.
os.environ["IGD_CACHE_DIR"] = tempfile.mkdtemp(prefix="igd-test-cache-")

# What the hardening tests tried, reported at the end of the run (and in the README).
_HARDENING: dict[str, int] = {}

# Tests that could not run for want of a system tool: listed at the end of the run.
_MISSING_TOOLS: dict[str, list[str]] = {}


@pytest.fixture(scope="session")
def fixtures(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every reference fixture in one directory: tests/fixtures/ plus the BiT checkpoint,
    rebuilt once per session from its fill rule (see tests/reference.py)."""
    return assemble(tmp_path_factory.mktemp("fixtures"))


@pytest.fixture(scope="session")
def lanet(fixtures: Path) -> Iterator[Igd]:
    """A daemon serving LaNet-tiny with a fixed chunk: answers of separate requests are
    comparable to the bit. One for the whole run, shared by every module that asks for it
    (its tests only send it requests; a test that stops, signals or reconfigures a daemon
    starts its own)."""
    with Igd("-lp", str(fixtures / "lanet-tiny.pth"), "--max-batch", "10") as igd:
        yield igd


@pytest.fixture(scope="session")
def bit_tiny(fixtures: Path) -> Iterator[Igd]:
    """A daemon serving the BiT fixture with a fixed chunk of 16, one for the whole run,
    shared like ``lanet``: for tests that only send it requests."""
    with Igd("-bp", str(fixtures / "bit-tiny.pth"), "--max-batch", "16") as igd:
        yield igd


@pytest.fixture
def workdir() -> Iterator[Path]:
    """A short temporary directory (socket paths must stay under ~107 bytes)."""
    path = short_tempdir()
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def slow_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A TorchScript model whose requests can be made to last seconds (tests/nets.py);
    serve it with daemon.SLOW_MODEL_OPTIONS and size requests with daemon.steps_lasting."""
    return write_slow_model(tmp_path_factory.mktemp("slow-model"))


def require_tool(name: str, request: pytest.FixtureRequest | None = None, package: str = "systemd") -> str:
    """The path of a system tool a test needs (from the Debian ``package``). Missing: the
    test fails under CI (.ci/run installs systemd's tools and chromium); elsewhere it is
    skipped and named in a warning at the end of the run, so that nobody mistakes a skipped
    test for a passed one."""
    path = shutil.which(name)
    if path is None:
        message = f"{name} is not installed (Debian: apt-get install {package})"
        if os.environ.get("CI"):
            pytest.fail(message)
        test = os.environ.get("PYTEST_CURRENT_TEST", "?").split(" ")[0]
        _MISSING_TOOLS.setdefault(message, []).append(test)
        pytest.skip(message)
    return path


DAEMON_OUTCOME = "each answered properly, the daemon serving exactly after"
READER_OUTCOME = "each read or refused in one line, within the reader's limits"


def record_hardening(what: str, count: int, outcome: str = DAEMON_OUTCOME) -> None:
    """Count ``count`` more cases of ``what`` for the summary at the end of the run."""
    _HARDENING[(what, outcome)] = _HARDENING.get((what, outcome), 0) + count


def pytest_sessionfinish(session: pytest.Session) -> None:
    """In a pytest-xdist worker: hand what this worker counted to the controller."""
    out = getattr(session.config, "workeroutput", None)
    if out is not None:
        out["hardening"] = [[what, outcome, count] for (what, outcome), count in _HARDENING.items()]
        out["missing_tools"] = _MISSING_TOOLS


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error) -> None:  # noqa: ANN001 (pytest-xdist's hook)
    """In the controller of a pytest-xdist run: add up what each worker counted."""
    out = getattr(node, "workeroutput", {})
    for what, outcome, count in out.get("hardening", []):
        _HARDENING[(what, outcome)] = _HARDENING.get((what, outcome), 0) + count
    for message, tests in out.get("missing_tools", {}).items():
        _MISSING_TOOLS.setdefault(message, []).extend(tests)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if _HARDENING:
        terminalreporter.section("hardening")
        for (what, outcome), count in _HARDENING.items():
            terminalreporter.write_line(f"{count:,} {what}, {outcome}")
    if not _MISSING_TOOLS:
        return
    terminalreporter.section("TESTS NOT RUN: system tools missing", sep="!", red=True, bold=True)
    for message, tests in _MISSING_TOOLS.items():
        terminalreporter.write_line(f"{message}: {len(tests)} test(s) did not run", red=True, bold=True)
        for test in tests:
            terminalreporter.write_line(f"    {test}")
