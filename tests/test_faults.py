"""Faults that really happen to unattended jobs, with real processes: a worker process or a whole
worker killed mid-batch, Redis restarted mid-job, Redis down at start, poison batches.

Why: the system promises at-least-once processing with exactly-once output. Each test runs a
real ``deposium-submit`` job against a test-owned redis-server (append-only file) and real
prefork workers, injects one fault, and then checks the output row by row: every paragraph
present exactly once, nothing else. Faults are made deterministic with the test-only
``DEPOSIUM_TEST_FAULT`` hook (worker/config.py): the worker logs which process holds a marked
batch, so "mid-batch" is an observed fact, not a timing guess.

Covered elsewhere (not repeated here): producer kill -9 and resume (test_producer_queue.py,
test_producer_local.py), producer with Redis down at start (test_producer_local.py), corrupt or
wrong-format artifacts refused (test_worker_e2e.py, test_embedder.py), batches failing on every
attempt for a non-crash reason (test_producer_queue.py).
"""

from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.procs import (
    VENV_BIN,
    Worker,
    clean_env,
    exactly_once,
    producer_env,
    received_task_ids,
    submit_cmd,
    wait_for,
    write_jsonl,
)
from tests.redis_proc import free_port
from tests.test_producer_support import corpus

pytestmark = pytest.mark.slow

#: Short time limits so redelivery after a lost worker happens within the test (production:
#: 3600/600/900). Visibility > hard limit > soft limit, as load_settings requires.
#: Normal batches here take well under a second (the first one per process loads the model).
TIMING = {"DEPOSIUM_VISIBILITY_TIMEOUT": "15", "DEPOSIUM_TASK_SOFT_TIME_LIMIT": "8",
          "DEPOSIUM_TASK_TIME_LIMIT": "10", "DEPOSIUM_MAX_BATCH_RETRIES": "2"}
MARK = "ZQXMARKER"


def _texts(n: int, marked: tuple[int, ...] = ()) -> list[str]:
    texts = corpus(n)
    for i in marked:
        texts[i] = f"{texts[i]} {MARK}"
    return texts


def _start_job(tmp_path: Path, texts: list[str], env: dict[str, str], out: str = "out.parquet"):
    write_jsonl(tmp_path / "in.jsonl", texts)
    args = ["in.jsonl", "--out", out, "--batch-tokens", "300", "--max-in-flight", "4", "--no-progress", "--json"]
    return subprocess.Popen(submit_cmd(*args), env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen, timeout: float = 600) -> tuple[int, dict, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, (json.loads(out) if out.strip() else {}), err


def _expected(texts: list[str]) -> set[str]:
    return {f"p{i:06d}#0" for i in range(len(texts))}


def test_killed_worker_process_and_killed_worker_lose_nothing(tmp_path: Path, redis_server, minilm_artifact):
    """kill -9 one prefork child mid-batch, then kill -9 the whole worker (parent and children)
    mid-batch and start another: both batches are redelivered, the job completes exactly once."""
    texts = _texts(240, marked=(40, 200))
    fault = {"DEPOSIUM_TEST_FAULT": f"sleep=3:{MARK}", **TIMING}
    first = Worker(redis_server.url, minilm_artifact, tmp_path / "w1.log", name="w1", **fault).start()
    second = Worker(redis_server.url, minilm_artifact, tmp_path / "w2.log", name="w2", **fault)
    try:
        job = _start_job(tmp_path, texts, producer_env(tmp_path, minilm_artifact, redis_server.url, **TIMING))
        # 1. a child holding the first marked batch: kill exactly that process
        task_a, pid_a = wait_for(lambda: first.fault_pids("sleep=3")[:1], "a marked batch", alive=job)[0]
        children_before = {c.pid for c in first.children()}
        assert pid_a in children_before
        os.kill(pid_a, signal.SIGKILL)
        # the pool replaces the child and the same batch is delivered again (retried by the worker)
        wait_for(lambda: sum(t == task_a for t, _ in first.fault_pids("sleep=3")) >= 2,
                 f"{task_a} redelivered", alive=job)
        assert len(first.children()) == 2 and pid_a not in {c.pid for c in first.children()}
        # 2. another marked batch (not the first one) in progress: kill the whole worker
        task_b, _ = wait_for(lambda: [h for h in first.fault_pids("sleep=3") if h[0] != task_a][:1],
                             "the second marked batch", alive=job)[0]
        first.kill_all()
        assert task_b.split(":")[1] not in _committed(tmp_path / "out.parquet.parts")  # it was mid-batch
        second.start()
        rc, summary, err = _finish(job)
    finally:
        first.stop()
        second.stop()
    assert rc == 0, err
    found, dups, missing = exactly_once(tmp_path / "out.parquet", _expected(texts))
    assert (found, dups, missing) == (len(texts), 0, set())
    assert summary["batches_failed"] == 0 and summary["failed_paragraphs"] == 0
    deliveries = collections.Counter(received_task_ids(first.log) + received_task_ids(second.log))
    assert deliveries[task_a] >= 2 and deliveries[task_b] >= 2
    assert set(deliveries) == {f"{summary['job_id']}:b{i:07d}" for i in range(summary["batches"])}
    assert task_b in received_task_ids(second.log), "the batch lost with the whole worker came back"


def _committed(parts: Path) -> set[str]:
    return {p.name.split(".")[0] for p in parts.glob("b*.parquet")}


#: kombu 5.7.0 sometimes dies in its reconnect path after a broker outage ("Unrecoverable error:
#: AttributeError ... 'hostname'", upstream bug); the worker then exits 1 and its supervisor
#: (compose ``restart: unless-stopped``, Railway ``ON_FAILURE``) starts it again.
KOMBU_RECONNECT_BUG = "Unrecoverable error: AttributeError"


def test_redis_restart_mid_job_producer_and_worker_reconnect(tmp_path: Path, redis_server, minilm_artifact):
    """Stop Redis mid-job (its append-only file keeps queue, unacked batches and the job
    record) and start it again: the running producer and worker reconnect by themselves. The
    test plays the supervisor only for kombu's known reconnect crash, and says so."""
    texts = _texts(300)
    worker = Worker(redis_server.url, minilm_artifact, tmp_path / "w.log", **TIMING).start()
    restarted = None
    try:
        parent = worker.proc.pid
        job = _start_job(tmp_path, texts, producer_env(tmp_path, minilm_artifact, redis_server.url, **TIMING))
        parts = tmp_path / "out.parquet.parts"
        wait_for(lambda: len(_committed(parts)) >= 3, "3 committed batches", alive=job)
        redis_server.stop()
        # both sides noticed the outage before Redis comes back
        wait_for(lambda: "Cannot connect to redis" in worker.text() or "Connection to broker lost" in
                 worker.text(), "the worker to notice the outage", alive=worker.proc)
        assert job.poll() is None, "the producer must wait for Redis, not exit"
        redis_server.start()
        while job.poll() is None:
            if restarted is None and worker.proc.poll() is not None:
                assert worker.proc.returncode == 1 and KOMBU_RECONNECT_BUG in worker.text(), worker.text()[-3000:]
                restarted = Worker(redis_server.url, minilm_artifact, tmp_path / "w2.log", name="w2",
                                   **TIMING).start()
            time.sleep(0.2)
        rc, summary, err = _finish(job)
        if restarted is None:
            assert worker.proc.poll() is None and worker.proc.pid == parent, "the worker must survive the restart"
    finally:
        worker.stop()
        if restarted is not None:
            restarted.stop()
    assert rc == 0, err
    found, dups, missing = exactly_once(tmp_path / "out.parquet", _expected(texts))
    assert (found, dups, missing) == (len(texts), 0, set())
    record = json.loads(redis_server.client().get(f"deposium:job:{summary['job_id']}"))
    assert record["state"] == "done" and record["counts"]["written"] == len(texts)
    assert summary["batches_failed"] == 0


def test_worker_with_redis_down_at_start_fails_within_its_configured_retry(tmp_path: Path, minilm_artifact):
    """No Redis at start: the worker retries for DEPOSIUM_REDIS_CONNECT_TIMEOUT seconds, logging
    each attempt with the password masked, then exits with one clear line (not Celery's 100
    retries with back-off, which would leave a deployment hanging for minutes)."""
    url = f"redis://:hunter2-pw@127.0.0.1:{free_port()}/0"
    env = clean_env(REDIS_URL=url, DEPOSIUM_ARTIFACT=str(minilm_artifact), DEPOSIUM_REDIS_CONNECT_TIMEOUT="3")
    r = subprocess.run([sys.executable, "-m", "deposium.worker.cli", "--concurrency", "1"], env=env,
                       capture_output=True, text=True, timeout=120)
    output = r.stdout + r.stderr
    assert r.returncode == 4, output
    assert "cannot reach Redis at redis://:***@127.0.0.1" in r.stderr
    assert "retrying" in output  # the bounded retry is logged
    assert "hunter2-pw" not in output and "Traceback" not in output and " ready." not in output


def test_a_forgotten_abandoned_job_leaves_nothing_and_its_queued_batches_are_not_embedded(
        tmp_path: Path, redis_server, minilm_artifact):
    """A producer killed while its batches wait in the queue (no worker yet), then ``deposium-jobs
    forget``: the record and the set of awaited batches go at once, and when a worker comes it
    acknowledges the abandoned batches without embedding them or storing a result."""
    client = redis_server.client()
    env = producer_env(tmp_path, minilm_artifact, redis_server.url, **TIMING)
    with Worker(redis_server.url, minilm_artifact, tmp_path / "w.log", **TIMING) as worker:
        before = _keyspace(client)  # with the worker's queue bindings
    job = _start_job(tmp_path, _texts(120), env)
    wait_for(lambda: client.llen("deposium") >= 4, "4 queued batches", alive=job)
    job.kill()
    job.communicate()
    (job_key,) = [k.decode() for k in client.scan_iter("deposium:job:*")]
    job_id = job_key.rsplit(":", 1)[1]
    assert client.scard(f"deposium:awaited:{job_id}") == 4
    forget = subprocess.run([str(VENV_BIN / "deposium-jobs"), "forget", job_id], env=env, capture_output=True,
                            text=True, timeout=120)
    assert forget.returncode == 0, forget.stderr
    assert not client.exists(job_key, f"deposium:awaited:{job_id}")
    worker = Worker(redis_server.url, minilm_artifact, tmp_path / "w2.log", name="w2", **TIMING)
    with worker:
        _wait_until_idle(client, worker)
        received = received_task_ids(worker.log)
        skipped = worker.text().count("is no longer awaited")
    assert len(received) == 4 and skipped == 4, worker.text()[-3000:]
    assert "succeeded in" not in worker.text()
    left = {k: v for k, v in _keyspace(client).items() if k not in before}
    assert not left, f"left in Redis by the forgotten job: {left}"


def test_worker_exit_code_is_celerys_so_a_supervisor_sees_a_failure(tmp_path: Path, redis_server, minilm_artifact):
    """``deposium-worker`` exits 0 after SIGTERM (a redeploy) but 1, like ``celery worker``, after an
    unrecoverable error; it used to return 0 for both, so "restart on failure" never restarted it.
    The error here is real: the queue's Redis key holds a string (another application's key)."""
    env = clean_env(REDIS_URL=redis_server.url, DEPOSIUM_ARTIFACT=str(minilm_artifact))
    cmd = [sys.executable, "-m", "deposium.worker.cli", "--concurrency", "1"]
    log = tmp_path / "ok.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    worker = Worker(redis_server.url, minilm_artifact, log)
    worker.proc = proc
    try:
        worker.wait_ready()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0, worker.text()[-3000:]
    finally:
        worker.stop()
    redis_server.client().delete("deposium")
    redis_server.client().set("deposium", "not a queue")
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert "Unrecoverable error" in r.stderr, r.stderr[-3000:]
    assert r.returncode == 1, r.stderr[-3000:]


def _poison_job(tmp_path: Path, redis_server, artifact: Path, action: str, **timing: str):
    texts = _texts(160, marked=(80,))
    env = dict(TIMING, **timing)
    with Worker(redis_server.url, artifact, tmp_path / "w.log", DEPOSIUM_TEST_FAULT=f"{action}:{MARK}",
                **env) as worker:
        job = _start_job(tmp_path, texts, producer_env(tmp_path, artifact, redis_server.url, **env))
        rc, summary, err = _finish(job)
        # the pool is healthy afterwards: the parent is alive with its two children
        assert worker.proc.poll() is None and len(worker.children()) == 2
        hits = collections.Counter(t for t, _ in worker.fault_pids(action))
        deliveries = collections.Counter(received_task_ids(worker.log))
    assert rc == 1, err  # finished, with a failure recorded
    assert summary["batches_failed"] == 1 and len(hits) == 1
    (bad_task,) = hits
    bad_batch = bad_task.split(":")[1]
    table = pq.read_table(tmp_path / "out.parquet")
    ids = table.column("id").to_pylist()
    errors = [json.loads(line) for line in (tmp_path / "out.parquet.errors.jsonl").read_text().splitlines()]
    failed_ids = {e["id"] for e in errors}
    assert {e["batch"] for e in errors} == {bad_batch} and f"p{80:06d}#0" in failed_ids
    # the rest of the job: every other paragraph exactly once
    assert len(ids) == len(set(ids)) and set(ids) == _expected(texts) - failed_ids
    assert summary["failed_paragraphs"] == len(failed_ids)
    return hits[bad_task], deliveries[bad_task], summary["failed_batches"][bad_batch], errors[0]["reason"]


def test_poison_batch_that_kills_its_worker_process_is_failed_after_bounded_retries(
        tmp_path: Path, redis_server, minilm_artifact):
    """A batch that SIGKILLs whichever process runs it must not be redelivered forever
    (acks_late + reject_on_worker_lost alone would requeue it endlessly): 1 + DEPOSIUM_MAX_BATCH_RETRIES
    deliveries, then it is recorded as failed with the reason and the job finishes."""
    crashes, deliveries, reason, logged = _poison_job(tmp_path, redis_server, minilm_artifact, "crash")
    assert crashes == deliveries == 3, (crashes, deliveries)
    assert "WorkerLostError" in reason and "after 1 attempt(s)" in logged, (reason, logged)


def test_poison_batch_that_hangs_is_failed_after_bounded_retries(tmp_path: Path, redis_server, minilm_artifact):
    """A batch that never returns hits the soft time limit each time: retried by the producer
    DEPOSIUM_MAX_BATCH_RETRIES times, then recorded as failed; the worker process survives."""
    hangs, deliveries, reason, logged = _poison_job(tmp_path, redis_server, minilm_artifact, "hang")
    assert hangs == deliveries == 3, (hangs, deliveries)
    assert "SoftTimeLimitExceeded" in reason and "after 3 attempt(s)" in logged, (reason, logged)


#: Keys a finished job keeps on purpose: its record (``deposium-jobs``, ``--resume``) and the index of
#: records. Everything else a job creates (results, queued and unacknowledged messages, the set of
#: batches still awaited) must be gone once the job and every delivery of its batches are over.
def _kept(job_ids: set[str]) -> set[str]:
    return {"deposium:jobs", *(f"deposium:job:{j}" for j in job_ids)}


def _keyspace(client) -> dict[str, str]:
    """Every key with its type, TTL and size (what a failure message shows)."""
    return {k.decode(): f"{client.type(k).decode()}, ttl {client.ttl(k)}s, {client.memory_usage(k)} bytes"
            for k in client.scan_iter(count=1000)}


def _finished(line: str) -> bool:
    return " succeeded in " in line or line.rstrip().endswith(" ignored") or " raised " in line


def _wait_until_idle(client, worker: Worker) -> None:
    """Until every delivery the worker received has finished and nothing is queued or unacknowledged
    (a late duplicate of a batch may still run after the producer exited: that is the case to see)."""
    def idle() -> bool:
        lines = worker.text().splitlines()
        received = sum(" received" in line and "deposium.embed_batch[" in line for line in lines)
        done = sum("deposium.embed_batch[" in line and _finished(line) for line in lines)
        return received == done and not client.exists("deposium", "unacked", "unacked_index")
    wait_for(idle, "the worker to finish every delivery", alive=worker.proc)


def test_nothing_of_a_job_stays_in_redis_after_it_even_after_a_producer_kill_and_resume(
        tmp_path: Path, redis_server, minilm_artifact):
    """Redis returns to its pre-job keys (plus the job records, kept on purpose) after a job, and
    also after a job whose producer was killed with batches in flight and then resumed: the
    killed run's messages are still queued or running, so batches are delivered twice, and a
    copy that finishes after the producer consumed the batch must not leave its result behind
    (it did: one ``celery-task-meta-*`` key of ~50 KB per such batch, for DEPOSIUM_RESULT_EXPIRES)."""
    # A slow batch near the end keeps the killed run's producer alive until the kill: on a fast CPU the
    # whole job once finished between two polls for its third committed batch (seen on a Zen 5).
    texts = _texts(240, marked=(220,))
    client = redis_server.client()
    with Worker(redis_server.url, minilm_artifact, tmp_path / "w.log", DEPOSIUM_TEST_FAULT=f"sleep=3:{MARK}",
                **TIMING) as worker:
        before = _keyspace(client)
        env = producer_env(tmp_path, minilm_artifact, redis_server.url, **TIMING)
        rc, plain, err = _finish(_start_job(tmp_path, texts[:60], env, out="plain.parquet"))
        assert rc == 0, err
        _wait_until_idle(client, worker)
        left = {k: v for k, v in _keyspace(client).items() if k not in before and k not in _kept({plain["job_id"]})}
        assert not left, f"left in Redis after a plain job: {left}"
        forget = subprocess.run([str(VENV_BIN / "deposium-jobs"), "forget", plain["job_id"]], env=env,
                                capture_output=True, text=True, timeout=120)
        assert forget.returncode == 0, forget.stderr
        assert set(_keyspace(client)) == set(before), "deposium-jobs forget leaves the record or the index"

        job = _start_job(tmp_path, texts, env, out="k.parquet")
        wait_for(lambda: len(_committed(tmp_path / "k.parquet.parts")) >= 3, "3 committed batches", alive=job)
        job.kill()
        job.communicate()
        rc, summary, err = _finish(_start_job(tmp_path, texts, env, out="k.parquet"))
        assert rc == 0, err
        _wait_until_idle(client, worker)
        deliveries = collections.Counter(received_task_ids(worker.log))
        twice = sorted(t for t, n in deliveries.items() if n > 1 and t.startswith(summary["job_id"]))
        assert twice, "no batch was delivered twice: the kill left nothing in flight, the test proves nothing"
        after = _keyspace(client)
    left = {k: v for k, v in after.items() if k not in before and k not in _kept({summary["job_id"]})}
    assert not left, f"left in Redis after the resumed job (batches delivered twice: {twice}): {left}"
    found, dups, missing = exactly_once(tmp_path / "k.parquet", _expected(texts))
    assert (found, dups, missing) == (len(texts), 0, set())
    record = json.loads(client.get(f"deposium:job:{summary['job_id']}"))
    assert record["state"] == "done"


def test_fault_hook_is_off_by_default_and_validated():
    """The hook is test-only: empty unless set, and a typo is a configuration error, not a no-op."""
    from deposium.worker.config import ConfigError, load_settings

    assert load_settings({}).test_fault == ""
    assert load_settings({"DEPOSIUM_TEST_FAULT": "sleep=1.5:x"}).test_fault == "sleep=1.5:x"
    with pytest.raises(ConfigError, match="DEPOSIUM_TEST_FAULT"):
        load_settings({"DEPOSIUM_TEST_FAULT": "explode:x"})

