"""The `igctl` command: attributions and classifications from a running igd.

Imports only the standard library, click, msgpack and igd's protocol module, so it
starts in a fraction of a second (no torch, no numpy).
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import click

from igctl import __version__
from igctl.client import (
    EXIT_DAEMON_FAILED,
    EXIT_NO_DAEMON,
    EXIT_OK,
    EXIT_REFUSED,
    EXIT_USAGE,
    Client,
    ClientError,
    ConnectionLost,
    RequestFailed,
)
from igd.progress import Progress
from igd.protocol import VERSION, default_socket_path

EXIT_STATUSES = f"""
\b
Exit status:
  {EXIT_OK}  success
  {EXIT_REFUSED}  the daemon refused a request (bad image, unknown target, ...)
  {EXIT_USAGE}  usage error
  {EXIT_NO_DAEMON}  no daemon reachable at the socket
  {EXIT_DAEMON_FAILED}  the daemon failed (internal error, timeout, overloaded, shutting down)
"""
METHODS = ("gausslegendre", "riemann_left", "riemann_right", "riemann_middle", "riemann_trapezoid")
BASELINES = ("zero", "black", "white", "blur", "uniform")
SUFFIXES = {"torch": ".gzip", "npz": ".npz"}
STDIO = "-"


@dataclass
class Settings:
    socket: Path
    timeout: float | None

    def connect(self) -> Client:
        return Client(self.socket, self.timeout)


class Failure(click.ClickException):
    """A one-line error that ends igctl with a given exit status."""

    def __init__(self, message: str, exit_status: int) -> None:
        super().__init__(message)
        self.exit_code = exit_status

    def show(self, file: Any = None) -> None:
        click.echo(f"igctl: {self.format_message()}", err=True)


def fail(error: ClientError, prefix: str = "") -> Failure:
    return Failure(f"{prefix}{error}", error.exit_status)


@click.group(
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
    epilog=EXIT_STATUSES,
)
@click.option("--socket", "socket_path", type=click.Path(path_type=Path), envvar="IGD_SOCKET",
              show_envvar=True, help="igd's socket [default: /run/igd/igd.sock as root, else $XDG_RUNTIME_DIR/igd.sock].")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=900.0, show_default=True,
              help="Seconds to wait for each answer.")
@click.version_option(__version__, prog_name="igctl")
@click.pass_context
def main(ctx: click.Context, socket_path: Path | None, timeout: float) -> None:
    """Ask a running igd daemon for Integrated Gradients attributions.

    \b
      igctl attribute cat.jpg cat -o cat.gzip
      igctl attribute photos/*.jpg --target cat --out-dir results/ --jobs 4
      find photos -name '*.png' | igctl attribute --files-from - --json
    """
    ctx.obj = Settings(socket_path or default_socket_path(), timeout)


# --- attribute ------------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    """What happened to one image: the JSON line, and the exit status it implies."""

    record: dict[str, Any]
    status: int


@main.command(epilog=EXIT_STATUSES)
@click.argument("args", nargs=-1, metavar="IMAGE... [TARGET]")
@click.option("--target", "-t", help="Class name (case-insensitive) or index for every image [default: the predicted class].")
@click.option("-o", "--output", metavar="OUT", help="Result file for one image; '-' for stdout.")
@click.option("--out-dir", type=click.Path(path_type=Path, file_okay=False), help="Directory for the results of many images.")
@click.option("--files-from", type=click.File("r"), help="Read image paths from FILE, one per line ('-' for stdin).")
@click.option("--steps", type=click.IntRange(1), default=50, show_default=True, help="Path points (n_steps).")
@click.option("--method", type=click.Choice(METHODS), default="gausslegendre", show_default=True)
@click.option("--baseline", type=click.Choice(BASELINES), default="zero", show_default=True,
              help="zero: zeros after normalisation (the predecessor's); others in pixel space.")
@click.option("--seed", type=int, help="Seed of the 'uniform' baseline.")
@click.option("--blur-sigma", type=click.FloatRange(min=0), help="Sigma of the 'blur' baseline, in model-input pixels.")
@click.option("--format", "fmt", type=click.Choice(["torch", "npz"]), default="torch", show_default=True,
              help="torch: gzip'd torch.save dict (the predecessor's); npz: numpy arrays.")
@click.option("--gzip-level", type=click.IntRange(0, 9), default=1, show_default=True,
              help="Compression of torch results: 0 is fastest (still gzip), 9 smallest.")
@click.option("--heatmap", type=click.Path(path_type=Path), metavar="PNG",
              help="Also write a heatmap overlay (a directory when there are many images).")
@click.option("--json", "as_json", is_flag=True, help="One JSON line per image on stdout.")
@click.option("--jobs", "-j", type=click.IntRange(1, 64), default=1, show_default=True, help="Concurrent requests.")
@click.option("--force", "-f", is_flag=True, help="Overwrite existing result files.")
@click.pass_obj
def attribute(
    settings: Settings,
    args: tuple[str, ...],
    target: str | None,
    output: str | None,
    out_dir: Path | None,
    files_from: Any,
    steps: int,
    method: str,
    baseline: str,
    seed: int | None,
    blur_sigma: float | None,
    fmt: str,
    gzip_level: int,
    heatmap: Path | None,
    as_json: bool,
    jobs: int,
    force: bool,
) -> None:
    """Attribute IMAGE (a file, or '-' for stdin) to TARGET and write the result file.

    TARGET is a class name, an index, or omitted for the predicted class. With several
    images, give the target with --target (a last argument that is not a file is taken
    as the target). Without -o, one image's result goes to stdout when stdout is not a
    terminal, else to IMAGE-STEM.gzip (.npz) in the current directory or --out-dir;
    existing files are kept unless --force. Bad images are reported and skipped; the
    exit status tells whether any failed.
    """
    images, target = _images_and_target(args, target, files_from)
    if not images:
        raise click.UsageError("no images: give IMAGE arguments or --files-from")
    if images.count(STDIO) > 1 or (STDIO in images and files_from is not None and files_from.name == "<stdin>"):
        raise click.UsageError("stdin ('-') can be read once: as one image or as --files-from")
    if output is not None and len(images) > 1:
        raise click.UsageError("-o names one result file; use --out-dir for several images")
    if output is not None and out_dir is not None:
        raise click.UsageError("give -o or --out-dir, not both")
    to_stdout = output == STDIO or (
        output is None and out_dir is None and len(images) == 1 and not as_json and not sys.stdout.isatty()
    )
    if to_stdout and as_json:
        raise click.UsageError("--json writes to stdout; give -o FILE or --out-dir for the result")
    request_args: dict[str, Any] = {"n_steps": steps, "method": method, "baseline": baseline, "format": fmt,
                                    "gzip_level": gzip_level}
    request_args.update({k: v for k, v in (("seed", seed), ("blur_sigma", blur_sigma)) if v is not None})
    if target is not None:
        request_args["target"] = int(target) if target.isascii() and target.isdecimal() else target
    if heatmap is not None:
        request_args["heatmap"] = True
        if len(images) > 1:
            heatmap.mkdir(parents=True, exist_ok=True)
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)

    _probe(settings)  # a missing daemon is one clear error, not one per image

    def destination(image: str) -> Path | None:
        if to_stdout:
            return None
        if output is not None:
            return Path(output)
        return (out_dir or Path.cwd()) / (_stem(image) + SUFFIXES[fmt])

    def heatmap_path(image: str) -> Path | None:
        if heatmap is None or len(images) == 1:
            return heatmap
        return heatmap / (_stem(image) + ".png")

    claimed = _first_claims(images, destination)

    def one(client: Client, image: str) -> Outcome:
        out = destination(image)
        if out is not None and claimed[out] != image:
            message = f"its result would go to {out}, as that of {claimed[out]}; give the files distinct names"
            return failure(image, Failure(message, EXIT_REFUSED))
        return _attribute_one(client, image, request_args, out, heatmap_path(image), force)

    outcomes = _run_all(settings, images, one, jobs, as_json)
    if not as_json and not to_stdout:
        for outcome in outcomes:
            if outcome.record["ok"]:
                click.echo(_describe(outcome.record))
    _finish(outcomes)


def _images_and_target(args: tuple[str, ...], target: str | None, files_from: Any) -> tuple[list[str], str | None]:
    """Positional arguments are images, but a last one that is no file is the TARGET
    (when there is an image before it, or images come from --files-from)."""
    images = list(args)
    has_other_images = len(args) >= 2 or files_from is not None
    if target is None and args and has_other_images and args[-1] != STDIO and not Path(args[-1]).is_file():
        target = images.pop()
    if files_from is not None:
        images += [line.strip() for line in files_from if line.strip()]
    return images, target


def _stem(image: str) -> str:
    return "stdin" if image == STDIO else Path(image).stem


def _first_claims(images: list[str], destination: Callable[[str], Path | None]) -> dict[Path, str]:
    """Each result path, and the first image whose result goes there."""
    claims: dict[Path, str] = {}
    for image in images:
        out = destination(image)
        if out is not None:
            claims.setdefault(out, image)
    return claims


def _probe(settings: Settings) -> None:
    try:
        with settings.connect() as client:
            client.hello()
    except ClientError as error:
        raise fail(error) from None


def failure(image: str, error: BaseException) -> Outcome:
    """The record and exit status of an image that failed with ``error``."""
    if isinstance(error, RequestFailed):
        code, message, status = error.error.code, error.error.message, error.exit_status
    elif isinstance(error, ClientError):
        code, message, status = "client", str(error), error.exit_status
    elif isinstance(error, Failure):
        code, message, status = "client", error.format_message(), error.exit_code
    elif isinstance(error, OSError):
        code, message, status = "io", f"{error.strerror or error}: {error.filename or ''}".rstrip(": "), EXIT_REFUSED
    else:
        raise error
    return Outcome({"image": image, "ok": False, "error": {"code": code, "message": message}}, status)


def _attribute_one(
    client: Client, image: str, args: dict[str, Any], out: Path | None, heatmap: Path | None, force: bool
) -> Outcome:
    try:
        for path in (out, heatmap):
            if path is not None and path.exists() and not force:
                raise Failure(f"{path} exists (use --force to overwrite)", EXIT_REFUSED)
        data = _read_image(image, client.max_image_bytes())
        result = client.call("attribute", {**args, "image": data})
        if out is None:
            sys.stdout.buffer.write(result["data"])
            sys.stdout.buffer.flush()
        else:
            write_atomically(out, result["data"])
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
        timing_ms=result.get("timing_ms", {}),
    )
    return Outcome(record, EXIT_OK)


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


def write_atomically(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path``, then rename it into place:
    an interrupted or failed write never leaves a partial or empty file at ``path``."""
    directory = path.parent if str(path.parent) else Path(".")
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(temporary, 0o666 & ~_umask())
        os.replace(temporary, path)
    except BaseException:
        try:
            os.unlink(temporary)
        except FileNotFoundError:
            pass
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _run_all(
    settings: Settings, items: list[str], work: Callable[[Client, str], Outcome], jobs: int, as_json: bool
) -> list[Outcome]:
    """Run ``work`` over ``items`` on ``jobs`` connections; report each as it finishes."""
    local = threading.local()
    clients: list[Client] = []
    lock = threading.Lock()

    def connected() -> Client:
        if not hasattr(local, "client"):
            local.client = settings.connect()
            with lock:
                clients.append(local.client)
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
    for client in clients:
        client.close()
    return outcomes


def _describe(record: dict[str, Any]) -> str:
    return (
        f"{record['image']}: {record['prediction']} ({record['probability']:.2f}); "
        f"attributed to {record['target']!r} -> {record['output']}"
        + (f", heatmap {record['heatmap']}" if record.get("heatmap") else "")
        + f" (convergence delta {record['convergence_delta']:+.3g})"
    )


def _finish(outcomes: list[Outcome]) -> None:
    failed = [o for o in outcomes if not o.record["ok"]]
    if failed:
        if len(outcomes) > 1:
            click.echo(f"igctl: {len(failed)} of {len(outcomes)} images failed", err=True)
        sys.exit(max(o.status for o in failed))


# --- classify, status, version -----------------------------------------------------------


@main.command(epilog=EXIT_STATUSES)
@click.argument("images", nargs=-1, required=True, metavar="IMAGE...")
@click.option("--top", "-k", type=click.IntRange(1, 1000), default=5, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON line per image on stdout.")
@click.option("--jobs", "-j", type=click.IntRange(1, 64), default=1, show_default=True)
@click.pass_obj
def classify(settings: Settings, images: tuple[str, ...], top: int, as_json: bool, jobs: int) -> None:
    """Print the most likely classes of each IMAGE ('-' for stdin)."""
    _probe(settings)

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

    outcomes = _run_all(settings, list(images), one, jobs, as_json)
    if not as_json:
        for outcome in outcomes:
            if outcome.record["ok"]:
                ranked = ", ".join(f"{c['name']} {c['probability']:.3f}" for c in outcome.record["top"])
                click.echo(f"{outcome.record['image']}: {ranked}")
    _finish(outcomes)


@main.command(epilog=EXIT_STATUSES)
@click.option("--json", "as_json", is_flag=True, help="The daemon's full status as JSON.")
@click.pass_obj
def status(settings: Settings, as_json: bool) -> None:
    """Prove the daemon is alive with a round trip, and show what it is doing."""
    try:
        with settings.connect() as client:
            state = client.call("status")
    except ClientError as error:
        raise fail(error) from None
    if as_json:
        click.echo(json.dumps(state, indent=2))
        return
    requests, batching = state["requests"], state["batching"]
    lines = [
        ("socket", str(settings.socket)),
        ("model", f"{state['model']['name']}: {state['model']['description']}"),
        ("device", state["device"] + ("" if state.get("precision", "float32") == "float32" else f", {state['precision']}")),
        ("uptime", f"{state['uptime_s']:.0f} s (pid {state['pid']})"),
        ("requests", f"{requests['served']} served, {requests['failed']} failed, {requests['in_flight']} in flight"),
        ("queue", f"{state['queue_depth']} waiting (of {state['queue_size']})"),
        ("batching", f"{batching['passes']} passes, {batching['images']} images, largest batch {batching['largest_batch']}"),
        ("memory", f"{state['memory']['rss_bytes'] / 2**20:.0f} MiB resident"),
    ]
    for label, value in lines:
        click.echo(f"{label:<10} {value}")


@main.command()
@click.pass_obj
def version(settings: Settings) -> None:
    """Client and daemon versions, and the protocol they speak."""
    click.echo(f"igctl {__version__} (protocol {VERSION})")
    try:
        with settings.connect() as client:
            hello = client.hello()
    except ClientError as error:
        raise fail(error) from None
    click.echo(f"igd {hello['version']} (protocol {hello['protocol']}) at {settings.socket}: {hello['model']['name']} on {hello['model']['device']}")

