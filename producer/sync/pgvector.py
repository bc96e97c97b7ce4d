"""A synced store in PostgreSQL + pgvector: rows, document hashes and identity in three tables.

Layout for ``postgresql://…?table=docs``: ``docs`` (the rows, one per paragraph, the columns of
the Parquet output with ``embedding`` as ``vector(dim)`` or ``halfvec(dim)``),
``docs_deposium_documents`` (document → text hash) and ``docs_deposium_sync`` (identity and
sources). Why one transaction per apply: a reader never sees a document half old and half new,
and a document's hash is committed together with exactly the rows it describes.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping
from typing import Any

import numpy as np
import pyarrow as pa

from deposium.producer.sinks import SinkError, Stored
from deposium.producer.sinks.pgvector import _short, lock_table, lookup_vectors, parse_target
from deposium.producer.sync.store import SyncIndex, dumps, identity_mismatch
from deposium.worker.config import mask_url


def _column_type(field: pa.Field, dim: int, half: bool) -> str:
    if field.name == "embedding":
        return f"{'halfvec' if half else 'vector'}({dim})"
    if pa.types.is_string(field.type):
        return "text"
    if pa.types.is_integer(field.type):
        return "integer" if field.type.bit_width <= 32 else "bigint"
    if pa.types.is_boolean(field.type):
        return "boolean"
    if pa.types.is_floating(field.type):
        return "double precision"
    raise SinkError(f"no PostgreSQL column type for {field.name}: {field.type}")


def _vector_text(v: np.ndarray) -> str:
    # repr of the float32/float16 value widened to double: PostgreSQL rounds it back to the same bits
    return "[" + ",".join(repr(float(x)) for x in v) + "]"


class PgSyncStore:
    """See the module docstring."""

    def __init__(self, target: str) -> None:
        self.conninfo, self.schema, self.name, _ = parse_target(target)
        self.target = mask_url(target)
        self.conn: Any = None
        self._columns: list[str] = []
        self._identity: dict[str, Any] = {}

    def _ident(self, suffix: str = "") -> Any:
        from psycopg import sql

        name = self.name + suffix
        return sql.Identifier(self.schema, name) if self.schema else sql.Identifier(name)

    def _quoted(self, suffix: str = "") -> str:
        name = '"' + (self.name + suffix).replace('"', '""') + '"'
        return '"' + self.schema.replace('"', '""') + '".' + name if self.schema else name

    def _regclass(self, cur: Any, suffix: str = "") -> bool:
        cur.execute("SELECT to_regclass(%s)", (self._quoted(suffix),))
        return cur.fetchone()[0] is not None

    def open(self, identity: Mapping[str, Any], *, replace: bool, create: bool) -> SyncIndex:
        import psycopg
        from psycopg import sql

        self._identity = dict(identity)
        try:
            self.conn = psycopg.connect(self.conninfo, application_name="deposium-submit --sync")
        except psycopg.OperationalError as exc:
            raise SinkError(f"cannot connect to PostgreSQL at {self.target}: {_short(exc)}") from None
        index = SyncIndex()
        try:
            with self.conn.cursor() as cur:
                if create:
                    lock_table(self.conn, self._quoted(), self.name if not self.schema else
                               f"{self.schema}.{self.name}")
                has_rows, has_sync = self._regclass(cur), self._regclass(cur, "_deposium_sync")
                stored = None
                if has_sync:
                    cur.execute(sql.SQL("SELECT key, value FROM {}").format(self._ident("_deposium_sync")))
                    meta = {k: json.loads(v) for k, v in cur.fetchall()}
                    stored = meta.get("identity")
                    index.sources = meta.get("sources")
                why = identity_mismatch(stored, identity, self.target) if has_rows or has_sync else None
                if why and not replace:
                    raise SinkError(why)
                if (why or replace) and create:
                    for suffix in ("", "_deposium_documents", "_deposium_sync", "_deposium_batches"):
                        cur.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(self._ident(suffix)))
                    has_rows = has_sync = False
                    index.sources = None
                if has_rows and has_sync and not replace:
                    cur.execute(sql.SQL("SELECT document, hash FROM {}").format(self._ident("_deposium_documents")))
                    index.documents = dict(cur.fetchall())
                    cur.execute(sql.SQL("SELECT document, count(*) FROM {} GROUP BY document").format(self._ident()))
                    index.rows = {d: int(n) for d, n in cur.fetchall()}
                if create and not has_rows:
                    self._create(cur)
            self.conn.commit()
        except psycopg.Error as exc:
            self.conn.rollback()
            raise SinkError(f"{self.target}: cannot open the synced table: {_short(exc)}") from None
        return index

    def _create(self, cur: Any) -> None:
        from psycopg import sql

        from deposium.producer.schema import output_schema

        cur.execute("CREATE EXTENSION IF NOT EXISTS vector")
        dim, half = int(self._identity["dim"]), self._identity["dtype"] == "float16"
        cols = [sql.SQL("{} {}{}").format(sql.Identifier(f.name), sql.SQL(_column_type(f, dim, half)),
                                          sql.SQL(" PRIMARY KEY" if f.name == "id" else
                                                  ("" if f.nullable else " NOT NULL")))
                for f in output_schema(dim, str(self._identity["dtype"]))]
        cur.execute(sql.SQL("CREATE TABLE {} ({})").format(self._ident(), sql.SQL(", ").join(cols)))
        cur.execute(sql.SQL("CREATE INDEX {} ON {} (content_hash)").format(
            sql.Identifier(f"{self.name}_content_hash_idx"), self._ident()))
        cur.execute(sql.SQL("CREATE INDEX {} ON {} (document)").format(
            sql.Identifier(f"{self.name}_document_idx"), self._ident()))
        cur.execute(sql.SQL("CREATE TABLE {} (document text PRIMARY KEY, hash text NOT NULL)")
                    .format(self._ident("_deposium_documents")))
        cur.execute(sql.SQL("CREATE TABLE {} (key text PRIMARY KEY, value text NOT NULL)")
                    .format(self._ident("_deposium_sync")))
        cur.execute(sql.SQL("INSERT INTO {} VALUES ('identity', %s)").format(self._ident("_deposium_sync")),
                    (dumps(self._identity),))

    def lookup(self, content_hashes: Collection[str]) -> dict[str, Stored]:
        from pgvector.psycopg import register_vector

        if not content_hashes:
            return {}
        register_vector(self.conn)
        return lookup_vectors(self.conn, self._ident(), content_hashes)

    def ids_of(self, documents: Collection[str]) -> set[str]:
        from psycopg import sql

        if not documents or self.conn is None:
            return set()
        with self.conn.cursor() as cur:
            if not self._regclass(cur):
                return set()
            cur.execute(sql.SQL("SELECT id FROM {} WHERE document = ANY(%s)").format(self._ident()), (list(documents),))
            ids = {r[0] for r in cur.fetchall()}
        self.conn.commit()
        return ids

    def apply(self, rows: pa.Table, documents: Mapping[str, str | None]) -> int:
        import psycopg
        from psycopg import sql

        docs = list(documents)
        names = rows.schema.names
        cols = sql.SQL(", ").join(sql.Identifier(c) for c in names)
        # rows whose id already holds the same text keep their tuple unless a position column moved
        changed = sql.SQL(" OR ").join(sql.SQL("t.{0} IS DISTINCT FROM EXCLUDED.{0}").format(sql.Identifier(c))
                                       for c in names if c not in {"id", "embedding"})
        updates = sql.SQL(", ").join(sql.SQL("{0} = EXCLUDED.{0}").format(sql.Identifier(c)) for c in names[1:])
        try:
            with self.conn.transaction(), self.conn.cursor() as cur:
                cur.execute(sql.SQL("DELETE FROM {} WHERE document = ANY(%s)").format(
                    self._ident("_deposium_documents")), (docs,))
                cur.execute(sql.SQL("DELETE FROM {} WHERE document = ANY(%s) AND NOT (id = ANY(%s))").format(
                    self._ident()), (docs, rows.column("id").to_pylist()))
                removed = cur.rowcount
                if rows.num_rows:
                    cur.execute(sql.SQL("CREATE TEMP TABLE IF NOT EXISTS deposium_sync_stage (LIKE {}) "
                                        "ON COMMIT DELETE ROWS").format(self._ident()))
                    data = {c: rows.column(c).to_pylist() for c in names if c != "embedding"}
                    flat = rows.column("embedding").combine_chunks().flatten().to_numpy(zero_copy_only=False)
                    vectors = np.asarray(flat).reshape(rows.num_rows, -1)
                    with cur.copy(sql.SQL("COPY deposium_sync_stage ({}) FROM STDIN").format(cols)) as copy:
                        for r in range(rows.num_rows):
                            copy.write_row([_vector_text(vectors[r]) if c == "embedding" else data[c][r]
                                            for c in names])
                    cur.execute(sql.SQL("INSERT INTO {} AS t ({}) SELECT {} FROM deposium_sync_stage "
                                        "ON CONFLICT (id) DO UPDATE SET {} WHERE {}")
                                .format(self._ident(), cols, cols, updates, changed))
                kept = [(d, h) for d, h in documents.items() if h is not None]
                if kept:
                    cur.executemany(sql.SQL("INSERT INTO {} (document, hash) VALUES (%s, %s)").format(
                        self._ident("_deposium_documents")), kept)
        except psycopg.Error as exc:
            raise SinkError(f"{self.target}: writing {len(docs)} document(s) failed (rolled back): "
                            f"{_short(exc)}") from None
        return removed

    def finish(self, sources: list[str]) -> None:
        from psycopg import sql

        with self.conn.transaction(), self.conn.cursor() as cur:
            cur.execute(sql.SQL("INSERT INTO {} VALUES ('sources', %s) ON CONFLICT (key) DO UPDATE "
                                "SET value = EXCLUDED.value").format(self._ident("_deposium_sync")),
                        (dumps(sources),))

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()  # also drops the advisory lock
            self.conn = None
