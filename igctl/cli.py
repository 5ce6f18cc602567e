"""The `igctl` command: attributions and classifications from a running igd.

Imports only the standard library, click, msgpack and igd's torch-free modules (protocol,
request, flags, files, progress, styles), so it starts in a fraction of a second: no torch,
and numpy and Pillow only inside `igctl show`.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import click

from igctl import __version__
from igctl.client import (
    EXIT_DAEMON_FAILED,
    EXIT_OK,
    EXIT_REFUSED,
    EXIT_STARTING,
    EXIT_TABLE,
    Client,
    ClientError,
    ConnectionLost,
    NoDaemon,
    RequestFailed,
)
from igd import request as spec
from igd.output.files import TEMPORARIES, AtomicFile, write_atomically
from igd.flags import attribute_flags, checked_request, flag
from igd.progress import Progress, RequestProgress
from igd.output.styles import DEFAULT_OUTLIER_PERC, DEFAULT_SIGN, DEFAULT_STYLE, SIGNS, STYLES
from igd.protocol import VERSION, default_socket_path

EXIT_STATUSES = "\b\nExit status:\n" + "\n".join(f"  {code:<3} {meaning}" for code, meaning in EXIT_TABLE) + "\n"
STDIO = "-"
DEFAULT_TIMEOUT = 900.0
DEFAULT_WAIT = 600.0  # `igctl status --wait` without SECONDS


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


def _session(ctx: click.Context, socket_path: Path | None, timeout: float | None) -> Session:
    group: dict[str, Any] = ctx.find_root().params
    socket = socket_path or group.get("socket_path") or default_socket_path()
    return Session(Path(socket), timeout or group.get("timeout") or DEFAULT_TIMEOUT)


@click.group(
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
    epilog=EXIT_STATUSES,
)
@click.option("--socket", "socket_path", type=SOCKET_PATH, envvar="IGD_SOCKET", show_envvar=True,
              metavar="PATH", help="igd's socket [default: /run/igd/igd.sock as root, else $XDG_RUNTIME_DIR/igd.sock, "
                                   "else /tmp/igd-UID/igd.sock]. igctl talks only to a server run by you, root or "
                                   "igd's service user.")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), metavar="SECONDS",
              help=f"Seconds to wait for each answer [default: {DEFAULT_TIMEOUT:g}].")
@click.version_option(__version__, prog_name="igctl")
def main(socket_path: Path | None, timeout: float | None) -> None:
    """Ask a running igd daemon for Integrated Gradients attributions.

    \b
    Examples:
      igctl attribute cat.jpg "tiger cat"                 # writes cat.gzip
      igctl attribute cat.jpg 282 -o - | gzip -dc | ...    # class index; result on stdout
      igctl attribute photos/*.jpg --target "tiger cat" --out-dir results/ --jobs 4
      find photos -name '*.png' | igctl attribute --files-from - --out-dir results/ --json
      igctl classify cat.jpg --top 3
      igctl status --wait 60                               # until igd has finished starting
    """


# --- attribute ------------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    """What happened to one image: the JSON line, and the exit status it implies."""

    record: dict[str, Any]
    status: int


@main.command(epilog=EXIT_STATUSES, short_help="Attribute images to a class; write the result files.")
@click.argument("args", nargs=-1, metavar="IMAGE... [TARGET]")
@click.option("--target", "-t", "targets", metavar="CLASS", multiple=True,
              help="Class name (case-insensitive) or index for every image [default: the predicted class]; "
                   "repeat it for several targets in one pass (one result file with a target axis).")
@click.option("-o", "--output", metavar="FILE", help="Result file of one image; '-' writes it to stdout.")
@click.option("--out-dir", type=click.Path(path_type=Path, file_okay=False), metavar="DIR",
              help="Directory for the results, keeping the images' relative folders [default: .].")
@click.option("--files-from", type=click.File("r"), metavar="FILE",
              help="Read image paths from FILE, one per line ('-' for stdin).")
@attribute_flags
@flag(spec.FORMAT)
@click.option("--heatmap", type=click.Path(path_type=Path), metavar="PNG",
              help="Also write a heatmap overlay (a directory when there are several images).")
@click.option("--json", "as_json", is_flag=True, help="One JSON line per image on stdout (see README).")
@click.option("--progress-json", is_flag=True,
              help="Also print igd's progress events as JSON lines on stdout ({\"image\", \"event\", ...}).")
@click.option("--jobs", "-j", type=click.IntRange(1, 64), default=1, show_default=True,
              help="Requests in flight at once (igd batches them into shared passes).")
@click.option("--force", "-f", is_flag=True, help="Overwrite existing result files.")
@connection_options
@click.pass_context
def attribute(
    ctx: click.Context,
    args: tuple[str, ...],
    targets: tuple[str, ...],
    output: str | None,
    out_dir: Path | None,
    files_from: Any,
    heatmap: Path | None,
    as_json: bool,
    progress_json: bool,
    jobs: int,
    force: bool,
    socket_path: Path | None,
    timeout: float | None,
    **options: Any,
) -> None:
    """Attribute each IMAGE to TARGET and write its result file.

    IMAGE is a file, or '-' for stdin. TARGET is a class name, an index, or omitted
    for the predicted class; with several images, give it with --target (a last
    argument that is neither a file nor looks like one is also taken as the target).
    Several --target (or --top-k K) explain several classes from one pass, and several
    baselines (--baseline black,white), --samples and --noise average several paths:
    the result file then has a leading target axis (README: "Several targets and paths").

    The result of IMAGE goes to IMAGE-STEM.gzip (.npz with --format npz) in the current
    directory, or under --out-dir keeping the images' relative folders; -o FILE names
    it, and -o - writes it to stdout. Every output is checked before anything is sent;
    existing files are kept unless --force. A bad image is reported and skipped; the
    exit status says whether any failed.

    \b
    Examples:
      igctl attribute cat.jpg "tiger cat"                 # -> cat.gzip
      igctl attribute cat.jpg 282 -o cat.gzip --heatmap cat.png
      igctl attribute cat.jpg --steps 128 --baseline blur --format npz
      igctl attribute cat.jpg --top-k 3 --baseline black,white --idgi
      igctl attribute cat.jpg "tiger cat" --noise 0.1 --samples 8 --seed 1
      igctl attribute photos/*.jpg -t "tiger cat" --out-dir results/ --jobs 4 --json
      cat cat.jpg | igctl attribute - "tiger cat" -o - > cat.gzip
    """
    session = _session(ctx, socket_path, timeout)
    images, target = _images_and_target(args, targets[0] if len(targets) == 1 else None, files_from,
                                        has_targets=bool(targets))
    if not images:
        raise click.UsageError("no images: give IMAGE arguments or --files-from")
    if images.count(STDIO) > 1 or (STDIO in images and files_from is not None and files_from.name == "<stdin>"):
        raise click.UsageError("stdin ('-') can be read once: as one image or as --files-from")
    if output is not None and len(images) > 1:
        raise click.UsageError("-o names one result file; use --out-dir for several images")
    if output is not None and out_dir is not None:
        raise click.UsageError("give -o or --out-dir, not both")
    to_stdout = output == STDIO
    if to_stdout and (as_json or progress_json):
        raise click.UsageError("-o - writes the result to stdout; --json and --progress-json need it too")
    if to_stdout and sys.stdout.isatty():
        raise click.UsageError("refusing to write a binary result to a terminal; redirect stdout or give -o FILE")
    request = _checked_before_hello(options)
    request_args = {k: v for k, v in options.items() if v is not None}
    if len(targets) > 1:
        request_args["target"] = [_class(t) for t in targets]
    elif target is not None:
        request_args["target"] = _class(target)
    if heatmap is not None:
        request_args["heatmap"] = True

    outputs = _output_paths(images, output, out_dir, heatmap, spec.SUFFIXES[request.format])
    _preflight(outputs, force, make_dirs=out_dir is not None or (heatmap is not None and len(images) > 1))
    hello = _probe(session)
    checked_request(options, max_steps=_max_steps(hello))
    single_bar = len(images) == 1 and not as_json and not progress_json
    if single_bar or progress_json:
        request_args["progress"] = True
    echo_lock = threading.Lock()

    def one(client: Client, image: str) -> Outcome:
        out, heatmap_out = outputs[image]
        if progress_json:
            def on_event(event: dict[str, Any]) -> None:
                line = json.dumps({"image": image, **{k: v for k, v in event.items() if k != "id"}})
                with echo_lock:
                    click.echo(line)

            return _attribute_one(session, client, image, request_args, out, heatmap_out, on_event)
        if single_bar:
            with RequestProgress(_label(image)) as on_event:
                return _attribute_one(session, client, image, request_args, out, heatmap_out, on_event)
        return _attribute_one(session, client, image, request_args, out, heatmap_out, None)

    outcomes = _run_all(session, images, one, jobs, as_json)
    for outcome in outcomes:
        if outcome.record["ok"]:
            if not as_json and not to_stdout:
                click.echo(_describe(outcome.record))
            warning = _accuracy_warning(outcome.record)
            if warning is not None:
                click.echo(f"igctl: warning: {warning}", err=True)
    _finish(outcomes)


def _class(target: str) -> str | int:
    """A class index when the target is all digits, else a class name."""
    return int(target) if target.isascii() and target.isdecimal() else target


def _checked_before_hello(options: dict[str, Any]) -> spec.AttributeRequest:
    """The request, checked before igctl connects: every limit but the number of steps,
    which the daemon sets (``igd serve --max-steps``) and which is checked after hello."""
    steps = options.get(spec.STEPS.name)
    if isinstance(steps, int) and steps > spec.MAX_STEPS:
        return checked_request({**options, spec.STEPS.name: spec.MAX_STEPS})
    return checked_request(options)


def _max_steps(hello: dict[str, Any]) -> int:
    return int(hello.get("capabilities", {}).get("limits", {}).get("max_steps", spec.MAX_STEPS))


def _label(image: str) -> str:
    return "stdin" if image == STDIO else Path(image).name


def _images_and_target(args: tuple[str, ...], target: str | None, files_from: Any,
                       has_targets: bool = False) -> tuple[list[str], str | None]:
    """Positional arguments are images, but a last one that is no file is the TARGET
    (when there is an image before it, or images come from --files-from, and no --target
    is given). A last one that is no file but looks like one is a mistyped image, not a
    target."""
    images = list(args)
    has_other_images = len(args) >= 2 or files_from is not None
    if target is None and not has_targets and args and has_other_images and args[-1] != STDIO and not Path(args[-1]).is_file():
        last = args[-1]
        if last.lower().endswith(spec.IMAGE_SUFFIXES) or os.sep in last:
            raise click.UsageError(
                f"{last}: no such file. Did you mean to pass several images? Check its name; "
                "a target goes last or with --target, and cannot look like a file name"
            )
        target = images.pop()
    if files_from is not None:
        images += [line.strip() for line in files_from if line.strip()]
    return images, target


def _output_paths(
    images: list[str], output: str | None, out_dir: Path | None, heatmap: Path | None, suffix: str
) -> dict[str, tuple[Path | None, Path | None]]:
    """(result path, heatmap path) of each image; a result path of None means stdout.

    Without -o, results are named after their image: in the current directory, or
    under ``out_dir`` at the image's path relative to the images' common folder (as
    `igd batch` names its outputs), so that cats/001.png and dogs/001.png stay apart."""
    relative = _relative_names(images) if out_dir is not None or (heatmap is not None and len(images) > 1) else {}
    paths: dict[str, tuple[Path | None, Path | None]] = {}
    for image in images:
        if output == STDIO:
            result: Path | None = None
        elif output is not None:
            result = Path(output)
        elif out_dir is not None:
            result = out_dir / relative[image].with_suffix(suffix)
        else:
            result = Path(_stem(image) + suffix)
        if heatmap is None or len(images) == 1:
            heatmap_path = heatmap
        else:
            heatmap_path = heatmap / relative[image].with_suffix(".png")
        paths[image] = (result, heatmap_path)
    return paths


def _relative_names(images: list[str]) -> dict[str, Path]:
    """Each image's path relative to the deepest folder that holds them all."""
    files = {image: os.path.abspath(image) for image in images if image != STDIO}
    root = os.path.commonpath([os.path.dirname(path) for path in files.values()]) if files else "."
    names = {image: Path(os.path.relpath(path, root)) for image, path in files.items()}
    if STDIO in images:
        names[STDIO] = Path("stdin")
    return names


def _stem(image: str) -> str:
    return "stdin" if image == STDIO else Path(image).stem


def _preflight(outputs: dict[str, tuple[Path | None, Path | None]], force: bool, make_dirs: bool) -> None:
    """Fail before any request if a result could not be written: two images with one
    result path, a missing or unwritable folder, an existing file without --force."""
    problems: list[str] = []
    claimed: dict[Path, str] = {}
    for image, paths in outputs.items():
        for path in paths:
            if path is None:
                continue
            if path in claimed:
                problems.append(f"{image} and {claimed[path]} would both write {path}; give the files distinct names")
                continue
            claimed[path] = image
            problem = _unwritable(path, force, make_dirs)
            if problem:
                problems.append(problem)
    if problems:
        shown = problems[:5] + ([f"... and {len(problems) - 5} more"] if len(problems) > 5 else [])
        raise Failure("nothing was sent:\n  " + "\n  ".join(shown), EXIT_REFUSED)


def _unwritable(path: Path, force: bool, make_dirs: bool) -> str | None:
    """Why ``path`` cannot take a result file, or None."""
    folder = path.parent
    if make_dirs:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            return f"cannot create {error.filename or folder}: {error.strerror}"
    if not folder.is_dir():
        return f"cannot write {path}: folder {folder} does not exist"
    if not os.access(folder, os.W_OK | os.X_OK):
        return f"cannot write {path}: permission denied on {folder}"
    if path.is_dir():
        return f"cannot write {path}: it is a directory"
    if (path.exists() or path.is_symlink()) and not force:
        return f"{path} exists (use --force to overwrite)"
    return None


def _probe(session: Session) -> dict[str, Any]:
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


def failure(image: str, error: BaseException) -> Outcome:
    """The record and exit status of an image that failed with ``error``."""
    if isinstance(error, RequestFailed):
        code, message, status = error.error.code, _user_message(error.error), error.exit_status
    elif isinstance(error, ClientError):
        code, message, status = "client", str(error), error.exit_status
    elif isinstance(error, Failure):
        code, message, status = "client", error.format_message(), error.exit_code
    elif isinstance(error, OSError):
        code, message, status = "io", f"{error.strerror or error}: {error.filename or ''}".rstrip(": "), EXIT_REFUSED
    else:
        raise error
    return Outcome({"image": image, "ok": False, "error": {"code": code, "message": message}}, status)


def _user_message(error: Any) -> str:
    """The daemon's message, with the wire argument it names (``args.n_steps``) as igctl's flag."""
    option = spec.BY_NAME.get(str(error.details.get("arg")))
    return error.message.replace(f"args.{option.name}", option.flag) if option else error.message


# The accuracy facts of a result that igctl reports (older daemons send none of them).
ACCURACY_KEYS = ("error_estimate", "completeness_gap", "tolerance", "tolerance_met")


def _attribute_one(
    session: Session,
    client: Client,
    image: str,
    args: dict[str, Any],
    out: Path | None,
    heatmap: Path | None,
    on_event: Callable[[dict[str, Any]], None] | None,
) -> Outcome:
    try:
        data = _read_image(image, client.max_image_bytes())
        with contextlib.ExitStack() as stack:
            # The result file streams in (data events) straight into its destination.
            destination = sys.stdout.buffer if out is None else stack.enter_context(AtomicFile(out))
            result = client.call("attribute", {**args, "image": data, "stream": True},
                                 _receiver(destination, on_event))
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
    record = dict(
        image=image,
        ok=True,
        output=str(out) if out is not None else STDIO,
        heatmap=str(heatmap) if heatmap is not None else None,
        target=result["target"]["name"],
        target_index=result["target"]["index"],
        prediction=result["prediction"]["name"],
        probability=result["prediction"]["probability"],
        convergence_delta=result["convergence_delta"],
        n_steps=result.get("n_steps"),
        method=result.get("method"),
        timing_ms=result.get("timing_ms", {}),
    )
    # Older daemons send none of these (and get no accuracy warning); null: unbounded.
    record.update({key: result[key] for key in ACCURACY_KEYS if key in result})
    if "metrics" in result:
        record["metrics"] = result["metrics"]
    if "targets" in result:  # several targets: each one's facts; the record's accuracy is the worst of them
        record["targets"] = result["targets"]
        record["paths"] = result.get("paths", 1)
        for key in ("error_estimate", "completeness_gap"):
            values = [t.get(key) for t in result["targets"]]
            record[key] = None if None in values else max(values, key=abs)
    return Outcome(record, EXIT_OK)


def _receiver(destination: Any, on_event: Callable[[dict[str, Any]], None] | None) -> Callable[[dict[str, Any]], None]:
    """The event handler of one attribute request: the file's data into ``destination``,
    everything else to ``on_event`` (progress)."""

    def receive(event: dict[str, Any]) -> None:
        if event.get("event") == "data" and isinstance(event.get("data"), bytes):
            destination.write(event["data"])
        elif on_event is not None:
            on_event(event)

    return receive


def _read_image(image: str, limit: int) -> bytes:
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


def _run_all(
    session: Session, items: list[str], work: Callable[[Client, str], Outcome], jobs: int, as_json: bool
) -> list[Outcome]:
    """Run ``work`` over ``items`` on ``jobs`` connections; report each as it finishes."""
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
        for outcome in pool.map(run, items):
            outcomes.append(outcome)
            if as_json:
                click.echo(json.dumps(outcome.record))
            if not outcome.record["ok"]:
                error = outcome.record["error"]
                label = f"{error['code']}: " if error["code"] not in ("client", "io") else ""
                click.echo(f"igctl: {outcome.record['image']}: {label}{error['message']}", err=True)
            advance()
    session.close()
    return outcomes


def _describe(record: dict[str, Any]) -> str:
    names = [t["name"] for t in record["targets"]] if "targets" in record else [record["target"]]
    paths = f" over {record['paths']} paths" if record.get("paths", 1) > 1 else ""
    return (
        f"{record['image']}: {record['prediction']} ({record['probability']:.2f}); "
        f"attributed to {', '.join(repr(name) for name in names)}{paths} -> {record['output']}"
        + (f", heatmap {record['heatmap']}" if record.get("heatmap") else "")
        + f" ({_accuracy(record)}"
        + "".join(f", {name} area {area:.3f}" for name, area in record.get("metrics", {}).items()) + ")"
    )


def _accuracy(record: dict[str, Any]) -> str:
    """``estimated error 9.6 %, completeness gap -4.0 %, 50 steps`` (or, from a daemon
    that does not estimate, the convergence delta)."""
    if "error_estimate" not in record:
        return f"convergence delta {record['convergence_delta']:+.3g}"
    return (f"estimated error {_percent(record['error_estimate'])}, "
            f"completeness gap {_percent(record.get('completeness_gap'), signed=True)}, {record['n_steps']} steps")


def _percent(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "unbounded"
    return f"{value * 100:+.1f} %" if signed else f"{value * 100:.1f} %"


def _accuracy_warning(record: dict[str, Any]) -> str | None:
    """A warning when the estimated error or the completeness gap is above
    spec.WARN_ERROR (or unbounded), naming what fixes it; None otherwise."""
    high = [f"{name} {_percent(record[key], signed)}"
            for name, key, signed in (("estimated error", "error_estimate", False),
                                      ("completeness gap", "completeness_gap", True))
            if key in record and (record[key] is None or abs(record[key]) > spec.WARN_ERROR)]
    if not high:
        return None
    if record.get("tolerance_met") is False:
        fix = f"the tolerance was not met within {record['n_steps']} steps; allow more with --steps"
    elif "tolerance" in record:
        fix = "lower --tolerance"
    else:
        fix = f"ask for --tolerance {spec.WARN_ERROR / 2:g} (adaptive steps) or more --steps"
    return f"{record['image']}: {' and '.join(high)} above {spec.WARN_ERROR * 100:g} %; {fix}"


def _finish(outcomes: list[Outcome]) -> None:
    failed = [o for o in outcomes if not o.record["ok"]]
    if failed:
        if len(outcomes) > 1:
            click.echo(f"igctl: {len(failed)} of {len(outcomes)} images failed", err=True)
        sys.exit(max(o.status for o in failed))


# --- classify, status, version -----------------------------------------------------------


@main.command(epilog=EXIT_STATUSES, short_help="Print the most likely classes of images.")
@click.argument("images", nargs=-1, required=True, metavar="IMAGE...")
@click.option(spec.TOP.flag, "-k", type=click.IntRange(1, spec.MAX_TOP), default=spec.TOP.default,
              show_default=True, help=spec.TOP.help)
@click.option("--json", "as_json", is_flag=True, help="One JSON line per image on stdout: image, ok, top.")
@click.option("--jobs", "-j", type=click.IntRange(1, 64), default=1, show_default=True,
              help="Requests in flight at once.")
@connection_options
@click.pass_context
def classify(ctx: click.Context, images: tuple[str, ...], top: int, as_json: bool, jobs: int,
             socket_path: Path | None, timeout: float | None) -> None:
    """Print the most likely classes of each IMAGE ('-' for stdin).

    \b
    Examples:
      igctl classify cat.jpg
      igctl classify photos/*.jpg --top 3 --json > classes.jsonl
    """
    session = _session(ctx, socket_path, timeout)
    _probe(session)

    def one(client: Client, image: str) -> Outcome:
        try:
            result = client.call("classify", {"image": _read_image(image, client.max_image_bytes()), "top": top})
        except ConnectionLost as error:
            if not error.sent:
                raise
            return failure(image, error)
        except (ClientError, Failure, OSError) as error:
            return failure(image, error)
        return Outcome({"image": image, "ok": True, "top": result["top"]}, EXIT_OK)

    outcomes = _run_all(session, list(images), one, jobs, as_json)
    if not as_json:
        for outcome in outcomes:
            if outcome.record["ok"]:
                ranked = ", ".join(f"{c['name']} {c['probability']:.3f}" for c in outcome.record["top"])
                click.echo(f"{outcome.record['image']}: {ranked}")
    _finish(outcomes)


@main.command(short_help="Summarise saved result files; re-render their heatmaps.")
@click.argument("results", nargs=-1, required=True, metavar="RESULT...",  # directories: the reader refuses them
                type=click.Path(exists=True, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="One JSON line per result (targets, accuracy, provenance).")
@click.option("--heatmap", type=click.Path(path_type=Path), metavar="PNG",
              help="Render IG to this PNG (a directory when there are several results): one panel per target.")
@click.option("--style", type=click.Choice(STYLES), default=DEFAULT_STYLE, show_default=True,
              help="heat_map: colours alone; blended_heat_map: over the image in grey; masked_image: the image "
                   "times |attribution|; alpha_scaling: the image with |attribution| as opacity.")
@click.option("--sign", type=click.Choice(SIGNS), default=DEFAULT_SIGN, show_default=True,
              help="Which attributions: all (red negative, green positive), positive, negative, absolute_value.")
@click.option("--outlier-perc", type=click.FloatRange(0, 100, max_open=True), default=DEFAULT_OUTLIER_PERC,
              show_default=True, help="The top percent of the attribution mass that saturates the colours.")
def show(results: tuple[Path, ...], as_json: bool, heatmap: Path | None, style: str, sign: str,
         outlier_perc: float) -> None:
    """Summarise each RESULT file (torch .gzip or .npz, from igctl, igd batch or the
    predecessor): targets, prediction, accuracy, steps and what made it. No daemon is
    needed, and torch is not loaded.

    \b
    Examples:
      igctl show cat.gzip
      igctl show results/*.npz --json
      igctl show cat.gzip --heatmap cat.png --style heat_map --sign all
    """
    from igctl import show as shown  # numpy and Pillow: only for this command

    failed = 0
    for path in results:
        try:
            result = shown.load(path)
            facts = shown.summary(path, result)
            if heatmap is not None:
                target = heatmap / f"{path.name.split('.')[0]}.png" if len(results) > 1 else heatmap
                if len(results) > 1:
                    heatmap.mkdir(parents=True, exist_ok=True)
                write_atomically(target, shown_png(shown.picture(result, style, sign, outlier_perc)))
                facts["heatmap"] = str(target)
        except (ValueError, OSError) as error:
            failed += 1
            click.echo(f"igctl: {path}: {error}", err=True)
            continue
        click.echo(json.dumps(facts) if as_json else "\n".join(shown.describe(facts)))
    if failed:
        sys.exit(EXIT_REFUSED)


def shown_png(picture: Any) -> bytes:
    from igd.output.rendering import png

    return png(picture)


@main.command(epilog=EXIT_STATUSES, short_help="Show whether igd is up, and what it is doing.")
@click.option("--json", "as_json", is_flag=True, help="The daemon's full status as JSON.")
@click.option("--wait", type=click.FloatRange(min=0), is_flag=False, flag_value=DEFAULT_WAIT, default=None,
              metavar="[SECONDS]",
              help=f"Wait until igd is ready to compute (up to SECONDS, {DEFAULT_WAIT:g} if not given), also for "
                   "its socket to appear.")
@connection_options
@click.pass_context
def status(ctx: click.Context, as_json: bool, wait: float | None, socket_path: Path | None,
           timeout: float | None) -> None:
    """Prove the daemon is alive with a round trip, and show what it is doing.

    Exits 0 once igd is ready, 5 while it is still loading or warming up, 3 if nothing
    answers.

    \b
    Examples:
      igctl status
      igd serve & igctl status --wait && igctl attribute cat.jpg
    """
    session = _session(ctx, socket_path, timeout)
    state = _status(session, wait)
    if as_json:
        click.echo(json.dumps(state, indent=2))
    else:
        for label, value in _status_lines(session.socket, state):
            click.echo(f"{label:<10} {value}")
    if state.get("state") == "starting":
        sys.exit(EXIT_STARTING)


def _status(session: Session, wait: float | None) -> dict[str, Any]:
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


def _status_lines(socket: Path, state: dict[str, Any]) -> list[tuple[str, str]]:
    uptime = ("uptime", f"{state['uptime_s']:.0f} s (pid {state['pid']})")
    if state.get("state") == "starting":
        startup = state.get("startup", {})
        return [("socket", str(socket)),
                ("state", f"starting: {startup.get('phase', '?')} ({startup.get('phase_s', 0):.0f} s)"), uptime]
    requests, batching = state["requests"], state["batching"]
    precision = "" if state.get("precision", "float32") == "float32" else f", {state['precision']}"
    precision += "" if state.get("compiler", "eager") == "eager" else f", compiled ({state['compiler']})"
    return [
        ("socket", str(socket)),
        ("state", "ready"),
        ("model", f"{state['model']['name']}: {state['model']['description']}"),
        ("device", state["device"] + precision),
        uptime,
        ("requests", f"{requests['served']} served, {requests['failed']} failed, {requests['in_flight']} in flight"),
        ("queue", f"{state['queue_depth']} waiting (of {state['queue_size']})"),
        ("batching", f"{batching['passes']} passes, {batching['images']} images, largest batch {batching['largest_batch']}"),
        ("chunks", _chunk_line(batching)),
        ("memory", f"{state['memory']['rss_bytes'] / 2**20:.0f} MiB resident"),
    ]


def _chunk_line(batching: dict[str, Any]) -> str:
    """E.g. "4 points (measured: sizes 2, 4, 8, 16 at 42, 40, 47, 56 ms per point; search 4.0 s, <when>)"."""
    line = f"{batching['max_batch_points']} points ({batching['chunk_source']}"
    search = batching.get("chunk_search")
    if search:
        times = search["ms_per_point"]
        line += (f": sizes {', '.join(times)} at {', '.join(f'{ms:.0f}' for ms in times.values())} ms per point; "
                 f"search {search['search_s']:.1f} s, {search['measured']}")
    return line + ")"


@main.command(short_help="Print the versions of igctl and igd.")
@connection_options
@click.pass_context
def version(ctx: click.Context, socket_path: Path | None, timeout: float | None) -> None:
    """Client and daemon versions, and the protocol they speak.

    \b
    Example:
      igctl version
    """
    session = _session(ctx, socket_path, timeout)
    click.echo(f"igctl {__version__} (protocol {VERSION})")
    try:
        with session.connect() as client:
            hello = client.hello()
    except ClientError as error:
        raise fail(error) from None
    if "model" in hello:
        serving = f"{hello['model']['name']} on {hello['model']['device']}"
    else:
        serving = f"starting ({hello.get('startup', {}).get('phase', '?')})"
    click.echo(f"igd {hello['version']} (protocol {hello['protocol']}) at {session.socket}: {serving}")
