"""Hostile input, load and faults against a real daemon: nothing crashes, nothing is
lost, nobody else is hurt, nobody is let in."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import struct
import subprocess
import time
import zlib
from pathlib import Path

import msgpack
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from conftest import record_hardening, require_tool
from daemon import IGD, SLOW_MODEL_OPTIONS, Igd, short_tempdir, steps_lasting, wait_until
from reference import assert_same_result, read_result
from igd import protocol
from igd.protocol import ERROR_CODES, ProtocolError
from test_imaging import encoded, gradient, png_chunk, png_declaring
from wire import WireClient

INTS = st.integers(min_value=-(2**63), max_value=2**64 - 1)  # what msgpack can carry
ARG_VALUES = st.one_of(
    st.none(), st.booleans(), INTS, st.floats(allow_nan=True),
    st.text(max_size=20), st.binary(max_size=64), st.lists(INTS, max_size=3),
    st.dictionaries(st.text(max_size=5), INTS, max_size=3),
)
BODIES = st.one_of(
    st.dictionaries(st.sampled_from(["id", "op", "args", "x"]), ARG_VALUES, max_size=4),
    st.fixed_dictionaries({
        "id": st.integers(min_value=0, max_value=2**31),
        "op": st.sampled_from(["hello", "status", "classify", "attribute", "nope", ""]),
        "args": st.dictionaries(
            st.sampled_from(["image", "target", "n_steps", "method", "baseline", "seed", "blur_sigma", "format",
                             "heatmap", "top", "extra"]),
            ARG_VALUES, max_size=6),
    }),
    ARG_VALUES,
)


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS:"))


def threads(pid: int) -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("Threads:"))


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


# --- the decoder alone ---------------------------------------------------------------


@given(st.binary(min_size=8, max_size=8), st.integers(min_value=0, max_value=2**32 - 1))
def test_any_header_is_accepted_or_a_protocol_error(header: bytes, limit: int) -> None:
    try:
        kind, length = protocol.parse_header(header, limit, (protocol.REQUEST,))
    except ProtocolError as error:
        assert error.code in ERROR_CODES and error.message
    else:
        assert kind == protocol.REQUEST and length <= limit


@given(st.one_of(st.binary(max_size=256), BODIES.map(lambda body: msgpack.packb(body, use_bin_type=True))))
def test_any_body_is_a_map_or_a_protocol_error(payload: bytes) -> None:
    try:
        body = protocol.decode_body(payload)
    except ProtocolError as error:
        assert error.code == "bad_frame"
    else:
        assert isinstance(body, dict) and all(isinstance(key, str) for key in body)


def test_deeply_nested_and_oversized_bodies_are_bad_frames() -> None:
    nested = b"\x91" * 100_000 + b"\x00"  # 100000 nested one-element arrays
    with pytest.raises(ProtocolError, match="bad_frame"):
        protocol.decode_body(nested)
    huge_declared = b"\xdb\xff\xff\xff\xff" + b"x" * 10  # a str claiming 4 GiB in a tiny body
    with pytest.raises(ProtocolError, match="bad_frame"):
        protocol.decode_body(huge_declared)


# --- a live daemon under fire ---------------------------------------------------------


@pytest.fixture(scope="module")
def target(fixtures: Path):
    with Igd("-bp", str(fixtures / "bit-tiny.pth"), "--max-batch", "25", "--max-frame-bytes", "2000000",
             "--idle-timeout", "5") as igd:
        yield igd


def answered_properly(client: WireClient) -> str:
    """The one answer to a hostile request: an error object (or an ok); never silence."""
    response = client.receive()
    assert set(response) >= {"id", "ok"}
    if response["ok"]:
        assert isinstance(response["result"], dict)
        return "ok"
    error = response["error"]
    assert set(error) == {"code", "message", "details"} and error["code"] in ERROR_CODES and error["message"]
    assert isinstance(error["details"], dict) and "Traceback" not in error["message"]
    return error["code"]


GENERATED_CASES = 10_000  # CI runs them all, derandomised: the same cases every run


class Reused:
    """One connection for many generated requests; a new one when igd ends it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.client: WireClient | None = None

    def get(self) -> WireClient:
        if self.client is None:
            self.client = WireClient(str(self.path), timeout=60)
        return self.client

    def drop(self) -> None:
        if self.client is not None:
            self.client.close()
        self.client = None


@pytest.mark.slow  # 10,000 requests (20 s or more alone)
def test_ten_thousand_generated_requests_get_well_formed_answers(target: Igd, chelsea_png: bytes) -> None:
    """Generated request bodies (every argument with every wrong type, extra keys, odd ops)
    through one live daemon; every one gets one well-formed answer, and afterwards a real
    request gets exactly the answer it got before."""
    reference = exact_answer(target, chelsea_png)
    connection = Reused(target.socket)
    codes: dict[str, int] = {}

    @settings(max_examples=GENERATED_CASES, derandomize=True, database=None, deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(body=BODIES)
    def one(body: object) -> None:
        payload = msgpack.packb(body, use_bin_type=True)
        client = connection.get()
        client.send_raw(struct.pack(">2sBBI", b"IG", 1, 0, len(payload)) + payload)
        code = answered_properly(client)
        codes[code] = codes.get(code, 0) + 1

    one()
    connection.drop()
    assert sum(codes.values()) >= GENERATED_CASES
    record_hardening("generated protocol cases", sum(codes.values()))
    assert_same_result(exact_answer(target, chelsea_png), reference)


def exact_answer(igd: Igd, image: bytes) -> bytes:
    with WireClient(str(igd.socket), timeout=120) as client:
        response = client.call("attribute", {"image": image, "target": 3, "n_steps": 8})
    assert response["ok"], response
    return response["result"]["data"]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(min_size=1, max_size=64), cut=st.booleans())
def test_fuzzed_bytes_never_hurt_the_daemon(target: Igd, data: bytes, cut: bool) -> None:
    with WireClient(str(target.socket), timeout=60) as client:
        client.send_raw(data)
        if cut:
            return  # a client that sends garbage and leaves
        client.sock.shutdown(socket.SHUT_WR)
        try:
            answered_properly(client)
        except EOFError:
            pass  # too short to be a header: the daemon just closes
    with WireClient(str(target.socket), timeout=60) as client:
        assert client.call("hello")["ok"]


def test_daemon_memory_stays_bounded_under_fuzzing(target: Igd, chelsea_png: bytes) -> None:
    before = rss(target.process.pid)
    with WireClient(str(target.socket), timeout=60) as client:
        for size in (2_000_001, 10**9, 2**32 - 1):  # declared, never sent: refused from the header
            client.send_raw(struct.pack(">2sBBI", b"IG", 1, 0, size))
            assert client.receive()["error"]["code"] == "frame_too_large"
            client.close()
            client = WireClient(str(target.socket), timeout=60)
        response = client.call("attribute", {"image": chelsea_png, "target": "cat", "n_steps": 8})
        assert response["ok"]
    assert rss(target.process.pid) < before + 200 * 2**20


@pytest.fixture(scope="module")
def chelsea_png(fixtures: Path) -> bytes:
    return (fixtures / "images" / "chelsea.png").read_bytes()


# --- hostile images ---------------------------------------------------------------------


def png_bomb() -> bytes:
    """A 20000 x 20000 PNG whose compressed pixels take about 1.2 MB (1.2 GB inflated).
    1000 rows are deflated once and the part repeated 20 times (it ends in a full flush,
    which forgets the history, so it is valid after itself): within 0.1 % of the size that
    deflating all 20000 rows gives, in an eighth of the time (that took 4 s of every
    collection of this module)."""
    rows = (b"\x00" + b"\x00" * 20000 * 3) * 1000
    part = zlib.compressobj(9, zlib.DEFLATED, -15)  # raw deflate: the zlib header and checksum are added here
    parts = part.compress(rows) + part.flush(zlib.Z_FULL_FLUSH)
    check = 1
    for _ in range(20):
        check = zlib.adler32(rows, check)
    last = zlib.compressobj(9, zlib.DEFLATED, -15).flush()  # the final (empty) block
    pixels = b"\x78\xda" + parts * 20 + last + struct.pack(">I", check)
    header = struct.pack(">IIBBBBB", 20000, 20000, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", pixels) + png_chunk(b"IEND", b"")


def corrupted(data: bytes, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    damaged = bytearray(data)
    for position in rng.integers(len(data) // 4, len(data), size=20):
        damaged[position] ^= 0xFF
    return bytes(damaged)


def huge_exif_jpeg() -> bytes:
    exif = Image.Exif()
    exif[0x010E] = "x" * 60_000  # ImageDescription: a near-maximal APP1 segment
    exif[0x0112] = 3
    return encoded(gradient(64, 48), "JPEG", exif=exif.tobytes())


def animated_gif(frames: int) -> bytes:
    images = [Image.new("P", (16, 16), i % 256) for i in range(frames)]
    return encoded(images[0], "GIF", save_all=True, append_images=images[1:], duration=10)


def cmyk_16bit_palette_alpha() -> list[bytes]:
    palette = Image.new("PA", (8, 8))
    return [
        encoded(Image.new("CMYK", (20, 20), (10, 200, 30, 0)), "JPEG"),
        encoded(Image.fromarray(np.full((20, 20), 40000, dtype=np.uint16)), "PNG"),
        encoded(palette.convert("RGBA").convert("P", palette=Image.Palette.ADAPTIVE), "PNG", transparency=0),
    ]


HOSTILE = {
    "empty": (b"", "bad_image"),
    "text": (b"this is not an image\n" * 40, "bad_image"),
    "svg": (b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>', "bad_image"),
    "pdf": (b"%PDF-1.7\n1 0 obj << >> endobj\n%%EOF", "bad_image"),
    "zip": (b"PK\x03\x04" + b"\x00" * 100, "bad_image"),
    "declared 100000 x 100000": (png_declaring(100_000, 100_000), "image_too_large"),
    "png bomb 20000 x 20000": (png_bomb(), "image_too_large"),
}
for fmt in ("JPEG", "PNG", "WEBP", "GIF"):
    whole = encoded(gradient(300, 200), fmt)
    HOSTILE[f"truncated {fmt}"] = (whole[: len(whole) // 3], "bad_image")
    HOSTILE[f"corrupted {fmt}"] = (corrupted(whole, 1), ("bad_image", "ok"))  # some damage still decodes
VALID = {
    "1 x 1": encoded(Image.new("RGB", (1, 1), (200, 10, 10)), "PNG"),
    "1 x 100000": encoded(Image.new("RGB", (1, 100_000), (10, 200, 10)), "PNG"),
    "100000 x 1": encoded(Image.new("RGB", (100_000, 1), (10, 10, 200)), "PNG"),
    "huge EXIF": huge_exif_jpeg(),
    "animated GIF, 1000 frames": animated_gif(1000),
    **{name: data for name, data in zip(("CMYK", "16-bit", "palette with alpha"), cmyk_16bit_palette_alpha())},
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_images_get_their_code_quickly(target: Igd, name: str) -> None:
    data, expected = HOSTILE[name]
    with WireClient(str(target.socket), timeout=60) as client:
        started = time.monotonic()
        client.send({"id": 1, "op": "attribute", "args": {"image": data, "n_steps": 4}})
        code = answered_properly(client)
        assert time.monotonic() - started < 30
    assert code in (expected if isinstance(expected, tuple) else (expected,)), code


@pytest.fixture(scope="module")
def bit_model(fixtures: Path):
    """The target daemon's model, loaded here once for the module's reference answers."""
    from igd.models import load_model

    return load_model(bit_path=fixtures / "bit-tiny.pth")


@pytest.mark.parametrize("name", list(VALID))
def test_odd_but_valid_images_get_correct_results(target: Igd, name: str, bit_model) -> None:
    from igd.engine.attribution import attribute
    from igd.imaging import decode_image

    with WireClient(str(target.socket), timeout=120) as client:
        started = time.monotonic()
        response = client.call("attribute", {"image": VALID[name], "target": 3, "n_steps": 6})
        assert time.monotonic() - started < 60
    assert response["ok"], response
    served = read_result(response["result"]["data"])
    expected = attribute(bit_model.module, bit_model.preprocess(decode_image(VALID[name])), 3, n_steps=6)
    torch.testing.assert_close(served["integrated_grads"], expected.integrated_grads, rtol=1e-4, atol=1e-6)


def test_extreme_aspect_ratios_on_a_cropping_model() -> None:
    from igd.models import load_model

    model = load_model()  # resize 256 + centre crop 224
    for size in [(1, 100_000), (100_000, 1), (3, 4000)]:
        started = time.monotonic()
        pixels = model.preprocessing.to_pixels(Image.new("RGB", size, (90, 90, 90)))
        assert pixels.shape == (1, 3, 224, 224) and time.monotonic() - started < 5
    from torchvision import transforms

    photo = Image.fromarray(np.asarray(gradient(451, 300)))  # an ordinary photo is never cut: torchvision's pixels
    resize_and_crop = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor()])
    assert torch.equal(model.preprocessing.to_pixels(photo), resize_and_crop(photo).unsqueeze(0))


# --- load -----------------------------------------------------------------------------------


@pytest.mark.slow  # bench/soak.py: a daemon of its own, 16 clients
def test_soak_sixteen_clients_mixed_valid_and_invalid(fixtures: Path, tmp_path: Path) -> None:
    """bench/soak.py, CI-sized: every valid answer equals its single-request answer, every
    invalid request gets its code, and no fd, thread or memory growth."""
    import json
    import sys

    report_path = tmp_path / "soak.json"
    per_client = "8" if os.environ.get("CI") else "12"
    run = subprocess.run([sys.executable, str(Path(__file__).parents[1] / "bench" / "soak.py"),
                          "--bit-path", str(fixtures / "bit-tiny.pth"), "--clients", "16", "--requests", per_client,
                          "--json", str(report_path)], capture_output=True, text=True, timeout=600)
    report = json.loads(report_path.read_text())
    assert run.returncode == 0, report["problems"] or run.stderr
    assert report["requests"] == 16 * int(per_client)
    assert sum(report["answers"].values()) == report["requests"]
    assert {"ok", "bad_image", "unknown_target", "bad_request", "unknown_op"} <= set(report["answers"])


# --- faults ------------------------------------------------------------------------------------


@pytest.mark.slow  # two daemons one after the other
def test_sigkill_then_restart_takes_over(fixtures: Path, chelsea_png: bytes) -> None:
    first = Igd("-bp", str(fixtures / "bit-tiny.pth"), "--max-batch", "10")
    path = first.socket
    try:
        first.process.kill()
        first.process.wait(30)
        assert path.exists()  # a crash leaves the socket file behind
        run = first.igctl("status")
        assert run.returncode == 3 and f"no igd is listening on {path}".encode() in run.stderr
        second = subprocess.Popen([IGD, "serve", "-bp", str(fixtures / "bit-tiny.pth"), "--max-batch", "10",
                                   "--socket", str(path)], stderr=subprocess.PIPE)
        try:
            wait_until(lambda: first.igctl("status").returncode == 0, 120, "the second igd to answer", process=second,
                       interval=0.2)
        finally:
            second.send_signal(signal.SIGTERM)
            assert second.wait(60) == 0
        assert b"stale_socket_removed" in second.stderr.read()
    finally:
        first.stop()
        first.cleanup()


@pytest.mark.slow  # a daemon of its own, requests sized to last seconds
def test_sigterm_with_a_full_queue(slow_model: Path, chelsea_png: bytes) -> None:
    igd = Igd("--model", str(slow_model), *SLOW_MODEL_OPTIONS, "--max-images", "1", "--queue-size", "4",
              "--drain-timeout", "1")
    try:
        steps = steps_lasting(igd, chelsea_png, 1.0)
        with WireClient(str(igd.socket), timeout=120) as client:
            for _ in range(8):
                client.request("attribute", {"image": chelsea_png, "n_steps": steps, "format": "npz"})
            time.sleep(0.5)
            igd.process.send_signal(signal.SIGTERM)
            codes = [answered_properly(client) for _ in range(8)]
        assert igd.process.wait(60) == 0
        assert set(codes) <= {"ok", "overloaded", "shutting_down"} and "shutting_down" in codes
    finally:
        igd.stop()
        igd.cleanup()


def test_igctl_into_a_full_file_system(target: Igd, chelsea_png: bytes) -> None:
    directory = short_tempdir()
    try:
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(directory)], capture_output=True)
        if mounted.returncode != 0:
            pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.decode().strip()}")
        try:
            run = target.igctl("attribute", "-", "cat", "-o", str(directory / "r.gzip"), "--steps", "20", input=chelsea_png)
            assert run.returncode == 1 and b"No space left on device" in run.stderr
            assert os.listdir(directory) == []  # no partial file, no temporary left behind
        finally:
            subprocess.run(["umount", str(directory)], check=True)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


# --- access ----------------------------------------------------------------------------------------


def test_socket_permissions_and_directory(target: Igd) -> None:
    mode = target.socket.stat().st_mode
    assert oct(mode & 0o777) == "0o660"
    assert not target.socket.parent.stat().st_mode & 0o002


@pytest.mark.slow  # an igd process of its own (it refuses after importing torch)
def test_a_directory_others_may_write_is_refused(fixtures: Path) -> None:
    directory = short_tempdir()
    try:
        directory.chmod(0o777)  # world-writable and not sticky: anyone could swap the socket
        run = subprocess.run([IGD, "serve", "-bp", str(fixtures / "bit-tiny.pth"), "--socket", str(directory / "s.sock")],
                             capture_output=True, text=True, timeout=60)
        assert run.returncode == 1 and "is writable by others" in run.stderr
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def as_nobody(socket_path: Path) -> dict:
    """One hello from a process running as user nobody (setpriv), through the real socket."""
    code = (
        "import sys, socket, struct, msgpack\n"
        "s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])\n"
        "b = msgpack.packb({'id': 1, 'op': 'hello', 'args': {}})\n"
        "try:\n    s.sendall(struct.pack('>2sBBI', b'IG', 1, 0, len(b)) + b)\n"
        "except BrokenPipeError:\n    pass  # refused before reading: the answer is still there\n"
        "h = s.recv(8, socket.MSG_WAITALL); n = struct.unpack('>2sBBI', h)[3]\n"
        "print(msgpack.unpackb(s.recv(n, socket.MSG_WAITALL), raw=False))\n"
    )
    import sys

    run = subprocess.run(["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", sys.executable, "-c", code,
                          str(socket_path)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    import ast

    return ast.literal_eval(run.stdout.strip())


@pytest.mark.slow  # two daemons of their own
@pytest.mark.skipif(os.geteuid() != 0, reason="switching to user nobody needs root")
def test_allow_lists_use_the_kernels_peer_credentials(fixtures: Path) -> None:
    require_tool("setpriv")
    for allow, admitted in ((["--allow-uid", "root"], False), (["--allow-group", "nogroup"], True)):
        with Igd("-bp", str(fixtures / "bit-tiny.pth"), "--max-batch", "10", *allow) as igd:
            igd.dir.chmod(0o755)
            igd.socket.chmod(0o666)  # let nobody reach the socket: the allow-list is the gate under test
            answer = as_nobody(igd.socket)
            if admitted:
                assert answer["ok"] is True
            else:
                assert answer["ok"] is False and answer["error"]["code"] == "forbidden"
                assert "uid 65534 may not use this igd" in answer["error"]["message"]
            with WireClient(str(igd.socket)) as root_client:
                assert root_client.call("hello")["ok"]  # root always may


# --- a corpus of hostile and odd inputs -----------------------------------------------------------


def frame(body: object, *, magic: bytes = b"IG", version: int = 1, kind: int = 0) -> bytes:
    payload = msgpack.packb(body, use_bin_type=True)
    return struct.pack(">2sBBI", magic, version, kind, len(payload)) + payload


def attribute_frame(**args: object) -> bytes:
    return frame({"id": 1, "op": "attribute", "args": args})


def _corpus() -> dict[str, tuple[bytes, set[str]]]:
    """name -> (the bytes a client sends, the codes igd may answer). Frames, arguments
    and images; the images of HOSTILE and VALID above included."""
    picture = encoded(gradient(64, 48), "PNG")
    cases: dict[str, tuple[bytes, set[str]]] = {
        "frame: wrong magic": (frame({"id": 1, "op": "hello"}, magic=b"XX"), {"bad_frame"}),
        "frame: version 9": (frame({"id": 1, "op": "hello"}, version=9), {"unsupported_version"}),
        "frame: a response kind": (frame({"id": 1, "op": "hello"}, kind=1), {"bad_frame"}),
        "frame: declares 3 GB": (struct.pack(">2sBBI", b"IG", 1, 0, 3 << 30), {"frame_too_large"}),
        "frame: body not msgpack": (struct.pack(">2sBBI", b"IG", 1, 0, 4) + b"\xc1\xc1\xc1\xc1", {"bad_frame"}),
        "frame: body a list": (frame([1, 2, 3]), {"bad_frame"}),
        "frame: body a number": (frame(7), {"bad_frame"}),
        "frame: 100000 nested arrays": (struct.pack(">2sBBI", b"IG", 1, 0, 100_001) + b"\x91" * 100_000 + b"\x00",
                                        {"bad_frame"}),
        "request: no id": (frame({"op": "hello"}), {"bad_request"}),
        "request: id a string": (frame({"id": "1", "op": "hello"}), {"bad_request"}),
        "request: id a float": (frame({"id": 1.5, "op": "hello"}), {"bad_request"}),
        "request: no op": (frame({"id": 1}), {"bad_request"}),
        "request: op a number": (frame({"id": 1, "op": 4}), {"bad_request"}),
        "request: unknown op": (frame({"id": 1, "op": "shutdown"}), {"unknown_op"}),
        "request: args a list": (frame({"id": 1, "op": "attribute", "args": [1]}), {"bad_request"}),
        "image: missing": (attribute_frame(n_steps=4), {"bad_request"}),
        "image: a string": (attribute_frame(image="cat.jpg"), {"bad_request"}),
        "image: a number": (attribute_frame(image=5), {"bad_request"}),
        "classify: top 0": (frame({"id": 1, "op": "classify", "args": {"image": picture, "top": 0}}), {"bad_request"}),
        "classify: top 5000": (frame({"id": 1, "op": "classify", "args": {"image": picture, "top": 5000}}),
                               {"bad_request"}),
        "classify: top a string": (frame({"id": 1, "op": "classify", "args": {"image": picture, "top": "3"}}),
                                   {"bad_request"}),
    }
    wrong_args = {
        "n_steps a string": {"n_steps": "5"}, "n_steps a float": {"n_steps": 1.5}, "n_steps true": {"n_steps": True},
        "n_steps -1": {"n_steps": -1}, "n_steps 0": {"n_steps": 0}, "n_steps 2^64-1": {"n_steps": 2**64 - 1},
        "n_steps over the limit": {"n_steps": 2000}, "riemann with 1 step": {"method": "riemann_left", "n_steps": 1},
        "method a number": {"method": 5}, "method empty": {"method": ""}, "method in capitals": {"method": "GAUSSLEGENDRE"},
        "baseline grey": {"baseline": "grey"}, "baseline a number": {"baseline": 7},
        "format NPZ": {"format": "NPZ"}, "format png": {"format": "png"},
        "gzip_level -1": {"gzip_level": -1}, "gzip_level 10": {"gzip_level": 10}, "gzip_level a string": {"gzip_level": "1"},
        "blur_sigma a string": {"blur_sigma": "x"}, "blur_sigma infinite": {"blur_sigma": float("inf")},
        "blur_sigma NaN": {"blur_sigma": float("nan")}, "blur_sigma negative": {"blur_sigma": -1.0},
        "seed 2^64": {"seed": 2**64 - 1}, "seed a string": {"seed": "1"},
        "heatmap a string": {"heatmap": "yes"}, "progress a number": {"progress": 1}, "stream a string": {"stream": "on"},
        "target a list": {"target": []}, "target a map": {"target": {}}, "target a float": {"target": 1.5},
        "target true": {"target": True},
    }
    for name, args in wrong_args.items():
        cases[f"argument: {name}"] = (attribute_frame(image=picture, **{"n_steps": 4, **args}), {"bad_request"})
    for name, target in {"-1": -1, "10": 10, "5000 nines": "9" * 5000, "unicorn": "unicorn", "²": "²"}.items():
        cases[f"target: {name}"] = (attribute_frame(image=picture, n_steps=4, target=target), {"unknown_target"})
    for name, (data, expected) in HOSTILE.items():
        cases[f"image: {name}"] = (attribute_frame(image=data, n_steps=4), set(expected) if isinstance(expected, tuple)
                                   else {expected})
    for name, data in VALID.items():
        cases[f"odd image: {name}"] = (attribute_frame(image=data, n_steps=4, target=3), {"ok"})
    for name, sigma in {"1e-300": 1e-300, "smallest float": 5e-324}.items():
        cases[f"blur sigma {name}"] = (attribute_frame(image=picture, n_steps=4, baseline="blur", blur_sigma=sigma),
                                       {"ok"})
    return cases


CORPUS = _corpus()


def test_the_corpus_is_large() -> None:
    assert len(CORPUS) >= 50


@pytest.mark.parametrize("name", list(CORPUS))
def test_each_hostile_or_odd_input_gets_its_code_and_harms_nothing(target: Igd, chelsea_png: bytes, name: str,
                                                                   reference: bytes) -> None:
    data, expected = CORPUS[name]
    with WireClient(str(target.socket), timeout=120) as client:
        client.send_raw(data)
        code = answered_properly(client)
    assert code in expected, (name, code)
    assert_same_result(exact_answer(target, chelsea_png), reference)  # the next request is served exactly
    record_hardening("hostile or odd inputs (frames, arguments, images)", 1)


@pytest.fixture(scope="module")
def reference(target: Igd, chelsea_png: bytes) -> bytes:
    return exact_answer(target, chelsea_png)
