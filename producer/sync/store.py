"""What a synced store offers: its index (identity, sources, one text hash per document), vector
lookups by text hash, and per-document replacement.

Why a protocol of its own beside :class:`deposium.producer.sinks.Sink`: a job's sink commits
batches of one job; a synced store holds a collection across runs and must replace or delete
whole documents atomically. Each store keeps the contract below (docs/sync.md, "Design"):

* ``apply`` replaces every row of the named documents by the given rows and records their
  text hashes, atomically per call for readers (PostgreSQL: one transaction; LanceDB: one
  merge commit, with the hash recorded only after the rows; Parquet: the whole file is
  replaced at ``finish``). A hash is present only if its rows are, so a killed sync never
  leaves a document marked unchanged with stale rows.
* ``open`` refuses, before any work, a store written by another model or other options, or
  one a plain job wrote, unless ``replace`` (then it starts empty).
"""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import pyarrow as pa

from deposium.producer.sinks import SinkError, Stored

#: Format of the index a synced store keeps; a store of another format is refused.
SYNC_FORMAT = "deposium-sync/1"


@dataclass
class SyncIndex:
    """What a store says about itself when a sync opens it."""

    #: document id -> sha256 of its extracted text, for every document with rows in the store.
    documents: dict[str, str] = field(default_factory=dict)
    #: the sources of the sync that last wrote the store (None for a new store).
    sources: list[str] | None = None
    #: rows currently stored per document (for the deleted-paragraph count).
    rows: dict[str, int] = field(default_factory=dict)


class SyncStore(Protocol):
    #: Human-readable target with any password masked (safe to print).
    target: str

    def open(self, identity: Mapping[str, Any], *, replace: bool, create: bool) -> SyncIndex:
        """Validate (or, with ``create``, make) the store; raise SinkError naming any mismatch."""

    def lookup(self, content_hashes: Collection[str]) -> dict[str, Stored]:
        """Stored vectors for these text hashes (from any document)."""

    def ids_of(self, documents: Collection[str]) -> set[str]:
        """Ids of the rows stored for these documents (what a dry run would replace)."""

    def apply(self, rows: pa.Table, documents: Mapping[str, str | None]) -> int:
        """Replace the rows of ``documents`` by ``rows`` (None: delete the document); returns rows removed."""

    def finish(self, sources: list[str]) -> None:
        """Record the sources and publish (Parquet: the atomic file replacement)."""

    def close(self) -> None:
        """Release connections and locks (also after a failure)."""


#: What an option a store's identity does not record meant when that store was written (options
#: added later), so such a store still matches a sync that leaves them at these values.
NEUTRAL: dict[str, Any] = {"chunk_tokens": 0, "chunk_overlap": 0, "text_column": "text", "id_column": "id"}


def identity_mismatch(stored: Mapping[str, Any] | None, wanted: Mapping[str, Any], target: str) -> str | None:
    """Why a store's recorded identity differs from this sync's, in one line; None when equal."""
    if stored is None:
        return (f"{target} was written by a plain job, not by --sync (its ids are positional); "
                "pass --replace to rebuild it as a synced store")
    if stored.get("format") != wanted.get("format"):
        return f"{target} holds a synced store of format {stored.get('format')!r}, not {wanted.get('format')!r}"
    if stored.get("model") != wanted.get("model"):
        return (f"{target} was written by another model (artifact sha256 {str(stored.get('model'))[:12]}, "
                f"this one {str(wanted.get('model'))[:12]}); pass --replace to re-embed it with this model")
    def value(identity: Mapping[str, Any], key: str) -> Any:
        return identity.get(key, NEUTRAL.get(key))

    diffs = [f"{k} {value(stored, k)!r} (now {value(wanted, k)!r})" for k in sorted(set(stored) | set(wanted))
             if k not in {"format", "model"} and value(stored, k) != value(wanted, k)]
    if diffs:
        return (f"{target} was written with other embedding options: {', '.join(diffs)}; "
                "pass --replace to rebuild it with these")
    return None


def dumps(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def open_sync_store(target: str) -> SyncStore:
    """The synced store for a target string: a ``.parquet`` path, ``postgresql://`` or ``lancedb://``."""
    scheme = target.split("://", 1)[0].lower() if "://" in target else ""
    if scheme in {"", "file"}:
        from deposium.producer.sync.parquet import ParquetSyncStore

        return ParquetSyncStore(target.split("://", 1)[1] if scheme == "file" else target)
    if scheme in {"postgresql", "postgres"}:
        from deposium.producer.sync.pgvector import PgSyncStore

        return PgSyncStore(target)
    if scheme == "lancedb":
        from deposium.producer.sync.lancedb import LanceSyncStore

        return LanceSyncStore(target)
    from deposium.worker.config import mask_url

    raise SinkError(f"unknown sink target {mask_url(target)!r}: use a .parquet path, postgresql:// or lancedb://")
