"""LanceDB sink: ``lancedb://PATH?table=NAME`` (the embedded, serverless vector database).

Why the batch id travels in every row: one ``Table.add`` is one atomic Lance commit, so a
batch's rows and its done-mark (the rows' ``batch_id`` / ``batch_digest`` columns) appear
together or not at all; a resumed job reads the done batches back from the table itself.
A batch with no rows (every paragraph failed) has nothing to carry its id, so it alone is
marked in ``NAME_deposium_batches``; losing that mark only means re-sending an empty batch.
A batch written again (a re-run after ``--replace``) first deletes its earlier rows.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import numpy as np
import pyarrow as pa

from deposium.producer.schema import PROVENANCE, output_schema
from deposium.producer.sinks import SinkError, SinkJob, Stored
from deposium.producer.sinks.lock import OutputLocks, finish_shard

EXTRA = ("job_id", "model_id", "model_sha256", "batch_id", "batch_digest")
#: IVF_PQ codebooks need training data; below this many rows that index is skipped (a flat scan is fast).
MIN_INDEX_ROWS = 256


def _lit(value: str) -> str:
    """A SQL string literal for LanceDB filters."""
    return "'" + value.replace("'", "''") + "'"


def table_schema(dim: int, dtype: str) -> pa.Schema:
    """The Parquet columns plus job, model and batch columns (the batch columns are the done-mark)."""
    base = output_schema(dim, dtype)
    return pa.schema(list(base) + [pa.field(c, pa.string(), nullable=False) for c in EXTRA])


def parse_target(target: str) -> tuple[Path, str, str | None]:
    """``lancedb://PATH?table=NAME[&index=ivf_pq]`` → (database directory, table, index kind)."""
    if not target.lower().startswith("lancedb://"):
        raise SinkError(f"not a LanceDB target: {target!r}")
    rest = target[len("lancedb://"):]
    path, _, query = rest.partition("?")
    params = dict(parse_qsl(query, keep_blank_values=True))
    unknown = set(params) - {"table", "index"}
    if not path or unknown:
        raise SinkError(f"malformed LanceDB target {target!r}: use lancedb://PATH?table=NAME"
                        + (f" (unknown parameters {sorted(unknown)})" if unknown else ""))
    table = params.get("table", "").strip()
    if not table or not all(ch.isalnum() or ch in "_-." for ch in table):
        raise SinkError(f"{target!r}: name the table with ?table=NAME (letters, digits, _ - .)")
    index = params.get("index") or None
    if index is not None and index not in {"ivf_pq", "hnsw"}:
        raise SinkError(f"{target!r}: unknown index {index!r}; use ivf_pq or hnsw")
    return Path(path).expanduser(), table, index


def lookup_vectors(table: Any, content_hashes: Collection[str]) -> dict[str, Stored]:
    """Stored vectors of these texts (the first row holding each hash) in a LanceDB table."""
    cond = "content_hash IN (" + ", ".join(_lit(h) for h in content_hashes) + ")"
    got = (table.search().where(cond).select(["content_hash", "embedding", "token_count", "truncated"])
           .limit(None).to_arrow())
    found: dict[str, Stored] = {}
    if got.num_rows == 0:
        return found
    flat = got.column("embedding").combine_chunks().flatten().to_numpy(zero_copy_only=False)
    vectors = np.asarray(flat).reshape(got.num_rows, -1)
    for i, (h, c, t) in enumerate(zip(got.column("content_hash").to_pylist(), got.column("token_count").to_pylist(),
                                      got.column("truncated").to_pylist(), strict=True)):
        found.setdefault(h, Stored(vectors[i].copy(), int(c), bool(t)))
    return found


class LanceDBSink:
    """Rows appended to a LanceDB table, one commit per batch (see module docstring)."""

    index_kinds = ("hnsw", "ivf_pq")

    def __init__(self, target: str) -> None:
        self.path, self.name, self.index = parse_target(target)
        self.target = target
        self.model_id = ""
        self.job: SinkJob | None = None
        self.db: Any = None
        self.table: Any = None
        self._done: dict[str, str] = {}
        self._schema: pa.Schema | None = None
        #: beside the database directory (which LanceDB owns), one per table
        self._locks = OutputLocks(self.path.parent / f".{self.path.name}.{self.name}.lock",
                                  f"LanceDB table {self.name} in {self.path}")

    def _marks_name(self) -> str:
        return f"{self.name}_deposium_batches"

    def _tables(self) -> set[str]:
        listed = self.db.list_tables()
        names = getattr(listed, "tables", listed)
        return set(names)

    def open(self, job: SinkJob) -> None:
        """Take the table's lock, then validate or create the table before any embedding work."""
        if not self.path.parent.is_dir():
            raise SinkError(f"{self.target}: directory {self.path.parent} does not exist")
        if self.path.exists() and not self.path.is_dir():
            raise SinkError(f"{self.target}: {self.path} is not a directory")

        def open_output() -> None:
            self._open(job)
            if job.shards > 1:  # running again: not finished until it ends
                self._marker(job, job.shard).unlink(missing_ok=True)

        self._locks.acquire(job, open_output)

    def _marker(self, job: SinkJob, shard: int) -> Path:
        """A finished shard's mark, beside the database (LanceDB owns its directory)."""
        lock = self._locks.output.path
        folder = lock.with_name(lock.name.removesuffix(".lock") + ".shards")
        return folder / f"{job.job_id}.{shard}-of-{job.shards}.json"

    def _open(self, job: SinkJob) -> None:
        import lancedb

        self.job = job
        self._schema = table_schema(job.dim, job.dtype)
        try:
            self.db = lancedb.connect(str(self.path))
            tables = self._tables()
            if self.name in tables:
                self.table = self.db.open_table(self.name)
                mismatch = self._mismatch(job)
                if mismatch and not job.replace:
                    raise SinkError(f"LanceDB table {self.name} in {self.path} {mismatch}; pass --replace to "
                                    "overwrite it deliberately")
                if mismatch:
                    self.db.drop_table(self.name)
                    if self._marks_name() in tables:
                        self.db.drop_table(self._marks_name())
                    self.table = None
                elif job.replace:
                    self.table.delete(f"job_id = {_lit(job.job_id)}")
                    if self._marks_name() in tables:
                        self.db.open_table(self._marks_name()).delete(f"job_id = {_lit(job.job_id)}")
            if self.table is None:
                self.table = self.db.create_table(self.name, schema=self._schema)
            self._add_provenance()
            self._done = self._read_done()
        except SinkError:
            raise
        except (OSError, ValueError, RuntimeError) as exc:
            raise SinkError(f"{self.target}: cannot open the LanceDB table: {' '.join(str(exc).split())[:300]}") \
                from None

    def _add_provenance(self) -> None:
        """A table written before the provenance columns existed gets them, null for its old rows."""
        missing = [f for f in PROVENANCE if f.name not in self.table.schema.names]
        if missing:
            self.table.add_columns(pa.schema(missing))

    def _mismatch(self, job: SinkJob) -> str | None:
        schema = self.table.schema
        if "embedding" not in schema.names or not set(EXTRA) <= set(schema.names):
            return "was not written by deposium (no embedding / batch columns)"
        have = schema.field("embedding").type
        want = self._schema.field("embedding").type
        if not pa.types.is_fixed_size_list(have) or have.list_size != want.list_size \
                or have.value_type != want.value_type:
            size = getattr(have, "list_size", "?")
            value = getattr(have, "value_type", have)
            return (f"stores {size}-dimensional {value} vectors, this job writes "
                    f"{want.list_size}-dimensional {want.value_type}")
        other = self.table.count_rows(f"model_sha256 != {_lit(job.model_sha256)}")
        if other:
            return f"holds {other:,} rows from another model (artifact sha256 other than {job.model_sha256[:12]})"
        return None

    def _read_done(self) -> dict[str, str]:
        assert self.job is not None
        cond = f"job_id = {_lit(self.job.job_id)}"
        done: dict[str, str] = {}
        rows = (self.table.search().where(cond).select(["batch_id", "batch_digest"]).limit(None).to_arrow())
        for b, d in zip(rows.column("batch_id").to_pylist(), rows.column("batch_digest").to_pylist(), strict=True):
            done[b] = d
        if self._marks_name() in self._tables():
            marks = self.db.open_table(self._marks_name()).search().where(cond).limit(None).to_arrow()
            for b, d in zip(marks.column("batch_id").to_pylist(), marks.column("batch_digest").to_pylist(),
                            strict=True):
                done.setdefault(b, d)
        return done

    def done_batches(self) -> dict[str, str]:
        return dict(self._done)

    def write_batch(self, batch_id: str, digest: str, rows: pa.Table) -> None:
        """One ``add`` = one Lance commit holding the rows and their batch id."""
        if self.job is None or self.table is None or self._schema is None:
            raise SinkError("write_batch before open")
        job = self.job
        if batch_id in self._done:  # written before (replace / re-run): never two copies
            self.table.delete(f"job_id = {_lit(job.job_id)} AND batch_id = {_lit(batch_id)}")
        n = rows.num_rows
        if n:
            extra = {"job_id": job.job_id, "model_id": self.model_id, "model_sha256": job.model_sha256,
                     "batch_id": batch_id, "batch_digest": digest}
            columns = [rows.column(c) for c in output_schema(job.dim, job.dtype).names]
            columns += [pa.array([extra[c]] * n, pa.string()) for c in EXTRA]
            batch = pa.Table.from_arrays(columns, schema=self._schema)
            self.table.add(batch.select(self.table.schema.names))
        else:
            marks = pa.table({"job_id": [job.job_id], "batch_id": [batch_id], "batch_digest": [digest]})
            if self._marks_name() in self._tables():
                self.db.open_table(self._marks_name()).add(marks)
            else:  # exist_ok: another shard of the job may create it at the same moment
                self.db.create_table(self._marks_name(), schema=marks.schema, exist_ok=True).add(marks)
        self._done[batch_id] = digest

    def lookup(self, wanted: Mapping[str, str]) -> dict[str, Stored]:
        if not wanted or self.table is None or self.job is None:
            return {}
        return lookup_vectors(self.table, list(wanted))

    def release(self) -> None:
        self._locks.release()

    def close(self, complete: bool) -> None:
        """Compact the per-batch fragments and build the requested index once the job is complete
        (a sharded job's once every shard is: see :meth:`_close_shard`)."""
        self._locks.close(self.job, complete, close_shard=self._close_shard, close=self._close)

    def _close_shard(self, complete: bool) -> None:
        job = self.job
        assert job is not None
        finish_shard(job.job_id, job.shard, job.shards, complete, target=self.target,
                     marker=lambda i: self._marker(job, i), publish=self._locks.publish(), publish_output=self._close)

    def _close(self, complete: bool) -> None:
        if self.table is None or not complete:
            return
        try:
            self.table.optimize()
        except (OSError, ValueError, RuntimeError) as exc:
            print(f"lancedb: compaction skipped: {exc}", file=sys.stderr)
        if self.index:
            self.build_index()

    def build_index(self) -> None:
        """A cosine vector index: IVF_HNSW_FLAT for ``hnsw`` (any size), IVF_PQ (needs training rows).

        Why HNSW over full vectors and not HNSW_SQ: LanceDB's scalar-quantized HNSW with the
        cosine metric reports the squared L2 distance of the normalized vectors (twice the
        cosine distance) as ``_distance``, so a query through it would not print the cosine
        distance it asked for; the flat HNSW reports the cosine distance itself.
        """
        from lancedb.index import HnswFlat, IvfPq

        rows = self.table.count_rows()
        partitions = max(1, rows // 100_000)  # few large partitions: HNSW does the searching
        if self.index == "ivf_pq":
            if rows < MIN_INDEX_ROWS:
                print(f"lancedb: {rows} rows, fewer than {MIN_INDEX_ROWS} to train IVF_PQ: no index "
                      "(a flat search is exact and fast at this size)", file=sys.stderr)
                return
            config: Any = IvfPq(distance_type="cosine", num_partitions=max(1, int(rows ** 0.5)))
        else:
            config = HnswFlat(distance_type="cosine", num_partitions=partitions)
        kind = type(config).__name__
        started = time.monotonic()
        print(f"building {kind} index on {self.name} ({rows:,} rows)...", file=sys.stderr, flush=True)
        self.table.create_index("embedding", config=config, replace=True)
        print(f"{kind} index ready in {time.monotonic() - started:.1f}s", file=sys.stderr, flush=True)
