"""Who may talk to igd.

The first gate is the file system: the socket is mode 0660 (group ``igd`` under
systemd), so only its owner and group can connect. ``--allow-uid``/``--allow-group``
add a second gate for shared hosts: on each connection the kernel's record of the peer
(SO_PEERCRED, SO_PEERGROUPS; nothing the client says) is checked against the lists.
"""

from __future__ import annotations

import grp
import os
import pwd
import socket
import struct
from dataclasses import dataclass

SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)  # Linux 4.13+; Python lacks the name
_MAX_GROUPS = 1024


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
        raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, 4 * _MAX_GROUPS)
        groups = set(struct.unpack(f"{len(raw) // 4}I", raw))
    except OSError:
        groups = set()
    return Peer(pid, uid, gid, frozenset(groups | {gid}))


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
