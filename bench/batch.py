"""`igd batch` throughput: local backend vs Ray with 2 workers, on this machine.

    python bench/batch.py [--images 32] [--steps 16] [--json out.json]

Both run the default model over the same images (crops and flips of the sample photo);
Ray runs on a local cluster this script starts and stops. Prints images/s.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from models import IMAGE
from PIL import Image

BIN = Path(sys.executable).parent


def make_images(directory: Path, count: int) -> None:
    photo = Image.open(IMAGE).convert("RGB")
    for i in range(count):
        image = photo.crop((i % 40, i % 30, 451 - (i * 3) % 40, 300 - (i * 2) % 30))
        if i % 2:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        image.save(directory / f"{i:04d}.jpg", quality=92)


def timed_batch(images: Path, out: Path, steps: int, *extra: str) -> float:
    start = time.perf_counter()
    subprocess.run([BIN / "igd", "batch", str(images), str(out), "--steps", str(steps), "--device", "cpu", *extra],
                   check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="igd-batch-", dir="/tmp"))
    images = work / "images"
    images.mkdir()
    make_images(images, args.images)
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    rows = []
    try:
        local = timed_batch(images, work / "local", args.steps)
        rows.append({"backend": "local", "seconds": local, "images_per_s": args.images / local})
        subprocess.run([BIN / "ray", "start", "--head", f"--port={port}", "--num-cpus=2", "--include-dashboard=false",
                        "--node-ip-address=127.0.0.1", "--disable-usage-stats"], check=True, env=env,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            ray = timed_batch(images, work / "ray", args.steps, "--backend", "ray", "--address", f"127.0.0.1:{port}",
                              "--workers", "2")
        finally:
            subprocess.run([BIN / "ray", "stop", "--force"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        rows.append({"backend": "ray, 2 workers", "seconds": ray, "images_per_s": args.images / ray})
    finally:
        shutil.rmtree(work, ignore_errors=True)
    machine = f"{platform.machine()}, {os.cpu_count()} cores, CPU"
    print(f"# igd batch, EfficientNet-Lite0, {args.images} images, {args.steps} steps, one target ({machine})")
    print("| backend | seconds (whole run, model loading included) | images/s |")
    print("|---|---|---|")
    for row in rows:
        print(f"| {row['backend']} | {row['seconds']:.1f} | {row['images_per_s']:.2f} |")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
