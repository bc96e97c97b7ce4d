"""Provenance end to end: a folder of real documents into Parquet, pgvector and LanceDB, and
tables written before the provenance columns existed, resumed into the new layout."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import lancedb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from deposium.producer.model import Paragraph, content_hash
from deposium.producer.schema import PROVENANCE_COLUMNS, rows_table
from deposium.producer.sinks import SinkJob
from deposium.producer.sinks.lancedb import LanceDBSink, table_schema
from deposium.producer.sinks.parquet import ParquetSink
from deposium.producer.sinks.pgvector import PgVectorSink
from tests.pg_proc import PgCluster
from tests.test_documents import HTML, MARKDOWN, PDF, make_docx
from tests.test_producer_support import submit_cmd

PHRASE = "Le cœur de l’été — « déjà » vu, naïve façade, et un café crème pour finir."




def _first_pages(path: Path, n: int) -> None:
    """Keep the PDF's first ``n`` pages (its outline too: bookmarks into removed pages go dangling)."""
    from pypdf import PdfWriter

    writer = PdfWriter(clone_from=path)
    for i in reversed(range(n, len(writer.pages))):
        del writer.pages[i]
    writer.write(str(path))


def _folder(root: Path, pdf_pages: int | None = None) -> Path:
    """PDF, HTML, DOCX, Markdown, Windows-1252 text and an unsupported file; ``pdf_pages`` keeps the
    PDF's first pages only (fewer paragraphs to embed where the whole document is not the point)."""
    docs = root / "docs"
    docs.mkdir()
    shutil.copy(PDF, docs / "spec.pdf")
    if pdf_pages:
        _first_pages(docs / "spec.pdf", pdf_pages)
    shutil.copy(HTML, docs / "closure.html")
    make_docx(docs / "guide.docx")
    (docs / "notes.md").write_text(MARKDOWN, encoding="utf-8")
    (docs / "legacy.txt").write_bytes(PHRASE.encode("cp1252"))
    (docs / "photo.xyz").write_bytes(b"\x89PNG\r\n\x1a\n\0\0\0")
    return docs


def _rows(kind: str, target: str, tmp_path: Path, pg: PgCluster) -> list[dict]:
    cols = ["id", "document", "text", *PROVENANCE_COLUMNS]
    if kind == "parquet":
        return pq.read_table(target, columns=cols).to_pylist()
    if kind == "lancedb":
        return lancedb.connect(str(tmp_path / "db")).open_table("docs").to_arrow().select(cols).to_pylist()
    import psycopg

    with psycopg.connect(pg.url("docs").split("?")[0]) as conn:
        cur = conn.execute("SELECT " + ", ".join(f'"{c}"' for c in cols) + " FROM docs")
        return [dict(zip(cols, r, strict=True)) for r in cur.fetchall()]


def test_a_mixed_folder_lands_with_provenance_in_every_sink(tmp_path: Path, minilm_artifact: Path, pg: PgCluster):
    docs = _folder(tmp_path, pdf_pages=6)
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL" and not k.startswith("PG")}
    env.update(DEPOSIUM_ARTIFACT=str(minilm_artifact), DEPOSIUM_CACHE_DIR=str(tmp_path / "cache"))
    targets = {"parquet": str(tmp_path / "x.parquet"), "pgvector": pg.url("docs"),
               "lancedb": f"lancedb://{tmp_path / 'db'}?table=docs"}
    seen: dict[str, set] = {}
    for kind, target in targets.items():
        errors = tmp_path / f"{kind}.errors.jsonl"
        r = subprocess.run(submit_cmd(str(docs), "--local", "--out", target, "--no-progress", "--errors",
                                      str(errors)), env=env, cwd=tmp_path, capture_output=True, text=True,
                           timeout=600)
        assert r.returncode == 1, r.stderr  # finished; the unsupported file is an error
        assert "Traceback" not in r.stderr
        assert "1 input errors" in r.stdout and "skipped files: 1 unsupported format: .xyz" in r.stdout
        listed = [json.loads(line) for line in errors.read_text().splitlines()]
        assert [(Path(e["origin"]).name, e["reason"]) for e in listed] == [("photo.xyz", "unsupported format: .xyz")]
        rows = _rows(kind, target, tmp_path, pg)
        by_doc: dict[str, list[dict]] = {}
        for row in rows:
            by_doc.setdefault(Path(row["document"]).name, []).append(row)
        assert set(by_doc) == {"spec.pdf", "closure.html", "guide.docx", "notes.md", "legacy.txt"}
        pdf = by_doc["spec.pdf"]
        assert {r["page"] for r in pdf} == set(range(1, 7))
        assert {r["heading"] for r in pdf} >= {"2. Unified system > 2.1. Directory layout"}  # from the outline
        assert {r["title"] for r in by_doc["closure.html"]} == {
            "The Closure API (libffi: the portable foreign function interface library)"}
        assert {r["heading"] for r in by_doc["guide.docx"]} == {"Installation", "Installation > Docker", "Usage"}
        assert {r["title"] for r in by_doc["guide.docx"]} == {"Field guide"}
        assert {r["heading"] for r in by_doc["notes.md"]} >= {"Guide", "Guide > Install"}
        assert [r["text"] for r in by_doc["legacy.txt"]] == [PHRASE]
        assert by_doc["legacy.txt"][0]["char_start"] == 0 and by_doc["legacy.txt"][0]["char_end"] == len(PHRASE)
        assert all(r["char_start"] is not None and r["char_end"] > r["char_start"] for r in rows)
        assert all(r["page"] is None for name, rs in by_doc.items() if name != "spec.pdf" for r in rs)
        seen[kind] = {(r["id"], r["page"], r["heading"], r["char_start"], r["char_end"], r["title"]) for r in rows}
    assert seen["parquet"] == seen["pgvector"] == seen["lancedb"]


# -- tables made before the provenance columns --------------------------------------------------------
DIM = 8


def _job() -> SinkJob:
    return SinkJob(job_id="job-old", dim=DIM, dtype="float32", model_sha256="a" * 64)


def _batch(doc: str, provenance: bool) -> pa.Table:
    texts = [f"{doc} paragraph {i}" for i in range(3)]
    paragraphs = [Paragraph(document=doc, index=i, text=t, tokens=5, hash=content_hash(t),
                            page=(i + 1) if provenance else None, heading="H" if provenance else None,
                            char_start=0 if provenance else None, char_end=len(t) if provenance else None)
                  for i, t in enumerate(texts)]
    vectors = np.random.default_rng(len(doc)).random((3, DIM), dtype=np.float32)
    table = rows_table(paragraphs, vectors, [5] * 3, [False] * 3, dim=DIM)
    return table if provenance else table.drop_columns(list(PROVENANCE_COLUMNS))


def _check_resumed(rows: list[dict]) -> None:
    old = [r for r in rows if r["document"] == "old"]
    new = [r for r in rows if r["document"] == "new"]
    assert len(old) == len(new) == 3
    assert all(r[c] is None for r in old for c in PROVENANCE_COLUMNS)
    assert sorted(r["page"] for r in new) == [1, 2, 3] and {r["heading"] for r in new} == {"H"}


def test_old_layout_parquet_job_resumes_with_null_provenance(tmp_path: Path):
    out = tmp_path / "o.parquet"
    sink = ParquetSink(out)
    sink.open(_job())
    sink.write_batch("b0000000", "d0", _batch("old", provenance=False))  # a part written before the change
    sink.release()  # that producer ends (its lock with it)
    resumed = ParquetSink(out)
    resumed.open(_job())
    assert resumed.done_batches() == {"b0000000": "d0"}
    resumed.write_batch("b0000001", "d1", _batch("new", provenance=True))
    resumed.close(complete=True)
    table = pq.read_table(out)
    assert table.schema.names[-len(PROVENANCE_COLUMNS):] == list(PROVENANCE_COLUMNS)
    _check_resumed(table.to_pylist())


def test_old_layout_lancedb_table_gets_the_columns_and_resumes(tmp_path: Path):
    db = lancedb.connect(str(tmp_path / "db"))
    old_schema = pa.schema([f for f in table_schema(DIM, "float32") if f.name not in PROVENANCE_COLUMNS])
    rows = _batch("old", provenance=False)
    extra = {"job_id": "job-old", "model_id": "", "model_sha256": "a" * 64, "batch_id": "b0000000",
             "batch_digest": "d0"}
    for name, value in extra.items():
        rows = rows.append_column(name, pa.array([value] * rows.num_rows, pa.string()))
    db.create_table("docs", rows.cast(old_schema), schema=old_schema)
    sink = LanceDBSink(f"lancedb://{tmp_path / 'db'}?table=docs")
    sink.open(_job())
    assert sink.done_batches() == {"b0000000": "d0"}
    sink.write_batch("b0000001", "d1", _batch("new", provenance=True))
    got = lancedb.connect(str(tmp_path / "db")).open_table("docs").to_arrow()
    assert set(PROVENANCE_COLUMNS) <= set(got.schema.names)
    _check_resumed(got.to_pylist())


def test_old_layout_pgvector_table_gets_the_columns_and_resumes(pg: PgCluster):
    sink = PgVectorSink(pg.url("old_docs"))
    sink.open(_job())
    sink.write_batch("b0000000", "d0", _batch("old", provenance=False))
    sink.conn.close()
    # what a table made before the provenance columns looks like
    pg.sql("ALTER TABLE old_docs " + ", ".join(f"DROP COLUMN {c}" for c in PROVENANCE_COLUMNS), db="vectors")
    resumed = PgVectorSink(pg.url("old_docs"))
    resumed.open(_job())
    assert resumed.done_batches() == {"b0000000": "d0"}
    resumed.write_batch("b0000001", "d1", _batch("new", provenance=True))
    resumed.conn.close()
    import psycopg

    cols = ["document", *PROVENANCE_COLUMNS]
    with psycopg.connect(pg.url("old_docs").split("?")[0]) as conn:
        got = [dict(zip(cols, r, strict=True)) for r in conn.execute(
            "SELECT " + ", ".join(cols) + " FROM old_docs").fetchall()]
    _check_resumed(got)


def test_old_layout_pgvector_table_the_user_may_not_alter_is_refused_clearly(pg: PgCluster):
    from deposium.producer.sinks import SinkError

    sink = PgVectorSink(pg.url("locked_docs"))
    sink.open(_job())
    sink.conn.close()
    pg.sql("ALTER TABLE locked_docs " + ", ".join(f"DROP COLUMN {c}" for c in PROVENANCE_COLUMNS), db="vectors")
    pg.sql("GRANT SELECT, INSERT, UPDATE, DELETE ON locked_docs TO stranger", db="vectors")
    stranger = PgVectorSink(pg.url("locked_docs", user="stranger", password="other"))
    with pytest.raises(SinkError) as refused:
        stranger.open(_job())
    message = str(refused.value)
    assert "predates the provenance columns (page, heading, char_start, char_end, title)" in message
    assert "ALTER TABLE" in message and "--replace" in message and "\n" not in message
