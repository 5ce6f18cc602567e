"""The real igctl against a real igd: files, pipelines, exit statuses."""

from __future__ import annotations

import itertools
import contextlib
import json
import os
import pty
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from daemon import IGCTL, IGD, SLOW_MODEL_OPTIONS, Igd, short_tempdir, steps_lasting, wait_until
from igctl.client import EXIT_TABLE
from igd.output.figure import CAPTION_HEIGHT
from reference import assert_reproduces, assert_same_result, read_result
from test_imaging import encoded

PREDECESSOR_SHAPES = {
    "integrated_grads": lambda n, c, h, w: (1, c, h, w),
    "integrated_directional_grads": lambda n, c, h, w: (n, c, h, w),
    "step_sizes": lambda n, c, h, w: (n, 1),
    "intermediates": lambda n, c, h, w: (n, c, h, w),
}


def check_result(path: Path, n: int, shape: tuple[int, int, int], classes: int) -> dict:
    result = read_result(path)
    for key, expected in PREDECESSOR_SHAPES.items():
        assert tuple(result[key].shape) == expected(n, *shape), key
    assert tuple(result["output"].shape) == (1, classes)
    assert isinstance(result["target_class"], int)
    return result


@pytest.fixture(scope="module")
def photos(fixtures: Path) -> dict[str, Path]:
    return {name: fixtures / "images" / name for name in ("chelsea.png", "chelsea.jpg", "coffee.png")}


@pytest.mark.slow  # the full-size default model and its chunk search
def test_attribute_on_the_default_model(photos: dict[str, Path], workdir: Path) -> None:
    with Igd() as igd:  # built-in EfficientNet-Lite0, chunk size measured at start-up
        out = igd.igctl("attribute", str(photos["chelsea.jpg"]), "tiger cat", "-o", str(workdir / "cat.gzip"),
                        "--steps", "16", "--heatmap", str(workdir / "cat.png"))
        assert out.returncode == 0, out.stderr
        result = check_result(workdir / "cat.gzip", 16, (3, 224, 224), 1000)
        assert result["target_class"] == 282 and result["target_name"] == "tiger cat"
        heatmap = Image.open(workdir / "cat.png")
        assert heatmap.format == "PNG" and heatmap.size == (448, 448 + CAPTION_HEIGHT)  # the 224 x 224 crop, twice
        assert "chelsea.jpg: " in out.stdout.decode() and "-> " in out.stdout.decode()
        assert re.search(r"event=warmed_up .*chunk_source=(measured|cached)", igd.log())  # not given
        batching = json.loads(igd.igctl("status", "--json").stdout)["batching"]
        search, chunk = batching["chunk_search"], batching["max_batch_points"]
        assert search["max_batch"] == chunk and str(chunk) in search["ms_per_point"] and search["memory_cap"] >= chunk
        assert f"{chunk} points ({batching['chunk_source']}: sizes 2, " in igd.igctl("status").stdout.decode()
        assert result["max_batch"] == chunk and result["chunk_source"] == batching["chunk_source"]
        cat = igd.igctl("attribute", str(photos["chelsea.jpg"]), "cat", "-o", str(workdir / "no.gzip"))
        assert cat.returncode == 1  # ImageNet has no plain "cat"; the hint names its cats
        assert b"did you mean 'tiger cat', 'Persian cat', 'Siamese cat', 'Egyptian cat'" in cat.stderr


@pytest.mark.slow  # a daemon of its own per model, 50 steps
@pytest.mark.parametrize("family", ["bit", "lanet"])
def test_attribute_on_the_fixture_models(fixtures: Path, photos: dict[str, Path], workdir: Path, family: str) -> None:
    reference = np.load(fixtures / f"{family}-tiny.reference.npz")
    with Igd(f"--{family}-path", str(fixtures / f"{family}-tiny.pth"), "--max-batch", "10") as igd:
        out = igd.igctl("attribute", str(photos["chelsea.png"]), "cat", "--steps", "50", "-o", str(workdir / "r.gzip"))
        assert out.returncode == 0, out.stderr
    result = check_result(workdir / "r.gzip", 50, (3, 32, 32), 10)
    assert result["target_class"] == 3
    assert_reproduces({key: value.numpy() for key, value in result.items() if isinstance(value, torch.Tensor)}, reference)


def test_stdin_and_stdout_give_the_same_bytes(lanet: Igd, photos: dict[str, Path], workdir: Path) -> None:
    to_file = lanet.igctl("attribute", str(photos["chelsea.png"]), "cat", "-o", str(workdir / "a.gzip"), "--steps", "8")
    assert to_file.returncode == 0, to_file.stderr
    piped = lanet.igctl("attribute", "-", "cat", "-o", "-", "--steps", "8", input=photos["chelsea.png"].read_bytes())
    assert piped.returncode == 0, piped.stderr
    assert_same_result(piped.stdout, (workdir / "a.gzip").read_bytes())
    implicit = subprocess.run([IGCTL, "--socket", str(lanet.socket), "attribute", "-", "--target", "cat", "--steps", "8"],
                              input=photos["chelsea.png"].read_bytes(), cwd=workdir, capture_output=True, timeout=120)
    assert implicit.returncode == 0, implicit.stderr
    assert_same_result((workdir / "stdin.gzip").read_bytes(), piped.stdout)  # without -o -, never to stdout
    assert implicit.stdout.decode().startswith("-: ")  # only the description line


def test_npz_format(lanet: Igd, photos: dict[str, Path], workdir: Path) -> None:
    out = lanet.igctl("attribute", str(photos["coffee.png"]), "ship", "--format", "npz", "--out-dir", str(workdir), "--steps", "6")
    assert out.returncode == 0, out.stderr
    with np.load(workdir / "coffee.npz") as arrays:
        assert arrays["integrated_directional_grads"].shape == (6, 3, 32, 32)
        assert str(arrays["target_name"]) == "ship"


def test_terminal_default_writes_stem_file_and_never_overwrites(lanet: Igd, photos: dict[str, Path], workdir: Path) -> None:
    def attribute(*args: str) -> tuple[int, str]:
        status, shown, other = on_a_terminal([IGCTL, "--socket", str(lanet.socket), "attribute", *args],
                                             cwd=workdir, stream="stdout")
        return status, shown + other.decode()

    status, text = attribute(str(photos["chelsea.png"]), "dog", "--steps", "4")
    assert status == 0, text
    assert (workdir / "chelsea.gzip").exists() and "chelsea.gzip" in text
    before = (workdir / "chelsea.gzip").read_bytes()
    status, text = attribute(str(photos["chelsea.png"]), "cat", "--steps", "4")
    assert status == 1 and "exists (use --force to overwrite)" in text
    assert (workdir / "chelsea.gzip").read_bytes() == before
    status, _ = attribute(str(photos["chelsea.png"]), "cat", "--steps", "4", "--force")
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
    assert runs["1"].keys() == runs["4"].keys()
    for name, data in runs["1"].items():  # one request at a time or four: the same results
        assert_same_result(data, runs["4"][name])


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
        assert run.returncode == 1 and b"permission denied on" in run.stderr
    assert [p.name for p in readonly.iterdir()] in ([], ["r.gzip"])
    assert not any(p.name.endswith(".part") for p in readonly.iterdir())


@pytest.mark.slow  # a daemon of its own, a 30 s request
def test_exit_status_daemon_stopped_mid_request(slow_model: Path, photos: dict[str, Path], workdir: Path) -> None:
    igd = Igd("--model", str(slow_model), *SLOW_MODEL_OPTIONS)
    try:
        steps = steps_lasting(igd, photos["chelsea.png"].read_bytes(), 30.0)
        client = subprocess.Popen(
            [IGCTL, "--socket", str(igd.socket), "attribute", str(photos["chelsea.png"]), "class 3",
             "--steps", str(steps), "-o", str(workdir / "late.gzip"), "--progress-json"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        wait_until_computing(client)
        igd.process.send_signal(signal.SIGKILL)
        assert client.wait(60) == 4
        assert b"closed the connection before answering" in client.stderr.read()
        assert not (workdir / "late.gzip").exists()
    finally:
        igd.stop()
        igd.cleanup()


def wait_until_computing(client: subprocess.Popen) -> None:
    """Read igctl's --progress-json lines until igd reports path points done."""
    for line in client.stdout:
        event = json.loads(line)
        if event.get("event") == "progress" and event["done"] > 0:
            return
    raise AssertionError(f"igctl ended before any progress: {client.wait()} {client.stderr.read()}")


def test_status_version_and_classify(lanet: Igd, photos: dict[str, Path]) -> None:
    status = lanet.igctl("status")
    assert status.returncode == 0 and b"lanet-c16-l6" in status.stdout
    as_json = json.loads(lanet.igctl("status", "--json").stdout)
    assert as_json["device"] == "cpu" and as_json["precision"] == "float32" and "batching" in as_json
    assert b"10 points (given)" in status.stdout and as_json["batching"]["chunk_search"] is None
    version = lanet.igctl("version").stdout.decode()
    assert "igctl 0.1.0 (protocol 1)" in version and "igd 0.1.0 (protocol 1)" in version
    classify = lanet.igctl("classify", str(photos["chelsea.png"]), str(photos["coffee.png"]), "--top", "2", "--json")
    records = [json.loads(line) for line in classify.stdout.decode().splitlines()]
    assert classify.returncode == 0 and [len(r["top"]) for r in records] == [2, 2]
    human = lanet.igctl("classify", str(photos["coffee.png"]))
    assert human.returncode == 0 and human.stdout.decode().startswith(f"{photos['coffee.png']}: ")


@pytest.mark.slow  # a daemon of its own, 50 steps
def test_tf32_on_a_cpu_is_reported_and_changes_nothing(fixtures: Path, photos: dict[str, Path], workdir: Path) -> None:
    reference = np.load(fixtures / "lanet-tiny.reference.npz")
    with Igd("-lp", str(fixtures / "lanet-tiny.pth"), "--max-batch", "10", env={"IGD_PRECISION": "tf32"}) as igd:
        assert json.loads(igd.igctl("status", "--json").stdout)["precision"] == "tf32"
        assert "cpu, tf32" in igd.igctl("status").stdout.decode()
        out = igd.igctl("attribute", str(photos["chelsea.png"]), "cat", "--steps", "50", "-o", str(workdir / "r.gzip"))
        assert out.returncode == 0, out.stderr
        assert "event=precision" in igd.log() and "none here" in igd.log()
    result = read_result(workdir / "r.gzip")
    assert_reproduces({key: value.numpy() for key, value in result.items() if isinstance(value, torch.Tensor)}, reference)


def test_help_and_readme_document_the_same_exit_statuses() -> None:
    out = subprocess.run([IGCTL, "--help"], capture_output=True, text=True, timeout=60).stdout
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    lines = readme[readme.index("### Exit statuses"):].splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("|")) + 2  # after the header rows
    rows = [line.split("|")[1:3] for line in itertools.takewhile(lambda line: line.startswith("|"), lines[first:])]
    documented = [(code.strip(), meaning.strip()) for code, meaning in rows]
    assert documented == [(str(code), meaning) for code, meaning in EXIT_TABLE]
    for code, meaning in EXIT_TABLE:
        assert f"{code:<3} {meaning}" in out


def test_out_dir_keeps_folders_and_names_never_collide(lanet: Igd, photos: dict[str, Path], workdir: Path) -> None:
    for folder in ("cats", "dogs"):
        (workdir / folder).mkdir()
        shutil.copy(photos["chelsea.png"], workdir / folder / "img.png")
    images = [str(workdir / "cats/img.png"), str(workdir / "dogs/img.png")]
    run = lanet.igctl("attribute", *images, "--target", "cat", "--out-dir", str(workdir / "out"), "--jobs", "2",
                      "--steps", "4")
    assert run.returncode == 0, run.stderr
    assert sorted(str(p.relative_to(workdir / "out")) for p in (workdir / "out").rglob("*.gzip")) == [
        "cats/img.gzip", "dogs/img.gzip"]
    # Without --out-dir both would be img.gzip here: refused before anything is sent.
    before = lanet.log().count("op=attribute")
    flat = subprocess.run([IGCTL, "--socket", str(lanet.socket), "attribute", *images, "-t", "cat", "--steps", "4"],
                          cwd=workdir, capture_output=True, text=True, timeout=60)
    assert flat.returncode == 1 and "would both write img.gzip" in flat.stderr and "nothing was sent" in flat.stderr
    assert not (workdir / "img.gzip").exists() and lanet.log().count("op=attribute") == before


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
    a, b = read_result(stored), read_result(smallest)
    assert torch.equal(a["integrated_grads"], b["integrated_grads"])
    assert lanet.igctl("attribute", str(photos["chelsea.png"]), "--gzip-level", "10").returncode == 2


def on_a_terminal(command: list[str], cwd: Path | None = None, stream: str = "stderr") -> tuple[int, str, bytes]:
    """Run ``command`` with ``stream`` (stdout or stderr) on a pseudo-terminal: (status,
    what the terminal showed, what the other stream carried)."""
    main, replica = pty.openpty()
    terminal, other = (replica, subprocess.PIPE) if stream == "stdout" else (subprocess.PIPE, replica)
    process = subprocess.Popen(command, cwd=cwd, stdout=terminal, stderr=other)
    os.close(replica)
    shown = []
    while True:
        try:
            chunk = os.read(main, 65536)
        except OSError:
            break
        if not chunk:
            break
        shown.append(chunk)
    os.close(main)
    piped = (process.stderr if stream == "stdout" else process.stdout).read()
    return process.wait(120), b"".join(shown).decode(errors="replace"), piped


@pytest.fixture(scope="module")
def slow(slow_model: Path, photos: dict[str, Path]):
    """A daemon on the slow test model, and n_steps that make a request last 30 s here."""
    with Igd("--model", str(slow_model), *SLOW_MODEL_OPTIONS) as igd:
        igd.long_steps = steps_lasting(igd, photos["chelsea.png"].read_bytes(), 30.0)
        yield igd


@pytest.mark.slow  # 30 s requests, sized on this machine
@pytest.mark.parametrize("sig, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_stop_signal_cancels_the_request_on_the_daemon(slow: Igd, photos: dict[str, Path], workdir: Path,
                                                        sig: signal.Signals, status: int) -> None:
    cancelled_before = slow.log().count("event=pass_cancelled")
    out = workdir / "never.gzip"
    client = subprocess.Popen([IGCTL, "--socket", str(slow.socket), "attribute", str(photos["chelsea.png"]), "class 3",
                               "--steps", str(slow.long_steps), "-o", str(out), "--progress-json"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_until_computing(client)  # the 30 s request is computing now
    time.sleep(1.0)
    sent = time.monotonic()
    client.send_signal(sig)
    assert client.wait(30) == status
    assert time.monotonic() - sent < 1.0
    assert "interrupted" in client.stderr.read().decode()
    assert os.listdir(workdir) == []  # no result, no temporary file
    wait_until(lambda: slow.log().count("event=pass_cancelled") > cancelled_before, 10, "event=pass_cancelled",
               log=slow.log, interval=0.1)
    log = slow.log()
    assert "outcome=cancelled" in log
    stopped = log.split("event=pass_cancelled")[-1].splitlines()[0]
    done, total = (int(n) for n in stopped.split("after ")[1].split(" path points")[0].split(" of "))
    assert total == slow.long_steps and done < total / 2, stopped  # the compute stopped too
    after = slow.igctl("attribute", str(photos["chelsea.png"]), "class 3", "--steps", "32", "-o", str(workdir / "n.gzip"))
    assert after.returncode == 0, after.stderr


@pytest.mark.slow  # a daemon of its own, held in start-up
def test_status_and_requests_during_start_up(fixtures: Path, photos: dict[str, Path], workdir: Path) -> None:
    # Start-up reads the class names from a FIFO: igd stays in "loading the model" until
    # the test writes them, which makes the start-up phase last as long as the test needs.
    classes = workdir / "classes.fifo"
    os.mkfifo(classes)
    launched = time.monotonic()
    igd = Igd("-lp", str(fixtures / "lanet-tiny.pth"), "--max-batch", "10", "--classes", str(classes),
              wait_ready=False)
    try:
        wait_until(igd.socket.exists, 60, "igd's socket", process=igd.process, log=igd.log)
        started = time.monotonic()
        status = igd.igctl("status")
        answered_in = time.monotonic() - started
        assert status.returncode == 5, status
        assert b"starting: loading the model" in status.stdout and answered_in < 1.0
        state = json.loads(igd.igctl("status", "--json").stdout)
        assert state["state"] == "starting" and state["startup"]["phase"] == "loading the model"
        assert time.monotonic() - launched - 2.0 < state["uptime_s"] <= time.monotonic() - launched
        assert b"starting (loading the model)" in igd.igctl("version").stdout
        waiting = subprocess.Popen([IGCTL, "--socket", str(igd.socket), "status", "--wait", "120"],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        attribute = subprocess.Popen([IGCTL, "--socket", str(igd.socket), "attribute", str(photos["chelsea.png"]),
                                      "cat", "--steps", "8", "-o", str(workdir / "r.gzip")],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        time.sleep(1.0)
        assert waiting.poll() is None and attribute.poll() is None  # both wait for start-up
        (workdir / "names.txt").write_text("\n".join(["airplane", "automobile", "bird", "cat", "deer", "dog", "frog",
                                                        "horse", "ship", "truck"]) + "\n")
        with open(classes, "w") as fifo:
            fifo.write((workdir / "names.txt").read_text())
        assert waiting.wait(120) == 0 and b"state      ready" in waiting.stdout.read()
        assert attribute.wait(120) == 0
        assert b"waiting for igd to finish starting (loading the model" in attribute.stderr.read()
        assert read_result(workdir / "r.gzip")["target_name"] == "cat"
        assert igd.igctl("status").returncode == 0
    finally:
        if igd.process.poll() is None and not igd.notify.messages:
            with contextlib.suppress(OSError):  # never leave igd blocked on the FIFO
                os.close(os.open(classes, os.O_WRONLY | os.O_NONBLOCK))
        igd.stop()
        igd.cleanup()


@pytest.mark.slow  # a daemon of its own
def test_status_wait_waits_for_the_socket_too(fixtures: Path) -> None:
    directory = short_tempdir()
    socket_path = directory / "igd.sock"
    try:
        waiting = subprocess.Popen([IGCTL, "--socket", str(socket_path), "status", "--wait", "120"],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        time.sleep(0.5)
        assert waiting.poll() is None
        daemon = subprocess.Popen([IGD, "serve", "-bp", str(fixtures / "bit-tiny.pth"), "--max-batch", "10",
                                   "--socket", str(socket_path)], stderr=subprocess.DEVNULL)
        try:
            assert waiting.wait(120) == 0 and b"state      ready" in waiting.stdout.read()
        finally:
            daemon.send_signal(signal.SIGTERM)
            assert daemon.wait(60) == 0
        gone = subprocess.run([IGCTL, "--socket", str(socket_path), "status", "--wait", "0.5"], capture_output=True)
        assert gone.returncode == 3
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def test_results_go_to_files_unless_stdout_is_asked_for(lanet: Igd, photos: dict[str, Path], workdir: Path) -> None:
    with open(workdir / "captured", "wb") as captured:  # stdout is a file, not a terminal
        run = subprocess.run([IGCTL, "--socket", str(lanet.socket), "attribute", str(photos["chelsea.png"]), "cat",
                              "--steps", "4"], cwd=workdir, stdout=captured, stderr=subprocess.PIPE, timeout=120)
    assert run.returncode == 0, run.stderr
    assert read_result(workdir / "chelsea.gzip")["target_name"] == "cat"
    assert (workdir / "captured").read_text().startswith(f"{photos['chelsea.png']}: ")  # text, not a result


def test_every_output_is_checked_before_any_request(lanet: Igd, photos: dict[str, Path], workdir: Path) -> None:
    before = lanet.log().count("op=attribute")
    started = time.monotonic()
    missing = lanet.igctl("attribute", str(photos["chelsea.png"]), "cat", "-o", str(workdir / "missing/dir/x.gzip"))
    assert time.monotonic() - started < 1.0
    assert missing.returncode == 1 and f"folder {workdir}/missing/dir does not exist".encode() in missing.stderr
    (workdir / "taken.gzip").write_bytes(b"keep")
    taken = lanet.igctl("attribute", str(photos["chelsea.png"]), "cat", "-o", str(workdir / "taken.gzip"))
    assert taken.returncode == 1 and b"exists (use --force to overwrite)" in taken.stderr
    heatmap = lanet.igctl("attribute", str(photos["chelsea.png"]), "cat", "-o", str(workdir / "ok.gzip"),
                          "--heatmap", str(workdir / "nodir/h.png"))
    assert heatmap.returncode == 1 and b"nodir does not exist" in heatmap.stderr
    assert lanet.log().count("op=attribute") == before  # nothing reached the daemon
    assert sorted(os.listdir(workdir)) == ["taken.gzip"] and (workdir / "taken.gzip").read_bytes() == b"keep"


@pytest.mark.slow  # the 30 s slow daemon, a 3 s progress bar
def test_progress_events_as_json_and_as_a_bar(slow: Igd, photos: dict[str, Path], workdir: Path) -> None:
    run = slow.igctl("attribute", str(photos["chelsea.png"]), "class 3", "--steps", "200", "--progress-json",
                     "-o", str(workdir / "r.gzip"))
    assert run.returncode == 0, run.stderr
    events = [json.loads(line) for line in run.stdout.decode().splitlines() if line.startswith("{")]
    assert events[0]["event"] == "queued" and events[0]["ahead"] == 0
    progress = [e for e in events if e["event"] == "progress"]
    assert progress and progress[-1] == {"image": str(photos["chelsea.png"]), "event": "progress", "done": 200,
                                         "total": 200}
    assert [e["done"] for e in progress] == sorted(e["done"] for e in progress)
    steps = max(200, slow.long_steps // 10)  # about 3 s: the bar redraws several times
    status, shown, _ = on_a_terminal([IGCTL, "--socket", str(slow.socket), "attribute", str(photos["chelsea.png"]),
                                      "class 3", "--steps", str(steps), "-o", str(workdir / "bar.gzip")])
    assert status == 0, shown
    assert "chelsea.png: path points" in shown and f"/{steps}" in shown
    quiet = slow.igctl("attribute", str(photos["chelsea.png"]), "class 3", "--steps", "64", "-o", str(workdir / "q.gzip"))
    assert quiet.returncode == 0 and quiet.stderr == b""  # not a terminal: no bar, no events


def test_a_reader_that_stops_reading_ends_igctl_quietly(lanet: Igd, photos: dict[str, Path], workdir: Path) -> None:
    """`igctl attribute --progress-json | head -2`: igctl's stdout closes while events still
    come; it ends as a program killed by SIGPIPE does (status 141, nothing on stderr), blames
    nobody, leaves no partial file, and the daemon goes on serving."""
    command = [IGCTL, "--socket", str(lanet.socket), "attribute", str(photos["chelsea.png"]), "cat", "--steps", "200",
               "--progress-json", "-o", str(workdir / "r.gzip")]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert process.stdout is not None and process.stderr is not None
    first = [process.stdout.readline() for _ in range(2)]  # what `head -2` reads
    process.stdout.close()
    assert process.wait(60) == 141, process.stderr.read()
    assert all(line.startswith(b"{") for line in first) and process.stderr.read() == b""
    assert not any(workdir.iterdir())  # neither the result nor its temporary
    again = lanet.igctl("attribute", str(photos["chelsea.png"]), "cat", "--steps", "8", "-o", str(workdir / "r.gzip"))
    assert again.returncode == 0, again.stderr


def test_usage_hints(lanet: Igd, photos: dict[str, Path], workdir: Path) -> None:
    typo = lanet.igctl("attribute", str(photos["chelsea.png"]), str(workdir / "nope.jpg"))
    assert typo.returncode == 2 and b"Did you mean to pass several images?" in typo.stderr
    assert b"--target" in typo.stderr
    flag_after = subprocess.run([IGCTL, "status", "--socket", str(lanet.socket)], capture_output=True, timeout=60)
    assert flag_after.returncode == 0 and b"state      ready" in flag_after.stdout
    steps = lanet.igctl("attribute", str(photos["chelsea.png"]), "cat", "--steps", "5000")
    assert steps.returncode == 2 and b"--steps must be between 1 and 1024, got 5000" in steps.stderr
    riemann = lanet.igctl("attribute", str(photos["chelsea.png"]), "cat", "--steps", "1", "--method", "riemann_left")
    assert riemann.returncode == 2 and b"--steps must be at least 2 for riemann_left, got 1" in riemann.stderr
