"""Results that carry what made them, and the Python client, against a real igd."""

from __future__ import annotations

import datetime
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from daemon import IGD, Igd
from reference import read_result
from igd.output.reader import PROVENANCE_KEYS as KEYS

LANET_MEAN = [0.49139968, 0.48215827, 0.44653124]


def check_provenance(result: dict, weights: Path) -> None:
    missing = [key for key in KEYS if key not in result]
    assert not missing, missing
    assert result["weights_sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert result["model_family"] == "lanet" and result["classes_source"] == "the predecessor's CIFAR-10 list"
    assert list(result["input_size"]) == [32, 32] and result["resize"] == "stretch"
    assert np.allclose(np.asarray(result["mean"], dtype=float), LANET_MEAN)
    assert result["precision"] == "float32" and result["device_type"] == "cpu"
    assert result["compiler"] == "eager" and result["chunk_source"] == "given" and int(result["max_batch"]) == 10
    assert result["torch_version"] == str(torch.__version__)
    created = datetime.datetime.fromisoformat(str(result["created"]))
    assert abs((datetime.datetime.now(datetime.timezone.utc) - created).total_seconds()) < 600
    assert result["prediction_name"] in ("cat", "dog", "frog", "deer", "bird", "airplane", "automobile", "horse",
                                         "ship", "truck")


def test_every_result_file_says_what_made_it(lanet: Igd, fixtures: Path, workdir: Path) -> None:
    weights = fixtures / "lanet-tiny.pth"
    image = fixtures / "images" / "chelsea.png"
    for name, fmt in (("a.gzip", "torch"), ("a.npz", "npz")):
        run = lanet.igctl("attribute", str(image), "cat", "-o", str(workdir / name), "--steps", "6", "--format", fmt)
        assert run.returncode == 0, run.stderr.decode()
    check_provenance(read_result(workdir / "a.gzip"), weights)
    with np.load(workdir / "a.npz") as arrays:  # no pickles needed
        check_provenance({key: arrays[key].item() if arrays[key].ndim == 0 else arrays[key] for key in arrays.files},
                         weights)


@pytest.mark.slow  # an igd batch run
def test_batch_results_record_the_weights_they_came_from(fixtures: Path, workdir: Path) -> None:
    """Another checkpoint file (here: the same weights, a different epoch counter) gives
    another hash; igd batch records it like the daemon."""
    changed = workdir / "lanet-changed.pth"
    checkpoint = torch.load(fixtures / "lanet-tiny.pth", weights_only=True)
    checkpoint["epoch"] = int(checkpoint.get("epoch", 0)) + 1
    torch.save(checkpoint, changed)
    images = workdir / "images"
    images.mkdir()
    (images / "cat.png").write_bytes((fixtures / "images" / "chelsea.png").read_bytes())
    run = subprocess.run([IGD, "batch", str(images), str(workdir / "out"), "-lp", str(changed), "--steps", "4",
                          "--max-batch", "8", "-t", "cat"], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    (record,) = [json.loads(line) for line in (workdir / "out" / "status.jsonl").read_text().splitlines()]
    result = read_result(workdir / "out" / record["output"])
    assert result["weights_sha256"] == hashlib.sha256(changed.read_bytes()).hexdigest()
    assert result["weights_sha256"] != hashlib.sha256((fixtures / "lanet-tiny.pth").read_bytes()).hexdigest()
    assert all(key in result for key in KEYS)


def test_importing_the_python_client_loads_neither_torch_nor_numpy() -> None:
    code = ("import sys; from igctl import Client; import igctl.api; "
            "print(sorted(m for m in ('torch', 'numpy') if m in sys.modules))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]"


def test_the_python_client_gives_igctls_result(lanet: Igd, fixtures: Path, workdir: Path) -> None:
    from igctl import Client, RequestFailed

    image = fixtures / "images" / "chelsea.png"
    run = lanet.igctl("attribute", str(image), "cat", "-o", str(workdir / "cat.gzip"), "--steps", "8")
    assert run.returncode == 0, run.stderr.decode()
    expected = read_result(workdir / "cat.gzip")
    with Client(lanet.socket) as igd:
        result = igd.attribute(image, target="cat", n_steps=8)
        assert result.target == "cat" and result.target_index == 3 and result.error_estimate is not None
        assert np.array_equal(result.integrated_grads, expected["integrated_grads"].numpy())
        assert np.array_equal(result["integrated_directional_grads"], expected["integrated_directional_grads"].numpy())
        assert result.weights_sha256 == expected["weights_sha256"]
        with Image.open(image) as photo:  # a PIL image and the file's bytes give the same answer
            from_pil = igd.attribute(photo, target=3, n_steps=8)
        assert np.array_equal(from_pil.integrated_grads, result.integrated_grads)
        assert igd.classify(image.read_bytes(), top=2)[0]["name"] == result.prediction
        pictured = igd.attribute(image, target="cat", n_steps=8, heatmap=True)  # drawn here = drawn by igd
        assert pictured.heatmap_png[:8] == b"\x89PNG\r\n\x1a\n" and pictured.picture_png() == pictured.heatmap_png
        assert pictured.picture_png(style="heat_map") != pictured.heatmap_png
        assert igd.status()["state"] == "ready"
        with pytest.raises(RequestFailed) as refused:
            igd.attribute(image, target="unicorn")
        assert refused.value.code == "unknown_target"
        with pytest.raises(RequestFailed) as refused:
            igd.attribute(b"not an image", target="cat")
        assert refused.value.code == "bad_image"
        with pytest.raises(TypeError, match="unknown option"):
            igd.attribute(image, steps=8)
        result.save(workdir / "cat.npz")
        with np.load(workdir / "cat.npz") as arrays:
            assert np.array_equal(arrays["integrated_grads"], expected["integrated_grads"].numpy())
