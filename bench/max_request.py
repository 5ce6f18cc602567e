"""Memory of one maximal request: peak resident memory of `igd serve` above idle while it
answers one attribution at the advertised maximum of steps, against the answer's size.

    python bench/max_request.py [--steps 1024] [--gzip-level 1] [--json out.json]

The daemon runs the built-in EfficientNet-Lite0 on the CPU with defaults (its chunk size
measured afresh, in a cache of its own), and again with 2 path points per pass (the
activations of a pass are the part of the peak that does not grow with n_steps); igctl
asks for chelsea.jpg and writes the result to a file. Peak memory is the kernel's VmHWM, reset
once igd is ready (so start-up's chunk-size measurement does not count).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from memory import memory, reset_peak

BIN = Path(sys.executable).parent
IMAGE = Path(__file__).resolve().parents[1] / "igd" / "data" / "chelsea.jpg"


def measure(steps: int, gzip_level: int, max_batch: str) -> dict[str, object]:
    """One daemon, one maximal request: its answer and the daemon's memory."""
    work = Path(tempfile.mkdtemp(prefix="igd-max-", dir="/tmp"))
    sock = work / "igd.sock"
    daemon = subprocess.Popen([BIN / "igd", "serve", "--socket", str(sock), "--device", "cpu", "--max-batch", max_batch,
                               "--log-level", "warning"], env={**os.environ, "IGD_CACHE_DIR": str(work)})
    igctl = [str(BIN / "igctl"), "--socket", str(sock)]
    try:
        subprocess.run([*igctl, "status", "--wait", "600"], check=True, stdout=subprocess.DEVNULL)
        chunk = json.loads(subprocess.run([*igctl, "status", "--json"], check=True, capture_output=True).stdout)
        time.sleep(2.0)  # let warm-up's memory settle
        idle = memory(daemon.pid)["VmRSS"]
        if not reset_peak(daemon.pid):
            sys.exit("cannot reset the peak (write /proc/PID/clear_refs): run as the daemon's owner")
        started = time.perf_counter()
        out = work / "max.gzip"
        subprocess.run([*igctl, "attribute", str(IMAGE), "--steps", str(steps), "--gzip-level", str(gzip_level),
                        "-o", str(out)], check=True, stdout=subprocess.DEVNULL)
        seconds = time.perf_counter() - started
        peak = memory(daemon.pid)["VmHWM"]
        answer = out.stat().st_size
    finally:
        daemon.terminate()
        daemon.wait(120)
        shutil.rmtree(work, ignore_errors=True)
    return {
        "max_batch": f"{max_batch} ({chunk['batching']['max_batch_points']})" if max_batch == "auto" else max_batch,
        "steps": steps,
        "gzip_level": gzip_level,
        "answer_mib": round(answer / 2**20, 1),
        "idle_rss_mib": round(idle / 2**20, 1),
        "peak_rss_mib": round(peak / 2**20, 1),
        "peak_above_idle_mib": round((peak - idle) / 2**20, 1),
        "ratio_to_answer": round((peak - idle) / answer, 2),
        "seconds": round(seconds, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1024)
    parser.add_argument("--gzip-level", type=int, default=1)
    parser.add_argument("--max-batch", default="auto,2", help="chunk sizes to run with, comma-separated")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    rows = [measure(args.steps, args.gzip_level, chunk) for chunk in args.max_batch.split(",")]
    print("| --max-batch | steps | answer | idle RSS | peak RSS | peak above idle | / answer | seconds |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['max_batch']} | {row['steps']} | {row['answer_mib']} MiB | {row['idle_rss_mib']} MiB | "
              f"{row['peak_rss_mib']} MiB | {row['peak_above_idle_mib']} MiB | {row['ratio_to_answer']}x | "
              f"{row['seconds']} |")
    if args.json:
        machine = f"{platform.machine()}, {os.cpu_count()} cores, torch {torch_version()}"
        args.json.write_text(json.dumps({"machine": machine, "rows": rows}, indent=1) + "\n")


def torch_version() -> str:
    return subprocess.run([sys.executable, "-c", "import torch; print(torch.__version__)"], capture_output=True,
                          text=True).stdout.strip()


if __name__ == "__main__":
    main()
