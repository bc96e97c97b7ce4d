"""A synced store in LanceDB: the rows table plus ``<table>_deposium_documents`` and ``_deposium_sync``.

Why this order in :meth:`LanceSyncStore.apply`: LanceDB commits one table at a time, so a
document's hash is removed first, its rows are then replaced in ONE ``merge_insert`` commit
(new rows upserted by id, rows of the document no longer present deleted), and the hash is
recorded last. A sync killed between two steps leaves a document without a hash, which the
re-run treats as new (it re-writes the rows, re-using their stored vectors): never a hash that
vouches for rows it does not describe.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from deposium.producer.sinks import SinkError, Stored
from deposium.producer.sinks.lancedb import _lit, lookup_vectors, parse_target
from deposium.producer.sinks.lock import OutputLock
from deposium.producer.sync.store import SyncIndex, dumps, identity_mismatch

_DOCS = "_deposium_documents"
_META = "_deposium_sync"


def _in(column: str, values: Collection[str]) -> str:
    return f"{column} IN (" + ", ".join(_lit(v) for v in values) + ")"


class LanceSyncStore:
    """See the module docstring."""

    def __init__(self, target: str) -> None:
        self.path, self.name, _ = parse_target(target)
        self.target = target
        self.db: Any = None
        self.table: Any = None
        self.docs: Any = None
        self._identity: dict[str, Any] = {}
        self._lock = OutputLock(self.path.parent / f".{self.path.name}.{self.name}.lock",
                                f"LanceDB table {self.name} in {self.path}")

    def _tables(self) -> set[str]:
        listed = self.db.list_tables()
        return set(getattr(listed, "tables", listed))

    def open(self, identity: Mapping[str, Any], *, replace: bool, create: bool) -> SyncIndex:
        import lancedb

        self._identity = dict(identity)
        if not self.path.parent.is_dir():
            raise SinkError(f"{self.target}: directory {self.path.parent} does not exist")
        if create:
            self._lock.acquire("sync")
        index = SyncIndex()
        try:
            self.db = lancedb.connect(str(self.path))
            tables = self._tables()
            has_rows, has_meta = self.name in tables, self.name + _META in tables
            stored = None
            if has_meta:
                meta = self.db.open_table(self.name + _META).to_arrow().to_pylist()
                values = {m["key"]: json.loads(m["value"]) for m in meta}
                stored, index.sources = values.get("identity"), values.get("sources")
            why = identity_mismatch(stored, identity, self.target) if has_rows or has_meta else None
            if why and not replace:
                raise SinkError(why)
            if (why or replace) and create:
                for name in (self.name, self.name + _DOCS, self.name + _META, self.name + "_deposium_batches"):
                    if name in tables:
                        self.db.drop_table(name)
                has_rows = has_meta = False
                index.sources = None
            if has_rows and has_meta and not replace:
                self.table = self.db.open_table(self.name)
                self.docs = self.db.open_table(self.name + _DOCS)
                docs = self.docs.to_arrow()
                index.documents = dict(zip(docs.column("document").to_pylist(), docs.column("hash").to_pylist(),
                                           strict=True))
                counts = self.table.search().select(["document"]).limit(None).to_arrow().column("document")
                index.rows = {c["values"]: c["counts"] for c in pc.value_counts(counts).to_pylist()}
            elif create:
                from deposium.producer.schema import output_schema

                schema = output_schema(int(identity["dim"]), str(identity["dtype"]))
                self.table = self.db.create_table(self.name, schema=schema)
                self.docs = self.db.create_table(self.name + _DOCS, schema=pa.schema(
                    [pa.field("document", pa.string(), nullable=False), pa.field("hash", pa.string(), nullable=False)]))
                self.db.create_table(self.name + _META, pa.table({"key": ["identity"], "value": [dumps(identity)]}))
        except SinkError:
            raise
        except (OSError, ValueError, RuntimeError) as exc:
            raise SinkError(f"{self.target}: cannot open the LanceDB table: {' '.join(str(exc).split())[:300]}") \
                from None
        return index

    def lookup(self, content_hashes: Collection[str]) -> dict[str, Stored]:
        if not content_hashes or self.table is None:
            return {}
        return lookup_vectors(self.table, content_hashes)

    def ids_of(self, documents: Collection[str]) -> set[str]:
        if not documents or self.table is None:
            return set()
        got = self.table.search().where(_in("document", documents)).select(["id"]).limit(None).to_arrow()
        return set(got.column("id").to_pylist())

    def apply(self, rows: pa.Table, documents: Mapping[str, str | None]) -> int:
        if not documents:
            return 0
        where = _in("document", documents)
        self.docs.delete(where)
        old = self.ids_of(documents)
        if rows.num_rows:
            (self.table.merge_insert("id").when_matched_update_all().when_not_matched_insert_all()
             .when_not_matched_by_source_delete(where).execute(rows))
        elif old:
            self.table.delete(where)
        kept = [(d, h) for d, h in documents.items() if h is not None]
        if kept:
            self.docs.add(pa.table({"document": [d for d, _ in kept], "hash": [h for _, h in kept]},
                                   schema=self.docs.schema))
        new_ids = set(rows.column("id").to_pylist())
        return sum(1 for i in old if i not in new_ids)

    def finish(self, sources: list[str]) -> None:
        meta = self.db.open_table(self.name + _META)
        meta.delete("key = 'sources'")
        meta.add(pa.table({"key": ["sources"], "value": [dumps(sources)]}))
        try:
            self.table.optimize()
            self.docs.optimize()
        except (OSError, ValueError, RuntimeError):
            pass  # compaction is an optimisation; the commits above are what counts

    def close(self) -> None:
        self._lock.release()
