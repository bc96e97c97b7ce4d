"""A synced store in one Parquet file, replaced atomically at the end of each sync.

Layout for ``--out docs.parquet``::

    docs.parquet        the rows; its metadata holds the identity, sources and document hashes
    docs.parquet.sync/  while a sync runs: the rows of re-embedded documents, one part per apply

Why a staging folder: a Parquet file cannot be changed in place, so a sync writes what it
embedded there first (fsynced parts, renamed into place) and publishes the whole file with one
``os.replace`` at the end. A sync killed before that leaves the old file untouched; the re-run
finds the parts and reuses their vectors instead of embedding the same text again.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from deposium.producer.sinks import SinkError, Stored
from deposium.producer.sinks.lock import OutputLock
from deposium.producer.sinks.parquet import _fsync_dir
from deposium.producer.sync.store import SYNC_FORMAT, SyncIndex, identity_mismatch

META_KEY = b"deposium-sync"
JOB_META_KEY = b"deposium"


def _write_atomic(table: pa.Table, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    pq.write_table(table, tmp)
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _vector(table: pa.Table, row: int) -> np.ndarray:
    values = table.column("embedding").chunk(0) if table.column("embedding").num_chunks == 1 \
        else table.column("embedding").combine_chunks()
    return np.asarray(values[row].values.to_numpy(zero_copy_only=False))


class ParquetSyncStore:
    """See the module docstring."""

    def __init__(self, out: str | os.PathLike[str]) -> None:
        self.out = Path(out).expanduser().absolute()
        self.staging = self.out.with_name(self.out.name + ".sync")
        self.target = str(self.out)
        self._old: pa.Table | None = None
        self._old_meta: dict[str, Any] = {}
        self._old_hash_rows: dict[str, int] = {}
        self._staged: dict[str, tuple[Path, int]] = {}
        self._applied: dict[str, str | None] = {}
        self._parts: list[Path] = []
        self._identity: dict[str, Any] = {}
        self._run = f"{os.getpid()}"
        self._staging_ready = False
        self._lock = OutputLock(self.out.with_name(f".{self.out.name}.lock"), self.target)

    # -- opening --------------------------------------------------------------------------------
    def open(self, identity: Mapping[str, Any], *, replace: bool, create: bool) -> SyncIndex:
        self._identity = dict(identity)
        if self.out.suffix != ".parquet":
            raise SinkError(f"{self.out}: a Parquet output must end in .parquet")
        if self.out.is_dir():
            raise SinkError(f"{self.out} is a directory; name a .parquet file")
        if not self.out.parent.is_dir():
            raise SinkError(f"{self.out}: directory {self.out.parent} does not exist")
        index = SyncIndex()
        if create:
            self._lock.acquire("sync")
        if self.out.exists():
            try:
                meta = pq.read_schema(self.out).metadata or {}
            except (OSError, pa.ArrowInvalid) as exc:
                raise SinkError(f"{self.out}: not a readable Parquet file ({exc}); pass --replace to overwrite it") \
                    from None
            raw = meta.get(META_KEY)
            stored = json.loads(raw) if raw else None
            why = identity_mismatch(stored["identity"] if stored else None, identity, self.target)
            if why and not replace:
                raise SinkError(why)
            if not why and not replace:
                assert stored is not None
                self._old_meta = stored
                self._old = pq.read_table(self.out, memory_map=True)
                index.documents = dict(stored["documents"])
                index.sources = stored.get("sources")
                counts = pc.value_counts(self._old.column("document")).to_pylist() if self._old.num_rows else []
                index.rows = {c["values"]: c["counts"] for c in counts}
                hashes = self._old.column("content_hash").to_pylist()
                self._old_hash_rows = {h: i for i, h in reversed(list(enumerate(hashes)))}
            elif replace:
                self._old_meta = {"documents": {}, "sources": None}
        if create:
            self._open_staging()
        return index

    def _open_staging(self) -> None:
        """Index the vectors a killed sync of the same identity staged (created only when writing)."""
        meta_path = self.staging / "identity.json"
        if not self.staging.is_dir():
            return
        try:
            self._staging_ready = json.loads(meta_path.read_text()) == self._identity
        except (OSError, ValueError):
            self._staging_ready = False
        if not self._staging_ready:
            return  # another identity's leftovers: replaced by the first apply, never read
        for part in sorted(self.staging.glob("rows-*.parquet")):
            hashes = pq.read_table(part, columns=["content_hash"]).column("content_hash").to_pylist()
            for i, h in enumerate(hashes):
                self._staged.setdefault(h, (part, i))

    def _ensure_staging(self) -> None:
        if self._staging_ready:
            return
        shutil.rmtree(self.staging, ignore_errors=True)
        self.staging.mkdir()
        meta_path = self.staging / "identity.json"
        tmp = meta_path.with_name(".identity.json.tmp")
        tmp.write_text(json.dumps(self._identity, sort_keys=True))
        os.replace(tmp, meta_path)
        self._staging_ready = True

    # -- reading --------------------------------------------------------------------------------
    def lookup(self, content_hashes: Collection[str]) -> dict[str, Stored]:
        found: dict[str, Stored] = {}
        by_part: dict[Path, list[tuple[str, int]]] = {}
        for h in content_hashes:
            if self._old is not None and h in self._old_hash_rows:
                row = self._old_hash_rows[h]
                found[h] = Stored(_vector(self._old, row), int(self._old.column("token_count")[row].as_py()),
                                  bool(self._old.column("truncated")[row].as_py()))
            elif h in self._staged:
                part, row = self._staged[h]
                by_part.setdefault(part, []).append((h, row))
        for part, wanted in by_part.items():
            table = pq.read_table(part, columns=["content_hash", "embedding", "token_count", "truncated"])
            for h, row in wanted:
                found[h] = Stored(_vector(table, row), int(table.column("token_count")[row].as_py()),
                                  bool(table.column("truncated")[row].as_py()))
        return found

    def ids_of(self, documents: Collection[str]) -> set[str]:
        if self._old is None or not documents:
            return set()
        docs = pa.array(list(documents), pa.string())
        return set(self._old.filter(pc.is_in(self._old.column("document"), value_set=docs)).column("id").to_pylist())

    # -- writing --------------------------------------------------------------------------------
    def apply(self, rows: pa.Table, documents: Mapping[str, str | None]) -> int:
        removed = len(self.ids_of(documents) - set(rows.column("id").to_pylist()))
        if rows.num_rows:
            self._ensure_staging()
            part = self.staging / f"rows-{self._run}-{len(self._parts):06d}.parquet"
            _write_atomic(rows, part)
            self._parts.append(part)
            for i, h in enumerate(rows.column("content_hash").to_pylist()):
                self._staged.setdefault(h, (part, i))
        self._applied.update(documents)
        return removed

    def finish(self, sources: list[str]) -> None:
        if not self._applied and self.out.exists() and self._old_meta.get("sources") == sources \
                and self._old is not None:
            shutil.rmtree(self.staging, ignore_errors=True)
            return  # nothing changed: the file is not rewritten
        tables = []
        if self._old is not None:
            if self._applied:
                docs = pa.array(list(self._applied), pa.string())
                tables.append(self._old.filter(pc.invert(pc.is_in(self._old.column("document"), value_set=docs))))
            else:
                tables.append(self._old)
        tables += [pq.read_table(p) for p in self._parts]
        documents = {d: h for d, h in self._old_meta.get("documents", {}).items() if d not in self._applied}
        documents.update({d: h for d, h in self._applied.items() if h is not None})
        if tables:
            table = pa.concat_tables([t.replace_schema_metadata(None) for t in tables], promote_options="default")
        else:
            from deposium.producer.schema import output_schema

            table = output_schema(int(self._identity["dim"]), str(self._identity["dtype"])).empty_table()
        meta = {"identity": self._identity, "sources": sources, "documents": documents, "format": SYNC_FORMAT}
        table = table.replace_schema_metadata({META_KEY: json.dumps(meta, sort_keys=True).encode()})
        _write_atomic(table, self.out)
        shutil.rmtree(self.staging, ignore_errors=True)

    def close(self) -> None:
        self._old = None
        self._lock.release()
