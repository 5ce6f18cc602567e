"""The `igd` command: `igd serve` (the daemon), `igd check` (load a model and self-test),
`igd batch` (a whole dataset) and `igd install-systemd` (the service units).

Torch is imported only inside the commands, and only once their flags are checked, so
`igd --help` answers at once and so does a usage error."""

from __future__ import annotations

import functools
import signal
import time
from importlib import resources
from pathlib import Path
from typing import Any, Callable

import click

from igd import __version__
from igd import request as spec
from igd.flags import attribute_flags, checked_request, flag
from igd.protocol import DEFAULT_MAX_FRAME_BYTES

PROCESS_STARTED = time.monotonic()  # igd's uptime counts from here
SAMPLE_IMAGE = "chelsea.jpg"
_FILE = click.Path(path_type=Path, dir_okay=False)
MODEL_ARGS = ("bit_path", "lanet_path", "model", "weights", "classes_file", "index_names", "device")


def model_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """The options that choose and place the model, shared by `serve`, `check` and `batch`."""
    options = [
        click.option("--bit-path", "-bp", type=_FILE, envvar="IGD_BIT_PATH", show_envvar=True,
                     help="A BiT ResNetV2 checkpoint in the predecessor's format."),
        click.option("--lanet-path", "-lp", "-lb", type=_FILE, envvar="IGD_LANET_PATH", show_envvar=True,
                     help="A LaNet training checkpoint (weights under model_state_dict)."),
        click.option("--model", "-m", metavar="PATH_OR_NAME", envvar="IGD_MODEL", show_envvar=True,
                     help="efficientnet-lite0 (the default); timm:NAME or a torchvision architecture "
                          "name, with --weights; a Hugging Face save_pretrained directory (or hf:DIR); "
                          "a TorchScript or torch.export file with a sidecar."),
        click.option("--weights", type=_FILE, envvar="IGD_WEIGHTS", show_envvar=True,
                     help="The weights for --model NAME or timm:NAME: a state dict (.pth/.pt) or a "
                          "safetensors file, told apart by content."),
        click.option("--classes", "classes_file", type=_FILE, envvar="IGD_CLASSES", show_envvar=True,
                     help="Class names, one per line (overrides the model's own)."),
        click.option("--index-names", is_flag=True, envvar="IGD_INDEX_NAMES", show_envvar=True,
                     help="Name classes class_0, class_1, ... when nothing else names them."),
        click.option("--device", envvar="IGD_DEVICE", show_envvar=True, metavar="DEVICE",
                     help="cpu, cuda, cuda:N or auto (CUDA when available).  [default: auto]"),
        click.option("--cuda/--cpu", "cuda", default=None,
                     help="The predecessor's switch: --device cuda or --device cpu."),
    ]
    for option in reversed(options):
        command = option(command)

    @functools.wraps(command)
    def with_device(*args: Any, device: str | None, cuda: bool | None, **kwargs: Any) -> Any:
        if cuda is not None and device is not None and device != ("cuda" if cuda else "cpu"):
            raise click.UsageError(f"--{'cuda' if cuda else 'cpu'} contradicts --device {device}")
        if device is None:
            device = "auto" if cuda is None else ("cuda" if cuda else "cpu")
        return command(*args, device=device, **kwargs)

    return with_device


def load_from_options(**options: Any) -> Any:
    """`load_model` with the model options; a ModelError becomes a one-line CLI error."""
    from igd.models import ModelError, load_model

    try:
        return load_model(**options)
    except ModelError as error:
        raise click.ClickException(str(error)) from None


def compute_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """--max-batch, --memory-format, --precision and --compile (igd.worker.ComputeSettings), shared by
    `serve`, `check` and `batch`; the command gets ``compute``, their values for
    :func:`compute_settings` (which imports torch: the command calls it once its flags are checked)."""
    options = [
        click.option("--max-batch", default="auto", callback=_parse_max_batch, envvar="IGD_MAX_BATCH",
                     show_envvar=True, show_default=True,
                     help="Path points per forward+backward pass. auto: the fastest, measured once per model "
                          "(its weights), input size, device, threads, memory, precision, memory format and "
                          "compiler and kept in the cache directory ($IGD_CACHE_DIR, else systemd's "
                          "$CACHE_DIRECTORY, else $XDG_CACHE_HOME/igd or ~/.cache/igd), so every start chooses "
                          "the same; measure: measure again now."),
        click.option("--memory-format", type=click.Choice(["contiguous", "channels_last"]), default="contiguous",
                     envvar="IGD_MEMORY_FORMAT", show_envvar=True, show_default=True,
                     help="Weight layout. channels_last is faster for some models on some CPUs but moves IG by "
                          "about 1e-4 (measured and logged at start-up); contiguous is exact."),
        click.option("--precision", type=click.Choice(["float32", "tf32"]), default="float32",
                     envvar="IGD_PRECISION", show_envvar=True, show_default=True,
                     help="float32 is exact. tf32 lets CUDA's tensor cores round float32 convolutions and matmuls "
                          "to TF32: up to 6x the throughput on an H100, but IG moves by 4-9 % (relative L2; "
                          "measured and logged at start-up). No effect on a CPU."),
        click.option("--compile", "compile_model", is_flag=True, envvar="IGD_COMPILE", show_envvar=True,
                     help="Compile the model's forward and backward with torch.compile (inductor) at start-up. "
                          "Takes minutes and a C++ compiler; moves IG slightly (other kernels, other rounding; "
                          "measured and logged at start-up). Off: eager PyTorch, exact against captum."),
    ]
    for option in reversed(options):
        command = option(command)

    @functools.wraps(command)
    def with_settings(*args: Any, max_batch: int | str, memory_format: str, precision: str, compile_model: bool,
                      **kwargs: Any) -> Any:
        compute = {"max_batch": max_batch if isinstance(max_batch, int) else None, "remeasure": max_batch == "measure",
                   "memory_format": memory_format, "precision": precision, "compile": compile_model}
        return command(*args, compute=compute, **kwargs)

    return with_settings


def compute_settings(compute: dict[str, Any], **more: Any) -> Any:
    """igd.worker.ComputeSettings from :func:`compute_options`' ``compute`` and ``more`` (the
    command's own: max_images, queue_size). Imports torch."""
    from igd.worker import ComputeSettings

    return ComputeSettings(**compute, **more)


def _parse_max_batch(_ctx: click.Context, _param: click.Parameter, value: str) -> int | str:
    if value in ("auto", "measure"):
        return value
    if value.isdigit() and int(value) > 0:
        return int(value)
    raise click.BadParameter("use 'auto', 'measure' or a positive number of path points")


def _parse_shard(_ctx: click.Context, _param: click.Parameter, value: str | None) -> tuple[int, int] | None:
    """--shard I/N with 1 <= I <= N, checked with the other flags (before torch); exit status 1."""
    if not value:
        return None
    try:
        index, count = (int(part) for part in value.split("/"))
    except ValueError:
        raise click.ClickException(f"--shard must look like I/N (e.g. 2/8), got {value!r}") from None
    if not 1 <= index <= count:
        raise click.ClickException(f"--shard {value}: I must be between 1 and N")
    return index, count


_SIZE_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def _parse_size(_ctx: click.Context, _param: click.Parameter, value: str) -> int | None:
    """'auto' (None), or bytes with an optional K, M, G or T (powers of 1024)."""
    if value == "auto":
        return None
    text = value.strip().upper().removesuffix("B").removesuffix("I")
    number, unit = (text[:-1], text[-1]) if text and text[-1] in _SIZE_UNITS else (text, "")
    try:
        size = int(float(number) * _SIZE_UNITS[unit])
    except ValueError:
        raise click.BadParameter(f"use 'auto' or a size such as 2G, 512M or 1073741824, got {value!r}") from None
    if size < 2**20:
        raise click.BadParameter(f"{value} is less than 1M")
    return size


def _log_level_option(default: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    return click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default=default,
                        envvar="IGD_LOG_LEVEL", show_envvar=True, show_default=True,
                        help="Least important log lines written to stderr (one key=value line per event).")


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="igd")
def main() -> None:
    """igd: Integrated Gradients attributions for PyTorch image classifiers.

    \b
    Commands:
      serve            the daemon: load a model once, answer igctl on a Unix socket
      check            load a model as the daemon does, classify and attribute one image
      batch            attribute a whole dataset (directory, glob or manifest) to files
      install-systemd  install the systemd units, the igd user and /etc/igd/igd.env

    \b
    Examples:
      igd check                                  # the built-in EfficientNet-Lite0, self-test
      igd serve &                                # then: igctl attribute cat.jpg "tiger cat"
      igd serve -bp bit_model.pth --cpu          # the predecessor's BiT checkpoint
      igd batch photos/ results/ --target "tiger cat" --steps 100
      sudo igd install-systemd --dry-run
    """


@main.command(short_help="Load a model as the daemon does; classify and attribute one image.")
@model_options
@click.option("--image", type=_FILE, help="Image to classify and attribute [default: a bundled cat photo].")
@attribute_flags
@compute_options
def check(image: Path | None, compute: dict[str, Any], **args: Any) -> None:
    """Load a model exactly as `igd serve` does (same loading, warm-up and compute worker),
    classify IMAGE and attribute it to its most likely class, and print what happened.

    Exits non-zero, with the reason, if anything fails, and when the attribution's estimated
    error or completeness gap is beyond 50 % (it is then not to be trusted as it stands).

    \b
    Examples:
      igd check
      igd check -bp bit_model.pth --cpu --image horse.jpg
      igd check --model net.pt --steps 128          # TorchScript + net.pt.json sidecar
      igd check --model resnet18 --weights resnet18.pth --classes classes.txt
    """
    model_args = {name: args.pop(name) for name in MODEL_ARGS}
    request = checked_request(args)  # before anything imports torch: a usage error is at once

    from igd.check import run_check
    from igd.models import ModelError
    from igd.worker import WorkerError

    settings = compute_settings(compute)
    started = time.perf_counter()
    model = load_from_options(**model_args)
    load_s = time.perf_counter() - started
    data = image.read_bytes() if image else resources.files("igd").joinpath("data", SAMPLE_IMAGE).read_bytes()
    label = str(image or SAMPLE_IMAGE)
    try:
        report = run_check(model, data, label, request, settings)
    except ModelError as error:  # --compile failed
        raise click.ClickException(str(error)) from None
    except spec.RequestFailed as failure:
        raise click.ClickException(f"{label}: {failure.message}") from None
    except WorkerError as error:
        raise click.ClickException(f"{label}: {error}") from None
    for label, value in [*report.rows, ("load", f"{load_s:.2f} s")]:
        click.echo(f"{label:<12} {value}")
    if report.problems:
        raise click.ClickException("; ".join(report.problems))
    click.echo("ok")


@main.command(short_help="Run the daemon: load a model once, answer requests on a Unix socket.")
@model_options
@click.option("--socket", "socket_path", type=click.Path(path_type=Path), envvar="IGD_SOCKET", show_envvar=True,
              help="Socket to listen on [default: /run/igd/igd.sock as root, else $XDG_RUNTIME_DIR/igd.sock]. "
                   "Ignored under socket activation.")
@compute_options
@click.option("--max-images", type=click.IntRange(1, 1024), default=32, envvar="IGD_MAX_IMAGES", show_envvar=True,
              show_default=True, help="Most queued requests batched into one pass.")
@click.option("--queue-size", type=click.IntRange(1), default=64, envvar="IGD_QUEUE_SIZE", show_envvar=True,
              show_default=True, help="Requests waiting for compute before new ones get 'overloaded'.")
@click.option("--max-frame-bytes", type=click.IntRange(1024), default=DEFAULT_MAX_FRAME_BYTES,
              envvar="IGD_MAX_FRAME_BYTES", show_envvar=True, show_default=True,
              help="Largest request frame accepted (and so the largest image file).")
@click.option("--max-pixels", type=click.IntRange(1), default=spec.DEFAULT_MAX_PIXELS, envvar="IGD_MAX_PIXELS",
              show_envvar=True, show_default=True, help="Largest decoded image, in pixels.")
@click.option("--max-steps", type=click.IntRange(1), default=spec.MAX_STEPS, envvar="IGD_MAX_STEPS",
              show_envvar=True, show_default=True, help="Largest n_steps a request may ask for.")
@click.option("--memory-budget", default="auto", callback=_parse_size, envvar="IGD_MEMORY_BUDGET", show_envvar=True,
              show_default=True, metavar="BYTES",
              help="Memory all requests together may hold: frames, expected answers, answers not yet read "
                   "(e.g. 2G, 512M). A request that does not fit gets 'overloaded'. auto: half the available "
                   "memory at start-up.")
@click.option("--max-outstanding", type=click.IntRange(1, 4096), default=16, envvar="IGD_MAX_OUTSTANDING",
              show_envvar=True, show_default=True,
              help="Requests one connection may have in progress; igd reads no more from it until one is answered.")
@click.option("--request-timeout", type=click.FloatRange(min=0.1), default=600.0, envvar="IGD_REQUEST_TIMEOUT",
              show_envvar=True, show_default=True, help="Seconds from a request's arrival to its answer.")
@click.option("--idle-timeout", type=click.FloatRange(min=0.1), default=300.0, envvar="IGD_IDLE_TIMEOUT",
              show_envvar=True, show_default=True, help="Seconds a connection may take to send its next frame.")
@click.option("--drain-timeout", type=click.FloatRange(min=0.0), default=30.0, envvar="IGD_DRAIN_TIMEOUT",
              show_envvar=True, show_default=True, help="On SIGTERM, seconds to finish queued work before rejecting it.")
@click.option("--allow-uid", multiple=True, metavar="USER", envvar="IGD_ALLOW_UID", show_envvar=True,
              help="Only these users (names or uids) may connect; repeatable. Checked with the kernel's peer "
                   "credentials, on top of the socket's file permissions.")
@click.option("--allow-group", multiple=True, metavar="GROUP", envvar="IGD_ALLOW_GROUP", show_envvar=True,
              help="Only members of these groups may connect; repeatable.")
@_log_level_option("info")
def serve(
    socket_path: Path | None,
    compute: dict[str, Any],
    max_images: int,
    queue_size: int,
    max_frame_bytes: int,
    max_pixels: int,
    max_steps: int,
    memory_budget: int | None,
    max_outstanding: int,
    request_timeout: float,
    idle_timeout: float,
    drain_timeout: float,
    allow_uid: tuple[str, ...],
    allow_group: tuple[str, ...],
    log_level: str,
    **model_args: Any,
) -> None:
    """Run the daemon: load the model once, answer requests on a Unix socket.

    It answers `igctl status` from the moment the socket exists, while the model loads
    and warms up; under systemd it takes the socket from socket activation (LISTEN_FDS)
    and reports READY=1 only once the model is loaded and warmed up. SIGTERM drains and
    exits 0. Every option can also be set by its environment variable.

    \b
    Examples:
      igd serve                                   # built-in EfficientNet-Lite0
      igd serve -bp bit_model.pth --socket /tmp/igd.sock
      IGD_DEVICE=cuda:1 igd serve -lp lanet_model.pth --max-images 8
    """
    # A hang-up during the imports and loading below would otherwise end the process
    # (129): the daemon ignores SIGHUP from here on (igd.serve.daemon, igd.serve.server log it).
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    from igd import logs
    from igd.serve.access import AccessPolicy
    from igd.serve.daemon import ServeOptions, StartupError, serve_forever
    from igd.engine.memory import available_ram
    from igd.serve.service import Limits

    logs.configure(log_level)
    if memory_budget is not None and memory_budget < max_frame_bytes:
        raise click.BadParameter(f"{memory_budget:,} bytes cannot hold one request of --max-frame-bytes "
                                 f"{max_frame_bytes:,}", param_hint="--memory-budget")
    try:
        access = AccessPolicy.parse(allow_uid, allow_group)
    except ValueError as error:
        raise click.BadParameter(str(error), param_hint="--allow-uid/--allow-group") from None
    options = ServeOptions(
        socket_path=socket_path,
        compute=compute_settings(compute, max_images=max_images, queue_size=queue_size),
        limits=Limits(max_frame_bytes=max_frame_bytes, max_pixels=max_pixels, max_steps=max_steps,
                      request_timeout=request_timeout, idle_timeout=idle_timeout, max_outstanding=max_outstanding,
                      memory_budget=memory_budget or available_ram() // 2),
        drain_timeout=drain_timeout,
        access=access,
    )
    try:
        serve_forever(options, model_args, started=PROCESS_STARTED)
    except StartupError as error:
        logs.log("failed", level=40, error=str(error))
        raise click.ClickException(str(error)) from None


@main.command("install-systemd", short_help="Install the systemd units, the igd user and /etc/igd/igd.env.")
@click.option("--prefix", type=click.Path(path_type=Path, file_okay=False), default=Path("/"), show_default=True,
              help="Install under this root (for packaging, or to look first).")
@click.option("--igd", "igd_executable", type=click.Path(path_type=Path, dir_okay=False),
              help="The igd the units run [default: this one].")
@click.option("--dry-run", is_flag=True, help="Show what would be written; write nothing.")
def install_systemd(prefix: Path, igd_executable: Path | None, dry_run: bool) -> None:
    """Install igd.service, igd.socket, the per-GPU igd@.service/igd@.socket, the igd
    user (sysusers.d) and /etc/igd/igd.env, then print the systemctl commands to run.

    An existing /etc/igd/igd.env is kept (a fresh igd.env.example is written beside it).

    \b
    Examples:
      sudo /opt/igd/bin/igd install-systemd --dry-run
      sudo /opt/igd/bin/igd install-systemd
      igd install-systemd --prefix pkgroot/        # for packaging
    """
    import shutil
    import sys

    from igd.serve.install import NEXT_STEPS, install, plan, warnings_for

    if igd_executable is None:
        beside = Path(sys.executable).parent / "igd"
        found = beside if beside.is_file() else shutil.which("igd")
        if found is None:
            raise click.ClickException("cannot find the igd executable; give --igd PATH")
        igd_executable = Path(found)
    igd_executable = igd_executable.absolute()
    try:
        lines = install(plan(prefix, igd_executable), dry_run)
    except OSError as error:
        raise click.ClickException(f"{error.filename}: {error.strerror} (run as root, or use --prefix)") from None
    for line in lines + warnings_for(igd_executable):
        click.echo(line)
    click.echo(f"\nExecStart runs {igd_executable} serve\n")
    click.echo(NEXT_STEPS)


@main.command(short_help="Attribute a whole dataset: a directory, a glob or a manifest.")
@click.argument("source", metavar="INPUT")
@click.argument("out_dir", metavar="OUT_DIR", type=click.Path(path_type=Path, file_okay=False))
@model_options
@click.option("--target", "-t", "targets", multiple=True, metavar="CLASS",
              help="Class name or index to attribute every image to; repeatable [default: the predicted class]. "
                   "Manifest rows may name their own.")
@attribute_flags
@flag(spec.FORMAT, choices=spec.BATCH_FORMATS,
      help="torch: one gzip'd result file per image and target, as igctl writes; npz: the same for numpy; "
           "parquet: rows in shards of 256.")
@click.option("--dtype", type=click.Choice(["float16", "float32"]), default="float16", show_default=True,
              help="Parquet: the stored gradients' precision.")
@click.option("--with-steps", is_flag=True, help="Parquet: also store the per-step gradients (large).")
@click.option("--report", is_flag=True,
              help="Also write OUT_DIR/report.html, a browser report updated as results land (pictures in "
                   "OUT_DIR/report-files/).")
@click.option("--resume", is_flag=True, help="Skip the pairs already done in OUT_DIR; do the rest.")
@click.option("--shard", metavar="I/N", callback=_parse_shard,
              help="Process the I-th of N deterministic parts of the input (1-based).")
@click.option("--backend", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="local: in this process; ray: model-holding actors on a Ray cluster (pip install 'igd[ray]').")
@click.option("--address", help="Ray cluster address [default: start a local Ray, or RAY_ADDRESS].")
@click.option("--workers", type=click.IntRange(1), default=2, show_default=True, help="Ray: model-holding actors.")
@click.option("--gpus-per-worker", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="Ray: GPUs each actor reserves (fractions share a GPU).")
@compute_options
@_log_level_option("warning")
def batch(source: str, out_dir: Path, targets: tuple[str, ...], dtype: str, with_steps: bool, report: bool,
          resume: bool, shard: tuple[int, int] | None, backend: str, address: str | None, workers: int,
          gpus_per_worker: float, compute: dict[str, Any], log_level: str, **args: Any) -> None:
    """Attribute every image of INPUT (a directory, a glob, or a CSV / JSON-lines manifest
    with path, target and id columns) and write the results under OUT_DIR, with one line
    per image and target in OUT_DIR/status.jsonl. A bad image or target is recorded
    there and skipped; the exit status is 1 if any pair failed.

    \b
    Examples:
      igd batch photos/ results/ -bp bit_model.pth -t cat -t dog
      igd batch manifest.csv results/ --format parquet --steps 100
      igd batch 'photos/**/*.jpg' results/ --shard 2/8 --resume
      igd batch photos/ results/ --report      # then open results/report.html
    """
    model_args = {name: args.pop(name) for name in MODEL_ARGS}
    fmt = args.pop("format") or spec.FORMAT.default
    if fmt not in spec.BATCH_FORMATS:
        raise click.UsageError(f"--format must be one of {', '.join(spec.BATCH_FORMATS)}, got {fmt!r}")
    request = checked_request({**args, "format": fmt if fmt != "parquet" else spec.FORMAT.default})
    if request.top_k is not None and targets:
        raise click.UsageError("give --top-k or --target, not both: --top-k picks each image's most likely classes")

    # Every flag is checked: only now torch (igd.batch's runner, igd.models).
    from igd import logs
    from igd.batch import BatchOptions, InputError, run_batch
    from igd.models import ModelError

    logs.configure(log_level)
    options = BatchOptions(request=request, fmt=fmt, dtype=dtype, with_steps=with_steps, report=report,
                           compute=compute_settings(compute, queue_size=1 << 30))
    try:
        summary = run_batch(source, out_dir, targets=targets, model_args=model_args, options=options,
                            shard=shard, resume=resume, backend=backend,
                            address=address, workers=workers, gpus_per_worker=gpus_per_worker)
    except (InputError, ModelError) as error:
        raise click.ClickException(str(error)) from None
    except ImportError as error:
        extra = "ray" if backend == "ray" else "parquet"
        raise click.ClickException(f"{error.name} is needed for this: pip install 'igd[{extra}]'") from None
    click.echo(f"{summary.pairs} pairs: {summary.ok} done now, {summary.skipped} done before, {summary.failed} failed "
               f"(see {out_dir}/status*.jsonl)")
    if summary.report is not None:
        click.echo(f"report written to {summary.report}")
    if summary.failed:
        raise SystemExit(1)
