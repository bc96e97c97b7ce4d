"""Sharded producers (``--shard i/N``, ``--producers N``): one job, one output, exactly once.

Every test compares a sharded run with one unsharded run of the same folder (40 text files and
one JSONL file of 300 records): the same ids, texts and hashes, and the same vectors up to
float rounding (a shard packs other batches, so other padding).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from deposium.producer.shard import Shard
from tests.pg_proc import PgCluster
from tests.test_producer_support import VENV_BIN, corpus, submit_cmd

COLUMNS = ("id", "document", "index", "content_hash", "text", "token_count", "truncated")
ARGS = ["docs", "--local", "--batch-tokens", "300", "--readers", "1", "--no-progress"]


def _env(root: Path, artifact: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL" and not k.startswith("PG")}
    env.update(DEPOSIUM_ARTIFACT=str(artifact), DEPOSIUM_CACHE_DIR=str(root / "cache"))
    return env


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory, minilm_artifact: Path) -> Path:
    """The corpus, and ``one.parquet``: its unsharded run (the reference)."""
    root = tmp_path_factory.mktemp("shards")
    docs = root / "docs"
    docs.mkdir()
    texts = corpus(380)
    for i in range(40):
        (docs / f"doc{i:02d}.txt").write_text(f"{texts[2 * i]}\n\n{texts[2 * i + 1]}\n", encoding="utf-8")
    with open(docs / "records.jsonl", "w", encoding="utf-8") as fh:
        for i, text in enumerate(texts[80:]):
            fh.write(json.dumps({"id": f"r{i:03d}", "text": text}) + "\n")
    r = subprocess.run(submit_cmd(*ARGS, "--out", "one.parquet"), env=_env(root, minilm_artifact), cwd=root,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    return root


def _sorted(table: pa.Table) -> pa.Table:
    return table.select(list(COLUMNS) + ["embedding"]).sort_by("id")


def _vectors(table: pa.Table) -> np.ndarray:
    return np.stack(table.column("embedding").to_numpy(zero_copy_only=False)).astype(np.float32)


def assert_same_rows(got: pa.Table, reference: pa.Table) -> None:
    got, reference = _sorted(got), _sorted(reference)
    ids = got.column("id").to_pylist()
    assert len(ids) == len(set(ids)), "a paragraph written twice"
    for col in COLUMNS:
        assert got.column(col).to_pylist() == reference.column(col).to_pylist(), col
    np.testing.assert_allclose(_vectors(got), _vectors(reference), atol=1e-5)


def _start(folder: Path, env: dict[str, str], out: str, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(submit_cmd(*ARGS, "--out", out, "--json", *extra), env=env, cwd=folder,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen) -> tuple[int, dict, str]:
    out, err = proc.communicate(timeout=600)
    return proc.returncode, (json.loads(out) if out.strip() else {}), err


def test_shard_split_is_a_partition_by_document_id():
    ids = [f"docs/doc{i}.txt" for i in range(200)]
    owners = [[Shard(k, 3).owns(d) for k in range(3)] for d in ids]
    assert all(sum(o) == 1 for o in owners)
    assert all(30 < sum(o[k] for o in owners) < 110 for k in range(3))  # every shard gets a share
    assert Shard.parse("2/3") == Shard(2, 3) and Shard(0, 1).owns("anything")
    for bad in ("3/3", "1", "-1/2", "0/0"):
        with pytest.raises(ValueError, match="--shard"):
            Shard.parse(bad)


def test_each_shard_walks_to_its_own_files_with_the_unsharded_ids(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A shard's walk leaves other shards' one-document files out by name, yet every id is the
    normalized path an unsharded walk gives (also under ``.``), record files go to every shard,
    and the shards' byte totals (the progress bar's) add up to the whole."""
    from deposium.producer.readers import expand_found, shard_bytes

    for d in ("a", "a/b", "c", ".hidden"):
        (tmp_path / d).mkdir(parents=True, exist_ok=True)
    for i in range(60):
        (tmp_path / ("a" if i % 3 else "a/b") / f"doc{i}.txt").write_text("x" * (i + 1))
    (tmp_path / "c" / ".skip.txt").write_text("hidden")
    (tmp_path / ".hidden" / "no.txt").write_text("hidden dir")
    (tmp_path / "c" / "records.jsonl").write_text('{"id": "r1", "text": "one"}\n')
    monkeypatch.chdir(tmp_path)

    def reference(inputs: list[str]) -> list[str]:  # the walk before shards: normpath of every join
        out = []
        for raw in inputs:
            for root, dirs, files in os.walk(raw):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                out += [os.path.normpath(os.path.join(root, f)) for f in sorted(files) if not f.startswith(".")]
        return out

    for inputs in (["."], ["./a/", "c"], [str(tmp_path)]):
        whole = [doc_id for doc_id, _, _ in expand_found(inputs)]
        assert whole == reference(inputs) and len(whole) == 61
        per_shard = [[doc_id for doc_id, _, _ in expand_found(inputs, Shard(k, 3))] for k in range(3)]
        records = [d for d in whole if d.endswith(".jsonl")]
        for k, mine in enumerate(per_shard):
            assert mine == [d for d in whole if d in records or Shard(k, 3).owns(d)]  # same order
        assert sorted(sum(per_shard, [])) == sorted(whole + records * 2)  # the record file in every shard
        record_bytes = os.path.getsize(records[0])
        assert sum(shard_bytes(inputs, Shard(k, 3)) for k in range(3)) == shard_bytes(inputs) + 2 * record_bytes


def test_three_concurrent_shards_write_the_unsharded_rows_once(folder: Path, minilm_artifact: Path):
    env = _env(folder, minilm_artifact)
    procs = [_start(folder, env, "three.parquet", "--shard", f"{k}/3") for k in range(3)]
    results = [_finish(p) for p in procs]
    assert [code for code, _, _ in results] == [0, 0, 0], [err for _, _, err in results]
    reference = pq.read_table(folder / "one.parquet")
    written = [s["embedded"] for _, s, _ in results]
    assert all(n > 0 for n in written) and sum(written) == reference.num_rows  # split, not repeated
    assert len({s["job_id"].rsplit(".", 1)[0] for _, s, _ in results}) == 1  # one job
    assert_same_rows(pq.read_table(folder / "three.parquet"), reference)
    assert not (folder / "three.parquet.parts").exists()
    meta = json.loads(pq.read_schema(folder / "three.parquet").metadata[b"deposium"])
    assert meta["complete"] is True and all(b.startswith("s00") for b in meta["batches"])
    r = subprocess.run([str(VENV_BIN / "deposium-jobs"), "list", "--json"], env=env, capture_output=True,
                       text=True, timeout=60)
    jobs = [j for j in json.loads(r.stdout) if j["spec"]["target"].endswith("three.parquet")]
    assert len(jobs) == 1, jobs
    job = jobs[0]
    assert job["state"] == "done" and job["counts"]["written"] == reference.num_rows
    assert sorted(job["shards"]) == ["0", "1", "2"] and {s["state"] for s in job["shards"].values()} == {"done"}


def test_killed_shard_resumes_and_a_second_producer_of_it_is_refused(folder: Path, minilm_artifact: Path):
    env = _env(folder, minilm_artifact)
    code, first, err = _finish(_start(folder, env, "kill.parquet", "--shard", "0/3"))
    assert code == 0, err
    assert "published when shards 1, 2 of 3 finish" in err
    assert not (folder / "kill.parquet").exists()  # nothing published before every shard is done

    proc = _start(folder, env, "kill.parquet", "--shard", "1/3", "--max-in-flight", "1")
    parts = folder / "kill.parquet.parts"
    deadline = time.monotonic() + 300
    while len(list(parts.glob("s001-b*.parquet"))) < 2 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGSTOP)  # holds its locks, writes nothing, until killed
    try:
        assert proc.poll() is None, "shard 1 ended before it could be stopped mid-job"
        done_before = len(list(parts.glob("s001-b*.parquet")))
        code, _, err = _finish(_start(folder, env, "kill.parquet", "--shard", "1/3"))
        assert code == 2 and "shard 1/3 is being written by job" in err, err
        code, _, err = _finish(_start(folder, env, "kill.parquet"))  # unsharded: another job, refused
        assert code == 2 and "is being written by" in err, err
        code, _, err = _finish(_start(folder, env, "kill.parquet", "--shard", "2/3"))  # other shards run
        assert code == 0 and "published when shard 1 of 3 finishes" in err, err
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()

    code, again, err = _finish(_start(folder, env, "kill.parquet", "--shard", "1/3"))
    assert code == 0, err
    assert again["batches_skipped"] >= done_before and again["batches_sent"] == again["batches"] - again[
        "batches_skipped"]
    assert "published when" not in err
    assert_same_rows(pq.read_table(folder / "kill.parquet"), pq.read_table(folder / "one.parquet"))
    code, rerun, err = _finish(_start(folder, env, "kill.parquet", "--shard", "0/3"))  # finished: a no-op
    assert code == 0 and rerun["batches_sent"] == 0 and rerun["already_done"] == first["embedded"], err


def test_producers_runs_every_shard_and_refuses_stdin(folder: Path, minilm_artifact: Path):
    env = _env(folder, minilm_artifact)
    r = subprocess.run(submit_cmd(*ARGS, "--out", "two.parquet", "--producers", "2"), env=env, cwd=folder,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert len([line for line in r.stdout.splitlines() if line.startswith("job ")]) == 2
    assert_same_rows(pq.read_table(folder / "two.parquet"), pq.read_table(folder / "one.parquet"))
    assert sorted(p.name for p in folder.glob("two.parquet.job.*.json")) == [
        "two.parquet.job.0-of-2.json", "two.parquet.job.1-of-2.json"]
    r = subprocess.run(submit_cmd("-", "--local", "--shard", "0/2"), env=env, cwd=folder, input="some text\n",
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.startswith("deposium-submit: error: --shard 0/2"), r.stderr


def test_two_shards_into_lancedb_equal_the_unsharded_rows(folder: Path, minilm_artifact: Path):
    import lancedb

    env = _env(folder, minilm_artifact)
    target = f"lancedb://{folder / 'db'}?table=docs"
    procs = [_start(folder, env, target, "--shard", f"{k}/2") for k in range(2)]
    results = [_finish(p) for p in procs]
    assert [code for code, _, _ in results] == [0, 0], [err for _, _, err in results]
    table = lancedb.connect(str(folder / "db")).open_table("docs").to_arrow()
    assert_same_rows(table, pq.read_table(folder / "one.parquet"))




def test_two_shards_into_pgvector_equal_the_unsharded_rows(folder: Path, minilm_artifact: Path, pg: PgCluster):
    import psycopg
    from pgvector.psycopg import register_vector

    env = _env(folder, minilm_artifact)
    target = pg.url("sharded")
    procs = [_start(folder, env, target, "--shard", f"{k}/2", "--index", "hnsw") for k in range(2)]
    results = [_finish(p) for p in procs]
    assert [code for code, _, _ in results] == [0, 0], [err for _, _, err in results]
    assert sum("hnsw index ready" in err for _, _, err in results) == 1  # built once, by the last shard
    with psycopg.connect(pg.url("x").split("?")[0], autocommit=True) as conn:
        register_vector(conn)
        rows = conn.execute('SELECT id, document, "index", content_hash, text, token_count, truncated, '
                            "embedding FROM sharded", binary=True).fetchall()
    table = pa.table({**{c: [r[i] for r in rows] for i, c in enumerate(COLUMNS)},
                      "embedding": [r[7].to_numpy() for r in rows]})
    assert_same_rows(table, pq.read_table(folder / "one.parquet"))


def test_producers_children_run_the_same_command_and_the_worst_code_wins():
    from deposium.producer.producers import child_argv, worst

    assert child_argv(["docs", "--producers", "4", "--out", "o.parquet", "--producers=2"]) == [
        "docs", "--out", "o.parquet"]
    assert worst([0, 1, 0]) == 1 and worst([1, 3]) == 3 and worst([3, 130, 0]) == 130 and worst([130, 2]) == 2
    assert worst([0, 0]) == 0


def test_two_shards_through_the_queue_equal_the_unsharded_rows(folder: Path, minilm_artifact: Path, redis_server,
                                                                tmp_path: Path):
    """Queue mode: each shard is its own producer of the same job on the same workers."""
    import redis

    from tests.test_producer_support import start_worker, stop, wait_for_worker

    log = tmp_path / "worker.log"
    worker = start_worker(redis_server.url, minilm_artifact, log, concurrency=1)
    try:
        wait_for_worker(redis_server.url, worker, log)
        env = dict(_env(tmp_path, minilm_artifact), REDIS_URL=redis_server.url)
        queue_args = [a for a in ARGS if a != "--local"]
        procs = [subprocess.Popen(submit_cmd(*queue_args, "--out", "queued.parquet", "--json", "--shard", f"{k}/2"),
                                  env=env, cwd=folder, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for k in range(2)]
        results = [_finish(p) for p in procs]
    finally:
        stop(worker)
    assert [code for code, _, _ in results] == [0, 0], [err for _, _, err in results]
    assert_same_rows(pq.read_table(folder / "queued.parquet"), pq.read_table(folder / "one.parquet"))
    job = results[0][1]["job_id"].rsplit(".", 1)[0]
    keys = sorted(k.decode() for k in redis.Redis.from_url(redis_server.url).smembers("deposium:jobs"))
    assert keys == [f"{job}.0-of-2", f"{job}.1-of-2"]


def test_shard_cost_bench_accounts_every_shard(tmp_path: Path, minilm_artifact: Path,
                                               monkeypatch: pytest.MonkeyPatch):
    from deposium.bench import shard_cost

    texts = corpus(60)
    docs = tmp_path / "docs"
    assert shard_cost.write_folder(docs, texts, 20) == 60
    monkeypatch.delenv("REDIS_URL", raising=False)
    monkeypatch.setenv("DEPOSIUM_ARTIFACT", str(minilm_artifact))
    monkeypatch.setenv("DEPOSIUM_CACHE_DIR", str(tmp_path / "cache"))
    result = shard_cost.measure(docs, tmp_path, 3, 0)
    assert result["paragraphs"] == sum(result["shard_paragraphs"]) > 20  # short ones merge into neighbours
    assert all(n > 0 for n in result["shard_paragraphs"])
    assert all(cpu > 0 for cpu in result["shard_cpu_s"])
    publishers = [parts for parts in result["shard_parts_s"] if parts[shard_cost.PUBLISH] > 0]
    assert len(publishers) == 1 and result["one_parts_s"][shard_cost.PUBLISH] > 0  # merged once per run
    assert not (tmp_path / "sharded-0.parquet.parts").exists()
    assert pq.read_table(tmp_path / "sharded-0.parquet").num_rows == result["paragraphs"]


def test_jobs_list_combines_a_sharded_jobs_records():
    from deposium.producer.jobs_cli import combine_shards

    def record(index: int, state: str, written: int) -> dict:
        return {"id": f"jx.{index}-of-3", "state": state, "updated": 1000.0,
                "spec": {"target": "o.parquet", "shard": {"job": "jx", "index": index, "count": 3}},
                "counts": {"written": written, "batches": 2}}

    plain = {"id": "jy", "state": "done", "spec": {}, "counts": {"written": 5}}
    jobs = combine_shards([record(0, "done", 10), plain, record(2, "running", 4)], now=1010.0)
    assert [j["id"] for j in jobs] == ["jx", "jy"]
    job = jobs[0]
    assert job["state"] == "running" and job["shards_done"] == "1/3"
    assert job["counts"] == {"written": 14, "batches": 4}
    assert [job["shards"][i]["state"] for i in "012"] == ["done", "not started", "running"]
    stalled = combine_shards([record(0, "done", 10), record(1, "running", 4)], now=5000.0)[0]
    assert stalled["state"] == "stalled (resume it)"
    partial = combine_shards([record(0, "done", 10), record(1, "done", 4)], now=1010.0)[0]
    assert partial["state"] == "incomplete" and partial["shards_done"] == "2/3"
    done = combine_shards([record(i, "done", 1) for i in range(3)], now=1010.0)[0]
    assert done["state"] == "done" and done["counts"]["written"] == 3
