"""Tables (.csv, .parquet): one document per row, from ``--text-column`` and ``--id-column``.

Why rows are documents: a table of records (tickets, products, FAQ entries) has one text per
row, and a row's id column is the id the user will look vectors up by. A row without an id
column is named ``FILE:ROW`` (1-based data row), like a JSON line.
"""

from __future__ import annotations

import csv
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from deposium.producer.documents import DocumentError


@dataclass(frozen=True)
class Row:
    """One table row: its document id (or None for FILE:ROW), its text (or None if missing)."""

    number: int
    id: str | None
    text: str | None


def _columns_error(path: Path, column: str, names: list[str], flag: str) -> DocumentError:
    return DocumentError(f"{path.name} has no column {column!r} (columns: {', '.join(names) or 'none'}); "
                         f"name it with {flag}")


def csv_rows(path: Path, text_column: str, id_column: str) -> Iterator[Row]:
    csv.field_size_limit(sys.maxsize)
    try:
        with open(path, encoding="utf-8-sig", newline="") as fh:
            reader = csv.DictReader(fh)
            names = list(reader.fieldnames or [])
            if text_column not in names:
                raise _columns_error(path, text_column, names, "--text-column")
            has_id = id_column in names
            for number, record in enumerate(reader, start=1):
                yield Row(number, record.get(id_column) if has_id else None, record.get(text_column))
    except UnicodeDecodeError as exc:
        raise DocumentError(f"CSV is not UTF-8 (byte {exc.start}); save it as UTF-8") from None
    except csv.Error as exc:
        raise DocumentError(f"malformed CSV: {exc}") from None


def parquet_rows(path: Path, text_column: str, id_column: str) -> Iterator[Row]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise DocumentError(f"corrupt Parquet file: {exc}") from None
    names = pf.schema_arrow.names
    if text_column not in names:
        raise _columns_error(path, text_column, names, "--text-column")
    columns = [text_column] + ([id_column] if id_column in names else [])
    number = 0
    for batch in pf.iter_batches(columns=columns, batch_size=4096):
        texts = batch.column(text_column).to_pylist()
        ids = batch.column(id_column).to_pylist() if id_column in names else [None] * len(texts)
        for doc_id, text in zip(ids, texts, strict=True):
            number += 1
            yield Row(number, None if doc_id is None else str(doc_id), text)
