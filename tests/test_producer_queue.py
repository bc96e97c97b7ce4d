"""Queue mode end to end: real redis-server, real ``celery -A deposium.worker.celery_app worker`` processes.

The worker's log is the independent witness of what was sent: every delivery of a batch is
logged as ``Task deposium.embed_batch[<job>:<batch>] received``.
"""

from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from deposium.producer import submit
from tests.test_producer_support import (
    ROOT,
    VENV_BIN,
    corpus,
    received_task_ids,
    start_worker,
    stop,
    submit_cmd,
    wait_for_worker,
    write_jsonl,
)


@pytest.fixture(scope="module")
def short_corpus() -> list[str]:
    """10,500 real short paragraphs: the shortest of STS-B sentences and stdlib docstrings."""
    return sorted(corpus(13000), key=len)[:10500]


@pytest.fixture()
def worker(redis_server, minilm_artifact: Path, tmp_path: Path):
    log = tmp_path / "worker.log"
    proc = start_worker(redis_server.url, minilm_artifact, log, concurrency=2)
    try:
        wait_for_worker(redis_server.url, proc, log)
        yield log
    finally:
        stop(proc)


def _env(tmp_path: Path, artifact: Path, redis_url: str) -> dict[str, str]:
    return dict(os.environ, REDIS_URL=redis_url, DEPOSIUM_ARTIFACT=str(artifact),
                DEPOSIUM_CACHE_DIR=str(tmp_path / "cache"))


def _vectors(path: Path) -> dict[str, np.ndarray]:
    table = pq.read_table(path)
    flat = table.column("embedding").combine_chunks().flatten().to_numpy()
    matrix = flat.reshape(table.num_rows, -1)
    return dict(zip(table.column("id").to_pylist(), matrix, strict=True))


@pytest.mark.slow
def test_ten_thousand_paragraphs_through_redis_and_two_workers_equal_local_mode(
        tmp_path: Path, redis_server, worker: Path, minilm_artifact: Path, short_corpus: list[str]):
    write_jsonl(tmp_path / "corpus.jsonl", short_corpus)
    env = _env(tmp_path, minilm_artifact, redis_server.url)
    r = subprocess.run(submit_cmd("corpus.jsonl", "--out", "queue.parquet", "--no-progress", "--json"),
                       env=env, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    expected = {f"p{i:06d}#0" for i in range(len(short_corpus))}
    table = pq.read_table(tmp_path / "queue.parquet")
    ids = table.column("id").to_pylist()
    assert len(ids) == len(expected) == len(set(ids)) and set(ids) == expected
    texts = dict(zip(ids, table.column("text").to_pylist(), strict=True))
    assert all(texts[f"p{i:06d}#0"] == t for i, t in enumerate(short_corpus))
    # each batch went to the queue exactly once, and both worker processes took part
    received = received_task_ids(worker)
    assert len(received) == len(set(received)) == summary["batches"] == summary["batches_sent"]
    assert summary["duplicates"] > 0  # the corpus repeats sentences: reused, not re-embedded
    succeeded = [line for line in worker.read_text().splitlines() if "succeeded" in line]
    children = {line.split("ForkPoolWorker-")[1].split("]")[0]
                for line in succeeded if "ForkPoolWorker-" in line}
    assert len(children) == 2
    # local mode on the first 2,000 paragraphs (batching is deterministic and in input order, so its
    # batches are the queue job's first batches): same ids, vectors equal
    head = short_corpus[:2000]
    local = submit([(f"p{i:06d}", t) for i, t in enumerate(head)], out=tmp_path / "local.parquet",
                   local=True, artifact_dir=minilm_artifact).wait()
    assert local.ok and local.embedded == len(head)
    q, loc = _vectors(tmp_path / "queue.parquet"), _vectors(tmp_path / "local.parquet")
    assert set(loc) == {f"p{i:06d}#0" for i in range(len(head))}
    diff = max(float(np.abs(q[k] - loc[k]).max()) for k in loc)
    assert diff <= 1e-6, diff
    jobs = subprocess.run([str(VENV_BIN / "deposium-jobs"), "list", "--json"], env=env, capture_output=True,
                          text=True, timeout=60, cwd=ROOT)
    listed = {j["id"]: j for j in json.loads(jobs.stdout)}
    assert listed[summary["job_id"]]["state"] == "done"
    assert listed[summary["job_id"]]["counts"]["written"] == len(expected)


@pytest.mark.slow
def test_producer_killed_mid_job_resumes_without_resending_finished_batches(
        tmp_path: Path, redis_server, worker: Path, minilm_artifact: Path, short_corpus: list[str]):
    texts = short_corpus[::6]
    write_jsonl(tmp_path / "in.jsonl", texts)
    env = _env(tmp_path, minilm_artifact, redis_server.url)
    args = ["in.jsonl", "--out", "k.parquet", "--batch-tokens", "300", "--max-in-flight", "4",
            "--no-progress", "--json"]
    proc = subprocess.Popen(submit_cmd(*args), env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    parts = tmp_path / "k.parquet.parts"
    deadline = time.monotonic() + 300
    while len(list(parts.glob("b*.parquet"))) < 10 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done_at_kill = {p.name.split(".")[0] for p in parts.glob("b*.parquet")}
    assert len(done_at_kill) >= 10
    # the job record says "running" but its heartbeat stops: listed, resumable by id
    job_id = json.loads((tmp_path / "k.parquet.job.json").read_text())["id"] if (
        tmp_path / "k.parquet.job.json").exists() else None
    assert job_id is None  # queue mode keeps the record in Redis, not next to the output
    record_keys = [k for k in redis_server.client().scan_iter("deposium:job:*")]
    assert len(record_keys) == 1
    job_id = record_keys[0].decode().split(":")[-1]
    r = subprocess.run(submit_cmd("--resume", job_id, "--no-progress", "--json"), env=env, cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["job_id"] == job_id
    assert summary["batches_skipped"] == len(done_at_kill)
    assert summary["batches_sent"] == summary["batches"] - len(done_at_kill)
    table = pq.read_table(tmp_path / "k.parquet")
    ids = table.column("id").to_pylist()
    assert len(ids) == len(set(ids)) == len(texts)
    assert set(ids) == {f"p{i:06d}#0" for i in range(len(texts))}
    # the worker's own log: no batch finished before the kill was delivered a second time
    deliveries = collections.Counter(t.split(":")[1] for t in received_task_ids(worker))
    assert all(deliveries[b] == 1 for b in done_at_kill), {b: deliveries[b] for b in done_at_kill}
    assert set(deliveries) == {f"b{i:07d}" for i in range(summary["batches"])}


def _other_model_artifact(src: Path, dst: Path) -> Path:
    """A copy of ``src`` whose model.onnx differs by one metadata entry: same vectors, other sha256."""
    import dataclasses
    import shutil

    import onnx

    from deposium.worker.artifact import MODEL_FILE, read_manifest, sha256_file, write_manifest

    shutil.copytree(src, dst)
    model = onnx.load(str(dst / MODEL_FILE))
    model.metadata_props.add(key="deposium-test", value="another build")
    onnx.save(model, str(dst / MODEL_FILE))
    manifest = read_manifest(dst)
    files = dict(manifest.files, **{MODEL_FILE: sha256_file(dst / MODEL_FILE)})
    write_manifest(dst, dataclasses.replace(manifest, files=files))
    return dst


def test_batches_failing_every_attempt_are_retried_a_bounded_number_of_times_then_resumed(
        tmp_path: Path, redis_server, minilm_artifact: Path, short_corpus: list[str]):
    """A worker running another model build fails every batch (its sha256 is not the job's).

    Each batch is sent 1 + DEPOSIUM_MAX_BATCH_RETRIES times, recorded as failed with the reason,
    and the job still finishes (exit 1). With the right worker, the same command completes it.
    """
    texts = short_corpus[:80]
    write_jsonl(tmp_path / "in.jsonl", texts)
    wrong = _other_model_artifact(minilm_artifact, tmp_path / "other-build")
    env = dict(_env(tmp_path, minilm_artifact, redis_server.url), DEPOSIUM_MAX_BATCH_RETRIES="2")
    args = ["in.jsonl", "--out", "f.parquet", "--batch-tokens", "100", "--no-progress", "--json"]
    log = tmp_path / "wrong.log"
    proc = start_worker(redis_server.url, wrong, log, concurrency=2, name="wrong")
    try:
        wait_for_worker(redis_server.url, proc, log)
        r = subprocess.run(submit_cmd(*args), env=env, cwd=tmp_path, capture_output=True, text=True,
                           timeout=600)
    finally:
        stop(proc)
    assert r.returncode == 1, r.stderr
    summary = json.loads(r.stdout)
    batches = summary["batches"]
    assert batches >= 3 and summary["batches_failed"] == batches
    assert summary["failed_paragraphs"] == len(texts)
    deliveries = collections.Counter(received_task_ids(log))
    assert len(deliveries) == batches and set(deliveries.values()) == {3}
    errors = [json.loads(line) for line in (tmp_path / "f.parquet.errors.jsonl").read_text().splitlines()]
    assert len(errors) == len(texts)
    assert all(e["kind"] == "batch" and "after 3 attempt(s)" in e["reason"]
               and "worker runs model" in e["reason"] for e in errors)
    assert pq.read_table(tmp_path / "f.parquet").num_rows == 0
    # the right worker, the same command: the failed batches are sent again and the job completes
    good_log = tmp_path / "good.log"
    proc = start_worker(redis_server.url, minilm_artifact, good_log, concurrency=2, name="good")
    try:
        wait_for_worker(redis_server.url, proc, good_log)
        r = subprocess.run(submit_cmd(*args), env=env, cwd=tmp_path, capture_output=True, text=True,
                           timeout=600)
    finally:
        stop(proc)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["batches_sent"] == batches
    ids = pq.read_table(tmp_path / "f.parquet").column("id").to_pylist()
    assert sorted(ids) == [f"p{i:06d}#0" for i in range(len(texts))]
    assert not (tmp_path / "f.parquet.errors.jsonl").exists()
