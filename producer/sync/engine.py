"""Run one sync: read every source, skip unchanged documents, embed only new text, apply per group.

Why groups of documents: memory stays bounded whatever the collection's size, each group is
committed to the store as soon as its vectors are in (so a killed sync loses at most one
group's work in PostgreSQL and LanceDB), and the queue still sees many batches in flight.
Text already in the store, from any document, is never embedded again: its vector is read
back by content hash, exactly as duplicates within a job are.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from deposium.producer.backends import Backend, Outcome
from deposium.producer.batching import Limits, make_batches
from deposium.producer.model import InputError, InputWarning, Paragraph
from deposium.producer.progress import Progress
from deposium.producer.readers import Source
from deposium.producer.schema import rows_table
from deposium.producer.sinks import SinkError, Stored
from deposium.producer.split import split_document
from deposium.producer.sync.ids import document_hash, stable_ids
from deposium.producer.sync.store import SyncIndex, SyncStore
from deposium.producer.tokens import TokenCounter


@dataclass
class SyncSummary:
    target: str
    dry_run: bool = False
    state: str = "running"
    documents_unchanged: int = 0
    documents_changed: int = 0
    documents_new: int = 0
    documents_deleted: int = 0
    documents_kept_missing: int = 0
    documents_failed: int = 0
    paragraphs_embedded: int = 0   # distinct texts this run embedded
    paragraphs_reused: int = 0     # rows written with a vector the store already held
    paragraphs_deleted: int = 0
    paragraphs_written: int = 0
    paragraph_errors: int = 0
    input_errors: int = 0
    warnings: int = 0
    #: files not read, by reason (``unsupported format: .xyz``)
    skipped: dict[str, int] = field(default_factory=dict)
    tokens: int = 0
    seconds: float = 0.0
    errors_path: str | None = None
    errors: list[dict[str, Any]] = field(default_factory=list, repr=False)

    @property
    def ok(self) -> bool:
        return self.state == "done" and not (self.documents_failed or self.input_errors or self.paragraph_errors)

    def line(self) -> str:
        verb = "would embed" if self.dry_run else "embedded"
        text = (f"sync {self.target}: documents {self.documents_unchanged:,} unchanged, "
                f"{self.documents_changed:,} changed, {self.documents_new:,} new, "
                f"{self.documents_deleted:,} deleted; paragraphs {self.paragraphs_embedded:,} {verb}, "
                f"{self.paragraphs_reused:,} reused, {self.paragraphs_deleted:,} deleted")
        if self.skipped:
            text += "; skipped " + ", ".join(f"{n:,} ({why})" for why, n in sorted(self.skipped.items()))
        if self.documents_kept_missing:
            text += f"; {self.documents_kept_missing:,} missing documents kept"
        failures = self.documents_failed + self.input_errors
        if failures:
            text += f"; {failures:,} documents failed (see {self.errors_path or 'the errors file'})"
        if self.dry_run:
            text += " (dry run: nothing embedded or written)"
        return text + f" in {self.seconds:.1f} s"

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("errors")
        out["ok"] = self.ok
        return out


@dataclass
class _Doc:
    id: str
    hash: str
    new: bool
    paragraphs: list[Paragraph]


def _batch_id(batch_texts: list[str]) -> str:
    """A content-derived batch id: a result left in Redis by a killed sync can only be this text's."""
    h = hashlib.sha256()
    for t in batch_texts:
        h.update(t.encode("utf-8", "surrogatepass"))
        h.update(b"\0")
    return "s" + h.hexdigest()[:20]


@dataclass(frozen=True)
class SyncOptions:
    """What a sync does with the store beyond embedding (CLI flags of the same names)."""

    keep_missing: bool = False
    delete_missing: bool = False
    dry_run: bool = False
    replace: bool = False
    group_paragraphs: int = 4096
    max_in_flight: int = 8
    min_chars: int = 20
    chunk_tokens: int = 0
    chunk_overlap: int = 0


@dataclass
class Embedding:
    """How text becomes rows: the job's token counter, backend (None in a dry run) and batch limits."""

    counter: TokenCounter
    backend: Backend | None
    limits: Limits
    dim: int
    dtype: str


class SyncRunner:
    """Brings ``store`` in step with the sources given to :meth:`run` (see docs/sync.md)."""

    def __init__(self, store: SyncStore, embedding: Embedding, *, identity: dict[str, Any],
                 sources_key: list[str], options: SyncOptions, progress: Progress | None = None) -> None:
        self.store = store
        self.embedding = embedding
        self.identity = identity
        self.sources_key = sources_key
        self.options = options
        self.progress = progress or Progress(enabled=False)
        self.summary = SyncSummary(target=store.target, dry_run=options.dry_run)
        self._planned: set[str] = set()  # dry run: texts already counted as to embed

    # -- plan -----------------------------------------------------------------------------------
    def _check_sources(self, index: SyncIndex) -> None:
        foreign = index.sources is not None and index.sources != self.sources_key
        if foreign and index.documents and not (self.options.keep_missing or self.options.delete_missing):
            raise SinkError(
                f"{self.store.target} was synced from other sources ({', '.join(index.sources or [])[:200]}); "
                "its documents missing here would be deleted: pass --keep-missing to keep them, or "
                "--delete-missing to delete them")

    # -- run --------------------------------------------------------------------------------------
    def run(self, sources: Iterable[Source | InputError | InputWarning]) -> SyncSummary:
        s = self.summary
        started = time.monotonic()
        try:
            index = self.store.open(self.identity, replace=self.options.replace, create=not self.options.dry_run)
            self._check_sources(index)
            seen: set[str] = set()
            failed: set[str] = set()
            group: list[_Doc] = []
            pending = 0
            for item in sources:
                if isinstance(item, InputWarning):
                    s.warnings += 1
                    s.errors.append(item.to_json())
                    continue
                if isinstance(item, InputError):
                    s.input_errors += 1
                    if item.skipped:
                        s.skipped[item.skipped] = s.skipped.get(item.skipped, 0) + 1
                    s.errors.append(item.to_json())
                    failed.add(item.document or item.origin)
                    continue
                if item.id in seen:
                    s.input_errors += 1
                    s.errors.append({"kind": "input", "origin": item.origin, "document": item.id,
                                     "reason": "duplicate document id"})
                    continue
                seen.add(item.id)
                blocks = list(item.blocks())
                digest = document_hash(blocks, item.title)
                if index.documents.get(item.id) == digest:
                    s.documents_unchanged += 1
                    continue
                o = self.options
                paragraphs = list(split_document(item.id, blocks, self.embedding.counter, min_chars=o.min_chars,
                                                 chunk_tokens=o.chunk_tokens, chunk_overlap=o.chunk_overlap,
                                                 title=item.title))
                group.append(_Doc(item.id, digest, item.id not in index.documents, paragraphs))
                pending += len(paragraphs)
                if pending >= self.options.group_paragraphs:
                    self._flush(group, index)
                    group, pending = [], 0
            self._flush(group, index)
            missing = [d for d in index.documents if d not in seen and d not in failed]
            if missing and self.options.keep_missing:
                s.documents_kept_missing = len(missing)
            elif missing:
                s.documents_deleted = len(missing)
                s.paragraphs_deleted += sum(index.rows.get(d, 0) for d in missing)
                if not self.options.dry_run:
                    for start in range(0, len(missing), 512):
                        self.store.apply(self._empty(), dict.fromkeys(missing[start:start + 512]))
            if not self.options.dry_run:
                kept = sorted(set(self.sources_key) | set(index.sources or [])) if self.options.keep_missing \
                    else self.sources_key
                self.store.finish(kept)
            s.state = "done"
        except BaseException:
            s.state = "interrupted"
            raise
        finally:
            s.seconds = time.monotonic() - started
            self.progress.close()
            self.store.close()
        return s

    # -- one group of changed documents ---------------------------------------------------------
    def _empty(self) -> pa.Table:
        e = self.embedding
        return rows_table([], np.zeros((0, e.dim), np.float32), [], [], dim=e.dim, dtype=e.dtype)

    def _flush(self, group: list[_Doc], index: SyncIndex) -> None:
        if not group:
            return
        s = self.summary
        first: dict[str, Paragraph] = {}
        for d in group:
            for p in d.paragraphs:
                first.setdefault(p.hash, p)
        known = self.store.lookup(list(first))
        todo = [p for h, p in first.items() if h not in known]
        if self.options.dry_run:
            fresh = [p for p in todo if p.hash not in self._planned]
            self._planned.update(p.hash for p in fresh)
            s.paragraphs_embedded += len(fresh)
            for d in group:
                s.documents_new += d.new
                s.documents_changed += not d.new
                s.paragraphs_reused += sum(p.hash in known for p in d.paragraphs)
                s.paragraphs_deleted += len(self.store.ids_of([d.id]) - set(stable_ids(d.paragraphs)))
            return
        vectors, failures = self._embed(todo)
        s.paragraphs_embedded += len(vectors)
        vectors.update(known)
        tables, applied = [], {}
        for d in group:
            bad = [(p, failures[p.hash]) for p in d.paragraphs if p.hash in failures]
            if bad:  # the document keeps its stored rows and hash; the re-run tries it again
                s.documents_failed += 1
                s.paragraph_errors += len(bad)
                s.errors += [{"kind": "paragraph", "document": d.id, "index": p.index, "reason": why}
                             for p, why in bad]
                continue
            got = [vectors[p.hash] for p in d.paragraphs]
            matrix = np.stack([g.vector for g in got]) if got else np.zeros((0, self.embedding.dim), np.float32)
            table = rows_table(d.paragraphs, matrix, [g.token_count for g in got], [g.truncated for g in got],
                               dim=self.embedding.dim, dtype=self.embedding.dtype)
            tables.append(table.set_column(0, table.schema.field("id"),
                                           pa.array(stable_ids(d.paragraphs), pa.string())))
            applied[d.id] = d.hash
            s.documents_new += d.new
            s.documents_changed += not d.new
            s.paragraphs_written += len(d.paragraphs)
            s.paragraphs_reused += sum(p.hash in known for p in d.paragraphs)
        if applied:
            rows = pa.concat_tables(tables) if tables else self._empty()
            s.paragraphs_deleted += self.store.apply(rows, applied)

    def _embed(self, paragraphs: list[Paragraph]) -> tuple[dict[str, Stored], dict[str, str]]:
        """Vectors for these distinct texts through the job's backend (local or queued)."""
        done: dict[str, Stored] = {}
        failed: dict[str, str] = {}
        if not paragraphs:
            return done, failed
        assert self.embedding.backend is not None

        def collect(outcomes: list[Outcome]) -> None:
            for o in outcomes:
                if o.failure is not None:
                    failed.update({h: f"batch failed after {o.attempts} attempt(s): {o.failure}"
                                   for h in o.batch.own})
                    self.progress.update(0, 0, len(o.batch.own), 0)
                    continue
                for h, i in o.batch.own.items():
                    err = o.errors[i] if o.errors else None
                    if err:
                        failed[h] = err
                    else:
                        done[h] = Stored(np.asarray(o.vectors[i]), int(o.token_counts[i]), bool(o.truncated[i]))
                tokens = sum(o.token_counts) if o.token_counts else 0
                self.summary.tokens += tokens
                self.progress.update(len(o.batch.own), tokens, 0, sum(len(t) for t in o.batch.texts))

        for batch in make_batches(paragraphs, self.embedding.limits):
            batch.id = _batch_id(batch.texts)
            while self.embedding.backend.in_flight() >= self.options.max_in_flight:
                collect(self.embedding.backend.completed(block=True))
            self.embedding.backend.submit(batch)
            collect(self.embedding.backend.completed(block=False))
        while self.embedding.backend.in_flight():
            collect(self.embedding.backend.completed(block=True))
        return done, failed
