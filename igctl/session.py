"""Process and session plumbing: where igd is, the connections a run opens, the signals and failures that end it.

A Session aborts its connections on SIGINT or SIGTERM; Failure is the one-line error that
ends igctl with an exit status; connection_options are --socket and --timeout; probe and
wait_for_status are the first round trips. Standard library, click, igctl.client and igd's
torch-free files and protocol modules only.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import click

from igctl.client import Client, ClientError, NoDaemon
from igd.output.files import TEMPORARIES
from igd.protocol import default_socket_path

DEFAULT_TIMEOUT = 900.0


# --- connecting, and cancelling on a signal ----------------------------------------------


@dataclass
class Session:
    """Where igd is, and the connections this run opened. SIGINT or SIGTERM aborts them
    all (igd sees its clients leave and cancels their requests), removes unfinished
    result files and ends igctl at once with 128 + the signal's number."""

    socket: Path
    timeout: float
    _clients: list[Client] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._stop)

    def connect(self) -> Client:
        client = Client(self.socket, self.timeout)
        with self._lock:
            self._clients.append(client)
        return client

    def close(self) -> None:
        with self._lock:
            for client in self._clients:
                client.close()
            self._clients.clear()

    def _stop(self, signum: int, _frame: object) -> None:
        # A signal handler: no locks (the main thread may hold one); copies are atomic.
        for client in list(self._clients):
            client.abort()
        for temporary in list(TEMPORARIES):
            with contextlib.suppress(OSError):
                os.unlink(temporary)
        click.echo(f"igctl: interrupted ({signal.Signals(signum).name}); requests in progress were cancelled",
                   err=True)
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError):
                stream.flush()
        os._exit(128 + signum)  # not sys.exit: a thread may be blocked reading stdin


class Failure(click.ClickException):
    """A one-line error that ends igctl with a given exit status."""

    def __init__(self, message: str, exit_status: int) -> None:
        super().__init__(message)
        self.exit_code = exit_status

    def show(self, file: Any = None) -> None:
        click.echo(f"igctl: {self.format_message()}", err=True)


def fail(error: ClientError, prefix: str = "") -> Failure:
    return Failure(f"{prefix}{error}", error.exit_status)


# Not checked by click (whose readable=True check says "not readable", exit 2, of a socket
# one may not connect to): connecting says why (exit 3 "permission denied", or 6).
SOCKET_PATH = click.Path(path_type=Path, readable=False)


def connection_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """--socket and --timeout: given before the subcommand (``igctl --socket S status``) or
    after it (``igctl status --socket S``); the later one wins."""
    command = click.option("--socket", "socket_path", type=SOCKET_PATH, metavar="PATH",
                           help="igd's socket [default: $IGD_SOCKET, else /run/igd/igd.sock as root, "
                                "else $XDG_RUNTIME_DIR/igd.sock, else /tmp/igd-UID/igd.sock].")(command)
    return click.option("--timeout", type=click.FloatRange(min=0, min_open=True), metavar="SECONDS",
                        help=f"Seconds to wait for each answer [default: {DEFAULT_TIMEOUT:g}].")(command)


def session_for(ctx: click.Context, socket_path: Path | None, timeout: float | None) -> Session:
    """The Session of a subcommand: its --socket and --timeout, else the group's, else the defaults."""
    group: dict[str, Any] = ctx.find_root().params
    socket = socket_path or group.get("socket_path") or default_socket_path()
    return Session(Path(socket), timeout or group.get("timeout") or DEFAULT_TIMEOUT)


# --- the first round trips ---------------------------------------------------------------


def probe(session: Session) -> dict[str, Any]:
    """The daemon's hello: a missing daemon is one clear error, not one per image. If
    igd is still starting, say that requests will wait for it."""
    try:
        with session.connect() as client:
            hello = client.hello()
    except ClientError as error:
        raise fail(error) from None
    if hello.get("state") == "starting":
        startup = hello.get("startup", {})
        click.echo(f"igctl: waiting for igd to finish starting ({startup.get('phase', 'starting')}, "
                   f"{startup.get('phase_s', 0):.0f} s)", err=True)
    return hello


def wait_for_status(session: Session, wait: float | None) -> dict[str, Any]:
    """One status answer; with ``wait``, the first that says ready (or the last one seen
    when ``wait`` seconds have passed), retrying while no daemon answers yet."""
    deadline = time.monotonic() + (wait or 0.0)
    while True:
        try:
            with session.connect() as client:
                state = client.call("status")
        except NoDaemon as error:
            if wait is None or time.monotonic() >= deadline:
                raise fail(error) from None
        except ClientError as error:
            raise fail(error) from None
        else:
            if wait is None or state.get("state") != "starting" or time.monotonic() >= deadline:
                return state
        time.sleep(0.2)
