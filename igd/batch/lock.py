"""One `igd batch` run per OUT_DIR (per shard when sharded), enforced with flock(2).

A run without --shard holds ``OUT_DIR/.igd-batch.lock`` exclusively. A run with
``--shard I/N`` holds ``OUT_DIR/.igd-batch.shard-I-of-N.lock`` exclusively and
``.igd-batch.lock`` shared: shards of one dataset run side by side, but never two runs
of the same shard, and never a run without --shard beside any other (both would do the
same pairs and write the same files). Each holder writes its pid into the file it holds
exclusively, so that a refused run can name the run in its way. The kernel drops the
locks when a run ends, however it ends (SIGKILL included); the files stay, harmlessly.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from pathlib import Path
from types import TracebackType

from igd.batch.inputs import InputError

WHOLE = ".igd-batch.lock"


def lock_name(shard: tuple[int, int] | None) -> str:
    return WHOLE if shard is None else f".igd-batch.shard-{shard[0]}-of-{shard[1]}.lock"


class OutDirLock:
    """``with OutDirLock(out_dir, shard): ...``; entering raises InputError at once, naming
    the other run's pid, when another run holds OUT_DIR (or this shard of it)."""

    def __init__(self, out_dir: Path, shard: tuple[int, int] | None) -> None:
        self.out_dir = out_dir
        self.shard = shard
        self._fds: list[int] = []

    def __enter__(self) -> OutDirLock:
        try:
            if self.shard is None:
                whole = self._open(WHOLE)
                if not _try_lock(whole, fcntl.LOCK_EX):
                    raise InputError(self._busy_whole())
                _write_pid(whole)
            else:
                # The shard's own lock first: whoever holds the shared one holds its own
                # already, and a run refused below can name it.
                mine = self._open(lock_name(self.shard))
                if not _try_lock(mine, fcntl.LOCK_EX):
                    raise InputError(f"{self.out_dir}: shard {self.shard[0]}/{self.shard[1]} is being done by another "
                                     f"igd batch run ({_pid_text(mine)}); wait for it or stop it")
                _write_pid(mine)
                whole = self._open(WHOLE)
                if not _try_lock(whole, fcntl.LOCK_SH):
                    raise InputError(f"{self.out_dir} is in use by an igd batch run without --shard "
                                     f"({_pid_text(whole)}); wait for it or stop it")
        except BaseException:
            self.release()
            raise
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.release()

    def release(self) -> None:
        for fd in self._fds:
            os.close(fd)  # closing the last descriptor drops the lock
        self._fds.clear()

    def _open(self, name: str) -> int:
        """The lock file ``name`` in OUT_DIR, opened without following a symbolic link;
        InputError for a link or anything but a regular file."""
        path = self.out_dir / name
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o644)
        except OSError as error:
            if error.errno == errno.ELOOP:
                raise InputError(f"{path} is a symbolic link; igd batch keeps its lock in a regular file "
                                 "(remove the link)") from None
            raise InputError(f"cannot open the lock file {path}: {error.strerror}") from None
        self._fds.append(fd)
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise InputError(f"{path} is not a regular file; igd batch keeps its lock there (remove it)")
        return fd

    def _busy_whole(self) -> str:
        """Why a run without --shard cannot have OUT_DIR: the shards or the run holding it."""
        shards = []
        for path in sorted(self.out_dir.glob(".igd-batch.shard-*.lock")):
            try:
                fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
            except OSError:
                continue
            try:
                if stat.S_ISREG(os.fstat(fd).st_mode) and not _try_lock(fd, fcntl.LOCK_SH):
                    shards.append(_pid_text(fd))  # held: a live shard
            finally:
                os.close(fd)
        if shards:
            return (f"{self.out_dir} is in use by igd batch --shard runs ({', '.join(shards)}); "
                    "wait for them or stop them")
        return f"{self.out_dir} is in use by another igd batch run ({_pid_text(self._fds[-1])}); wait for it or stop it"


def _try_lock(fd: int, kind: int) -> bool:
    try:
        fcntl.flock(fd, kind | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _write_pid(fd: int) -> None:
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)


def _pid_text(fd: int) -> str:
    """"pid 1234" from the lock file, or "pid unknown" (it has not written it yet)."""
    text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    return f"pid {text}" if text.isdecimal() else "pid unknown"
