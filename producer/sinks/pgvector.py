"""PostgreSQL + pgvector sink: ``postgresql://user[:password]@host[:port]/db?table=NAME``.

Why one transaction per batch: the batch's rows (binary COPY into a temporary staging
table, then one ``INSERT … ON CONFLICT (id) DO UPDATE``) and its done-mark (a row in
``NAME_deposium_batches``) commit together, so a producer crash, a worker redelivery or a
resume can neither drop nor duplicate a paragraph: the store itself says which batches are
done, and a paragraph id is the primary key.

Why a hand-built COPY stream: the binary COPY format is simple and lets the whole batch's
vectors be byte-swapped by numpy at once, instead of one Python call per row and column.

Secrets come from the URL or the standard ``PG*`` environment variables (read by libpq
itself); only :func:`deposium.worker.config.mask_url`-masked targets are ever printed.
"""

from __future__ import annotations

import struct
import sys
import threading
import time
from collections.abc import Collection, Mapping
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import numpy as np
import pyarrow as pa

from deposium.producer.shard import pending_message
from deposium.producer.sinks import SinkError, SinkJob, Stored
from deposium.worker.config import mask_url

#: First key of the table's advisory lock (the second is the table name's hash): one producer per table.
LOCK_CLASS = 0x64657073
#: Seconds a refused lock is tried again: the backend of a producer killed a moment ago may
#: still be ending, its session lock with it.
LOCK_GRACE_S = 2.0
#: Query parameters this sink reads itself; every other one goes to libpq (sslmode, ...).
OWN_PARAMS = {"table", "index"}
INDEX_KINDS = {"hnsw"}
_HEADER = b"PGCOPY\n\xff\r\n\x00" + struct.pack(">ii", 0, 0)
_TRAILER = struct.pack(">h", -1)
_CORE = ("id", "document", "index", "content_hash", "text", "token_count", "truncated", "job_id",
         "model_id", "model_sha256", "embedding")
#: Provenance columns (nullable) and their SQL types; a table made before they existed gets them added.
_PROVENANCE = {"page": "integer", "heading": "text", "char_start": "bigint", "char_end": "bigint", "title": "text"}
_COLUMNS = _CORE + tuple(_PROVENANCE)
_NULL = struct.pack(">i", -1)


def _short(exc: BaseException) -> str:
    """One line of a driver error: libpq messages span lines (DETAIL, HINT, context)."""
    text = " ".join(str(exc).split())
    return text[:400] or type(exc).__name__


def parse_target(target: str) -> tuple[str, str | None, str, str | None]:
    """Split a target into (libpq URL, schema, table, index kind); raise SinkError when malformed."""
    try:
        parts = urlsplit(target)
        _ = parts.port  # validates the port
    except ValueError as exc:
        raise SinkError(f"malformed PostgreSQL URL {mask_url(target)}: {exc}") from None
    if parts.scheme not in {"postgresql", "postgres"}:
        raise SinkError(f"not a PostgreSQL URL: {mask_url(target)}")
    params = parse_qsl(parts.query, keep_blank_values=True)
    own = {k: v for k, v in params if k in OWN_PARAMS}
    rest = [(k, v) for k, v in params if k not in OWN_PARAMS]
    table = own.get("table", "").strip()
    if not table:
        raise SinkError(f"{mask_url(target)}: name the table, e.g. postgresql://user@host/db?table=embeddings")
    schema, _, name = table.rpartition(".")
    if not name or len(name.encode()) > 50 or (schema and len(schema.encode()) > 63):
        raise SinkError(f"{mask_url(target)}: invalid table name {table!r} (at most 50 bytes)")
    index = own.get("index") or None
    if index is not None and index not in INDEX_KINDS:
        raise SinkError(f"{mask_url(target)}: unknown index {index!r}; use index=hnsw")
    if not any(k == "connect_timeout" for k, _ in rest):
        rest.append(("connect_timeout", "10"))
    conninfo = urlunsplit((parts.scheme, parts.netloc, parts.path, urlencode(rest), ""))
    try:
        from psycopg.conninfo import conninfo_to_dict

        conninfo_to_dict(conninfo)
    except Exception as exc:  # noqa: BLE001 - libpq's parser, any failure means a bad URL
        raise SinkError(f"malformed PostgreSQL URL {mask_url(target)}: {_short(exc)}") from None
    return conninfo, schema or None, name, index


def lock_table(conn: Any, quoted_name: str, qualified_name: str, *, shared: bool = False) -> None:
    """One producer per table: a session advisory lock, dropped by PostgreSQL when ``conn``
    ends, however its process ends (``kill -9`` included). Jobs and syncs take the same lock;
    the shards of one sharded job take it ``shared`` (and each its own shard's key exclusively)."""
    key = (LOCK_CLASS, quoted_name)
    give_up = time.monotonic() + LOCK_GRACE_S
    take = "pg_try_advisory_lock_shared" if shared else "pg_try_advisory_lock"
    with conn.cursor() as cur:
        while True:
            cur.execute(f"SELECT {take}(%s, hashtext(%s))", key)
            if cur.fetchone()[0]:
                break
            if time.monotonic() >= give_up:
                cur.execute(
                    "SELECT a.application_name, a.pid, a.client_addr::text FROM pg_locks l "
                    "JOIN pg_stat_activity a ON a.pid = l.pid WHERE l.locktype = 'advisory' "
                    "AND l.granted AND l.classid = %s::oid AND l.objid = hashtext(%s)::oid "
                    "AND l.objsubid = 2", key)
                row = cur.fetchone()
                holder = "another producer"
                if row is not None:
                    name, pid, addr = row
                    who = f"job {name.split()[-1]}" if (name or "").startswith("deposium-submit j") \
                        else "another producer"
                    holder = f"{who} (PostgreSQL backend pid {pid}, client {addr or 'local socket'})"
                raise SinkError(f"table {qualified_name} is being written by {holder}; wait "
                                "for it to end, or stop it, then re-run this command to resume")
            time.sleep(0.2)
    conn.commit()


def lookup_vectors(conn: Any, table: Any, content_hashes: Collection[str]) -> dict[str, Stored]:
    """Stored vectors of these texts (any row holding each hash), through the content_hash index."""
    from psycopg import sql

    found: dict[str, Stored] = {}
    with conn.cursor(binary=True) as cur:
        cur.execute(sql.SQL("SELECT DISTINCT ON (content_hash) content_hash, embedding, token_count, truncated "
                            "FROM {} WHERE content_hash = ANY(%s)").format(table), (list(content_hashes),))
        for h, vec, count, trunc in cur.fetchall():
            arr = vec.to_numpy() if hasattr(vec, "to_numpy") else np.asarray(vec)
            found[h] = Stored(np.asarray(arr), int(count), bool(trunc))
    conn.commit()
    return found


class PgVectorSink:
    """Rows into a pgvector table; done-marks into ``<table>_deposium_batches`` (same schema)."""

    index_kinds = ("hnsw",)

    def __init__(self, target: str) -> None:
        self.conninfo, self.schema, self.name, self.index = parse_target(target)
        self.target = mask_url(target)
        self.model_id = ""
        self.job: SinkJob | None = None
        self.conn: Any = None
        self._done: dict[str, str] = {}
        self.index_seconds: float | None = None

    # -- identifiers --------------------------------------------------------------------------
    def _ident(self, name: str) -> Any:
        from psycopg import sql

        return sql.Identifier(self.schema, name) if self.schema else sql.Identifier(name)

    @property
    def _table(self) -> Any:
        return self._ident(self.name)

    @property
    def _batches(self) -> Any:
        return self._ident(f"{self.name}_deposium_batches")

    def _qualified(self, name: str) -> str:
        return f"{self.schema}.{name}" if self.schema else name

    # -- connection ---------------------------------------------------------------------------
    def _connect(self, job_id: str = "") -> Any:
        import psycopg

        try:
            return psycopg.connect(self.conninfo, application_name=f"deposium-submit {job_id}".strip())
        except psycopg.OperationalError as exc:
            raise SinkError(f"cannot connect to PostgreSQL at {self.target}: {_short(exc)}") from None

    def _sql_error(self, what: str, exc: BaseException) -> SinkError:
        return SinkError(f"{self.target}: {what}: {_short(exc)}")

    # -- protocol -----------------------------------------------------------------------------
    def open(self, job: SinkJob) -> None:
        """Validate or create the table before any embedding work (see module docstring)."""
        import psycopg

        self.job = job
        if job.dim > 16000:
            raise SinkError(f"pgvector stores at most 16000 dimensions, the job has {job.dim}")
        self.conn = self._connect(job.job_id)
        try:
            self._lock(job)
            self._open(job)
        except psycopg.Error as exc:
            self.conn.rollback()
            self.conn.close()
            self.conn = None
            raise self._sql_error("cannot prepare the table", exc) from None
        except SinkError:
            self.conn.rollback()
            self.conn.close()
            self.conn = None
            raise

    def _lock(self, job: SinkJob) -> None:
        if job.shards > 1:
            shard = f"shard {job.shard}/{job.shards}"
            lock_table(self.conn, f"{self._quoted_name()} {shard}", f"{self._qualified(self.name)} {shard}")
        lock_table(self.conn, self._quoted_name(), self._qualified(self.name), shared=job.shards > 1)
        if job.shards > 1:  # shards create or check the table one at a time (released at commit)
            with self.conn.cursor() as cur:
                cur.execute("SELECT pg_advisory_xact_lock(%s, hashtext(%s))",
                            (LOCK_CLASS, f"{self._quoted_name()} publish"))

    @property
    def _shards(self) -> Any:
        return self._ident(f"{self.name}_deposium_shards")

    def _close_shard(self, complete: bool) -> None:
        """Mark this shard finished; the shard that finds every shard finished builds the index."""
        from psycopg import sql

        job = self.job
        assert job is not None
        conn = self.conn
        with conn.transaction(), conn.cursor() as cur:
            cur.execute(sql.SQL("INSERT INTO {} (job_id, shard, shards, complete) VALUES (%s, %s, %s, %s) "
                                "ON CONFLICT (job_id, shard) DO UPDATE SET complete = EXCLUDED.complete, "
                                "finished_at = now()").format(self._shards),
                        (job.job_id, job.shard, job.shards, complete))
        with conn.cursor() as cur:  # one shard at a time past this point, until its index is built
            cur.execute("SELECT pg_advisory_lock(%s, hashtext(%s))", (LOCK_CLASS, f"{self._quoted_name()} publish"))
        conn.commit()
        try:
            with conn.cursor() as cur:
                cur.execute(sql.SQL("SELECT shard, complete FROM {} WHERE job_id = %s AND shards = %s")
                            .format(self._shards), (job.job_id, job.shards))
                states = {int(i): bool(c) for i, c in cur.fetchall()}
            conn.commit()
            missing = [i for i in range(job.shards) if i not in states]
            if missing:
                print(pending_message(self.target, missing, job.shards), file=sys.stderr, flush=True)
            elif all(states.values()) and self.index:
                self.build_index()
        finally:
            with conn.cursor() as cur:
                cur.execute("SELECT pg_advisory_unlock(%s, hashtext(%s))",
                            (LOCK_CLASS, f"{self._quoted_name()} publish"))
            conn.commit()

    def _open(self, job: SinkJob) -> None:
        from pgvector.psycopg import register_vector
        from psycopg import sql

        conn = self.conn
        vtype = "halfvec" if job.dtype == "float16" else "vector"
        want = f"{vtype}({job.dim})"
        with conn.cursor() as cur:
            cur.execute("SELECT extversion FROM pg_extension WHERE extname = 'vector'")
            if cur.fetchone() is None:
                try:
                    cur.execute("CREATE EXTENSION IF NOT EXISTS vector")
                except Exception as exc:  # noqa: BLE001 - reported as one clear line
                    raise SinkError(f"{self.target}: the pgvector extension is not enabled in this database "
                                    f"and cannot be created by this user ({_short(exc)}); run "
                                    "'CREATE EXTENSION vector' as its owner") from None
            if vtype == "halfvec":
                cur.execute("SELECT 1 FROM pg_type WHERE typname = 'halfvec'")
                if cur.fetchone() is None:
                    raise SinkError(f"{self.target}: float16 needs pgvector >= 0.7 (halfvec)")
            existing = self._describe_table(cur)
            if existing is not None:
                owner, coltype, can_write, columns = existing
                if not can_write:
                    raise SinkError(
                        f"table {self._qualified(self.name)} is owned by role {owner!r} and the current user "
                        "may not write to it (needs SELECT, INSERT, UPDATE, DELETE); choose another "
                        "table or have its owner GRANT those privileges")
                mismatch = None
                missing = [c for c in _CORE if c not in columns]
                if coltype is not None and coltype != want:
                    mismatch = f"stores {coltype}, this job writes {want}"
                elif missing:
                    mismatch = f"lacks the columns {', '.join(missing)} (not a deposium table)"
                else:
                    cur.execute(sql.SQL("SELECT model_sha256 FROM {} WHERE model_sha256 <> %s LIMIT 1")
                                .format(self._table), (job.model_sha256,))
                    row = cur.fetchone()
                    if row is not None:
                        mismatch = (f"holds rows from another model (artifact sha256 {row[0][:12]}, this "
                                    f"job uses {job.model_sha256[:12]})")
                if mismatch:
                    if not job.replace:
                        raise SinkError(f"table {self._qualified(self.name)} {mismatch}; pass --replace to "
                                        "overwrite it deliberately")
                    cur.execute(sql.SQL("DROP TABLE {}").format(self._table))
                    cur.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(self._batches))
                    existing = None
                elif job.replace:  # same model and dimension: drop only this job's rows and marks
                    cur.execute(sql.SQL("DELETE FROM {} WHERE job_id = %s").format(self._table), (job.job_id,))
                    cur.execute("SELECT to_regclass(%s)", (self._quoted_name("_deposium_batches"),))
                    if cur.fetchone()[0] is not None:
                        cur.execute(sql.SQL("DELETE FROM {} WHERE job_id = %s").format(self._batches),
                                    (job.job_id,))
            provenance = sql.SQL(", ").join(sql.SQL("{} {}").format(sql.Identifier(c), sql.SQL(t))
                                            for c, t in _PROVENANCE.items())
            if existing is None:
                cur.execute(sql.SQL(
                    "CREATE TABLE {} (id text PRIMARY KEY, document text NOT NULL, \"index\" integer NOT NULL, "
                    "content_hash text NOT NULL, text text NOT NULL, token_count integer NOT NULL, "
                    "truncated boolean NOT NULL, job_id text NOT NULL, model_id text NOT NULL, "
                    "model_sha256 text NOT NULL, embedding {} NOT NULL, {})").format(
                        self._table, sql.SQL(want), provenance))
                cur.execute(sql.SQL("CREATE INDEX {} ON {} (content_hash)").format(
                    sql.Identifier(f"{self.name}_content_hash_idx"), self._table))
            else:
                self._add_provenance(cur, existing[3])
            cur.execute(sql.SQL(
                "CREATE TABLE IF NOT EXISTS {} (job_id text NOT NULL, batch_id text NOT NULL, "
                "digest text NOT NULL, model_sha256 text NOT NULL, rows integer NOT NULL, "
                "committed_at timestamptz NOT NULL DEFAULT now(), PRIMARY KEY (job_id, batch_id))")
                .format(self._batches))
            if job.shards > 1:
                cur.execute(sql.SQL(
                    "CREATE TABLE IF NOT EXISTS {} (job_id text NOT NULL, shard integer NOT NULL, "
                    "shards integer NOT NULL, complete boolean NOT NULL, "
                    "finished_at timestamptz NOT NULL DEFAULT now(), PRIMARY KEY (job_id, shard))")
                    .format(self._shards))
                cur.execute(sql.SQL("DELETE FROM {} WHERE job_id = %s AND shard = %s").format(self._shards),
                            (job.job_id, job.shard))  # running again: not finished until it ends
            cur.execute(sql.SQL("CREATE TEMP TABLE deposium_stage (LIKE {}) ON COMMIT DELETE ROWS")
                        .format(self._table))
            cur.execute(sql.SQL("SELECT batch_id, digest FROM {} WHERE job_id = %s").format(self._batches),
                        (job.job_id,))
            self._done = {b: d for b, d in cur.fetchall()}
        conn.commit()
        register_vector(conn)

    def _add_provenance(self, cur: Any, columns: set[str]) -> None:
        """A table made before the provenance columns existed gets them (null for its old rows)."""
        import psycopg
        from psycopg import sql

        missing = [c for c in _PROVENANCE if c not in columns]
        if not missing:
            return
        try:
            for c in missing:
                cur.execute(sql.SQL("ALTER TABLE {} ADD COLUMN IF NOT EXISTS {} {}").format(
                    self._table, sql.Identifier(c), sql.SQL(_PROVENANCE[c])))
        except psycopg.errors.InsufficientPrivilege:
            raise SinkError(
                f"table {self._qualified(self.name)} predates the provenance columns ({', '.join(missing)}) and "
                "the current user may not add them; have its owner run ALTER TABLE ... ADD COLUMN "
                "(nullable), or pass --replace") from None

    def _describe_table(self, cur: Any) -> tuple[str, str | None, bool, set[str]] | None:
        """(owner, embedding column type, may write, column names) of the existing table, or None."""
        cur.execute("SELECT to_regclass(%s)::oid", (self._quoted_name(),))
        row = cur.fetchone()
        if row is None or row[0] is None:
            return None
        oid = row[0]
        cur.execute(
            "SELECT pg_get_userbyid(c.relowner), has_table_privilege(c.oid, 'SELECT'), "
            "has_table_privilege(c.oid, 'INSERT'), has_table_privilege(c.oid, 'UPDATE'), "
            "has_table_privilege(c.oid, 'DELETE'), "
            "(SELECT format_type(a.atttypid, a.atttypmod) FROM pg_attribute a "
            " WHERE a.attrelid = c.oid AND a.attname = 'embedding' AND NOT a.attisdropped) "
            "FROM pg_class c WHERE c.oid = %s", (oid,))
        owner, s, i, u, d, coltype = cur.fetchone()
        cur.execute("SELECT attname FROM pg_attribute WHERE attrelid = %s AND attnum > 0 AND NOT attisdropped",
                    (oid,))
        return owner, coltype, bool(s and i and u and d), {r[0] for r in cur.fetchall()}

    def _quoted_name(self, suffix: str = "") -> str:
        def q(part: str) -> str:
            return '"' + part.replace('"', '""') + '"'

        name = q(self.name + suffix)
        return f"{q(self.schema)}.{name}" if self.schema else name

    def done_batches(self) -> dict[str, str]:
        return dict(self._done)

    def _copy_stream(self, rows: pa.Table) -> bytes:
        """The batch as one binary COPY stream (header, tuples, trailer) for :data:`_COLUMNS`."""
        assert self.job is not None
        n = rows.num_rows
        dim = self.job.dim
        half = self.job.dtype == "float16"
        flat = rows.column("embedding").combine_chunks().flatten().to_numpy(zero_copy_only=False)
        vectors = np.asarray(flat).reshape(n, dim).astype(">f2" if half else ">f4")
        vbytes = vectors.tobytes()
        vsize = vectors.itemsize * dim
        vprefix = struct.pack(">ihh", 4 + vsize, dim, 0)
        job_id = self.job.job_id.encode()
        model_id = self.model_id.encode()
        sha = self.job.model_sha256.encode()
        consts = (struct.pack(">i", len(job_id)) + job_id + struct.pack(">i", len(model_id)) + model_id
                  + struct.pack(">i", len(sha)) + sha)
        ids = rows.column("id").to_pylist()
        docs = rows.column("document").to_pylist()
        idx = rows.column("index").to_pylist()
        hashes = rows.column("content_hash").to_pylist()
        texts = rows.column("text").to_pylist()
        counts = rows.column("token_count").to_pylist()
        truncs = rows.column("truncated").to_pylist()
        provenance = [rows.column(c).to_pylist() if c in rows.column_names else [None] * n for c in _PROVENANCE]
        pack_text = struct.Struct(">i").pack
        pack_int = struct.Struct(">ii").pack
        pack_big = struct.Struct(">iq").pack

        def optional(kind: str, value: Any) -> bytes:
            if value is None:
                return _NULL
            if kind == "integer":
                return pack_int(4, value)
            if kind == "bigint":
                return pack_big(8, value)
            raw = value.encode()
            return pack_text(len(raw)) + raw

        kinds = list(_PROVENANCE.values())
        int_field = struct.Struct(">ii").pack
        nfields = struct.pack(">h", len(_COLUMNS))
        out = [_HEADER]
        for r in range(n):
            i_b, d_b, h_b, t_b = ids[r].encode(), docs[r].encode(), hashes[r].encode(), texts[r].encode()
            out += [nfields, pack_text(len(i_b)), i_b, pack_text(len(d_b)), d_b, int_field(4, idx[r]),
                    pack_text(len(h_b)), h_b, pack_text(len(t_b)), t_b, int_field(4, counts[r]),
                    b"\x00\x00\x00\x01\x01" if truncs[r] else b"\x00\x00\x00\x01\x00", consts, vprefix,
                    vbytes[r * vsize:(r + 1) * vsize]]
            out += [optional(k, col[r]) for k, col in zip(kinds, provenance, strict=True)]
        out.append(_TRAILER)
        return b"".join(out)

    def write_batch(self, batch_id: str, digest: str, rows: pa.Table) -> None:
        """COPY the rows, upsert them by id and record the batch done, in one transaction."""
        import psycopg
        from psycopg import sql

        if self.conn is None or self.job is None:
            raise SinkError("write_batch before open")
        cols = sql.SQL(", ").join(sql.Identifier(c) for c in _COLUMNS)
        updates = sql.SQL(", ").join(sql.SQL("{0} = EXCLUDED.{0}").format(sql.Identifier(c)) for c in _COLUMNS[1:])
        try:
            with self.conn.transaction(), self.conn.cursor() as cur:
                if rows.num_rows:
                    with cur.copy(sql.SQL("COPY deposium_stage ({}) FROM STDIN WITH (FORMAT BINARY)")
                                  .format(cols)) as copy:
                        copy.write(self._copy_stream(rows))
                    cur.execute(sql.SQL("INSERT INTO {} ({}) SELECT {} FROM deposium_stage "
                                        "ON CONFLICT (id) DO UPDATE SET {}").format(self._table, cols, cols, updates))
                cur.execute(sql.SQL(
                    "INSERT INTO {} (job_id, batch_id, digest, model_sha256, rows) VALUES (%s, %s, %s, %s, %s) "
                    "ON CONFLICT (job_id, batch_id) DO UPDATE SET digest = EXCLUDED.digest, "
                    "rows = EXCLUDED.rows, committed_at = now()").format(self._batches),
                    (self.job.job_id, batch_id, digest, self.job.model_sha256, rows.num_rows))
        except psycopg.Error as exc:
            raise self._sql_error(f"writing batch {batch_id} failed (rolled back)", exc) from None
        self._done[batch_id] = digest

    def lookup(self, wanted: Mapping[str, str]) -> dict[str, Stored]:
        """Vectors of already committed identical texts, via the content_hash index."""
        if not wanted or self.conn is None:
            return {}
        return lookup_vectors(self.conn, self._table, list(wanted))

    def release(self) -> None:
        """Close the connection: its advisory lock and temporary table go with it."""
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    def close(self, complete: bool) -> None:
        """Build the requested index once every batch is in (an index is cheaper built once)."""
        if self.conn is None:
            return
        try:
            if self.job is not None and self.job.shards > 1:
                self._close_shard(complete)
            elif complete and self.index:
                self.build_index()
        finally:
            self.conn.close()
            self.conn = None

    def build_index(self) -> None:
        """``CREATE INDEX … USING hnsw (embedding vector_cosine_ops)``, progress on stderr."""
        import psycopg
        from psycopg import sql

        assert self.job is not None
        ops = "halfvec_cosine_ops" if self.job.dtype == "float16" else "vector_cosine_ops"
        name = sql.Identifier(f"{self.name}_embedding_hnsw")
        stmt = sql.SQL("CREATE INDEX IF NOT EXISTS {} ON {} USING hnsw (embedding {})").format(
            name, self._table, sql.SQL(ops))
        error: list[BaseException] = []
        pid = self.conn.info.backend_pid

        def build() -> None:
            try:
                with self.conn.transaction():
                    self.conn.execute(stmt)
            except BaseException as exc:  # noqa: BLE001 - re-raised in the calling thread
                error.append(exc)

        started = time.monotonic()
        print(f"building hnsw index on {self._qualified(self.name)} ({ops})...", file=sys.stderr, flush=True)
        thread = threading.Thread(target=build, name="hnsw-build", daemon=True)
        thread.start()
        watcher = None
        try:
            watcher = psycopg.connect(self.conninfo, autocommit=True)
        except psycopg.Error:
            pass
        last = ""
        while thread.is_alive():
            thread.join(1.0)
            if watcher is None or not thread.is_alive():
                continue
            row = watcher.execute("SELECT phase, tuples_done, tuples_total, blocks_done, blocks_total "
                                  "FROM pg_stat_progress_create_index WHERE pid = %s", (pid,)).fetchone()
            if row:
                phase, td, tt, bd, bt = row
                line = f"  hnsw: {phase}: {td:,}/{tt:,} tuples, {bd:,}/{bt:,} blocks"
                if line != last:
                    print(line, file=sys.stderr, flush=True)
                    last = line
        if watcher is not None:
            watcher.close()
        if error:
            raise self._sql_error("building the hnsw index failed", error[0])
        self.index_seconds = time.monotonic() - started
        print(f"hnsw index ready in {self.index_seconds:.1f}s", file=sys.stderr, flush=True)
