"""The Prometheus exporter (worker/metrics.py) against a real prefork worker and real batches.

Why a real worker subprocess: the property that matters is that numbers counted in *forked
children* reach the replica's single endpoint. An in-process test would pass with a plain
registry that is blind to prefork children; here every batch runs in a fresh child
(``--max-tasks-per-child 1``), so the scrape is right only if multiprocess aggregation works,
including for children that have already exited.

The helpers here (worker subprocess, batch sending) are also used by test_flower.py.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from deposium.worker.wire import TASK_NAME, EmbedRequest
from tests.redis_proc import RedisServer, free_port

pytestmark = pytest.mark.slow

#: Generous upper bounds for a loaded 2-core box; they only bound a hang, never assert speed.
START_TIMEOUT_S = 180.0
RESULT_TIMEOUT_S = 300.0


def worker_env(redis_url: str, artifact: Path, queue: str, **extra: str) -> dict[str, str]:
    """Environment of a worker subprocess: only what the test decides (no inherited DEPOSIUM_*,
    no PROMETHEUS_MULTIPROC_DIR from the caller's shell)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DEPOSIUM_", "PROMETHEUS_", "FLOWER_"))}
    env.update(
        REDIS_URL=redis_url,
        DEPOSIUM_ARTIFACT=str(artifact),
        DEPOSIUM_QUEUE=queue,
        DEPOSIUM_LOG_LEVEL="INFO",
        DEPOSIUM_REDIS_CONNECT_TIMEOUT="5",
    )
    env.update(extra)
    return env


@contextmanager
def worker_process(env: dict[str, str], node: str, log: Path, *args: str) -> Iterator[subprocess.Popen]:
    """Run ``deposium-worker`` (the console script users run) in its own process group."""
    cmd = [sys.executable, "-m", "deposium.worker.cli", f"--hostname={node}", *args]
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)  # warm shutdown of the parent and its children
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        else:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # orphaned children, if any
            except ProcessLookupError:
                pass


def client_app(redis_url: str, queue: str):
    """A producer-side Celery app bound to the test's Redis and queue."""
    from deposium.worker.celery_app import create_app
    from deposium.worker.config import load_settings

    return create_app(load_settings({"REDIS_URL": redis_url, "DEPOSIUM_QUEUE": queue}))


def wait_until(predicate, what: str, proc: subprocess.Popen | None = None, log: Path | None = None,
               timeout: float = START_TIMEOUT_S):
    """Poll ``predicate`` until it returns a truthy value; fail with the worker log otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"process exited ({proc.returncode}) while waiting for {what}:\n{_tail(log)}")
        if time.monotonic() > deadline:
            pytest.fail(f"gave up waiting for {what}:\n{_tail(log)}")
        time.sleep(0.25)


def _tail(log: Path | None) -> str:
    if log is None or not log.exists():
        return ""
    return log.read_text(errors="replace")[-4000:]


def http_get(url: str, auth: tuple[str, str] | None = None) -> tuple[int, bytes]:
    """GET without raising on HTTP errors; (status, body), status 0 if nothing answers."""
    request = urllib.request.Request(url)
    if auth is not None:
        import base64

        token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return 0, b""


def send_batches(app, job_id: str, batches: list[list[object]]) -> list[dict]:
    """Send each paragraph list as one batch of job ``job_id``; return the results in order."""
    pending = []
    for i, paragraphs in enumerate(batches):
        request = EmbedRequest(job_id=job_id, batch_id=f"b{i:04d}", paragraphs=list(paragraphs))
        pending.append(app.send_task(TASK_NAME, kwargs=request.to_wire(), task_id=request.task_id))
    return [p.get(timeout=RESULT_TIMEOUT_S) for p in pending]


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """All samples of the exporter as {(sample name, sorted labels): value}."""
    status, body = http_get(f"http://127.0.0.1:{port}/metrics")
    assert status == 200, body
    samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


LONG = " ".join(["tokenization"] * 600)  # far beyond MiniLM's 256-token max_seq_length
BATCHES = [
    ["The cat sat on the mat.", "A second, slightly longer paragraph about embeddings."],
    ["", "Whitespace-only and empty paragraphs are refused per paragraph.", "   "],
    [LONG, "short"],
    ["One more batch so that several children contribute."],
]


@pytest.mark.parametrize("given_dir", [True, False], ids=["PROMETHEUS_MULTIPROC_DIR", "default-dir"])
def test_metrics_sum_over_prefork_children(
    redis_server: RedisServer, minilm_artifact: Path, tmp_path: Path, given_dir: bool
):
    """Counts from every (recycled) child reach the one endpoint and equal the batches' results.

    Both ways an operator runs it: with PROMETHEUS_MULTIPROC_DIR (the image sets it) and
    without (the exporter must then create its own directory and still switch to multiprocess
    mode, although prometheus_client was imported without the variable).
    """
    port = free_port()
    queue = f"metrics-{uuid.uuid4().hex[:8]}"
    node = f"metrics-{uuid.uuid4().hex[:6]}@testhost"
    extra = {"DEPOSIUM_METRICS_PORT": str(port)}
    if given_dir:
        metrics_dir = tmp_path / "prom"
        metrics_dir.mkdir()
        (metrics_dir / "counter_999999.db").write_bytes(b"stale file of a previous run")
        extra["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
    env = worker_env(redis_server.url, minilm_artifact, queue, **extra)
    log = tmp_path / "worker.log"
    with worker_process(env, node, log, "--concurrency=2", "--max-tasks-per-child=1") as proc:
        wait_until(lambda: http_get(f"http://127.0.0.1:{port}/healthz")[0] == 200, "worker ready", proc, log)
        if not given_dir:
            found = re.search(r"metrics: http://\S+ \(files in (\S+)\)", log.read_text())
            assert found, _tail(log)
            metrics_dir = Path(found.group(1))
        app = client_app(redis_server.url, queue)
        results = send_batches(app, "job-metrics", BATCHES)

        # One forged batch (task id is not job_id:batch_id): a clean, counted failure.
        bad = EmbedRequest(job_id="job-metrics", batch_id="forged", paragraphs=["x"])
        forged = app.send_task(TASK_NAME, kwargs=bad.to_wire(), task_id="not-the-right-id")
        with pytest.raises(Exception) as excinfo:
            forged.get(timeout=RESULT_TIMEOUT_S)
        assert "job_id:batch_id" in str(excinfo.value)

        label = (("worker", node),)
        # Celery stores a result before it sends task_success/task_postrun, so a finished get()
        # does not yet mean counted: wait for the last signal of the last batch (postrun ->
        # histogram count), then every counter is final and compared exactly.
        done = ("deposium_batch_duration_seconds_count", label)
        samples = wait_until(
            lambda: (s := scrape(port)).get(done) == len(BATCHES) + 1 and s,
            "the exporter to count every batch", proc, log, timeout=60,
        )

    expected_paragraphs = sum(sum(1 for e in r["errors"] if e is None) for r in results)
    expected_refused = sum(sum(1 for e in r["errors"] if e is not None) for r in results)
    expected_tokens = sum(sum(r["token_counts"]) for r in results)
    expected_truncated = sum(sum(1 for t in r["truncated"] if t) for r in results)
    # The batches themselves are what we think they are (else the comparison below is vacuous).
    assert expected_paragraphs == 6 and expected_refused == 2 and expected_truncated == 1
    assert expected_tokens > 256

    assert samples[("deposium_paragraphs_total", label)] == expected_paragraphs
    assert samples[("deposium_paragraph_errors_total", label)] == expected_refused
    assert samples[("deposium_tokens_total", label)] == expected_tokens
    assert samples[("deposium_truncated_paragraphs_total", label)] == expected_truncated
    assert samples[("deposium_batches_total", (("outcome", "success"), ("worker", node)))] == len(BATCHES)
    assert samples[("deposium_batches_total", (("outcome", "failure"), ("worker", node)))] == 1
    assert samples[("deposium_batch_errors_total", (("exception", "WireError"), ("worker", node)))] == 1
    assert samples[("deposium_batch_duration_seconds_count", label)] == len(BATCHES) + 1
    assert samples[("deposium_batch_duration_seconds_sum", label)] > 0
    # Each batch ran in its own child (max-tasks-per-child=1): the counts above were summed
    # over at least as many process files as batches, most of them from exited children.
    pids = {p.stem.rsplit("_", 1)[1] for p in metrics_dir.glob("counter_*.db")}
    assert len(pids) >= len(BATCHES) + 1, sorted(pids)
    # The stale file of a "previous run" was removed at start-up, not added to the totals.
    assert "999999" not in pids


def test_metrics_off_by_default(redis_server: RedisServer, minilm_artifact: Path, tmp_path: Path):
    """Without DEPOSIUM_METRICS_PORT the worker opens no port and writes no metric files.

    Why: a worker must not listen on the network unless the operator asked for it.
    """
    queue = f"nometrics-{uuid.uuid4().hex[:8]}"
    node = f"nometrics-{uuid.uuid4().hex[:6]}@testhost"
    metrics_dir = tmp_path / "prom"
    metrics_dir.mkdir()
    env = worker_env(redis_server.url, minilm_artifact, queue, PROMETHEUS_MULTIPROC_DIR=str(metrics_dir))
    log = tmp_path / "worker.log"
    with worker_process(env, node, log, "--concurrency=1") as proc:
        app = client_app(redis_server.url, queue)
        results = send_batches(app, "job-nometrics", BATCHES[:1])
        assert proc.poll() is None
    assert len(results) == 1 and results[0]["errors"] == [None, None]
    assert list(metrics_dir.iterdir()) == []


def test_scaling_gauges_follow_a_real_queued_job(redis_server: RedisServer, minilm_artifact: Path, tmp_path: Path):
    """Queue depth, work in flight, workers online and the job's progress and ETA, on the worker's
    endpoint while a real ``deposium-submit`` job runs (an autoscaler reads them without Flower),
    and the job's series gone once it ended."""
    from tests.procs import producer_env, submit_cmd, write_jsonl
    from tests.test_faults import MARK, _texts

    port = free_port()
    queue = f"scaling-{uuid.uuid4().hex[:8]}"
    node = f"scaling-{uuid.uuid4().hex[:6]}@testhost"
    # one process, slow marked batches: the job keeps a backlog in the queue for a while
    env = worker_env(redis_server.url, minilm_artifact, queue, DEPOSIUM_METRICS_PORT=str(port),
                     DEPOSIUM_TEST_FAULT=f"sleep=1.5:{MARK}")
    texts = _texts(160, marked=tuple(range(0, 160, 7)))
    write_jsonl(tmp_path / "in.jsonl", texts)
    log = tmp_path / "worker.log"
    with worker_process(env, node, log, "--concurrency=1") as proc:
        wait_until(lambda: http_get(f"http://127.0.0.1:{port}/healthz")[0] == 200, "worker ready", proc, log)
        job = subprocess.Popen(
            submit_cmd("in.jsonl", "--out", "out.parquet", "--batch-tokens", "300", "--max-in-flight", "4",
                       "--no-progress", "--json"),
            env=producer_env(tmp_path, minilm_artifact, redis_server.url, DEPOSIUM_QUEUE=queue), cwd=tmp_path,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        q = (("queue", queue),)

        def mid_job():
            s = scrape(port)
            jobs = [dict(labels) for (name, labels) in s if name == "deposium_job_paragraphs_done"]
            if not jobs:
                return None
            jl = tuple(sorted({"queue": queue, "job": jobs[0]["job"]}.items()))
            busy = s[("deposium_queue_batches", q)] >= 1 and s[("deposium_job_paragraphs_done", jl)] > 0
            return busy and s[("deposium_job_eta_seconds", jl)] > 0 and (s, jl)

        samples, jl = wait_until(mid_job, "a scrape mid-job with a backlog and an ETA", job, timeout=120)
        out, err = job.communicate(timeout=300)
        assert job.returncode == 0, err
        after = scrape(port)
    summary = json.loads(out)
    assert dict(jl)["job"] == summary["job_id"]
    assert samples[("deposium_workers_online", q)] == 1
    # concurrency 1, 4 in flight: at most one held by the worker, the rest queued
    assert 1 <= samples[("deposium_batches_in_flight", q)] <= 4
    assert samples[("deposium_queue_paragraphs", q)] > 0
    assert 0 < samples[("deposium_job_paragraphs_done", jl)] < len(texts)
    assert samples[("deposium_job_paragraphs_total", jl)] > samples[("deposium_job_paragraphs_done", jl)]
    # after the job: nothing queued or in flight, the job's series gone
    assert after[("deposium_queue_batches", q)] == 0 and after[("deposium_batches_in_flight", q)] == 0
    assert not [name for (name, _labels) in after if name.startswith("deposium_job_")]
