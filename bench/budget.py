"""Does ``--memory-budget`` bound the daemon? Peak resident memory of a real `igd serve`
(the default model, defaults otherwise) for the request kinds that used to escape its
ledger, first one at a time (what the ledger reserved next to what the process really
took), then 4 pipelined on each of 4 connections under a small budget.

    python bench/budget.py [--budget 256M] [--json out.json]

Peaks are VmHWM above the ready daemon's resident memory, reset (clear_refs) before each
measurement. The calibration run uses a budget large enough for every kind alone.
"""

from __future__ import annotations

import argparse
import io
import json
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from igd import protocol
from memory import memory, reset_peak
from models import IMAGE, describe_machine

BIN = Path(sys.executable).parent
MIB = 2**20

# name -> (image, wire args): the probe's kinds, and the defaults for scale.
KINDS: dict[str, tuple[str, dict[str, Any]]] = {
    "defaults (50 steps)": ("photo", {"n_steps": 50}),
    "1 step, top_k 16, insertion+deletion": ("photo", {"n_steps": 1, "top_k": 16, "metrics": ["insertion", "deletion"]}),
    "top_k 16 x 64 noisy paths + metrics + IDGI": ("photo", {"n_steps": 1, "top_k": 16, "samples": 64, "noise": 0.1,
                                                           "metrics": ["insertion", "deletion"], "idgi": True}),
    "49 Mpx JPEG, 1 step": ("huge", {"n_steps": 1}),
    "49 Mpx JPEG, top_k 4, heatmap": ("huge", {"n_steps": 1, "top_k": 4, "heatmap": True}),
    "1024 steps": ("photo", {"n_steps": 1024, "gzip_level": 0}),
}


def huge_jpeg(side: int = 7000) -> bytes:
    """A 49 Mpx photo-like JPEG (smooth gradients, a few MB)."""
    y, x = np.mgrid[0:side, 0:side].astype(np.float32) / side
    pixels = np.stack([x * 255, y * 255, (x + y) * 127], axis=2).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "JPEG", quality=85)
    return out.getvalue()


class Daemon:
    def __init__(self, budget: str, work: Path) -> None:
        self.socket = work / f"b{budget}.sock"
        self.process = subprocess.Popen([str(BIN / "igd"), "serve", "--socket", str(self.socket), "--device", "cpu",
                                         "--log-level", "warning", "--memory-budget", budget])
        subprocess.run([str(BIN / "igctl"), "--socket", str(self.socket), "status", "--wait", "--timeout", "600"],
                       check=True, capture_output=True)
        time.sleep(1.0)

    def status(self) -> dict[str, Any]:
        out = subprocess.run([str(BIN / "igctl"), "--socket", str(self.socket), "status", "--json"], check=True,
                             capture_output=True, text=True).stdout
        return json.loads(out)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(60)


def pipelined(path: Path, requests: list[dict[str, Any]]) -> list[str]:
    """Send every request on one connection before reading any answer; the codes ("ok" or
    the error code) in order."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(1800)
        sock.connect(str(path))
        sender = threading.Thread(target=lambda: [sock.sendall(protocol.request(i + 1, "attribute", args))
                                                  for i, args in enumerate(requests)])
        sender.start()
        codes = []
        while len(codes) < len(requests):
            kind, body = protocol.read_frame(sock, protocol.MAX_BODY_BYTES, (protocol.RESPONSE, protocol.EVENT))
            if kind == protocol.RESPONSE:
                codes.append("ok" if body.get("ok") else body["error"]["code"])
        sender.join()
        return codes


def measure(daemon: Daemon, connections: int, per_connection: int, args: dict[str, Any]) -> dict[str, Any]:
    pid = daemon.process.pid
    idle = memory(pid)["VmRSS"]
    reset_peak(pid)
    results: list[list[str]] = [[] for _ in range(connections)]

    def run(i: int) -> None:
        results[i] = pipelined(daemon.socket, [dict(args) for _ in range(per_connection)])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(connections)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - started
    peak = memory(pid)["VmHWM"] - idle
    codes = [code for codes in results for code in codes]
    ledger = daemon.status()["memory"]
    return {"peak_above_idle_mib": round(peak / MIB, 1), "codes": {c: codes.count(c) for c in sorted(set(codes))},
            "ledger_peak_mib": round(ledger["peak_accounted_bytes"] / MIB, 1), "seconds": round(seconds, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budgets", default="256M,1G", help="the budgets of the pipelined runs")
    parser.add_argument("--calibration-budget", default="16G", help="a budget every kind fits alone")
    parser.add_argument("--kinds", default=",".join(str(i) for i in range(len(KINDS))),
                        help="indices of the kinds to run (default all)")
    parser.add_argument("--json", type=Path)
    options = parser.parse_args()
    chosen = [list(KINDS)[int(i)] for i in options.kinds.split(",")]
    images = {"photo": IMAGE.read_bytes(), "huge": huge_jpeg()}
    work = Path(tempfile.mkdtemp(prefix="igdb-", dir="/tmp"))
    budgets = options.budgets.split(",")
    report: dict[str, Any] = {"machine": describe_machine(), "budgets": budgets, "alone": {},
                              **{f"pipelined {budget}": {} for budget in budgets}}

    for name in chosen:
        image, args = KINDS[name]
        for budget, key, connections, per_connection in ((options.calibration_budget, "alone", 1, 1),
                                                         *((b, f"pipelined {b}", 4, 4) for b in budgets)):
            daemon = Daemon(budget, work)  # a fresh one for each: freed memory a daemon keeps would hide a peak
            try:
                row = measure(daemon, connections, per_connection, {"image": images[image], **args})
                row["compute_working_set_mib"] = round(daemon.status()["memory"].get("compute_working_set_bytes", 0)
                                                       / MIB, 1)
            finally:
                daemon.stop()
            report[key][name] = row
            print(f"{key:15} {name:45} {json.dumps(row)}", flush=True)
            if options.json:
                options.json.write_text(json.dumps(report, indent=1))
    print_table(report)


def print_table(report: dict[str, Any]) -> None:
    budgets = report["budgets"]
    print(f"\n{report['machine']}; peak RSS above the ready daemon, MiB")
    print("| request kind | alone: reserved | alone: peak | "
          + " | ".join(f"4 x 4 pipelined, budget {b}: answers | peak" for b in budgets) + " |")
    print("|---|---|---|" + "---|---|" * len(budgets))
    for name, alone in report["alone"].items():
        cells = [name, str(alone["ledger_peak_mib"]), str(alone["peak_above_idle_mib"])]
        for budget in budgets:
            piped = report[f"pipelined {budget}"].get(name, {})
            cells.append(", ".join(f"{n} {c}" for c, n in piped.get("codes", {}).items()))
            cells.append(str(piped.get("peak_above_idle_mib", "")))
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
