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
import pytest

from deposium.producer import submit
from deposium.producer.sinks import SinkError
from deposium.worker.errors import EmbedRequestError
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
    assert "6 paragraphs written" in r.stdout and "4 input errors" in r.stdout
    table = pq.read_table(out)
    ids = sorted(table.column("id").to_pylist())
    assert ids == ["docs/good.txt#0", "docs/good.txt#1", "docs/latin1.txt#0", "docs/notes.md#0", "r1#0", "r3#0"]
    texts = dict(zip(table.column("id").to_pylist(), table.column("text").to_pylist(), strict=True))
    assert texts["docs/notes.md#0"] == "# Heading\n\nA markdown paragraph under the heading."
    assert texts["docs/latin1.txt#0"] == "Un caf\xe9 cr\xe8me."  # Windows-1252 detected, not dropped
    vectors = np.array(table.column("embedding").to_pylist(), dtype=np.float32)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-3)
    errors = [json.loads(line) for line in (tmp_path / "out.parquet.errors.jsonl").read_text().splitlines()]
    by_origin = {Path(e["origin"]).name: e["reason"] for e in errors}
    assert by_origin["binary.txt"].startswith("binary file")
    assert by_origin["empty.md"] == "empty document"
    assert by_origin["unreadable.txt"].startswith("unreadable")
    assert by_origin["rows.jsonl:2"].startswith("malformed JSON")
    assert len(errors) == 4


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


#: Options the producer must refuse up front: (arguments, what the one error line must say).
REFUSED = {
    "unknown flag": (["--colour", "blue"], "unrecognized arguments: --colour blue"),
    "unknown task": (["--task", "search"], "unknown task 'search'; known tasks: none"),
    "dim not offered": (["--dim", "100"], "--dim 100 is not offered by this model; choose one of [384]"),
    "dim zero": (["--dim", "0"], "argument --dim: must be at least 1, not 0"),
    "dim not a number": (["--dim", "big"], "argument --dim: 'big' is not an integer"),
    "unknown dtype": (["--dtype", "float64"], "argument --dtype: invalid choice: 'float64'"),
    "batch tokens zero": (["--batch-tokens", "0"], "argument --batch-tokens: must be at least 1, not 0"),
    "max in flight zero": (["--max-in-flight", "0"], "argument --max-in-flight: must be at least 1, not 0"),
    "negative min chars": (["--min-chars", "-1"], "argument --min-chars: must be at least 0, not -1"),
    "unknown stdin format": (["--stdin-format", "xml"], "argument --stdin-format: invalid choice: 'xml'"),
    "unknown index": (["--index", "flat"], "argument --index: invalid choice: 'flat'"),
    "index on parquet": (["--index", "hnsw"], "is a file sink without vector indexes"),
    "unknown sink scheme": (["--out", "ftp://host/x"], "unknown sink target 'ftp://host/x'"),
    "unknown lancedb parameter": (["--out", "lancedb://vec?table=t&colour=blue"], "unknown parameters ['colour']"),
    "unknown lancedb index": (["--out", "lancedb://vec?table=t&index=flat"], "unknown index 'flat'"),
    "unknown postgresql parameter": (["--out", "postgresql://me@127.0.0.1:1/db?table=t&colour=blue"],
                                     'invalid URI query parameter: "colour"'),
    "unknown postgresql index": (["--out", "postgresql://me@127.0.0.1:1/db?table=t&index=ivf"],
                                 "unknown index 'ivf'; use index=hnsw"),
    "unknown job": (["--resume", "jnope"], "no job jnope found (in Redis)"),
    "output not parquet": (["--out", "out.csv"], "the file output is Parquet and its name must end in .parquet"),
    "output is a directory": (["--out", "."], "is a directory; name the .parquet file to write"),
    "replace onto a directory": (["--replace", "--out", "."], "is a directory; name the .parquet file to write"),
    "output directory missing": (["--out", "nodir/o.parquet"], "/nodir does not exist"),
    "output unwritable": (["--out", "/proc/o.parquet"], "cannot write the output /proc/o.parquet"),
}


@pytest.mark.parametrize("case", REFUSED)
def test_unknown_or_unusable_options_are_refused_with_one_line_and_exit_2(case: str, tmp_path: Path,
                                                                        minilm_artifact: Path, redis_server):
    """Each is refused before any work: exit code 2, one ``deposium-submit: error:`` line naming the
    option (argparse adds its usage line), no traceback, nothing sent to Redis (queue mode), no
    job record, no output or errors file."""
    args, expect = REFUSED[case]
    (tmp_path / "a.txt").write_text("A paragraph that must never be embedded.\n")
    env = _env(tmp_path, minilm_artifact, REDIS_URL=redis_server.url)
    r = _run(["a.txt", "--no-progress", *args], env, tmp_path)
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = [line for line in r.stderr.strip().splitlines() if not line.startswith(("usage:", " "))]
    assert len(lines) == 1 and lines[0].startswith("deposium-submit: error: "), r.stderr
    assert expect in lines[0], lines[0]
    assert "Traceback" not in r.stderr and r.stdout == ""
    assert redis_server.client().dbsize() == 0, sorted(redis_server.client().scan_iter())
    files = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file() and "redis" not in p.parts)
    assert files == ["a.txt"], files


def test_library_submit_refuses_unknown_options_before_starting(tmp_path: Path, minilm_artifact: Path):
    """``producer.submit`` raises at the call (not later from ``wait()``), with the same messages."""
    docs = ["A paragraph that must never be embedded."]
    out = tmp_path / "x.parquet"
    cases = [
        ({"task": "search"}, EmbedRequestError, "unknown task 'search'"),
        ({"dim": 100}, ValueError, r"--dim 100 is not offered by this model; choose one of \[384\]"),
        ({"dtype": "float64"}, ValueError, "dtype must be float32 or float16, not 'float64'"),
        ({"max_in_flight": 0}, ValueError, r"max_in_flight \(--max-in-flight\) must be at least 1, not 0"),
        ({"batch_tokens": -1}, ValueError, r"batch_tokens \(--batch-tokens\) must be at least 1, not -1"),
        ({"index": "hnsw"}, SinkError, "file sink without vector indexes"),
        ({"out": "ftp://host/x"}, SinkError, "unknown sink target"),
        ({"out": f"lancedb://{tmp_path}/v?table=t&colour=blue"}, SinkError, r"unknown parameters \['colour'\]"),
        ({"dims": 128}, TypeError, "unexpected keyword argument 'dims'"),
    ]
    for options, error, message in cases:
        kwargs = {"out": out, "local": True, "artifact_dir": minilm_artifact, **options}
        with pytest.raises(error, match=message):
            submit(docs, **kwargs)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_job_naming_no_task_gets_the_models_document_prompt(tmp_path: Path, minilm_artifact: Path):
    """EmbeddingGemma-like manifest: task prompts, no default prompt. A job that forgets --task must not
    store prompt-less vectors for good; --no-prompt (task "") still asks for them explicitly."""
    from deposium.producer.job import plan_job
    from deposium.producer.runner import JobOptions
    from deposium.worker.config import Settings
    from deposium.worker.embedder import Embedder
    from deposium.worker.tokenize import NO_PROMPT, ingestion_task
    from tests.test_embedder import linked_copy

    artifact = linked_copy(minilm_artifact, tmp_path / "prompted",
                           {"prompts": {"query": "query: ", "document": "passage: "}, "default_prompt_name": None})
    texts = ["The first paragraph of a document about rivers and their deltas.",
             "A second paragraph, about the sea, its tides and the moon that drives them."]
    embedder = Embedder(artifact)

    def stored(out: str, **options) -> np.ndarray:
        table = submit([(f"d{i}", t) for i, t in enumerate(texts)], out=tmp_path / out, local=True,
                       artifact_dir=artifact, **options).results()
        return np.array(table.column("embedding").to_pylist(), np.float32)

    document = embedder.embed(texts, task="document").vectors
    bare = embedder.embed(texts, task=NO_PROMPT).vectors
    assert float((document * bare).sum(1).min()) < 0.999  # the prompt moves the vectors
    np.testing.assert_allclose(stored("implied.parquet"), document, atol=1e-6)
    np.testing.assert_allclose(stored("bare.parquet", task=NO_PROMPT), bare, atol=1e-6)
    np.testing.assert_allclose(stored("query.parquet", task="query"), embedder.embed(texts, task="query").vectors,
                               atol=1e-6)

    # the CLI: --no-prompt reaches the same vectors; it and --task exclude each other
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"id": f"d{i}", "text": t}) + "\n"
                                               for i, t in enumerate(texts)))
    r = _run(["in.jsonl", "--out", "cli.parquet", "--local", "--no-prompt", "--no-progress"],
             _env(tmp_path, artifact), tmp_path)
    assert r.returncode == 0, r.stderr
    cli = np.array(pq.read_table(tmp_path / "cli.parquet").column("embedding").to_pylist(), np.float32)
    np.testing.assert_allclose(cli, bare, atol=1e-6)
    r = _run(["in.jsonl", "--out", "x.parquet", "--local", "--no-prompt", "--task", "query"],
             _env(tmp_path, artifact), tmp_path)
    assert r.returncode == 2 and "not allowed with argument" in r.stderr

    # the plan records the resolved task; a resumed job's recorded options are final
    options = JobOptions(batch_tokens=8192)
    plan = plan_job(inputs=["x"], target=str(tmp_path / "p.parquet"), options=options, local=True,
                    artifact_dir=artifact, settings=Settings())
    assert plan.options.task == plan.spec["options"]["task"] == "document"
    resumed = plan_job(inputs=["x"], target=str(tmp_path / "p.parquet"), options=options, local=True,
                       artifact_dir=artifact, settings=Settings(), resolve_task=False)
    assert resumed.options.task is None and resumed.job_id != plan.job_id
    assert ingestion_task(None, {}) is None and ingestion_task(NO_PROMPT, {"document": "p: "}) == NO_PROMPT


def test_inputs_that_name_nothing_are_refused_before_anything_is_created(tmp_path: Path, minilm_artifact: Path):
    (tmp_path / "a.txt").write_text("A paragraph that must never be embedded.\n")
    (tmp_path / "docs").mkdir()
    r = _run(["a.txt", "nope.txt", "docs/*.pdf", "--out", "o.parquet", "--local"],
             _env(tmp_path, minilm_artifact), tmp_path)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert r.stderr.strip().splitlines() == [
        "deposium-submit: error: no such input: nope.txt, docs/*.pdf (matches nothing)"]
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == ["a.txt", "docs"]


def test_a_job_reads_the_manifest_once_and_parses_the_tokenizer_once(tmp_path: Path, minilm_artifact: Path,
                                                                      monkeypatch: pytest.MonkeyPatch):
    """Local mode: token counting and the Embedder share the plan's manifest and tokenizer."""
    import deposium.worker.tokenize as tokenize

    reads: list[str] = []
    read_text = Path.read_text
    parse = tokenize._parse

    def counting_read_text(self: Path, *args, **kwargs):
        if self.name == "manifest.json":
            reads.append(str(self))
        return read_text(self, *args, **kwargs)

    def counting_parse(path: Path):
        reads.append(f"parse {path}")
        return parse(path)

    monkeypatch.setattr(Path, "read_text", counting_read_text)
    monkeypatch.setattr(tokenize, "_parse", counting_parse)
    summary = submit(corpus(30), out=tmp_path / "once.parquet", local=True, artifact_dir=minilm_artifact,
                     batch_tokens=200, min_chars=1, background=False).wait()
    assert summary.ok and summary.embedded == 30 and summary.batches > 1
    assert reads == [str(minilm_artifact / "manifest.json"), f"parse {minilm_artifact / 'tokenizer.json'}"]


def _write_to_closed_pipe(cmd: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    """Run ``cmd`` with stdout a pipe nobody reads any more (``cmd | head`` after head exited)."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        return subprocess.run(cmd, env=env, stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(write_end)


def test_listing_commands_end_quietly_when_their_reader_leaves(tmp_path: Path, minilm_artifact: Path):
    env = _env(tmp_path, minilm_artifact)
    (tmp_path / "a.txt").write_text("A paragraph for the listing that nobody reads to the end.\n")
    assert _run(["a.txt", "--out", "p.parquet", "--local", "--no-progress"], env, tmp_path).returncode == 0
    for cmd in ([str(VENV_BIN / "deposium-jobs")], [str(VENV_BIN / "python"), "-m", "deposium.worker.config"]):
        r = _write_to_closed_pipe(cmd, env)
        assert (r.returncode, r.stderr) == (0, ""), (cmd, r.stderr)


def test_the_test_session_keeps_jobs_out_of_the_users_cache(tmp_path: Path, minilm_artifact: Path):
    """tests/conftest.py points DEPOSIUM_CACHE_DIR at the session's own directory, for this process
    and every subprocess: a job run without naming a cache leaves ~/.cache/deposium untouched."""
    real = Path.home() / ".cache" / "deposium"
    session_cache = Path(os.environ["DEPOSIUM_CACHE_DIR"])
    assert session_cache.resolve() != real.resolve()
    handle = submit(["A paragraph embedded by the library without a cache of its own."],
                    out=tmp_path / "lib.parquet", local=True, artifact_dir=minilm_artifact, background=False)
    assert handle.wait().ok
    (tmp_path / "a.txt").write_text("A paragraph embedded by the CLI without a cache of its own.\n")
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    r = _run(["a.txt", "--out", "cli.parquet", "--local", "--no-progress", "--artifact", str(minilm_artifact),
              "--json"], env, tmp_path)
    assert r.returncode == 0, r.stderr
    cli_job = json.loads(r.stdout)["job_id"]
    mine = {f"{handle.job_id}.path", f"{cli_job}.path"}
    # only this test's own jobs are looked for: other test runs on the machine may share the real dir
    leaked = [p.name for p in real.rglob("*.path") if p.name in mine] if real.is_dir() else []
    assert leaked == []
    assert mine <= {p.name for p in (session_cache / "jobs").glob("*.path")}


def test_replace_starts_a_job_over_after_its_input_changed(tmp_path: Path, minilm_artifact: Path):
    texts = corpus(60)
    write_jsonl(tmp_path / "in.jsonl", texts)
    env = _env(tmp_path, minilm_artifact)
    args = ["in.jsonl", "--out", "r.parquet", "--local", "--batch-tokens", "300", "--no-progress"]
    assert _run(args, env, tmp_path).returncode == 0
    texts[0] = "An edited first paragraph that the earlier run never saw."
    write_jsonl(tmp_path / "in.jsonl", texts)
    r = _run(args, env, tmp_path)
    assert r.returncode == 2 and "the input changed since job" in r.stderr and "--replace" in r.stderr
    r = _run([*args, "--replace"], env, tmp_path)
    assert r.returncode == 0, r.stderr
    table = pq.read_table(tmp_path / "r.parquet")
    assert sorted(table.column("text").to_pylist()) == sorted(texts)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "in.jsonl", "r.parquet", "r.parquet.job.json"]


def test_a_second_producer_on_the_same_output_is_refused_at_once(tmp_path: Path, minilm_artifact: Path):
    """The running producer's lock names its job; the refused one leaves its files alone."""
    from deposium.producer.sinks import SinkJob, open_sink

    write_jsonl(tmp_path / "in.jsonl", corpus(40))
    env = _env(tmp_path, minilm_artifact)
    running = open_sink(str(tmp_path / "o.parquet"))
    running.open(SinkJob(job_id="jrunning", dim=384, dtype="float32", model_sha256="m"))
    (running.parts / ".b0000010.17440.tmp").write_bytes(b"a batch being written")
    for extra in ([], ["--replace"]):
        r = _run(["in.jsonl", "--out", "o.parquet", "--local", "--no-progress", *extra], env, tmp_path)
        assert r.returncode == 2, r.stderr
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and "o.parquet is being written by job jrunning (pid " in lines[0], r.stderr
    assert (running.parts / ".b0000010.17440.tmp").is_file()
    assert not (tmp_path / "o.parquet.job.json").exists() and not (tmp_path / "o.parquet").exists()
    running.release()
    r = _run(["in.jsonl", "--out", "o.parquet", "--local", "--no-progress", "--replace"], env, tmp_path)
    assert r.returncode == 0, r.stderr
    assert pq.read_table(tmp_path / "o.parquet").num_rows == 40
