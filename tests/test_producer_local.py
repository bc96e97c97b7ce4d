"""Local mode (the embedded default) end to end: CLI, library API, bad input, resume after kill -9."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from producer import submit
from tests.redis_proc import free_port
from tests.test_producer_support import ROOT, VENV_BIN, corpus, submit_cmd, write_jsonl


def _env(tmp_path: Path, artifact: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    env.update(DEPOSIUM_ARTIFACT=str(artifact), DEPOSIUM_CACHE_DIR=str(tmp_path / "cache"), **extra)
    return env


def _run(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(submit_cmd(*args), env=env, cwd=cwd, capture_output=True, text=True, timeout=600)


def test_cli_help_works_for_both_commands():
    for cmd in ("deposium-submit", "deposium-jobs"):
        r = subprocess.run([str(VENV_BIN / cmd), "--help"], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0 and "usage:" in r.stdout


def test_bad_inputs_are_reported_and_the_rest_is_embedded(tmp_path: Path, minilm_artifact: Path):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "good.txt").write_text("The first paragraph of a good file.\n\nIts second paragraph, fine.\n")
    (docs / "notes.md").write_text("# Heading\n\nA markdown paragraph under the heading.\n")
    (docs / "binary.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00")
    (docs / "latin1.txt").write_bytes("Un caf\xe9 cr\xe8me.\n".encode("latin-1"))
    (docs / "empty.md").write_text("   \n\n")
    (docs / "unreadable.txt").symlink_to("/proc/self/mem")
    (docs / "rows.jsonl").write_text(
        json.dumps({"id": "r1", "text": "A paragraph coming from a JSON line."}) + "\n"
        + '{"id": "r2", "text": "unterminated\n'
        + json.dumps({"id": "r3", "text": "Another JSON line paragraph that is fine."}) + "\n")
    out = tmp_path / "out.parquet"
    env = _env(tmp_path, minilm_artifact)
    r = _run(["docs", "--out", str(out), "--local", "--no-progress"], env, tmp_path)
    assert r.returncode == 1, r.stderr  # finished, but something failed
    assert "Traceback" not in r.stderr
    assert "5 paragraphs written" in r.stdout and "5 input errors" in r.stdout
    table = pq.read_table(out)
    ids = sorted(table.column("id").to_pylist())
    assert ids == ["docs/good.txt#0", "docs/good.txt#1", "docs/notes.md#0", "r1#0", "r3#0"]
    texts = dict(zip(table.column("id").to_pylist(), table.column("text").to_pylist(), strict=True))
    assert texts["docs/notes.md#0"] == "# Heading\n\nA markdown paragraph under the heading."
    vectors = np.array(table.column("embedding").to_pylist(), dtype=np.float32)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-3)
    errors = [json.loads(line) for line in (tmp_path / "out.parquet.errors.jsonl").read_text().splitlines()]
    by_origin = {Path(e["origin"]).name: e["reason"] for e in errors}
    assert by_origin["binary.txt"].startswith("binary file")
    assert by_origin["latin1.txt"].startswith("invalid UTF-8")
    assert by_origin["empty.md"] == "empty document"
    assert by_origin["unreadable.txt"].startswith("unreadable")
    assert by_origin["rows.jsonl:2"].startswith("malformed JSON")
    assert len(errors) == 5


def test_redis_unreachable_is_one_clear_line(tmp_path: Path, minilm_artifact: Path):
    env = _env(tmp_path, minilm_artifact, REDIS_URL=f"redis://:hunter2@127.0.0.1:{free_port()}/0",
               DEPOSIUM_REDIS_CONNECT_TIMEOUT="0.5")
    (tmp_path / "a.txt").write_text("Some paragraph that would be embedded.\n")
    r = _run(["a.txt", "--out", "o.parquet"], env, tmp_path)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot reach Redis at redis://:***@127.0.0.1" in lines[0], r.stderr
    assert "hunter2" not in r.stderr + r.stdout
    jobs = subprocess.run([str(VENV_BIN / "deposium-jobs")], env=env, capture_output=True, text=True,
                          timeout=60)
    assert jobs.returncode == 2 and len(jobs.stderr.strip().splitlines()) == 1
    assert "Traceback" not in jobs.stderr


def test_library_submit_with_duplicates_and_resume(tmp_path: Path, minilm_artifact: Path):
    texts = corpus(400)
    docs = [(f"d{i}", t) for i, t in enumerate(texts)] + [("again", texts[3]), ("again2", texts[250])]
    out = tmp_path / "lib.parquet"
    handle = submit(docs, out=out, local=True, artifact_dir=minilm_artifact, batch_tokens=600,
                    min_chars=1)
    summary = handle.wait()
    assert summary.ok and summary.state == "done"
    assert handle.progress.embedded == len(docs)
    table = handle.results()
    assert table.num_rows == len(docs) == len(set(table.column("id").to_pylist()))
    vec = dict(zip(table.column("id").to_pylist(), table.column("embedding").to_pylist(), strict=True))
    assert vec["again#0"] == vec["d3#0"] and vec["again2#0"] == vec["d250#0"]
    # every distinct text was embedded once: duplicates reused a vector instead
    assert summary.duplicates >= 2
    # the same call again resumes: nothing is sent, the output is unchanged
    again = submit(docs, out=out, local=True, artifact_dir=minilm_artifact, batch_tokens=600,
                   min_chars=1).wait()
    assert again.batches_sent == 0 and again.batches_skipped == summary.batches
    assert pq.read_table(out).equals(table)


def test_local_job_killed_and_rerun_completes_without_resending_done_batches(tmp_path: Path,
                                                                              minilm_artifact: Path):
    texts = corpus(1500)
    write_jsonl(tmp_path / "in.jsonl", texts)
    env = _env(tmp_path, minilm_artifact)
    args = ["in.jsonl", "--out", "k.parquet", "--local", "--batch-tokens", "300", "--no-progress", "--json"]
    proc = subprocess.Popen(submit_cmd(*args), env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    parts = tmp_path / "k.parquet.parts"
    deadline = time.monotonic() + 300
    while len(list(parts.glob("b*.parquet"))) < 5 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = {p.name.split(".")[0] for p in parts.glob("b*.parquet")}
    assert len(done_before) >= 5
    r = subprocess.run(submit_cmd(*args), env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["batches_skipped"] == len(done_before)
    assert summary["batches_sent"] == summary["batches"] - len(done_before)
    table = pq.read_table(tmp_path / "k.parquet")
    ids = table.column("id").to_pylist()
    assert len(ids) == len(set(ids)) == len(texts)
    assert set(ids) == {f"p{i:06d}#0" for i in range(len(texts))}


def test_local_jobs_are_listed(tmp_path: Path, minilm_artifact: Path):
    (tmp_path / "a.txt").write_text("A paragraph for the job listing test.\n")
    env = _env(tmp_path, minilm_artifact)
    assert _run(["a.txt", "--out", "l.parquet", "--local"], env, tmp_path).returncode == 0
    r = subprocess.run([str(VENV_BIN / "deposium-jobs"), "list", "--json"], env=env, capture_output=True,
                       text=True, timeout=60, cwd=ROOT)
    jobs = json.loads(r.stdout)
    assert [(j["mode"], j["state"], j["counts"]["written"]) for j in jobs] == [("local", "done", 1)]
