"""The concurrent runner: one request per image on several connections, each image's Outcome, the run's exit status.

run_all runs a command's per-image work on ``jobs`` connections, retries an image once on a
new connection when its request never reached the daemon, and reports each Outcome as it
finishes; failure is the Outcome of an image that failed; finish ends the run. attribute_one
is the work of one image of `igctl attribute` (its file read, its result streamed into its
file, its record); read_image reads an image within the daemon's size limit.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import signal
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, NoReturn

import click

from igctl.client import (EXIT_DAEMON_FAILED, EXIT_OK, EXIT_REFUSED, Client, ClientError, ConnectionLost, OutputClosed,
                          RequestFailed)
from igctl.naming import STDIO
from igctl.records import attribute_record
from igctl.session import Failure, Session
from igd import request as spec
from igd.output.files import AtomicFile, write_atomically
from igd.progress import Progress


@dataclass(frozen=True)
class Outcome:
    """What happened to one image: the JSON line, and the exit status it implies."""

    record: dict[str, Any]
    status: int


def failure(image: str, error: BaseException) -> Outcome:
    """The record and exit status of an image that failed with ``error``."""
    if isinstance(error, RequestFailed):
        code, message, status = error.error.code, user_message(error.error), error.exit_status
    elif isinstance(error, ClientError):
        code, message, status = "client", str(error), error.exit_status
    elif isinstance(error, Failure):
        code, message, status = "client", error.format_message(), error.exit_code
    elif isinstance(error, OSError):
        code, message, status = "io", f"{error.strerror or error}: {error.filename or ''}".rstrip(": "), EXIT_REFUSED
    else:
        raise error
    return Outcome({"image": image, "ok": False, "error": {"code": code, "message": message}}, status)


def user_message(error: Any) -> str:
    """The daemon's message, with the wire argument it names (``args.n_steps``) as igctl's flag."""
    option = spec.BY_NAME.get(str(error.details.get("arg")))
    return error.message.replace(f"args.{option.name}", option.flag) if option else error.message


# --- the requests of one image -----------------------------------------------------------


def attribute_one(
    client: Client,
    image: str,
    args: dict[str, Any],
    out: Path | None,
    heatmap: Path | None,
    on_event: Callable[[dict[str, Any]], None] | None,
) -> Outcome:
    try:
        data = read_image(image, client.max_image_bytes())
        with contextlib.ExitStack() as stack:
            # The result file streams in (data events) straight into its destination.
            destination = sys.stdout.buffer if out is None else stack.enter_context(AtomicFile(out))
            result = client.call("attribute", {**args, "image": data, "stream": True},
                                 receiver(destination, on_event))
            if "data" in result:  # a daemon that does not stream
                destination.write(result["data"])
            destination.flush()
        if heatmap is not None and "heatmap_png" in result:
            write_atomically(heatmap, result["heatmap_png"])
    except ConnectionLost as error:
        if not error.sent:
            raise  # never reached the daemon: the caller retries on a new connection
        return failure(image, error)
    except (ClientError, Failure, OSError) as error:
        return failure(image, error)
    return Outcome(attribute_record(image, result, out, heatmap), EXIT_OK)


def receiver(destination: Any, on_event: Callable[[dict[str, Any]], None] | None) -> Callable[[dict[str, Any]], None]:
    """The event handler of one attribute request: the file's data into ``destination``,
    everything else to ``on_event`` (progress)."""

    def receive(event: dict[str, Any]) -> None:
        if event.get("event") == "data" and isinstance(event.get("data"), bytes):
            destination.write(event["data"])
        elif on_event is not None:
            on_event(event)

    return receive


def read_image(image: str, limit: int) -> bytes:
    if image == STDIO:
        data = sys.stdin.buffer.read()
    else:
        size = os.stat(image).st_size
        if size > limit:
            raise Failure(f"the file is {size:,} bytes; this igd accepts images up to {limit:,}", EXIT_REFUSED)
        data = Path(image).read_bytes()
    if len(data) > limit:
        raise Failure(f"the image is {len(data):,} bytes; this igd accepts images up to {limit:,}", EXIT_REFUSED)
    return data


# --- many images at once -----------------------------------------------------------------


def run_all(
    session: Session, items: list[str], work: Callable[[Client, str], Outcome], jobs: int, as_json: bool
) -> list[Outcome]:
    """Run ``work`` over ``items`` on ``jobs`` connections; report each as it finishes. Once
    stdout is closed (OutputClosed from ``work`` or a record), igctl ends quietly (closed_stdout)."""
    local = threading.local()

    def connected() -> Client:
        if not hasattr(local, "client"):
            local.client = session.connect()
        return local.client

    def run(item: str) -> Outcome:
        for attempt in (1, 2):
            try:
                outcome = work(connected(), item)
            except ConnectionLost as error:  # e.g. closed while idle: the request never arrived
                local.__dict__.pop("client", None)
                if attempt == 2:
                    return failure(item, error)
                continue
            except ClientError as error:  # e.g. cannot reconnect
                return failure(item, error)
            if outcome.status == EXIT_DAEMON_FAILED:
                local.__dict__.pop("client", None)  # a fresh connection for the next item
            return outcome
        raise AssertionError("unreachable")

    outcomes: list[Outcome] = []
    with Progress(len(items)) as advance, concurrent.futures.ThreadPoolExecutor(jobs) as pool:
        try:
            for outcome in pool.map(run, items):
                outcomes.append(outcome)
                if as_json:
                    echo_out(json.dumps(outcome.record))
                if not outcome.record["ok"]:
                    error = outcome.record["error"]
                    label = f"{error['code']}: " if error["code"] not in ("client", "io") else ""
                    click.echo(f"igctl: {outcome.record['image']}: {label}{error['message']}", err=True)
                advance()
        except OutputClosed:
            pool.shutdown(wait=False, cancel_futures=True)  # nobody reads the rest: start no more
            closed_stdout()
    session.close()
    return outcomes


def echo_out(line: str) -> None:
    """``line`` on stdout; OutputClosed when its reader has gone (``| head``)."""
    try:
        click.echo(line)
    except BrokenPipeError:
        raise OutputClosed() from None


def closed_stdout() -> NoReturn:
    """End igctl quietly, as a program killed by SIGPIPE does (``igctl ... | head``): no
    message, status 141 (128 + SIGPIPE), nothing more written to the closed pipe."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())  # what Python would flush at exit goes nowhere
    sys.exit(128 + signal.SIGPIPE)


def finish(outcomes: list[Outcome]) -> None:
    """End the run: when any image failed, say how many (of several) and exit with the
    highest of their statuses."""
    failed = [o for o in outcomes if not o.record["ok"]]
    if failed:
        if len(outcomes) > 1:
            click.echo(f"igctl: {len(failed)} of {len(outcomes)} images failed", err=True)
        sys.exit(max(o.status for o in failed))
