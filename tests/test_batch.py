"""`igd batch`: local, sharded and Ray runs agree with the daemon; errors are recorded,
not fatal; interrupted runs resume without doing anything twice; parquet output."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from daemon import IGD, Igd, short_tempdir, wait_until
from reference import read_result
from igd.batch.inputs import Pair, discover, in_shard
from wire import WireClient

BIN = Path(sys.executable).parent
TARGETS = ("cat", "3")
STEPS = "8"


@pytest.fixture(scope="module")
def dataset(fixtures: Path):
    """48 distinct images in three folders, from the fixture photos."""
    root = short_tempdir()
    photos = [Image.open(fixtures / "images" / name).convert("RGB") for name in ("chelsea.png", "coffee.png")]
    for i in range(48):
        photo = photos[i % 2]
        image = photo.rotate(i * 7, expand=False).crop((i, i, photo.width - 2 * i, photo.height - i))
        if i % 3 == 0:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        folder = root / "images" / f"class{i % 3}"
        folder.mkdir(parents=True, exist_ok=True)
        image.save(folder / f"{i:03d}.{'png' if i % 2 else 'jpg'}")
    yield root
    shutil.rmtree(root, ignore_errors=True)


def igd_batch(*args: str, timeout: float = 900, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([IGD, "batch", *args], capture_output=True, text=True, timeout=timeout, env=env)


def model_args(fixtures: Path) -> list[str]:
    return ["-bp", str(fixtures / "bit-tiny.pth"), "--max-batch", "16", "--steps", STEPS]


def statuses(out: Path) -> list[dict]:
    return [json.loads(line) for path in sorted(out.glob("status*.jsonl")) for line in path.read_text().splitlines()]


def assert_same_statuses(got: list[dict], expected: list[dict]) -> None:
    """The same pairs with the same fields and values; floats (accuracy, probability, ...)
    to a relative 1e-3: images that shared passes differently round differently in the last
    bits, and the completeness gap divides by a rise that can be small (seen: 1.8e-4 on the
    BiT fixture's gap of 210 %; the result tensors are compared with a tolerance)."""
    def by_pair(records: list[dict]) -> dict[tuple[str, str], dict]:
        return {(record["id"], record["target"]): record for record in records}

    got_pairs, expected_pairs = by_pair(got), by_pair(expected)
    assert len(got_pairs) == len(got) and got_pairs.keys() == expected_pairs.keys()
    for pair, record in got_pairs.items():
        other = expected_pairs[pair]
        assert record.keys() == other.keys(), pair
        for key, value in record.items():
            if isinstance(value, float):
                assert value == pytest.approx(other[key], rel=1e-3, abs=1e-6), (pair, key)
            else:
                assert value == other[key], (pair, key)


@pytest.fixture(scope="module")
def local_run(dataset: Path, fixtures: Path) -> Path:
    out = dataset / "out-local"
    run = igd_batch(str(dataset / "images"), str(out), *model_args(fixtures), "--target", "cat", "--target", "3")
    assert run.returncode == 0, run.stderr
    assert "96 pairs: 96 done now, 0 done before, 0 failed" in run.stdout
    return out


@pytest.mark.slow  # the dataset through igd batch (96 pairs), a third of them through the daemon
def test_local_results_equal_the_daemons(local_run: Path, dataset: Path, bit_tiny: Igd) -> None:
    records = statuses(local_run)
    assert len(records) == 96 and all(r["ok"] for r in records)
    with WireClient(str(bit_tiny.socket)) as client:  # the session's daemon (conftest): -bp bit-tiny.pth --max-batch 16
        for record in records[::3]:  # a third of the pairs, every folder and both targets
            image = (dataset / "images" / record["id"]).read_bytes()
            target = int(record["target"]) if record["target"].isdecimal() else record["target"]
            answer = client.call("attribute", {"image": image, "target": target, "n_steps": int(STEPS)})
            served = read_result(answer["result"]["data"])
            ours = read_result(local_run / record["output"])
            for key in ("integrated_grads", "integrated_directional_grads", "output"):
                error = (ours[key] - served[key]).norm() / served[key].norm()
                assert error < 1e-5, (record["id"], key, float(error))
            assert record["target_index"] == answer["result"]["target"]["index"]
            assert record["prediction"] == answer["result"]["prediction"]["name"]


@pytest.mark.slow  # the dataset through igd batch (96 pairs)
def test_output_layout_mirrors_the_input(local_run: Path) -> None:
    assert (local_run / "class0" / "000.cat.gzip").is_file() and (local_run / "class0" / "000.3.gzip").is_file()
    assert len(list(local_run.rglob("*.gzip"))) == 96


@pytest.mark.slow  # three igd batch runs of the dataset
def test_shards_cover_everything_once(local_run: Path, dataset: Path, fixtures: Path) -> None:
    out = dataset / "out-shards"
    for i in (1, 2, 3):
        run = igd_batch(str(dataset / "images"), str(out), *model_args(fixtures), "-t", "cat", "-t", "3",
                        "--shard", f"{i}/3")
        assert run.returncode == 0, run.stderr
    assert sorted(p.name for p in out.glob("status*.jsonl")) == [f"status.shard-{i}-of-3.jsonl" for i in (1, 2, 3)]
    sharded = statuses(out)
    assert_same_statuses(sharded, statuses(local_run))
    for record in sharded:
        a, b = read_result(out / record["output"]), read_result(local_run / record["output"])
        torch.testing.assert_close(a["integrated_grads"], b["integrated_grads"], rtol=1e-5, atol=1e-7)


def test_shard_membership_is_a_partition() -> None:
    pairs = [Pair(f"img{i}.png", f"/x/img{i}.png", t) for i in range(300) for t in ("a", "b")]
    owners = [[n for n in range(1, 6) if in_shard(pair, (n, 5))] for pair in pairs]
    assert all(len(owner) == 1 for owner in owners)
    sizes = [sum(1 for owner in owners if owner == [n]) for n in range(1, 6)]
    assert min(sizes) > 80  # roughly even


@pytest.mark.slow  # two igd batch runs
def test_bad_image_and_unknown_target_get_their_own_lines(dataset: Path, fixtures: Path) -> None:
    work = dataset / "errors"
    work.mkdir()
    (work / "broken.jpg").write_bytes((fixtures / "images" / "chelsea.jpg").read_bytes()[:2000])
    shutil.copy(fixtures / "images" / "chelsea.png", work / "good.png")
    manifest = work / "manifest.jsonl"
    manifest.write_text("\n".join(json.dumps(row) for row in [
        {"path": "good.png", "target": ["cat", "unicorn"], "id": "good"},
        {"path": "broken.jpg", "target": "cat"},
        {"path": "missing.png", "target": "dog"},
        {"path": "good.png", "target": "7", "id": "good-again"},
    ]) + "\n")
    run = igd_batch(str(manifest), str(work / "out"), *model_args(fixtures))
    assert run.returncode == 1
    assert "5 pairs: 2 done now, 0 done before, 3 failed" in run.stdout
    by_pair = {(r["id"], r["target"]): r for r in statuses(work / "out")}
    assert by_pair[("good", "cat")]["ok"] and by_pair[("good-again", "7")]["target_name"] == "horse"
    assert by_pair[("good", "unicorn")]["code"] == "unknown_target"
    assert by_pair[("broken.jpg", "cat")]["code"] == "bad_image"
    missing = by_pair[("missing.png", "dog")]
    assert missing["code"] == "bad_image" and "No such file or directory" in missing["message"]
    again = igd_batch(str(manifest), str(work / "out"), *model_args(fixtures))
    assert again.returncode == 1 and "--resume" in again.stderr  # never mixes two runs silently


def test_hostile_manifests_stay_inside_out_dir(fixtures: Path) -> None:
    work = short_tempdir()
    try:
        outside = work / "elsewhere"
        outside.mkdir()
        (outside / "escape.cat.gzip").write_bytes(b"precious")
        images = work / "in"
        (images / "sub").mkdir(parents=True)
        (images / "dup").mkdir()
        shutil.copy(fixtures / "images" / "chelsea.png", images / "sub" / "cat.png")
        shutil.copy(fixtures / "images" / "chelsea.png", images / "dup" / "a.png")
        shutil.copy(fixtures / "images" / "chelsea.jpg", images / "dup" / "a.jpg")
        os.mkfifo(images / "fifo.png")
        (images / "folder.png").mkdir()
        big = images / "big.png"
        big.write_bytes(b"\x89PNG" + bytes(70 * 2**20))  # over the 64 MiB image limit
        out = work / "out"
        out.mkdir()
        (out / "linked").symlink_to(outside)  # a folder in OUT_DIR that leads out of it
        manifest = images / "manifest.jsonl"
        rows = [
            {"path": "sub/cat.png", "id": str(outside / "escape"), "target": "cat"},
            {"path": "sub/cat.png", "id": "../../elsewhere/escape", "target": "cat"},
            {"path": "sub/cat.png", "id": "linked/escape", "target": "cat"},
            {"path": str(outside / ".." / "in" / "sub" / "cat.png"), "target": "dog"},
            {"path": "dup/a.png", "target": "cat"},
            {"path": "dup/a.jpg", "target": "cat"},
            {"path": "nul\u0000byte.png", "target": "cat"},
            {"path": "fifo.png", "target": "cat"},
            {"path": "/dev/zero", "target": "cat"},
            {"path": "folder.png", "target": "cat"},
            {"path": "big.png", "target": "cat"},
        ]
        manifest.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
        before = {p: p.read_bytes() for p in outside.iterdir()}
        run = igd_batch(str(manifest), str(out), *model_args(fixtures), timeout=300)
        assert run.returncode == 1, run.stderr
        assert "Traceback" not in run.stderr
        assert {p: p.read_bytes() for p in outside.iterdir()} == before  # nothing outside was made or changed
        records = statuses(out)
        assert len(records) == len(rows)  # every row has its status line
        by_path = {}
        for record in records:
            by_path.setdefault(record["path"].rsplit("/", 1)[-1], []).append(record)
        written = sorted(r["output"] for r in records if r["ok"])
        assert len(written) == len(set(written)) == 5  # none overwritten by another
        assert all((out / name).resolve().is_relative_to(out.resolve()) for name in written)
        assert {"dup/a.png.cat.gzip", "dup/a.jpg.cat.gzip"} <= set(written)
        linked = next(r for r in records if r["id"] == "linked/escape")
        assert not linked["ok"] and "symbolic link" in linked["message"]
        refused = {name: next(r for r in records if r["path"].endswith(name)) for name in
                   ("byte.png", "fifo.png", "/dev/zero", "folder.png", "big.png")}
        assert all(not r["ok"] and r["code"] == "bad_image" for r in refused.values()), refused
        assert "NUL byte" in refused["byte.png"]["message"] and "a FIFO" in refused["fifo.png"]["message"]
        assert "character device" in refused["/dev/zero"]["message"]
        assert "a directory" in refused["folder.png"]["message"]
        assert "images may have up to 67,108,864" in refused["big.png"]["message"]
    finally:
        shutil.rmtree(work, ignore_errors=True)


@pytest.mark.slow  # an igd batch run of its own
def test_result_files_have_igctls_mode(dataset: Path, fixtures: Path) -> None:
    folder = dataset / "mode"
    folder.mkdir()
    shutil.copy(fixtures / "images" / "chelsea.png", folder / "one.png")
    old = os.umask(0o022)
    try:
        run = igd_batch(str(folder), str(dataset / "mode-out"), *model_args(fixtures), "-t", "cat")
    finally:
        os.umask(old)
    assert run.returncode == 0, run.stderr
    assert oct((dataset / "mode-out" / "one.cat.gzip").stat().st_mode & 0o777) == "0o644"  # as igctl writes them


def test_bad_options_fail_before_the_model_loads(dataset: Path) -> None:
    # The checkpoint does not exist: had igd batch loaded the model first, that would be the error.
    run = igd_batch(str(dataset / "images"), str(dataset / "never"), "-bp", str(dataset / "no-such-model.pth"),
                    "--method", "riemann_left", "--steps", "1")
    assert run.returncode == 2 and "--steps must be at least 2 for riemann_left, got 1" in run.stderr
    assert "no-such-model" not in run.stderr and not (dataset / "never").exists()


def test_inputs_from_globs_and_csv(dataset: Path) -> None:
    by_glob = discover(str(dataset / "images" / "class1" / "*.png"), ("cat",))
    assert by_glob and all(p.id.endswith(".png") and "/" not in p.id for p in by_glob)
    csv = dataset / "list.csv"
    csv.write_text("path,target,id\nimages/class0/000.jpg,cat|dog,first\nimages/class1/001.png,,second\n")
    pairs = discover(str(csv), ())
    assert [(p.id, p.target) for p in pairs] == [("first", "cat"), ("first", "dog"), ("second", "predicted")]
    assert Path(pairs[0].path).is_file()


def kill_part_way(command: list[str], status_glob: Path, lines: int, timeout: float = 600,
                  env: dict[str, str] | None = None) -> None:
    """Start ``command`` and SIGKILL it once ``lines`` status lines exist."""
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
                               env=env)
    try:
        wait_until(lambda: sum(len(p.read_text().splitlines()) for p in status_glob.parent.glob(status_glob.name))
                   >= lines, timeout, f"{lines} status lines, to interrupt the run there", process=process,
                   log=lambda: process.stderr.read().decode())
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(60)


def outputs_of(out: Path) -> dict[str, int]:
    """Each recorded output and its modification time, to prove a resume leaves them alone."""
    return {r["output"]: (out / r["output"]).stat().st_mtime_ns for r in statuses(out) if r.get("ok")}


def check_resumed(out: Path, first: dict[str, int], expected_pairs: int) -> None:
    records = statuses(out)
    keys = [(r["id"], r["target"]) for r in records]
    assert len(keys) == len(set(keys)) == expected_pairs, "each pair exactly once"
    assert all(r["ok"] for r in records)
    for output, mtime in first.items():
        assert (out / output).stat().st_mtime_ns == mtime, f"{output} was done twice"


@pytest.mark.slow  # two igd batch runs of the dataset
def test_interrupted_local_run_resumes(dataset: Path, fixtures: Path) -> None:
    out = dataset / "out-resume"
    command = [IGD, "batch", str(dataset / "images"), str(out), *model_args(fixtures), "-t", "cat", "-t", "3"]
    kill_part_way(command, out / "status.jsonl", 20)
    first = outputs_of(out)
    assert 20 <= len(first) < 96
    run = igd_batch(*command[2:], "--resume")
    assert run.returncode == 0, run.stderr
    assert f"96 pairs: {96 - len(first)} done now, {len(first)} done before, 0 failed" in run.stdout
    check_resumed(out, first, 96)


@pytest.mark.slow  # two igd batch runs
def test_parquet_rows_and_precision(dataset: Path, fixtures: Path) -> None:
    pandas = pytest.importorskip("pandas", reason="pandas comes with the ray extra")
    folder = dataset / "images" / "class2"
    half, full = dataset / "pq16", dataset / "pq32"
    assert igd_batch(str(folder), str(half), *model_args(fixtures), "-t", "cat", "--format", "parquet",
                     "--with-steps").returncode == 0
    assert igd_batch(str(folder), str(full), *model_args(fixtures), "-t", "cat", "--format", "parquet",
                     "--dtype", "float32").returncode == 0
    rows16 = pandas.concat(pandas.read_parquet(p) for p in sorted(half.glob("part-*.parquet")))
    rows32 = pandas.concat(pandas.read_parquet(p) for p in sorted(full.glob("part-*.parquet")))
    assert len(rows16) == len(rows32) == 16
    assert {"id", "path", "target", "prediction", "convergence_delta", "integrated_grads", "shape",
            "directional_grads", "step_sizes"} <= set(rows16.columns)
    assert "directional_grads" not in rows32.columns
    for (_, a), (_, b) in zip(rows16.sort_values("id").iterrows(), rows32.sort_values("id").iterrows()):
        assert a["id"] == b["id"] and list(a["shape"]) == [3, 32, 32]
        ig16, ig32 = np.asarray(a["integrated_grads"], dtype=np.float32), np.asarray(b["integrated_grads"])
        assert ig16.dtype == np.float32 and np.linalg.norm(ig16 - ig32) / np.linalg.norm(ig32) < 1e-3
        assert len(a["directional_grads"]) == int(STEPS) * 3 * 32 * 32


# --- Ray -------------------------------------------------------------------------------------


def ray_environment(home: Path, temp: Path) -> dict[str, str]:
    """This environment with Ray's state of the user kept out: HOME (~/.ray/auth_token, which
    a local Ray run leaves behind) and Ray's temporary folder (/tmp/ray) are ``home`` and
    ``temp``, and no RAY_AUTH_* setting comes from the caller."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("RAY_AUTH_")}
    return {**env, "HOME": str(home), "RAY_TMPDIR": str(temp), "RAY_USAGE_STATS_ENABLED": "0"}


@contextlib.contextmanager
def ray_cluster_in(home: Path):
    """A Ray head of its own, started by `ray start --head --block` with ``home`` as HOME (2 CPUs,
    small object store, no dashboard, loopback) in a process group of its own, and stopped by
    ending that group: never `ray stop`, which ends every Ray cluster of the machine (another
    test run's too). Yields its address and the environment to run `igd batch` in."""
    if shutil.which("ray", path=str(BIN)) is None:
        if os.environ.get("CI"):
            pytest.fail("Ray is not installed (the test extra includes it)")
        pytest.skip("Ray is not installed: pip install 'igd[ray]'")
    temp = short_tempdir()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = ray_environment(home, temp)
    log = temp / "head.log"
    with log.open("w") as sink:
        head = subprocess.Popen([str(BIN / "ray"), "start", "--head", "--block", "--num-cpus=2",
                                 "--object-store-memory=150000000", "--include-dashboard=false",
                                 "--node-ip-address=127.0.0.1", f"--port={port}", f"--temp-dir={temp}",
                                 "--disable-usage-stats"],
                                stdout=sink, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        wait_until(lambda: "Ray runtime started" in log.read_text(), 300, "the Ray head to start",
                   process=head, log=log.read_text, interval=0.2)
        yield f"127.0.0.1:{port}", env
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(head.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            head.wait(timeout=5)  # Ray takes half a minute to stop gracefully: nothing here needs it
        with contextlib.suppress(ProcessLookupError):
            os.killpg(head.pid, signal.SIGKILL)  # whatever of the group outlived its head
        head.wait()
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="module")
def ray_cluster(dataset: Path):
    """A local Ray cluster of its own HOME (no token there: no token auth) and temporary
    folder (see ray_environment); yields its address and the environment for `igd batch`."""
    home = short_tempdir()
    try:
        with ray_cluster_in(home) as cluster:
            yield cluster
    finally:
        shutil.rmtree(home, ignore_errors=True)


@pytest.mark.slow
def test_an_interrupted_ray_run_resumes_and_agrees_with_local(ray_cluster: tuple[str, dict], local_run: Path,
                                                              dataset: Path, fixtures: Path) -> None:
    """Killed part way, then resumed: each pair done once, and the whole agrees with the local run."""
    address, env = ray_cluster
    out = dataset / "out-ray"
    command = [IGD, "batch", str(dataset / "images"), str(out), *model_args(fixtures), "-t", "cat", "-t", "3",
               "--backend", "ray", "--address", address, "--workers", "2"]
    kill_part_way(command, out / "status.jsonl", 20, env=env)
    first = outputs_of(out)
    assert 20 <= len(first) < 96
    run = igd_batch(*command[2:], "--resume", env=env)
    assert run.returncode == 0, run.stderr
    check_resumed(out, first, 96)
    assert_same_statuses(statuses(out), statuses(local_run))
    for record in statuses(out):
        a, b = read_result(out / record["output"]), read_result(local_run / record["output"])
        torch.testing.assert_close(a["integrated_grads"], b["integrated_grads"], rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_a_token_in_home_changes_nothing_for_a_cluster_without_auth(ray_cluster: tuple[str, dict], dataset: Path,
                                                                    fixtures: Path) -> None:
    address, env = ray_cluster
    home = short_tempdir()
    try:
        (home / ".ray").mkdir()
        (home / ".ray" / "auth_token").write_text("c" * 64)
        single = dataset / "ray-token-unused"
        single.mkdir()
        shutil.copy(fixtures / "images" / "chelsea.png", single / "one.png")
        run = igd_batch(str(single), str(dataset / "out-ray-token-unused"), *model_args(fixtures), "-t", "cat",
                        "--backend", "ray", "--address", address, "--workers", "1", timeout=300,
                        env={**env, "HOME": str(home)})
        assert run.returncode == 0 and "1 pairs: 1 done now" in run.stdout, run.stderr
    finally:
        shutil.rmtree(home, ignore_errors=True)


@pytest.mark.slow
def test_ray_works_whatever_token_home_holds(dataset: Path, fixtures: Path) -> None:
    """A local Ray run (ours without --address included) leaves ~/.ray/auth_token; `ray
    start` then turns token auth on with it, and ray.init(address=...) used to connect
    without it (InvalidAuthToken). Now: that token is sent; a token the cluster never issued
    gets one line naming the file and the fix; a token beside a cluster without token auth
    changes nothing."""
    single = dataset / "ray-token"
    single.mkdir()
    shutil.copy(fixtures / "images" / "chelsea.png", single / "one.png")
    server_home, other_home = short_tempdir(), short_tempdir()
    try:
        for home, token in ((server_home, "a" * 64), (other_home, "b" * 64)):
            (home / ".ray").mkdir()
            (home / ".ray" / "auth_token").write_text(token)

        def run(out: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
            return igd_batch(str(single), str(dataset / out), *model_args(fixtures), "-t", "cat", "--backend", "ray",
                             "--address", address, "--workers", "1", timeout=300, env=env)

        with ray_cluster_in(server_home) as (address, env), ThreadPoolExecutor(2) as runs:
            # Side by side: each is mostly waiting for Ray to start its worker.
            same_run = runs.submit(run, "ray-token-same", env)
            stale_run = runs.submit(run, "ray-token-stale", {**env, "HOME": str(other_home)})
            same, stale = same_run.result(), stale_run.result()
            assert same.returncode == 0, same.stderr
            assert "1 pairs: 1 done now" in same.stdout
            assert stale.returncode == 1, stale.stderr
            last = stale.stderr.strip().splitlines()[-1]
            assert "Traceback" not in stale.stderr, stale.stderr
            assert f"refused Ray's auth token ({other_home / '.ray' / 'auth_token'};" in last, stale.stderr
            assert "RAY_AUTH_TOKEN_PATH=FILE" in last
    finally:
        shutil.rmtree(server_home, ignore_errors=True)
        shutil.rmtree(other_home, ignore_errors=True)


# --- One run per OUT_DIR, its files and nothing else -----------------------------------------


@pytest.mark.slow  # two igd batch runs
def test_a_symlinked_status_file_is_refused(fixtures: Path) -> None:
    work = short_tempdir()
    try:
        images, out, outside = work / "in", work / "out", work / "elsewhere.jsonl"
        images.mkdir()
        out.mkdir()
        shutil.copy(fixtures / "images" / "chelsea.png", images / "one.png")
        outside.write_text("precious\n")
        (out / "status.jsonl").symlink_to(outside)  # would append status lines outside OUT_DIR
        for resume in ((), ("--resume",)):
            run = igd_batch(str(images), str(out), *model_args(fixtures), "-t", "cat", *resume, timeout=300)
            assert run.returncode == 1, run.stderr
            assert "status.jsonl is a symbolic link" in run.stderr and "Traceback" not in run.stderr
            assert outside.read_text() == "precious\n" and (out / "status.jsonl").is_symlink()
            assert not (out / "one.cat.gzip").exists()  # refused before any work
    finally:
        shutil.rmtree(work, ignore_errors=True)


@pytest.mark.slow  # three igd batch runs
def test_a_run_removes_the_temporaries_a_killed_run_left(fixtures: Path) -> None:
    work = short_tempdir()
    try:
        images, out, outside = work / "in", work / "out", work / "outside"
        (images / "sub").mkdir(parents=True)
        shutil.copy(fixtures / "images" / "chelsea.png", images / "sub" / "one.png")
        outside.write_bytes(b"precious")
        command = (str(images), str(out), *model_args(fixtures), "-t", "cat")
        assert igd_batch(*command, timeout=300).returncode == 0
        stale = [out / "sub" / ".one.cat.gzip.k3x_9a0q.part", out / ".status.jsonl.a1b2c3d4.part"]  # igd's own
        kept = [out / "sub" / ".one.cat.gzip.part", out / "sub" / "one.part", out / ".notes.txt.a1b2c3d4.part",
                out / "sub" / ".two.cat.gzip.a1b2c3d4.part"]  # other names, or not this run's results
        for path in stale + kept:
            path.write_bytes(b"partial")
        (out / "sub" / ".one.cat.gzip.linked00.part").symlink_to(outside)  # not followed, not removed
        (out / "sub" / ".one.cat.gzip.folder00.part").mkdir()  # only files are removed
        run = igd_batch(*command, "--resume", timeout=300)
        assert run.returncode == 0, run.stderr
        assert "1 pairs: 0 done now, 1 done before, 0 failed" in run.stdout
        line = next(line for line in run.stderr.splitlines() if "event=stale_temporaries_removed" in line)
        assert "count=2" in line and "level=warning" in line
        assert not any(path.exists() for path in stale) and all(path.exists() for path in kept)
        assert (out / "sub" / ".one.cat.gzip.linked00.part").is_symlink() and outside.read_bytes() == b"precious"
        assert (out / "sub" / ".one.cat.gzip.folder00.part").is_dir()
        again = igd_batch(*command, "--resume", timeout=300)
        assert again.returncode == 0 and "stale_temporaries_removed" not in again.stderr
    finally:
        shutil.rmtree(work, ignore_errors=True)


@pytest.mark.slow  # four igd batch runs
def test_a_second_run_of_the_same_out_dir_or_shard_is_refused_at_once(dataset: Path, fixtures: Path) -> None:
    import fcntl

    out = dataset / "out-locked"
    single = dataset / "single"
    single.mkdir()
    shutil.copy(fixtures / "images" / "chelsea.png", single / "one.png")
    slow = ["-bp", str(fixtures / "bit-tiny.pth"), "--max-batch", "16", "--steps", "1024", "-t", "cat", "-t", "3"]
    first = subprocess.Popen([IGD, "batch", str(dataset / "images"), str(out), *slow, "--shard", "1/2"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    lock = out / ".igd-batch.shard-1-of-2.lock"
    try:
        wait_until(lambda: lock.exists() and lock.read_text().strip() == str(first.pid), 120,
                   f"the first run's pid in {lock.name}", process=first, log=lambda: first.stderr.read().decode())
        os.killpg(first.pid, signal.SIGSTOP)  # it holds its lock stopped as well as running, and leaves the cores
        same = igd_batch(str(dataset / "images"), str(out), *slow, "--shard", "1/2", "--resume", timeout=120)
        assert same.returncode == 1 and f"pid {first.pid}" in same.stderr and "shard 1/2" in same.stderr
        assert len(same.stderr.strip().splitlines()) == 1, same.stderr  # one line, no traceback
        whole = igd_batch(str(dataset / "images"), str(out), *slow, "--resume", timeout=120)
        assert whole.returncode == 1 and f"pid {first.pid}" in whole.stderr, whole.stderr
        other = igd_batch(str(single), str(out), *model_args(fixtures), "-t", "cat", "--shard", "2/2", timeout=300)
        assert other.returncode == 0, other.stderr  # another shard runs beside it
        assert first.poll() is None, "the first run ended before the test could run beside it"
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(60)
    with lock.open("rb") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a killed run holds nothing
