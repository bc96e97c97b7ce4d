"""Producer pieces in isolation: readers, splitter, batching, Parquet sink (real tokenizer, real files)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from deposium.producer.batching import Limits, make_batches
from deposium.producer.model import InputError, Paragraph, content_hash
from deposium.producer.readers import Source, read_inputs
from deposium.producer.schema import rows_table
from deposium.producer.sinks import SinkError, SinkJob, open_sink
from deposium.producer.split import split_blocks
from deposium.producer.tokens import TokenCounter
from deposium.worker.tokenize import ParagraphTokenizer


@pytest.fixture(scope="module")
def counter(minilm_dir: Path) -> TokenCounter:
    """The real MiniLM tokenizer with a small window, so over-long paragraphs are cheap to make."""
    return TokenCounter(ParagraphTokenizer(minilm_dir / "tokenizer.json", max_seq_length=64))


def _items(inputs, **kw):
    items = list(read_inputs([str(i) for i in inputs], **kw))
    docs = {i.id: [b.text for b in i.blocks()] for i in items if isinstance(i, Source)}
    errors = [i for i in items if isinstance(i, InputError)]
    return docs, errors


# -- readers ----------------------------------------------------------------------------------
def test_bad_inputs_each_become_one_error_and_the_rest_is_read(tmp_path: Path):
    good = tmp_path / "good.txt"
    good.write_text("First paragraph here.\nStill first.\n\n\nSecond paragraph.\n", encoding="utf-8")
    (tmp_path / "binary.txt").write_bytes(b"abc\x00\x01\x02def")
    (tmp_path / "latin1.md").write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    (tmp_path / "empty.txt").write_text("", encoding="utf-8")
    # a file whose read fails even for root: /proc/self/mem at offset 0 gives EIO
    (tmp_path / "unreadable.txt").symlink_to("/proc/self/mem")
    (tmp_path / "docs.jsonl").write_text(
        json.dumps({"id": "a", "text": "Alpha text."}) + "\n"
        + "{not json\n"
        + json.dumps({"id": "b"}) + "\n"
        + json.dumps(["not", "an", "object"]) + "\n"
        + '{"id": "s", "text": "lone \\ud800 surrogate"}\n'
        + json.dumps({"id": "a", "text": "duplicate id"}) + "\n"
        + json.dumps({"id": 7, "text": "Integer ids are fine."}) + "\n", encoding="utf-8")
    with open(tmp_path / "docs.jsonl", "ab") as fh:
        fh.write(b'{"id": "u", "text": "bad \xff byte"}\n')
    docs, errors = _items([good, tmp_path / "binary.txt", tmp_path / "latin1.md", tmp_path / "empty.txt",
                           tmp_path / "unreadable.txt", tmp_path / "docs.jsonl", tmp_path / "missing.txt"])
    assert docs[str(good)] == ["First paragraph here.\nStill first.", "Second paragraph."]
    assert docs["a"] == ["Alpha text."] and docs["7"] == ["Integer ids are fine."]
    assert docs[str(tmp_path / "latin1.md")] == ["caf\xe9 au lait"]  # Windows-1252, decoded, not dropped
    assert docs[str(tmp_path / "empty.txt")] == []  # empty: the runner records it (see local tests)
    reasons = {e.origin.replace(str(tmp_path) + "/", ""): e.reason for e in errors}
    assert reasons["binary.txt"].startswith("binary file")
    assert reasons["unreadable.txt"].startswith("unreadable")
    assert reasons["missing.txt"] == "no such file or directory"
    assert reasons["docs.jsonl:2"].startswith("malformed JSON")
    assert "text" in reasons["docs.jsonl:3"]
    assert reasons["docs.jsonl:4"] == "line is not a JSON object"
    assert "surrogate" in reasons["docs.jsonl:5"]
    assert reasons["docs.jsonl:6"].startswith("duplicate document id")
    assert reasons["docs.jsonl:8"].startswith("invalid UTF-8")
    assert len(errors) == 9


def test_directories_and_globs_expand_in_a_stable_order(tmp_path: Path):
    for name in ["b/2.md", "b/1.txt", "a.txt", "skip.bin", ".hidden/x.txt"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(f"text of {name}", encoding="utf-8")
    docs, errors = _items([tmp_path])
    assert list(docs) == [str(tmp_path / n) for n in ["a.txt", "b/1.txt", "b/2.md"]]
    # a file no reader takes is listed, never skipped in silence; hidden ones are not inputs
    assert [(e.origin, e.reason, e.skipped) for e in errors] == [
        (str(tmp_path / "skip.bin"), "unsupported format: .bin", "unsupported format: .bin")]
    docs, errors = _items([f"{tmp_path}/b/*"])
    assert list(docs) == [str(tmp_path / "b/1.txt"), str(tmp_path / "b/2.md")]
    assert not errors


def test_stdin_is_spooled_and_read_as_one_document(tmp_path: Path):
    import io

    docs, errors = _items(["-"], stdin=io.BytesIO(b"one para\n\ntwo para\n"))
    assert docs == {"<stdin>": ["one para", "two para"]} and not errors


# -- splitting --------------------------------------------------------------------------------
def test_long_paragraphs_split_at_sentences_within_the_window(counter: TokenCounter):
    sentences = [f"Sentence number {i} talks about topic {i * 7} in a few plain words." for i in range(30)]
    block = " ".join(sentences)
    assert counter.count([block])[0] > counter.max_tokens
    paragraphs = list(split_blocks("doc", [block], counter, min_chars=20))
    assert len(paragraphs) > 1
    assert all(p.tokens <= counter.max_tokens for p in paragraphs)
    assert [p.tokens for p in paragraphs] == counter.count([p.text for p in paragraphs])
    # cut only between sentences, nothing lost or reordered
    assert " ".join(p.text for p in paragraphs) == block
    assert all(p.text.endswith(".") for p in paragraphs)
    assert [p.id for p in paragraphs] == [f"doc#{i}" for i in range(len(paragraphs))]


def test_a_sentence_longer_than_the_window_is_split_at_words(counter: TokenCounter):
    block = " ".join(f"word{i}" for i in range(200))
    paragraphs = list(split_blocks("d", [block], counter))
    assert len(paragraphs) > 1 and all(p.tokens <= counter.max_tokens for p in paragraphs)
    assert " ".join(p.text for p in paragraphs) == block


def test_tiny_fragments_merge_into_their_neighbours(counter: TokenCounter):
    blocks = ["# Title", "A real paragraph with enough characters.", "Another real paragraph, long enough.",
              "The end."]
    paragraphs = list(split_blocks("d", blocks, counter, min_chars=20))
    assert [p.text for p in paragraphs] == [
        "# Title\n\nA real paragraph with enough characters.",
        "Another real paragraph, long enough.\n\nThe end.",
    ]
    # a document that is only a fragment keeps it
    assert [p.text for p in split_blocks("e", ["Hi."], counter)] == ["Hi."]


def test_splitting_is_deterministic(counter: TokenCounter):
    blocks = ["x " * 100, "Short one.", "Tail paragraph that is long enough to stand."]
    a = list(split_blocks("d", blocks, counter))
    b = list(split_blocks("d", blocks, counter))
    assert a == b and all(p.hash == content_hash(p.text) for p in a)


# -- batching ---------------------------------------------------------------------------------
def _para(doc: str, i: int, text: str, tokens: int) -> Paragraph:
    return Paragraph(document=doc, index=i, text=text, tokens=tokens, hash=content_hash(text))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["a", "b", "c", "dd", "eee", "ffff", "g g", "h"]),
                          st.integers(1, 40)), max_size=120),
       st.integers(1, 100), st.integers(1, 8))
def test_batches_partition_in_order_within_limits_and_embed_each_text_once(items, budget, max_texts):
    paragraphs = [_para("d", i, text, tokens) for i, (text, tokens) in enumerate(items)]
    # identical texts get the same token count, as the tokenizer would give them
    first_tokens: dict[str, int] = {}
    paragraphs = [_para("d", p.index, p.text, first_tokens.setdefault(p.text, p.tokens)) for p in paragraphs]
    limits = Limits(tokens=budget, paragraphs=max_texts)
    batches = list(make_batches(paragraphs, limits))
    again = list(make_batches(paragraphs, limits))
    assert [b.digest() for b in batches] == [b.digest() for b in again]
    assert [p for b in batches for p in b.rows] == paragraphs
    owner: dict[str, str] = {}
    for b in batches:
        assert len(b.texts) <= max_texts
        assert b.tokens <= budget or len(b.texts) == 1
        for text in b.texts:
            assert content_hash(text) not in owner  # embedded once per job
            owner[content_hash(text)] = b.id
        for h, ref in b.refs.items():
            assert owner[h] == ref and ref < b.id  # aliases point at an earlier batch
        assert all(p.hash in b.own or p.hash in b.refs for p in b.rows)


# -- Parquet sink -----------------------------------------------------------------------------
def _rows(texts: list[str], dim: int = 4, start: int = 0):
    ps = [_para("doc", start + i, t, 3) for i, t in enumerate(texts)]
    vectors = np.arange(len(ps) * dim, dtype=np.float32).reshape(len(ps), dim) + start
    return ps, rows_table(ps, vectors, [3] * len(ps), [False] * len(ps), dim=dim)


def test_parquet_sink_commits_batches_atomically_and_merges_once(tmp_path: Path):
    out = tmp_path / "e.parquet"
    job = SinkJob(job_id="j1", dim=4, dtype="float32", model_sha256="m" * 64)
    sink = open_sink(str(out))
    sink.open(job)
    assert sink.done_batches() == {}
    ps0, t0 = _rows(["alpha", "beta"])
    ps1, t1 = _rows(["gamma"], start=2)
    sink.write_batch("b0000001", "d1", t1)
    sink.write_batch("b0000000", "d0", t0)
    sink.write_batch("b0000000", "d0", t0)  # re-commit replaces, never duplicates
    (sink.parts / ".b0000002.999.tmp").write_bytes(b"half a file")  # a crash mid-write
    sink.release()  # what a killed producer's lock does: nothing published
    reopened = open_sink(str(out))
    reopened.open(job)
    assert reopened.done_batches() == {"b0000000": "d0", "b0000001": "d1"}
    assert not list(reopened.parts.glob(".*.tmp"))
    found = reopened.lookup({content_hash("gamma"): "b0000001", content_hash("nope"): "b0000000"})
    assert list(found) == [content_hash("gamma")]
    np.testing.assert_array_equal(found[content_hash("gamma")].vector, np.arange(4, dtype=np.float32) + 2)
    reopened.close(complete=True)
    table = pq.read_table(out)
    assert table.column("id").to_pylist() == ["doc#0", "doc#1", "doc#2"]
    assert table.schema.field("embedding").type.list_size == 4
    assert not reopened.parts.exists()
    # the finished file still answers done_batches: re-running is a no-op
    done = open_sink(str(out))
    done.open(job)
    assert done.done_batches() == {"b0000000": "d0", "b0000001": "d1"}


def test_parquet_sink_refuses_another_jobs_output(tmp_path: Path):
    out = tmp_path / "e.parquet"
    sink = open_sink(str(out))
    sink.open(SinkJob(job_id="j1", dim=4, dtype="float32", model_sha256="m"))
    sink.write_batch("b0000000", "d", _rows(["x"])[1])
    other = SinkJob(job_id="j2", dim=8, dtype="float32", model_sha256="m")
    sink.release()
    with pytest.raises(SinkError, match="unfinished job j1"):
        open_sink(str(out)).open(other)
    again = open_sink(str(out))
    again.open(SinkJob(job_id="j1", dim=4, dtype="float32", model_sha256="m"))
    again.close(complete=True)
    with pytest.raises(SinkError, match="already exists"):
        open_sink(str(out)).open(other)
    fresh = open_sink(str(out))
    fresh.open(SinkJob(job_id="j2", dim=8, dtype="float32", model_sha256="m", replace=True))
    assert fresh.done_batches() == {}
    (tmp_path / "foreign.parquet").write_bytes(b"not parquet")
    with pytest.raises(SinkError, match="not written by this job"):
        open_sink(str(tmp_path / "foreign.parquet")).open(other)
    assert os.path.exists(tmp_path / "foreign.parquet")


def test_parquet_sink_is_held_by_one_producer_at_a_time(tmp_path: Path):
    out = tmp_path / "e.parquet"
    first = open_sink(str(out))
    first.open(SinkJob(job_id="j1", dim=4, dtype="float32", model_sha256="m"))
    first.write_batch("b0000000", "d", _rows(["x"])[1])
    second = open_sink(str(out))
    with pytest.raises(SinkError, match=r"is being written by job j1 \(pid \d+ on "):
        second.open(SinkJob(job_id="j1", dim=4, dtype="float32", model_sha256="m"))
    with pytest.raises(SinkError, match="is being written by job j1"):  # --replace does not barge in
        second.open(SinkJob(job_id="j1", dim=4, dtype="float32", model_sha256="m", replace=True))
    assert first.done_batches() == {"b0000000": "d"}  # the refused one removed nothing
    first.close(complete=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e.parquet"]  # the lock file went too
    second.open(SinkJob(job_id="j1", dim=4, dtype="float32", model_sha256="m"))
    assert second.done_batches() == {"b0000000": "d"}


def test_parquet_replace_starts_over_even_for_the_same_job(tmp_path: Path):
    out = tmp_path / "e.parquet"
    job = SinkJob(job_id="j1", dim=4, dtype="float32", model_sha256="m")
    sink = open_sink(str(out))
    sink.open(job)
    sink.write_batch("b0000000", "d", _rows(["x"])[1])
    sink.release()
    again = open_sink(str(out))
    again.open(SinkJob(job_id="j1", dim=4, dtype="float32", model_sha256="m", replace=True))
    assert again.done_batches() == {}
    again.close(complete=True)
    finished = open_sink(str(out))
    finished.open(SinkJob(job_id="j1", dim=4, dtype="float32", model_sha256="m", replace=True))
    assert finished.done_batches() == {}  # a finished output is redone too, not resumed


@pytest.mark.parametrize("name, message", [
    ("out.csv", "must end in .parquet"),
    ("adir", "is a directory"),
    ("adir.parquet", "is a directory"),
    ("missing/out.parquet", "does not exist"),
])
def test_parquet_output_that_cannot_be_written_is_refused_when_named(tmp_path: Path, name: str, message: str):
    (tmp_path / "adir").mkdir()
    (tmp_path / "adir.parquet").mkdir()
    before = sorted(tmp_path.rglob("*"))
    with pytest.raises(SinkError, match=message):
        open_sink(str(tmp_path / name))
    assert sorted(tmp_path.rglob("*")) == before


def test_parquet_output_in_an_unwritable_place_is_refused_when_named():
    with pytest.raises(SinkError, match="cannot write the output /proc/out.parquet"):
        open_sink("/proc/out.parquet")  # not writable, even by root


def test_unknown_sink_targets_are_refused_clearly():
    with pytest.raises(SinkError, match="unknown sink target"):
        open_sink("ftp://x/y")


def test_sink_url_passwords_never_reach_the_job_record(minilm_artifact):
    from deposium.producer.job import plan_job
    from deposium.producer.runner import JobOptions
    from deposium.worker.config import Settings, mask_url

    def without_password(url: str) -> str:
        return mask_url(url, drop_password=True)

    assert without_password("postgresql://bob:s3cret@db:5432/x?table=t") == "postgresql://bob@db:5432/x?table=t"
    assert without_password("/data/out.parquet") == "/data/out.parquet"
    settings = Settings(cache_dir=minilm_artifact.parent)
    options = JobOptions(batch_tokens=2048, max_in_flight=2)
    plans = [plan_job(inputs=["a.txt"], target=f"postgresql://bob:{pw}@db/x?table=t", options=options,
                      settings=settings, local=True, artifact_dir=minilm_artifact) for pw in ("s3cret", "other")]
    assert "s3cret" not in repr(plans[0].spec)
    assert plans[0].job_id == plans[1].job_id
    assert plans[0].target.startswith("postgresql://bob:s3cret@")  # the live connection still has it
