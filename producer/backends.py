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

import time
from collections import deque
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


class QueueBackend:
    """Celery by task name through ``deposium.worker.celery_app``; results polled from the Redis backend.

    A batch is re-sent (same task id, so its result key is overwritten, never duplicated) when
    the task fails or its deadline passes, at most ``max_batch_retries`` times; then it is
    returned as failed. Redis connection errors while polling are retried until
    ``reconnect_timeout_s`` passes without one success (a Redis restart mid-job).

    Nothing of a batch stays in Redis once its outcome is final: the batch id leaves the job's
    set of awaited batches (``deposium.worker.celery_app.awaited_key``), then its result is deleted; a
    duplicate delivery still queued or running is then skipped by the worker, storing nothing.
    """

    def __init__(self, settings: Settings, request: Request, *, model_sha256: str,
                 batch_timeout_s: float | None = None, reconnect_timeout_s: float = 120.0,
                 poll_interval_s: float = 0.02) -> None:
        if not settings.redis_url:
            raise BackendError("queue mode needs REDIS_URL (or use --local)")
        from deposium.worker.celery_app import awaited_key, create_app
        from deposium.worker.wire import TASK_NAME

        check_redis(settings)
        self.settings = settings
        self.app = create_app(settings)
        self.awaited = awaited_key(request.job_id)
        self.task_name = TASK_NAME
        self.request = request
        self.model_sha256 = model_sha256
        self.retries = settings.max_batch_retries
        self.batch_timeout_s = batch_timeout_s or float(
            settings.visibility_timeout_s + settings.task_time_limit_s)
        self.reconnect_timeout_s = reconnect_timeout_s
        self.poll_interval_s = poll_interval_s
        self.sent = 0
        self._pending: dict[str, _Pending] = {}

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
                    raise BackendError(
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

    def completed(self, block: bool) -> list[Outcome]:
        while True:
            done: list[Outcome] = []
            for batch_id, p in list(self._pending.items()):
                outcome = self._poll_one(p)
                if outcome is not None:
                    del self._pending[batch_id]
                    done.append(outcome)
            if done or not block or not self._pending:
                return done
            time.sleep(self.poll_interval_s)

    def close(self) -> None:
        self._pending.clear()


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
