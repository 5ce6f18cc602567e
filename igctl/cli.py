"""The `igctl` command: the click group and its commands (attribute, classify, show, status, version).

Each command is thin: it checks its flags and hands the work to igctl.session (connections,
signals, failures), igctl.naming (images, target, output paths), igctl.runner (requests on
several connections, outcomes, exit status) and igctl.records (records and the lines printed).
igctl imports only the standard library, click, msgpack and igd's torch-free modules (protocol,
request, flags, files, progress, styles), so it starts in a fraction of a second: no torch,
and numpy and Pillow only inside `igctl show`.
"""

from __future__ import annotations

import json
import os
import sys
import threading
from pathlib import Path
from typing import Any

import click

from igctl import __version__
from igctl.client import EXIT_OK, EXIT_REFUSED, EXIT_STARTING, EXIT_TABLE, Client, ClientError, ConnectionLost
from igctl.naming import STDIO, image_label, images_and_target, output_paths, preflight, target_class
from igctl.records import accuracy_warning, describe, ranking, status_lines
from igctl.runner import Outcome, attribute_one, echo_out, failure, finish, read_image, run_all
from igctl.session import (
    DEFAULT_TIMEOUT,
    SOCKET_PATH,
    Failure,
    connection_options,
    fail,
    probe,
    session_for,
    wait_for_status,
)
from igd import request as spec
from igd.output.files import write_atomically
from igd.flags import attribute_flags, checked_request, flag
from igd.progress import RequestProgress
from igd.output.styles import DEFAULT_OUTLIER_PERC, DEFAULT_SIGN, DEFAULT_STYLE, SIGNS, STYLES
from igd.protocol import VERSION

EXIT_STATUSES = "\b\nExit status:\n" + "\n".join(f"  {code:<3} {meaning}" for code, meaning in EXIT_TABLE) + "\n"
DEFAULT_WAIT = 600.0  # `igctl status --wait` without SECONDS


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
    session = session_for(ctx, socket_path, timeout)
    images, target = images_and_target(args, targets[0] if len(targets) == 1 else None, files_from,
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
        request_args["target"] = [target_class(t) for t in targets]
    elif target is not None:
        request_args["target"] = target_class(target)
    if heatmap is not None:
        request_args["heatmap"] = True

    outputs = output_paths(images, output, out_dir, heatmap, spec.SUFFIXES[request.format])
    preflight(outputs, force, make_dirs=out_dir is not None or (heatmap is not None and len(images) > 1))
    hello = probe(session)
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
                    echo_out(line)

            return attribute_one(client, image, request_args, out, heatmap_out, on_event)
        if single_bar:
            with RequestProgress(image_label(image)) as on_event:
                return attribute_one(client, image, request_args, out, heatmap_out, on_event)
        return attribute_one(client, image, request_args, out, heatmap_out, None)

    outcomes = run_all(session, images, one, jobs, as_json)
    for outcome in outcomes:
        if outcome.record["ok"]:
            if not as_json and not to_stdout:
                click.echo(describe(outcome.record))
            warning = accuracy_warning(outcome.record)
            if warning is not None:
                click.echo(f"igctl: warning: {warning}", err=True)
    finish(outcomes)


def _checked_before_hello(options: dict[str, Any]) -> spec.AttributeRequest:
    """The request, checked before igctl connects: every limit but the number of steps,
    which the daemon sets (``igd serve --max-steps``) and which is checked after hello."""
    steps = options.get(spec.STEPS.name)
    if isinstance(steps, int) and steps > spec.MAX_STEPS:
        return checked_request({**options, spec.STEPS.name: spec.MAX_STEPS})
    return checked_request(options)


def _max_steps(hello: dict[str, Any]) -> int:
    return int(hello.get("capabilities", {}).get("limits", {}).get("max_steps", spec.MAX_STEPS))


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
    session = session_for(ctx, socket_path, timeout)
    probe(session)

    def one(client: Client, image: str) -> Outcome:
        try:
            result = client.call("classify", {"image": read_image(image, client.max_image_bytes()), "top": top})
        except ConnectionLost as error:
            if not error.sent:
                raise
            return failure(image, error)
        except (ClientError, Failure, OSError) as error:
            return failure(image, error)
        return Outcome({"image": image, "ok": True, "top": result["top"]}, EXIT_OK)

    outcomes = run_all(session, list(images), one, jobs, as_json)
    if not as_json:
        for outcome in outcomes:
            if outcome.record["ok"]:
                click.echo(ranking(outcome.record))
    finish(outcomes)


@main.command(short_help="Summarise saved result files; re-render their heatmaps.")
@click.argument("results", nargs=-1, required=True, metavar="RESULT...",  # directories: the reader refuses them
                type=click.Path(exists=True, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="One JSON line per result (targets, accuracy, provenance).")
@click.option("--heatmap", type=click.Path(path_type=Path), metavar="PNG",
              help="Render IG to this PNG (a directory when there are several results): one panel per target.")
@click.option("--style", type=click.Choice(STYLES), default=DEFAULT_STYLE, show_default=True,
              help="overlay: |attribution| in colour over the dimmed grey photo, as igd draws it; regions: XRAI's "
                   "top 10/20/30 % of the area (a result of --regions xrai); captum's: "
                   "heat_map: colours alone; blended_heat_map: over the image in grey; masked_image: the image "
                   "times |attribution|; alpha_scaling: the image with |attribution| as opacity.")
@click.option("--sign", type=click.Choice(SIGNS), default=DEFAULT_SIGN, show_default=True,
              help="Which attributions: all (red negative, green positive), positive, negative, absolute_value.")
@click.option("--outlier-perc", type=click.FloatRange(0, 100, max_open=True), default=DEFAULT_OUTLIER_PERC,
              show_default=True, help="The top percent of the attribution mass that saturates the colours.")
@click.option("--smooth", type=click.FloatRange(0, 16), default=0.0, show_default=True, metavar="SIGMA",
              help="overlay: blur the map by a Gaussian of SIGMA input pixels first (a lighter look; 0: none).")
@click.option("--html", "report", type=click.Path(dir_okay=False, path_type=Path), metavar="REPORT.html",
              help="Write a browser report of all RESULTs: a sortable, filterable row per result, its picture "
                   "on a click (pictures in REPORT-files/ beside it).")
def show(results: tuple[Path, ...], as_json: bool, heatmap: Path | None, style: str, sign: str,
         outlier_perc: float, smooth: float, report: Path | None) -> None:
    """Summarise each RESULT file (torch .gzip or .npz, from igctl, igd batch or the
    predecessor): targets, prediction, accuracy, steps and what made it. No daemon is
    needed, and torch is not loaded.

    \b
    Examples:
      igctl show cat.gzip
      igctl show results/*.npz --json
      igctl show cat.gzip --heatmap cat.png --style heat_map --sign all
      igctl show results/*.gzip --html report.html
    """
    from igctl import show as shown  # numpy, Pillow (and Jinja2 for --html): only for this command
    from igd.output import report as pages
    from igd.output.figure import Look

    look = Look(style, sign, outlier_perc, smooth)
    failed, rows = 0, []
    for number, path in enumerate(results):
        href = os.path.relpath(path.absolute(), report.absolute().parent) if report is not None else str(path)
        try:
            result = shown.load(path)
            facts = shown.summary(path, result)
            picture = shown.picture(result, look) if heatmap is not None or report is not None else b""
            if heatmap is not None:
                target = heatmap / f"{path.name.split('.')[0]}.png" if len(results) > 1 else heatmap
                if len(results) > 1:
                    heatmap.mkdir(parents=True, exist_ok=True)
                write_atomically(target, picture)
                facts["heatmap"] = str(target)
            if report is not None:
                pictures = pages.save_pictures(picture, max(1, len(facts["targets"])), report,
                                               f"{number:06d}.{path.name}")
                rows.append(pages.row_of_summary(facts, href, *pictures))
        except (ValueError, OSError) as error:
            failed += 1
            click.echo(f"igctl: {path}: {error}", err=True)
            if report is not None:
                rows.append(pages.failed_row(href, str(error)))
            continue
        if report is None or as_json:
            click.echo(json.dumps(facts) if as_json else "\n".join(shown.describe(facts)))
    if report is not None:
        pages.write_report(report, rows, f"igd results: {len(rows)}")
        click.echo(f"igctl: report written to {report} ({len(rows)} results, {failed} unreadable; pictures in "
                   f"{pages.files_dir(report)})", err=as_json)
    if failed:
        sys.exit(EXIT_REFUSED)


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
    session = session_for(ctx, socket_path, timeout)
    state = wait_for_status(session, wait)
    if as_json:
        click.echo(json.dumps(state, indent=2))
    else:
        for label, value in status_lines(session.socket, state):
            click.echo(f"{label:<10} {value}")
    if state.get("state") == "starting":
        sys.exit(EXIT_STARTING)


@main.command(short_help="Print the versions of igctl and igd.")
@connection_options
@click.pass_context
def version(ctx: click.Context, socket_path: Path | None, timeout: float | None) -> None:
    """Client and daemon versions, and the protocol they speak.

    \b
    Example:
      igctl version
    """
    session = session_for(ctx, socket_path, timeout)
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
