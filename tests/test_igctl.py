"""The real igctl against a real igd: files, pipelines, exit statuses."""

from __future__ import annotations

import gzip
import io
import json
import os
import pty
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from daemon import IGCTL, Igd, short_tempdir
from test_imaging import encoded

PREDECESSOR_SHAPES = {
    "integrated_grads": lambda n, c, h, w: (1, c, h, w),
    "integrated_directional_grads": lambda n, c, h, w: (n, c, h, w),
    "step_sizes": lambda n, c, h, w: (n, 1),
    "intermediates": lambda n, c, h, w: (n, c, h, w),
}


def predecessor_reader(path: Path) -> dict:
    with gzip.open(path, "rb") as fobj:
        return torch.load(io.BytesIO(fobj.read()))


def check_result(path: Path, n: int, shape: tuple[int, int, int], classes: int) -> dict:
    result = predecessor_reader(path)
    for key, expected in PREDECESSOR_SHAPES.items():
        assert tuple(result[key].shape) == expected(n, *shape), key
    assert tuple(result["output"].shape) == (1, classes)
    assert isinstance(result["target_class"], int)
    return result


@pytest.fixture(scope="module")
def lanet(fixtures: Path):
    with Igd("-lp", str(fixtures / "lanet-tiny.pth"), "--max-batch", "10") as igd:
        yield igd


@pytest.fixture
def workdir():
    path = short_tempdir()
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def photos(fixtures: Path) -> dict[str, Path]:
    return {name: fixtures / "images" / name for name in ("chelsea.png", "chelsea.jpg", "coffee.png")}


def test_attribute_on_the_default_model(photos: dict[str, Path], workdir: Path) -> None:
    with Igd() as igd:  # built-in EfficientNet-Lite0, chunk size measured at start-up
        out = igd.igctl("attribute", str(photos["chelsea.jpg"]), "tiger cat", "-o", str(workdir / "cat.gzip"),
                        "--steps", "16", "--heatmap", str(workdir / "cat.png"))
        assert out.returncode == 0, out.stderr
        result = check_result(workdir / "cat.gzip", 16, (3, 224, 224), 1000)
        assert result["target_class"] == 282 and result["target_name"] == "tiger cat"
        heatmap = Image.open(workdir / "cat.png")
        assert heatmap.format == "PNG" and heatmap.size == (451, 300)
        assert "chelsea.jpg: " in out.stdout.decode() and "-> " in out.stdout.decode()
        assert "event=chunk_size_measured" in igd.log()


@pytest.mark.parametrize("family", ["bit", "lanet"])
def test_attribute_on_the_fixture_models(fixtures: Path, photos: dict[str, Path], workdir: Path, family: str) -> None:
    reference = np.load(fixtures / f"{family}-tiny.reference.npz")
    with Igd(f"--{family}-path", str(fixtures / f"{family}-tiny.pth"), "--max-batch", "10") as igd:
        out = igd.igctl("attribute", str(photos["chelsea.png"]), "cat", "-o", str(workdir / "r.gzip"))
        assert out.returncode == 0, out.stderr
    result = check_result(workdir / "r.gzip", 50, (3, 32, 32), 10)
    assert result["target_class"] == 3
    ig = result["integrated_grads"].numpy()
    assert np.linalg.norm(ig - reference["integrated_grads"]) / np.linalg.norm(reference["integrated_grads"]) < 1e-4


def test_stdin_and_stdout_give_the_same_bytes(lanet: Igd, photos: dict[str, Path], workdir: Path) -> None:
    to_file = lanet.igctl("attribute", str(photos["chelsea.png"]), "cat", "-o", str(workdir / "a.gzip"), "--steps", "8")
    assert to_file.returncode == 0, to_file.stderr
    piped = lanet.igctl("attribute", "-", "cat", "-o", "-", "--steps", "8", input=photos["chelsea.png"].read_bytes())
    assert piped.returncode == 0, piped.stderr
    assert piped.stdout == (workdir / "a.gzip").read_bytes()
    implicit = lanet.igctl("attribute", "-", "--target", "cat", "--steps", "8", input=photos["chelsea.png"].read_bytes())
    assert implicit.stdout == piped.stdout  # stdout is a pipe here: the data goes there


def test_npz_format(lanet: Igd, photos: dict[str, Path], workdir: Path) -> None:
    out = lanet.igctl("attribute", str(photos["coffee.png"]), "ship", "--format", "npz", "--out-dir", str(workdir), "--steps", "6")
    assert out.returncode == 0, out.stderr
    with np.load(workdir / "coffee.npz") as arrays:
        assert arrays["integrated_directional_grads"].shape == (6, 3, 32, 32)
        assert str(arrays["target_name"]) == "ship"


def test_terminal_default_writes_stem_file_and_never_overwrites(lanet: Igd, photos: dict[str, Path], workdir: Path) -> None:
    def on_a_terminal(*args: str) -> tuple[int, str]:
        main, replica = pty.openpty()
        process = subprocess.Popen([IGCTL, "--socket", str(lanet.socket), *args], cwd=workdir,
                                   stdout=replica, stderr=subprocess.PIPE)
        os.close(replica)
        chunks = []
        while True:
            try:
                chunk = os.read(main, 4096)
            except OSError:
                break
            if not chunk:
                break
            chunks.append(chunk)
        os.close(main)
        process.wait(120)
        return process.returncode, b"".join(chunks).decode() + process.stderr.read().decode()

    status, text = on_a_terminal("attribute", str(photos["chelsea.png"]), "dog", "--steps", "4")
    assert status == 0, text
    assert (workdir / "chelsea.gzip").exists() and "chelsea.gzip" in text
    before = (workdir / "chelsea.gzip").read_bytes()
    status, text = on_a_terminal("attribute", str(photos["chelsea.png"]), "cat", "--steps", "4")
    assert status == 1 and "exists (use --force to overwrite)" in text
    assert (workdir / "chelsea.gzip").read_bytes() == before
    status, _ = on_a_terminal("attribute", str(photos["chelsea.png"]), "cat", "--steps", "4", "--force")
    assert status == 0 and (workdir / "chelsea.gzip").read_bytes() != before


def test_files_from_stdin_with_one_bad_file_and_jobs(lanet: Igd, photos: dict[str, Path], workdir: Path) -> None:
    inputs = workdir / "in"
    inputs.mkdir()
    paths = []
    for i, (name, source) in enumerate(sorted(photos.items())):
        paths.append(shutil.copy(source, inputs / f"{i}-{name}"))
    flipped = Image.open(photos["chelsea.png"]).transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    (inputs / "3-flipped.png").write_bytes(encoded(flipped, "PNG"))
    (inputs / "4-corrupt.jpg").write_bytes(photos["chelsea.jpg"].read_bytes()[:3000])
    listing = "\n".join(str(inputs / name) for name in sorted(os.listdir(inputs))) + "\n"
    runs = {}
    for jobs in ("1", "4"):
        out_dir = workdir / f"out{jobs}"
        run = lanet.igctl("attribute", "--files-from", "-", "--target", "frog", "--out-dir", str(out_dir),
                          "--jobs", jobs, "--steps", "12", "--json", input=listing.encode())
        assert run.returncode == 1, run.stderr
        records = [json.loads(line) for line in run.stdout.decode().splitlines()]
        assert len(records) == 5 and sum(r["ok"] for r in records) == 4
        bad = next(r for r in records if not r["ok"])
        assert bad["image"].endswith("4-corrupt.jpg") and bad["error"]["code"] == "bad_image"
        assert "4-corrupt.jpg: bad_image: the JPEG image is corrupt or truncated" in run.stderr.decode()
        assert "1 of 5 images failed" in run.stderr.decode()
        assert sorted(os.listdir(out_dir)) == ["0-chelsea.gzip", "1-chelsea.gzip", "2-coffee.gzip", "3-flipped.gzip"]
        runs[jobs] = {name: (out_dir / name).read_bytes() for name in os.listdir(out_dir)}
    assert runs["1"] == runs["4"]


def test_exit_status_no_daemon(workdir: Path, photos: dict[str, Path]) -> None:
    missing = workdir / "nobody.sock"
    for args in (["status"], ["attribute", str(photos["chelsea.png"]), "cat", "-o", str(workdir / "x.gzip")]):
        run = subprocess.run([IGCTL, "--socket", str(missing), *args], capture_output=True, text=True, timeout=60)
        assert run.returncode == 3, run
        assert f"no igd is listening on {missing}" in run.stderr and "igd serve" in run.stderr
    assert not (workdir / "x.gzip").exists()


def test_exit_status_refusals_and_usage(lanet: Igd, photos: dict[str, Path], workdir: Path) -> None:
    text = workdir / "notes.txt"
    text.write_text("not an image")
    bad = lanet.igctl("attribute", str(text), "cat", "-o", str(workdir / "bad.gzip"))
    assert bad.returncode == 1 and b"bad_image" in bad.stderr
    assert not (workdir / "bad.gzip").exists()
    unknown = lanet.igctl("attribute", str(photos["chelsea.png"]), "unicorn", "-o", str(workdir / "u.gzip"))
    assert unknown.returncode == 1 and b"unknown_target" in unknown.stderr and b"unicorn" in unknown.stderr
    missing = lanet.igctl("attribute", str(workdir / "missing.png"), "--target", "cat", "-o", str(workdir / "m.gzip"))
    assert missing.returncode == 1 and b"No such file" in missing.stderr
    two = [str(photos["chelsea.png"]), str(photos["coffee.png"])]
    for args in (["attribute"], ["attribute", *two, "-o", "x"], ["attribute", "x.png", "--steps", "0"],
                 ["attribute", "x.png", "--method", "simpson"], ["nonsense"]):
        usage = lanet.igctl(*args)
        assert usage.returncode == 2, (args, usage)


def test_unwritable_output_leaves_no_partial_file(lanet: Igd, photos: dict[str, Path], workdir: Path) -> None:
    readonly = workdir / "ro"
    readonly.mkdir()
    readonly.chmod(0o555)
    run = lanet.igctl("attribute", str(photos["chelsea.png"]), "cat", "-o", str(readonly / "r.gzip"), "--steps", "4")
    if os.geteuid() != 0:  # root writes anywhere; the check below still holds
        assert run.returncode == 1 and b"Permission denied" in run.stderr
    assert [p.name for p in readonly.iterdir()] in ([], ["r.gzip"])
    assert not any(p.name.endswith(".part") for p in readonly.iterdir())


def test_exit_status_daemon_stopped_mid_request(fixtures: Path, photos: dict[str, Path], workdir: Path) -> None:
    igd = Igd("-lp", str(fixtures / "lanet-tiny.pth"), "--max-batch", "10")
    try:
        client = subprocess.Popen(
            [IGCTL, "--socket", str(igd.socket), "attribute", str(photos["chelsea.png"]), "cat",
             "--steps", "1000", "-o", str(workdir / "late.gzip")],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        time.sleep(2.0)
        igd.process.send_signal(signal.SIGKILL)
        assert client.wait(60) == 4
        assert b"closed the connection before answering" in client.stderr.read()
        assert not (workdir / "late.gzip").exists()
    finally:
        igd.stop()
        igd.cleanup()


def test_status_version_and_classify(lanet: Igd, photos: dict[str, Path]) -> None:
    status = lanet.igctl("status")
    assert status.returncode == 0 and b"lanet-c16-l6" in status.stdout
    as_json = json.loads(lanet.igctl("status", "--json").stdout)
    assert as_json["device"] == "cpu" and as_json["precision"] == "float32" and "batching" in as_json
    version = lanet.igctl("version").stdout.decode()
    assert "igctl 0.1.0 (protocol 1)" in version and "igd 0.1.0 (protocol 1)" in version
    classify = lanet.igctl("classify", str(photos["chelsea.png"]), str(photos["coffee.png"]), "--top", "2", "--json")
    records = [json.loads(line) for line in classify.stdout.decode().splitlines()]
    assert classify.returncode == 0 and [len(r["top"]) for r in records] == [2, 2]
    human = lanet.igctl("classify", str(photos["coffee.png"]))
    assert human.returncode == 0 and human.stdout.decode().startswith(f"{photos['coffee.png']}: ")


def test_tf32_on_a_cpu_is_reported_and_changes_nothing(fixtures: Path, photos: dict[str, Path], workdir: Path) -> None:
    reference = np.load(fixtures / "lanet-tiny.reference.npz")
    with Igd("-lp", str(fixtures / "lanet-tiny.pth"), "--max-batch", "10", env={"IGD_PRECISION": "tf32"}) as igd:
        assert json.loads(igd.igctl("status", "--json").stdout)["precision"] == "tf32"
        assert "cpu, tf32" in igd.igctl("status").stdout.decode()
        out = igd.igctl("attribute", str(photos["chelsea.png"]), "cat", "-o", str(workdir / "r.gzip"))
        assert out.returncode == 0, out.stderr
        assert "event=precision" in igd.log() and "none here" in igd.log()
    ig = predecessor_reader(workdir / "r.gzip")["integrated_grads"].numpy()
    assert np.linalg.norm(ig - reference["integrated_grads"]) / np.linalg.norm(reference["integrated_grads"]) < 1e-4


def test_help_documents_the_exit_statuses() -> None:
    out = subprocess.run([IGCTL, "--help"], capture_output=True, text=True, timeout=60).stdout
    for line in ("0  success", "1  the daemon refused", "2  usage error", "3  no daemon", "4  the daemon failed"):
        assert line in out


def test_results_with_the_same_name_are_not_overwritten(lanet: Igd, photos: dict[str, Path], workdir: Path) -> None:
    for folder in ("cats", "dogs"):
        (workdir / folder).mkdir()
        shutil.copy(photos["chelsea.png"], workdir / folder / "img.png")
    run = lanet.igctl("attribute", str(workdir / "cats/img.png"), str(workdir / "dogs/img.png"), "--target", "cat",
                      "--out-dir", str(workdir / "out"), "--jobs", "2", "--steps", "4")
    assert run.returncode == 1
    assert "dogs/img.png: its result would go to" in run.stderr.decode()
    assert os.listdir(workdir / "out") == ["img.gzip"]


def test_target_guessing(lanet: Igd, photos: dict[str, Path], workdir: Path) -> None:
    (workdir / "cat").mkdir()  # a directory named like the class is still the class
    run = subprocess.run([IGCTL, "--socket", str(lanet.socket), "attribute", str(photos["chelsea.png"]), "cat",
                          "-o", "r.gzip", "--steps", "4", "--json"], cwd=workdir, capture_output=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["target"] == "cat"
    listing = f"{photos['chelsea.png']}\n{photos['coffee.png']}\n".encode()
    run = lanet.igctl("attribute", "--files-from", "-", "ship", "--out-dir", str(workdir / "o"), "--steps", "4", "--json",
                      input=listing)
    assert run.returncode == 0, run.stderr
    assert [json.loads(line)["target"] for line in run.stdout.decode().splitlines()] == ["ship", "ship"]
    odd = lanet.igctl("attribute", str(photos["chelsea.png"]), "²", "-o", str(workdir / "x.gzip"))
    assert odd.returncode == 1 and b"unknown_target" in odd.stderr and b"Traceback" not in odd.stderr


def test_gzip_level_trades_size_for_speed(lanet: Igd, photos: dict[str, Path], workdir: Path) -> None:
    for level in ("0", "9"):
        run = lanet.igctl("attribute", str(photos["chelsea.png"]), "cat", "--steps", "8", "--gzip-level", level,
                          "-o", str(workdir / f"level{level}.gzip"))
        assert run.returncode == 0, run.stderr
    stored, smallest = workdir / "level0.gzip", workdir / "level9.gzip"
    assert stored.stat().st_size > smallest.stat().st_size
    a, b = predecessor_reader(stored), predecessor_reader(smallest)
    assert torch.equal(a["integrated_grads"], b["integrated_grads"])
    assert lanet.igctl("attribute", str(photos["chelsea.png"]), "--gzip-level", "10").returncode == 2
