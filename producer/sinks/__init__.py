"""Where a job's rows go: one small :class:`Sink` protocol, one module per store.

Contract every sink keeps (docs/design.md, "exactly-once output"):

* ``write_batch`` commits the batch's rows **and** its done-mark together (Parquet: one part
  file renamed into place; PostgreSQL: one transaction; LanceDB: one append carrying the
  batch id). Writing the same batch id again replaces it: never two copies.
* ``done_batches`` is read back from the store itself, so the store, not a side file,
  decides what a resumed job skips.
* ``open`` refuses a target that holds another job, another dimension or another model
  (``SinkJob.replace`` starts over deliberately, this job's own rows included) *before* any
  embedding work starts.
* ``open`` takes a lock that only the producer's death or ``close`` / ``release`` gives back
  (a lock file under ``fcntl.flock``, a PostgreSQL advisory lock), so a second producer on the
  same target is refused at once with a line naming the running job, and a killed producer
  never blocks the resume.

Rows arrive as a ``pyarrow.Table`` with :data:`deposium.producer.schema.columns` (see
:func:`deposium.producer.schema.output_schema`), so a sink never re-encodes vectors row by row.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np
import pyarrow as pa


class SinkError(RuntimeError):
    """The target cannot be used (wrong job, dimension, model, permissions, URL)."""


@dataclass(frozen=True)
class SinkJob:
    """What a sink must know to create or validate its target."""

    job_id: str
    dim: int
    dtype: str  # "float32" | "float16"
    model_sha256: str
    model_source: str = ""
    #: Overwrite a target that belongs to another job / dimension / model.
    replace: bool = False
    extra: dict[str, str] = field(default_factory=dict)
    #: This producer's shard of the job (``shard`` of ``shards``; 1 = unsharded). A sharded
    #: producer locks its shard only, and the store's final step (merge, compaction, index)
    #: runs once, by the shard that finds every shard of the job finished.
    shard: int = 0
    shards: int = 1


@dataclass(frozen=True)
class Stored:
    """One already-committed text, returned by :meth:`Sink.lookup` to fill duplicates."""

    vector: np.ndarray
    token_count: int
    truncated: bool


@runtime_checkable
class Sink(Protocol):
    #: Human-readable target with any password masked (safe to print).
    target: str

    def open(self, job: SinkJob) -> None:
        """Create or validate the target for ``job``; raise :class:`SinkError` when unusable."""

    def done_batches(self) -> dict[str, str]:
        """Committed batches of this job: batch id → batch digest (as given to write_batch)."""

    def write_batch(self, batch_id: str, digest: str, rows: pa.Table) -> None:
        """Atomically commit ``rows`` together with the done-mark ``(batch_id, digest)``."""

    def lookup(self, wanted: Mapping[str, str]) -> dict[str, Stored]:
        """Vectors already committed for these content hashes (duplicates embedded earlier);
        ``wanted`` maps each hash to the batch that committed it, so a sink that keeps rows
        by batch reads that batch only, however many batches the job has."""

    def close(self, complete: bool) -> None:
        """Publish what is committed and let the target go. ``complete``: every batch is done,
        drop resume state."""

    def release(self) -> None:
        """Let the target go without publishing anything (an interrupted run)."""


def open_sink(target: str) -> Sink:
    """Pick the sink for a target string: a ``.parquet`` path (default), or a URL scheme.

    ``postgresql://user@host/db?table=NAME`` (pgvector) and ``lancedb://PATH?table=NAME``.
    """
    scheme = target.split("://", 1)[0].lower() if "://" in target else ""
    if scheme in {"", "file"}:
        from deposium.producer.sinks.parquet import ParquetSink

        return ParquetSink(target.split("://", 1)[1] if scheme == "file" else target)
    if scheme in {"postgresql", "postgres"}:
        from deposium.producer.sinks.pgvector import PgVectorSink

        return PgVectorSink(target)
    if scheme == "lancedb":
        from deposium.producer.sinks.lancedb import LanceDBSink

        return LanceDBSink(target)
    from deposium.worker.config import mask_url

    raise SinkError(f"unknown sink target {mask_url(target)!r}: use a .parquet path, postgresql:// or lancedb://")


def configure_sink(sink: Sink, *, index: str | None = None, model_id: str = "") -> None:
    """Options that shape no row and so stay out of the target string and the job's identity.

    Why separate from :func:`open_sink`: adding ``--index`` to a re-run must resume the same
    job, and the model id is known only once the job is planned. Raises :class:`SinkError`
    for an index on a sink that has none (Parquet).
    """
    if index:
        kinds = getattr(sink, "index_kinds", None)
        if kinds is None:
            raise SinkError(f"--index {index}: {sink.target} is a file sink without vector indexes")
        if index not in kinds:
            raise SinkError(f"--index {index!r} is not offered by {sink.target}; use one of {', '.join(kinds)}")
        sink.index = index  # type: ignore[attr-defined]
    if model_id and hasattr(sink, "model_id"):
        sink.model_id = model_id  # type: ignore[attr-defined]
