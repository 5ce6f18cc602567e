"""A re-creation of the predecessor's transport and server loop, for benchmarks only.

NOT the predecessor's code (kh8fb/int-gradients-image-server, which no longer runs
as published): a faithful stand-in written for `bench/e2e.py`. Per request, as there:
the client turns the image into a JSON list of RGB values (`prepare_input.py`) and
POSTs it over HTTP (`curl --data @input.json`); the server parses the JSON, rebuilds
the image, preprocesses it, runs the predecessor's compute path (bench/predecessor.py:
per-step pass, then captum IG, then a forward), `torch.save`s the dict and gzips it at
level 9 (`gzip.GzipFile` defaults), and sends it back. Flask's development server is
replaced by the standard library's single-threaded HTTPServer, which handles one
request at a time, as Flask's dev server did by default before 1.0.

    python bench/predecessor_server.py serve --model bit --port 8888
    python bench/predecessor_server.py prepare cat.jpg cat input.json   # prepare_input.py
    curl http://127.0.0.1:8888/model/ --data @input.json --output out.gzip -H "Content-Type: application/json"

The random full-size models come from bench/models.py with a fixed seed, so this server
and an igd started by the same benchmark hold identical weights.
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from predecessor import predecessor_attribute

# prepare_input.py's step, client side: the image as nested lists of RGB values.


def image_to_json(path: Path, target: str | int) -> bytes:
    pixels = np.asarray(Image.open(path).convert("RGB"))
    return json.dumps({"img_data": pixels.tolist(), "target_class": target}).encode()


def make_handler(model: torch.nn.Module, preprocess, class_names: tuple[str, ...]) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's name
            data = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            target = data["target_class"]
            target = class_names.index(target) if isinstance(target, str) else int(target)
            image = Image.fromarray(np.array(data["img_data"], dtype=np.uint8))
            result = predecessor_attribute(model, preprocess(image), target)
            raw = io.BytesIO()
            torch.save({k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in result.items()}, raw)
            compressed = io.BytesIO()
            with gzip.GzipFile(fileobj=compressed, mode="wb") as f:  # level 9, as there
                f.write(raw.getvalue())
            body = compressed.getvalue()
            self.send_response(200)
            self.send_header("Content-Type", "application/gzip")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    return Handler


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the server")
    serve.add_argument("--model", default="effnet", choices=["bit", "lanet", "effnet"])
    serve.add_argument("--port", type=int, default=8888)
    prepare = commands.add_parser("prepare", help="image -> JSON of RGB values, as prepare_input.py")
    prepare.add_argument("image", type=Path)
    prepare.add_argument("target")
    prepare.add_argument("output", type=Path)
    args = parser.parse_args()
    if args.command == "prepare":
        target = int(args.target) if args.target.isdecimal() else args.target
        args.output.write_bytes(image_to_json(args.image, target))
        return
    from models import build

    built = build(args.model)
    server = HTTPServer(("127.0.0.1", args.port), make_handler(built.module, built.preprocess, built.class_names))
    print("ready", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
