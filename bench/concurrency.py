"""Concurrency: 1, 2, 4 and 8 clients at once against igd on the default model, with
cross-request batching on (--max-images 32) and off (--max-images 1).

    python bench/concurrency.py [--requests-per-client 2] [--steps 50] [--json out.json]

Each client is a thread with its own connection (igctl's client library), sending its
requests back to back. Every answer is checked against the answer to the same request
sent alone: "wrong" counts results that differ (relative L2 > 1e-5), "lost" requests
that got no result.
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
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

from igctl.client import Client, ClientError

BIN = Path(sys.executable).parent
IMAGE = Path(__file__).resolve().parents[1] / "igd" / "data" / "chelsea.jpg"


def variants() -> list[bytes]:
    """Eight different images (crops and flips of the sample photo)."""
    photo = Image.open(IMAGE).convert("RGB")
    images = []
    for i in range(8):
        crop = photo.crop((i * 12, i * 4, 451 - (7 - i) * 12, 300 - (7 - i) * 4))
        if i % 2:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        buffer = io.BytesIO()
        crop.save(buffer, "PNG")
        images.append(buffer.getvalue())
    return images


def ig(data: bytes) -> torch.Tensor:
    return torch.load(io.BytesIO(gzip.decompress(data)))["integrated_grads"]


def run(socket_path: Path, images: list[bytes], clients: int, per_client: int, steps: int,
        reference: list[torch.Tensor]) -> dict[str, object]:
    def client_work(c: int) -> list[tuple[float, int, torch.Tensor | None]]:
        done = []
        with Client(socket_path, timeout=3600) as client:
            for r in range(per_client):
                k = (c + r * clients) % len(images)
                start = time.perf_counter()
                try:
                    result = client.call("attribute", {"image": images[k], "n_steps": steps})
                    done.append((time.perf_counter() - start, k, ig(result["data"])))
                except ClientError:
                    done.append((time.perf_counter() - start, k, None))
        return done

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        results = [item for items in pool.map(client_work, range(clients)) for item in items]
    elapsed = time.perf_counter() - start
    latencies = sorted(latency for latency, _, _ in results)
    lost = sum(1 for _, _, value in results if value is None)
    wrong = sum(
        1 for _, k, value in results
        if value is not None and float((value - reference[k]).norm() / reference[k].norm()) > 1e-5
    )
    return {
        "clients": clients,
        "requests": len(results),
        "requests_per_s": len(results) / elapsed,
        "p50_s": statistics.median(latencies),
        "p95_s": latencies[min(len(latencies) - 1, round(0.95 * (len(latencies) - 1)))],
        "lost": lost,
        "wrong": wrong,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests-per-client", type=int, default=2)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--clients", default="1,2,4,8")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    images = variants()
    rows = []
    machine = f"{platform.machine()}, {os.cpu_count()} cores, CPU"
    print(f"# concurrency, EfficientNet-Lite0, {args.steps} steps ({machine})")
    print("| batching | clients | requests | req/s | p50 (s) | p95 (s) | lost | wrong |")
    print("|---|---|---|---|---|---|---|---|")
    for batching, max_images in (("on", "32"), ("off", "1")):
        work = Path(tempfile.mkdtemp(prefix="igd-conc-", dir="/tmp"))
        socket_path = work / "igd.sock"
        daemon = subprocess.Popen([BIN / "igd", "serve", "--socket", str(socket_path), "--device", "cpu",
                                   "--max-images", max_images, "--log-level", "warning"])
        try:
            while not socket_path.exists():
                time.sleep(0.1)
            with Client(socket_path, timeout=3600) as client:
                reference = [ig(client.call("attribute", {"image": image, "n_steps": args.steps})["data"]) for image in images]
            for clients in (int(n) for n in args.clients.split(",")):
                row = {"batching": batching, **run(socket_path, images, clients, args.requests_per_client, args.steps, reference)}
                rows.append(row)
                print(f"| {batching} | {clients} | {row['requests']} | {row['requests_per_s']:.2f} | {row['p50_s']:.2f} | "
                      f"{row['p95_s']:.2f} | {row['lost']} | {row['wrong']} |", flush=True)
        finally:
            daemon.send_signal(signal.SIGTERM)
            daemon.wait(120)
            shutil.rmtree(work, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
