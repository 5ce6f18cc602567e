"""What several targets cost: k targets in one request against k requests of one target.

    python bench/targets.py                          # EfficientNet-Lite0 and the BiT fixture, k = 1, 3, 5
    python bench/targets.py --models effnet --ks 1,5 --repeats 5

Each (model, k, way) runs in a fresh process through igd's own worker (the chunk size
the daemon would use: measured at warm-up, or cached), so its peak RSS is its own:
"one request" is one job with k targets (one forward and k backwards per chunk), "k
requests" is k jobs of one target each, one after the other (what captum and every tool
without multi-target passes do). Times are compute only (no decoding or file encoding),
medians of ``--repeats`` after a warm-up run. A second table compares the two ways to
take k input gradients from one forward: k backwards through the retained graph (igd's)
and one batched vector-Jacobian product (``torch.autograd.grad(..., is_grads_batched=True)``).
Not a test: no asserts.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image
from report import targets_table  # the same tables as docs/benchmarks.md

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from reference import assemble  # noqa: E402  (the BiT fixture, as the tests build it)

from igd import pipeline  # noqa: E402
from igd.engine.attribution import engine_mode  # noqa: E402
from igd.engine.baselines import make_paths  # noqa: E402
from igd.models import LoadedModel, load_model  # noqa: E402
from igd.request import parse_attribute  # noqa: E402
from igd.worker import Classify, ComputeSettings, Worker  # noqa: E402

IMAGE = Path(__file__).resolve().parents[1] / "igd" / "data" / "chelsea.jpg"
MODELS = {"effnet": "EfficientNet-Lite0 (pretrained), 224x224", "bit": "BiT fixture (bit-tiny), 32x32"}


def load(name: str, fixtures: Path) -> LoadedModel:
    return load_model() if name == "effnet" else load_model(bit_path=fixtures / "bit-tiny.pth")


def child(name: str, k: int, way: str, steps: int, repeats: int, fixtures: Path) -> dict:
    """One (model, k, way) in this process: compute times and peak RSS."""
    model = load(name, fixtures)
    worker = Worker.warmed_up(model, ComputeSettings())
    request = parse_attribute({"n_steps": steps})
    paths = make_paths(Image.open(IMAGE).convert("RGB"), model.preprocessing, request)
    ranked = model.top_classes(worker.submit(Classify(inputs=paths.inputs)).result(), k)
    targets = tuple(index for index, _name, _p in ranked)

    def run() -> float:
        started = time.perf_counter()
        if way == "one":
            worker.submit(pipeline.job(paths, targets if k > 1 else targets[0], request)).result()
        else:
            for target in targets:
                worker.submit(pipeline.job(paths, target, request)).result()
        return time.perf_counter() - started

    run()  # warm-up
    Path("/proc/self/clear_refs").write_text("5")  # resets the peak (VmHWM) to the current RSS
    before = _status_mib("VmRSS")
    times = [run() for _ in range(repeats)]
    worker.close()
    worker.join()
    assert worker.warm_up is not None
    return {"model": name, "k": k, "way": way, "median_s": statistics.median(times), "times": times,
            "chunk": worker.warm_up.max_batch, "peak_above_mib": _status_mib("VmHWM") - before}


def _status_mib(field: str) -> float:
    """A memory figure of this process from /proc/self/status, in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def vjp_child(name: str, k: int, chunk: int, repeats: int, fixtures: Path) -> dict:
    """ms per path point of one forward plus k input gradients, two ways."""
    model = load(name, fixtures)
    x = model.preprocess(Image.open(IMAGE).convert("RGB")).repeat(chunk, 1, 1, 1)
    results = {}
    with engine_mode(False, [model.module]):
        for way in ("retained", "batched"):
            times = []
            for _ in range(repeats + 1):
                leaf = x.clone().requires_grad_(True)
                started = time.perf_counter()
                picked = model.module(leaf)[:, :k]
                if way == "retained":
                    for t in range(k):
                        torch.autograd.grad(picked[:, t].sum(), leaf, retain_graph=t < k - 1)
                else:
                    rows = torch.eye(k).unsqueeze(1).expand(k, chunk, k)
                    torch.autograd.grad(picked, leaf, grad_outputs=rows, is_grads_batched=True)
                times.append(time.perf_counter() - started)
            results[way] = statistics.median(times[1:]) / chunk * 1000
    return {"model": name, "k": k, "chunk": chunk, "ms_per_point": results}


def spawn(*args: str) -> dict:
    run = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, check=True)
    return json.loads(run.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="effnet,bit")
    parser.add_argument("--ks", default="1,3,5")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, help="Also write the measurements here.")
    parser.add_argument("--child", nargs=3, metavar=("MODEL", "K", "WAY"), help=argparse.SUPPRESS)
    parser.add_argument("--vjp", nargs=3, metavar=("MODEL", "K", "CHUNK"), help=argparse.SUPPRESS)
    parser.add_argument("--fixtures", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        name, k, way = args.child
        print(json.dumps(child(name, int(k), way, args.steps, args.repeats, args.fixtures)))
        return
    if args.vjp:
        name, k, chunk = args.vjp
        print(json.dumps(vjp_child(name, int(k), int(chunk), args.repeats, args.fixtures)))
        return

    ks = [int(k) for k in args.ks.split(",")]
    with tempfile.TemporaryDirectory(prefix="igd-targets-") as scratch:
        fixtures = assemble(Path(scratch) / "fixtures")
        common = ["--steps", str(args.steps), "--repeats", str(args.repeats), "--fixtures", str(fixtures)]
        runs, vjps = [], []
        for name in args.models.split(","):
            for k in ks:
                for way in ("one", "separate") if k > 1 else ("one",):
                    runs.append(spawn("--child", name, str(k), way, *common))
                    print(f"# {name} k={k} {way}: {runs[-1]['median_s']:.2f} s", file=sys.stderr, flush=True)
            chunk = runs[-1]["chunk"]
            for k in ks[1:]:
                vjps.append(spawn("--vjp", name, str(k), str(chunk), *common))
    data = {"machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, CPU",
            "steps": args.steps, "repeats": args.repeats, "models": MODELS, "runs": runs, "vjp": vjps}
    print(f"# {data['machine']}, {args.steps} Gauss-Legendre steps, medians of {args.repeats}")
    print("\n".join(targets_table(data)))
    if args.json:
        args.json.write_text(json.dumps(data, indent=1))


if __name__ == "__main__":
    main()
