"""Soak: many clients, many requests, valid and invalid mixed, against one igd.

    python bench/soak.py --clients 16 --requests 30            # the default model, as long as it takes
    python bench/soak.py --bit-path fixtures/bit-tiny.pth --clients 16 --requests 8   # CI-sized

Every valid answer must equal the answer to the same request sent alone (relative L2
below 1e-5: images batched together may round differently in the last bits); every invalid
request must get its error code; nothing may hang. Afterwards the daemon must hold no
more file descriptors or threads than after warm-up, and its RSS must stay within 10 %
of what it was after warm-up (a first round at the same concurrency). Prints a table;
exits 1 if anything was lost, wrong or leaked.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import gzip
import io
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

import torch

from igctl.client import Client, RequestFailed

BIN = Path(sys.executable).parent
IMAGES = [Path(__file__).resolve().parents[1] / "igd" / "data" / "chelsea.jpg"]


def proc_status(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(f"{key}:"))


def snapshot(pid: int) -> dict[str, int]:
    return {"rss": proc_status(pid, "VmRSS") * 1024, "threads": proc_status(pid, "Threads"),
            "fds": len(os.listdir(f"/proc/{pid}/fd"))}


def requests_mix(images: list[bytes], steps: int) -> tuple[list[tuple[str, dict]], list[tuple[str, dict, str]]]:
    valid = [("attribute", {"image": images[i % len(images)], "target": i, "n_steps": steps}) for i in range(4)]
    valid += [("classify", {"image": image, "top": 3}) for image in images]
    invalid = [
        ("attribute", {"image": b"not an image", "n_steps": steps}, "bad_image"),
        ("attribute", {"image": images[0], "target": "no such class"}, "unknown_target"),
        ("attribute", {"image": images[0], "n_steps": 0}, "bad_request"),
        ("classify", {"image": "a path, not bytes"}, "bad_request"),
        ("explain", {}, "unknown_op"),
    ]
    return valid, invalid


def integrated(result: dict) -> torch.Tensor:
    return torch.load(io.BytesIO(gzip.decompress(result["data"])))["integrated_grads"]


def soak(socket_path: Path, clients: int, per_client: int, steps: int, images: list[bytes]) -> dict[str, object]:
    valid, invalid = requests_mix(images, steps)
    with Client(socket_path, timeout=3600) as client:
        alone = [client.call(op, args) for op, args in valid]
    counts: dict[str, int] = {}
    problems: list[str] = []
    worst = [0.0]  # the largest deviation from the single-request answer (relative L2)

    def client_run(c: int) -> None:
        with Client(socket_path, timeout=3600) as client:
            for r in range(per_client):
                k = (c * 7 + r) % (len(valid) + len(invalid))
                if k < len(valid):
                    op, args = valid[k]
                    try:
                        result = client.call(op, args)
                    except RequestFailed as error:
                        problems.append(f"client {c}, request {r}: {op} failed: {error}")
                        continue
                    if op == "classify":
                        deviation = max(abs(a["probability"] - b["probability"])
                                        for a, b in zip(result["top"], alone[k]["top"]))
                    else:
                        ours, single = integrated(result), integrated(alone[k])
                        deviation = float((ours - single).norm() / single.norm())
                    worst[0] = max(worst[0], deviation)
                    counts["ok"] = counts.get("ok", 0) + 1
                    if deviation > 1e-5:
                        problems.append(f"client {c}, request {r}: {op} differs from the same request alone "
                                        f"by {deviation:.1e}")
                else:
                    op, args, code = invalid[k - len(valid)]
                    try:
                        client.call(op, args)
                        problems.append(f"client {c}, request {r}: {op} should have been refused with {code}")
                    except RequestFailed as error:
                        counts[error.error.code] = counts.get(error.error.code, 0) + 1
                        if error.error.code != code:
                            problems.append(f"client {c}, request {r}: expected {code}, got {error.error.code}")

    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        for future in [pool.submit(client_run, c) for c in range(clients)]:
            future.result()
    return {"seconds": time.perf_counter() - started, "answers": counts, "problems": problems,
            "max_deviation": worst[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=30, help="per client")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--bit-path", type=Path, help="serve this BiT checkpoint instead of the default model")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    images = [path.read_bytes() for path in IMAGES]
    work = Path(tempfile.mkdtemp(prefix="igd-soak-", dir="/tmp"))
    socket_path = work / "igd.sock"
    model = ["-bp", str(args.bit_path)] if args.bit_path else []
    daemon = subprocess.Popen([BIN / "igd", "serve", "--socket", str(socket_path), "--device", "cpu",
                               "--log-level", "warning", *model])
    try:
        while not socket_path.exists():
            time.sleep(0.1)
        # Warm-up at the same concurrency: buffers and thread pools reach their working size.
        warm_round = soak(socket_path, args.clients, 2, args.steps, images)
        warm = snapshot(daemon.pid)
        result = soak(socket_path, args.clients, args.requests, args.steps, images)
        after = snapshot(daemon.pid)
    finally:
        daemon.send_signal(signal.SIGTERM)
        stopped = daemon.wait(120)
        shutil.rmtree(work, ignore_errors=True)
    problems = warm_round["problems"] + result["problems"]
    if after["fds"] > warm["fds"] + 2 or after["threads"] > warm["threads"] + 2:
        problems.append(f"leak: fds {warm['fds']} -> {after['fds']}, threads {warm['threads']} -> {after['threads']}")
    if after["rss"] > 1.10 * warm["rss"]:
        problems.append(f"RSS grew {after['rss'] / warm['rss'] - 1:.1%} ({warm['rss']} -> {after['rss']} bytes)")
    if stopped != 0:
        problems.append(f"igd exited with {stopped} on SIGTERM")
    machine = f"{platform.machine()}, {os.cpu_count()} cores, CPU"
    report = {"machine": machine, "clients": args.clients, "requests": args.clients * args.requests, "warm": warm, "after": after,
              **result, "problems": problems}
    print("| clients | requests | seconds | answers | max deviation | RSS warm -> after (MiB) | fds | threads | problems |")
    print("|---|---|---|---|---|---|---|---|---|")
    print(f"| {args.clients} | {report['requests']} | {result['seconds']:.0f} | {json.dumps(result['answers'])} | "
          f"{result['max_deviation']:.1e} | "
          f"{warm['rss'] / 2**20:.0f} -> {after['rss'] / 2**20:.0f} | {warm['fds']} -> {after['fds']} | "
          f"{warm['threads']} -> {after['threads']} | {len(problems)} |")
    for problem in problems:
        print(f"problem: {problem}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
