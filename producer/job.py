"""Assemble a job from its parts: settings, artifact, backend, sink, job store, identity.

Why one function shared by the CLI and the library API: both must derive the same job id
from the same inputs and options, open the same sink and pick the same backend, or
"re-running the same command resumes" would hold for one entry point only.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from deposium.producer.backends import Backend, BackendError, LocalBackend, QueueBackend, Request
from deposium.producer.batching import Limits
from deposium.producer.jobstore import FileJobStore, JobStore, RedisJobStore
from deposium.producer.progress import Progress
from deposium.producer.runner import ErrorLog, JobOptions, JobRecord, JobRunner, Pipeline
from deposium.producer.shard import WHOLE, Shard
from deposium.producer.sinks import Sink, SinkJob, open_sink
from deposium.producer.tokens import TokenCounter
from deposium.worker.artifact import ArtifactError, Manifest, read_manifest
from deposium.worker.config import Settings, load_settings, mask_url
from deposium.worker.tokenize import ParagraphTokenizer, ingestion_task
from deposium.worker.wire import WIRE_DTYPES


@dataclass(frozen=True)
class Plan:
    """Everything decided before the first paragraph is read.

    Why the plan holds the parsed manifest and tokenizer: every later step (token counting,
    the sink's model check, the local backend's Embedder) reads them from here, so a job
    reads the artifact's manifest and parses its tokenizer once.
    """

    job_id: str
    local: bool
    settings: Settings
    options: JobOptions
    artifact_dir: Path
    target: str
    errors_path: Path | None
    spec: dict[str, Any]
    manifest: Manifest
    tokenizer: ParagraphTokenizer
    #: The target's sink, parsed and checked (nothing created, nothing connected) until opened.
    sink: Sink
    #: The part of the job this producer runs (the whole job unless ``--shard``).
    shard: Shard = WHOLE

    @property
    def dim(self) -> int:
        return self.options.dim or self.manifest.dim


def job_id_for(identity: dict[str, Any]) -> str:
    """A job id derived from what shapes its output, so the same command finds the same job."""
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
    return f"j{digest[:15]}"


def is_file_target(target: str) -> bool:
    return "://" not in target or target.startswith("file://")


def plan_job(*, inputs: list[str], target: str, options: JobOptions, settings: Settings | None = None,
             local: bool | None = None, artifact_dir: Path | None = None, job_id: str | None = None,
             errors_path: Path | None = None, extra_identity: dict[str, Any] | None = None,
             resolve_task: bool = True, shard: Shard = WHOLE) -> Plan:
    """Validate options against the artifact and derive the job id (no work, no connections).

    A job that names no task gets the model's document prompt (``deposium.worker.tokenize.ingestion_task``);
    the plan records the task it resolved to, so a resumed job (``resolve_task=False``: its
    recorded options are final) keeps embedding the way it started. Every shard of a sharded
    job gets the same job id (the shard count is part of it, the shard index is not).
    """
    settings = settings or load_settings()
    artifact_dir = Path(artifact_dir or settings.artifact_dir).expanduser()
    manifest = read_manifest(artifact_dir)
    if resolve_task:
        options = replace(options, task=ingestion_task(options.task, manifest.prompts))
    if options.dim is not None and options.dim not in manifest.matryoshka_dims:
        raise ValueError(f"--dim {options.dim} is not offered by this model; choose one of "
                         f"{manifest.matryoshka_dims}")
    if options.dtype not in WIRE_DTYPES:
        raise ValueError(f"--dtype must be {' or '.join(WIRE_DTYPES)}, not {options.dtype!r}")
    if options.max_in_flight < 1:
        raise ValueError(f"max_in_flight (--max-in-flight) must be at least 1, not {options.max_in_flight}")
    if options.batch_tokens < 1:
        raise ValueError(f"batch_tokens (--batch-tokens) must be at least 1, not {options.batch_tokens}")
    if is_file_target(target):
        target = str(Path(target.removeprefix("file://")).expanduser().absolute())
    sink = open_sink(target)  # a malformed or unusable target is refused here, before any work
    tokenizer = ParagraphTokenizer.from_artifact(artifact_dir, manifest)
    use_local = local if local is not None else not settings.redis_url
    # A password inside a sink URL is a secret: it never enters the job id, the job record
    # (Redis or file) or `deposium-jobs`; resuming by id then needs it from PG* variables.
    stored_target = mask_url(target, drop_password=True)
    identity = {
        "inputs": inputs, "target": stored_target, "model": manifest.model_sha256,
        "task": options.task, "dim": options.dim or manifest.dim, "dtype": options.dtype,
        "batch_tokens": options.batch_tokens, "max_tokens": options.max_tokens,
        "min_chars": options.min_chars, "max_batch_paragraphs": settings.max_batch_paragraphs,
        "max_batch_bytes": settings.max_batch_bytes, **(extra_identity or {}),
    }
    if shard.sharded:  # a job split N ways forms other batches than the same job unsharded
        identity["shards"] = shard.count
    job_id = job_id or job_id_for(identity)
    if errors_path is None:
        errors_path = (Path(target + ".errors.jsonl") if is_file_target(target)
                       else settings.cache_dir / "jobs" / f"{job_id}.errors.jsonl")
    spec = {"inputs": inputs, "target": stored_target, "artifact_dir": str(artifact_dir.absolute()),
            "options": asdict(options), "errors_path": str(errors_path), "local": use_local,
            "model_sha256": manifest.model_sha256, "model_source": manifest.source}
    if shard.sharded:
        spec["shard"] = {"job": job_id, "index": shard.index, "count": shard.count}
        tag = f".{shard.index}-of-{shard.count}"
        if tag + "." not in errors_path.name:  # one errors file per shard, side by side
            stem, dot, ext = errors_path.name.partition(".errors.")
            name = f"{stem}{tag}{dot}{ext}" if dot else f"{errors_path.stem}{tag}{errors_path.suffix}"
            errors_path = errors_path.with_name(name)
            spec["errors_path"] = str(errors_path)
    return Plan(job_id=job_id, local=use_local, settings=settings, options=options,
                artifact_dir=artifact_dir, target=target, errors_path=errors_path, spec=spec,
                manifest=manifest, tokenizer=tokenizer, sink=sink, shard=shard)


def job_store(settings: Settings, local: bool, target: str | None = None, shard: Shard = WHOLE) -> JobStore:
    """Redis for queue mode; a file next to a file output (or in the cache) for local mode
    (one per shard of a sharded job: ``OUT.job.I-of-N.json``)."""
    if not local:
        import redis

        return RedisJobStore(redis.Redis.from_url(settings.redis_url or "", socket_connect_timeout=5,
                                                  retry_on_timeout=True),
                             reconnect_timeout_s=float(settings.redis_reconnect_timeout_s))
    suffix = f".job.{shard.index}-of-{shard.count}.json" if shard.sharded else ".job.json"
    record = Path(target + suffix) if target and is_file_target(target) else None
    return FileJobStore(settings.cache_dir, record)


def make_backend(plan: Plan, job_id: str) -> Backend:
    """The plan's backend: the in-process Embedder (sharing the plan's manifest and tokenizer)
    or the Celery queue (connects to Redis). ``job_id`` names its tasks."""
    options = plan.options
    request = Request(job_id=job_id, task=options.task, dim=options.dim, dtype=options.dtype)
    if plan.local:
        return LocalBackend(plan.artifact_dir, plan.settings, request, manifest=plan.manifest,
                            tokenizer=plan.tokenizer)
    return QueueBackend(plan.settings, request, model_sha256=plan.manifest.model_sha256,
                        batch_timeout_s=plan.settings.batch_timeout_s or None,
                        reconnect_timeout_s=float(plan.settings.redis_reconnect_timeout_s))


def limits(plan: Plan) -> Limits:
    """Batch limits: the job's token budget, under what the worker accepts per task."""
    return Limits(tokens=plan.options.batch_tokens, paragraphs=plan.settings.max_batch_paragraphs,
                  nbytes=max(plan.settings.max_batch_bytes - 4096, 1))


def build_runner(plan: Plan, *, progress: Progress | None = None, replace: bool = False,
                 on_progress: Any = None) -> JobRunner:
    """Create the backend (connects to Redis / loads the model), then open the plan's sink.

    Why the sink is opened here and not when the run starts: a target that belongs to
    another job, or that another producer is writing right now (its lock), must be refused
    when the job is submitted, before the first paragraph is read. Why after the backend: an
    unreachable Redis or an unusable model then leaves no output state behind.
    """
    settings = plan.settings
    options = plan.options
    counter = TokenCounter(plan.tokenizer, task=options.task, max_tokens=options.max_tokens)
    shard = plan.shard
    backend = make_backend(plan, shard.key(plan.job_id))
    try:
        plan.sink.open(SinkJob(job_id=plan.job_id, dim=plan.dim, dtype=options.dtype,
                               model_sha256=plan.manifest.model_sha256, replace=replace,
                               shard=shard.index, shards=shard.count))
    except BaseException:
        backend.close()
        raise
    pipeline = Pipeline(options=options, counter=counter, backend=backend, sink=plan.sink, limits=limits(plan),
                        dim=plan.dim, max_paragraph_bytes=settings.max_paragraph_bytes,
                        batch_prefix=shard.batch_prefix)
    record = JobRecord(job_store(settings, plan.local, plan.target, shard), shard.key(plan.job_id), plan.spec)
    return JobRunner(pipeline, record, ErrorLog(plan.errors_path), progress=progress, replace=replace,
                     on_progress=on_progress)


def with_in_flight(options: JobOptions, settings: Settings, max_in_flight: int | None) -> JobOptions:
    """Fill options left unset (None) from the environment's settings."""
    return replace(options, max_in_flight=settings.max_in_flight if max_in_flight is None else max_in_flight,
                   batch_tokens=options.batch_tokens or settings.batch_tokens)


__all__ = ["ArtifactError", "BackendError", "Plan", "build_runner", "job_id_for", "job_store", "limits",
           "make_backend", "plan_job", "with_in_flight"]
