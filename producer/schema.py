"""The output row layout shared by every sink, and building a batch's rows as Arrow.

Why Arrow tables between producer and sink: vectors stay one contiguous float buffer from
the wire to the file (a fixed-size list column), with no per-row Python objects.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa

from deposium.producer.model import Paragraph

COLUMNS = ("id", "document", "index", "content_hash", "text", "embedding", "token_count", "truncated")


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
    ], schema=schema)
