"""Run one job: documents → paragraphs → batches → backend → sink, resumably.

Why the order of commits is controlled here: a duplicate paragraph takes its vector from
the batch that embedded the text first, so a batch holding such aliases is committed only
after that earlier batch (at most ``max_in_flight`` batches ever wait). Everything else
(what is done, what to skip) is read from the sink, the one authority on committed rows.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from deposium.producer.backends import Backend, Outcome
from deposium.producer.batching import Limits, make_batches
from deposium.producer.jobstore import JobStore
from deposium.producer.model import Batch, InputError, InputWarning, Paragraph
from deposium.producer.progress import Progress
from deposium.producer.readers import Source
from deposium.producer.schema import rows_table
from deposium.producer.sinks import Sink
from deposium.producer.split import split_document
from deposium.producer.tokens import TokenCounter


class JobError(RuntimeError):
    """The job cannot continue (input changed under a resumed job, sink refused, ...)."""


@dataclass(frozen=True)
class JobOptions:
    """Options that shape paragraphs, batches and vectors (all part of the job's identity)."""

    task: str | None = None
    dim: int | None = None
    dtype: str = "float32"
    batch_tokens: int = 0  # 0 = DEPOSIUM_BATCH_TOKENS (see job.with_in_flight)
    max_tokens: int | None = None
    min_chars: int = 20
    max_in_flight: int = 8
    chunk_tokens: int = 0  # 0 = paragraphs; N = token-counted chunks (split.chunk_blocks)
    chunk_overlap: int = 0


@dataclass
class Summary:
    job_id: str
    state: str = "running"
    paragraphs: int = 0          # paragraphs in the job (committed, failed and skipped alike)
    embedded: int = 0            # rows committed in this run
    already_done: int = 0        # rows found committed by an earlier run
    duplicates: int = 0          # rows that reused the vector of an identical paragraph
    failed_paragraphs: int = 0
    input_errors: int = 0
    warnings: int = 0            # documents read with a warning (replaced bytes), embedded anyway
    skipped: dict[str, int] = field(default_factory=dict)  # files left out, by reason
    batches: int = 0
    batches_skipped: int = 0     # committed by an earlier run, not sent again
    batches_sent: int = 0        # tasks sent by this run (re-sends included)
    batches_failed: int = 0
    tokens: int = 0
    seconds: float = 0.0
    target: str = ""
    errors_path: str | None = None
    failed_batches: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        failures = self.failed_paragraphs or self.input_errors or self.batches_failed
        return self.state in {"done", "done_with_errors"} and not failures

    @property
    def rate(self) -> float:
        return self.embedded / self.seconds if self.seconds > 0 else 0.0

    def line(self) -> str:
        """The one-line summary printed at the end of every run."""
        parts = [
            f"job {self.job_id} {self.state}:",
            f"{self.embedded + self.already_done:,} paragraphs written",
            f"({self.already_done:,} before this run,",
            f"{self.duplicates:,} duplicates reused),",
            f"{self.failed_paragraphs:,} failed, {self.input_errors:,} input errors;",
            f"{self.batches:,} batches ({self.batches_skipped:,} skipped, {self.batches_sent:,} sent,",
            f"{self.batches_failed:,} failed);",
            f"{self.seconds:.1f}s, {self.rate:,.0f} paragraphs/s,",
            f"{self.tokens / max(self.seconds, 1e-9):,.0f} tokens/s -> {self.target}",
        ]
        if self.skipped:
            parts[-1] += "; skipped files: " + ", ".join(f"{n} {why}" for why, n in sorted(self.skipped.items()))
        if self.warnings:
            parts[-1] += f"; {self.warnings:,} warnings"
        if self.errors_path:
            parts[-1] += f"; errors: {self.errors_path}"
        return " ".join(parts)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["ok"] = self.ok
        return d


class ErrorLog:
    """Errors file (JSON lines) written to a temporary name and renamed at the end of a run.

    The temporary file is created by the first error only, so a run refused before it started
    (a bad option, a sink that refuses the job) leaves no file behind.
    """

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.count = 0
        self._fh: Any = None
        self._tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp") if path is not None else None

    def add(self, entry: dict[str, Any]) -> None:
        self.count += 1
        if self._tmp is None:
            return
        if self._fh is None:
            self._fh = open(self._tmp, "w", encoding="utf-8")
        self._fh.write(json.dumps(entry, ensure_ascii=False) + "\n")

    def close(self) -> str | None:
        """End of a finished run: publish the errors (or remove a previous run's file if none)."""
        if self.path is None:
            return None
        if self._fh is not None:
            self._fh.close()
            self._fh = None
            if self.count:
                os.replace(self._tmp, self.path)
                return str(self.path)
        self.path.unlink(missing_ok=True)
        return None

    def discard(self) -> None:
        """End of an interrupted run: the next run reads everything again and rewrites the file."""
        if self._fh is not None:
            self._fh.close()
            self._fh = None
            Path(self._tmp).unlink(missing_ok=True)


@dataclass
class Pipeline:
    """The parts that turn a job's documents into committed rows (assembled by ``job.build_runner``)."""

    options: JobOptions
    counter: TokenCounter
    backend: Backend
    sink: Sink
    limits: Limits
    dim: int
    max_paragraph_bytes: int
    #: Starts every batch id of this producer (a shard's; empty for an unsharded job).
    batch_prefix: str = ""


class JobRecord:
    """The job's record in its :class:`JobStore`: inputs and options, state, counts, errors.

    Why its own class: the record outlives a run (``deposium-jobs``, ``--resume``), so what it
    keeps across runs (runs, batches sent before, per-paragraph errors of committed batches)
    is decided here, apart from the loop that embeds.
    """

    def __init__(self, store: JobStore, job_id: str, spec: dict[str, Any]) -> None:
        self.store = store
        self.job_id = job_id
        self.spec = spec
        self.data: dict[str, Any] = {}
        self._last_save = 0.0

    def open(self, *, replace: bool) -> None:
        """Load (or start) the record for a new run; ``replace`` forgets the earlier runs' errors."""
        data = self.store.load(self.job_id) or {"id": self.job_id, "created": time.time(),
                                                "paragraph_errors": {}, "runs": 0}
        data["spec"] = self.spec
        data["runs"] = int(data.get("runs", 0)) + 1
        data["sent_before"] = int(data.get("counts", {}).get("batches_sent_total", 0))
        if replace:
            data["paragraph_errors"] = {}
        self.data = data

    @property
    def paragraph_errors(self) -> dict[str, list[dict[str, Any]]]:
        """Per-paragraph errors of committed batches, by batch id (the sink keeps only rows)."""
        return self.data.setdefault("paragraph_errors", {})

    def save(self, summary: Summary, *, committed: int, failed: dict[str, str], sent: int,
             force: bool = False) -> None:
        """Write state and counts; at most once a second unless ``force`` (a heartbeat, not a log)."""
        now = time.monotonic()
        if not force and now - self._last_save < 1.0:
            return
        self._last_save = now
        s = summary
        self.data.update({
            "state": s.state,
            "counts": {"paragraphs": s.paragraphs, "written": s.embedded + s.already_done,
                       "duplicates": s.duplicates, "failed_paragraphs": s.failed_paragraphs,
                       "input_errors": s.input_errors, "batches": s.batches, "batches_done": committed,
                       "batches_failed": len(failed),
                       "batches_sent_total": self.data.get("sent_before", 0) + sent},
            "failed_batches": dict(failed),
            "host": socket.gethostname(), "pid": os.getpid(),
        })
        self.store.save(self.data)


class JobRunner:
    """One run of one job. Create, then :meth:`run` with the job's sources."""

    def __init__(self, pipeline: Pipeline, record: JobRecord, errors: ErrorLog, *,
                 progress: Progress | None = None, replace: bool = False,
                 on_progress: Callable[[Summary], None] | None = None) -> None:
        self.job_id = record.job_id
        self.pipeline = pipeline
        self.options = pipeline.options
        self.backend = pipeline.backend
        self.sink = pipeline.sink
        self.record = record
        self.errors = errors
        self.progress = progress or Progress(enabled=False)
        self.replace = replace
        self.on_progress = on_progress
        self.summary = Summary(job_id=record.job_id, target=pipeline.sink.target)
        self._committed: set[str] = set()
        self._failed: dict[str, str] = {}
        self._waiting: list[Outcome] = []

    def _save(self, force: bool = False) -> None:
        self.record.save(self.summary, committed=len(self._committed), failed=self._failed,
                         sent=self.backend.sent, force=force)

    # -- input --------------------------------------------------------------------------------
    def _paragraphs(self, sources: Iterable[Source | InputError | InputWarning]) -> Iterator[Paragraph]:
        for item in sources:
            if isinstance(item, InputError):
                self._input_error(item)
                continue
            if isinstance(item, InputWarning):
                self.summary.warnings += 1
                self.errors.add(item.to_json())
                continue
            n = 0
            try:
                for p in self._split(item):
                    n += 1
                    size = len(p.text.encode("utf-8"))
                    if size > self.pipeline.max_paragraph_bytes:
                        reason = f"paragraph {p.id}: {size} bytes, over the limit {self.pipeline.max_paragraph_bytes}"
                        self._input_error(InputError(origin=item.origin, document=item.id, reason=reason))
                        continue
                    self.progress.text_read += len(p.text)
                    yield p
            except (OSError, UnicodeDecodeError) as exc:
                self._input_error(InputError(origin=item.origin, document=item.id,
                                             reason=f"read failed after {n} paragraphs: {exc}"))
                continue
            if n == 0:
                self._input_error(InputError(origin=item.origin, document=item.id, reason="empty document"))

    def _split(self, item: Source) -> Iterator[Paragraph]:
        o = self.options
        if item.paragraphs is not None:  # split by a reader process (--readers)
            return item.presplit()
        return split_document(item.id, item.blocks(), self.pipeline.counter, min_chars=o.min_chars,
                              chunk_tokens=o.chunk_tokens, chunk_overlap=o.chunk_overlap, title=item.title)

    def _input_error(self, err: InputError) -> None:
        self.summary.input_errors += 1
        if err.skipped:
            self.summary.skipped[err.skipped] = self.summary.skipped.get(err.skipped, 0) + 1
        self.errors.add(err.to_json())

    # -- outcomes -----------------------------------------------------------------------------
    def _ready(self, outcome: Outcome) -> bool:
        return all(owner in self._committed or owner in self._failed for owner in outcome.batch.refs.values())

    def _drain(self, block: bool) -> None:
        for outcome in self.backend.completed(block):
            self._waiting.append(outcome)
        progressed = True
        while progressed:
            progressed = False
            for outcome in list(self._waiting):
                if self._ready(outcome):
                    self._waiting.remove(outcome)
                    self._finish(outcome)
                    progressed = True

    def _finish(self, outcome: Outcome) -> None:
        batch = outcome.batch
        s = self.summary
        if outcome.failure is not None:
            self._failed[batch.id] = outcome.failure
            s.batches_failed += 1
            s.failed_batches[batch.id] = outcome.failure
            reason = f"batch failed after {outcome.attempts} attempt(s): {outcome.failure}"
            for p in batch.rows:
                self.errors.add({"kind": "batch", "id": p.id, "document": p.document, "batch": batch.id,
                                 "reason": reason})
            s.failed_paragraphs += len(batch.rows)
            self.progress.update(0, 0, len(batch.rows), sum(len(p.text) for p in batch.rows))
            self._save(force=True)
            return
        wanted = {h: owner for h, owner in batch.refs.items() if owner in self._committed}
        stored = self.sink.lookup(wanted) if wanted else {}
        keep: list[Paragraph] = []
        vectors: list[np.ndarray] = []
        counts: list[int] = []
        truncs: list[bool] = []
        problems: list[tuple[Paragraph, str]] = []
        tokens = 0
        for p in batch.rows:
            i = batch.own.get(p.hash)
            if i is not None:
                err = outcome.errors[i] if outcome.errors else None
                if err:
                    problems.append((p, err))
                    continue
                keep.append(p)
                vectors.append(outcome.vectors[i])
                counts.append(outcome.token_counts[i])
                truncs.append(outcome.truncated[i])
                continue
            owner = batch.refs[p.hash]
            hit = stored.get(p.hash)
            if owner in self._failed:
                problems.append((p, f"identical to a paragraph of failed batch {owner}"))
            elif hit is None:
                problems.append((p, f"identical paragraph of batch {owner} not found in the sink"))
            else:
                keep.append(p)
                vectors.append(hit.vector)
                counts.append(hit.token_count)
                truncs.append(hit.truncated)
                s.duplicates += 1
        for i in range(len(batch.texts)):
            tokens += outcome.token_counts[i] if outcome.token_counts else 0
        matrix = np.stack(vectors) if vectors else np.zeros((0, self.pipeline.dim), dtype=np.float32)
        table = rows_table(keep, matrix, counts, truncs, dim=self.pipeline.dim, dtype=self.options.dtype)
        self.sink.write_batch(batch.id, batch.digest(), table)
        self._committed.add(batch.id)
        s.embedded += len(keep)
        s.tokens += tokens
        if problems:
            entries = [{"kind": "paragraph", "id": p.id, "document": p.document, "batch": batch.id,
                        "reason": reason} for p, reason in problems]
            self.record.paragraph_errors[batch.id] = entries
            s.failed_paragraphs += len(problems)
        self.progress.update(len(keep), tokens, len(problems), sum(len(p.text) for p in batch.rows))
        if self.on_progress is not None:
            self.on_progress(s)
        self._save(force=bool(problems))

    # -- main loop ----------------------------------------------------------------------------
    def run(self, sources: Iterable[Source | InputError]) -> Summary:
        s = self.summary
        started = time.monotonic()
        self.record.open(replace=self.replace)
        self._save(force=True)
        done = self.sink.done_batches()
        previous_errors = self.record.paragraph_errors
        try:
            for batch in make_batches(self._paragraphs(sources), self.pipeline.limits,
                                      self.pipeline.batch_prefix):
                s.batches += 1
                s.paragraphs += len(batch.rows)
                if batch.id in done:
                    self._skip(batch, done[batch.id], previous_errors)
                    continue
                while self.backend.in_flight() + len(self._waiting) >= self.options.max_in_flight:
                    self._drain(block=True)
                if batch.texts:
                    self.backend.submit(batch)
                else:
                    self._waiting.append(Outcome(batch, np.zeros((0, self.pipeline.dim), np.float32)))
                self._drain(block=False)
                s.batches_sent = self.backend.sent
            self.progress.input_done(s.paragraphs)
            while self.backend.in_flight() or self._waiting:
                self._drain(block=True)
            s.batches_sent = self.backend.sent
            s.state = "done"
        except BaseException:
            s.state = "interrupted"
            raise
        finally:
            s.seconds = time.monotonic() - started
            s.batches_sent = self.backend.sent
            self.progress.close()
            self.backend.close()  # queue mode: drops the job's progress hash read by autoscalers
            if s.state == "done":
                self.sink.close(complete=not self._failed)
                for batch_id, entries in self.record.paragraph_errors.items():
                    if batch_id in self._committed:
                        for e in entries:
                            self.errors.add(e)
                s.errors_path = self.errors.close()
                if s.failed_paragraphs or s.input_errors or self._failed:
                    s.state = "done_with_errors"
            else:
                s.errors_path = None
                self.errors.discard()
                self.sink.release()
            try:
                self._save(force=True)
            except Exception:  # noqa: BLE001 - the record is advisory; never mask the real error
                pass
        return s

    def _skip(self, batch: Batch, digest: str, previous_errors: dict[str, list]) -> None:
        """A batch an earlier run committed: verify it is the same batch, count it, send nothing."""
        if digest != batch.digest():
            raise JobError(
                f"the input changed since job {self.job_id} started: batch {batch.id} now holds other "
                "paragraphs than the committed one; re-run with --replace to start over")
        self._committed.add(batch.id)
        s = self.summary
        s.batches_skipped += 1
        failed_here = len(previous_errors.get(batch.id, []))
        s.failed_paragraphs += failed_here
        s.already_done += len(batch.rows) - failed_here
        # done before this run: neither work read nor work done for this run's ETA
        self.progress.text_read -= sum(len(p.text) for p in batch.rows)
        self.progress.update(0, 0, 0, 0)
