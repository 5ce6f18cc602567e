"""The socket file of a standalone igd (not socket-activated): where it may be, how it
is created, and that igd removes only the file it created.

A stale socket file (nobody accepting, left by a crash) is replaced; a live one (another
igd serving) or a path that is not a socket is an error rather than something to delete.
The directory must belong to igd's user or root and not be writable by others (sticky
directories such as /tmp aside), so that nobody else can swap the socket for their own.
The /tmp fallback (``/tmp/igd-UID``, without XDG_RUNTIME_DIR) must moreover be igd's
user's own, mode 0700 and not a link: anyone could have created it first (a squatter
who would receive the requests of the user's igctl); igd creates it so when missing.
"""

from __future__ import annotations

import errno
import os
import socket
import stat
from dataclasses import dataclass
from pathlib import Path

from igd.logs import log
from igd.protocol import UnsafeDirectory, check_private_directory, is_fallback_socket

LISTEN_BACKLOG = 128


class SocketUnusable(RuntimeError):
    """igd cannot listen at the path asked for; the message says why."""


@dataclass(frozen=True)
class OwnedPath:
    """A socket file this process created; removed only while it is still that file."""

    path: Path
    inode: int

    def unlink(self) -> None:
        try:
            if self.path.lstat().st_ino == self.inode:
                self.path.unlink()
        except FileNotFoundError:
            pass


def bind_socket(path: Path) -> tuple[socket.socket, OwnedPath]:
    """A listening AF_UNIX socket at ``path``, mode 0660.

    A stale socket file (nobody accepting) is replaced; a live one, or a path that is not
    a socket, is an error rather than something to delete.
    """
    if len(os.fsencode(path)) > 107:
        raise SocketUnusable(f"socket path {path} is {len(os.fsencode(path))} bytes; AF_UNIX allows 107")
    if is_fallback_socket(path):
        _make_private_directory(path.parent)  # before looking inside: it may be someone else's
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        mode = None
    if mode is not None:
        if not stat.S_ISSOCK(mode):
            raise SocketUnusable(f"{path} exists and is not a socket; refusing to replace it")
        if _is_served(path):
            raise SocketUnusable(f"another igd is already serving on {path} (stop it, or choose another --socket)")
        path.unlink()
        log("stale_socket_removed", path=str(path))
    if not path.parent.exists():
        path.parent.mkdir(mode=0o755, parents=True)
    _check_directory(path.parent)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o117)  # 0660: owner and group only
    try:
        sock.bind(os.fspath(path))
    except OSError:
        sock.close()
        raise
    finally:
        os.umask(old_umask)
    sock.listen(LISTEN_BACKLOG)
    return sock, OwnedPath(path, path.lstat().st_ino)


def _make_private_directory(directory: Path) -> None:
    """The /tmp fallback directory (no XDG_RUNTIME_DIR): created mode 0700 when missing,
    else used only if it is ours, a real directory and 0700 (see
    igd.protocol.check_private_directory), since anyone may have created it first. One
    made 0755 by an older igd (ours, not a link, writable by nobody else) is set to 0700."""
    try:
        os.mkdir(directory, 0o700)
        log("runtime_directory_created", path=str(directory))
    except FileExistsError:
        info = directory.lstat()
        if (info.st_uid == os.geteuid() and stat.S_ISDIR(info.st_mode) and info.st_mode & 0o077
                and not info.st_mode & (stat.S_IWGRP | stat.S_IWOTH)):
            os.chmod(directory, 0o700)
            log("runtime_directory_made_private", path=str(directory), mode=f"{stat.S_IMODE(info.st_mode):04o}")
    try:
        check_private_directory(directory)  # also after mkdir: the mode, and whether it was really ours
    except UnsafeDirectory as error:
        raise SocketUnusable(str(error)) from None


def _check_directory(directory: Path) -> None:
    """Refuse a socket directory that someone else could use to replace our socket: it
    must belong to us or root, and not be writable by others (unless sticky, as /tmp)."""
    info = directory.stat()
    if info.st_uid not in (os.geteuid(), 0):
        raise SocketUnusable(f"{directory} belongs to uid {info.st_uid}, not to us; refusing to put the socket there")
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not info.st_mode & stat.S_ISVTX:
        raise SocketUnusable(f"{directory} is writable by others; refusing to put the socket there")


def _is_served(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(os.fspath(path))
        except (ConnectionRefusedError, FileNotFoundError):
            return False
        except OSError as error:
            return error.errno not in (errno.ECONNREFUSED, errno.ENOENT)
        return True
