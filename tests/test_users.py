"""Other users on the same machine: nobody can pose as igd, and --allow-group means groups.

Real local users and a group (useradd/groupadd, random names, removed afterwards even when
a test fails), real `igd serve` processes and the real igctl console script run as them
(setpriv). Roles: a victim (the user of igd), mallory (who squats /tmp/igd-VICTIMUID with a
relay that records every byte it gets), a member of the allowed group (supplementary only),
a stranger (in no allowed group) and a stand-in for igd's service user.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

from conftest import _MISSING_TOOLS, require_tool
from daemon import IGCTL, IGD, Igd, short_tempdir, wait_until
from wire import WireClient

from igctl import client as igctl_client
from igctl.client import EXIT_NO_DAEMON, EXIT_UNTRUSTED, UntrustedSocket
from igd import protocol

FIXTURES = Path(__file__).parent / "fixtures"  # readable by everyone, unlike pytest's tmp_path
LANET = FIXTURES / "lanet-tiny.pth"
IMAGE = FIXTURES / "images" / "chelsea.png"
SERVE = ("serve", "-lp", str(LANET), "--max-batch", "10")  # fixed chunk: no search, no cache


def _cannot(message: str, fail_under_ci: bool = True) -> None:
    """Loudly: listed in red at the end of the run (conftest); a failure under CI (where
    .ci/run installs the tools) unless ``fail_under_ci`` is False."""
    if fail_under_ci and os.environ.get("CI"):
        pytest.fail(message)
    test = os.environ.get("PYTEST_CURRENT_TEST", "?").split(" ")[0]
    _MISSING_TOOLS.setdefault(message, []).append(test)
    pytest.skip(message)


def _need(tool: str, package: str) -> None:
    if shutil.which(tool) is None:
        _cannot(f"{tool} is not installed (Debian: apt-get install {package}); tests/test_users.py cannot run")


# --- users and processes run as them ----------------------------------------------------------


@dataclass
class User:
    name: str
    uid: int
    gid: int  # primary group (the user's own, from useradd -U)
    home: Path  # a private work directory (no real home: useradd -M)


class People:
    """The users and the group of this module, and how to run things as them."""

    def __init__(self) -> None:
        self.suffix = secrets.token_hex(3)
        self.users: dict[str, User] = {}
        self.group = f"igdt-g-{self.suffix}"
        self.gid = -1
        self.shared = short_tempdir()  # root's, 0755: the relay script and the logs of started processes
        self.shared.chmod(0o755)
        self.caps: list[str] = []
        self.processes: list[subprocess.Popen] = []

    def create(self) -> None:
        subprocess.run(["groupadd", self.group], check=True, capture_output=True)
        self.gid = int(_getent("group", self.group)[2])
        for role in ("victim", "mallory", "member", "stranger", "service"):
            name = f"igdt-{role[:4]}-{self.suffix}"
            extra = ["-G", self.group] if role == "member" else []
            subprocess.run(["useradd", "-M", "-U", "-s", "/usr/sbin/nologin", *extra, name],
                           check=True, capture_output=True)
            entry = _getent("passwd", name)
            home = Path(tempfile.mkdtemp(prefix=f"igdt-{role}-", dir="/tmp"))
            os.chown(home, int(entry[2]), int(entry[3]))
            self.users[role] = User(name, int(entry[2]), int(entry[3]), home)
        for user in self.users.values():  # left over from a crashed run that had the same uid
            shutil.rmtree(f"/tmp/igd-{user.uid}", ignore_errors=True)
        self._check_reachable()

    def _check_reachable(self) -> None:
        """The test users must be able to run this venv's Python. Where its interpreter is
        behind a directory only root may search (e.g. pyenv in /root, mode 0700), they get
        CAP_DAC_READ_SEARCH (read and search any file; not write, so a socket's mode still
        keeps them out) and this says so; without it nothing here could run."""
        probe = ["/bin/sh", "-c", '"$0" -c "import igctl.cli, igd.protocol"', sys.executable]
        victim = self.users["victim"]
        plain = subprocess.run(self.setpriv(victim, []) + probe, capture_output=True, text=True)
        if plain.returncode == 0:
            return
        blocked = next((str(p) for p in reversed(Path(os.path.realpath(sys.executable)).parents)
                        if not os.stat(p).st_mode & stat.S_IXOTH), "?")
        self.caps = ["--inh-caps=+dac_read_search", "--ambient-caps=+dac_read_search"]
        warnings.warn(
            f"OTHER USERS CANNOT RUN {sys.executable} (it resolves to {os.path.realpath(sys.executable)}, behind "
            f"{blocked}, which only its owner may search): the test users of tests/test_users.py run with "
            "CAP_DAC_READ_SEARCH so that they can start it. Sockets' write permissions still apply to them; "
            "install the venv's Python where everyone can read it to test without the capability.",
            stacklevel=1,
        )
        with_caps = subprocess.run(self.setpriv(victim, []) + probe, capture_output=True, text=True)
        if with_caps.returncode != 0:
            _cannot(f"user {victim.name} cannot run {sys.executable}, even with CAP_DAC_READ_SEARCH: "
                    f"{with_caps.stderr.strip()[-300:]}")

    def setpriv(self, user: User, groups: list[int] | None = None) -> list[str]:
        """The prefix that runs a command as ``user``: its groups from the user database
        (initgroups, as a login would), or exactly ``groups`` (supplementary)."""
        prefix = [shutil.which("setpriv") or "setpriv", f"--reuid={user.uid}", f"--regid={user.gid}"]
        if groups is None:
            prefix.append("--init-groups")
        elif groups:
            prefix.append("--groups=" + ",".join(map(str, groups)))
        else:
            prefix.append("--clear-groups")
        return [*prefix, *self.caps, "--"]

    def env(self, user: User, **extra: str) -> dict[str, str]:
        """A login-like environment: no XDG_RUNTIME_DIR, no IGD_SOCKET (unless given)."""
        return {"PATH": f"{Path(IGCTL).parent}:/usr/bin:/bin", "HOME": str(user.home), "LANG": "C.UTF-8",
                "IGD_CACHE_DIR": str(user.home / "cache"), "PYTHONDONTWRITEBYTECODE": "1", **extra}

    def run(self, user: User, *argv: str, groups: list[int] | None = None, timeout: float = 120,
            **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.setpriv(user, groups) + list(argv), cwd=user.home, env=self.env(user, **env),
                              capture_output=True, text=True, timeout=timeout)

    def igctl(self, user: User, *args: str, groups: list[int] | None = None,
              **env: str) -> subprocess.CompletedProcess[str]:
        return self.run(user, IGCTL, *args, groups=groups, **env)

    def start(self, argv: list[str], env: dict[str, str], cwd: Path | None = None) -> subprocess.Popen:
        """A long-running process (already prefixed with setpriv where needed); its output
        goes to a file that stop() returns."""
        log = tempfile.NamedTemporaryFile(dir=self.shared, prefix="log-", delete=False)
        process = subprocess.Popen(argv, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        process.log_path = Path(log.name)  # type: ignore[attr-defined]
        self.processes.append(process)
        return process

    def remove(self) -> None:
        """Everything, whatever happened: our processes, the users, the group, their files."""
        for process in self.processes:
            stop(process)
        failures = []
        for user in self.users.values():
            shutil.rmtree(user.home, ignore_errors=True)
            shutil.rmtree(f"/tmp/igd-{user.uid}", ignore_errors=True)
            done = subprocess.run(["userdel", user.name], capture_output=True, text=True)
            if done.returncode != 0:
                failures.append(f"userdel {user.name}: {done.stderr.strip()}")
            if _getent("group", user.name):  # the user's own group, should userdel have kept it
                subprocess.run(["groupdel", user.name], capture_output=True)
        if self.gid != -1:
            done = subprocess.run(["groupdel", self.group], capture_output=True, text=True)
            if done.returncode != 0:
                failures.append(f"groupdel {self.group}: {done.stderr.strip()}")
        shutil.rmtree(self.shared, ignore_errors=True)
        assert not failures, "test users left behind: " + "; ".join(failures)


def _getent(database: str, key: str) -> list[str]:
    found = subprocess.run(["getent", database, key], capture_output=True, text=True)
    return found.stdout.strip().split(":") if found.returncode == 0 else []


def stop(process: subprocess.Popen, sig: int = signal.SIGTERM) -> str:
    """Stop one of our processes (by its pid) and return what it printed (started by
    People.start)."""
    if process.poll() is None:
        process.send_signal(sig)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    for stream in (process.stdin, process.stdout):
        if stream is not None:
            stream.close()
    log = getattr(process, "log_path", None)
    return log.read_text(errors="replace") if log is not None and log.exists() else ""


@pytest.fixture(scope="module")
def people() -> Iterator[People]:
    if os.geteuid() != 0:
        _cannot("tests/test_users.py creates local users (useradd) and runs processes as them: it needs root",
                fail_under_ci=False)
    for tool, package in (("useradd", "passwd"), ("userdel", "passwd"), ("groupadd", "passwd"),
                          ("groupdel", "passwd"), ("setpriv", "util-linux"), ("getent", "libc-bin")):
        _need(tool, package)
    folks = People()
    try:
        folks.create()
        yield folks
    finally:
        folks.remove()


@pytest.fixture(scope="module")
def root_igd(people: People) -> Iterator[Igd]:
    """igd as root, open to everyone's connect() (socket 0666) but admitting only group G,
    mallory and the service user (whose relays forward to it), besides root. Tests wait for its socket,
    not for its model: hello and status are answered while it loads."""
    with Igd(*SERVE[1:], "--allow-group", people.group, "--allow-uid", people.users["mallory"].name,
             "--allow-uid", people.users["service"].name, wait_ready=False) as igd:
        igd.dir.chmod(0o755)
        wait_until(igd.socket.exists, 120, "igd's socket", log=igd.log)
        igd.socket.chmod(0o666)
        yield igd


# --- mallory's relay ------------------------------------------------------------------------------

# Standard library only. Listens on each path given (creating its directory, 0755, and
# making the socket 0777 so that the victim can connect), forwards every connection to
# UPSTREAM, and records in RECORD "N accepted", "N data BYTES" for each chunk the client
# sends, "N closed"; the client's bytes themselves go to RECORD.N (the attacker's copy).
RELAY = r'''
import os, socket, sys, threading
upstream, record, paths = sys.argv[1], sys.argv[2], sys.argv[3:]
lock = threading.Lock()
count = [0]

def note(line):
    with lock, open(record, "a") as out:
        out.write(line + "\n")

def pump(source, sink, n):
    try:
        while True:
            data = source.recv(65536)
            if not data:
                break
            if n:
                note(f"{n} data {len(data)}")
                with open(f"{record}.{n}", "ab") as copy:
                    copy.write(data)
            sink.sendall(data)
    except OSError:
        pass
    finally:
        if n:
            note(f"{n} closed")
        try:
            sink.shutdown(socket.SHUT_WR)
        except OSError:
            pass

def serve(listener):
    while True:
        client, _ = listener.accept()
        with lock:
            count[0] += 1
            n = count[0]
        note(f"{n} accepted {listener.getsockname()}")
        server = socket.socket(socket.AF_UNIX)
        server.connect(upstream)
        threading.Thread(target=pump, args=(client, server, n), daemon=True).start()
        threading.Thread(target=pump, args=(server, client, 0), daemon=True).start()

listeners = []
for path in paths:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    os.chmod(os.path.dirname(path), 0o755)
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path)
    os.chmod(path, 0o777)
    listener.listen(16)
    listeners.append(listener)
for listener in listeners:
    threading.Thread(target=serve, args=(listener,), daemon=True).start()
print("listening", flush=True)
sys.stdin.read()
'''


class Relay:
    """A real relay run as ``user``: what a squatter needs to see a victim's requests."""

    def __init__(self, people: People, user: User, upstream: Path, *paths: Path) -> None:
        self.people, self.user, self.paths = people, user, paths
        self.record = user.home / f"record-{secrets.token_hex(4)}"
        script = people.shared / "relay.py"
        script.write_text(RELAY)
        script.chmod(0o644)
        self.process = subprocess.Popen(
            people.setpriv(user) + [sys.executable, str(script), str(upstream), str(self.record), *map(str, paths)],
            cwd=user.home, env=people.env(user), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True)
        people.processes.append(self.process)
        line = self.process.stdout.readline()
        assert line.strip() == "listening", line + self.process.stdout.read()

    def lines(self) -> list[str]:
        return self.record.read_text().splitlines() if self.record.exists() else []

    def settled(self, connections: int) -> list[str]:
        """The record once ``connections`` connections have been accepted and closed."""
        def done() -> bool:
            lines = self.lines()
            return sum(" accepted " in l for l in lines) == sum(l.endswith(" closed") for l in lines) == connections
        wait_until(done, 10, "the relay's connections to close", log=lambda: "\n".join(self.lines()))
        return self.lines()

    def close(self) -> None:
        stop(self.process)
        for path in self.paths:
            if path.parent.name.removeprefix("igd-").isdecimal():  # a squatted /tmp/igd-UID:
                shutil.rmtree(path.parent, ignore_errors=True)  # root removes it, as the message advises
            else:
                path.unlink(missing_ok=True)

    def __enter__(self) -> Relay:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def one_line(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1, text
    return lines[0]


# --- the tests --------------------------------------------------------------------------------------


def test_igctl_sends_nothing_to_a_squatter_of_the_tmp_fallback(people: People, root_igd: Igd) -> None:
    """(a) mallory made /tmp/igd-VICTIMUID first, with a relay to a real igd; the victim's
    plain igctl (no XDG_RUNTIME_DIR, no IGD_SOCKET) refuses it and the relay gets nothing."""
    victim, mallory = people.users["victim"], people.users["mallory"]
    squatted = Path(f"/tmp/igd-{victim.uid}/igd.sock")
    image = victim.home / "private.png"
    shutil.copy(IMAGE, image)
    os.chown(image, victim.uid, victim.gid)
    with Relay(people, mallory, root_igd.socket, squatted) as relay:
        with WireClient(str(squatted), timeout=60) as through:  # the relay works: it would get everything
            assert through.call("hello", {"client": "test"})["result"]["server"] == "igd"
        before = relay.settled(1)
        assert any(" data " in line for line in before)
        out = people.igctl(victim, "attribute", str(image), "cat", "--steps", "8", "-o", "result.gzip")
        assert out.returncode == EXIT_UNTRUSTED, out.stderr
        message = one_line(out.stderr)
        assert message.startswith(f"igctl: not connecting to {squatted}: /tmp/igd-{victim.uid} belongs to "
                                  f"uid {mallory.uid} ({mallory.name}), not to you"), message
        assert "XDG_RUNTIME_DIR" in message and f"ask root to remove /tmp/igd-{victim.uid}" in message
        # the Python client takes the same path
        api = people.run(victim, sys.executable, "-c", "import igctl\ntry:\n    igctl.Client()\n"
                         "except igctl.api.UntrustedSocket as e:\n    print('refused', e)")
        assert api.stdout.startswith("refused not connecting to"), api.stdout + api.stderr
        time.sleep(0.5)  # time for the relay to log a connection, had there been one
        assert relay.settled(1) == before  # not even a connection
        assert not (victim.home / "result.gzip").exists()


def test_igd_serve_refuses_a_squatted_tmp_fallback(people: People, root_igd: Igd) -> None:
    """(b) The victim's own `igd serve` in the same place fails at once, saying why and
    what to do, and does not even probe the squatter's socket."""
    victim, mallory = people.users["victim"], people.users["mallory"]
    with Relay(people, mallory, root_igd.socket, Path(f"/tmp/igd-{victim.uid}/igd.sock")) as relay:
        started = time.monotonic()
        run = people.run(victim, IGD, *SERVE, timeout=120)
        assert run.returncode != 0
        error = [line for line in run.stderr.splitlines() if line.startswith("Error:")]
        assert len(error) == 1, run.stderr
        assert error[0].startswith(f"Error: /tmp/igd-{victim.uid} belongs to uid {mallory.uid} ({mallory.name}), "
                                   "not to you"), error[0]
        assert "XDG_RUNTIME_DIR" in error[0] and "--socket" in error[0] and "ask root to remove" in error[0]
        assert "event=model_loaded" not in run.stderr and time.monotonic() - started < 60
        assert relay.lines() == []


@pytest.mark.slow  # a daemon of its own
def test_own_igd_makes_its_tmp_directory_private_and_serves_plain_igctl(people: People) -> None:
    """(c, own) Without a squatter, the victim's igd takes /tmp/igd-UID (one left 0755 by an
    older igd is made 0700), and the victim's plain igctl talks to it."""
    victim = people.users["victim"]
    private = Path(f"/tmp/igd-{victim.uid}")
    shutil.rmtree(private, ignore_errors=True)
    assert people.run(victim, "mkdir", "-m", "755", str(private)).returncode == 0
    daemon = people.start(people.setpriv(victim) + [IGD, *SERVE], people.env(victim), cwd=victim.home)
    try:
        status = people.igctl(victim, "status", "--wait", "120", timeout=180)
        assert status.returncode == 0, status.stdout + status.stderr + stop(daemon)
        assert f"socket     {private}/igd.sock" in status.stdout
        info = private.lstat()
        assert stat.S_ISDIR(info.st_mode) and info.st_uid == victim.uid and stat.S_IMODE(info.st_mode) == 0o700
        shutil.copy(IMAGE, victim.home / "cat.png")
        out = people.igctl(victim, "attribute", "cat.png", "cat", "--steps", "8", "-o", "cat.gzip")
        assert out.returncode == 0, out.stderr
        assert (victim.home / "cat.gzip").stat().st_size > 0
    finally:
        log = stop(daemon)
    assert "event=runtime_directory_made_private" in log and "mode=0755" in log, log


def test_igctl_checks_whose_server_it_reached(people: People, root_igd: Igd) -> None:
    """(c) An explicit socket served by another user's process is refused right after
    connect() (SO_PEERCRED), before a byte is sent; root's igd is accepted; so is igd's
    service user where it exists."""
    victim, mallory, service = people.users["victim"], people.users["mallory"], people.users["service"]
    elsewhere = mallory.home / "igd.sock"
    mallory.home.chmod(0o755)
    with Relay(people, mallory, root_igd.socket, elsewhere) as relay:
        for how in ({"IGD_SOCKET": str(elsewhere)}, {}):
            args = () if how else ("--socket", str(elsewhere))
            out = people.igctl(victim, *args, "attribute", str(IMAGE), "cat", "--steps", "8", "-o", "x.gzip", **how)
            assert out.returncode == EXIT_UNTRUSTED, out.stderr
            assert one_line(out.stderr) == (
                f"igctl: refusing the server at {elsewhere}: it runs as uid {mallory.uid} ({mallory.name}) "
                f"(pid {relay.process.pid}), not as you, root or igd's service user, so it could be impersonating "
                "igd; nothing was sent")
        with pytest.raises(UntrustedSocket):  # root's igctl too
            igctl_client.Client(elsewhere, 10)
        lines = relay.settled(3)
        assert [line.split()[1] for line in lines] == ["accepted", "closed"] * 3, lines  # no "data"
        assert not list(mallory.home.glob(f"{relay.record.name}.*"))  # no copy of any byte
    mallory.home.chmod(0o700)

    # root's igd: accepted (the root igd's allow-list then admits mallory, not the victim)
    out = people.igctl(mallory, "--socket", str(root_igd.socket), "status")
    assert out.returncode in (0, 5), out.stderr
    # igd's service user: trusted by name (SERVICE_USER), and only that user
    service.home.chmod(0o755)
    with Relay(people, service, root_igd.socket, service.home / "igd.sock"):
        with pytest.raises(UntrustedSocket):
            igctl_client.Client(service.home / "igd.sock", 10)
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(igctl_client, "SERVICE_USER", service.name)
            with igctl_client.Client(service.home / "igd.sock", 60) as through:
                assert through.call("hello")["server"] == "igd"
    service.home.chmod(0o700)


@pytest.mark.slow  # a daemon of its own
def test_igctl_accepts_socket_activated_igd(people: People) -> None:
    """(c, activation) As under systemd: root creates the socket (so its peer uid is 0),
    igd runs as the service user; the victim's igctl talks to it."""
    require_tool("systemd-socket-activate")
    victim, service = people.users["victim"], people.users["service"]
    directory = short_tempdir()
    directory.chmod(0o755)
    path = directory / "igd.sock"
    environment = people.env(service)
    activator = people.start(
        ["systemd-socket-activate", "-l", str(path), *(f"--setenv={k}={v}" for k, v in environment.items()),
         *people.setpriv(service), IGD, *SERVE], environment)
    try:
        wait_until(path.exists, 30, "systemd-socket-activate's socket")
        path.chmod(0o666)
        out = people.igctl(victim, "--socket", str(path), "status", timeout=120)
        assert out.returncode in (0, 5), out.stdout + out.stderr
        assert "state" in out.stdout
    finally:
        log = stop(activator)
        shutil.rmtree(directory, ignore_errors=True)
    assert "event=socket_activated" in log, log


def test_allow_group_admits_supplementary_members_only(people: People, root_igd: Igd) -> None:
    """(d) --allow-group G: a user whose only tie to G is a supplementary group is admitted,
    also among 300 groups (over what one getsockopt call of Python can read); a user not
    in G gets `forbidden`."""
    member, stranger = people.users["member"], people.users["stranger"]
    ids = people.run(member, "id", "-G")
    assert ids.stdout.split()[0] == str(member.gid) != str(people.gid)  # primary group: not G
    assert str(people.gid) in ids.stdout.split()[1:]  # G: supplementary
    socket_args = ("--socket", str(root_igd.socket), "status")
    out = people.igctl(member, *socket_args)
    assert out.returncode in (0, 5), out.stderr
    many = [*range(70000, 70299), people.gid]  # G the 300th
    out = people.igctl(member, *socket_args, groups=many)
    assert out.returncode in (0, 5), out.stderr
    assert "peer_groups_unknown" not in root_igd.log()
    out = people.igctl(stranger, *socket_args)
    assert out.returncode == 4 and "forbidden" in out.stderr, out.stderr
    assert f"peer_uid={stranger.uid}" in root_igd.log()
    out = people.igctl(stranger, *socket_args, groups=many[:-1])
    assert out.returncode == 4 and "forbidden" in out.stderr, out.stderr


def test_permission_denied_on_the_socket_exits_3(people: People) -> None:
    """(e) A socket the user may not connect to (mode 0660, someone else's group): exit 3
    and the documented advice, whether given by --socket (before or after the command)
    or IGD_SOCKET; not click's exit 2 "is not readable"."""
    stranger = people.users["stranger"]
    directory = short_tempdir()
    directory.chmod(0o755)
    path = directory / "igd.sock"
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(str(path))
        path.chmod(0o660)
        listener.listen()
        expected = f"igctl: permission denied on {path}: ask to be added to the socket's group (igd)"
        for args, env in ((("--socket", str(path), "status"), {}), (("status", "--socket", str(path)), {}),
                          (("version",), {"IGD_SOCKET": str(path)}),
                          (("attribute", str(IMAGE), "cat", "-o", "-"), {"IGD_SOCKET": str(path)})):
            out = people.igctl(stranger, *args, **env)
            assert out.returncode == EXIT_NO_DAEMON, (args, out.stderr)
            assert one_line(out.stderr) == expected
    shutil.rmtree(directory, ignore_errors=True)


# --- the rules of the private directory, in-process -------------------------------------------


def test_private_directory_rules() -> None:
    """check_private_directory: missing is fine (no daemon then); ours 0700 is fine; a
    symlink, a file, group/other bits (for igctl: write bits), a foreign owner, a writable
    non-sticky parent are each refused with a one-line reason."""
    base = Path(tempfile.mkdtemp(dir="/tmp"))
    try:
        protocol.check_private_directory(base / "missing")
        good = base / "good"
        good.mkdir(0o700)
        protocol.check_private_directory(good)
        (base / "link").symlink_to(good)
        (base / "file").write_text("")
        loose = base / "loose"
        loose.mkdir()
        loose.chmod(0o755)
        cases = {"link": "is a symbolic link", "file": "is not a directory", "loose": "has mode 0755"}
        if os.geteuid() == 0:
            foreign = base / "foreign"
            foreign.mkdir(0o700)
            os.chown(foreign, 4242, -1)
            cases["foreign"] = "belongs to uid 4242, not to you, so its owner could impersonate igd"
        for name, reason in cases.items():
            with pytest.raises(protocol.UnsafeDirectory, match=reason) as caught:
                protocol.check_private_directory(base / name)
            assert "\n" not in str(caught.value)
        protocol.check_private_directory(loose, listening=False)  # igctl: read and search bits are harmless
        loose.chmod(0o775)
        with pytest.raises(protocol.UnsafeDirectory, match="has mode 0775"):
            protocol.check_private_directory(loose, listening=False)
        base.chmod(0o777)
        with pytest.raises(protocol.UnsafeDirectory, match="writable by others and not sticky"):
            protocol.check_private_directory(good)
        base.chmod(0o1777)
        protocol.check_private_directory(good)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_exit_status_6_is_documented() -> None:
    out = subprocess.run([IGCTL, "--help"], capture_output=True, text=True, timeout=60).stdout
    meaning = dict(igctl_client.EXIT_TABLE)[EXIT_UNTRUSTED]
    assert f"{EXIT_UNTRUSTED:<3} {meaning}" in out and "(nothing was sent)" in meaning
