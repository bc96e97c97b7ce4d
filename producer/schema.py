"""The output row layout shared by every sink, and building a batch's rows as Arrow.

Why Arrow tables between producer and sink: vectors stay one contiguous float buffer from
the wire to the file (a fixed-size list column), with no per-row Python objects.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa

from deposium.producer.model import Paragraph

#: Provenance columns, nullable (a format without pages or headings leaves them empty). Tables
#: written before they existed lack them; sinks add them (null) when such a job is resumed.
PROVENANCE = (
    pa.field("page", pa.int32(), nullable=True),
    pa.field("heading", pa.string(), nullable=True),
    pa.field("char_start", pa.int64(), nullable=True),
    pa.field("char_end", pa.int64(), nullable=True),
    pa.field("title", pa.string(), nullable=True),
)
PROVENANCE_COLUMNS = tuple(f.name for f in PROVENANCE)
COLUMNS = ("id", "document", "index", "content_hash", "text", "embedding", "token_count", "truncated",
           *PROVENANCE_COLUMNS)


def output_schema(dim: int, dtype: str = "float32") -> pa.Schema:
    value = pa.float16() if dtype == "float16" else pa.float32()
    return pa.schema([
        pa.field("id", pa.string(), nullable=False),
        pa.field("document", pa.string(), nullable=False),
        pa.field("index", pa.int32(), nullable=False),
        pa.field("content_hash", pa.string(), nullable=False),
        pa.field("text", pa.string(), nullable=False),
        pa.field("embedding", pa.list_(pa.field("item", value, nullable=False), dim), nullable=False),
        pa.field("token_count", pa.int32(), nullable=False),
        pa.field("truncated", pa.bool_(), nullable=False),
        *PROVENANCE,
    ])


def rows_table(paragraphs: Sequence[Paragraph], vectors: np.ndarray, token_counts: Sequence[int],
               truncated: Sequence[bool], *, dim: int, dtype: str = "float32") -> pa.Table:
    """One table for a batch's rows; ``vectors`` is ``(len(paragraphs), dim)``."""
    np_dtype = np.float16 if dtype == "float16" else np.float32
    flat = np.ascontiguousarray(vectors, dtype=np_dtype).reshape(-1)
    schema = output_schema(dim, dtype)
    list_type = schema.field("embedding").type
    embedding = pa.FixedSizeListArray.from_arrays(pa.array(flat, type=list_type.value_type), type=list_type)
    return pa.Table.from_arrays([
        pa.array([p.id for p in paragraphs], pa.string()),
        pa.array([p.document for p in paragraphs], pa.string()),
        pa.array([p.index for p in paragraphs], pa.int32()),
        pa.array([p.hash for p in paragraphs], pa.string()),
        pa.array([p.text for p in paragraphs], pa.string()),
        embedding,
        pa.array(list(token_counts), pa.int32()),
        pa.array(list(truncated), pa.bool_()),
        *(pa.array([getattr(p, f.name) for p in paragraphs], f.type) for f in PROVENANCE),
    ], schema=schema)


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """``table`` in ``schema``'s layout; provenance columns it lacks (rows written before those
    columns existed) are added as nulls, so an old job's rows resume into the new layout."""
    for f in schema:
        if f.name not in table.column_names:
            if not f.nullable:
                raise ValueError(f"rows lack the required column {f.name!r}")
            table = table.append_column(f, pa.nulls(table.num_rows, f.type))
    return table.select(schema.names).cast(schema)
