"""Publishing a Parquet output by copying the parts' row groups: the same table as decoding them,
refused (and decoded instead) for anything the copy cannot carry; and duplicate lookups that
read only the batch that committed the text."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deposium.producer.model import Paragraph, content_hash
from deposium.producer.schema import PROVENANCE_COLUMNS, output_schema, rows_table
from deposium.producer.sinks import SinkJob
from deposium.producer.sinks import parquet as parquet_sink
from deposium.producer.sinks.parquet import ParquetSink, write_options
from deposium.producer.sinks.parquet_splice import CannotSplice, moved, read_footer, scan_footer, splice

DIM = 8


def _table(texts: list[str], *, doc: str = "doc", dtype: str = "float32", seed: int = 0,
           page: bool = True) -> pa.Table:
    paragraphs = [Paragraph(document=doc, index=i, text=t, tokens=3, hash=content_hash(t),
                            page=(i + 1) if page and i % 3 else None, heading=None if i % 2 else f"H{i}é",
                            char_start=i, char_end=i + len(t), title="Ünïcode title" if i % 4 == 0 else None)
                  for i, t in enumerate(texts)]
    vectors = np.random.default_rng(seed).standard_normal((len(texts), DIM)).astype(np.float32)
    return rows_table(paragraphs, vectors, [3] * len(texts), [i % 5 == 0 for i in range(len(texts))],
                      dim=DIM, dtype=dtype)


def _write_part(path: Path, table: pa.Table, **extra: object) -> Path:
    pq.write_table(table, path, **{**write_options(table.column_names), **extra})
    return path


def _spliced(parts: list[Path], schema: pa.Schema) -> tuple[pa.Table, pq.ParquetFile]:
    buf = io.BytesIO()
    rows = splice(parts, buf, schema, write_options(schema.names))
    data = pa.BufferReader(buf.getvalue())
    table = pq.read_table(data)
    assert table.num_rows == rows
    return table, pq.ParquetFile(pa.BufferReader(buf.getvalue()))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.lists(st.text(min_size=1, max_size=60), min_size=0, max_size=40), min_size=1, max_size=20),
       st.sampled_from(["float32", "float16"]), st.sampled_from([None, 7]))
def test_a_splice_reads_back_as_the_decoded_parts_row_group_for_row_group(tmp_path_factory, batches, dtype,
                                                                          row_group_size):
    """Any texts (empty parts, several row groups per part, more than 15 parts), both dtypes."""
    tmp = tmp_path_factory.mktemp("parts")
    parts = []
    for k, texts in enumerate(batches):
        extra = {"row_group_size": row_group_size} if row_group_size else {}
        parts.append(_write_part(tmp / f"b{k:07d}.parquet", _table(texts, dtype=dtype, seed=k), **extra))
    schema = output_schema(DIM, dtype).with_metadata({b"deposium": b'{"job_id": "j"}'})
    table, spliced = _spliced(parts, schema)
    expected = pa.concat_tables([pq.read_table(p) for p in parts])
    assert table.equals(expected.replace_schema_metadata(schema.metadata).cast(table.schema))
    assert table.schema.metadata == schema.metadata
    groups = [pq.ParquetFile(p).read_row_group(i) for p in parts for i in range(pq.ParquetFile(p).num_row_groups)]
    assert spliced.num_row_groups == len(groups)
    for i, group in enumerate(groups):
        assert spliced.read_row_group(i).equals(group.replace_schema_metadata(schema.metadata))
    # statistics were carried over with their column chunks: a filter prunes by them
    if expected.num_rows:
        first = expected.column("content_hash")[0].as_py()
        hit = pq.read_table(pa.BufferReader(_splice_bytes(parts, schema)), filters=[("content_hash", "=", first)])
        assert first in hit.column("content_hash").to_pylist()


def _splice_bytes(parts: list[Path], schema: pa.Schema) -> bytes:
    buf = io.BytesIO()
    splice(parts, buf, schema, write_options(schema.names))
    return buf.getvalue()


@pytest.mark.parametrize("extra", [{"write_page_index": True},
                                   {"bloom_filter_options": {"content_hash": {"ndv": 10}}}],
                         ids=["page index", "bloom filter"])
def test_parts_the_copy_cannot_carry_are_refused_before_anything_is_written(tmp_path: Path, extra: dict):
    good = _write_part(tmp_path / "a.parquet", _table(["one", "two"]))
    try:
        other = _write_part(tmp_path / "b.parquet", _table(["three"], seed=1), **extra)
    except TypeError:
        pytest.skip(f"this pyarrow cannot write {extra}")  # bloom filters arrived in a recent pyarrow
    out = io.BytesIO()
    schema = output_schema(DIM)
    with pytest.raises(CannotSplice, match="b.parquet"):
        splice([good, other], out, schema, write_options(schema.names))
    assert out.getvalue() == b""


def test_a_codec_is_per_column_chunk_so_parts_of_another_codec_splice(tmp_path: Path):
    parts = [_write_part(tmp_path / "a.parquet", _table(["one", "two"])),
             _write_part(tmp_path / "b.parquet", _table(["three"], seed=1), compression="snappy")]
    table, spliced = _spliced(parts, output_schema(DIM))
    assert table.column("text").to_pylist() == ["one", "two", "three"]
    assert [spliced.metadata.row_group(i).column(4).compression for i in range(2)] == ["ZSTD", "SNAPPY"]


def test_a_part_of_another_layout_or_a_corrupt_footer_is_refused(tmp_path: Path):
    schema = output_schema(DIM)
    old = _write_part(tmp_path / "old.parquet", _table(["x"]).drop_columns(list(PROVENANCE_COLUMNS)))
    with pytest.raises(CannotSplice, match="old.parquet"):
        splice([old], io.BytesIO(), schema, write_options(schema.names))
    good = _write_part(tmp_path / "good.parquet", _table(["y", "z"]))
    data = good.read_bytes()
    length = int.from_bytes(data[-8:-4], "little")
    cut = tmp_path / "cut.parquet"  # the footer's row groups cut short, its length and magic intact
    footer = data[-8 - length:-8]
    cut.write_bytes(data[:-8 - length] + footer[:len(footer) // 2] + (len(footer) // 2).to_bytes(4, "little")
                    + b"PAR1")
    with pytest.raises(CannotSplice):
        splice([cut], io.BytesIO(), schema, write_options(schema.names))
    (tmp_path / "short.parquet").write_bytes(b"PAR1")
    with pytest.raises(CannotSplice, match="too short"):
        splice([tmp_path / "short.parquet"], io.BytesIO(), schema, write_options(schema.names))


def test_a_row_group_past_the_i16_ordinal_range_drops_its_ordinal(tmp_path: Path):
    """The ordinal is an i16 that encryption uses; pyarrow leaves it out, other writers set it.
    Renumbered where it fits, dropped past 32,767 row groups, the file still reads back."""
    part = _write_part(tmp_path / "p.parquet", _table(["a", "b", "c"]))
    data = part.read_bytes()
    with open(part, "rb") as fh:
        plain, start = read_footer(fh, len(data))
    group = plain.row_groups[0]
    assert group.ordinal is None
    # the same footer with "ordinal = 3" as the row group's last field (header 0x14: +1, i16)
    with_ordinal = plain.data[:group.end - 1] + b"\x14\x06" + plain.data[group.end - 1:]
    footer = scan_footer(with_ordinal)
    group = footer.row_groups[0]
    assert group.ordinal is not None
    renumbered, dropped = moved(footer, group, 0, 5), moved(footer, group, 0, 40_000)
    assert b"\x14\x0a\x00" in renumbered[-3:] and len(dropped) == len(renumbered) - 2
    for body in (renumbered, dropped):
        new_footer = footer.data[:group.start] + body + footer.data[group.end:]
        rebuilt = data[:start] + new_footer + len(new_footer).to_bytes(4, "little") + b"PAR1"
        assert pq.read_table(pa.BufferReader(rebuilt)).equals(pq.read_table(part))


def test_the_sink_publishes_by_copy_and_falls_back_to_decoding_old_parts(tmp_path: Path, monkeypatch):
    job = SinkJob(job_id="j", dim=DIM, dtype="float32", model_sha256="a" * 64)
    decoded: list[Path] = []
    real_file = pq.ParquetFile

    def counting(path, *args, **kwargs):
        decoded.append(Path(path))
        return real_file(path, *args, **kwargs)

    monkeypatch.setattr(parquet_sink.pq, "ParquetFile", counting)
    out = tmp_path / "new.parquet"
    sink = ParquetSink(out)
    sink.open(job)
    sink.write_batch("b0000000", "d0", _table(["alpha", "beta"], seed=0))
    sink.write_batch("b0000001", "d1", _table(["gamma"], seed=1))
    sink.close(complete=True)
    assert decoded == []  # published by copying row groups
    table = pq.read_table(out)
    assert table.column("text").to_pylist() == ["alpha", "beta", "gamma"]
    assert pq.ParquetFile(out).num_row_groups == 2

    decoded.clear()
    old = tmp_path / "old.parquet"
    sink = ParquetSink(old)
    sink.open(job)
    sink.write_batch("b0000000", "d0", _table(["old"], seed=2).drop_columns(list(PROVENANCE_COLUMNS)))
    sink.write_batch("b0000001", "d1", _table(["new"], seed=3))
    sink.close(complete=True)
    assert len(decoded) == 2  # a part of the old layout: every part decoded and conformed
    rows = pq.read_table(old).to_pylist()
    assert [r["text"] for r in rows] == ["old", "new"] and rows[0]["page"] is None


def test_a_duplicate_is_read_from_the_part_of_the_batch_that_committed_it(tmp_path: Path, monkeypatch):
    job = SinkJob(job_id="j", dim=DIM, dtype="float32", model_sha256="a" * 64)
    sink = ParquetSink(tmp_path / "o.parquet")
    sink.open(job)
    tables = {f"b{k:07d}": _table([f"text {k} {i}" for i in range(4)], seed=k) for k in range(30)}
    for batch_id, table in tables.items():
        sink.write_batch(batch_id, f"d{batch_id}", table)
    read: list[str] = []
    real = parquet_sink._read_stored
    monkeypatch.setattr(parquet_sink, "_read_stored",
                        lambda path, hashes: read.append(Path(path).name.split(".")[0]) or real(path, hashes))
    wanted = {content_hash("text 7 2"): "b0000007", content_hash("text 21 0"): "b0000021"}
    found = sink.lookup(wanted)
    assert sorted(read) == ["b0000007", "b0000021"]  # two parts read of thirty
    vectors = tables["b0000007"].column("embedding").to_pylist()
    np.testing.assert_array_equal(found[content_hash("text 7 2")].vector, np.asarray(vectors[2], np.float32))
    read.clear()  # named under the wrong batch (never the case in a job): still found, by reading every part
    assert set(sink.lookup({content_hash("text 3 1"): "b0000009"})) == {content_hash("text 3 1")}
    assert "b0000003" in read
    sink.release()
