"""Result files on disk: one atomic writer for igctl and `igd batch`, and a careful reader
of input files for `igd batch`.

Standard library only: igctl imports this module.
"""

from __future__ import annotations

import errno
import os
import re
import stat
import tempfile
from pathlib import Path
from typing import BinaryIO

# Temporary files being written right now (any thread): a process that must end at once
# (igctl on Ctrl-C) removes them first, so that nothing partial is left behind.
TEMPORARIES: set[str] = set()


def write_atomically(path: Path, data: bytes, *, mode: int = 0o666) -> None:
    """Put ``data`` at ``path`` so that a crash or a failure at any moment leaves either
    the old file or the whole new one, never a partial one (see :class:`AtomicFile`)."""
    with AtomicFile(path, mode=mode) as f:
        f.write(data)


class AtomicFile:
    """A file written in pieces that appears at ``path`` whole or not at all:
    ``with AtomicFile(path) as f: f.write(...)``.

    A temporary file beside ``path`` (same file system) is written, flushed to disk,
    given the mode the user's umask allows (as ``open()`` would; ``mode`` narrows it,
    e.g. 0o644 for a file nobody else may change), renamed over ``path``, and the
    directory entry is flushed too; an exception inside the block removes the temporary
    file and leaves ``path`` as it was. The folder must exist. The temporary is named
    ``.<name>.<8 random characters>.part`` (see :func:`temporary_target`): one a kill
    left behind can be recognised and removed."""

    def __init__(self, path: Path, *, mode: int = 0o666) -> None:
        self.path = path
        self.mode = mode
        self.folder = path.parent if str(path.parent) else Path(".")
        self._file: BinaryIO | None = None
        self._temporary = ""

    def __enter__(self) -> BinaryIO:
        fd, self._temporary = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".part", dir=self.folder)
        TEMPORARIES.add(self._temporary)
        self._file = os.fdopen(fd, "wb")
        return self._file

    def __exit__(self, kind: type[BaseException] | None, *exc: object) -> None:
        assert self._file is not None
        try:
            if kind is None:
                self._file.flush()
                os.fsync(self._file.fileno())
            self._file.close()
            if kind is None:
                os.chmod(self._temporary, self.mode & 0o666 & ~_umask())
                os.replace(self._temporary, self.path)
                _fsync_directory(self.folder)
        except BaseException:
            kind = kind or BaseException
            raise
        finally:
            if kind is not None:
                try:
                    os.unlink(self._temporary)
                except FileNotFoundError:
                    pass
            TEMPORARIES.discard(self._temporary)


# mkstemp's names: the prefix, 8 characters from [a-z0-9_], the suffix.
_TEMPORARY = re.compile(r"\.(?P<target>.+)\.[a-z0-9_]{8}\.part", re.DOTALL)


def temporary_target(name: str) -> str | None:
    """The name of the file an :class:`AtomicFile` temporary called ``name`` was to
    become (``.001.cat.gzip.k3x_9a0q.part`` -> ``001.cat.gzip``); None for any other name."""
    match = _TEMPORARY.fullmatch(name)
    return match["target"] if match else None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_directory(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class UnreadableInput(ValueError):
    """An input path that is not a readable regular file of an acceptable size."""


def read_regular_file(path: str, limit: int, *, what: str = "image", owned: bool = False,
                      follow_symlinks: bool = True) -> bytes:
    """The bytes of the regular file at ``path`` (symlinks followed unless
    ``follow_symlinks=False``), at most ``limit``.

    Never blocks or reads without end: a FIFO, a device (``/dev/zero``), a directory, a
    path with a NUL byte or a file over ``limit`` bytes is an UnreadableInput saying so.
    The file is opened non-blocking and checked on the open descriptor, so it cannot be
    swapped for something else between the check and the read.

    ``what`` names the kind of file in the messages ("image": "not an image file",
    "images may have up to ..."). ``owned``: also refuse a file that belongs to someone
    other than this process's effective user or root, or that every user may write (one
    that others could have planted or changed). ``follow_symlinks=False``: a symbolic
    link at ``path`` itself is refused too."""
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | (0 if follow_symlinks else os.O_NOFOLLOW)
    try:
        fd = os.open(path, flags)
    except ValueError:
        raise UnreadableInput(f"{path!r}: the path contains a NUL byte") from None
    except OSError as error:
        if error.errno == errno.ELOOP and not follow_symlinks:
            raise UnreadableInput(f"{path} is a symbolic link, not {_a(what)} file") from None
        raise UnreadableInput(f"cannot read {path}: {error.strerror}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            kind = _kinds.get(stat.S_IFMT(info.st_mode), "not a regular file")
            raise UnreadableInput(f"{path} is {kind}, not {_a(what)} file")
        if owned:
            refused = foreign(info)
            if refused:
                raise UnreadableInput(f"{path} {refused}")
        if info.st_size > limit:
            raise UnreadableInput(f"{path} is {info.st_size:,} bytes; {what}s may have up to {limit:,}")
        with os.fdopen(os.dup(fd), "rb") as f:
            data = f.read(info.st_size + 1)  # not limit + 1 bytes set aside for every small file
            if len(data) > info.st_size:  # it grows while we read
                data += f.read(limit + 1 - len(data))
    except OSError as error:
        raise UnreadableInput(f"cannot read {path}: {error.strerror}") from None
    finally:
        os.close(fd)
    if len(data) > limit:  # it grew while we read
        raise UnreadableInput(f"{path} is over {limit:,} bytes; {what}s may have up to {limit:,}")
    return data


def foreign(info: os.stat_result) -> str | None:
    """Why a file or folder with the status ``info`` may have been planted or changed by
    someone else, or None: it belongs to another user than this process's effective user
    and root, or every user may write it."""
    if info.st_uid not in (os.geteuid(), 0):
        return f"belongs to uid {info.st_uid}, neither this user (uid {os.geteuid()}) nor root"
    if info.st_mode & stat.S_IWOTH:
        return f"is writable by every user (mode {stat.S_IMODE(info.st_mode):o})"
    return None


def _a(what: str) -> str:
    return f"{'an' if what[:1] in ('a', 'e', 'i', 'o', 'u') else 'a'} {what}"


_kinds = {
    stat.S_IFDIR: "a directory",
    stat.S_IFIFO: "a FIFO",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
}
