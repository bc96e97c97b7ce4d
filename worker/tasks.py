"""The ``deposium.embed_batch`` task and the per-process Embedder it uses.

Why the prefork parent loads the model (``DEPOSIUM_SHARE_MODEL``, on by default) before it
forks its children: every child then shares the session's weights copy-on-write instead of
holding a private copy (EmbeddingGemma int8: ~430 MB private per child without sharing, ~150
MB with it; docs/benchmarks.md). That is safe here because the session is single-threaded with
sequential execution: ONNX Runtime starts no thread pool whose threads ``fork`` would lose,
and the parent never runs the session after forking, so nothing it shares is written. Loading
happens in ``celeryd_after_setup`` (logging set up, pool not started yet), not in
``worker_process_init``, which would race Celery's child start-up timeout. Without sharing,
each child loads lazily on its first task.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from typing import TYPE_CHECKING, Any, NoReturn

from celery.exceptions import Ignore
from celery.signals import celeryd_after_setup

from deposium.worker.celery_app import AWAITED_HEADER, app, awaited_key
from deposium.worker.config import TEST_FAULT, Settings, load_settings
from deposium.worker.wire import TASK_NAME, EmbedRequest, EmbedResponse, WireError, task_id

if TYPE_CHECKING:
    from deposium.worker.embedder import Embedder

log = logging.getLogger(__name__)

_settings: Settings | None = None
_embedder: Embedder | None = None
_embedder_pid: int | None = None
#: The Embedder was loaded by the prefork parent for its children to share (see module doc).
_shared = False


def configure(settings: Settings) -> None:
    """Use ``settings`` (e.g. with CLI overrides) instead of the environment; call before forking."""
    global _settings, _embedder, _embedder_pid, _shared
    _settings = settings
    _embedder = _embedder_pid = None
    _shared = False


def share_model_with_children(**_: Any) -> None:
    """``celeryd_after_setup`` (prefork parent, logging set up, pool not started): load the model to share."""
    global _shared
    settings = _settings or load_settings()
    if not settings.share_model:
        return
    try:
        get_embedder()
    except Exception as exc:  # noqa: BLE001 - each child retries and reports it per task
        log.error("could not load the model in the main process (children will try): %s", exc)
        return
    _shared = True
    log.info("main process %d loaded the model; pool children share it (DEPOSIUM_SHARE_MODEL=1)",
             os.getpid())


celeryd_after_setup.connect(share_model_with_children, weak=False)


def get_embedder() -> Embedder:
    """This process's Embedder: the one the prefork parent shared, else created on first use
    (an instance inherited across ``fork`` is reused only when the parent loaded it to share)."""
    global _embedder, _embedder_pid
    if _embedder is not None and _shared and _embedder_pid != os.getpid():
        log.info("process %d uses the model shared by the main process %d", os.getpid(), _embedder_pid)
        _embedder_pid = os.getpid()
    if _embedder is None or _embedder_pid != os.getpid():
        from deposium.worker.embedder import Embedder  # onnxruntime is imported in the child only

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
    written, deposium.worker.celery_app) is skipped before and after embedding, leaving no result behind.
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
