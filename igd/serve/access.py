"""Who may talk to igd.

The first gate is the file system: the socket is mode 0660 (group ``igd`` under
systemd), so only its owner and group can connect. ``--allow-uid``/``--allow-group``
add a second gate for shared hosts: on each connection the kernel's record of the peer
(SO_PEERCRED, SO_PEERGROUPS; nothing the client says) is checked against the lists.

The groups are the connecting process's supplementary groups (the usual way to be in
group ``igd``: ``usermod -aG``) plus its primary group, as the kernel recorded them at
connect(). Python's getsockopt takes at most 1024 bytes (256 groups); a peer in more
groups gets ERANGE, with the size needed, and is asked again through libc (ctypes) with
a buffer that size. Not /proc/PID/status: the pid may have been reused by then, igd's
unit hides other users' processes (ProtectProc=invisible), and it shows the groups of
now, not of connect(). If even that fails (no ctypes, or a kernel without
SO_PEERGROUPS), igd logs ``peer_groups_unknown`` and knows only the primary group, so
such a peer may be refused, never wrongly admitted.
"""

from __future__ import annotations

import errno
import grp
import logging
import os
import pwd
import socket
import struct
from dataclasses import dataclass

from igd.logs import log

SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)  # Linux 4.13+; Python lacks the name
_GETSOCKOPT_MAX = 1024  # the largest buffer Python's socket.getsockopt accepts: 256 groups
_MAX_GROUPS = 65536  # the kernel's NGROUPS_MAX


@dataclass(frozen=True)
class Peer:
    pid: int
    uid: int
    gid: int
    groups: frozenset[int]

    def log_fields(self) -> dict[str, int]:
        return {"peer_pid": self.pid, "peer_uid": self.uid}


def peer_of(sock: socket.socket | None) -> Peer | None:
    """The connecting process's pid, uid, gid and groups, as the kernel recorded them."""
    if sock is None:
        return None
    try:
        pid, uid, gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
    except OSError:
        return None
    try:
        groups = _peer_groups(sock)
    except OSError as error:
        log("peer_groups_unknown", level=logging.WARNING, peer_pid=pid, peer_uid=uid,
            error=error.strerror or str(error))
        groups = set()
    return Peer(pid, uid, gid, frozenset(groups | {gid}))


def _peer_groups(sock: socket.socket) -> set[int]:
    """The peer's supplementary groups (SO_PEERGROUPS); see the module's docstring."""
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, _GETSOCKOPT_MAX)
    except OSError as error:
        if error.errno != errno.ERANGE:
            raise
        raw = _peer_groups_via_libc(sock.fileno())
    return set(struct.unpack(f"{len(raw) // 4}I", raw))


def _peer_groups_via_libc(fd: int) -> bytes:
    """getsockopt(SO_PEERGROUPS) with a buffer of the size the kernel asks for."""
    try:
        import ctypes
    except ImportError:
        raise OSError(errno.ERANGE, "over 256 groups, and no ctypes to read them") from None
    libc = ctypes.CDLL(None, use_errno=True)
    size = ctypes.c_uint32(4 * 1024)
    while True:
        buffer = ctypes.create_string_buffer(size.value)
        asked = size.value
        if libc.getsockopt(fd, socket.SOL_SOCKET, SO_PEERGROUPS, buffer, ctypes.byref(size)) == 0:
            return buffer.raw[: size.value]
        code = ctypes.get_errno()
        if code != errno.ERANGE or size.value <= asked or size.value > 4 * _MAX_GROUPS:
            raise OSError(code, os.strerror(code))


@dataclass(frozen=True)
class AccessPolicy:
    """Empty lists: everyone the socket's permissions let in. Otherwise a peer needs an
    allowed uid or group; root and igd's own user are always allowed."""

    uids: frozenset[int] = frozenset()
    gids: frozenset[int] = frozenset()

    @classmethod
    def parse(cls, users: tuple[str, ...], groups: tuple[str, ...]) -> AccessPolicy:
        """From user/group names or numbers; ValueError names the unknown one."""
        return cls(frozenset(_uid(u) for u in users), frozenset(_gid(g) for g in groups))

    @property
    def restricted(self) -> bool:
        return bool(self.uids or self.gids)

    def allows(self, peer: Peer | None) -> bool:
        if not self.restricted:
            return True
        if peer is None:
            return False
        return peer.uid in (0, os.geteuid()) or peer.uid in self.uids or bool(self.gids & peer.groups)

    def describe(self) -> str:
        return ", ".join([*(f"uid {u}" for u in sorted(self.uids)), *(f"gid {g}" for g in sorted(self.gids))])


def _uid(user: str) -> int:
    if user.isdecimal():
        return int(user)
    try:
        return pwd.getpwnam(user).pw_uid
    except KeyError:
        raise ValueError(f"no such user: {user}") from None


def _gid(group: str) -> int:
    if group.isdecimal():
        return int(group)
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise ValueError(f"no such group: {group}") from None
