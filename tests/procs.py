"""Subprocess helpers shared by the fault, security, property and soak tests.

Why a module of its own: those tests kill, restart and inspect real worker and producer
processes, and every one of them needs the same few things done the same way: a worker in its
own process group (so "kill the whole worker" means parent *and* prefork children), an
environment holding only what the test decides (no DEPOSIUM_* leaking from a developer's
shell), the worker log as a witness of deliveries, and an exactly-once check of the output.
No tests here.
"""

from __future__ import annotations

import collections
import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pyarrow.parquet as pq

from tests.test_producer_support import ROOT, VENV_BIN, received_task_ids, submit_cmd, write_jsonl

__all__ = ["ROOT", "VENV_BIN", "Worker", "clean_env", "exactly_once", "received_task_ids", "submit_cmd",
           "wait_for", "write_jsonl"]

#: Upper bounds that only stop a hung test; nothing asserts a duration.
READY_TIMEOUT_S = 180.0


def clean_env(**extra: str) -> dict[str, str]:
    """The caller's environment minus any DEPOSIUM_* / REDIS_URL / PROMETHEUS_* / FLOWER_*, plus ``extra``."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("DEPOSIUM_", "PROMETHEUS_", "FLOWER_")) and k != "REDIS_URL"}
    env.update(extra)
    return env


def wait_for(predicate, what: str, timeout: float = 300.0, interval: float = 0.1, alive=None):
    """Poll ``predicate`` until it returns something truthy; fail (naming ``what``) if ``alive``
    (a Popen) exits first or ``timeout`` passes. Returns the predicate's value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if alive is not None and alive.poll() is not None:
            raise AssertionError(f"process exited with {alive.returncode} while waiting for {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


class Worker:
    """One ``celery -A deposium.worker.celery_app worker`` (prefork) in its own session/process group."""

    def __init__(self, redis_url: str, artifact: Path, log: Path, *, concurrency: int = 2, name: str = "w1",
                 queue: str = "deposium", **env: str) -> None:
        self.log = log
        self.name = name
        self.env = clean_env(REDIS_URL=redis_url, DEPOSIUM_ARTIFACT=str(artifact), DEPOSIUM_QUEUE=queue, **env)
        self.args = [str(VENV_BIN / "celery"), "-A", "deposium.worker.celery_app", "worker", "--pool", "prefork",
                     "--concurrency", str(concurrency), "-Q", queue, "--loglevel", "INFO", "-n", f"{name}@%h",
                     "--without-gossip", "--without-mingle", "--without-heartbeat", "--logfile", str(log)]
        self.proc: subprocess.Popen | None = None

    def start(self, wait: bool = True) -> Worker:
        self.proc = subprocess.Popen(self.args, env=self.env, cwd=ROOT, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, start_new_session=True)
        if wait:
            self.wait_ready()
        return self

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.is_file() else ""

    def wait_ready(self) -> None:
        start = self.text().count(" ready.")
        wait_for(lambda: self.text().count(" ready.") > start, f"worker {self.name} ready", READY_TIMEOUT_S,
                 interval=0.2, alive=self.proc)

    def process(self) -> psutil.Process:
        assert self.proc is not None
        return psutil.Process(self.proc.pid)

    def children(self) -> list[psutil.Process]:
        return self.process().children()

    def kill_all(self) -> None:
        """SIGKILL the parent and every child at once (an OOM-killed or evicted container)."""
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # stragglers (orphaned children)
        except ProcessLookupError:
            pass
        self.proc.wait()

    def __enter__(self) -> Worker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

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
