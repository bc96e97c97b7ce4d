"""LanceDB sink with the real embedded store (no mocks): equal to Parquet, resumable, refusals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import lancedb
import numpy as np
import pyarrow as pa
import pytest

from tests.test_producer_support import corpus, submit_cmd, write_jsonl
from tests.test_sinks_support import PAIRS, documents, parquet_reference, queries, run_job, vectors_of


def _env(tmp_path: Path, artifact: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    env.update(DEPOSIUM_ARTIFACT=str(artifact), DEPOSIUM_CACHE_DIR=str(tmp_path / "cache"))
    return env


def _table(path: Path, name: str) -> pa.Table:
    return lancedb.connect(str(path)).open_table(name).to_arrow().sort_by("id")


def test_full_job_equals_parquet_and_query_finds_own_document(minilm_artifact: Path, tmp_path: Path):
    ref = parquet_reference(str(minilm_artifact))
    target = f"lancedb://{tmp_path / 'db'}?table=docs"
    summary = run_job(target, minilm_artifact, documents(), index="hnsw")
    assert summary.ok and summary.duplicates >= 2, summary
    got = _table(tmp_path / "db", "docs")
    for col in ("id", "document", "index", "content_hash", "text", "token_count", "truncated"):
        assert got.column(col).to_pylist() == ref.column(col).to_pylist(), col
    a, b = vectors_of(got), vectors_of(ref)
    assert a.dtype == b.dtype == np.float32 and a.shape == b.shape
    assert a.view(np.uint32).tobytes() == b.view(np.uint32).tobytes()
    assert set(got.column("job_id").to_pylist()) == {summary.job_id}
    assert len(set(got.column("batch_id").to_pylist())) <= summary.batches
    table = lancedb.connect(str(tmp_path / "db")).open_table("docs")
    assert table.list_indices(), "--index hnsw built no index"
    for k, q in enumerate(queries(minilm_artifact)):
        # through the index, as README's query does (ef: HNSW candidates; the default for k=1 is too few)
        hit = (table.search(q, vector_column_name="embedding").distance_type("cosine").limit(1).ef(64)
               .select(["document", "embedding", "_distance"]).to_arrow())
        assert hit.column("document")[0].as_py() == f"pair{k}", PAIRS[k][1]
        # the index reports the cosine distance itself (not 2x, the squared L2 of unit vectors)
        v = np.asarray(hit.column("embedding")[0].as_py(), np.float64)
        exact = 1.0 - float(np.dot(q, v) / (np.linalg.norm(q) * np.linalg.norm(v)))
        assert hit.column("_distance")[0].as_py() == pytest.approx(exact, abs=1e-4)
    again = run_job(target, minilm_artifact, documents())
    assert again.batches_sent == 0 and again.already_done == got.num_rows
    assert table.count_rows() == got.num_rows


def test_kill_9_and_resume_exactly_once(minilm_artifact: Path, tmp_path: Path):
    texts = corpus(900)
    write_jsonl(tmp_path / "in.jsonl", texts)
    db = tmp_path / "db"
    args = ["in.jsonl", "--sink", f"lancedb://{db}?table=k", "--local", "--batch-tokens", "300",
            "--no-progress", "--json"]
    env = _env(tmp_path, minilm_artifact)
    proc = subprocess.Popen(submit_cmd(*args), env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)

    def committed() -> set[str]:
        try:
            t = lancedb.connect(str(db)).open_table("k")
        except (ValueError, OSError, RuntimeError):
            return set()
        return set(t.to_arrow().column("batch_id").to_pylist())

    deadline = time.monotonic() + 300
    while len(committed()) < 4 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert proc.poll() is None, "the job ended before it could be killed: " + proc.stderr.read().decode()[-800:]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    before = committed()
    assert len(before) >= 4
    r = subprocess.run(submit_cmd(*args), env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["batches_skipped"] == len(before)
    ids = _table(db, "k").column("id").to_pylist()
    print(f"\nLanceDB exactly-once after kill -9 + resume: {len(before)} batches committed before the kill; "
          f"{len(ids)} rows, {len(set(ids))} distinct ids, {len(texts)} paragraphs")
    assert len(ids) == len(set(ids)) == len(texts)
    assert set(ids) == {f"p{i:06d}#0" for i in range(len(texts))}


@pytest.mark.parametrize("case", ["malformed", "missing-table", "dimension", "other-model"])
def test_bad_target_is_one_clear_line_and_nothing_written(case: str, minilm_artifact: Path, tmp_path: Path):
    db = tmp_path / "db"
    target = f"lancedb://{db}?table=t"
    expect = {"malformed": "malformed LanceDB target", "missing-table": "name the table",
              "dimension": "stores 8-dimensional float vectors", "other-model": "rows from another model"}[case]
    if case == "malformed":
        target = f"lancedb://{db}?table=t&colour=blue"
    elif case == "missing-table":
        target = f"lancedb://{db}"
    else:
        dim = 8 if case == "dimension" else 384
        vec = pa.FixedSizeListArray.from_arrays(pa.array(np.ones(dim, np.float32)), dim)
        lancedb.connect(str(db)).create_table("t", pa.table({
            "id": ["x#0"], "embedding": vec, "job_id": ["j"], "model_id": [""], "model_sha256": ["ffff"],
            "batch_id": ["b0"], "batch_digest": ["d"]}))
    (tmp_path / "a.txt").write_text("A paragraph that must never reach the table.\n")
    r = subprocess.run(submit_cmd("a.txt", "--sink", target, "--local", "--no-progress"),
                       env=_env(tmp_path, minilm_artifact), cwd=tmp_path, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr and expect in lines[0], r.stderr
    if case in {"dimension", "other-model"}:
        assert lancedb.connect(str(db)).open_table("t").count_rows() == 1
    else:
        assert not db.exists()


def test_replace_starts_over_after_the_input_changed(minilm_artifact: Path, tmp_path: Path):
    from deposium.producer.runner import JobError

    target = f"lancedb://{tmp_path / 'db'}?table=r"
    docs = documents(40)
    assert run_job(target, minilm_artifact, docs).ok
    edited = "An edited first document that the earlier run never saw."
    docs[0] = (docs[0][0], edited)
    with pytest.raises(JobError, match="the input changed since job .*re-run with --replace"):
        run_job(target, minilm_artifact, docs)
    summary = run_job(target, minilm_artifact, docs, replace_output=True)
    assert summary.ok and summary.already_done == 0 and summary.batches_skipped == 0
    got = _table(tmp_path / "db", "r")
    ids, texts = got.column("id").to_pylist(), got.column("text").to_pylist()
    assert len(ids) == len(set(ids)) == summary.embedded
    assert edited in texts and PAIRS[0][0] not in texts


def test_a_second_producer_on_the_same_table_is_refused_at_once(minilm_artifact: Path, tmp_path: Path):
    from deposium.producer.sinks import SinkJob, open_sink

    db = tmp_path / "db"
    target = f"lancedb://{db}?table=t"
    running = open_sink(target)
    running.open(SinkJob(job_id="jrunning", dim=384, dtype="float32", model_sha256="m"))
    (tmp_path / "a.txt").write_text("A paragraph that must wait for the running job.\n")
    args = ["a.txt", "--sink", target, "--local", "--no-progress"]
    r = subprocess.run(submit_cmd(*args), env=_env(tmp_path, minilm_artifact), cwd=tmp_path, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "LanceDB table t in " in lines[0] and "is being written by job jrunning" in lines[0]
    assert lancedb.connect(str(db)).open_table("t").count_rows() == 0
    running.release()
    r = subprocess.run(submit_cmd(*args), env=_env(tmp_path, minilm_artifact), cwd=tmp_path, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert lancedb.connect(str(db)).open_table("t").count_rows() == 1
