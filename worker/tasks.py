"""The ``deposium.embed_batch`` task and the per-process Embedder it uses.

Why the Embedder is created lazily, in the child, on the first task: an ONNX Runtime
session created in the prefork parent would be shared copy-on-write by every child
(with thread pools and allocator state that do not survive ``fork``), and loading a
large model inside ``worker_process_init`` races Celery's child start-up timeout. The
first batch of each child pays the load (about a second for MiniLM) instead.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from typing import TYPE_CHECKING, Any, NoReturn

from celery.exceptions import Ignore

from worker.celery_app import AWAITED_HEADER, app, awaited_key
from worker.config import TEST_FAULT, Settings, load_settings
from worker.wire import TASK_NAME, EmbedRequest, EmbedResponse, WireError, task_id

if TYPE_CHECKING:
    from worker.embedder import Embedder

log = logging.getLogger(__name__)

_settings: Settings | None = None
_embedder: Embedder | None = None
_embedder_pid: int | None = None


def configure(settings: Settings) -> None:
    """Use ``settings`` (e.g. with CLI overrides) instead of the environment; call before forking."""
    global _settings, _embedder, _embedder_pid
    _settings = settings
    _embedder = _embedder_pid = None


def get_embedder() -> Embedder:
    """This process's Embedder, created on first use (and again if we find ourselves in a new
    process: an instance inherited across ``fork`` is never reused)."""
    global _embedder, _embedder_pid
    if _embedder is None or _embedder_pid != os.getpid():
        from worker.embedder import Embedder  # onnxruntime is imported in the child only

        settings = _settings or load_settings()
        _embedder = Embedder(settings.artifact_dir, settings=settings)
        _embedder_pid = os.getpid()
        log.info(
            "process %d loaded %s (dim %d, sha256 %s)",
            _embedder_pid,
            _embedder.manifest.source,
            _embedder.manifest.dim,
            _embedder.manifest.model_sha256[:12],
        )
    return _embedder


def run_request(embedder: Embedder, payload: dict[str, Any]) -> dict[str, Any]:
    """Validate a (possibly forged) request, embed it, and build the wire result.

    Deterministic for a given artifact and request, so a redelivered batch (same task id
    ``job_id:batch_id``) overwrites its result with identical content.
    """
    request = EmbedRequest.from_wire(payload)
    result = embedder.embed(request.paragraphs, task=request.task, dim=request.dim, dtype=request.dtype)
    return EmbedResponse(
        job_id=request.job_id,
        batch_id=request.batch_id,
        model_sha256=embedder.manifest.model_sha256,
        vectors=result.vectors,
        token_counts=result.token_counts,
        truncated=result.truncated,
        errors=result.errors,
    ).to_wire()


def inject_test_fault(spec: str, task_id: str, paragraphs: object) -> None:
    """Tests only (``DEPOSIUM_TEST_FAULT``, off by default): misbehave on a marked batch, the way
    a poison batch or a slow batch would, so fault tests need no mocks. Logs before acting so a
    test can tell which process holds the batch."""
    m = TEST_FAULT.fullmatch(spec)
    if m is None or not isinstance(paragraphs, list):
        return
    if not any(isinstance(p, str) and m["marker"] in p for p in paragraphs):
        return
    log.warning("test fault %s in batch %s, process %d", m["action"], task_id, os.getpid())
    if m["action"] == "crash":
        os.kill(os.getpid(), signal.SIGKILL)
    elif m["action"] == "hang":
        while True:  # until the soft time limit raises in here, or the hard one kills the process
            time.sleep(1)
    else:
        time.sleep(float(m["seconds"]))


def is_awaited(task: Any, job_id: str, batch_id: str) -> bool:
    """Whether the producer still awaits this batch: it is in the job's set of awaited batches."""
    try:
        return bool(task.backend.client.sismember(awaited_key(job_id), batch_id))
    except Exception as exc:  # noqa: BLE001 - when in doubt, embed: a skipped batch someone awaits is worse
        log.warning("cannot tell whether batch %s:%s is still awaited (%s); embedding it", job_id, batch_id, exc)
        return True


def skip_unawaited(task: Any, task_id: str) -> NoReturn:
    """End a delivery nobody awaits without storing a result: delete the STARTED state Celery
    stored for it (``task_track_started``) and raise ``Ignore`` (acknowledged, nothing stored)."""
    try:
        task.backend.client.delete(task.backend.get_key_for_task(task_id))
    except Exception as exc:  # noqa: BLE001 - the state expires anyway (result_expires)
        log.warning("could not delete the state of skipped batch %s: %s", task_id, exc)
    log.info("batch %s is no longer awaited (already written, or its job ended): skipped", task_id)
    raise Ignore()


@app.task(name=TASK_NAME, bind=True)
def embed_batch(self: Any, *args: Any, **request: Any) -> dict[str, Any]:
    """Embed one batch. Keyword arguments are the wire request (docs/design.md).

    The task id must be ``job_id:batch_id``: that is what makes a re-sent or redelivered
    batch overwrite one result key instead of producing a second copy. A delivery marked with
    ``AWAITED_HEADER`` whose batch the producer no longer awaits (a duplicate of a batch already
    written, worker.celery_app) is skipped before and after embedding, leaving no result behind.
    """
    if args:
        raise WireError("embed_batch takes keyword arguments only (the wire request)")
    job_id, batch_id = str(request.get("job_id")), str(request.get("batch_id"))
    expected = task_id(job_id, batch_id)
    if self.request.id != expected:
        raise WireError(f"task id {self.request.id!r} must be job_id:batch_id = {expected!r}")
    tracked = bool((self.request.headers or {}).get(AWAITED_HEADER) or getattr(self.request, AWAITED_HEADER, None))
    if tracked and not is_awaited(self, job_id, batch_id):
        skip_unawaited(self, expected)
    embedder = get_embedder()
    try:
        if embedder.settings.test_fault:
            inject_test_fault(embedder.settings.test_fault, expected, request.get("paragraphs"))
        result = run_request(embedder, request)
    except Exception:
        if tracked and not is_awaited(self, job_id, batch_id):
            skip_unawaited(self, expected)
        raise
    if tracked and not is_awaited(self, job_id, batch_id):
        skip_unawaited(self, expected)
    return result
