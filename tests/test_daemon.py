"""End to end: a real `igd serve` on a real socket, driven by a client written from
docs/protocol.md alone (tests/wire.py)."""

from __future__ import annotations

import concurrent.futures
import io
import os
import shutil
import signal
import socket
import struct
import subprocess
import time
from pathlib import Path

import msgpack
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import require_tool
from daemon import IGD, SLOW_MODEL_OPTIONS, Igd, NotifyListener, short_tempdir, steps_lasting, wait_until
from igd.output.figure import CAPTION_HEIGHT
from reference import assert_reproduces, assert_same_result, read_result
from test_imaging import encoded, png_declaring
from wire import WireClient

CAT = 3


def rel_l2(actual: np.ndarray, expected: np.ndarray) -> float:
    return float(np.linalg.norm(actual - expected) / np.linalg.norm(expected))


@pytest.fixture(scope="module")
def bit_daemon(fixtures: Path):
    with Igd("-bp", str(fixtures / "bit-tiny.pth"), "--max-batch", "25", "--max-frame-bytes", "4000000") as igd:
        yield igd


@pytest.fixture(scope="module")
def chelsea_png(fixtures: Path) -> bytes:
    return (fixtures / "images" / "chelsea.png").read_bytes()


def test_hello_status_classify(bit_daemon: Igd, chelsea_png: bytes) -> None:
    with WireClient(str(bit_daemon.socket)) as client:
        hello = client.call("hello", {"client": "test", "future_option": 1})
        assert hello["ok"] is True
        result = hello["result"]
        assert result["protocol"] == 1 and result["server"] == "igd"
        assert set(result["capabilities"]["ops"]) == {"hello", "status", "classify", "attribute"}
        assert "gausslegendre" in result["capabilities"]["methods"]
        assert set(result["capabilities"]["baselines"]) == {"zero", "black", "white", "blur", "uniform"}
        assert result["capabilities"]["formats"] == ["torch", "npz"]
        assert result["model"]["classes"][CAT] == "cat"
        assert result["model"]["input_shape"] == [3, 32, 32] and result["model"]["device"] == "cpu"

        top = client.call("classify", {"image": chelsea_png, "top": 3})["result"]["top"]
        assert len(top) == 3 and top[0]["probability"] >= top[1]["probability"]
        assert {"index", "name", "probability"} <= set(top[0])

        status = client.call("status")["result"]
        assert status["device"] == "cpu" and status["uptime_s"] > 0
        assert status["requests"]["served"] >= 1 and status["requests"]["queries"] >= 1 and status["queue_depth"] == 0
        assert status["memory"]["rss_bytes"] > 10_000_000
        assert "batch_sizes" in status["batching"]


def test_polls_are_neither_served_requests_nor_info_lines(bit_daemon: Igd, chelsea_png: bytes) -> None:
    """`igctl status --wait` polls several times a second: hello and status are counted as
    queries and logged at debug level; served counts the work (classify, attribute)."""
    with WireClient(str(bit_daemon.socket)) as client:
        before = client.call("status")["result"]["requests"]
        for _ in range(4):
            assert client.call("hello")["ok"] and client.call("status")["ok"]
        polled = client.call("status")["result"]["requests"]
        assert polled["served"] == before["served"] and polled["queries"] == before["queries"] + 9
        assert client.call("classify", {"image": chelsea_png, "top": 1})["ok"]
        after = client.call("status")["result"]["requests"]
        assert after["served"] == before["served"] + 1 and after["served_by_op"]["classify"] >= 1
    lines = bit_daemon.log().splitlines()
    assert any("event=request" in line and "op=classify" in line for line in lines)
    assert not any("event=request" in line and ("op=status" in line or "op=hello" in line) for line in lines)


@pytest.mark.parametrize("family", ["bit", "lanet"])
def test_attribute_equals_the_fixture_reference(fixtures: Path, chelsea_png: bytes, family: str) -> None:
    reference = np.load(fixtures / f"{family}-tiny.reference.npz")
    with Igd(f"--{family}-path", str(fixtures / f"{family}-tiny.pth"), "--max-batch", "10") as igd:
        with WireClient(str(igd.socket)) as client:
            response = client.call("attribute", {"image": chelsea_png, "target": "cat", "n_steps": 50})
        assert igd.stop() == 0
        log = igd.log()
    assert response["ok"], response
    result = response["result"]
    assert result["format"] == "torch" and result["target"] == {"index": CAT, "name": "cat"}
    loaded = read_result(result["data"])
    assert loaded["target_class"] == CAT
    assert_reproduces({key: value.numpy() for key, value in loaded.items() if isinstance(value, torch.Tensor)}, reference)
    assert rel_l2(loaded["output"].numpy(), reference["logits"]) < 1e-5
    assert result["convergence_delta"] == pytest.approx(loaded["convergence_delta"])
    assert set(result["timing_ms"]) >= {"decode_ms", "queue_ms", "compute_ms", "encode_ms"}
    assert "event=request op=attribute" in log and "outcome=ok" in log and "peer_pid=" in log


def test_npz_format_baselines_and_heatmap(bit_daemon: Igd, chelsea_png: bytes) -> None:
    with WireClient(str(bit_daemon.socket)) as client:
        npz = client.call("attribute", {"image": chelsea_png, "target": 5, "format": "npz", "n_steps": 8})["result"]
        with np.load(io.BytesIO(npz["data"])) as arrays:
            assert arrays["integrated_directional_grads"].shape == (8, 3, 32, 32)
            assert int(arrays["target_class"]) == 5
        black = client.call("attribute", {"image": chelsea_png, "baseline": "black", "n_steps": 8})["result"]
        loaded = read_result(black["data"])
        assert loaded["baseline_name"] == "black" and black["baseline"] == "black"
        torch.testing.assert_close(loaded["baseline"], torch.full((1, 3, 32, 32), -1.0))  # (0 - 0.5) / 0.5
        assert black["target"]["index"] == black["prediction"]["index"]  # nil target: predicted class
        first = client.call("attribute", {"image": chelsea_png, "baseline": "uniform", "seed": 7, "n_steps": 4})
        again = client.call("attribute", {"image": chelsea_png, "baseline": "uniform", "seed": 7, "n_steps": 4})
        assert_same_result(first["result"]["data"], again["result"]["data"])
        blurred = client.call("attribute", {"image": chelsea_png, "baseline": "blur", "blur_sigma": 1.5, "heatmap": True, "n_steps": 4})
        png = Image.open(io.BytesIO(blurred["result"]["heatmap_png"]))
        assert png.format == "PNG" and png.size == (448, 448 + CAPTION_HEIGHT)  # the 32 x 32 input, 14 times


def images_and_targets(chelsea_png: bytes, coffee_png: bytes) -> list[tuple[bytes, object]]:
    base = Image.open(io.BytesIO(chelsea_png)).convert("RGB")
    coffee = Image.open(io.BytesIO(coffee_png)).convert("RGB")
    variants = [
        (base, "cat"), (base.transpose(Image.Transpose.FLIP_LEFT_RIGHT), "dog"),
        (base.crop((50, 0, 350, 300)), 2), (base.rotate(20), None), (coffee, "Ship"),
        (coffee.crop((100, 100, 400, 400)), 9), (base.convert("L").convert("RGB"), "frog"), (coffee.rotate(90), None),
    ]
    return [(encoded(image, "PNG"), target) for image, target in variants]


def test_eight_concurrent_clients_get_their_single_results(bit_daemon: Igd, chelsea_png: bytes, fixtures: Path) -> None:
    jobs = images_and_targets(chelsea_png, (fixtures / "images" / "coffee.png").read_bytes())

    def attribute(job: tuple[bytes, object]) -> dict:
        with WireClient(str(bit_daemon.socket)) as client:
            return client.call("attribute", {"image": job[0], "target": job[1], "n_steps": 40})

    with WireClient(str(bit_daemon.socket)) as client:
        before = client.call("status")["result"]["batching"]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        together = list(pool.map(attribute, jobs))
    with WireClient(str(bit_daemon.socket)) as client:
        after = client.call("status")["result"]["batching"]
    alone = [attribute(job) for job in jobs]
    assert after["batched_passes"] > before["batched_passes"], after
    assert after["largest_batch"] > 1
    batch_sizes = {r["result"]["timing_ms"]["batch_size"] for r in together}
    assert max(batch_sizes) > 1
    for shared, single in zip(together, alone):
        assert shared["ok"] and single["ok"]
        a, b = read_result(shared["result"]["data"]), read_result(single["result"]["data"])
        assert a["target_class"] == b["target_class"]
        for key in ("integrated_grads", "integrated_directional_grads", "output"):
            assert rel_l2(a[key].numpy(), b[key].numpy()) < 1e-5, key


def header(length: int, magic: bytes = b"IG", version: int = 1, kind: int = 0) -> bytes:
    return struct.pack(">2sBBI", magic, version, kind, length)


def body(value: object) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


def still_serving(igd: Igd) -> None:
    with WireClient(str(igd.socket)) as client:
        assert client.call("hello")["ok"] is True


FRAME_ERRORS = [
    ("wrong magic", header(len(body({"id": 1})), magic=b"XX") + body({"id": 1}), "bad_frame"),
    ("wrong version", header(len(body({"id": 1})), version=9) + body({"id": 1}), "unsupported_version"),
    ("wrong kind", header(len(body({"id": 1})), kind=1) + body({"id": 1}), "bad_frame"),
    ("over the limit", header(5_000_000), "frame_too_large"),
]


@pytest.mark.parametrize("name,data,code", FRAME_ERRORS, ids=[e[0] for e in FRAME_ERRORS])
def test_header_violations_are_answered_then_closed(bit_daemon: Igd, name: str, data: bytes, code: str) -> None:
    with WireClient(str(bit_daemon.socket)) as client:
        client.send_raw(data)
        response = client.receive()
        assert response["ok"] is False and response["id"] is None
        assert response["error"]["code"] == code
        assert response["error"]["message"]
        assert client.closed_by_peer()
    still_serving(bit_daemon)


def garbage_png() -> bytes:
    data = bytearray(encoded(Image.new("RGB", (64, 64), (9, 9, 9)), "PNG"))
    return bytes(data[: len(data) // 2])


BODY_ERRORS = [
    ("not msgpack", b"\xc1\xc1\xc1", "bad_frame"),
    ("not a map", body([1, "attribute"]), "bad_frame"),
    ("no id", body({"op": "hello"}), "bad_request"),
    ("no op", body({"id": 5}), "bad_request"),
    ("args not a map", body({"id": 5, "op": "classify", "args": [1]}), "bad_request"),
    ("unknown op", body({"id": 5, "op": "explain"}), "unknown_op"),
    ("missing image", body({"id": 5, "op": "attribute", "args": {}}), "bad_request"),
    ("image as text", body({"id": 5, "op": "attribute", "args": {"image": "cat.jpg"}}), "bad_request"),
    ("n_steps as text", body({"id": 5, "op": "attribute", "args": {"image": b"x", "n_steps": "50"}}), "bad_request"),
    ("bad method", body({"id": 5, "op": "attribute", "args": {"image": b"x", "method": "simpson"}}), "bad_request"),
    ("n_steps 0", body({"id": 5, "op": "attribute", "args": {"image": b"x", "n_steps": 0}}), "bad_request"),
    ("n_steps 100000", body({"id": 5, "op": "attribute", "args": {"image": b"x", "n_steps": 100000}}), "bad_request"),
    ("riemann one step", body({"id": 5, "op": "attribute", "args": {"image": b"x", "n_steps": 1, "method": "riemann_left"}}), "bad_request"),
    ("unknown class", body({"id": 5, "op": "attribute", "args": {"image": b"x", "target": "unicorn"}}), "unknown_target"),
    ("class index 10", body({"id": 5, "op": "attribute", "args": {"image": b"x", "target": 10}}), "unknown_target"),
    ("corrupt image", body({"id": 5, "op": "attribute", "args": {"image": garbage_png()}}), "bad_image"),
    ("text image", body({"id": 5, "op": "classify", "args": {"image": b"hello world"}}), "bad_image"),
    ("too large image", body({"id": 5, "op": "attribute", "args": {"image": png_declaring(100_000, 100_000)}}), "image_too_large"),
]


@pytest.mark.parametrize("name,payload,code", BODY_ERRORS, ids=[e[0] for e in BODY_ERRORS])
def test_bad_requests_get_their_code_and_the_connection_stays(bit_daemon: Igd, name: str, payload: bytes, code: str) -> None:
    with WireClient(str(bit_daemon.socket)) as client:
        client.send_raw(header(len(payload)) + payload)
        response = client.receive()
        assert response["ok"] is False, response
        assert response["error"]["code"] == code, response
        assert "Traceback" not in response["error"]["message"]
        assert response["id"] == (5 if code not in ("bad_frame",) and name != "no id" else None)
        assert client.call("hello")["ok"] is True  # same connection, still usable
    still_serving(bit_daemon)


def test_client_vanishing_mid_frame_and_mid_compute(bit_daemon: Igd, chelsea_png: bytes) -> None:
    with WireClient(str(bit_daemon.socket)) as client:
        payload = body({"id": 1, "op": "attribute", "args": {"image": chelsea_png}})
        client.send_raw(header(len(payload)) + payload[: len(payload) // 2])
    with WireClient(str(bit_daemon.socket)) as client:
        for _ in range(3):  # queue work, then leave while it computes
            client.request("attribute", {"image": chelsea_png, "n_steps": 200})
        time.sleep(0.3)
    still_serving(bit_daemon)
    with WireClient(str(bit_daemon.socket)) as client:
        assert client.call("attribute", {"image": chelsea_png, "n_steps": 4})["ok"] is True
    wait_until(lambda: "disconnected with requests pending" in bit_daemon.log(), 30,
               "the log line of the client gone with requests pending", log=bit_daemon.log, interval=0.2)
    log = bit_daemon.log()
    assert "event=client_gone reason=\"half a frame\"" in log
    assert "disconnected with requests pending" in log


def test_pipelined_requests_on_one_connection(bit_daemon: Igd, chelsea_png: bytes) -> None:
    with WireClient(str(bit_daemon.socket)) as client:
        ids = [client.request("classify", {"image": chelsea_png, "top": 1}) for _ in range(3)]
        ids.append(client.request("hello"))
        responses = [client.receive() for _ in ids]
    assert sorted(r["id"] for r in responses) == sorted(ids)
    assert all(r["ok"] for r in responses)


@pytest.mark.slow  # a daemon of its own, requests sized to last seconds
def test_sigterm_with_requests_in_flight(slow_model: Path, chelsea_png: bytes) -> None:
    igd = Igd("--model", str(slow_model), *SLOW_MODEL_OPTIONS, "--max-images", "1", "--drain-timeout", "2")
    try:
        steps = steps_lasting(igd, chelsea_png, 1.5)
        clients = [WireClient(str(igd.socket)) for _ in range(6)]
        for client in clients:
            client.request("attribute", {"image": chelsea_png, "n_steps": steps, "format": "npz"})
        time.sleep(0.5)
        igd.process.send_signal(signal.SIGTERM)
        codes = []
        for client in clients:
            response = client.receive()
            codes.append("ok" if response["ok"] else response["error"]["code"])
            client.close()
        assert igd.process.wait(60) == 0
        assert set(codes) <= {"ok", "shutting_down"}, codes
        assert "shutting_down" in codes  # 6 requests of 1.5 s each cannot finish in a 2 s drain
        assert not igd.socket.exists()
        igd.notify.wait_for("STOPPING=1", 5)
    finally:
        igd.stop()
        igd.cleanup()


@pytest.mark.slow  # three igd processes one after another
def test_stale_socket_is_replaced_and_a_live_one_is_not(fixtures: Path) -> None:
    directory = short_tempdir()
    path = directory / "igd.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()  # the file stays: a crashed daemon's leftover
    assert path.exists()
    with Igd("-bp", str(fixtures / "bit-tiny.pth"), "--max-batch", "10", env={"IGD_SOCKET": str(path)}) as first:
        first_socket = first.socket
        # The fixture's --socket wins over IGD_SOCKET; start a second daemon on the same path.
        second = subprocess.run(
            [IGD, "serve", "-bp", str(fixtures / "bit-tiny.pth"), "--socket", str(first_socket)],
            capture_output=True, text=True, timeout=120,
        )
        assert second.returncode == 1
        assert f"another igd is already serving on {first_socket}" in second.stderr
        still_serving(first)
    stale_daemon = subprocess.Popen(
        [IGD, "serve", "-bp", str(fixtures / "bit-tiny.pth"), "--max-batch", "10", "--socket", str(path)],
        stderr=subprocess.PIPE, text=True,
    )
    def answers() -> bool:
        try:
            with WireClient(str(path), timeout=120) as client:
                assert client.call("hello")["ok"]
            return True
        except (ConnectionRefusedError, FileNotFoundError):
            return False

    try:
        wait_until(answers, 120, f"an igd answering on {path}", process=stale_daemon, interval=0.2)
    finally:
        stale_daemon.send_signal(signal.SIGTERM)
        assert stale_daemon.wait(60) == 0
    assert "stale_socket_removed" in stale_daemon.stderr.read()
    regular = directory / "not-a-socket"
    regular.write_text("keep me")
    refused = subprocess.run([IGD, "serve", "-bp", str(fixtures / "bit-tiny.pth"), "--socket", str(regular)],
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode == 1 and "exists and is not a socket" in refused.stderr
    assert regular.read_text() == "keep me"
    shutil.rmtree(directory, ignore_errors=True)


def test_standalone_socket_mode_is_0660(bit_daemon: Igd) -> None:
    assert oct(bit_daemon.socket.stat().st_mode & 0o777) == "0o660"


@pytest.mark.slow  # a daemon of its own (tests/test_systemd.py activates one in the fast lane)
def test_socket_activation_and_readiness(fixtures: Path, chelsea_png: bytes) -> None:
    require_tool("systemd-socket-activate")
    directory = short_tempdir()
    path = directory / "activated.sock"
    notify = NotifyListener(directory)
    activator = subprocess.Popen(
        ["systemd-socket-activate", "-l", str(path), f"--setenv=NOTIFY_SOCKET={notify.path}",
         IGD, "serve", "-bp", str(fixtures / "bit-tiny.pth"), "--max-batch", "10",  # no chunk search: not tested here
         "--socket", str(directory / "unused.sock")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    try:
        wait_until(path.exists, 30, "systemd-socket-activate's socket", process=activator)
        client = WireClient(str(path), timeout=180)  # the first connection starts igd
        messages = notify.wait_for("READY=1", 180)
        ready_at = next(i for i, m in enumerate(messages) if "READY=1" in m.splitlines())
        assert any("STATUS=warming up" in m for m in messages[:ready_at])
        assert client.call("attribute", {"image": chelsea_png, "target": "cat", "n_steps": 8})["ok"]
        client.close()
        assert not (directory / "unused.sock").exists()  # it used the passed socket
        activator.send_signal(signal.SIGTERM)
        notify.wait_for("STOPPING=1", 30)
        assert activator.wait(60) == 0
        output = activator.stdout.read().decode()
        warmed = output.index("event=warmed_up")
        assert warmed < output.index("event=ready")
        assert "event=socket_activated" in output
        assert path.exists()  # systemd's socket, not ours to remove
    finally:
        if activator.poll() is None:
            activator.kill()
        notify.close()
        shutil.rmtree(directory, ignore_errors=True)


@pytest.mark.slow  # a daemon of its own, 5 s requests against a 3 s timeout
def test_limits_overloaded_timeout_and_idle(slow_model: Path, chelsea_png: bytes) -> None:
    with Igd("--model", str(slow_model), *SLOW_MODEL_OPTIONS, "--max-images", "1", "--queue-size", "1",
             "--request-timeout", "3", "--idle-timeout", "1") as igd:
        steps = steps_lasting(igd, chelsea_png, 5.0)
        with WireClient(str(igd.socket)) as client:
            ids = [client.request("attribute", {"image": chelsea_png, "n_steps": steps, "format": "npz"})
                   for _ in range(4)]
            codes = {}
            for _ in ids:
                response = client.receive()
                codes[response["id"]] = "ok" if response["ok"] else response["error"]["code"]
        assert "overloaded" in codes.values(), codes  # one computes, one waits, the rest are refused
        assert "timeout" in codes.values(), codes  # a 5 s request against a 3 s timeout
        with WireClient(str(igd.socket)) as idle:
            started = time.monotonic()
            assert idle.closed_by_peer()  # nothing sent: closed after the 1 s idle timeout
            assert time.monotonic() - started < 10
        with WireClient(str(igd.socket)) as dripping:
            dripping.send_raw(b"I")
            time.sleep(0.6)
            dripping.send_raw(b"G")  # a frame that arrives too slowly is cut off too
            assert dripping.closed_by_peer()
        still_serving(igd)


@pytest.mark.slow  # a daemon of its own, a 3 s request
def test_waiting_for_a_slow_answer_is_not_idleness(slow_model: Path, chelsea_png: bytes) -> None:
    with Igd("--model", str(slow_model), *SLOW_MODEL_OPTIONS, "--idle-timeout", "1") as igd:
        steps = steps_lasting(igd, chelsea_png, 3.0)
        with WireClient(str(igd.socket)) as client:
            slow = client.call("attribute", {"image": chelsea_png, "n_steps": steps, "format": "npz"})  # 3 s
            assert slow["ok"], slow
            assert client.call("hello")["ok"]  # the same connection is still open


@pytest.mark.slow  # a daemon of its own, 12 answers of 50 steps
def test_a_client_that_stops_reading_is_dropped(fixtures: Path, chelsea_png: bytes) -> None:
    with Igd("-bp", str(fixtures / "bit-tiny.pth"), "--max-batch", "25", "--idle-timeout", "1") as igd:
        hog = WireClient(str(igd.socket))
        for _ in range(12):  # ~800 KB answers each, never read: the socket buffer fills
            hog.request("attribute", {"image": chelsea_png, "n_steps": 50})
        wait_until(lambda: "event=client_not_reading" in igd.log(), 60, "event=client_not_reading", log=igd.log,
                   interval=0.2)
        assert "event=client_not_reading" in igd.log()
        with WireClient(str(igd.socket)) as client:  # the hog's pending answers are released, not held
            wait_until(lambda: client.call("status")["result"]["requests"]["in_flight"] <= 1, 60,
                       "no request in flight but status", interval=0.2)
            assert client.call("status")["result"]["requests"]["in_flight"] == 1
        hog.close()


@pytest.mark.slow  # a daemon of its own, stopped while it starts
def test_sigterm_during_start_up_exits_cleanly(tmp_path: Path) -> None:
    directory = short_tempdir()
    path = directory / "igd.sock"
    notify = NotifyListener(directory)
    process = subprocess.Popen([IGD, "serve", "--socket", str(path)], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, env={**os.environ, "NOTIFY_SOCKET": str(notify.path)})
    try:
        notify.wait_for("STATUS=loading the model", 60, process)
        process.send_signal(signal.SIGTERM)  # while the built-in model loads or warms up
        assert process.wait(120) == 0
        output = process.stdout.read().decode()
        assert "event=stopped" in output and "Traceback" not in output
        assert not path.exists()
        assert not any("READY=1" in m.splitlines() for m in notify.messages)
    finally:
        if process.poll() is None:
            process.kill()
        notify.close()
        shutil.rmtree(directory, ignore_errors=True)


@pytest.mark.slow  # a daemon of its own
def test_shutdown_with_idle_connections_logs_no_tracebacks(fixtures: Path) -> None:
    igd = Igd("-bp", str(fixtures / "bit-tiny.pth"), "--max-batch", "10")
    try:
        idle = [WireClient(str(igd.socket)) for _ in range(3)]
        assert idle[0].call("hello")["ok"]
        assert igd.stop() == 0
        log = igd.log()
        assert "Traceback" not in log and "Exception in callback" not in log, log
        for client in idle:
            assert client.closed_by_peer()
            client.close()
    finally:
        igd.stop()
        igd.cleanup()


def test_odd_digit_targets_are_unknown_targets(bit_daemon: Igd, chelsea_png: bytes) -> None:
    with WireClient(str(bit_daemon.socket)) as client:
        for target in ("²", "9" * 5000, "-1", 12):
            response = client.call("attribute", {"image": chelsea_png, "target": target, "n_steps": 2})
            assert response["error"]["code"] == "unknown_target", (target, response)
        assert client.call("attribute", {"image": chelsea_png, "target": " 3 ", "n_steps": 2})["result"]["target"]["index"] == 3


def test_progress_events_as_documented(bit_daemon: Igd, chelsea_png: bytes) -> None:
    """docs/protocol.md, "Events": asked for with args.progress, sent as kind-2 frames with
    the request's id before its response: queued, then progress (done of total points)."""
    with WireClient(str(bit_daemon.socket)) as client:
        request_id = client.request("attribute", {"image": chelsea_png, "n_steps": 200, "progress": True})
        events, response = client.receive_with_events()
        assert response["ok"] and response["id"] == request_id
        assert all(event["id"] == request_id for event in events)
        assert events[0]["event"] == "queued" and isinstance(events[0]["ahead"], int)
        progress = [event for event in events if event["event"] == "progress"]
        assert progress[-1]["done"] == progress[-1]["total"] == 200
        assert [event["done"] for event in progress] == sorted(event["done"] for event in progress)
        silent = client.request("attribute", {"image": chelsea_png, "n_steps": 8})  # not asked: no events
        events, response = client.receive_with_events()
        assert events == [] and response["id"] == silent and response["ok"]


def test_a_streamed_result_is_the_same_file(bit_daemon: Igd, chelsea_png: bytes) -> None:
    """docs/protocol.md: with args.stream the file arrives in data events, in order, and
    the response says its size instead of carrying it."""
    with WireClient(str(bit_daemon.socket)) as client:
        whole = client.call("attribute", {"image": chelsea_png, "target": "cat", "n_steps": 200})["result"]
        request_id = client.request("attribute", {"image": chelsea_png, "target": "cat", "n_steps": 200, "stream": True})
        events, response = client.receive_with_events()
    pieces = [event["data"] for event in events if event["event"] == "data"]
    assert all(event["id"] == request_id for event in events) and len(pieces) > 1
    assert response["ok"] and "data" not in response["result"]
    streamed = b"".join(pieces)
    assert response["result"]["data_bytes"] == len(streamed)
    assert_same_result(streamed, whole["data"])
