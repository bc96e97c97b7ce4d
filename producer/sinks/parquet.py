"""Parquet sink: one part file per batch, renamed into place, joined into ``--out`` at the end.

Why part files: ``os.replace`` of a fully written, fsynced file is the one atomic commit a
plain filesystem offers. A part's name carries its batch id and digest, so the part *is* the
done-mark: a batch is done exactly when its part exists, and a crash can leave at most a
temporary file, which ``open`` deletes.

Layout for ``--out embeddings.parquet``::

    embeddings.parquet.parts/job.json                 job id, dim, dtype, model sha256
    embeddings.parquet.parts/b0000012.<digest>.parquet one per committed batch
    embeddings.parquet                                the joined output (written at close)
    .embeddings.parquet.lock                          held by the one producer writing there

A sharded job (``--shard i/N``) holds that lock shared, plus ``.embeddings.parquet.shard-I-of-N.lock``;
each finished shard leaves ``shard-I-of-N.done`` in the parts directory, and the shard that
finds all N there joins the parts (under ``.embeddings.parquet.publish.lock``).

The parts are joined by copying their row groups' bytes under a new footer
(:mod:`deposium.producer.sinks.parquet_splice`), one row group per batch, so publishing costs
about a file copy; parts written by an older layout are decoded and conformed instead.

The joined file's metadata keeps the job id and every batch's digest, so re-running a
finished command is a no-op even after the parts directory has been removed.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Collection, Mapping
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from deposium.producer.schema import conform, output_schema
from deposium.producer.shard import Shard
from deposium.producer.sinks import SinkError, SinkJob, Stored
from deposium.producer.sinks.lock import OutputLocks, finish_shard
from deposium.producer.sinks.parquet_splice import CannotSplice, splice

META_KEY = b"deposium"


def write_options(columns: list[str]) -> dict[str, object]:
    """Parquet writer options: zstd, with neither a dictionary nor statistics for the vectors.

    Why: vector components hardly ever repeat, so the dictionary the writer would try is built
    and thrown away, and min/max of components helps no reader; both cost every write (and
    the join into ``--out``, when parts must be decoded) CPU for nothing. Other columns keep both (``lookup`` filters on
    ``content_hash``).
    """
    rest = [c for c in columns if c != "embedding"]
    return {"compression": "zstd", "use_dictionary": rest, "write_statistics": rest}


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=1, sort_keys=True)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _read_stored(path: Path, hashes: Collection[str]) -> dict[str, Stored]:
    """The rows of ``path`` whose content hash is one of ``hashes``."""
    table = pq.read_table(path, columns=["content_hash", "embedding", "token_count", "truncated"],
                          filters=[("content_hash", "in", sorted(set(hashes)))])
    found: dict[str, Stored] = {}
    if table.num_rows == 0:
        return found
    dim = table.schema.field("embedding").type.list_size
    flat = table.column("embedding").combine_chunks().flatten().to_numpy(zero_copy_only=False)
    vectors = np.asarray(flat).reshape(table.num_rows, dim)
    counts = table.column("token_count").to_pylist()
    truncs = table.column("truncated").to_pylist()
    for i, h in enumerate(table.column("content_hash").to_pylist()):
        found.setdefault(h, Stored(vectors[i].copy(), counts[i], truncs[i]))
    return found


class ParquetSink:
    """Sink for a local ``.parquet`` path (see module docstring for the layout)."""

    def __init__(self, out: str | os.PathLike[str]) -> None:
        self.out = Path(out).expanduser()
        self.parts = self.out.with_name(self.out.name + ".parts")
        self.target = str(self.out)
        self.job: SinkJob | None = None
        self._final_done: dict[str, str] = {}
        self._digests: dict[str, str] = {}  # batch id -> digest of its committed part
        self._locks = OutputLocks(self.out.with_name(f".{self.out.name}.lock"), str(self.out))
        self._check_target()

    def _check_target(self) -> None:
        """Refuse an output this sink could only fail on at the end, after all the embedding."""
        if self.out.is_dir():
            raise SinkError(f"{self.out} is a directory; name the .parquet file to write")
        if self.out.suffix.lower() != ".parquet":
            raise SinkError(f"{self.out}: the file output is Parquet and its name must end in .parquet "
                            "(or use postgresql:// or lancedb:// for a database)")
        if self.out.exists() and not self.out.is_file():
            raise SinkError(f"{self.out} exists and is not a regular file")
        if not self.out.parent.is_dir():
            raise SinkError(f"output directory {self.out.parent} does not exist")
        try:  # what the process may really do there (read-only mounts, ACLs, root): try it
            fd, probe = tempfile.mkstemp(prefix=f".{self.out.name}.", suffix=".probe", dir=self.out.parent)
            os.close(fd)
            os.unlink(probe)
        except OSError as exc:
            raise SinkError(f"cannot write the output {self.out}: {exc.strerror or exc} in "
                            f"{self.out.parent}") from None

    # -- helpers ------------------------------------------------------------------------------
    def _describe(self, job: SinkJob) -> dict[str, object]:
        return {"job_id": job.job_id, "dim": job.dim, "dtype": job.dtype, "model_sha256": job.model_sha256}

    def _part_files(self) -> list[tuple[str, str, Path]]:
        found = []
        if self.parts.is_dir():
            for p in self.parts.iterdir():
                name = p.name
                if name.endswith(".parquet") and not name.startswith("."):
                    batch_id, _, digest = name[: -len(".parquet")].partition(".")
                    found.append((batch_id, digest, p))
        found.sort()
        return found

    # -- protocol -----------------------------------------------------------------------------
    def _marker(self, job: SinkJob, shard: int) -> Path:
        return self.parts / f"shard-{shard}-of-{job.shards}.done"

    def open(self, job: SinkJob) -> None:
        def open_output() -> None:
            self._open(job)
            if job.shards > 1 and not self._final_done:  # running again: not finished until it ends
                self._marker(job, job.shard).unlink(missing_ok=True)

        self._locks.acquire(job, open_output)

    def _open(self, job: SinkJob) -> None:
        self.job = job
        mine = self._describe(job)
        if job.replace:  # start over: whatever job the parts or the output hold, this one included
            shutil.rmtree(self.parts, ignore_errors=True)
        elif self.parts.is_dir():
            meta_path = self.parts / "job.json"
            try:
                theirs = json.loads(meta_path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                theirs = None
            if theirs is not None and theirs != mine:
                raise SinkError(
                    f"{self.parts} holds unfinished job {theirs.get('job_id')} "
                    f"(dim {theirs.get('dim')}, {theirs.get('dtype')}, model "
                    f"{str(theirs.get('model_sha256'))[:12]}); resume that job, or pass --replace")
        if self.out.exists() and not self.parts.is_dir() and not job.replace:
            theirs = self._final_meta()
            same = theirs is not None and {k: theirs.get(k) for k in mine} == mine
            if same:
                self._final_done = dict(theirs.get("batches", {}))
            else:
                who = f"job {theirs.get('job_id')}" if theirs else "a file not written by this job"
                raise SinkError(f"{self.out} already exists and holds {who}; pass --replace to overwrite it")
        if self._final_done:
            return
        self.parts.mkdir(exist_ok=True)
        # a crashed run's temporary parts; a shard's only (the other shards may be writing theirs)
        stale_prefix = f".{Shard(job.shard, job.shards).batch_prefix}" if job.shards > 1 else "."
        for stale in self.parts.glob(f"{stale_prefix}*.tmp"):
            stale.unlink(missing_ok=True)
        _write_atomic_json(self.parts / "job.json", mine)

    def _final_meta(self) -> dict | None:
        try:
            meta = pq.read_schema(self.out).metadata or {}
        except (OSError, pa.ArrowInvalid):
            return None
        raw = meta.get(META_KEY)
        try:
            return json.loads(raw) if raw else None
        except ValueError:
            return None

    def done_batches(self) -> dict[str, str]:
        if self._final_done:
            return dict(self._final_done)
        self._digests = {batch_id: digest for batch_id, digest, _ in self._part_files()}
        return dict(self._digests)

    def write_batch(self, batch_id: str, digest: str, rows: pa.Table) -> None:
        if self._final_done:
            raise SinkError(f"{self.out} is already complete; nothing may be added")
        final = self.parts / f"{batch_id}.{digest}.parquet"
        tmp = self.parts / f".{batch_id}.{os.getpid()}.tmp"
        with open(tmp, "wb") as fh:
            pq.write_table(rows, fh, **write_options(rows.column_names))
            fh.flush()
            os.fsync(fh.fileno())
        for old in self.parts.glob(f"{batch_id}.*.parquet"):
            if old != final:
                old.unlink()
        os.replace(tmp, final)
        _fsync_dir(self.parts)
        self._digests[batch_id] = digest

    def lookup(self, wanted: Mapping[str, str]) -> dict[str, Stored]:
        """Read each hash from the part of the batch that committed it (its name is known), so
        a lookup costs the same in a job's first batch and its ten-thousandth; a hash not
        found there (a published output, or a part re-committed under another digest) is
        looked for in every part, then in the output."""
        found: dict[str, Stored] = {}
        by_batch: dict[str, list[str]] = {}
        for content_hash, batch_id in wanted.items():
            by_batch.setdefault(batch_id, []).append(content_hash)
        for batch_id, hashes in by_batch.items():
            digest = self._digests.get(batch_id)
            part = self.parts / f"{batch_id}.{digest}.parquet"
            if digest is not None and part.is_file():
                found.update(_read_stored(part, hashes))
        missing = [h for h in wanted if h not in found]
        if missing:
            sources = [p for _, _, p in self._part_files()] or ([self.out] if self.out.exists() else [])
            for path in sources:
                if not missing:
                    break
                found.update(hits := _read_stored(path, missing))
                missing = [h for h in missing if h not in hits]
        return found

    def release(self) -> None:
        self._locks.release()

    def close(self, complete: bool) -> None:
        self._locks.close(self.job, complete, close_shard=self._close_shard, close=self._close)

    def _close_shard(self, complete: bool) -> None:
        """Mark this shard finished; the shard that finds every shard finished publishes the output."""
        job = self.job
        assert job is not None
        if self._final_done or not self.parts.is_dir():
            return  # published already
        finish_shard(job.job_id, job.shard, job.shards, complete, target=str(self.out),
                     marker=lambda i: self._marker(job, i), publish=self._locks.publish(),
                     publish_output=self._close, still_unpublished=self.parts.is_dir)

    def _close(self, complete: bool) -> None:
        if self.job is None or self._final_done:
            return
        parts = self._part_files()
        meta = dict(self._describe(self.job))
        meta["batches"] = {b: d for b, d, _ in parts}
        meta["complete"] = complete
        schema = output_schema(self.job.dim, self.job.dtype).with_metadata({META_KEY: json.dumps(meta)})
        tmp = self.out.with_name(f".{self.out.name}.{os.getpid()}.tmp")
        paths = [path for _, _, path in parts]
        try:
            with open(tmp, "wb") as fh:
                splice(paths, fh, schema, write_options(schema.names))
                fh.flush()
                os.fsync(fh.fileno())
        except CannotSplice:  # parts of an older layout (resumed job): decode, conform, re-encode
            with pq.ParquetWriter(tmp, schema, **write_options(schema.names)) as writer:
                for path in paths:
                    writer.write_table(conform(pq.ParquetFile(path).read(), schema))
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp, self.out)
        _fsync_dir(self.out.parent)
        if complete:
            shutil.rmtree(self.parts, ignore_errors=True)
