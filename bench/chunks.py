"""How good is the chunk size igd chooses? Every size timed, against what `igd serve` picks.

    python bench/chunks.py                           # BiT-S-R101x3, LaNet C=128, EfficientNet-Lite0
    python bench/chunks.py --models effnet --every --repeats 5

For each model (full size; BiT and LaNet with random weights, loaded through igd's own
loader as the daemon serves them), in a fresh process, the sweep times one forward+backward of a chunk of
path points at each size up to the memory cap (igd.tuning.search.time_chunk, what the tuner
times): a call that builds the size's kernels, then the median of ``--repeats`` timed
calls, as ms per point. Sizes: every one up to 16, every second up to 32 and every
fourth above (``--every``: all of them).

Then a real `igd serve` with defaults and an empty cache directory, twice: on a quiet
machine and with another process keeping one core busy during its warm-up. Each row
shows the chunk the daemon picked (from `igctl status`), the sweep's time per point at
that size against the sweep's best, and how long the search took. Not a test: no asserts.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from models import IMAGE, build, describe_machine
from PIL import Image
from report import chunks_table  # the same tables as docs/benchmarks.md

from igd.models import LoadedModel, load_model
from igd.tuning.search import memory_cap, time_chunk

BIN = Path(sys.executable).parent
BUSY_LOOP = "while True: pass"


def load(name: str, work: Path) -> tuple[LoadedModel, list[str]]:
    """The model as `igd serve` loads it, and the arguments that make igd serve it."""
    if name == "effnet":
        return load_model(), []
    args = build(name, checkpoint_dir=work).igd_args
    source = {"-bp": "bit_path", "-lp": "lanet_path"}[args[0]]
    return load_model(**{source: Path(args[1])}), args


def sizes_to_sweep(cap: int, every: bool) -> list[int]:
    if every:
        return list(range(1, cap + 1))
    return sorted({size for size in range(1, cap + 1) if size <= 16 or (size <= 32 and size % 2 == 0)
                   or size % 4 == 0} | {cap})


def sweep(model: LoadedModel, repeats: int, every: bool) -> tuple[int, dict[int, float]]:
    """The memory cap and ms per point at every swept size."""
    x = model.preprocess(Image.open(IMAGE).convert("RGB"))
    cap = memory_cap(model.module, x)
    timings = {}
    for size in sizes_to_sweep(cap, every):
        time_chunk(model.module, x, size)
        timings[size] = statistics.median(time_chunk(model.module, x, size) for _ in range(repeats)) / size * 1000
        print(f"  chunk {size:3d}: {timings[size]:7.1f} ms per point", file=sys.stderr, flush=True)
    return cap, timings


def daemon_pick(args: list[str], busy: bool) -> dict[str, object]:
    """Start `igd serve` with defaults and an empty cache; what it picked and how."""
    work = Path(tempfile.mkdtemp(prefix="igd-chunks-", dir="/tmp"))
    sock = work / "igd.sock"
    environment = {**os.environ, "IGD_CACHE_DIR": str(work / "cache")}
    spinner = subprocess.Popen([sys.executable, "-c", BUSY_LOOP]) if busy else None
    started = time.perf_counter()
    igd = subprocess.Popen([BIN / "igd", "serve", "--socket", str(sock), "--device", "cpu", "--log-level", "warning",
                            *args], env=environment)
    try:
        igctl = [BIN / "igctl", "--socket", str(sock), "status", "--wait", "--json"]
        status = json.loads(subprocess.run(igctl, check=True, capture_output=True, text=True).stdout)
        ready_s = time.perf_counter() - started
    finally:
        if spinner is not None:
            spinner.kill()
        igd.terminate()
        igd.wait(120)
        shutil.rmtree(work, ignore_errors=True)
    batching = status["batching"]
    search = batching["chunk_search"]
    return {"busy": busy, "pick": batching["max_batch_points"], "source": batching["chunk_source"],
            "search_s": search["search_s"], "tried_ms_per_point": search["ms_per_point"], "ready_s": round(ready_s, 1)}


def sweep_child(name: str, work: Path, repeats: int, every: bool) -> dict[str, object]:
    """The sweep, in a process of its own: what ran before in a process (another model,
    other sizes) changes its timings by up to a half."""
    model, args = load(name, work)
    print(f"{model.description}", file=sys.stderr, flush=True)
    cap, timings = sweep(model, repeats, every)
    return {"memory_cap": cap, "ms_per_point": timings, "igd_args": args}


def bench_model(name: str, repeats: int, every: bool) -> dict[str, object]:
    work = Path(tempfile.mkdtemp(prefix="igd-chunks-", dir="/tmp"))
    try:
        command = [sys.executable, __file__, "--sweep", name, str(work), "--repeats", str(repeats)]
        run = subprocess.run(command + (["--every"] if every else []), stdout=subprocess.PIPE, text=True, check=True)
        swept = json.loads(run.stdout.strip().splitlines()[-1])
        timings = {int(size): ms for size, ms in swept["ms_per_point"].items()}
        picks = []
        for busy in (False, True):
            pick = daemon_pick(swept["igd_args"], busy)
            pick["sweep_ms_per_point"] = timings.get(pick["pick"])
            pick["over_best"] = None if pick["pick"] not in timings else timings[pick["pick"]] / min(timings.values())
            print(f"  igd serve ({'one core busy' if busy else 'quiet'}): {pick}", flush=True)
            picks.append(pick)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    best = min(timings, key=timings.__getitem__)
    return {"model": name, "label": model_label(name), "memory_cap": swept["memory_cap"], "ms_per_point": timings,
            "best": best, "best_ms_per_point": timings[best], "picks": picks}


def model_label(name: str) -> str:
    return {"bit": "BiT-S-R101x3 (random), 32x32", "lanet": "LaNet C=128 (random), 32x32",
            "effnet": "EfficientNet-Lite0, 224x224"}[name]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="bit,lanet,effnet")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--every", action="store_true", help="Time every size up to the memory cap.")
    parser.add_argument("--json", type=Path, help="Also write the measurements here.")
    parser.add_argument("--sweep", nargs=2, metavar=("MODEL", "WORK"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.sweep:
        print(json.dumps(sweep_child(args.sweep[0], Path(args.sweep[1]), args.repeats, args.every)))
        return
    print(f"# chunk sizes: forward+backward per path point ({describe_machine()})", flush=True)
    rows = [bench_model(name.strip(), args.repeats, args.every) for name in args.models.split(",")]
    data = {"machine": describe_machine(), "repeats": args.repeats, "every": args.every, "rows": rows}
    print("\n".join(chunks_table(data)))
    if args.json:
        args.json.write_text(json.dumps(data, indent=2))


if __name__ == "__main__":
    main()
