"""Prometheus throughput metrics for the worker, correct under Celery's prefork pool.

Why this module exists: Flower counts tasks, but an embedding fleet is sized by what a task
*contains*: paragraphs/s, tokens/s, batch latency, truncated and refused paragraphs. Those
numbers come from each batch's result, which only the child process that ran it sees.

Why multiprocess mode: with ``--pool=prefork`` every batch runs in a forked child. A plain
``prometheus_client`` registry in the parent would never see the children's increments, and an
HTTP server per child would be unscrapeable (N ports per replica, lost on every recycle). So
the parent, before forking, switches ``prometheus_client`` to multiprocess mode (one mmap file
per process in ``PROMETHEUS_MULTIPROC_DIR``), and serves ONE endpoint per replica that sums the
files of every child, living or recycled. Counters from a recycled child keep counting (its
file stays); its in-progress gauge is dropped (``mark_process_dead``).

How it is wired: ``deposium.worker.celery_app`` imports this module once; the handlers below connect to
Celery signals. Nothing happens unless ``DEPOSIUM_METRICS_PORT`` is set (> 0) and the process
is a worker (``worker_init`` fires only there), so the producer, Flower and ``celery inspect``
importing the app are unaffected.

Endpoints on ``DEPOSIUM_METRICS_PORT``, bound to ``DEPOSIUM_METRICS_ADDR`` (default 0.0.0.0, so
Prometheus and Railway's healthcheck can reach it; ``::`` for dual-stack):

* ``/metrics``: Prometheus text format, every series labelled ``worker=<celery node name>``.
* ``/healthz``: 200 once the worker consumes from the broker (Celery ``worker_ready``), 503
  before that and after shutdown began. Railway's deploy healthcheck uses it.
"""

from __future__ import annotations

import glob
import logging
import os
import socket
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from celery import signals

from deposium.worker.config import Settings, load_settings
from deposium.worker.wire import TASK_NAME

log = logging.getLogger("deposium.metrics")

#: Batch latency buckets (seconds): a MiniLM batch of a few paragraphs takes ~50 ms on one
#: core; a 512-paragraph EmbeddingGemma batch takes minutes. Top bucket = default soft limit.
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)

#: Names of every series exported here (docs/monitoring.md documents each with PromQL).
METRIC_NAMES = (
    "deposium_batches_total",
    "deposium_batch_errors_total",
    "deposium_paragraphs_total",
    "deposium_paragraph_errors_total",
    "deposium_tokens_total",
    "deposium_truncated_paragraphs_total",
    "deposium_batch_duration_seconds",
    "deposium_batches_in_progress",
)


#: Gauges read from Redis at scrape time, the same on every replica (docs/scaling.md): what an
#: autoscaler needs (queue depth, work in flight, job progress and ETA) without Flower.
SCALING_METRIC_NAMES = (
    "deposium_queue_batches",
    "deposium_queue_paragraphs",
    "deposium_batches_in_flight",
    "deposium_workers_online",
    "deposium_job_paragraphs_done",
    "deposium_job_paragraphs_total",
    "deposium_job_eta_seconds",
)


class ScalingCollector:
    """Queue depth and job progress, read from Redis when Prometheus scrapes.

    Why read at scrape time from Redis, not counted here: the queue is shared by every replica
    and fed by producers elsewhere; only Redis knows its length (``LLEN``), and only a job's
    producer knows how many paragraphs its queued batches hold and how far the job is. Each
    producer publishes that in a small hash (``deposium.worker.celery_app.progress_key``) that
    expires when it stops. Every replica therefore reports the same values: aggregate with
    ``max``, not ``sum``.
    """

    def __init__(self, redis_url: str, queues: tuple[str, ...]) -> None:
        import redis

        self.client = redis.Redis.from_url(redis_url, socket_connect_timeout=2, socket_timeout=5)
        self.queues = queues

    def collect(self) -> Any:
        from prometheus_client.core import GaugeMetricFamily

        from deposium.worker.heartbeat import worker_key

        try:
            lengths = {q: int(self.client.llen(q)) for q in self.queues}
            workers = {q: sum(1 for _ in self.client.scan_iter(worker_key(q, "*"), count=1000)) for q in self.queues}
            jobs = []
            for key in self.client.scan_iter("deposium:progress:*", count=1000):
                fields = {k.decode(): v.decode() for k, v in self.client.hgetall(key).items()}
                if fields.get("queue") in self.queues:
                    jobs.append((key.decode().rsplit(":", 1)[1], fields))
        except Exception as exc:  # noqa: BLE001 - a scrape must not fail because Redis is away
            log.warning("scaling metrics: cannot read Redis (%s)", exc)
            return
        queue_batches = GaugeMetricFamily("deposium_queue_batches", "Batches waiting in the queue (LLEN).",
                                          labels=["queue"])
        queue_paragraphs = GaugeMetricFamily(
            "deposium_queue_paragraphs", "Paragraphs in batches sent by running jobs and not yet held by a worker.",
            labels=["queue"])
        in_flight = GaugeMetricFamily("deposium_batches_in_flight",
                                      "Batches sent by running jobs and not yet returned (queued or held).",
                                      labels=["queue"])
        online = GaugeMetricFamily("deposium_workers_online", "Worker replicas whose heartbeat is fresh.",
                                   labels=["queue"])
        done = GaugeMetricFamily("deposium_job_paragraphs_done", "Paragraphs a running job has written in this run.",
                                 labels=["queue", "job"])
        total = GaugeMetricFamily("deposium_job_paragraphs_total",
                                  "Paragraphs a running job is estimated to hold (0 until estimable).",
                                  labels=["queue", "job"])
        eta = GaugeMetricFamily("deposium_job_eta_seconds", "Estimated seconds until a running job ends (-1 unknown).",
                                labels=["queue", "job"])
        for q in self.queues:
            mine = [f for _, f in jobs if f.get("queue") == q]
            queue_batches.add_metric([q], lengths[q])
            queue_paragraphs.add_metric([q], sum(float(f.get("paragraphs_queued", 0)) for f in mine))
            in_flight.add_metric([q], sum(float(f.get("batches_in_flight", 0)) for f in mine))
            online.add_metric([q], workers[q])
        for job, f in jobs:
            done.add_metric([f["queue"], job], float(f.get("paragraphs_done", 0)))
            total.add_metric([f["queue"], job], float(f.get("paragraphs_total", 0)))
            eta.add_metric([f["queue"], job], float(f.get("eta_seconds", -1)))
        yield from (queue_batches, queue_paragraphs, in_flight, online, done, total, eta)


class _State:
    """Per-process state. Forked children inherit it (that is the point: they inherit the
    metric objects, already in multiprocess mode, and the node name)."""

    enabled = False
    node = "unknown"
    directory: Path | None = None
    server: ThreadingHTTPServer | None = None
    ready = False
    metrics: dict[str, Any] = {}
    started: dict[str, float] = {}
    scaling: ScalingCollector | None = None


state = _State()


def _enable_multiprocess(directory: Path) -> None:
    """Put prometheus_client in multiprocess mode writing to ``directory``.

    ``prometheus_client`` picks its value class when it is first imported, from
    ``PROMETHEUS_MULTIPROC_DIR``; the worker may have imported it earlier (celery does not, but
    a plugin might), so the class is also set explicitly here, before any metric exists.
    """
    from prometheus_client import values

    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(directory)  # read by MultiProcessCollector and mmap files
    if not getattr(values.ValueClass, "_multiprocess", False):
        values.ValueClass = values.MultiProcessValue()


def _create_metrics() -> dict[str, Any]:
    from prometheus_client import Counter, Gauge, Histogram

    # registry=None: in multiprocess mode values live in files; the exporter collects them.
    return {
        "batches": Counter(
            "deposium_batches", "Embedding batches finished, by outcome (success, failure, retry).",
            ["worker", "outcome"], registry=None,
        ),
        "batch_errors": Counter(
            "deposium_batch_errors", "Failed batches by exception type.", ["worker", "exception"],
            registry=None,
        ),
        "paragraphs": Counter(
            "deposium_paragraphs", "Paragraphs embedded (refused paragraphs not included).", ["worker"],
            registry=None,
        ),
        "paragraph_errors": Counter(
            "deposium_paragraph_errors",
            "Paragraphs refused inside otherwise successful batches (empty, not text, too large).",
            ["worker"], registry=None,
        ),
        "tokens": Counter(
            "deposium_tokens", "Tokens fed to the model (prompt included, after truncation).", ["worker"],
            registry=None,
        ),
        "truncated": Counter(
            "deposium_truncated_paragraphs", "Paragraphs cut at the model's max_seq_length.", ["worker"],
            registry=None,
        ),
        "duration": Histogram(
            "deposium_batch_duration_seconds", "Wall time of one batch inside the worker process.",
            ["worker"], buckets=LATENCY_BUCKETS, registry=None,
        ),
        "in_progress": Gauge(
            "deposium_batches_in_progress", "Batches being embedded right now (live processes only).",
            ["worker"], multiprocess_mode="livesum", registry=None,
        ),
    }


def _clean(directory: Path) -> None:
    """Drop files of a previous run: a restarted replica must not re-add its old counts."""
    for path in glob.glob(str(directory / "*.db")):
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def render() -> bytes:
    """The replica's metrics: the sum over the files of every process of this worker."""
    from prometheus_client import CollectorRegistry, generate_latest, multiprocess

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=str(state.directory))
    if state.scaling is not None:
        registry.register(state.scaling)
    return generate_latest(registry)


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            from prometheus_client import CONTENT_TYPE_LATEST

            body, status, ctype = render(), 200, CONTENT_TYPE_LATEST
        elif path in ("/healthz", "/health"):
            ok = state.ready
            body = b"ok\n" if ok else b"not ready\n"
            status, ctype = (200 if ok else 503), "text/plain; charset=utf-8"
        else:
            body, status, ctype = b"not found\n", 404, "text/plain; charset=utf-8"
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        """Scrapes every few seconds would drown the worker's log."""


class _Server6(ThreadingHTTPServer):
    """Dual-stack listener for ``DEPOSIUM_METRICS_ADDR=::`` (Railway's IPv6 private network)."""

    address_family = socket.AF_INET6


def start(settings: Settings, node: str) -> bool:
    """Enable metrics in this (parent) process and start the exporter. Returns False when off.

    Must run before the pool forks: children inherit the multiprocess value class and metrics.
    """
    if settings.metrics_port <= 0:
        return False
    directory = settings.metrics_dir or Path(tempfile.mkdtemp(prefix="deposium-metrics-"))
    directory.mkdir(parents=True, exist_ok=True)
    _clean(directory)
    _enable_multiprocess(directory)
    state.directory = directory
    state.node = node
    state.metrics = _create_metrics()
    if settings.redis_url:
        state.scaling = ScalingCollector(settings.redis_url, (settings.queue,))
    server_cls = _Server6 if ":" in settings.metrics_addr else ThreadingHTTPServer
    server = server_cls((settings.metrics_addr, settings.metrics_port), _Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="deposium-metrics", daemon=True).start()
    state.server = server
    state.enabled = True
    log.info("metrics: http://%s:%d/metrics (files in %s)", settings.metrics_addr, settings.metrics_port,
             directory)
    return True


# ---------------------------------------------------------------------------------------------
# Celery signal handlers. Task handlers run in the child that executed the batch.


@signals.worker_init.connect
def _on_worker_init(sender: Any = None, **_: Any) -> None:
    settings = load_settings()
    start(settings, node=str(getattr(sender, "hostname", None) or "unknown"))


@signals.worker_ready.connect
def _on_worker_ready(sender: Any = None, **_: Any) -> None:
    state.ready = True
    if state.scaling is not None:  # the queues actually consumed (``deposium-worker --queue`` included)
        from deposium.worker.heartbeat import consumed_queues

        state.scaling.queues = consumed_queues(sender, state.scaling.queues[0])


@signals.worker_shutdown.connect
def _on_worker_shutdown(**_: Any) -> None:
    state.ready = False


@signals.worker_process_shutdown.connect
def _on_process_shutdown(pid: int | None = None, **_: Any) -> None:
    """A child exited (recycled, killed): its in-progress gauge must not linger."""
    if state.enabled and pid:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid, path=str(state.directory))


def _ours(sender: Any) -> bool:
    return state.enabled and getattr(sender, "name", None) == TASK_NAME


@signals.task_prerun.connect
def _on_prerun(sender: Any = None, task_id: str | None = None, **_: Any) -> None:
    if _ours(sender) and task_id:
        state.started[task_id] = time.perf_counter()
        state.metrics["in_progress"].labels(state.node).inc()


@signals.task_postrun.connect
def _on_postrun(sender: Any = None, task_id: str | None = None, **_: Any) -> None:
    if _ours(sender) and task_id:
        began = state.started.pop(task_id, None)
        state.metrics["in_progress"].labels(state.node).dec()
        if began is not None:
            state.metrics["duration"].labels(state.node).observe(time.perf_counter() - began)


@signals.task_success.connect
def _on_success(sender: Any = None, result: Any = None, **_: Any) -> None:
    if not _ours(sender):
        return
    m, node = state.metrics, state.node
    m["batches"].labels(node, "success").inc()
    if not isinstance(result, dict):
        return
    errors = result.get("errors") or []
    counts = result.get("token_counts") or []
    failed = sum(1 for e in errors if e is not None)
    m["paragraphs"].labels(node).inc(max(len(counts) - failed, 0))
    if failed:
        m["paragraph_errors"].labels(node).inc(failed)
    m["tokens"].labels(node).inc(sum(int(c) for c in counts))
    truncated = sum(1 for t in (result.get("truncated") or []) if t)
    if truncated:
        m["truncated"].labels(node).inc(truncated)


@signals.task_failure.connect
def _on_failure(sender: Any = None, exception: BaseException | None = None, **_: Any) -> None:
    if not _ours(sender):
        return
    state.metrics["batches"].labels(state.node, "failure").inc()
    state.metrics["batch_errors"].labels(state.node, type(exception).__name__).inc()


@signals.task_retry.connect
def _on_retry(sender: Any = None, **_: Any) -> None:
    if _ours(sender):
        state.metrics["batches"].labels(state.node, "retry").inc()
