"""The systemd units: they verify, they install, and igd runs under them as they say.

systemd cannot run as PID 1 here, so activation is played by systemd-socket-activate
with exactly the command line, environment and socket path the units describe.
"""

from __future__ import annotations

import re
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import require_tool
from daemon import IGCTL, IGD, Igd, NotifyListener, short_tempdir, wait_until
from reference import assert_same_result
from wire import WireClient

REPO = Path(__file__).resolve().parents[1]
UNITS = REPO / "systemd"


@pytest.fixture
def root():
    path = short_tempdir()
    yield path
    shutil.rmtree(path, ignore_errors=True)


def installed(root: Path) -> Path:
    out = subprocess.run([IGD, "install-systemd", "--prefix", str(root)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "systemctl enable --now igd.socket" in out.stdout
    return root / "etc/systemd/system"


def unit_settings(text: str, section: str) -> list[tuple[str, str]]:
    """(key, value) pairs of one section of a unit file, in order."""
    current, pairs = None, []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = line.strip("[]")
        elif current == section and "=" in line:
            key, value = line.split("=", 1)
            pairs.append((key, value))
    return pairs


def instance(text: str, name: str) -> str:
    """What systemd makes of a template for instance ``name`` (the %i/%I specifiers)."""
    return text.replace("%i", name).replace("%I", name)


def environment_of(service: str, env_files: dict[str, str]) -> dict[str, str]:
    """Environment= then EnvironmentFile= (later ones win), as systemd composes it."""
    env: dict[str, str] = {}
    pairs = unit_settings(service, "Service")
    for key, value in pairs:
        if key == "Environment":
            for item in shlex.split(value):
                name, _, val = item.partition("=")
                env[name] = val
    for key, value in pairs:
        if key == "EnvironmentFile":
            path = value.lstrip("-")
            for line in env_files.get(path, "").splitlines():
                line = line.strip()
                if line and not line.startswith("#"):
                    name, _, val = line.partition("=")
                    env[name] = val
    return env


def test_units_verify(root: Path) -> None:
    require_tool("systemd-analyze")
    units = installed(root)
    for template in ("igd@.service", "igd@.socket"):  # systemd verifies instances, not templates
        shutil.copy(units / template, units / template.replace("@", "@1"))
    names = ["igd.service", "igd.socket", "igd@1.service", "igd@1.socket"]
    out = subprocess.run(["systemd-analyze", "verify", "--man=no", *[str(units / n) for n in names]],
                         capture_output=True, text=True, timeout=120, cwd=units)
    assert out.returncode == 0, out.stderr
    assert "igd" not in out.stderr, out.stderr  # no warnings about our units


def test_install_writes_runnable_units_and_keeps_settings(root: Path) -> None:
    settings = root / "etc/igd/igd.env"
    settings.parent.mkdir(parents=True)
    settings.write_text("IGD_DEVICE=cpu\n")
    dry = subprocess.run([IGD, "install-systemd", "--prefix", str(root), "--dry-run"], capture_output=True, text=True, timeout=60)
    assert dry.returncode == 0 and "would write" in dry.stdout
    assert not (root / "etc/systemd").exists()
    units = installed(root)
    assert sorted(p.name for p in units.iterdir()) == ["igd.service", "igd.socket", "igd@.service", "igd@.socket"]
    service = (units / "igd.service").read_text()
    (exec_start,) = [v for k, v in unit_settings(service, "Service") if k == "ExecStart"]
    assert exec_start == f"{Path(IGD).absolute()} serve"
    assert settings.read_text() == "IGD_DEVICE=cpu\n"  # kept
    assert (root / "etc/igd/igd.env.example").read_text() == (UNITS / "igd.env").read_text()
    assert (root / "var/lib/igd/models").is_dir()


def test_sysusers_entry_creates_user_and_group(root: Path) -> None:
    require_tool("systemd-sysusers")
    installed(root)
    out = subprocess.run(["systemd-sysusers", f"--root={root}", str(root / "etc/sysusers.d/igd.conf")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    passwd = (root / "etc/passwd").read_text()
    group = (root / "etc/group").read_text()
    assert re.search(r"^igd:x:\d+:\d+:igd daemon:/var/lib/igd:", passwd, re.M)
    assert re.search(r"^igd:x:\d+:", group, re.M) and re.search(r"^video:x:\d+:igd", group, re.M)


def test_hardening_keeps_pytorch_and_gpus_working() -> None:
    settings = dict(unit_settings((UNITS / "igd.service").read_text(), "Service"))
    assert settings["Type"] == "notify" and settings["NotifyAccess"] == "main"
    assert settings["ProtectSystem"] == "strict" and settings["RestrictAddressFamilies"] == "AF_UNIX"
    assert "MemoryDenyWriteExecute" not in settings and "PrivateDevices" not in settings
    allowed = [v for k, v in unit_settings((UNITS / "igd.service").read_text(), "Service") if k == "DeviceAllow"]
    assert "char-nvidia-frontend rw" in allowed and "char-nvidia-uvm rw" in allowed
    socket_unit = dict(unit_settings((UNITS / "igd.socket").read_text(), "Socket"))
    assert socket_unit == {**socket_unit, "SocketMode": "0660", "SocketGroup": "igd", "ListenStream": "/run/igd/igd.sock"}
    stop = int(settings["TimeoutStopSec"].rstrip("s"))
    drain = int(re.search(r"IGD_DRAIN_TIMEOUT=(\d+)", (UNITS / "igd.env").read_text()).group(1))
    assert stop > drain + 30  # the drain, plus a pass in flight


def test_env_example_documents_every_setting() -> None:
    from igd.cli import serve

    documented = set(re.findall(r"#(IGD_[A-Z_]+)=", (UNITS / "igd.env").read_text()))
    offered = {param.envvar for param in serve.params if param.envvar}
    assert len(offered) > 15 and offered == documented


def test_socket_activation_as_the_units_describe(root: Path, fixtures: Path) -> None:
    require_tool("systemd-socket-activate")
    units = installed(root)
    service = (units / "igd.service").read_text()
    env_file = f"IGD_BIT_PATH={fixtures / 'bit-tiny.pth'}\nIGD_MAX_BATCH=10\nIGD_DEVICE=cpu\n"
    env = environment_of(service, {"/etc/igd/igd.env": env_file})
    (exec_start,) = [v for k, v in unit_settings(service, "Service") if k == "ExecStart"]
    path = root / "igd.sock"  # stands in for the socket unit's /run/igd/igd.sock
    notify = NotifyListener(root)
    command = ["systemd-socket-activate", "-l", str(path), f"--setenv=NOTIFY_SOCKET={notify.path}"]
    command += [f"--setenv={k}={v}" for k, v in env.items()]
    activated = subprocess.Popen([*command, *shlex.split(exec_start)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wait_until(path.exists, 60, "systemd-socket-activate's socket", process=activated)
        out = subprocess.run([IGCTL, "attribute", str(fixtures / "images/chelsea.png"), "cat", "-o", str(root / "r.gzip"),
                              "--steps", "8"], capture_output=True, timeout=300, env={"IGD_SOCKET": str(path), "PATH": "/usr/bin:/bin"})
        assert out.returncode == 0, out.stderr
        messages = notify.wait_for("READY=1", 10)
        assert any("STATUS=warming up" in m for m in messages[: next(i for i, m in enumerate(messages) if "READY=1" in m)])
        activated.send_signal(signal.SIGTERM)
        notify.wait_for("STOPPING=1", 30)
        assert activated.wait(60) == 0
        log = activated.stdout.read().decode()
        assert "event=socket_activated" in log and log.index("event=warmed_up") < log.index("event=ready")
    finally:
        if activated.poll() is None:
            activated.kill()
        notify.close()


def test_template_instance_maps_gpu_index_to_device_and_socket(root: Path, fixtures: Path) -> None:
    units = installed(root)
    service = instance((units / "igd@.service").read_text(), "1")
    socket_unit = instance((units / "igd@.socket").read_text(), "1")
    assert dict(unit_settings(socket_unit, "Socket"))["ListenStream"] == "/run/igd/igd-1.sock"
    env = environment_of(service, {"/etc/igd/igd.env": "IGD_DEVICE=cpu\n", "/etc/igd/igd-1.env": "IGD_MAX_STEPS=256\n"})
    assert env["CUDA_VISIBLE_DEVICES"] == "1" and env["IGD_MAX_STEPS"] == "256"
    (exec_start,) = [v for k, v in unit_settings(service, "Service") if k == "ExecStart"]
    argv = shlex.split(exec_start)
    assert argv[1:] == ["serve", "--device", "cuda"]  # the one visible GPU, whatever igd.env says
    requires = dict(unit_settings(service, "Unit"))["Requires"]
    assert requires == "igd@1.socket"
    # What igd makes of it: on a host without that GPU, a clear refusal rather than the CPU.
    run = subprocess.run([*argv, "--socket", str(root / "gpu1.sock")], capture_output=True, text=True, timeout=120,
                         env={**env, "PATH": "/usr/bin:/bin", "IGD_BIT_PATH": str(fixtures / "bit-tiny.pth")})
    if run.returncode == 0 or "CUDA is not available" not in run.stderr:
        pytest.skip("a CUDA device is present; the refusal path is for CPU-only hosts")
    assert run.returncode == 1 and "device 'cuda' asked for, but CUDA is not available" in run.stderr


def test_igctl_through_a_relayed_socket(bit_tiny: Igd, fixtures: Path, root: Path) -> None:
    igd = bit_tiny  # the session's daemon (conftest): the relay is what is tested
    relay_path = root / "forwarded.sock"  # stands in for `ssh -L /tmp/igd.sock:/run/igd/igd.sock`
    relay = subprocess.Popen([sys.executable, str(Path(__file__).with_name("relay.py")), str(relay_path),
                              str(igd.socket)])
    try:
        wait_until(relay_path.exists, 30, "the relay's socket", process=relay)
        out = subprocess.run([IGCTL, "attribute", str(fixtures / "images/chelsea.jpg"), "cat", "-o", "-", "--steps", "6"],
                             capture_output=True, timeout=300, env={"IGD_SOCKET": str(relay_path), "PATH": "/usr/bin:/bin"})
        assert out.returncode == 0, out.stderr
        direct = igd.igctl("attribute", str(fixtures / "images/chelsea.jpg"), "cat", "-o", "-", "--steps", "6")
        assert len(out.stdout) > 100_000
        assert_same_result(out.stdout, direct.stdout)
        with WireClient(str(relay_path)) as client:
            assert client.call("status")["ok"]
    finally:
        relay.terminate()
        relay.wait(10)


def test_readme_uses_the_real_unit_names_and_paths() -> None:
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Running as a service"):]
    section = section[: section.index("\n## ", 5)]
    for unit in set(re.findall(r"\bigd(?:@\d+)?\.(?:service|socket)\b", section)):
        template = re.sub(r"@\d+\.", "@.", unit)
        assert (UNITS / template).exists(), unit
    for path in set(re.findall(r"/run/igd/igd(?:-\d+)?\.sock", section)):
        gpu = re.search(r"igd-(\d+)\.sock", path)
        unit = instance((UNITS / "igd@.socket").read_text(), gpu.group(1)) if gpu else (UNITS / "igd.socket").read_text()
        assert dict(unit_settings(unit, "Socket"))["ListenStream"] == path
    for command in ("igd install-systemd", "systemctl enable --now igd.socket", "journalctl -u igd",
                    "usermod -aG igd", "/etc/igd/igd.env", "ssh -N -L /tmp/igd.sock:/run/igd/igd.sock"):
        assert command in section, command
