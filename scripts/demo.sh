#!/usr/bin/env bash
# The demo behind `make demo`: start igd with the built-in EfficientNet-Lite0 on a
# temporary socket, attribute the bundled cat photo with igctl, show what came back,
# stop the daemon. Results land in ./demo-output/.
set -euo pipefail
bin="${VENV:-.venv}/bin"
out="${DEMO_OUT:-demo-output}"
work="$(mktemp -d /tmp/igd-demo.XXXXXX)"
socket="$work/igd.sock"
mkdir -p "$out"

echo "==> starting igd (built-in EfficientNet-Lite0, CPU) on $socket"
"$bin/igd" serve --socket "$socket" --device cpu --log-level warning &
daemon=$!
trap 'kill -TERM "$daemon" 2>/dev/null || true; wait "$daemon" || true; rm -rf "$work"' EXIT

# igd answers as soon as its socket exists; --wait waits until the model is loaded and warm.
"$bin/igctl" --socket "$socket" status --wait 300

echo "==> igctl classify igd/data/chelsea.jpg"
"$bin/igctl" --socket "$socket" classify igd/data/chelsea.jpg --top 3

echo "==> igctl attribute igd/data/chelsea.jpg (target: the predicted class)"
"$bin/igctl" --socket "$socket" attribute igd/data/chelsea.jpg \
    -o "$out/chelsea.gzip" --heatmap "$out/chelsea-heatmap.png" --force

echo "==> reading $out/chelsea.gzip the way the predecessor's users do"
"$bin/python" - "$out/chelsea.gzip" <<'PY'
import gzip, sys
from io import BytesIO
import torch
with gzip.open(sys.argv[1], "rb") as f:
    result = torch.load(BytesIO(f.read()))
for key in ("integrated_grads", "integrated_directional_grads", "step_sizes", "intermediates", "output"):
    print(f"  {key:30} {tuple(result[key].shape)}")
print(f"  {'target':30} {result['target_class']} ({result['target_name']})")
print(f"  {'convergence_delta':30} {result['convergence_delta']:+.4f}")
PY
echo "==> done: $out/chelsea.gzip and $out/chelsea-heatmap.png"
