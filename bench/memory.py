"""Memory: peak RSS of igd per model, next to the predecessor's server (re-created in
bench/predecessor_server.py) on the same model; and igd's RSS after 200 requests
against after 10, to show it does not grow.

    python bench/memory.py [--models effnet,bit,lanet] [--growth-requests 200] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from e2e import build_args, free_port, predecessor_request
from models import IMAGE, build

BIN = Path(sys.executable).parent
HERE = Path(__file__).resolve().parent


def memory(pid: int) -> dict[str, int]:
    """Current (VmRSS) and peak (VmHWM) resident memory of a process, in bytes."""
    fields = {}
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = int(value.split()[0]) * 1024
    return fields


def reset_peak(pid: int) -> bool:
    """Start VmHWM afresh (Linux: write 5 to clear_refs; needs the right to), so that the
    next peak is the serving peak, not start-up's chunk-size measurement."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w", encoding="ascii") as clear:
            clear.write("5")
        return True
    except OSError:
        return False


def gib(value: int) -> str:
    return f"{value / 2**30:.2f}"


def measure_igd(name: str, work: Path, growth_requests: int) -> dict[str, object]:
    sock = work / f"{name}.sock"
    daemon = subprocess.Popen([BIN / "igd", "serve", "--socket", str(sock), "--device", "cpu", "--log-level", "warning",
                               *build_args(name, work)])
    igctl = [str(BIN / "igctl"), "--socket", str(sock)]
    try:
        while not sock.exists():
            time.sleep(0.1)
        subprocess.run([*igctl, "status"], check=True, stdout=subprocess.DEVNULL)
        warm = memory(daemon.pid)
        serving_peak_known = reset_peak(daemon.pid)
        attribute = [*igctl, "attribute", str(IMAGE), "--steps", "50", "-o", str(work / "out.gzip"), "--force"]
        subprocess.run(attribute, check=True, stdout=subprocess.DEVNULL)
        row: dict[str, object] = {
            "model": name,
            "startup_peak_rss": warm["VmHWM"],
            "warm_rss": warm["VmRSS"],
            "peak_rss_one_request": memory(daemon.pid)["VmHWM"] if serving_peak_known else None,
        }
        if growth_requests:
            cheap = [*attribute, "--steps", "8"]
            for _ in range(10):
                subprocess.run(cheap, check=True, stdout=subprocess.DEVNULL)
            after_10 = memory(daemon.pid)["VmRSS"]
            for _ in range(growth_requests - 10):
                subprocess.run(cheap, check=True, stdout=subprocess.DEVNULL)
            after_all = memory(daemon.pid)["VmRSS"]
            row.update(rss_after_10=after_10, rss_after_all=after_all, requests=growth_requests,
                       growth=after_all / after_10 - 1)
        return row
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(120)


def measure_predecessor(name: str, work: Path) -> int:
    port = free_port()
    server = subprocess.Popen([sys.executable, str(HERE / "predecessor_server.py"), "serve", "--model", name,
                               "--port", str(port)], stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout.readline().strip() == "ready"
        predecessor_request(IMAGE, "3", f"http://127.0.0.1:{port}/model/", work)
        return memory(server.pid)["VmHWM"]
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="effnet,bit,lanet")
    parser.add_argument("--growth-requests", type=int, default=200, help="on the first model; 0 to skip")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="igd-mem-", dir="/tmp"))
    machine = f"{platform.machine()}, {os.cpu_count()} cores, CPU"
    rows = []
    try:
        print(f"# memory, one 50-step request on chelsea.jpg ({machine})")
        print("| model | igd start-up peak (GiB) | igd after warm-up | igd peak serving one request | predecessor server peak |")
        print("|---|---|---|---|---|")
        for i, name in enumerate(n.strip() for n in args.models.split(",")):
            build(name, checkpoint_dir=work)
            row = measure_igd(name, work, args.growth_requests if i == 0 else 0)
            row["predecessor_peak_rss"] = measure_predecessor(name, work) if name == "bit" else None
            rows.append(row)
            theirs = gib(row["predecessor_peak_rss"]) if row["predecessor_peak_rss"] else "-"
            serving = gib(row["peak_rss_one_request"]) if row["peak_rss_one_request"] else "-"
            print(f"| {name} | {gib(row['startup_peak_rss'])} | {gib(row['warm_rss'])} | {serving} | {theirs} |", flush=True)
        growth = next((r for r in rows if "growth" in r), None)
        if growth:
            print(f"\nRSS of igd ({growth['model']}, 8-step requests): after 10 requests {gib(growth['rss_after_10'])} GiB, "
                  f"after {growth['requests']} {gib(growth['rss_after_all'])} GiB ({growth['growth']:+.1%})")
        if args.json:
            args.json.write_text(json.dumps({"machine": machine, "rows": rows}, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
