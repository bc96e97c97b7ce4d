"""Subprocess helpers shared by the fault, security, property and soak tests.

The worker, the clean environment and the polling live in :mod:`deposium.bench.procs` (the bench
starts the same processes); this module adds what only tests need: the producer's command and
environment, and an exactly-once check of the output. No tests here.
"""

from __future__ import annotations

import collections
import json
import re
import subprocess
from pathlib import Path

import pyarrow.parquet as pq

from deposium.bench import procs
from deposium.bench.procs import READY_TIMEOUT_S, clean_env, wait_for
from tests.test_producer_support import ROOT, VENV_BIN, received_task_ids, submit_cmd, write_jsonl

__all__ = ["READY_TIMEOUT_S", "ROOT", "VENV_BIN", "Worker", "clean_env", "exactly_once", "received_task_ids",
           "submit_cmd", "wait_for", "write_jsonl"]


class Worker(procs.Worker):
    """:class:`deposium.bench.procs.Worker` that also reads the ``DEPOSIUM_TEST_FAULT`` hits it logged."""

    def fault_pids(self, kind: str) -> list[tuple[str, int]]:
        """(task id, pid) of every ``DEPOSIUM_TEST_FAULT`` hit the worker logged."""
        pattern = re.compile(rf"test fault {kind} in batch (\S+), process (\d+)")
        return [(t, int(p)) for t, p in pattern.findall(self.text())]


def producer_env(tmp_path: Path, artifact: Path, redis_url: str | None, **extra: str) -> dict[str, str]:
    env = clean_env(DEPOSIUM_ARTIFACT=str(artifact), DEPOSIUM_CACHE_DIR=str(tmp_path / "cache"), **extra)
    if redis_url:
        env["REDIS_URL"] = redis_url
    return env


def run_submit(args: list[str], env: dict[str, str], cwd: Path, timeout: float = 900) -> tuple[int, dict, str]:
    """Run ``deposium-submit ... --json``; returns (exit code, summary or {}, stderr)."""
    r = subprocess.run(submit_cmd(*args, "--no-progress", "--json"), env=env, cwd=cwd, capture_output=True,
                       text=True, timeout=timeout)
    try:
        summary = json.loads(r.stdout) if r.stdout.strip() else {}
    except ValueError:
        summary = {}
    return r.returncode, summary, r.stderr


def exactly_once(path: Path, expected_ids: set[str]) -> tuple[int, int, set[str]]:
    """(rows found, duplicated ids, expected ids missing) of a Parquet output."""
    ids = pq.read_table(path, columns=["id"]).column("id").to_pylist()
    dups = sum(n - 1 for n in collections.Counter(ids).values() if n > 1)
    return len(ids), dups, expected_ids - set(ids)
