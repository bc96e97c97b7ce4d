"""``--readers N``: documents read and split in N processes give the very same job as one reader."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pyarrow.parquet as pq

from tests.test_documents import make_encrypted_pdf
from tests.test_documents_sinks import _folder
from tests.test_producer_support import submit_cmd


def test_one_and_two_readers_give_identical_batches_ids_and_vectors(tmp_path: Path, minilm_artifact: Path):
    docs = _folder(tmp_path, pdf_pages=4)
    # a record file between the documents: read in the calling process, in its place in the order
    (docs / "m-records.jsonl").write_text(json.dumps({"id": "r1", "text": "A record among documents."}) + "\n")
    (docs / "z-second.md").write_text("# Z\n\nA last Markdown file after the records.\n")
    make_encrypted_pdf(docs / "locked.pdf")  # bad documents: one error each, read in the reader processes
    (docs / "cut.docx").write_bytes((docs / "guide.docx").read_bytes()[:1500])
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    env.update(DEPOSIUM_ARTIFACT=str(minilm_artifact), DEPOSIUM_CACHE_DIR=str(tmp_path / "cache"))
    tables = {}
    for n in (1, 2):
        out = tmp_path / f"r{n}.parquet"
        errors = tmp_path / f"r{n}.errors.jsonl"
        r = subprocess.run(submit_cmd("docs", "--local", "--out", str(out), "--no-progress", "--readers", str(n),
                                      "--chunk-tokens", "64", "--chunk-overlap", "16", "--batch-tokens", "600",
                                      "--errors", str(errors)),
                           env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
        assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr  # 1: the unsupported file
        assert "skipped files: 1 unsupported format: .xyz" in r.stdout and "3 input errors" in r.stdout
        listed = {Path(e["origin"]).name: e["reason"] for e in map(json.loads, errors.read_text().splitlines())}
        assert listed["locked.pdf"] == "encrypted PDF (password required); not read"
        assert listed["cut.docx"].startswith("corrupt or truncated DOCX")
        assert listed["photo.xyz"] == "unsupported format: .xyz" and len(listed) == 3
        tables[n] = pq.read_table(out)
    one, two = tables[1], tables[2]
    assert one.num_rows > 40 and "r1#0" in one.column("id").to_pylist()
    assert one.column("id").to_pylist() == two.column("id").to_pylist()  # same order, not only the same set
    assert one.equals(two)  # texts, provenance, token counts and vectors, bit for bit
    meta = [json.loads(t.schema.metadata[b"deposium"]) for t in (one, two)]
    assert meta[0]["batches"] == meta[1]["batches"] and len(meta[0]["batches"]) > 1  # batch ids and digests
    assert max(one.column("token_count").to_pylist()) <= 64


def test_reader_processes_split_exactly_as_the_calling_process(tmp_path: Path, minilm_artifact: Path,
                                                               monkeypatch):
    from deposium.producer import readers
    from deposium.producer.documents.pool import ReaderPool, SplitSpec
    from deposium.producer.model import InputError
    from deposium.producer.split import split_blocks
    from deposium.producer.tokens import TokenCounter

    docs = _folder(tmp_path)
    (docs / "big.txt").write_text("\n\n".join(f"Paragraph {i} of a long plain text file." for i in range(400)))
    monkeypatch.setattr(readers, "POOL_MAX_TEXT_BYTES", 10_000)  # big.txt streams here, in its place
    pool = ReaderPool(2, SplitSpec(artifact_dir=str(minilm_artifact), task=None, max_tokens=None, min_chars=20))
    try:
        pooled = list(readers.read_inputs([str(docs)], pool=pool))
    finally:
        pool.close()
    serial = list(readers.read_inputs([str(docs)]))
    counter = TokenCounter.from_artifact(minilm_artifact)

    def flat(items: list, presplit: bool) -> list:
        out = []
        for item in items:
            if isinstance(item, InputError):
                out.append((item.origin, item.reason))
            elif presplit and item.paragraphs is not None:
                out.append((item.id, list(item.presplit())))
            else:
                out.append((item.id, list(split_blocks(item.id, item.blocks(), counter, title=item.title))))
        return out

    assert flat(pooled, True) == flat(serial, False)
    split_here = {Path(i.id).name for i in pooled if not isinstance(i, InputError) and i.paragraphs is None}
    assert split_here == {"big.txt"}
