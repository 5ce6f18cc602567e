"""Start a real `igd serve` process for end-to-end tests, and talk to it.

Readiness comes the way systemd gets it: the test listens on a NOTIFY_SOCKET and waits
for READY=1. Sockets live in short /tmp directories (AF_UNIX paths are limited to 107
bytes, which pytest's tmp_path can exceed).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, TypeVar

T = TypeVar("T")

BIN = Path(sys.executable).parent


def _script(name: str) -> str:
    """The console script next to this Python (a venv), else the one on PATH."""
    beside = BIN / name
    return str(beside) if beside.exists() else shutil.which(name) or name


IGD = _script("igd")
IGCTL = _script("igctl")


def short_tempdir() -> Path:
    return Path(tempfile.mkdtemp(prefix="igd-", dir="/tmp"))


def wait_until(condition: Callable[[], T], timeout: float, what: str, *, process: subprocess.Popen | None = None,
               log: Callable[[], str] | None = None, interval: float = 0.05) -> T:
    """Poll ``condition()`` until it returns something true, and return that. Fails the
    test after ``timeout`` seconds, or at once when ``process`` has exited, with ``what``
    (what was waited for) and ``log()`` (e.g. the daemon's) in the message."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if process is not None and process.poll() is not None:
            problem = f"the process exited with {process.returncode} first"
        elif time.monotonic() >= deadline:
            problem = f"not within {timeout:g} s"
        else:
            time.sleep(interval)
            continue
        raise AssertionError(f"waited for {what}: {problem}" + (f"\n{log()}" if log else ""))


class NotifyListener:
    """A NOTIFY_SOCKET that records what the service manager would receive."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / "notify"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(self.path))
        self.messages: list[str] = []

    def wait_for(self, assignment: str, timeout: float, process: subprocess.Popen | None = None) -> list[str]:
        """Collect datagrams until one holds ``assignment`` (e.g. READY=1)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(assignment in m.splitlines() for m in self.messages):
                return self.messages
            if process is not None and process.poll() is not None:
                raise RuntimeError(f"igd exited with {process.returncode} before {assignment}")
            self.sock.settimeout(0.2)
            try:
                self.messages.append(self.sock.recv(65536).decode())
            except TimeoutError:
                continue
        raise TimeoutError(f"no {assignment} within {timeout} s; got {self.messages}")

    def close(self) -> None:
        self.sock.close()


class Igd:
    """A running `igd serve`; use as a context manager, or call stop()."""

    def __init__(self, *args: str, env: dict[str, str] | None = None, ready_timeout: float = 180.0,
                 wait_ready: bool = True) -> None:
        self.dir = short_tempdir()
        self.socket = self.dir / "igd.sock"
        self.notify = NotifyListener(self.dir)
        self.log_path = self.dir / "igd.log"
        environment = {**os.environ, "NOTIFY_SOCKET": str(self.notify.path), **(env or {})}
        self._log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            [IGD, "serve", "--socket", str(self.socket), *args],
            stdout=self._log, stderr=subprocess.STDOUT, env=environment,
        )
        if not wait_ready:
            return
        try:
            self.notify.wait_for("READY=1", ready_timeout, self.process)
        except Exception:
            self.stop()
            raise RuntimeError(f"igd did not become ready:\n{self.log()}") from None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def igctl(self, *args: str, input: bytes | None = None, timeout: float = 300, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[bytes]:
        """Run the real igctl against this daemon."""
        return subprocess.run(
            [IGCTL, "--socket", str(self.socket), *args],
            input=input, capture_output=True, timeout=timeout, env={**os.environ, **(env or {})},
        )

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        self.notify.close()
        return self.process.returncode

    def cleanup(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Igd:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
        self.cleanup()


# `igd serve` options for the slow test model (tests/nets.py: write_slow_model): chunks
# of about a quarter second, so that a cancelled or interrupted pass stops soon, and room
# for the thousands of steps that make a request last seconds on a fast machine (few
# enough that Gauss-Legendre's nodes, an n x n eigenproblem, cost a second at most).
SLOW_MODEL_OPTIONS = ("--max-batch", "16", "--max-steps", "1000000")


def steps_lasting(igd: Igd, image: bytes, seconds: float) -> int:
    """The n_steps that make one attribute request of ``image`` on ``igd``'s model take
    about ``seconds`` on this machine: measured, so that tests which need a long request
    hold on fast machines and slow ones alike."""
    from wire import WireClient

    steps, elapsed = 16, 0.0
    with WireClient(str(igd.socket)) as client:
        while True:
            started = time.perf_counter()
            response = client.call("attribute", {"image": image, "n_steps": steps, "format": "npz"})
            assert response["ok"], response
            elapsed = time.perf_counter() - started
            if elapsed >= 0.3:
                break
            steps *= 4
    return max(2, int(steps * seconds / elapsed))
