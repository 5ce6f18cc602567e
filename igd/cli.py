"""The `igd` command: `igd check` (load a model, self-test, print facts), `igd serve`."""

from __future__ import annotations

import functools
import time
from importlib import resources
from pathlib import Path
from typing import Any, Callable

import click

from igd import __version__

PROCESS_STARTED = time.monotonic()  # igd's uptime counts from here
SAMPLE_IMAGE = "chelsea.jpg"
_FILE = click.Path(path_type=Path, dir_okay=False)


def model_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """The options that choose and place the model, shared by `check` and `serve`."""
    options = [
        click.option("--bit-path", "-bp", type=_FILE, envvar="IGD_BIT_PATH", show_envvar=True,
                     help="A BiT ResNetV2 checkpoint in the predecessor's format."),
        click.option("--lanet-path", "-lp", "-lb", type=_FILE, envvar="IGD_LANET_PATH", show_envvar=True,
                     help="A LaNet training checkpoint (weights under model_state_dict)."),
        click.option("--model", "-m", metavar="PATH_OR_NAME", envvar="IGD_MODEL", show_envvar=True,
                     help="efficientnet-lite0 (the default), a TorchScript or torch.export file "
                          "with a sidecar, or a torchvision architecture name with --weights."),
        click.option("--weights", type=_FILE, envvar="IGD_WEIGHTS", show_envvar=True,
                     help="State dict file for --model NAME."),
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


def memory_format_option(command: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--memory-format", type=click.Choice(["contiguous", "channels_last"]), default="contiguous",
        envvar="IGD_MEMORY_FORMAT", show_envvar=True, show_default=True,
        help="Weight layout. channels_last is faster for some models on some CPUs but moves IG by about "
             "1e-4 (measured and logged at start-up); contiguous is exact.",
    )(command)


def precision_option(command: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--precision", type=click.Choice(["float32", "tf32"]), default="float32", envvar="IGD_PRECISION",
        show_envvar=True, show_default=True,
        help="float32 is exact. tf32 lets CUDA's tensor cores round float32 convolutions and matmuls to TF32: "
             "up to 6x the throughput on an H100, but IG moves by 4-9 % (relative L2; measured and logged at "
             "start-up). No effect on a CPU.",
    )(command)


def parse_max_batch(_ctx: click.Context, _param: click.Parameter, value: str) -> int | None:
    if value == "auto":
        return None
    if value.isdigit() and int(value) > 0:
        return int(value)
    raise click.BadParameter("use 'auto' or a positive number of path points")


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="igd")
def main() -> None:
    """igd: Integrated Gradients attributions for PyTorch image classifiers.

    `igd check` loads a model exactly as the daemon would and runs a self-test;
    `igd serve` runs the daemon.
    """


@main.command()
@model_options
@click.option("--image", type=_FILE, help="Image to classify and attribute [default: a bundled cat photo].")
@click.option("--steps", type=click.IntRange(1, 4096), default=50, show_default=True)
@click.option("--max-batch", default="auto", callback=parse_max_batch, show_default=True,
              help="Path points per forward pass, or 'auto' to measure the fastest.")
@memory_format_option
@precision_option
def check(image: Path | None, steps: int, max_batch: int | None, memory_format: str, precision: str,
          **model_args: Any) -> None:
    """Load a model, classify and attribute one image, print what happened.

    Exits non-zero, with the reason, if anything fails.
    """
    import torch

    from igd.attribution import attribute
    from igd.imaging import ImageError, decode_image
    from igd.tuning import choose_max_batch, tf32_deviation, use_memory_format

    started = time.perf_counter()
    model = load_from_options(**model_args)
    load_s = time.perf_counter() - started
    data = image.read_bytes() if image else resources.files("igd").joinpath("data", SAMPLE_IMAGE).read_bytes()
    try:
        picture = decode_image(data)
    except ImageError as error:
        raise click.ClickException(f"{image}: {error}") from None
    x = model.preprocess(picture)
    deviation = use_memory_format(model.module, x, memory_format)
    allow_tf32 = precision == "tf32" and model.device.type == "cuda"
    tf32_moved = tf32_deviation(model.module, x) if allow_tf32 else 0.0

    started = time.perf_counter()
    with torch.no_grad():
        logits = model.module(x)[0]
    classify_s = time.perf_counter() - started
    top = model.top_classes(logits, 5)

    started = time.perf_counter()
    choice = None if max_batch else choose_max_batch(model.module, x, limit=steps, allow_tf32=allow_tf32)
    tune_s = time.perf_counter() - started
    chunk = max_batch or choice.max_batch
    started = time.perf_counter()
    result = attribute(model.module, x, top[0][0], n_steps=steps, max_batch=chunk, allow_tf32=allow_tf32)
    attribute_s = time.perf_counter() - started

    rise = float(result.logits[0, top[0][0]] - result.baseline_logits[0, top[0][0]])
    delta = float(result.convergence_delta[0])
    c, h, w = model.input_shape
    rows = [
        ("model", f"{model.name}: {model.description}"),
        ("source", model.source),
        ("parameters", f"{model.num_parameters:,}"),
        ("input", f"{c}x{h}x{w} ({model.preprocessing.describe()})"),
        ("device", str(model.device) + (f", {memory_format} (IG moved by {deviation:.1e})" if deviation else "")
         + (f", tf32 (IG moved by {tf32_moved:.1e})" if allow_tf32 else "")),
        ("classes", _class_list(model.class_names)),
        ("image", f"{image or SAMPLE_IMAGE} ({picture.width}x{picture.height})"),
        ("top-5", "; ".join(f"{name} ({index}) {p:.3f}" for index, name, p in top)),
        ("attribution", f"target {top[0][1]!r}, {steps} gausslegendre steps, zero baseline, chunks of {chunk}"),
        ("convergence", f"delta {delta:+.4g} = sum(IG) - (F(x) - F(b)), {_percent(delta, rise)} of {rise:.4g}"),
        ("timings", f"load {load_s:.2f} s, classify {classify_s * 1000:.0f} ms, "
                    + (f"chunk tuning {tune_s:.2f} s, " if choice else "")
                    + f"attribute {attribute_s:.2f} s"),
    ]
    for label, value in rows:
        click.echo(f"{label:<12} {value}")
    click.echo("ok")


def _class_list(names: tuple[str, ...]) -> str:
    shown = ", ".join(names[:10])
    return f"{len(names)}: {shown}" + (", ..." if len(names) > 10 else "")


def _percent(delta: float, rise: float) -> str:
    return f"{abs(delta / rise):.1%}" if rise else "n/a"


@main.command()
@model_options
@click.option("--socket", "socket_path", type=click.Path(path_type=Path), envvar="IGD_SOCKET", show_envvar=True,
              help="Socket to listen on [default: /run/igd/igd.sock as root, else $XDG_RUNTIME_DIR/igd.sock]. "
                   "Ignored under socket activation.")
@click.option("--max-batch", default="auto", callback=parse_max_batch, envvar="IGD_MAX_BATCH", show_envvar=True,
              show_default=True, help="Path points per forward pass, or 'auto' to measure the fastest at start-up.")
@click.option("--max-images", type=click.IntRange(1, 1024), default=32, envvar="IGD_MAX_IMAGES", show_envvar=True,
              show_default=True, help="Most queued requests batched into one pass.")
@click.option("--queue-size", type=click.IntRange(1), default=64, envvar="IGD_QUEUE_SIZE", show_envvar=True,
              show_default=True, help="Requests waiting for compute before new ones get 'overloaded'.")
@click.option("--max-frame-bytes", type=click.IntRange(1024), default=64 * 1024 * 1024, envvar="IGD_MAX_FRAME_BYTES",
              show_envvar=True, show_default=True, help="Largest request frame accepted.")
@click.option("--max-pixels", type=click.IntRange(1), default=50_000_000, envvar="IGD_MAX_PIXELS", show_envvar=True,
              show_default=True, help="Largest decoded image, in pixels.")
@click.option("--max-steps", type=click.IntRange(1), default=1024, envvar="IGD_MAX_STEPS", show_envvar=True,
              show_default=True, help="Largest n_steps a request may ask for.")
@click.option("--request-timeout", type=click.FloatRange(min=0.1), default=600.0, envvar="IGD_REQUEST_TIMEOUT",
              show_envvar=True, show_default=True, help="Seconds from a request's arrival to its answer.")
@click.option("--idle-timeout", type=click.FloatRange(min=0.1), default=300.0, envvar="IGD_IDLE_TIMEOUT",
              show_envvar=True, show_default=True, help="Seconds a connection may take to send its next frame.")
@click.option("--drain-timeout", type=click.FloatRange(min=0.0), default=30.0, envvar="IGD_DRAIN_TIMEOUT",
              show_envvar=True, show_default=True, help="On SIGTERM, seconds to finish queued work before rejecting it.")
@memory_format_option
@precision_option
@click.option("--allow-uid", multiple=True, metavar="USER", envvar="IGD_ALLOW_UID", show_envvar=True,
              help="Only these users (names or uids) may connect; repeatable. Checked with the kernel's peer "
                   "credentials, on top of the socket's file permissions.")
@click.option("--allow-group", multiple=True, metavar="GROUP", envvar="IGD_ALLOW_GROUP", show_envvar=True,
              help="Only members of these groups may connect; repeatable.")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="info",
              envvar="IGD_LOG_LEVEL", show_envvar=True, show_default=True)
def serve(
    socket_path: Path | None,
    max_batch: int | None,
    max_images: int,
    queue_size: int,
    max_frame_bytes: int,
    max_pixels: int,
    max_steps: int,
    request_timeout: float,
    idle_timeout: float,
    drain_timeout: float,
    memory_format: str,
    precision: str,
    allow_uid: tuple[str, ...],
    allow_group: tuple[str, ...],
    log_level: str,
    **model_args: Any,
) -> None:
    """Run the daemon: load the model once, answer requests on a Unix socket.

    Under systemd it takes the socket from socket activation (LISTEN_FDS) and reports
    READY=1 only once the model is loaded and warmed up; SIGTERM drains and exits 0.
    """
    from igd import logs
    from igd.access import AccessPolicy
    from igd.daemon import ServeOptions, StartupError, serve_forever

    logs.configure(log_level)
    try:
        access = AccessPolicy.parse(allow_uid, allow_group)
    except ValueError as error:
        raise click.BadParameter(str(error), param_hint="--allow-uid/--allow-group") from None
    options = ServeOptions(
        socket_path=socket_path,
        max_batch=max_batch,
        max_images=max_images,
        queue_size=queue_size,
        max_frame_bytes=max_frame_bytes,
        max_pixels=max_pixels,
        max_steps=max_steps,
        request_timeout=request_timeout,
        idle_timeout=idle_timeout,
        drain_timeout=drain_timeout,
        memory_format=memory_format,
        precision=precision,
        access=access,
    )
    try:
        serve_forever(options, model_args, started=PROCESS_STARTED)
    except StartupError as error:
        logs.log("failed", level=40, error=str(error))
        raise click.ClickException(str(error)) from None


@main.command("install-systemd")
@click.option("--prefix", type=click.Path(path_type=Path, file_okay=False), default=Path("/"), show_default=True,
              help="Install under this root (for packaging, or to look first).")
@click.option("--igd", "igd_executable", type=click.Path(path_type=Path, dir_okay=False),
              help="The igd the units run [default: this one].")
@click.option("--dry-run", is_flag=True, help="Show what would be written; write nothing.")
def install_systemd(prefix: Path, igd_executable: Path | None, dry_run: bool) -> None:
    """Install igd.service, igd.socket, the per-GPU igd@.service/igd@.socket, the igd
    user (sysusers.d) and /etc/igd/igd.env, then print the systemctl commands to run.

    An existing /etc/igd/igd.env is kept (a fresh igd.env.example is written beside it).
    """
    import shutil
    import sys

    from igd.install import NEXT_STEPS, install, plan, warnings_for

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


@main.command()
@click.argument("source", metavar="INPUT")
@click.argument("out_dir", metavar="OUT_DIR", type=click.Path(path_type=Path, file_okay=False))
@model_options
@click.option("--target", "-t", "targets", multiple=True,
              help="Class name or index to attribute every image to; repeatable [default: the predicted class]. "
                   "Manifest rows may name their own.")
@click.option("--steps", type=click.IntRange(1, 4096), default=50, show_default=True)
@click.option("--method", type=click.Choice(["gausslegendre", "riemann_left", "riemann_right", "riemann_middle",
                                             "riemann_trapezoid"]), default="gausslegendre", show_default=True)
@click.option("--baseline", type=click.Choice(["zero", "black", "white", "blur", "uniform"]), default="zero",
              show_default=True)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the 'uniform' baseline.")
@click.option("--blur-sigma", type=click.FloatRange(min=0), help="Sigma of the 'blur' baseline, in model-input pixels.")
@click.option("--format", "fmt", type=click.Choice(["torch", "parquet"]), default="torch", show_default=True,
              help="torch: one gzip'd result file per image and target, as igctl writes; parquet: rows in shards.")
@click.option("--gzip-level", type=click.IntRange(0, 9), default=1, show_default=True,
              help="Torch format: compression of the result files (0 fastest, still gzip; 9 smallest).")
@click.option("--dtype", type=click.Choice(["float16", "float32"]), default="float16", show_default=True,
              help="Parquet: the stored gradients' precision.")
@click.option("--with-steps", is_flag=True, help="Parquet: also store the per-step gradients (large).")
@click.option("--resume", is_flag=True, help="Skip the pairs already done in OUT_DIR; do the rest.")
@click.option("--shard", metavar="I/N", help="Process the I-th of N deterministic parts of the input (1-based).")
@click.option("--backend", type=click.Choice(["local", "ray"]), default="local", show_default=True)
@click.option("--address", help="Ray cluster address [default: start a local Ray, or RAY_ADDRESS].")
@click.option("--workers", type=click.IntRange(1), default=2, show_default=True, help="Ray: model-holding actors.")
@click.option("--gpus-per-worker", type=click.FloatRange(min=0), default=0.0, show_default=True)
@click.option("--max-batch", default="auto", callback=parse_max_batch, show_default=True,
              help="Path points per forward pass, or 'auto' to measure the fastest.")
@memory_format_option
@precision_option
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="warning",
              show_default=True)
def batch(source: str, out_dir: Path, targets: tuple[str, ...], steps: int, method: str, baseline: str, seed: int,
          blur_sigma: float | None, fmt: str, gzip_level: int, dtype: str, with_steps: bool, resume: bool, shard: str | None,
          backend: str, address: str | None, workers: int, gpus_per_worker: float, max_batch: int | None,
          memory_format: str, precision: str, log_level: str, **model_args: Any) -> None:
    """Attribute every image of INPUT (a directory, a glob, or a CSV / JSON-lines manifest
    with path, target and id columns) and write the results under OUT_DIR, with one line
    per image and target in OUT_DIR/status.jsonl. A bad image or target is recorded
    there and skipped; the exit status is 1 if any pair failed.
    """
    from igd import logs
    from igd.batch import BatchOptions, InputError, run_batch
    from igd.batch.inputs import parse_shard
    from igd.models import ModelError

    logs.configure(log_level)
    options = BatchOptions(n_steps=steps, method=method, baseline=baseline, seed=seed, blur_sigma=blur_sigma,
                           fmt=fmt, dtype=dtype, with_steps=with_steps, memory_format=memory_format,
                           precision=precision, gzip_level=gzip_level)
    try:
        summary = run_batch(source, out_dir, targets=targets, model_args=model_args, options=options,
                            shard=parse_shard(shard) if shard else None, resume=resume, backend=backend,
                            max_batch=max_batch, address=address, workers=workers, gpus_per_worker=gpus_per_worker)
    except (InputError, ModelError) as error:
        raise click.ClickException(str(error)) from None
    except ImportError as error:
        raise click.ClickException(f"{error.name} is needed for this: pip install 'igd[ray]'") from None
    click.echo(f"{summary.pairs} pairs: {summary.ok} done now, {summary.skipped} done before, {summary.failed} failed "
               f"(see {out_dir}/status*.jsonl)")
    if summary.failed:
        raise SystemExit(1)
