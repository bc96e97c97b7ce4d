"""The Celery application, configured in this one place from :class:`deposium.worker.config.Settings`.

Why each setting (all of them protect a batch from being lost or run twice):

* msgpack (JSON also accepted, pickle never): a queue anyone on the network can write to
  must not be able to execute code in the worker; msgpack carries vectors as raw bytes.
* ``task_acks_late`` + ``task_reject_on_worker_lost``: a batch is acknowledged only after
  it finished, so a worker killed mid-batch (OOM, redeploy) leaves it to be redelivered.
* ``task_retry_on_worker_lost`` with ``max_retries = max_batch_retries``: a batch whose
  process died (SIGKILL, OOM) is sent again at once, but only that many times; then it is
  recorded as failed (``WorkerLostError``). Without the bound, reject_on_worker_lost would
  requeue a poison batch that kills every process running it forever.
* ``worker_prefetch_multiplier=1``: a process holds one batch at a time; a slow batch
  never hides others that an idle process could take.
* ``visibility_timeout`` > hard time limit (enforced by ``load_settings``): Redis must not
  redeliver a batch that is still running.
* events on, so Flower can show throughput.
* ``result_expires``: a result is deleted by the producer as soon as it is consumed; the expiry
  only bounds what a producer that died (and is never resumed) leaves behind.

Why :func:`awaited_key`: a batch can be delivered twice (a producer killed and resumed re-sends
what the dead one had in flight; a producer re-sends a batch past its deadline; Redis redelivers
after the visibility timeout). Both copies have the same task id, so a copy finishing after the
producer consumed and deleted the result would store it again, and it would sit in Redis until
``result_expires``. So the producer keeps, per job, the set of batch ids it still awaits (added
before sending, removed once the batch's outcome is final) and marks its messages with
:data:`AWAITED_HEADER`; the worker skips such a message, and stores nothing for it, when its
batch is no longer in the set (``deposium.worker.tasks``). Messages without the header (other senders,
older producers) are always run.

The producer imports :func:`create_app` / :data:`app` to send batches by name; it never
imports the task code (and so never onnxruntime).
"""

from __future__ import annotations

from typing import Any

from celery import Celery

import deposium.worker.metrics  # noqa: F401  (Prometheus throughput metrics via Celery signals)
from deposium.worker.config import Settings, load_settings
from deposium.worker.heartbeat import held_key, worker_key  # also wires the heartbeat's Celery signals
from deposium.worker.wire import TASK_NAME

#: Seconds a freshly forked child may take to report itself alive. The model is loaded
#: lazily on the first task, so start-up is quick; the margin covers slow, throttled CPUs.
PROC_ALIVE_TIMEOUT_S = 60.0

#: Message header of a batch whose producer tracks it in :func:`awaited_key`.
AWAITED_HEADER = "deposium_awaited"


def awaited_key(job_id: str) -> str:
    """Redis set of the batch ids a job's producer still awaits (sent, outcome not yet final).

    Empty (so absent) once the job is over; its TTL (``result_expires``, refreshed on each send)
    removes it when a producer dies and its job is never resumed.
    """
    return f"deposium:awaited:{job_id}"


def progress_key(job_id: str) -> str:
    """Redis hash where a running job's producer publishes its progress (queued, held, done, ETA)
    for the workers' exporters (``deposium.worker.metrics``); expires when the producer stops."""
    return f"deposium:progress:{job_id}"


__all__ = ["AWAITED_HEADER", "app", "awaited_key", "celery_config", "create_app", "held_key", "progress_key",
           "worker_key"]

#: Broker used when REDIS_URL is unset, only so the module can be imported (the CLI refuses
#: to start a worker without REDIS_URL).
FALLBACK_URL = "redis://localhost:6379/0"


def celery_config(settings: Settings) -> dict[str, Any]:
    """Every Celery setting we use, derived from ``settings``."""
    url = settings.redis_url or FALLBACK_URL
    return {
        "broker_url": url,
        "result_backend": url,
        "task_serializer": "msgpack",
        "result_serializer": "msgpack",
        "accept_content": ["msgpack", "json"],
        "result_accept_content": ["msgpack", "json"],
        "task_acks_late": True,
        "task_acks_on_failure_or_timeout": True,
        "task_reject_on_worker_lost": True,
        "task_retry_on_worker_lost": True,
        "task_annotations": {TASK_NAME: {"max_retries": settings.max_batch_retries, "default_retry_delay": 0}},
        "worker_prefetch_multiplier": 1,
        "broker_transport_options": {"visibility_timeout": settings.visibility_timeout_s},
        "result_backend_transport_options": {"visibility_timeout": settings.visibility_timeout_s},
        "result_expires": settings.result_expires_s,
        "task_soft_time_limit": settings.task_soft_time_limit_s,
        "task_time_limit": settings.task_time_limit_s,
        "worker_send_task_events": True,
        "task_send_sent_event": True,
        "broker_connection_retry_on_startup": True,
        "task_default_queue": settings.queue,
        "task_routes": {TASK_NAME: {"queue": settings.queue}},
        "task_track_started": True,
        "worker_proc_alive_timeout": PROC_ALIVE_TIMEOUT_S,
        "broker_connection_timeout": settings.redis_connect_timeout_s,
        "timezone": "UTC",
        "enable_utc": True,
    }


def _quiet_success_log() -> None:
    """Log a finished batch without its return value.

    Why: Celery's default success line embeds the whole result, i.e. every vector's bytes
    and per-paragraph data, at INFO for every batch: megabytes of log per minute and
    document-derived data in log storage. Name, id and runtime are what operators need.
    """
    import celery.app.trace as trace

    trace.LOG_SUCCESS = "Task %(name)s[%(id)s] succeeded in %(runtime)ss"


def create_app(settings: Settings | None = None) -> Celery:
    """A configured Celery app; ``deposium.worker.tasks`` registers the task on import."""
    _quiet_success_log()
    celery = Celery("deposium", include=["deposium.worker.tasks"])
    celery.conf.update(celery_config(settings or load_settings()))
    return celery


#: The app ``celery -A deposium.worker.celery_app worker`` and the producer use.
app = create_app()
