"""Where batches get embedded: in-process (``LocalBackend``) or through Celery (``QueueBackend``).

Both expose the same three calls, so the job runner (splitting, ids, retries, sink writes,
errors) is one code path and the two modes cannot drift apart:

* ``submit(batch)`` starts a batch (the caller keeps at most N in flight),
* ``completed(block)`` returns finished batches as :class:`Outcome` (vectors, or a reason),
* ``in_flight()`` counts batches started but not yet returned.

Retries live here because what counts as a retryable failure differs: a local exception
vs. a worker lost, a task FAILURE or a batch that never came back within its deadline.
"""

from __future__ import annotations

import sys
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from deposium.producer.model import Batch
from deposium.worker.config import Settings, mask_url

if TYPE_CHECKING:
    from deposium.worker.artifact import Manifest
    from deposium.worker.tokenize import ParagraphTokenizer


class BackendError(RuntimeError):
    """The backend cannot run at all (Redis unreachable, artifact unusable)."""


class JobStopped(BackendError):
    """The job stopped mid-way (Redis lost for too long, no worker came): resume with the same command."""


def report_to_stderr(message: str) -> None:
    """Default for :class:`QueueBackend`'s ``report``: one line on stderr, where the progress bar is."""
    print(f"deposium-submit: {message}", file=sys.stderr, flush=True)


@dataclass
class Outcome:
    """A finished batch: vectors for ``batch.texts`` in order, or ``failure`` with the reason."""

    batch: Batch
    vectors: np.ndarray | None = None
    token_counts: list[int] = field(default_factory=list)
    truncated: list[bool] = field(default_factory=list)
    errors: list[str | None] = field(default_factory=list)
    failure: str | None = None
    attempts: int = 1


class Backend(Protocol):
    model_sha256: str
    #: Batches actually handed to the model or the queue by this process (re-sends included).
    sent: int

    def submit(self, batch: Batch) -> None: ...

    def completed(self, block: bool) -> list[Outcome]: ...

    def in_flight(self) -> int: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class Request:
    job_id: str
    task: str | None
    dim: int | None
    dtype: str


class LocalBackend:
    """The embedded default: one in-process :class:`deposium.worker.embedder.Embedder`, one batch at a time."""

    def __init__(self, artifact_dir: Path, settings: Settings, request: Request, *,
                 manifest: Manifest | None = None, tokenizer: ParagraphTokenizer | None = None) -> None:
        """``manifest`` / ``tokenizer``: the job's own, already read (the producer counts tokens
        with the same tokenizer), handed to the Embedder so neither is read again."""
        from deposium.worker.embedder import Embedder  # imported here: queue mode never loads onnxruntime

        self.embedder = Embedder(artifact_dir, settings=settings, manifest=manifest, tokenizer=tokenizer)
        self.model_sha256 = self.embedder.manifest.model_sha256
        self.request = request
        self.retries = settings.max_batch_retries
        self.sent = 0
        self._done: deque[Outcome] = deque()

    def submit(self, batch: Batch) -> None:
        from deposium.worker.errors import EmbedRequestError

        attempt = 0
        while True:
            attempt += 1
            self.sent += 1
            try:
                r = self.embedder.embed(batch.texts, task=self.request.task, dim=self.request.dim,
                                        dtype=self.request.dtype)
            except EmbedRequestError as exc:  # malformed request: retrying cannot help
                self._done.append(Outcome(batch, failure=f"rejected: {exc}", attempts=attempt))
                return
            except Exception as exc:  # noqa: BLE001 - any crash of one batch is retried, then recorded
                if attempt > self.retries:
                    reason = f"{type(exc).__name__}: {exc}"
                    self._done.append(Outcome(batch, failure=reason, attempts=attempt))
                    return
                continue
            self._done.append(Outcome(batch, r.vectors, list(r.token_counts), list(r.truncated),
                                      list(r.errors), attempts=attempt))
            return

    def completed(self, block: bool) -> list[Outcome]:
        out = list(self._done)
        self._done.clear()
        return out

    def in_flight(self) -> int:
        return len(self._done)

    def close(self) -> None:
        pass


@dataclass
class _Pending:
    batch: Batch
    result: Any
    attempts: int
    deadline: float
    #: the worker that held the batch when last seen (``deposium.worker.heartbeat``), or None
    holder: str | None = None
    sent_at: float = field(default_factory=time.monotonic)
    #: when the batch was first found neither queued, nor delivered, nor held (see _locate)
    missing_since: float | None = None
    #: a queued batch is looked for again only after this (the search reads the whole queue in Redis)
    next_locate: float = 0.0


#: Longest wait between two polls of the results while nothing finishes. A batch takes far longer
#: than this to embed, so the pickup delay it adds is small against a batch's run time, while
#: several batches in flight keep every worker busy meanwhile.
POLL_BACKOFF_MAX_S = 0.2

#: Kombu's Redis transport keeps each delivered, unacknowledged message in this hash (by delivery
#: tag) and the delivery time in this sorted set (its defaults; celery_config does not change them).
UNACKED_KEY, UNACKED_INDEX_KEY = "unacked", "unacked_index"

#: Where a batch's message is: ``queued`` (in the queue list), ``delivered`` followed by
#: (delivery tag, delivery time) pairs of its unacknowledged copies, or ``nowhere``. Runs inside
#: Redis so that message payloads never cross the network; only used for a batch that no live
#: worker has claimed for a whole hold TTL, so rarely.
LOCATE_SCRIPT = """
local needle = '"' .. ARGV[1] .. '"'
for _, m in ipairs(redis.call('LRANGE', KEYS[1], 0, -1)) do
  if string.find(m, needle, 1, true) then return {'queued'} end
end
local out = {'nowhere'}
local all = redis.call('HGETALL', KEYS[2])
for i = 1, #all, 2 do
  if string.find(all[i + 1], needle, 1, true) then
    out[1] = 'delivered'
    table.insert(out, all[i])
    table.insert(out, redis.call('ZSCORE', KEYS[3], all[i]) or '0')
  end
end
return out
"""


class QueueBackend:
    """Celery by task name through ``deposium.worker.celery_app``; results polled from the Redis backend.

    A batch is re-sent (same task id, so its result key is overwritten, never duplicated) when
    the task fails or its deadline passes, at most ``max_batch_retries`` times; then it is
    returned as failed. Redis connection errors while polling are retried until
    ``reconnect_timeout_s`` passes without one success (a Redis restart mid-job).

    Nothing of a batch stays in Redis once its outcome is final: the batch id leaves the job's
    set of awaited batches (``deposium.worker.celery_app.awaited_key``), then its result is deleted; a
    duplicate delivery still queued or running is then skipped by the worker, storing nothing.

    Every ``check_interval_s`` it also looks at what Redis holds for the batches in flight, so
    that nothing is waited on in silence (docs/scaling.md):

    * a batch missing from the job's set of awaited batches was lost by Redis itself (restarted
      without persistence, or flushed): its message and result went with it, so it is re-sent;
    * a batch whose holder key (``deposium.worker.heartbeat``) was seen and then vanished with no
      result stored was held by a replica that is gone whole: it is re-sent, as one attempt;
    * when no batch finished for ``stall_report_s``, one line says how many workers are online on
      the queue and how many batches are queued and held; with ``wait_for_workers_s`` set, no
      batch finishing and no worker online for that long stops the job (:class:`JobStopped`).
    """

    def __init__(self, settings: Settings, request: Request, *, model_sha256: str,
                 batch_timeout_s: float | None = None, reconnect_timeout_s: float = 120.0,
                 poll_interval_s: float = 0.02, check_interval_s: float = 2.0,
                 report: Callable[[str], None] = report_to_stderr) -> None:
        if not settings.redis_url:
            raise BackendError("queue mode needs REDIS_URL (or use --local)")
        from deposium.worker.celery_app import awaited_key, create_app
        from deposium.worker.wire import TASK_NAME

        check_redis(settings)
        self.settings = settings
        self.app = create_app(settings)
        # Results are polled with GET; Celery would also SUBSCRIBE to each task's channel, a
        # connection this producer never reads whose reconnect fails noisily, at garbage
        # collection time, after a Redis outage.
        self.app.backend.on_task_call = lambda *_args, **_kw: None
        self.awaited = awaited_key(request.job_id)
        self.task_name = TASK_NAME
        self.request = request
        self.model_sha256 = model_sha256
        self.retries = settings.max_batch_retries
        self.batch_timeout_s = batch_timeout_s or float(
            settings.visibility_timeout_s + settings.task_time_limit_s)
        self.reconnect_timeout_s = reconnect_timeout_s
        self.poll_interval_s = poll_interval_s
        self.check_interval_s = check_interval_s
        self.report = report
        self.sent = 0
        self._pending: dict[str, _Pending] = {}
        self._next_check = 0.0
        self._last_progress = time.monotonic()
        self._next_stall_report = 0.0
        self._started = time.monotonic()
        self._paragraphs_done = 0
        #: delivery tags of unacknowledged copies already re-sent for (they stay until the visibility timeout)
        self._handled_tags: set[str] = set()
        #: share of the job done (0..1) or None when unknown; set by the CLI from its progress meter
        self.fraction_done: Callable[[], float | None] | None = None

    # -- sending ------------------------------------------------------------------------------
    def _send(self, batch: Batch, attempts: int) -> None:
        from deposium.worker.celery_app import AWAITED_HEADER
        from deposium.worker.wire import EmbedRequest

        req = EmbedRequest(job_id=self.request.job_id, batch_id=batch.id, paragraphs=batch.texts,
                           task=self.request.task, dim=self.request.dim, dtype=self.request.dtype)

        def send() -> Any:
            # awaited before it can possibly run; the TTL only matters if this producer dies for good
            pipe = self.app.backend.client.pipeline()
            pipe.sadd(self.awaited, batch.id)
            if self.settings.result_expires_s > 0:  # 0: results never expire, neither does this
                pipe.expire(self.awaited, int(self.settings.result_expires_s))
            pipe.execute()
            return self.app.send_task(self.task_name, kwargs=req.to_wire(), task_id=req.task_id,
                                      queue=self.settings.queue, headers={AWAITED_HEADER: 1})

        result = self._retrying(send)
        self.sent += 1
        self._pending[batch.id] = _Pending(batch, result, attempts, time.monotonic() + self.batch_timeout_s)

    def submit(self, batch: Batch) -> None:
        if not self._pending:  # waiting starts now, not when the last batch finished
            self._last_progress = time.monotonic()
        self._send(batch, 1)

    def in_flight(self) -> int:
        return len(self._pending)

    # -- receiving ----------------------------------------------------------------------------
    def _retrying(self, fn: Any) -> Any:
        """Run ``fn``; on a Redis/broker connection error, back off and retry (bounded)."""
        from kombu.exceptions import OperationalError
        from redis.exceptions import ConnectionError as RedisConnectionError
        from redis.exceptions import TimeoutError as RedisTimeoutError

        give_up = time.monotonic() + self.reconnect_timeout_s
        delay = 0.1
        while True:
            try:
                return fn()
            except (RedisConnectionError, RedisTimeoutError, OperationalError, ConnectionError) as exc:
                if time.monotonic() > give_up:
                    raise JobStopped(
                        f"lost Redis at {mask_url(self.settings.redis_url)} for over "
                        f"{self.reconnect_timeout_s:.0f}s ({exc}); the job can be resumed") from None
                time.sleep(delay)
                delay = min(delay * 2, 2.0)

    def _poll_one(self, p: _Pending) -> Outcome | None:
        from deposium.worker.wire import EmbedResponse, WireError

        state = self._retrying(lambda: p.result.state)
        failure: str | None = None
        outcome: Outcome | None = None
        if state == "SUCCESS":
            payload = self._retrying(lambda: p.result.result)
            try:
                resp = EmbedResponse.from_wire(payload)
            except WireError as exc:
                failure = f"malformed result: {exc}"
            else:
                if resp.model_sha256 != self.model_sha256:
                    failure = (f"worker runs model {resp.model_sha256[:12]}, this job uses "
                               f"{self.model_sha256[:12]}")
                elif resp.vectors.shape[0] != len(p.batch.texts):
                    failure = (f"worker returned {resp.vectors.shape[0]} vectors for "
                               f"{len(p.batch.texts)} texts")
                else:
                    outcome = Outcome(p.batch, resp.vectors, list(resp.token_counts), list(resp.truncated),
                                      list(resp.errors), attempts=p.attempts)
        elif state == "FAILURE":
            exc = self._retrying(lambda: p.result.result)
            failure = f"{type(exc).__name__}: {exc}" if isinstance(exc, BaseException) else str(exc)
        elif time.monotonic() > p.deadline:
            failure = f"no result within {self.batch_timeout_s:.0f}s"
        else:
            return None
        # WorkerLostError: the worker already retried the batch max_batch_retries times after its
        # process died (deposium.worker.celery_app); sending it again would multiply the crashes.
        final = outcome is not None or p.attempts > self.retries or str(failure).startswith(
            ("rejected", "EmbedRequestError", "WireError", "WorkerLostError"))
        if final:  # first no longer awaited, then deleted: a late duplicate then stores nothing
            self._retrying(lambda: self.app.backend.client.srem(self.awaited, p.batch.id))
        if state in {"SUCCESS", "FAILURE"}:
            self._retrying(p.result.forget)
        if final:
            return outcome or Outcome(p.batch, failure=failure, attempts=p.attempts)
        self._send(p.batch, p.attempts + 1)
        return None

    def _finished_ids(self) -> set[str]:
        """Batches in flight whose result key exists: one MGET for all of them.

        Why not ask each ``AsyncResult`` for its state: that is one round trip and one trip
        through Celery's result machinery per batch in flight per poll, and the polling loop was
        the producer's largest CPU cost (docs/benchmarks.md, producer cost).
        """
        backend = self.app.backend
        ids = list(self._pending)
        keys = [backend.get_key_for_task(self._task_id(self._pending[b])) for b in ids]
        values = self._retrying(lambda: backend.client.mget(keys)) if keys else []
        return {b for b, v in zip(ids, values, strict=True) if v is not None}

    def completed(self, block: bool) -> list[Outcome]:
        interval = self.poll_interval_s
        while True:
            done: list[Outcome] = []
            finished = self._finished_ids()
            now = time.monotonic()
            for batch_id, p in list(self._pending.items()):
                if batch_id not in finished and now <= p.deadline:
                    continue
                outcome = self._poll_one(p)
                if outcome is not None:
                    del self._pending[batch_id]
                    done.append(outcome)
            now = time.monotonic()
            self._paragraphs_done += sum(len(o.batch.rows) for o in done)
            if done:
                self._last_progress = now
                self._next_stall_report = 0.0
            elif self._pending and now >= self._next_check:
                self._next_check = now + self.check_interval_s
                done = self._watch(now)
            if done or not block or not self._pending:
                return done
            time.sleep(interval)
            # nothing finished: look again less often, up to POLL_BACKOFF_MAX_S (a batch takes longer)
            interval = min(interval * 2, max(self.poll_interval_s, POLL_BACKOFF_MAX_S))

    # -- watching what Redis holds for the batches in flight ------------------------------------
    def _watch(self, now: float) -> list[Outcome]:
        """Re-send batches Redis or a lost replica took with it; report (or stop) a stalled job."""
        from deposium.worker.celery_app import held_key

        pending = list(self._pending.values())

        def read() -> tuple[set[bytes], list[bytes | None]]:
            pipe = self.app.backend.client.pipeline(transaction=False)
            pipe.smembers(self.awaited)
            pipe.mget([held_key(self._task_id(p)) for p in pending])
            awaited, holders = pipe.execute()
            return set(awaited), list(holders)

        awaited, holders = self._retrying(read)
        gone = [p for p in pending if p.batch.id.encode() not in awaited]
        gone_ids = {p.batch.id for p in gone}
        if gone:
            self.report(f"Redis lost {len(gone)} queued batches (restarted without persistence?); re-sending")
            for p in gone:
                self._send(p.batch, p.attempts)
        done: list[Outcome] = []
        orphans: Counter[str] = Counter()
        for p, holder in zip(pending, holders, strict=True):
            if p.batch.id in gone_ids:
                continue
            if holder is not None:
                p.holder = holder.decode(errors="replace")
            elif p.holder is not None and self._retrying(lambda p=p: p.result.state) not in {"SUCCESS", "FAILURE"}:
                orphans[p.holder] += 1
                outcome = self._resend_or_fail(p, f"its worker {p.holder} was lost")
                if outcome is not None:
                    done.append(outcome)
        for node, n in orphans.items():
            self.report(f"worker {node} stopped answering (no heartbeat for {self.settings.hold_ttl_s}s) "
                        f"holding {n} batches; re-sending them")
        ttl = self.settings.hold_ttl_s
        unclaimed = [p for p, holder in zip(pending, holders, strict=True)
                     if p.batch.id not in gone_ids and holder is None and p.holder is None
                     and now - p.sent_at > ttl and now >= p.next_locate and self._pending.get(p.batch.id) is p]
        taken = [p for p in unclaimed if self._lost_in_delivery(p, now)]
        for p in taken:
            outcome = self._resend_or_fail(p, "the worker that took it was lost")
            if outcome is not None:
                done.append(outcome)
        if taken:
            self.report(f"{len(taken)} batches taken by a worker that is gone (claimed by no live worker for "
                        f"{ttl}s); re-sending them")
        self._publish_progress(now)
        if not done:
            self._check_stall(now)
        return done

    def _lost_in_delivery(self, p: _Pending, now: float) -> bool:
        """Whether ``p``, claimed by no live worker for a hold TTL, was taken by a worker that is gone.

        Why this besides holder keys: a worker killed just after taking a message from the queue,
        before it could claim it, leaves the message in the transport's unacknowledged hash (or, in
        the instant between the two, nowhere at all) with no key to expire. A batch still queued
        is merely waiting; one delivered over a TTL ago and still unclaimed, or found nowhere on two
        checks in a row, is lost.
        """
        where = self._retrying(lambda: self.app.backend.client.eval(
            LOCATE_SCRIPT, 3, self.settings.queue, UNACKED_KEY, UNACKED_INDEX_KEY, self._task_id(p)))
        status = where[0].decode() if isinstance(where[0], bytes) else str(where[0])
        if status == "queued":
            p.missing_since = None
            p.next_locate = now + self.settings.hold_ttl_s
            return False
        copies = [(tag.decode(), float(t)) for tag, t in zip(where[1::2], where[2::2], strict=True)]
        fresh = [(tag, t) for tag, t in copies if tag not in self._handled_tags]
        if fresh:
            p.missing_since = None
            if any(time.time() - t <= self.settings.hold_ttl_s for _, t in fresh):
                return False  # just delivered: its claim is on its way
        elif p.missing_since is None or now - p.missing_since < self.check_interval_s:
            p.missing_since = p.missing_since or now
            return False
        if self._retrying(lambda: p.result.state) in {"SUCCESS", "FAILURE"}:
            return False
        self._handled_tags.update(tag for tag, _ in fresh)
        return True

    def _publish_progress(self, now: float) -> None:
        """The job's progress as a Redis hash an autoscaler can read through any worker's exporter
        (``deposium.worker.metrics``): batches and paragraphs queued or held, done, ETA. It expires
        soon after this producer stops refreshing it, and is deleted when the job ends."""
        from deposium.worker.celery_app import progress_key

        queued = [p for p in self._pending.values() if p.holder is None]
        fraction = self.fraction_done() if self.fraction_done is not None else None
        elapsed = now - self._started
        eta = elapsed * (1 - fraction) / fraction if fraction and 0 < fraction <= 1 else -1.0
        total = round(self._paragraphs_done / fraction) if fraction and fraction > 0 else 0
        fields = {"queue": self.settings.queue, "batches_in_flight": len(self._pending),
                  "batches_queued": len(queued), "paragraphs_queued": sum(len(p.batch.rows) for p in queued),
                  "batches_held": len(self._pending) - len(queued), "paragraphs_done": self._paragraphs_done,
                  "paragraphs_total": total, "eta_seconds": round(eta, 1), "updated": time.time()}

        def write() -> None:
            pipe = self.app.backend.client.pipeline(transaction=False)
            pipe.hset(progress_key(self.request.job_id), mapping=fields)
            pipe.expire(progress_key(self.request.job_id), max(30, int(10 * self.check_interval_s)))
            pipe.execute()

        self._retrying(write)

    def _task_id(self, p: _Pending) -> str:
        from deposium.worker.wire import task_id

        return task_id(self.request.job_id, p.batch.id)

    def _resend_or_fail(self, p: _Pending, reason: str) -> Outcome | None:
        """Send ``p`` again as a new attempt, or return it failed once its attempts are used up."""
        if p.attempts > self.retries:
            self._retrying(lambda: self.app.backend.client.srem(self.awaited, p.batch.id))
            del self._pending[p.batch.id]
            return Outcome(p.batch, failure=reason, attempts=p.attempts)
        self._send(p.batch, p.attempts + 1)
        return None

    def workers_online(self) -> int:
        """Workers whose heartbeat says they consume this job's queue (``deposium.worker.heartbeat``)."""
        from deposium.worker.celery_app import worker_key

        pattern = worker_key(self.settings.queue, "*")
        return self._retrying(lambda: sum(1 for _ in self.app.backend.client.scan_iter(pattern, count=1000)))

    def _check_stall(self, now: float) -> None:
        idle = now - self._last_progress
        wait = self.settings.wait_for_workers_s
        report_due = idle >= self.settings.stall_report_s and now >= self._next_stall_report
        if not report_due and not (wait and idle >= wait):
            return
        workers = self.workers_online()
        where = f"queue '{self.settings.queue}' at {mask_url(self.settings.redis_url)}"
        if wait and idle >= wait and workers == 0:
            raise JobStopped(f"no batch finished for {idle:.0f}s and no worker is online on {where} "
                             f"(--wait-for-workers {wait}); start workers, then re-run the same command "
                             "to resume")
        if not report_due:
            return
        self._next_stall_report = now + 10 * self.settings.stall_report_s
        queued = self._retrying(lambda: self.app.backend.client.llen(self.settings.queue))
        held = sum(1 for p in self._pending.values() if p.holder is not None)
        hint = ("; start workers (deposium-worker) with this REDIS_URL and DEPOSIUM_QUEUE"
                if workers == 0 else "")
        self.report(f"no batch finished for {idle:.0f}s: {workers} workers online on {where}, "
                    f"{queued} batches queued, {held} of this job's held by workers; waiting{hint}")

    def close(self) -> None:
        """End of the run: the job's progress hash goes (queue depth gauges must not count it)."""
        from deposium.worker.celery_app import progress_key

        self._pending.clear()
        try:
            self.app.backend.client.delete(progress_key(self.request.job_id))
        except Exception:  # noqa: BLE001 - it expires by itself within a minute
            pass


def check_redis(settings: Settings) -> None:
    """Fail fast with one line when Redis is unreachable (bounded retry per settings)."""
    import redis

    url = settings.redis_url or ""
    give_up = time.monotonic() + settings.redis_connect_timeout_s
    while True:
        try:
            client = redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=5)
            client.ping()
            client.close()
            return
        except (redis.exceptions.RedisError, OSError, ValueError) as exc:
            if time.monotonic() >= give_up:
                raise BackendError(f"cannot reach Redis at {mask_url(url)}: {exc}") from None
            time.sleep(0.5)
