"""Liveness a producer can see: which worker holds which batch, and which workers are online.

Why: with Celery's Redis transport a batch delivered to a replica whose whole process tree is
killed (OOM, eviction, a lost host) or cut off from the network stays in Redis' unacked set
until the visibility timeout, an hour by default, and the job waits that long. The visibility
timeout cannot simply be shortened: it must exceed the longest batch, or Redis redelivers a
batch that is merely slow while it still runs. So liveness is told apart from slowness here:

* the worker's MAIN process sets :func:`held_key` for every batch it receives (before a child
  runs it) and a thread refreshes those keys every third of ``hold_ttl_s``. The main process
  does not run the model, so a slow batch on a throttled CPU never stops the refresh; only the
  loss of the main process (the whole replica) or of its network does;
* the same thread refreshes :func:`worker_key` per consumed queue, so a producer can count the
  workers online without a broadcast round trip;
* a child deletes the batch's key once the batch is finished (after the result is stored), and
  the refresh only extends keys that exist (``EXPIRE``), so a finished batch leaves nothing.

The producer (``deposium.producer.backends.QueueBackend``) re-sends a batch whose key it saw and
that vanished with no result stored; the job's set of awaited batches and the sink's exactly-once
commit make the late copy of a batch that was re-sent harmless (it is skipped or dropped).

The same thread bounds a scale-down: Celery's warm shutdown (SIGTERM) takes no new batch and
waits for the running ones however long they take, while the platform kills the replica after
its drain time. So ``drain_s`` after the stop request, batches still running are stopped and
returned to the queue at once (a cold shutdown, SIGQUIT: acks-late messages not acknowledged are
restored by the Redis transport), rather than lost to a SIGKILL and found again only through
their expired holder keys.

A thread of our own rather than Celery's worker heartbeat events: those go over the broker's
fanout exchange to event consumers (Flower), are off with ``--without-heartbeat``, and say nothing
about which batches a worker holds.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from typing import Any

from celery import signals

from deposium.worker.config import load_settings
from deposium.worker.wire import TASK_NAME

log = logging.getLogger("deposium.heartbeat")


def held_key(task_id: str) -> str:
    """Redis key naming the worker that holds batch ``task_id`` (received, not finished); short TTL."""
    return f"deposium:held:{task_id}"


def worker_key(queue: str, node: str) -> str:
    """Redis key saying that worker ``node`` is online and consuming ``queue``; short TTL."""
    return f"deposium:workers:{queue}:{node}"


class _State:
    client: Any = None
    node = "unknown"
    queues: tuple[str, ...] = ()
    ttl = 20
    wake = threading.Event()
    draining = threading.Event()
    drain_s = 0
    drain_started: float | None = None
    drain_done = False
    thread: threading.Thread | None = None


state = _State()


def _held_task_ids() -> list[str]:
    """Ids of our batches this main process holds (reserved or running)."""
    from celery.worker import state as worker_state

    for _ in range(3):  # the consumer thread may change the set while we copy it
        try:
            return [r.id for r in list(worker_state.reserved_requests) if getattr(r, "name", None) == TASK_NAME]
        except RuntimeError:
            continue
    return []


def beat_once() -> None:
    """Refresh this worker's presence and the keys of the batches it holds (never creates a batch key)."""
    pipe = state.client.pipeline(transaction=False)
    for queue in state.queues:
        if state.draining.is_set():
            pipe.delete(worker_key(queue, state.node))
        else:
            pipe.set(worker_key(queue, state.node), "1", ex=state.ttl)
    for task_id in _held_task_ids():
        pipe.expire(held_key(task_id), state.ttl)
    pipe.execute()


def _run() -> None:
    interval = max(state.ttl / 3.0, 0.5)
    while True:
        try:
            beat_once()
        except Exception as exc:  # noqa: BLE001 - Redis away: the keys expire, which is the truth
            log.warning("heartbeat to Redis failed (%s); retrying in %.0fs", exc, interval)
        state.wake.wait(min(interval, _end_drain_if_due()))
        state.wake.clear()


def _end_drain_if_due() -> float:
    """During a drain, once ``drain_s`` passed, return the running batches (cold shutdown).
    Returns the seconds until that is due (a large number outside a drain)."""
    if not state.draining.is_set() or state.drain_s <= 0 or state.drain_done:
        return 3600.0
    if state.drain_started is None:
        state.drain_started = time.monotonic()
    left = state.drain_started + state.drain_s - time.monotonic()
    if left > 0:
        return left
    state.drain_done = True
    held = _held_task_ids()
    if held:
        log.warning("%d batches still running %ds after the stop request (DEPOSIUM_DRAIN_SECONDS): "
                    "stopping them and returning them to the queue", len(held), state.drain_s)
        os.kill(os.getpid(), signal.SIGQUIT)
    return 3600.0


def consumed_queues(consumer: Any, default: str) -> tuple[str, ...]:
    """Names of the queues a worker's consumer (the ``worker_ready`` sender) reads, else ``default``."""
    try:
        names = tuple(q.name for q in consumer.task_consumer.queues)
    except AttributeError:
        names = ()
    return names or (default,)


def _client() -> Any:
    """The main process's Redis client (created on first use: batches may arrive before
    ``worker_ready``); None without REDIS_URL."""
    if state.client is None:
        import redis

        settings = load_settings()
        if not settings.redis_url:
            return None
        state.ttl = settings.hold_ttl_s
        state.client = redis.Redis.from_url(settings.redis_url, socket_connect_timeout=2, socket_timeout=5)
    return state.client


@signals.worker_ready.connect
def _on_worker_ready(sender: Any = None, **_: Any) -> None:
    """Main process, consuming: start the heartbeat thread."""
    if _client() is None:
        return
    state.node = str(getattr(sender, "hostname", None) or state.node)
    state.drain_s = load_settings().drain_s
    state.queues = consumed_queues(sender, load_settings().queue)
    state.thread = threading.Thread(target=_run, name="deposium-heartbeat", daemon=True)
    state.thread.start()


@signals.worker_shutting_down.connect
def _on_worker_shutting_down(**_: Any) -> None:
    """Shutdown asked (SIGTERM on a scale-down): the thread stops saying "online" (and wakes to
    say so now), but keeps refreshing the batches still held until the process exits, so a batch
    finishing during the drain is not re-sent while it runs. Only a flag here: this runs in a
    signal handler, where a Redis call could deadlock on the connection pool's lock."""
    state.draining.set()
    state.wake.set()


@signals.task_received.connect
def _on_task_received(request: Any = None, **_: Any) -> None:
    """Main process: claim the batch at once (the thread only refreshes existing claims)."""
    if getattr(request, "name", None) != TASK_NAME or _client() is None:
        return
    try:
        state.client.set(held_key(request.id), str(getattr(request, "hostname", None) or state.node), ex=state.ttl)
    except Exception as exc:  # noqa: BLE001 - without the claim the batch is only re-sent later
        log.warning("could not record that batch %s is held here: %s", request.id, exc)


@signals.task_postrun.connect
def _on_task_postrun(sender: Any = None, task_id: str | None = None, **_: Any) -> None:
    """Child: the batch is finished and its result stored, so the claim goes."""
    if getattr(sender, "name", None) != TASK_NAME or not task_id:
        return
    try:
        sender.backend.client.delete(held_key(task_id))
    except Exception as exc:  # noqa: BLE001 - it expires anyway
        log.warning("could not release batch %s: %s", task_id, exc)
