"""Job records: what ``deposium-jobs`` lists and what ``--resume JOB_ID`` restarts from.

Why not the authority on done batches: the sink is (its rows and done-marks commit
together). The record holds what the sink cannot: the command's inputs and options (to
resume by id), state, counts, failed batches with reasons, per-paragraph errors of
committed batches, and a heartbeat. Queue mode keeps it in Redis (workers and operators
share it); local mode keeps it next to the output, with a pointer in the cache directory
so ``deposium-jobs`` finds it.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Protocol

REDIS_PREFIX = "deposium:job:"
REDIS_INDEX = "deposium:jobs"


class JobStore(Protocol):
    def load(self, job_id: str) -> dict[str, Any] | None: ...

    def save(self, record: dict[str, Any]) -> None: ...

    def list(self) -> list[dict[str, Any]]: ...


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


class FileJobStore:
    """Local mode: ``<out>.job.json`` (or ``<cache>/jobs/<id>.json``) + a pointer per job."""

    def __init__(self, cache_dir: Path, record_path: Path | None = None) -> None:
        self.index = Path(cache_dir) / "jobs"
        self.record_path = record_path

    def _path_for(self, job_id: str) -> Path:
        pointer = self.index / f"{job_id}.path"
        if pointer.is_file():
            return Path(pointer.read_text(encoding="utf-8").strip())
        return self.record_path or self.index / f"{job_id}.json"

    def load(self, job_id: str) -> dict[str, Any] | None:
        path = self._path_for(job_id)
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None

    def save(self, record: dict[str, Any]) -> None:
        record["updated"] = time.time()
        path = self.record_path or self.index / f"{record['id']}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_atomic(path, json.dumps(record, sort_keys=True))
        pointer = self.index / f"{record['id']}.path"
        if not pointer.is_file():
            self.index.mkdir(parents=True, exist_ok=True)
            _write_atomic(pointer, str(path.resolve()))

    def list(self) -> list[dict[str, Any]]:
        out = []
        if self.index.is_dir():
            for pointer in sorted(self.index.glob("*.path")):
                record = self.load(pointer.name[: -len(".path")])
                if record is not None:
                    out.append(record)
        return out


class RedisJobStore:
    """Queue mode: one JSON string per job at ``deposium:job:<id>`` plus an index set.

    Writes retry through a Redis restart for up to ``reconnect_timeout_s`` (the record must
    not be what stops a job that the queue itself survives).
    """

    def __init__(self, client: Any, reconnect_timeout_s: float = 120.0) -> None:
        self.client = client
        self.reconnect_timeout_s = reconnect_timeout_s

    def load(self, job_id: str) -> dict[str, Any] | None:
        raw = self.client.get(REDIS_PREFIX + job_id)
        return json.loads(raw) if raw else None

    def save(self, record: dict[str, Any]) -> None:
        from redis.exceptions import ConnectionError as RedisConnectionError
        from redis.exceptions import TimeoutError as RedisTimeoutError

        record["updated"] = time.time()
        give_up = time.monotonic() + self.reconnect_timeout_s
        while True:
            try:
                pipe = self.client.pipeline()
                pipe.set(REDIS_PREFIX + record["id"], json.dumps(record, sort_keys=True))
                pipe.sadd(REDIS_INDEX, record["id"])
                pipe.execute()
                return
            except (RedisConnectionError, RedisTimeoutError):
                if time.monotonic() > give_up:
                    raise
                time.sleep(0.5)

    def list(self) -> list[dict[str, Any]]:
        ids = sorted(i.decode() if isinstance(i, bytes) else i for i in self.client.smembers(REDIS_INDEX))
        records = []
        for job_id in ids:
            record = self.load(job_id)
            if record is not None:
                records.append(record)
        return records

    def forget(self, job_id: str) -> None:
        """Delete the record and what an abandoned run of the job may have left (its set of
        awaited batches, its progress hash, results nobody collected; all would otherwise expire)."""
        from deposium.worker.celery_app import awaited_key, progress_key

        self.client.delete(REDIS_PREFIX + job_id, awaited_key(job_id), progress_key(job_id))
        self.client.srem(REDIS_INDEX, job_id)
        for key in self.client.scan_iter(f"celery-task-meta-{job_id}:*", count=1000):
            self.client.delete(key)
