"""``--sync`` against the three real stores: edits, additions and deletions between two syncs leave
the store equal to a fresh sync of the new folder, only new text is embedded, ids of untouched
paragraphs survive insertions, refusals come before any work, and kill -9 mid-sync converges.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from deposium.producer.cli import main
from tests.pg_proc import PgCluster
from tests.test_producer_support import stdlib_docstrings, submit_cmd

SINKS = ["parquet", "pgvector", "lancedb"]


# -- fixtures and helpers --------------------------------------------------------------------------


@pytest.fixture()
def env(minilm_artifact: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    monkeypatch.delenv("REDIS_URL", raising=False)
    monkeypatch.setenv("DEPOSIUM_ARTIFACT", str(minilm_artifact))
    monkeypatch.setenv("DEPOSIUM_CACHE_DIR", str(tmp_path / "cache"))
    return dict(os.environ)


def target_for(kind: str, tmp_path: Path, name: str, pg: PgCluster | None) -> str:
    if kind == "parquet":
        return str(tmp_path / f"{name}.parquet")
    if kind == "lancedb":
        return f"lancedb://{tmp_path / 'lance'}?table={name}"
    assert pg is not None
    return pg.url(name)


def read_store(kind: str, target: str) -> dict[str, tuple[str, int, str, np.ndarray]]:
    """id -> (document, index, text, vector) of every stored row."""
    if kind == "parquet":
        t = pq.read_table(target)
    elif kind == "lancedb":
        import lancedb

        path, _, table = target.removeprefix("lancedb://").partition("?table=")
        t = lancedb.connect(path).open_table(table).to_arrow()
    else:
        import psycopg
        from pgvector.psycopg import register_vector

        url, _, table = target.partition("?table=")
        with psycopg.connect(url) as conn:
            register_vector(conn)
            rows = conn.execute(f'SELECT id, document, "index", text, embedding FROM "{table}"').fetchall()
        return {r[0]: (r[1], r[2], r[3], np.asarray(r[4].to_numpy() if hasattr(r[4], "to_numpy") else r[4],
                                                    np.float32)) for r in rows}
    vectors = np.asarray(t.column("embedding").combine_chunks().flatten().to_numpy(zero_copy_only=False))
    vectors = vectors.reshape(t.num_rows, -1)
    return {i: (d, x, txt, vectors[k]) for k, (i, d, x, txt) in enumerate(zip(
        t.column("id").to_pylist(), t.column("document").to_pylist(), t.column("index").to_pylist(),
        t.column("text").to_pylist(), strict=True))}


def sync(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, dict | str]:
    """Run ``deposium-submit --sync --local --json ARGS`` in this process; (exit code, summary or stderr)."""
    code = main([*args, "--sync", "--local", "--json", "--no-progress"])
    out = capsys.readouterr()
    if code == 2:
        return code, out.err
    return code, json.loads(out.out.strip().splitlines()[-1])


#: Distinct one-block paragraphs (no blank line inside, short enough never to be split).
PARAGRAPHS = list(dict.fromkeys(t.strip() for t in stdlib_docstrings()
                                if 60 < len(t) < 500 and "\n\n" not in t.strip()))


def write_folder(root: Path, docs: dict[str, list[str]]) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for old in root.glob("*.txt"):
        old.unlink()
    for name, paras in docs.items():
        (root / f"{name}.txt").write_text("\n\n".join(paras) + "\n", encoding="utf-8")


def first_collection() -> dict[str, list[str]]:
    return {f"doc{d}": PARAGRAPHS[d * 8:(d + 1) * 8] for d in range(8)}


def edited(docs: dict[str, list[str]]) -> tuple[dict[str, list[str]], set[str]]:
    """Insert and edit in doc0, remove in doc1, delete doc2, add doc8 (one paragraph shared with doc3)."""
    new = {k: list(v) for k, v in docs.items()}
    fresh = PARAGRAPHS[100:104]
    new["doc0"].insert(0, fresh[0])
    new["doc0"][4] = new["doc0"][4] + " (edited)"
    del new["doc1"][2]
    del new["doc2"]
    new["doc8"] = [docs["doc3"][1], fresh[1], fresh[2]]
    added = {fresh[0], new["doc0"][4], fresh[1], fresh[2]}
    return new, added


# -- the workflow ------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", SINKS)
def test_sync_follows_edits_like_a_fresh_sync(kind: str, request: pytest.FixtureRequest, env: dict, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]):
    pg = request.getfixturevalue("pg") if kind == "pgvector" else None
    folder = tmp_path / "docs"
    docs = first_collection()
    write_folder(folder, docs)
    target = target_for(kind, tmp_path, "synced", pg)

    code, first = sync(capsys, str(folder), "--out", target)
    assert code == 0, first
    texts = {p for paras in docs.values() for p in paras}
    assert (first["documents_new"], first["paragraphs_embedded"]) == (8, len(texts))
    before = read_store(kind, target)
    assert len(before) == 64

    code, again = sync(capsys, str(folder), "--out", target)
    assert code == 0 and again["documents_unchanged"] == 8
    assert again["paragraphs_embedded"] == again["paragraphs_written"] == again["paragraphs_deleted"] == 0

    new, added = edited(docs)
    write_folder(folder, new)
    code, plan = sync(capsys, str(folder), "--out", target, "--dry-run")
    assert code == 0 and read_store(kind, target).keys() == before.keys(), "a dry run wrote"
    code, second = sync(capsys, str(folder), "--out", target)
    assert code == 0, second
    counts = {k: second[k] for k in ("documents_unchanged", "documents_changed", "documents_new",
                                     "documents_deleted", "paragraphs_embedded", "paragraphs_deleted")}
    # deleted: doc2's 8 rows, doc1's removed paragraph, doc0's edited one (it is a new paragraph now)
    assert counts == {"documents_unchanged": 5, "documents_changed": 2, "documents_new": 1,
                      "documents_deleted": 1, "paragraphs_embedded": len(added), "paragraphs_deleted": 10}
    assert {k: plan[k] for k in counts} == counts, "the dry run's plan differs from what the sync did"
    assert second["paragraphs_reused"] == (9 + 7 + 3) - len(added)

    after = read_store(kind, target)
    fresh_target = target_for(kind, tmp_path, "fresh", pg)
    code, full = sync(capsys, str(folder), "--out", fresh_target)
    assert code == 0 and full["paragraphs_embedded"] == len({p for ps in new.values() for p in ps})
    reference = read_store(kind, fresh_target)
    assert after.keys() == reference.keys()
    for row_id, (doc, index, text, vector) in reference.items():
        got = after[row_id]
        assert (got[0], got[1], got[2]) == (doc, index, text), row_id
        np.testing.assert_allclose(got[3], vector, rtol=0, atol=1e-6, err_msg=row_id)
    assert not any(doc.endswith("doc2.txt") for doc, *_ in after.values())
    # ids survive an insertion earlier in the document: doc0's untouched paragraphs keep theirs
    doc0 = str(folder / "doc0.txt")
    kept_before = {i for i, (d, _, text, _) in before.items() if d == doc0 and text in new["doc0"]}
    kept_after = {i for i, (d, _, text, _) in after.items() if d == doc0 and text in docs["doc0"]}
    assert len(kept_before) == 7 and kept_before == kept_after


def test_unchanged_sync_rewrites_no_row(pg: PgCluster, env: dict, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]):
    import psycopg

    folder = tmp_path / "docs"
    docs = first_collection()
    write_folder(folder, docs)
    target = pg.url("untouched")
    assert sync(capsys, str(folder), "--out", target)[0] == 0
    url = target.partition("?table=")[0]

    def xmins() -> dict[str, str]:
        with psycopg.connect(url) as conn:
            return dict(conn.execute('SELECT id, xmin::text FROM "untouched"').fetchall())

    before = xmins()
    docs["doc5"].append(PARAGRAPHS[120])  # one document changes: only its new row is written
    write_folder(folder, docs)
    code, summary = sync(capsys, str(folder), "--out", target)
    assert code == 0 and summary["documents_changed"] == 1 and summary["paragraphs_embedded"] == 1
    after = xmins()
    assert len(after) == len(before) + 1
    assert {i: after[i] for i in before} == before, "rows of unchanged paragraphs were rewritten"


# -- refusals ----------------------------------------------------------------------------------------
def test_refusals_before_any_work(env: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    docs = first_collection()
    a, b = tmp_path / "a", tmp_path / "b"
    write_folder(a, dict(list(docs.items())[:4]))
    write_folder(b, dict(list(docs.items())[4:]))
    out = tmp_path / "store.parquet"
    assert sync(capsys, str(a), "--out", str(out))[0] == 0
    stamp = out.stat().st_mtime_ns

    code, err = sync(capsys, str(a), "--out", str(out), "--dtype", "float16")
    assert code == 2 and "other embedding options: dtype 'float32' (now 'float16')" in err and "--replace" in err
    code, err = sync(capsys, str(b), "--out", str(out))
    assert code == 2 and "synced from other sources" in err and "--keep-missing" in err
    assert out.stat().st_mtime_ns == stamp and not out.with_name("store.parquet.sync").exists()

    code, kept = sync(capsys, str(b), "--out", str(out), "--keep-missing")
    assert code == 0 and kept["documents_new"] == 4 and kept["documents_kept_missing"] == 4
    assert len({d for d, *_ in read_store("parquet", str(out)).values()}) == 8
    code, removed = sync(capsys, str(b), "--out", str(out), "--delete-missing")
    assert code == 0 and removed["documents_deleted"] == 4 and removed["paragraphs_deleted"] == 32
    assert {Path(d).parent.name for d, *_ in read_store("parquet", str(out)).values()} == {"b"}

    code, rebuilt = sync(capsys, str(b), "--out", str(out), "--dtype", "float16", "--replace")
    assert code == 0 and rebuilt["documents_new"] == 4 and rebuilt["paragraphs_embedded"] == 32

    job_out = tmp_path / "job.parquet"
    assert main([str(a), "--out", str(job_out), "--local", "--no-progress"]) == 0
    capsys.readouterr()
    code, err = sync(capsys, str(a), "--out", str(job_out))
    assert code == 2 and "written by a plain job" in err
    assert main([str(a), "--out", str(job_out), "--local", "--keep-missing"]) == 2
    assert "apply to --sync only" in capsys.readouterr().err


def test_api_sync(env: dict, minilm_artifact: Path, tmp_path: Path):
    from deposium.producer import submit

    docs = [(f"d{i}", "\n\n".join(PARAGRAPHS[i * 3:(i + 1) * 3])) for i in range(5)]
    out = tmp_path / "api.parquet"
    first = submit(docs, out=out, local=True, sync=True, background=False).wait()
    assert first.ok and first.documents_new == 5 and first.paragraphs_embedded == 15
    docs[0] = ("d0", docs[0][1] + "\n\n" + PARAGRAPHS[200])
    second = submit(docs[:4], out=out, local=True, sync=True, background=False).wait()
    assert (second.documents_changed, second.documents_deleted, second.paragraphs_embedded) == (1, 1, 1)
    assert {d for d, *_ in read_store("parquet", str(out)).values()} == {"d0", "d1", "d2", "d3"}


def committed_something(kind: str, target: str) -> bool:
    """A group of the running sync is in the store (or its Parquet staging folder)."""
    try:
        if kind == "parquet":
            return any(Path(target + ".sync").glob("rows-*.parquet"))
        return len(read_store(kind, target)) > 0
    except Exception:  # noqa: BLE001 - the store does not exist yet
        return False


# -- kill -9 -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", SINKS)
def test_kill_mid_sync_then_rerun_converges(kind: str, request: pytest.FixtureRequest, minilm_artifact: Path,
                                            tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                            monkeypatch: pytest.MonkeyPatch):
    pg = request.getfixturevalue("pg") if kind == "pgvector" else None
    big = {f"doc{d:02d}": PARAGRAPHS[d * 12:(d + 1) * 12] for d in range(30)}
    folder = tmp_path / "docs"
    write_folder(folder, big)
    run_env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    run_env.update(DEPOSIUM_ARTIFACT=str(minilm_artifact), DEPOSIUM_CACHE_DIR=str(tmp_path / "cache"),
                   DEPOSIUM_SYNC_GROUP_PARAGRAPHS="48", DEPOSIUM_BATCH_TOKENS="600")
    target = target_for(kind, tmp_path, "killed", pg)
    cmd = submit_cmd(str(folder), "--out", target, "--sync", "--local", "--no-progress", "--json")
    # kill the first sync once a group is committed, then a second one over an edited folder
    for round_ in range(2):
        if round_ == 1:
            big["doc00"].insert(0, PARAGRAPHS[400])
            del big["doc07"]
            big["doc31"] = PARAGRAPHS[401:405]
            write_folder(folder, big)
        proc = subprocess.Popen(cmd, env=run_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:
            if round_ == 0 and committed_something(kind, target) or round_ == 1 and time.monotonic() > deadline - 117:
                break
            time.sleep(0.05)
        killed = proc.poll() is None
        if killed:
            os.kill(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=60)
        if round_ == 0:
            assert killed, "the sync finished before its first commit was seen: no kill was exercised"
        done = subprocess.run(cmd, env=run_env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        summary = json.loads(done.stdout.strip().splitlines()[-1])
        assert summary["documents_unchanged"] + summary["documents_changed"] + summary["documents_new"] == len(big)
    monkeypatch.setenv("DEPOSIUM_ARTIFACT", str(minilm_artifact))
    monkeypatch.setenv("DEPOSIUM_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("REDIS_URL", raising=False)
    fresh = target_for(kind, tmp_path, "fresh_after_kill", pg)
    assert sync(capsys, str(folder), "--out", fresh)[0] == 0
    got, want = read_store(kind, target), read_store(kind, fresh)
    assert got.keys() == want.keys() and len(got) == sum(len(v) for v in big.values())
    for row_id, row in want.items():
        assert got[row_id][:3] == row[:3]
        np.testing.assert_allclose(got[row_id][3], row[3], rtol=0, atol=1e-6)


# -- queued mode ---------------------------------------------------------------------------------------
def test_queued_sync_sends_only_new_text_to_the_workers(redis_server, minilm_artifact: Path, tmp_path: Path):
    from tests.test_producer_support import received_task_ids, start_worker, stop, wait_for_worker

    log = tmp_path / "worker.log"
    proc = start_worker(redis_server.url, minilm_artifact, log, concurrency=1)
    try:
        wait_for_worker(redis_server.url, proc, log)
        run_env = dict(os.environ, REDIS_URL=redis_server.url, DEPOSIUM_ARTIFACT=str(minilm_artifact),
                       DEPOSIUM_CACHE_DIR=str(tmp_path / "cache"))
        folder = tmp_path / "docs"
        docs = first_collection()
        write_folder(folder, docs)
        out = tmp_path / "queued.parquet"
        cmd = submit_cmd(str(folder), "--out", str(out), "--sync", "--no-progress", "--json")
        first = subprocess.run(cmd, env=run_env, capture_output=True, text=True, timeout=300)
        assert first.returncode == 0, first.stderr
        sent_first = len(received_task_ids(log))
        assert sent_first >= 1
        new, added = edited(docs)
        write_folder(folder, new)
        second = subprocess.run(cmd, env=run_env, capture_output=True, text=True, timeout=300)
        assert second.returncode == 0, second.stderr
        summary = json.loads(second.stdout.strip().splitlines()[-1])
        assert summary["paragraphs_embedded"] == len(added) and summary["documents_deleted"] == 1
        # the worker received exactly one more task: the four new texts fit in one batch
        assert len(received_task_ids(log)) == sent_first + 1
        stored = read_store("parquet", str(out))
        assert added <= {text for _, _, text, _ in stored.values()}
        assert len(stored) == sum(len(v) for v in new.values())
    finally:
        stop(proc)


# -- documents with provenance -------------------------------------------------------------------------
def test_a_changed_pdf_page_re_embeds_that_pages_paragraphs_only(env: dict, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]):
    """A PDF whose page 4 was replaced: only text of the new page is embedded, the other pages'
    rows keep their ids and vectors, and every row still names its page."""
    from pypdf import PdfReader, PdfWriter

    source = Path(__file__).parent / "data" / "shared-mime-info-spec.pdf"
    folder = tmp_path / "docs"
    folder.mkdir()
    pdf = folder / "spec.pdf"

    def write(pages: list[int]) -> None:
        reader, writer = PdfReader(source), PdfWriter()
        for n in pages:
            writer.add_page(reader.pages[n - 1])
        with open(pdf, "wb") as fh:
            writer.write(fh)

    write([1, 2, 3, 4, 5, 6])
    out = tmp_path / "pdf.parquet"
    code, first = sync(capsys, str(folder), "--out", str(out))
    assert code == 0 and first["documents_new"] == 1, first
    before = pq.read_table(out).to_pylist()
    write([1, 2, 3, 9, 5, 6])
    code, second = sync(capsys, str(folder), "--out", str(out))
    assert code == 0 and second["documents_changed"] == 1, second
    after = pq.read_table(out).to_pylist()
    old_hashes = {r["content_hash"] for r in before}
    new_rows = [r for r in after if r["content_hash"] not in old_hashes]
    assert second["paragraphs_embedded"] == len({r["content_hash"] for r in new_rows}) > 0
    assert {r["page"] for r in new_rows} <= {3, 4, 5}, "text outside the changed page was re-embedded"
    assert second["paragraphs_embedded"] < len(after) / 3
    kept = {r["id"]: r for r in before if r["page"] in {1, 2, 6}}
    assert kept and all(i in {r["id"] for r in after} for i in kept), "ids of untouched pages changed"
    assert all(r["page"] is not None for r in after)


def test_options_a_store_does_not_record_match_their_neutral_value():
    from deposium.producer.sync.store import SYNC_FORMAT, identity_mismatch

    wanted = {"format": SYNC_FORMAT, "model": "m", "dim": 384, "chunk_tokens": 0, "chunk_overlap": 0}
    older = {"format": SYNC_FORMAT, "model": "m", "dim": 384}
    assert identity_mismatch(older, wanted, "t") is None
    why = identity_mismatch(older, dict(wanted, chunk_tokens=256), "t")
    assert why is not None and "chunk_tokens 0 (now 256)" in why
