"""Client overhead: wall time of `igctl status` and `igctl attribute` against a running
igd (built-in EfficientNet-Lite0), next to `python -c "import torch"`.

    python bench/client.py [--repeats 15]

Starts its own igd on a temporary socket; alternates the commands; prints medians.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BIN = Path(sys.executable).parent
IMAGE = Path(__file__).resolve().parents[1] / "igd" / "data" / "chelsea.jpg"


def wall(command: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="igd-bench-", dir="/tmp"))
    socket = work / "igd.sock"
    daemon = subprocess.Popen([BIN / "igd", "serve", "--socket", str(socket), "--device", "cpu", "--log-level", "warning"])
    try:
        igctl = [str(BIN / "igctl"), "--socket", str(socket)]
        while not socket.exists():
            time.sleep(0.1)
        subprocess.run([*igctl, "status"], check=True, stdout=subprocess.DEVNULL)  # waits until ready
        commands = {
            "igctl status": [*igctl, "status"],
            "igctl attribute (EfficientNet-Lite0, 50 steps)": [*igctl, "attribute", str(IMAGE), "--steps", "50", "-o", str(work / "out.gzip"), "--force"],
            'python -c "import torch"': [sys.executable, "-c", "import torch"],
            "igctl --version (no daemon round trip)": [*igctl, "--version"],
        }
        times: dict[str, list[float]] = {name: [] for name in commands}
        for _ in range(args.repeats):
            for name, command in commands.items():
                times[name].append(wall(command))
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(60)
        shutil.rmtree(work, ignore_errors=True)
    baseline = statistics.median(times['python -c "import torch"'])
    machine = f"{platform.machine()}, {os.cpu_count()} cores, CPU"
    print(f"# client wall time, median of {args.repeats} ({machine})")
    print("| command | median (ms) | vs import torch |")
    print("|---|---|---|")
    rows = []
    for name, values in times.items():
        median = statistics.median(values)
        rows.append({"command": name, "median_s": median, "vs_import_torch": median / baseline, "runs": values})
        print(f"| {name} | {median * 1000:.0f} | {median / baseline:.2f}x |")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
