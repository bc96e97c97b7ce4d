"""One sync per store at a time: a second producer is refused at once, naming the holder.

Why OS-level locks (``flock`` on a lock file, PostgreSQL advisory locks): they die with the
process that holds them, so a sync killed with SIGKILL never leaves a stale lock behind to
block the re-run that resumes it.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from deposium.producer.sinks import SinkError


class FileLock:
    """An exclusive, non-blocking ``flock`` on ``path``; the holder's pid is written into it."""

    def __init__(self, path: Path, what: str) -> None:
        self.path = path
        self.what = what
        self._fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise SinkError(f"{self.what} is being written by another producer (pid {holder}); "
                            "wait for it to finish or stop it") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None
