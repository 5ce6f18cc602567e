"""End to end, one request: `igctl attribute` against a real igd, vs the predecessor's
pipeline re-created for this benchmark (bench/predecessor_server.py: the image as a
JSON list of RGB values, curl POST on loopback, JSON parsing, the two-pass compute
path, torch.save + gzip level 9).

    python bench/e2e.py [--models bit,effnet] [--repeats 3] [--igd-args=--compile] [--json out.json]

Same model weights, same machine, runs alternating between the two pipelines; each
time covers everything a user waits for, from the image file to the result file.
Images: a 32x32 PNG, chelsea.jpg (451x300) and a 12-megapixel JPEG made from it.
igd runs `igd serve` with defaults (plus ``--igd-args``) and an empty cache directory,
so it measures its chunk size at warm-up as on a first start; each row names the chunk
it picked.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from models import IMAGE, build, describe_machine
from PIL import Image

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent


def make_images(directory: Path) -> dict[str, Path]:
    photo = Image.open(IMAGE).convert("RGB")
    images = {
        "32x32 PNG": directory / "small.png",
        "chelsea.jpg 451x300": directory / "chelsea.jpg",
        "12 MP JPEG 4000x3000": directory / "large.jpg",
    }
    photo.resize((32, 32), Image.Resampling.BILINEAR).save(images["32x32 PNG"])
    shutil.copy(IMAGE, images["chelsea.jpg 451x300"])
    photo.resize((4000, 3000), Image.Resampling.BICUBIC).save(images["12 MP JPEG 4000x3000"], quality=90)
    return images


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wall(command: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def predecessor_request(image: Path, target: str, url: str, work: Path) -> float:
    """prepare_input.py, then curl, as the predecessor's README has it."""
    prepared = work / "input.json"
    start = time.perf_counter()
    subprocess.run([sys.executable, str(HERE / "predecessor_server.py"), "prepare", str(image), target, str(prepared)],
                   check=True)
    subprocess.run(["curl", "-s", "-f", url, "--data", f"@{prepared}", "--output", str(work / "theirs.gzip"),
                    "-H", "Content-Type:application/json; charset=utf-8"], check=True)
    return time.perf_counter() - start


def bench_model(name: str, repeats: int, work: Path, images: dict[str, Path],
                igd_args: list[str]) -> list[dict[str, object]]:
    built = build(name, checkpoint_dir=work)
    target = str(built.target)
    del built  # the two servers hold the weights; this process need not
    sock = work / "igd.sock"
    cache = Path(tempfile.mkdtemp(prefix="igd-e2e-cache-", dir="/tmp"))
    igd = subprocess.Popen([BIN / "igd", "serve", "--socket", str(sock), "--device", "cpu", "--log-level", "warning",
                            *build_args(name, work), *igd_args], env={**os.environ, "IGD_CACHE_DIR": str(cache)})
    port = free_port()
    theirs = subprocess.Popen([sys.executable, str(HERE / "predecessor_server.py"), "serve", "--model", name,
                               "--port", str(port)], stdout=subprocess.PIPE, text=True)
    rows = []
    try:
        assert theirs.stdout.readline().strip() == "ready"
        igctl = [str(BIN / "igctl"), "--socket", str(sock)]
        status = json.loads(subprocess.run([*igctl, "status", "--wait", "--json"], check=True, capture_output=True,
                                           text=True).stdout)  # waits until warm
        chunk = status["batching"]["max_batch_points"]
        url = f"http://127.0.0.1:{port}/model/"
        for label, image in images.items():
            ours_cmd = [*igctl, "attribute", str(image), target, "--steps", "50", "-o", str(work / "ours.gzip"), "--force"]
            wall(ours_cmd)  # warm-up of this input size
            predecessor_request(image, target, url, work)
            ours, preds = [], []
            for _ in range(repeats):
                ours.append(wall(ours_cmd))
                preds.append(predecessor_request(image, target, url, work))
            row = {"model": name, "image": label, "igd_s": statistics.median(ours),
                   "predecessor_s": statistics.median(preds), "igd_runs": ours, "predecessor_runs": preds,
                   "chunk": chunk, "igd_args": " ".join(igd_args)}
            row["speedup"] = row["predecessor_s"] / row["igd_s"]
            rows.append(row)
            print(f"| {name} | {label} | {row['igd_s']:.2f} | {row['predecessor_s']:.2f} | {row['speedup']:.1f}x | "
                  f"{chunk} |", flush=True)
    finally:
        for process in (igd, theirs):
            process.send_signal(signal.SIGTERM)
            process.wait(120)
        shutil.rmtree(cache, ignore_errors=True)
    return rows


def build_args(name: str, work: Path) -> list[str]:
    return {"bit": ["-bp", str(work / "bit-s-r101x3.pth")], "lanet": ["-lp", str(work / "lanet-c128-l24.pth")]}.get(name, [])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="bit,effnet")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--igd-args", default="", help="More `igd serve` options, e.g. --igd-args=--compile.")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="igd-e2e-", dir="/tmp"))
    try:
        images = make_images(work)
        machine = describe_machine()
        print(f"# end to end, one request, 50 steps, median of {args.repeats} ({machine})")
        print("| model | image | igd + igctl (s) | predecessor pipeline (s) | speedup | chunk igd picked |")
        print("|---|---|---|---|---|---|")
        rows = [row for name in args.models.split(",")
                for row in bench_model(name.strip(), args.repeats, work, images, args.igd_args.split())]
        if args.json:
            args.json.write_text(json.dumps({"machine": machine, "rows": rows}, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
