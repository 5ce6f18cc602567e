"""`igd install-systemd`: put the unit files, sysusers entry and settings example in place.

The units ship inside the package (``igd/data/systemd``); their ``ExecStart`` names
``/usr/local/bin/igd``, which is replaced by the path of the igd actually installed.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

UNITS = ("igd.socket", "igd.service", "igd@.socket", "igd@.service")
PLACEHOLDER = "/usr/local/bin/igd"
HIDDEN_BY_PROTECT_HOME = ("/home/", "/root/", "/run/user/")

NEXT_STEPS = """\
Next, as root:
  systemd-sysusers                        # creates the igd user and group
  systemctl daemon-reload
  systemctl enable --now igd.socket       # igd starts on the first request
  usermod -aG igd USER                    # lets USER use /run/igd/igd.sock (log in again)
One daemon per GPU instead of one for the whole host:
  systemctl enable --now igd@0.socket igd@1.socket   # /run/igd/igd-0.sock, /run/igd/igd-1.sock
Settings: /etc/igd/igd.env (all of them, commented); models go in /var/lib/igd/models.
Check: igctl status    Logs: journalctl -u igd"""


@dataclass(frozen=True)
class Placement:
    path: Path
    content: bytes | None  # None: a directory
    mode: int
    keep_existing: bool = False


def plan(prefix: Path, igd_executable: Path) -> list[Placement]:
    """Every file and directory install-systemd creates under ``prefix``."""
    source = resources.files("igd").joinpath("data", "systemd")
    units = prefix / "etc/systemd/system"
    placements = [
        Placement(units / name, _unit(source.joinpath(name).read_text(), igd_executable), 0o644)
        for name in UNITS
    ]
    env_example = source.joinpath("igd.env").read_bytes()
    placements += [
        Placement(prefix / "etc/sysusers.d/igd.conf", source.joinpath("igd.sysusers").read_bytes(), 0o644),
        Placement(prefix / "etc/igd/igd.env", env_example, 0o644, keep_existing=True),
        Placement(prefix / "etc/igd/igd.env.example", env_example, 0o644),
        Placement(prefix / "var/lib/igd/models", None, 0o755),
    ]
    return placements


def install(placements: list[Placement], dry_run: bool) -> list[str]:
    """Apply the plan (unless ``dry_run``); one line per placement saying what happened."""
    report = []
    for item in placements:
        if item.content is None:
            action = "exists" if item.path.is_dir() else "create directory"
            if not dry_run:
                item.path.mkdir(mode=item.mode, parents=True, exist_ok=True)
        elif item.keep_existing and item.path.exists():
            action = "keep (exists)"
        else:
            action = "replace" if item.path.exists() else "write"
            if not dry_run:
                item.path.parent.mkdir(parents=True, exist_ok=True)
                item.path.write_bytes(item.content)
                item.path.chmod(item.mode)
        report.append(f"{'would ' if dry_run else ''}{action:<16} {item.path}")
    return report


def warnings_for(igd_executable: Path) -> list[str]:
    text = str(igd_executable)
    if any(text.startswith(hidden) for hidden in HIDDEN_BY_PROTECT_HOME):
        return [
            f"warning: {igd_executable} is under a home directory, which the service cannot see "
            "(ProtectHome=yes); install igd system-wide, e.g. python3 -m venv /opt/igd && "
            "/opt/igd/bin/pip install igd, then run /opt/igd/bin/igd install-systemd"
        ]
    return []


def _unit(text: str, igd_executable: Path) -> bytes:
    """The unit with its ExecStart pointing at ``igd_executable`` (sockets have none)."""
    return text.replace(PLACEHOLDER, str(igd_executable)).encode()
