"""Assemble a sync from the same inputs a job takes (CLI and library API share this).

Why the job's own planning: a sync validates task, dim and dtype against the artifact, picks
the local or queued backend and counts tokens exactly as a job does, so a synced store holds
the very paragraphs and vectors a job over the same sources would.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path

from deposium.producer.backends import Backend
from deposium.producer.job import limits, make_backend, plan_job
from deposium.producer.model import InputError
from deposium.producer.progress import Progress
from deposium.producer.readers import Source
from deposium.producer.runner import JobOptions
from deposium.producer.sync.engine import Embedding, SyncOptions, SyncRunner, SyncSummary
from deposium.producer.sync.store import SYNC_FORMAT, dumps, open_sync_store
from deposium.producer.tokens import TokenCounter
from deposium.worker.config import Settings, mask_url


def run_sync(sources: Iterable[Source | InputError], *, sources_key: list[str], target: str, options: JobOptions,
             settings: Settings, local: bool | None = None, artifact_dir: Path | None = None,
             keep_missing: bool = False, delete_missing: bool = False, dry_run: bool = False,
             replace: bool = False, errors_path: Path | None = None, progress: Progress | None = None,
             columns: dict[str, str] | None = None) -> SyncSummary:
    """Sync ``target`` with ``sources``; raises SinkError / ValueError before any work when refused."""
    plan = plan_job(inputs=sources_key, target=target, options=options, settings=settings, local=local,
                    artifact_dir=artifact_dir, errors_path=errors_path)
    opts = plan.options
    identity = {"format": SYNC_FORMAT, "model": plan.manifest.model_sha256, "task": opts.task, "dim": plan.dim,
                "dtype": opts.dtype, "max_tokens": opts.max_tokens, "min_chars": opts.min_chars,
                "chunk_tokens": opts.chunk_tokens, "chunk_overlap": opts.chunk_overlap, **(columns or {})}
    counter = TokenCounter(plan.tokenizer, task=opts.task, max_tokens=opts.max_tokens)
    store = open_sync_store(plan.target)
    backend: Backend | None = None
    if not dry_run:
        stored_target = mask_url(plan.target, drop_password=True)
        backend = make_backend(plan, "s" + hashlib.sha256(dumps([stored_target, identity]).encode()).hexdigest()[:15])
    embedding = Embedding(counter=counter, backend=backend, limits=limits(plan), dim=plan.dim, dtype=opts.dtype)
    runner = SyncRunner(store, embedding, identity=identity, sources_key=sources_key, progress=progress,
                        options=SyncOptions(keep_missing=keep_missing, delete_missing=delete_missing,
                                            dry_run=dry_run, replace=replace,
                                            group_paragraphs=settings.sync_group_paragraphs,
                                            max_in_flight=opts.max_in_flight, min_chars=opts.min_chars,
                                            chunk_tokens=opts.chunk_tokens, chunk_overlap=opts.chunk_overlap))
    try:
        summary = runner.run(sources)
    finally:
        if backend is not None:
            backend.close()
    if summary.errors and plan.errors_path is not None and not dry_run:
        path = plan.errors_path
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", encoding="utf-8") as fh:
            for entry in summary.errors:
                fh.write(json.dumps(entry) + "\n")
        summary.errors_path = str(path)
    return summary
