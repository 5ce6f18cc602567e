"""A daemon bounded whatever its clients do, stopping cleanly however it is stopped, and
giving the same answer across restarts: each test against a real `igd serve`."""

from __future__ import annotations

import concurrent.futures
import io
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import msgpack
import numpy as np
import pytest
import torch
from PIL import Image

from daemon import IGCTL, SLOW_MODEL_OPTIONS, Igd, short_tempdir, steps_lasting, wait_until
from reference import assert_same_result, read_result
from wire import WireClient

BUDGET_MIB = 64
# What a daemon holds beyond its budget and its idle self: socket buffers, Python's and
# the allocator's slack, one pass's activations. Measured here: under 40 MiB.
SLACK_MIB = 96


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS:"))


def held_by_requests(igd: Igd) -> int:
    """What requests hold of the memory budget now (the ledger less the compute worker's share)."""
    memory = json.loads(igd.igctl("status", "--json").stdout)["memory"]
    return memory["accounted_bytes"] - memory["compute_working_set_bytes"]


def hello_frame(request_id: int) -> bytes:
    body = msgpack.packb({"id": request_id, "op": "hello"})
    return struct.pack(">2sBBI", b"IG", 1, 0, len(body)) + body


def timed_attribute(igd: Igd, image: bytes) -> float:
    with WireClient(str(igd.socket), timeout=300) as client:
        started = time.perf_counter()
        assert client.call("attribute", {"image": image, "target": "cat", "n_steps": 8})["ok"]
        return time.perf_counter() - started


@pytest.fixture(scope="module")
def chelsea_png(fixtures: Path) -> bytes:
    return (fixtures / "images" / "chelsea.png").read_bytes()


@pytest.mark.slow  # a daemon of its own, 5 s of blocked sends
def test_pipelined_hellos_that_are_never_read_stay_within_the_budget(fixtures: Path, chelsea_png: bytes) -> None:
    with Igd("-bp", str(fixtures / "bit-tiny.pth"), "--max-batch", "16", "--memory-budget", f"{BUDGET_MIB}M") as igd:
        normal = min(timed_attribute(igd, chelsea_png) for _ in range(3))
        idle = rss(igd.process.pid)
        frames = b"".join(hello_frame(i) for i in range(25_000))  # 550 KB of requests per client

        def hog_blocks(_: int) -> socket.socket:
            hog = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            hog.connect(str(igd.socket))
            hog.settimeout(5.0)
            try:
                hog.sendall(frames)  # igd stops reading after 16 unanswered: this blocks
                sent_all = True
            except TimeoutError:
                sent_all = False
            assert not sent_all, "igd read 25,000 requests from a client that reads no answers"
            return hog

        with concurrent.futures.ThreadPoolExecutor(4) as pool:  # the 4 hogs' 5 s waits at once, not one after another
            hogs = list(pool.map(hog_blocks, range(4)))
        grown = rss(igd.process.pid) - idle
        assert grown < (BUDGET_MIB + SLACK_MIB) * 2**20, f"RSS grew by {grown / 2**20:.0f} MiB"
        status = json.loads(igd.igctl("status", "--json").stdout)
        assert status["memory"]["limit_bytes"] == BUDGET_MIB * 2**20
        assert status["requests"]["in_flight"] <= 4 * 16 + 1  # the per-connection cap, and this status
        after = timed_attribute(igd, chelsea_png)
        assert after < 5 * normal + 2.0, (normal, after)  # answered in normal time
        for hog in hogs:
            hog.close()
        assert timed_attribute(igd, chelsea_png) < 5 * normal + 2.0


@pytest.mark.slow  # a daemon of its own, 1024-step answers
def test_clients_that_never_read_large_answers_cannot_pass_the_budget(fixtures: Path, chelsea_png: bytes) -> None:
    # bit-tiny at 1024 steps: each answer is about 25 MB raw (51 MiB reserved with its path points), and a
    # pass of 16 points holds about 25 MiB for good, so a 90 MiB budget holds one request in the making
    # (25 + 51), but not a second beside an answer nobody reads (25 + 25 + 51): margins of 12 MiB either way.
    budget_mib = 90
    with Igd("-bp", str(fixtures / "bit-tiny.pth"), "--max-batch", "16", "--memory-budget", f"{budget_mib}M",
             "--idle-timeout", "60") as igd:
        idle = rss(igd.process.pid)
        hogs = [WireClient(str(igd.socket), timeout=300) for _ in range(3)]
        for hog in hogs:
            for _ in range(4):
                hog.request("attribute", {"image": chelsea_png, "n_steps": 1024, "gzip_level": 0})
        time.sleep(3.0)
        grown = rss(igd.process.pid) - idle
        assert grown < (budget_mib + SLACK_MIB) * 2**20, f"RSS grew by {grown / 2**20:.0f} MiB"
        with WireClient(str(igd.socket), timeout=60) as client:
            started = time.monotonic()
            refused = client.call("attribute", {"image": chelsea_png, "n_steps": 1024})
            assert time.monotonic() - started < 5  # at once, not after the hogs
            assert refused["error"]["code"] == "overloaded"
            assert refused["error"]["details"]["memory_budget_bytes"] == budget_mib * 2**20
            assert "memory budget" in refused["error"]["message"]
            assert client.call("hello")["ok"]  # small requests still get through
        for hog in hogs:
            hog.close()
        wait_until(lambda: held_by_requests(igd) <= 2**20, 60, "the budget held by requests to be freed",  # status's own
                   interval=0.2)
        with WireClient(str(igd.socket), timeout=300) as client:  # the budget is free again
            assert client.call("attribute", {"image": chelsea_png, "n_steps": 1024})["ok"]


def smooth_jpeg(width: int, height: int) -> bytes:
    """A photo-like JPEG of ``width`` x ``height`` (gradients: a few hundred KB at most)."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    pixels = np.stack([x * 255 / width, y * 255 / height, (x / width + y / height) * 127], axis=2).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "JPEG", quality=80)
    return out.getvalue()


def peak_rss(pid: int) -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))


@pytest.mark.slow  # a daemon of its own, 49 Mpx images, 1024 steps (30 s or more alone)
def test_every_kind_of_request_stays_within_the_budget(fixtures: Path, chelsea_png: bytes, tmp_path: Path) -> None:
    """The kinds of request that used to escape the budget (faithfulness images, IDGI, decoding, heatmaps),
    4 pipelined on each of 4 connections: the daemon's peak resident memory stays within the budget plus
    25 %; what could never fit is refused at once with request_too_large."""
    budget_mib = 256
    kinds = {
        "1024 steps, 2 targets, metrics, IDGI": {"image": chelsea_png, "n_steps": 1024, "top_k": 2, "idgi": True,
                                                 "metrics": ["insertion", "deletion"], "gzip_level": 0},
        "9 Mpx image": {"image": smooth_jpeg(3000, 3000), "n_steps": 8},
        "3 Mpx image, 3 heatmap panels": {"image": smooth_jpeg(2000, 1500), "n_steps": 8, "top_k": 3,
                                          "heatmap": True},
        # decoding 187 MiB and 1024 steps of 4 targets (120 MiB): more than the budget leaves beside one pass
        "49 Mpx image, 4 targets, 1024 steps, heatmap": {"image": smooth_jpeg(7000, 7000), "n_steps": 1024,
                                                         "top_k": 4, "heatmap": True},
    }
    names = list(kinds)
    with Igd("-bp", str(fixtures / "bit-tiny.pth"), "--max-batch", "16", "--memory-budget", f"{budget_mib}M") as igd:
        pid = igd.process.pid
        idle = rss(pid)
        with open(f"/proc/{pid}/clear_refs", "w", encoding="ascii") as clear:
            clear.write("5")  # the peak from here on, not start-up's
        answers: dict[str, list[dict]] = {name: [] for name in names}
        overloaded = dict.fromkeys(names, 0)

        def connection(first: int) -> None:
            with WireClient(str(igd.socket), timeout=600) as client:
                sent = {client.request("attribute", kinds[names[(first + i) % len(names)]]):
                        names[(first + i) % len(names)] for i in range(len(names))}
                while sent:  # answered as they are done, not in order; what does not fit now is asked again
                    answer = client.receive()
                    name = sent.pop(answer["id"])
                    if not answer["ok"] and answer["error"]["code"] == "overloaded":
                        overloaded[name] += 1
                        time.sleep(0.2)
                        sent[client.request("attribute", kinds[name])] = name
                    else:
                        answers[name].append(answer)

        threads = [threading.Thread(target=connection, args=(i,)) for i in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(600)
        grown = peak_rss(pid) - idle
        codes = {name: sorted(a["error"]["code"] if not a["ok"] else "ok" for a in answers[name]) for name in names}
        assert grown <= budget_mib * 1.25 * 2**20, f"peak RSS {grown / 2**20:.0f} MiB above idle; {codes}"
        never = "49 Mpx image, 4 targets, 1024 steps, heatmap"
        assert codes[never] == ["request_too_large"] * 4, codes
        refused = answers[never][0]["error"]
        assert "memory budget" in refused["message"] and "image" in refused["details"]["needed_by_part"]
        assert refused["details"]["needed_bytes"] > refused["details"]["available_bytes"]
        for name in names[:3]:
            assert codes[name] == ["ok"] * 4, codes
        assert sum(overloaded.values()) > 0, "the budget never made a request wait: the test tests nothing"

        huge = tmp_path / "huge.jpg"
        huge.write_bytes(kinds[never]["image"])
        refused_by_igctl = igd.igctl("attribute", str(huge), "--steps", "1024", "--top-k", "4", "--heatmap",
                                     str(tmp_path / "out.png"), "-o", str(tmp_path / "out.gzip"))
        assert refused_by_igctl.returncode == 1, refused_by_igctl.stderr
        assert b"request_too_large" in refused_by_igctl.stderr and b"Traceback" not in refused_by_igctl.stderr


@pytest.mark.slow  # a daemon of its own, requests sized to last seconds
def test_sigterm_during_a_long_pass_exits_0(slow_model: Path, chelsea_png: bytes) -> None:
    igd = Igd("--model", str(slow_model), *SLOW_MODEL_OPTIONS, "--drain-timeout", "1")
    try:
        steps = steps_lasting(igd, chelsea_png, 20.0)
        with WireClient(str(igd.socket), timeout=120) as client:
            client.request("attribute", {"image": chelsea_png, "n_steps": steps, "format": "npz", "progress": True})
            while True:  # until the pass is under way
                kind, event = client.receive_frame()
                assert kind == 2, event
                if event["event"] == "progress" and event["done"] > 0:
                    break
            started = time.monotonic()
            igd.process.send_signal(signal.SIGTERM)
            response = client.receive()
            assert igd.process.wait(60) == 0
            # the drain (1 s), one chunk and leaving, well before the 20 s pass would end (a loaded machine's chunk is slow)
            assert time.monotonic() - started < 12
        assert response["error"]["code"] == "shutting_down"
        message = response["error"]["message"]  # the daemon cancelled it, not its client
        assert message.startswith("the daemon is shutting down: the pass was cancelled after ") and "client" not in message
        assert not igd.socket.exists()
        log = igd.log()
        assert "the pass in progress stops at its next chunk" in log and "event=pass_cancelled" in log
        assert "terminate called" not in log and "Traceback" not in log
    finally:
        igd.stop()
        igd.cleanup()


@pytest.mark.slow  # a daemon of its own
def test_sighup_is_logged_and_ignored(fixtures: Path, chelsea_png: bytes) -> None:
    igd = Igd("-bp", str(fixtures / "bit-tiny.pth"), "--max-batch", "16")
    try:
        igd.process.send_signal(signal.SIGHUP)
        wait_until(lambda: "event=sighup_ignored" in igd.log(), 10, "event=sighup_ignored", process=igd.process)
        assert timed_attribute(igd, chelsea_png) > 0  # still serving
        assert igd.stop() == 0 and not igd.socket.exists()
    finally:
        igd.stop()
        igd.cleanup()


def ignores(pid: int, signum: int) -> bool:
    """Whether the process ignores ``signum`` (its SigIgn mask in /proc)."""
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        mask = next(int(line.split()[1], 16) for line in status if line.startswith("SigIgn:"))
    return bool(mask >> (signum - 1) & 1)


@pytest.mark.slow  # a daemon of its own, watched through start-up
def test_sighup_during_start_up_is_ignored(fixtures: Path, chelsea_png: bytes) -> None:
    # Before the fix, a hang-up while igd imported torch (its first seconds) ended it with 129.
    igd = Igd("-bp", str(fixtures / "bit-tiny.pth"), "--max-batch", "16", wait_ready=False)
    try:
        wait_until(lambda: ignores(igd.process.pid, signal.SIGHUP), 60, "igd to ignore SIGHUP", process=igd.process,
                   log=igd.log, interval=0.005)
        igd.process.send_signal(signal.SIGHUP)
        assert "event=model_loaded" not in igd.log()  # the hang-up came during start-up
        igd.notify.wait_for("READY=1", 180, igd.process)
        assert timed_attribute(igd, chelsea_png) > 0
        assert igd.stop() == 0
    finally:
        igd.stop()
        igd.cleanup()


def test_a_huge_target_or_option_is_not_echoed_back(bit_tiny: Igd, chelsea_png: bytes) -> None:
    megabyte = "x" * 2**20
    igd = bit_tiny  # the session's (conftest): its log holds other tests' lines too, so what this one added counts
    logged_before = len(igd.log())
    with WireClient(str(igd.socket), timeout=60) as client:
        for args, code in (({"target": megabyte}, "unknown_target"), ({"target": [megabyte]}, "unknown_target"),
                           ({"method": megabyte}, "bad_request"), ({"baseline": megabyte}, "bad_request")):
            answer = client.call("attribute", {"image": chelsea_png, "n_steps": 4, **args})
            assert answer["error"]["code"] == code
            assert len(answer["error"]["message"]) < 1000, answer["error"]["message"][:200]
            assert "1,048,576 characters" in answer["error"]["message"]
        answer = client.call(megabyte)
        assert answer["error"]["code"] == "unknown_op" and len(answer["error"]["message"]) < 1000
        assert client.call("hello")["ok"]
    assert len(igd.log()) - logged_before < 100_000


def test_a_vanishing_blur_never_answers_nan(bit_tiny: Igd, fixtures: Path, chelsea_png: bytes) -> None:
    igd = bit_tiny  # the session's (conftest)
    with WireClient(str(igd.socket)) as client:
        for sigma in (1e-300, 5e-324, 1e-3):
            response = client.call("attribute", {"image": chelsea_png, "n_steps": 4, "baseline": "blur",
                                                 "blur_sigma": sigma})
            assert response["ok"], response
            result = read_result(response["result"]["data"])
            assert torch.isfinite(result["integrated_grads"]).all() and result["convergence_delta"] == 0.0
    run = igd.igctl("attribute", str(fixtures / "images" / "chelsea.png"), "cat",
                    "--baseline", "blur", "--blur-sigma", "1e-300", "--steps", "4", "-o", "-")
    assert run.returncode == 0 and b"nan" not in run.stderr.lower()


@pytest.mark.slow  # a daemon of its own, stopped for 2 s
def test_a_full_backlog_makes_igctl_wait(fixtures: Path) -> None:
    igd = Igd("-bp", str(fixtures / "bit-tiny.pth"), "--max-batch", "16")
    waiting: subprocess.Popen | None = None
    queued: list[socket.socket] = []
    try:
        igd.process.send_signal(signal.SIGSTOP)  # busy: it accepts nothing
        while True:  # fill its listen queue
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.setblocking(False)
            try:
                sock.connect(str(igd.socket))
            except BlockingIOError:
                sock.close()
                break
            queued.append(sock)
        assert len(queued) >= 100  # the backlog igd asked for (128), not asyncio's 100 minus some
        waiting = subprocess.Popen([IGCTL, "--socket", str(igd.socket), "status"], stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE)
        time.sleep(2.0)
        assert waiting.poll() is None, waiting.stderr.read()  # waiting, not "no daemon" (exit 3)
        igd.process.send_signal(signal.SIGCONT)
        for sock in queued:
            sock.close()
        assert waiting.wait(60) == 0, waiting.stderr.read()
        assert b"state      ready" in waiting.stdout.read()
    finally:
        igd.process.send_signal(signal.SIGCONT)
        if waiting is not None and waiting.poll() is None:
            waiting.kill()
        igd.stop()
        igd.cleanup()


def _saturate(seconds: float) -> list[subprocess.Popen]:
    """Busy processes on every core, for ``seconds``, at the lowest priority: alone they keep
    the CPU busy; in the full suite, whose other workers already do, they take only what is
    left and slow nobody else's test."""
    spin = f"import os, time\nos.nice(19)\nend = time.time() + {seconds}\nwhile time.time() < end: pass\n"
    return [subprocess.Popen([sys.executable, "-c", spin]) for _ in range(os.cpu_count() or 2)]


@pytest.mark.slow  # two daemons with the chunk search, one on a saturated CPU (30 s or more)
def test_restarts_choose_the_same_chunk_and_give_the_same_bytes(fixtures: Path, chelsea_png: bytes) -> None:
    cache = short_tempdir()
    try:
        environment = {"IGD_CACHE_DIR": str(cache)}
        answers, chunks = [], []
        for busy in (False, True):
            spinners = _saturate(120) if busy else []
            try:
                with Igd("-lp", str(fixtures / "lanet-tiny.pth"), env=environment) as igd:  # --max-batch auto
                    status = json.loads(igd.igctl("status", "--json").stdout)
                    chunks.append((status["batching"]["max_batch_points"], status["batching"]["chunk_source"]))
                    with WireClient(str(igd.socket), timeout=300) as client:
                        answers.append(client.call("attribute", {"image": chelsea_png, "target": 3,
                                                                 "n_steps": 50})["result"]["data"])
            finally:
                for spinner in spinners:
                    spinner.kill()
        (first, source), (second, again) = chunks
        assert (source, again) == ("measured", "cached") and first == second >= 2
        results = [read_result(answer) for answer in answers]
        assert [result.pop("chunk_source") for result in results] == ["measured", "cached"]  # recorded as it was
        assert_same_result(*results)  # otherwise the same result, to the bit
        assert results[0]["max_batch"] == first  # recorded with the result
    finally:
        shutil.rmtree(cache, ignore_errors=True)
