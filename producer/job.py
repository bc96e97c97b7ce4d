"""Assemble a job from its parts: settings, artifact, backend, sink, job store, identity.

Why one function shared by the CLI and the library API: both must derive the same job id
from the same inputs and options, open the same sink and pick the same backend, or
"re-running the same command resumes" would hold for one entry point only.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from deposium.producer.backends import Backend, BackendError, LocalBackend, QueueBackend, Request
from deposium.producer.batching import Limits
from deposium.producer.jobstore import FileJobStore, JobStore, RedisJobStore
from deposium.producer.progress import Progress
from deposium.producer.runner import JobOptions, JobRunner
from deposium.producer.sinks import open_sink
from deposium.producer.tokens import TokenCounter
from deposium.worker.artifact import ArtifactError, read_manifest
from deposium.worker.config import Settings, load_settings
from deposium.worker.tokenize import ingestion_task


@dataclass(frozen=True)
class Plan:
    """Everything decided before the first paragraph is read."""

    job_id: str
    local: bool
    settings: Settings
    options: JobOptions
    artifact_dir: Path
    target: str
    errors_path: Path | None
    spec: dict[str, Any]


def job_id_for(identity: dict[str, Any]) -> str:
    """A job id derived from what shapes its output, so the same command finds the same job."""
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
    return f"j{digest[:15]}"


_URL_PASSWORD = re.compile(r"^(?P<head>[a-zA-Z][a-zA-Z0-9+.-]*://[^:@/]*):[^@/]*@")


def without_password(target: str) -> str:
    """``scheme://user:pw@host/...`` -> ``scheme://user@host/...`` (libpq then reads PGPASSWORD)."""
    return _URL_PASSWORD.sub(lambda m: f"{m['head']}@", target)


def is_file_target(target: str) -> bool:
    return "://" not in target or target.startswith("file://")


def plan_job(*, inputs: list[str], target: str, options: JobOptions, settings: Settings | None = None,
             local: bool | None = None, artifact_dir: Path | None = None, job_id: str | None = None,
             errors_path: Path | None = None, extra_identity: dict[str, Any] | None = None,
             resolve_task: bool = True) -> Plan:
    """Validate options against the artifact and derive the job id (no work, no connections).

    A job that names no task gets the model's document prompt (``deposium.worker.tokenize.ingestion_task``);
    the plan records the task it resolved to, so a resumed job (``resolve_task=False``: its
    recorded options are final) keeps embedding the way it started.
    """
    settings = settings or load_settings()
    artifact_dir = Path(artifact_dir or settings.artifact_dir).expanduser()
    manifest = read_manifest(artifact_dir)
    if resolve_task:
        options = replace(options, task=ingestion_task(options.task, manifest.prompts))
    if options.dim is not None and options.dim not in manifest.matryoshka_dims:
        raise ValueError(f"--dim {options.dim} is not offered by this model; choose one of "
                         f"{manifest.matryoshka_dims}")
    if options.dtype not in {"float32", "float16"}:
        raise ValueError(f"--dtype must be float32 or float16, not {options.dtype!r}")
    if options.max_in_flight < 1:
        raise ValueError(f"max_in_flight (--max-in-flight) must be at least 1, not {options.max_in_flight}")
    if options.batch_tokens < 1:
        raise ValueError(f"batch_tokens (--batch-tokens) must be at least 1, not {options.batch_tokens}")
    if is_file_target(target):
        target = str(Path(target.removeprefix("file://")).expanduser().absolute())
    use_local = local if local is not None else not settings.redis_url
    # A password inside a sink URL is a secret: it never enters the job id, the job record
    # (Redis or file) or `deposium-jobs`; resuming by id then needs it from PG* variables.
    stored_target = without_password(target)
    identity = {
        "inputs": inputs, "target": stored_target, "model": manifest.model_sha256,
        "task": options.task, "dim": options.dim or manifest.dim, "dtype": options.dtype,
        "batch_tokens": options.batch_tokens, "max_tokens": options.max_tokens,
        "min_chars": options.min_chars, "max_batch_paragraphs": settings.max_batch_paragraphs,
        "max_batch_bytes": settings.max_batch_bytes, **(extra_identity or {}),
    }
    job_id = job_id or job_id_for(identity)
    if errors_path is None:
        errors_path = (Path(target + ".errors.jsonl") if is_file_target(target)
                       else settings.cache_dir / "jobs" / f"{job_id}.errors.jsonl")
    spec = {"inputs": inputs, "target": stored_target, "artifact_dir": str(artifact_dir.absolute()),
            "options": asdict(options), "errors_path": str(errors_path), "local": use_local,
            "model_sha256": manifest.model_sha256, "model_source": manifest.source}
    return Plan(job_id=job_id, local=use_local, settings=settings, options=options,
                artifact_dir=artifact_dir, target=target, errors_path=errors_path, spec=spec)


def job_store(settings: Settings, local: bool, target: str | None = None) -> JobStore:
    """Redis for queue mode; a file next to a file output (or in the cache) for local mode."""
    if not local:
        import redis

        return RedisJobStore(redis.Redis.from_url(settings.redis_url or "", socket_connect_timeout=5,
                                                  retry_on_timeout=True),
                             reconnect_timeout_s=float(settings.redis_reconnect_timeout_s))
    record = Path(target + ".job.json") if target and is_file_target(target) else None
    return FileJobStore(settings.cache_dir, record)


def build_runner(plan: Plan, *, progress: Progress | None = None, replace: bool = False,
                 on_progress: Any = None) -> JobRunner:
    """Create backend, sink and store for ``plan`` (connects to Redis / loads the model)."""
    settings = plan.settings
    manifest = read_manifest(plan.artifact_dir)
    dim = plan.options.dim or manifest.dim
    counter = TokenCounter.from_artifact(plan.artifact_dir, task=plan.options.task,
                                         max_tokens=plan.options.max_tokens)
    request = Request(job_id=plan.job_id, task=plan.options.task, dim=plan.options.dim,
                      dtype=plan.options.dtype)
    backend: Backend
    if plan.local:
        backend = LocalBackend(plan.artifact_dir, settings, request)
    else:
        backend = QueueBackend(settings, request, model_sha256=manifest.model_sha256,
                               batch_timeout_s=settings.batch_timeout_s or None,
                               reconnect_timeout_s=float(settings.redis_reconnect_timeout_s))
    limits = Limits(tokens=plan.options.batch_tokens, paragraphs=settings.max_batch_paragraphs,
                    nbytes=max(settings.max_batch_bytes - 4096, 1))
    return JobRunner(job_id=plan.job_id, spec=plan.spec, options=plan.options, counter=counter,
                     backend=backend, sink=open_sink(plan.target),
                     store=job_store(settings, plan.local, plan.target), dim=dim, limits=limits,
                     max_paragraph_bytes=settings.max_paragraph_bytes, errors_path=plan.errors_path,
                     progress=progress, replace=replace, on_progress=on_progress)


def with_in_flight(options: JobOptions, settings: Settings, max_in_flight: int | None) -> JobOptions:
    """Fill options left unset (None) from the environment's settings."""
    return replace(options, max_in_flight=settings.max_in_flight if max_in_flight is None else max_in_flight,
                   batch_tokens=options.batch_tokens or settings.batch_tokens)


__all__ = ["ArtifactError", "BackendError", "Plan", "build_runner", "job_id_for", "job_store", "plan_job",
           "with_in_flight"]
