"""PostgreSQL + pgvector sink against a real, test-owned PostgreSQL cluster (no mocks).

A full job equals the Parquet output bit for bit; kill -9 and resume writes every paragraph
exactly once; a held-back paragraph finds its own document through ``<=>``; every kind of
bad target is one clear line, exit 2, and nothing written.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from tests.pg_proc import PgCluster
from tests.redis_proc import free_port
from tests.test_producer_support import corpus, submit_cmd, write_jsonl
from tests.test_sinks_support import PAIRS, documents, parquet_reference, queries, run_job, vectors_of


def _connect(pg: PgCluster):
    import psycopg
    from pgvector.psycopg import register_vector

    conn = psycopg.connect(pg.url("x").split("?")[0], autocommit=True)
    register_vector(conn)
    return conn


def _env(tmp_path: Path, artifact: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL" and not k.startswith("PG")}
    env.update(DEPOSIUM_ARTIFACT=str(artifact), DEPOSIUM_CACHE_DIR=str(tmp_path / "cache"), **extra)
    return env


def test_full_job_equals_parquet_and_query_finds_own_document(pg: PgCluster, minilm_artifact: Path):
    ref = parquet_reference(str(minilm_artifact))
    summary = run_job(pg.url("docs"), minilm_artifact, documents(), index="hnsw")
    assert summary.ok and summary.duplicates >= 2, summary
    assert "s3cret" not in summary.target
    with _connect(pg) as conn:
        rows = conn.execute('SELECT id, document, "index", content_hash, text, token_count, truncated, '
                            "embedding, model_sha256, job_id FROM docs ORDER BY id COLLATE \"C\"",
                            binary=True).fetchall()
        assert [r[0] for r in rows] == ref.column("id").to_pylist()
        for col, i in (("document", 1), ("index", 2), ("content_hash", 3), ("text", 4), ("token_count", 5),
                       ("truncated", 6)):
            assert [r[i] for r in rows] == ref.column(col).to_pylist(), col
        got = np.stack([r[7].to_numpy() for r in rows])
        want = vectors_of(ref).astype(np.float32)
        assert got.dtype == np.float32 and got.shape == want.shape
        assert got.view(np.uint32).tobytes() == want.view(np.uint32).tobytes()
        assert {r[9] for r in rows} == {summary.job_id}
        kinds = conn.execute("SELECT indexdef FROM pg_indexes WHERE tablename = 'docs'").fetchall()
        assert any("hnsw" in k[0] and "vector_cosine_ops" in k[0] for k in kinds), kinds
        batches = conn.execute("SELECT count(*), sum(rows) FROM docs_deposium_batches").fetchone()
        assert batches == (summary.batches, len(rows))
        # a held-back paraphrase finds its own document as the nearest neighbour (cosine, <=>)
        for k, q in enumerate(queries(minilm_artifact)):
            doc = conn.execute("SELECT document FROM docs ORDER BY embedding <=> %s LIMIT 1", (q,)).fetchone()[0]
            assert doc == f"pair{k}", (PAIRS[k][1], doc)
    # the same call again resumes: nothing sent, nothing added
    again = run_job(pg.url("docs"), minilm_artifact, documents())
    assert again.batches_sent == 0 and again.already_done == len(rows)
    assert pg.sql("SELECT count(*) FROM docs", db="vectors") == str(len(rows))


def test_float16_job_is_halfvec_equal_to_parquet(pg: PgCluster, minilm_artifact: Path):
    ref = parquet_reference(str(minilm_artifact), "float16")
    summary = run_job(pg.url("half"), minilm_artifact, documents(), dtype="float16")
    assert summary.ok, summary
    assert pg.sql("SELECT format_type(atttypid, atttypmod) FROM pg_attribute WHERE attrelid = 'half'::regclass "
                  "AND attname = 'embedding'", db="vectors") == "halfvec(384)"
    with _connect(pg) as conn:
        rows = conn.execute('SELECT id, embedding FROM half ORDER BY id COLLATE "C"', binary=True).fetchall()
    assert [r[0] for r in rows] == ref.column("id").to_pylist()
    got = np.stack([r[1].to_numpy() for r in rows])
    assert got.dtype == np.float16 and got.tobytes() == vectors_of(ref).astype(np.float16).tobytes()


def test_kill_9_and_resume_writes_every_paragraph_exactly_once(pg: PgCluster, minilm_artifact: Path,
                                                               tmp_path: Path):
    texts = corpus(1200)
    write_jsonl(tmp_path / "in.jsonl", texts)
    target = pg.url("killed").replace(f":{PgCluster.PASSWORD}@", "@")  # the secret comes from PGPASSWORD
    env = _env(tmp_path, minilm_artifact, PGPASSWORD=PgCluster.PASSWORD)
    args = ["in.jsonl", "--sink", target, "--local", "--batch-tokens", "300", "--no-progress", "--json"]
    proc = subprocess.Popen(submit_cmd(*args), env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)

    def done_batches() -> int:
        if not pg.sql("SELECT to_regclass('killed_deposium_batches')", db="vectors"):
            return 0
        return int(pg.sql("SELECT count(*) FROM killed_deposium_batches", db="vectors"))

    deadline = time.monotonic() + 300
    while done_batches() < 4 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert proc.poll() is None, "the job ended before it could be killed: " + proc.stderr.read().decode()[-800:]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    before = done_batches()
    rows_before = int(pg.sql("SELECT count(*) FROM killed", db="vectors"))
    assert before >= 4 and rows_before == int(pg.sql("SELECT sum(rows) FROM killed_deposium_batches",
                                                       db="vectors"))
    r = subprocess.run(submit_cmd(*args), env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert PgCluster.PASSWORD not in r.stdout + r.stderr
    summary = json.loads(r.stdout)
    assert summary["batches_skipped"] == before
    assert summary["batches_sent"] == summary["batches"] - before
    total, distinct = map(int, pg.sql("SELECT count(*), count(DISTINCT id) FROM killed", db="vectors").split("|"))
    ids = set(pg.sql("SELECT id FROM killed", db="vectors").splitlines())
    print(f"\nexactly-once after kill -9 + resume: {before} batches / {rows_before} rows committed before "
          f"the kill; {total} rows, {distinct} distinct ids, {len(texts)} paragraphs in the job")
    assert total == distinct == len(texts)
    assert ids == {f"p{i:06d}#0" for i in range(len(texts))}
    assert int(pg.sql("SELECT count(*) FROM killed_deposium_batches", db="vectors")) == summary["batches"]


BAD = ["malformed", "missing-table", "unreachable", "wrong-password", "dimension", "other-owner", "other-model"]


@pytest.mark.parametrize("case", BAD)
def test_bad_target_is_one_clear_line_and_nothing_written(case: str, pg: PgCluster, minilm_artifact: Path,
                                                           tmp_path: Path):
    table = f"bad_{case.replace('-', '_')}"
    expect = {
        "malformed": "malformed PostgreSQL URL",
        "missing-table": "name the table",
        "unreachable": "cannot connect to PostgreSQL",
        "wrong-password": "password authentication failed",
        "dimension": "stores vector(8), this job writes vector(384); pass --replace",
        "other-owner": "owned by role 'stranger'",
        "other-model": "holds rows from another model",
    }[case]
    url = pg.url(table)
    if case == "malformed":
        url = f"postgresql://deposium:{PgCluster.PASSWORD}@127.0.0.1:99999x/vectors?table={table}"
    elif case == "missing-table":
        url = url.split("?")[0]
    elif case == "unreachable":
        url = url.replace(f":{pg.port}/", f":{free_port()}/")
    elif case == "wrong-password":
        url = pg.url(table, password="not-the-s3cret")
    elif case == "dimension":
        pg.sql(f"CREATE TABLE {table} (id text PRIMARY KEY, embedding vector(8))", db="vectors", user="deposium")
    elif case == "other-owner":
        pg.sql(f"CREATE TABLE {table} (id text PRIMARY KEY, embedding vector(384))", db="vectors")
        pg.sql(f"ALTER TABLE {table} OWNER TO stranger", db="vectors")
    elif case == "other-model":
        pg.sql(f'CREATE TABLE {table} (id text PRIMARY KEY, document text, "index" int, content_hash text, '
               "text text, token_count int, truncated bool, job_id text, model_id text, model_sha256 text, "
               "embedding vector(384))", db="vectors", user="deposium")
        pg.sql(f"INSERT INTO {table} VALUES ('x#0', 'x', 0, 'h', 't', 1, false, 'j', 'm', 'ffff', "
               "array_fill(0.5, ARRAY[384])::vector)", db="vectors")
    before = pg.sql(f"SELECT count(*) FROM pg_class WHERE relname LIKE '{table}%'", db="vectors")
    (tmp_path / "a.txt").write_text("A paragraph that must never reach the table.\n\nAnd a second one.\n")
    r = subprocess.run(submit_cmd("a.txt", "--sink", url, "--local", "--no-progress"),
                       env=_env(tmp_path, minilm_artifact), cwd=tmp_path, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert expect in lines[0], lines[0]
    assert "s3cret" not in r.stderr + r.stdout
    # nothing written: no new relation, no row
    assert pg.sql(f"SELECT count(*) FROM pg_class WHERE relname LIKE '{table}%'", db="vectors") == before
    if case in {"dimension", "other-owner"}:
        assert pg.sql(f"SELECT count(*) FROM {table}", db="vectors") == "0"
    if case == "other-model":
        assert pg.sql(f"SELECT count(*) FROM {table}", db="vectors") == "1"


def test_replace_overwrites_a_refused_table(pg: PgCluster, minilm_artifact: Path, tmp_path: Path):
    pg.sql("CREATE TABLE repl (id text PRIMARY KEY, embedding vector(8))", db="vectors", user="deposium")
    pg.sql("INSERT INTO repl VALUES ('old', array_fill(0.1, ARRAY[8])::vector)", db="vectors")
    (tmp_path / "a.txt").write_text("A paragraph that replaces the old table.\n")
    r = subprocess.run(submit_cmd("a.txt", "--sink", pg.url("repl"), "--local", "--no-progress", "--replace"),
                       env=_env(tmp_path, minilm_artifact), cwd=tmp_path, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert pg.sql("SELECT id FROM repl", db="vectors") == "a.txt#0"
    assert pg.sql("SELECT vector_dims(embedding) FROM repl", db="vectors") == "384"


def test_replace_starts_over_after_the_input_changed(pg: PgCluster, minilm_artifact: Path):
    from deposium.producer.runner import JobError

    target = pg.url("changed")
    docs = documents(40)
    assert run_job(target, minilm_artifact, docs).ok
    edited = "An edited first document that the earlier run never saw."
    docs[0] = (docs[0][0], edited)
    with pytest.raises(JobError, match="the input changed since job .*re-run with --replace"):
        run_job(target, minilm_artifact, docs)
    summary = run_job(target, minilm_artifact, docs, replace_output=True)
    assert summary.ok and summary.already_done == 0 and summary.batches_skipped == 0
    total, distinct = map(int, pg.sql("SELECT count(*), count(DISTINCT id) FROM changed", db="vectors").split("|"))
    assert total == distinct == summary.embedded
    texts = pg.sql("SELECT text FROM changed", db="vectors")
    assert edited in texts and PAIRS[0][0] not in texts


def test_a_second_producer_on_the_same_table_is_refused_at_once(pg: PgCluster, minilm_artifact: Path,
                                                                tmp_path: Path):
    from deposium.producer.sinks import SinkJob, open_sink

    running = open_sink(pg.url("locked"))
    running.open(SinkJob(job_id="jrunning", dim=384, dtype="float32", model_sha256="m"))
    (tmp_path / "a.txt").write_text("A paragraph that must wait for the running job.\n")
    args = ["a.txt", "--sink", pg.url("locked"), "--local", "--no-progress"]
    for extra in ([], ["--replace"]):
        r = subprocess.run(submit_cmd(*args, *extra), env=_env(tmp_path, minilm_artifact), cwd=tmp_path,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 2, r.stderr
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and "table locked is being written by job jrunning (PostgreSQL backend pid" \
            in lines[0], r.stderr
    assert pg.sql("SELECT count(*) FROM locked", db="vectors") == "0"
    running.release()
    r = subprocess.run(submit_cmd(*args), env=_env(tmp_path, minilm_artifact), cwd=tmp_path, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert pg.sql("SELECT id FROM locked", db="vectors") == "a.txt#0"
