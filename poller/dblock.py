"""One writer per SQLite database: an flock on ``<db>.lock`` that dies with the process holding it.

SQLite's own locks are POSIX record locks on the database file, per transaction; they keep two
writers from interleaving one transaction but not from each recording the same change. The lock
here is held for the writer's whole life. It is an ``flock`` on a sidecar file, never on the
database itself: POSIX locks on the same file would be dropped by SQLite closing any descriptor.
Readers (``status``, ``history``) do not take it.
"""

from __future__ import annotations

import errno
import fcntl
import os
import time
from pathlib import Path

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError


class DatabaseInUse(Exception):
    """Another process holds the database's writer lock (``holder``: the command its lock file names,
    ``contended``: the lock is held, rather than unusable); the message names it."""

    def __init__(self, message: str, holder: str = "", *, contended: bool = False) -> None:
        super().__init__(message)
        self.holder = holder
        self.contended = contended


class WriterLock:
    """The held lock; ``release()`` (or the process ending, even by SIGKILL) frees it."""

    def __init__(self, path: Path, fd: int, command: str = "") -> None:
        self.path = path
        self._fd: int | None = fd
        self._command = command

    def intact(self) -> bool:
        """Whether the lock file at ``path`` is still the one held: removed or replaced (an operator
        clearing a "stale" lock), the next writer would lock a new file and write beside this one."""
        return self._fd is None or _same_file(self._fd, self.path)

    def renew(self) -> bool:
        """Lock the file now at ``path`` (created anew if need be) beside the one held; False if that
        cannot be done here (its directory is gone); raise DatabaseInUse if another process holds it."""
        fresh = acquire_writer_lock_at(self.path, self._command)
        if fresh is None or fresh._fd is None:
            return False
        if self._fd is not None:
            os.close(self._fd)
        self._fd, fresh._fd = fresh._fd, None
        return True

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the only descriptor drops the flock
            self._fd = None


def lock_path(url: str) -> Path | None:
    """The sidecar lock file of a SQLite database URL; None for other databases and in-memory SQLite."""
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):
        return None
    if parsed.get_backend_name() != "sqlite" or not parsed.database or parsed.database == ":memory:":
        return None
    database = Path(parsed.database)
    if database.is_symlink():
        # The same file under another name must take the same lock (SQLite follows the link too).
        database = database.resolve()
    return database.with_name(database.name + ".lock")


def acquire_writer_lock(url: str, command: str, wait: float = 0.0) -> WriterLock | None:
    """Take the exclusive writer lock of a SQLite database, or raise DatabaseInUse naming the holder;
    ``wait``: seconds to keep trying while another holds it (a short chore such as a migration)."""
    path = lock_path(url)
    if path is None:
        return None
    deadline = time.monotonic() + wait
    while True:
        try:
            return acquire_writer_lock_at(path, command)
        except DatabaseInUse as exc:
            # Only behind a chore that ends (an upgrade, a `once`): a daemon does not end soon, and an
            # unusable lock file does not mend by waiting.
            if time.monotonic() >= deadline or not exc.contended or exc.holder.startswith("poller run"):
                raise
        time.sleep(0.05)


def _same_file(fd: int, path: Path) -> bool:
    try:
        now = os.stat(path)
    except OSError:
        return False
    held = os.fstat(fd)
    return (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino)


def acquire_writer_lock_at(path: Path, command: str) -> WriterLock | None:
    """The writer lock on the lock file ``path``; None where there can be none (see acquire_writer_lock)."""
    for _ in range(3):  # the file removed between open and flock: the lock went to a dead name
        lock = _lock_once(path, command)
        if lock is None or lock.intact():
            return lock
        lock.release()
    raise DatabaseInUse(f"the lock file {path} keeps being removed or replaced: is something deleting it?")


def _lock_once(path: Path, command: str) -> WriterLock | None:
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        writable = True
    except OSError as exc:
        if not isinstance(exc, PermissionError) and exc.errno != errno.EROFS:
            if isinstance(exc, FileNotFoundError):
                return None  # the directory is missing: opening the database will say so
            raise DatabaseInUse(f"cannot open the lock file {path} ({exc.strerror}): check its permissions") from None
        # Someone else's lock file, or a read-only filesystem: a read-only descriptor can still hold an flock.
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None  # a directory this user cannot write: opening the database will say so
        except OSError as exc:
            raise DatabaseInUse(f"cannot open the lock file {path} ({exc.strerror}): check its permissions") from None
        writable = False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        holding, holder = _read_holder(fd)
        os.close(fd)
        if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise DatabaseInUse(f"cannot lock {path} ({exc.strerror})") from None
        database = str(path)[: -len(".lock")]
        raise DatabaseInUse(
            f"database {database} is in use by {holder}: one process at a time may write it. Stop that "
            "process first (the daemon already polls every watch), or point [database] url elsewhere; "
            "`poller status` and `poller history` read it meanwhile. The lock is never stale (it ends with "
            "its process): do not delete the lock file.",
            holding,
            contended=True,
        ) from None
    if writable:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {command}\n".encode(), 0)
    return WriterLock(path, fd, command)


def _read_holder(fd: int) -> tuple[str, str]:
    """The holder's command ('poller run') and 'poller run (pid 1234)' from the lock file, or a plain
    description if it holds nothing readable."""
    try:
        text = os.pread(fd, 200, 0).decode("utf-8", "replace").strip()
    except OSError:
        text = ""
    pid, _, command = text.partition(" ")
    if pid.isdigit():
        return command, f"{command or 'another process'} (pid {pid})"
    return "", "another poller process"
