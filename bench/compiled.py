"""What `igd serve --compile` (torch.compile, inductor) gains and costs, against eager.

    python bench/compiled.py                         # BiT-S-R101x3, LaNet C=128, EfficientNet-Lite0
    python bench/compiled.py --models effnet --repeats 5

Each model in a fresh process, loaded as igd serves it: the chunk igd's tuner picks for
the eager model (used by both sides), then a 50-step Gauss-Legendre attribution of
chelsea.jpg eager and compiled (median of ``--repeats`` after one run), the compile time
(igd.tuning.warmup.compile_module: the first compiled attribution, 8 steps), the peak RSS the
compiled model added, and how far compiling moves IG (relative L2 against eager at 8
steps, as the daemon logs it, and at 50). Not a test: no asserts.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from chunks import load, model_label
from models import IMAGE, describe_machine
from PIL import Image
from report import compiled_table  # the same tables as docs/benchmarks.md

from igd.engine.attribution import attribute
from igd.tuning.search import choose_max_batch
from igd.tuning.warmup import compile_module


def peak_rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def child(name: str, repeats: int, steps: int) -> dict[str, object]:
    with tempfile.TemporaryDirectory(prefix="igd-compiled-", dir="/tmp") as work:
        model, _args = load(name, Path(work))
    x = model.preprocess(Image.open(IMAGE).convert("RGB"))
    with torch.no_grad():
        target = int(model.module(x).argmax())
    chunk = choose_max_batch(model.module, x).max_batch

    def timed(module: torch.nn.Module) -> tuple[float, torch.Tensor]:
        started = time.perf_counter()
        ig = attribute(module, x, target, n_steps=steps, max_batch=chunk).integrated_grads
        return time.perf_counter() - started, ig

    _, eager_ig = timed(model.module)
    eager_s = statistics.median(timed(model.module)[0] for _ in range(repeats))
    before = peak_rss_mib()
    compiled, compile_s, moved_8 = compile_module(model.module, x)
    first_s, compiled_ig = timed(compiled)
    compiled_s = statistics.median(timed(compiled)[0] for _ in range(repeats))
    moved = float((compiled_ig - eager_ig).norm() / eager_ig.norm())
    return {"model": name, "label": model_label(name), "chunk": chunk, "steps": steps, "eager_s": eager_s,
            "compiled_s": compiled_s, "speedup": eager_s / compiled_s, "compile_s": compile_s,
            "first_compiled_s": first_s, "peak_rss_added_mib": peak_rss_mib() - before,
            "ig_deviation_8_steps": moved_8, "ig_deviation": moved}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="bit,lanet,effnet")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--timeout", type=float, default=1800, help="Seconds one model may take, compiling included.")
    parser.add_argument("--json", type=Path, help="Also write the measurements here.")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.repeats, args.steps)))
        return
    rows = []
    for name in args.models.split(","):
        command = [sys.executable, __file__, "--child", name.strip(), "--repeats", str(args.repeats),
                   "--steps", str(args.steps)]
        try:
            run = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout)
        except subprocess.TimeoutExpired:
            rows.append({"model": name, "label": model_label(name), "timeout_s": args.timeout})
        else:
            if run.returncode != 0:
                print(f"{name}: failed\n{run.stderr[-2000:]}", flush=True)
                continue
            rows.append(json.loads(run.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    data = {"machine": describe_machine(), "repeats": args.repeats, "rows": rows}
    print("\n".join(compiled_table(data)))
    if args.json:
        args.json.write_text(json.dumps(data, indent=2))


if __name__ == "__main__":
    main()
