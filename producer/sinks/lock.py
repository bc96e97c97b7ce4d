"""One producer per output: an exclusive lock file beside a file-based target.

Why ``fcntl.flock`` on a lock file, by hand: the kernel drops the lock when its process
ends, however it ends (``kill -9`` included), so a crashed producer never blocks the resume,
while a second live producer is refused before it reads a paragraph. The lock file also
says who holds it, so the refusal names the running job; the ``filelock`` library takes the
same kind of lock but neither records nor reports its holder.

Shards of one job (``--shard i/N``) hold the output's lock *shared* (so they run side by side
while an unsharded producer is still refused) plus an exclusive lock of their own shard; the
shard that publishes the output takes a third lock, blocking, so publishing happens once.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path

from deposium.producer.shard import pending_message
from deposium.producer.sinks import SinkError, SinkJob


def _holder(fd: int) -> str:
    """Who holds the lock, from what it wrote into the lock file (best effort)."""
    try:
        raw = os.pread(fd, 4096, 0)
        info = json.loads(raw) if raw else {}
    except (OSError, ValueError):
        info = {}
    if not isinstance(info, dict) or not info.get("job_id"):
        return "another producer"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(info.get("since", 0))))
    return f"job {info['job_id']} (pid {info.get('pid')} on {info.get('host')}, since {since})"


class OutputLock:
    """``acquire`` or raise :class:`SinkError` naming the holder; ``release`` removes the file."""

    def __init__(self, path: Path, what: str) -> None:
        self.path = Path(path)
        self.what = what
        self._fd: int | None = None
        self._shared = False

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self, job_id: str, *, shared: bool = False, wait: bool = False) -> None:
        """Take the lock (``shared``: alongside other shared holders; ``wait``: block until free)."""
        if self._fd is not None:
            return
        self._shared = shared
        mode = (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | (0 if wait else fcntl.LOCK_NB)
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except OSError as exc:
                raise SinkError(f"{self.what}: cannot create the lock file {self.path}: {exc.strerror}") from None
            try:
                fcntl.flock(fd, mode)
            except BlockingIOError:
                holder = _holder(fd)
                os.close(fd)
                raise SinkError(f"{self.what} is being written by {holder}; wait for it to end, or stop "
                                "it, then re-run this command to resume") from None
            # A holder that just finished unlinks the file before it unlocks: the inode locked here
            # may be one nobody else will ever look at. Lock the file at the path, or try again.
            try:
                current = os.stat(self.path)
                mine = os.fstat(fd)
                same = (current.st_dev, current.st_ino) == (mine.st_dev, mine.st_ino)
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        info = {"job_id": job_id, "pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
        raw = json.dumps(info).encode()
        if shared:  # several holders: each rewrites it whole, never truncating under another
            os.pwrite(fd, raw.ljust(4096), 0)
        else:
            os.ftruncate(fd, 0)
            os.pwrite(fd, raw, 0)
        self._fd = fd

    def release(self) -> None:
        """Remove the lock file while still holding it (see :meth:`acquire`), then unlock.

        A shared holder removes it only when it is the last holder (it can take it exclusively).
        """
        if self._fd is None:
            return
        try:
            last = True
            if self._shared:
                try:
                    fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    last = False
            if last:
                self.path.unlink(missing_ok=True)
        finally:
            os.close(self._fd)
            self._fd = None



def sibling_lock(lock: OutputLock, suffix: str, what: str) -> OutputLock:
    """Another lock file beside ``lock`` (``.NAME.lock`` -> ``.NAME.<suffix>.lock``): a shard's own
    lock, or the lock under which shards open and publish a shared output one at a time."""
    return OutputLock(lock.path.with_name(f"{lock.path.name.removesuffix('.lock')}.{suffix}.lock"), what)


class OutputLocks:
    """Every lock a file-based output (a Parquet file, a LanceDB table) takes for one producer
    or one shard of a job: the output's lock (shared by a job's shards), the shard's own lock,
    and the publish lock under which shards open the output and publish it one at a time."""

    def __init__(self, path: Path, what: str) -> None:
        self.output = OutputLock(path, what)
        self.what = what
        self.shard: OutputLock | None = None

    def acquire(self, job: SinkJob, open_output: Callable[[], None]) -> None:
        """Take this producer's locks, then run ``open_output`` (a shard: under the publish
        lock, never while another shard opens or publishes); every lock is let go on failure."""
        if job.shards > 1:
            self.shard = sibling_lock(self.output, f"shard-{job.shard}-of-{job.shards}",
                                      f"{self.what} shard {job.shard}/{job.shards}")
            self.shard.acquire(job.job_id)
        try:
            self.output.acquire(job.job_id, shared=job.shards > 1)
            if job.shards > 1:
                publish = self.publish()
                publish.acquire(job.job_id, wait=True)
                try:
                    open_output()
                finally:
                    publish.release()
            else:
                open_output()
        except BaseException:
            self.release()
            raise

    def publish(self) -> OutputLock:
        return sibling_lock(self.output, "publish", f"{self.what} publishing")

    def close(self, job: SinkJob | None, complete: bool, *, close_shard: Callable[[bool], None],
              close: Callable[[bool], None]) -> None:
        """Publish (``close``), or for a shard mark it finished (``close_shard``, see
        :func:`finish_shard`), then let every lock go."""
        try:
            (close_shard if job is not None and job.shards > 1 else close)(complete)
        finally:
            self.release()

    def release(self) -> None:
        self.output.release()
        if self.shard is not None:
            self.shard.release()


def finish_shard(job_id: str, shard: int, shards: int, complete: bool, *, target: str,
                 marker: Callable[[int], Path], publish: OutputLock, publish_output: Callable[[bool], None],
                 still_unpublished: Callable[[], bool] = lambda: True) -> None:
    """Mark this shard finished; the shard that then finds every shard's mark publishes the output.

    Why under ``publish`` (taken waiting): two shards finishing together must not both publish,
    and one finishing while another publishes must see the output as published.
    """
    path = marker(shard)
    path.parent.mkdir(exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"complete": complete}), encoding="utf-8")
    os.replace(tmp, path)
    publish.acquire(job_id, wait=True)
    try:
        if not still_unpublished():
            return
        states = {}
        for i in range(shards):
            try:
                states[i] = bool(json.loads(marker(i).read_text(encoding="utf-8"))["complete"])
            except (OSError, ValueError, KeyError, TypeError):
                pass
        missing = [i for i in range(shards) if i not in states]
        if missing:
            print(pending_message(target, missing, shards), file=sys.stderr, flush=True)
            return
        publish_output(all(states.values()))
    finally:
        publish.release()
