"""Library API: ``submit(documents, out=...)`` → :class:`JobHandle` (progress, wait, results).

Why a handle over a background thread: ingestion code wants to start a job, watch its
counts and collect its output without becoming a CLI; the job itself is the very runner
the CLI uses (same ids, batches, sink, resume), fed from an iterable instead of files.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Iterable, Iterator
from dataclasses import replace
from pathlib import Path

import pyarrow as pa

from deposium.producer.job import build_runner, plan_job, with_in_flight
from deposium.producer.model import Document, InputError
from deposium.producer.progress import Progress
from deposium.producer.readers import Source, blocks_of_text
from deposium.producer.runner import JobOptions, Summary
from deposium.producer.sinks import configure_sink
from deposium.worker.config import Settings, load_settings

Item = str | tuple[str, str] | Document


def documents_to_sources(items: Iterable[Item]) -> Iterator[Source | InputError]:
    """Each item is one document: ``str`` (id = its position), ``(id, text)`` or a Document."""
    seen: set[str] = set()
    for n, item in enumerate(items):
        if isinstance(item, Document):
            doc_id, text = item.id, item.text
        elif isinstance(item, tuple) and len(item) == 2:
            doc_id, text = str(item[0]), item[1]
        else:
            doc_id, text = str(n), item
        origin = f"item {n}"
        if not isinstance(text, str):
            yield InputError(origin=origin, document=doc_id, reason=f"text is {type(text).__name__}, not str")
            continue
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            yield InputError(origin=origin, document=doc_id, reason="text holds a lone surrogate")
            continue
        try:  # the id is part of every row id: a sink cannot store it (pyarrow raised mid-job)
            doc_id.encode("utf-8")
        except UnicodeEncodeError:
            yield InputError(origin=origin, document=doc_id.encode("utf-8", "backslashreplace").decode(),
                             reason="document id holds a lone surrogate")
            continue
        if doc_id in seen:
            yield InputError(origin=origin, document=doc_id, reason="duplicate document id")
            continue
        seen.add(doc_id)
        yield Source(id=doc_id, origin=origin, blocks=lambda t=text: blocks_of_text(t))


class JobHandle:
    """A running (or finished) job started by :func:`submit`."""

    def __init__(self, job_id: str, target: str) -> None:
        self.job_id = job_id
        self.target = target
        self._summary = Summary(job_id=job_id, target=target)
        self._lock = threading.Lock()
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None

    def _update(self, summary: Summary) -> None:
        with self._lock:
            self._summary = copy.deepcopy(summary)

    @property
    def progress(self) -> Summary:
        """A snapshot of the counts so far (rows written, failed, tokens, batches)."""
        with self._lock:
            return copy.deepcopy(self._summary)

    def done(self) -> bool:
        return self._thread is None or not self._thread.is_alive()

    def wait(self, timeout: float | None = None) -> Summary:
        """Block until the job ends; re-raise what stopped it, else return the final summary."""
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                raise TimeoutError(f"job {self.job_id} still running after {timeout}s")
        if self._error is not None:
            raise self._error
        return self.progress

    def results(self) -> pa.Table:
        """The written rows (Parquet sinks): waits for the job, then reads the output file."""
        import pyarrow.parquet as pq

        self.wait()
        return pq.read_table(self.target)


def submit(documents: Iterable[Item], *, out: str | Path, local: bool | None = None, task: str | None = None,
           dim: int | None = None, dtype: str = "float32", batch_tokens: int = 0,
           max_in_flight: int | None = None, min_chars: int = 20, max_tokens: int | None = None,
           artifact_dir: Path | None = None, job_id: str | None = None, name: str = "",
           settings: Settings | None = None, replace_output: bool = False, progress: bool = False,
           total: int | None = None, errors_path: Path | None = None, background: bool = True,
           index: str | None = None, sync: bool = False, keep_missing: bool = False,
           delete_missing: bool = False, dry_run: bool = False) -> JobHandle:
    """Start a job over ``documents`` writing to ``out``; returns at once (``background``).

    Calling it again with the same documents, options and ``out`` (or the same ``job_id``)
    resumes the job: committed batches are skipped; ``replace_output`` starts it over. ``name``
    distinguishes two different inputs written to the same target over time. Raises before
    starting when the artifact, the options, Redis or the sink are unusable, or when another
    producer is writing to ``out`` right now. ``out`` is any sink target: a ``.parquet``
    path, ``postgresql://user@host/db?table=NAME`` or ``lancedb://PATH?table=NAME``;
    ``index`` (``"hnsw"``) builds a vector index in those stores once the job is complete.
    ``task`` names the model's prompt; ``None`` takes its ``document`` prompt when it has one
    (EmbeddingGemma), ``""`` (``deposium.worker.tokenize.NO_PROMPT``) none at all.

    ``sync=True`` makes ``out`` a synced store (docs/sync.md): only documents whose text changed
    are re-split, only text the store lacks is embedded, and documents absent from ``documents``
    are deleted (``keep_missing`` keeps them; ``delete_missing`` confirms deleting those of a store
    last synced under another ``name``); ``dry_run`` only counts. ``wait()`` then returns a
    :class:`~deposium.producer.sync.SyncSummary`.
    """
    settings = settings or load_settings()
    options = with_in_flight(JobOptions(task=task, dim=dim, dtype=dtype, batch_tokens=batch_tokens,
                                        max_tokens=max_tokens, min_chars=min_chars), settings, max_in_flight)
    if sync:
        return _submit_sync(documents, out=str(out), options=options, settings=settings, local=local,
                            artifact_dir=artifact_dir, name=name, replace=replace_output, progress=progress,
                            errors_path=errors_path, background=background, keep_missing=keep_missing,
                            delete_missing=delete_missing, dry_run=dry_run)
    plan = plan_job(inputs=[f"api:{name}"], target=str(out), options=options, settings=settings, local=local,
                    artifact_dir=artifact_dir, job_id=job_id, errors_path=errors_path)
    handle = JobHandle(plan.job_id, plan.target)
    if plan.errors_path is not None:  # a URL target's errors file lives in the (maybe new) cache
        plan.errors_path.parent.mkdir(parents=True, exist_ok=True)
    configure_sink(plan.sink, index=index, model_id=str(plan.spec.get("model_source", "")))
    runner = build_runner(plan, progress=Progress(enabled=progress, total=total), replace=replace_output,
                          on_progress=handle._update)

    def run() -> None:
        try:
            handle._update(runner.run(documents_to_sources(documents)))
        except BaseException as exc:  # noqa: BLE001 - handed to the caller by wait()
            handle._error = exc
            handle._update(replace(runner.summary))

    if background:
        handle._thread = threading.Thread(target=run, name=f"deposium-{plan.job_id}", daemon=True)
        handle._thread.start()
    else:
        run()
    return handle


def _submit_sync(documents: Iterable[Item], *, out: str, options: JobOptions, settings: Settings,
                 local: bool | None, artifact_dir: Path | None, name: str, replace: bool, progress: bool,
                 errors_path: Path | None, background: bool, keep_missing: bool, delete_missing: bool,
                 dry_run: bool) -> JobHandle:
    from deposium.producer.sync.job import run_sync

    handle = JobHandle("sync", out)

    def run() -> None:
        try:
            handle._update(run_sync(documents_to_sources(documents), sources_key=[f"api:{name}"], target=out,
                                    options=options, settings=settings, local=local, artifact_dir=artifact_dir,
                                    keep_missing=keep_missing, delete_missing=delete_missing, dry_run=dry_run,
                                    replace=replace, errors_path=errors_path,
                                    progress=Progress(enabled=progress)))  # type: ignore[arg-type]
        except BaseException as exc:  # noqa: BLE001 - handed to the caller by wait()
            handle._error = exc

    if background:
        handle._thread = threading.Thread(target=run, name="deposium-sync", daemon=True)
        handle._thread.start()
    else:
        run()
    return handle
