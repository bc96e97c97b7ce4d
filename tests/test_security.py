"""Security against a real worker whose Redis requires a password: pickle refused, no secret in
any log, size limits enforced by the worker itself.

Why: anyone who can write to the queue reaches the worker, so what the worker accepts is the
security boundary, not what the producer happens to send. Every message here is put on the
queue directly, bypassing the producer's own checks. One worker serves the whole module (its
log is then checked for the Redis password after everything, failures included, was logged).

Covered elsewhere: Flower refuses requests without credentials (test_flower.py); forged
payloads with wrong fields (test_worker_e2e.py, and property-based in test_properties.py).
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest

from deposium.worker.celery_app import create_app
from deposium.worker.config import Settings
from deposium.worker.errors import EmbedRequestError
from deposium.worker.wire import TASK_NAME, EmbedRequest, EmbedResponse
from tests.procs import Worker, clean_env, producer_env, run_submit, write_jsonl
from tests.redis_proc import RedisServer

pytestmark = pytest.mark.slow

PASSWORD = f"pw-{uuid.uuid4().hex}"
QUEUE = "sec"
#: Small worker-side limits (the defaults are 512 paragraphs, 8 MiB per batch, 1 MiB per paragraph).
LIMITS = {"DEPOSIUM_MAX_BATCH_PARAGRAPHS": "16", "DEPOSIUM_MAX_BATCH_BYTES": str(3 * 2**20),
          "DEPOSIUM_MAX_PARAGRAPH_BYTES": str(2**20)}
RESULT_TIMEOUT = 300


class Boom:
    """Pickles into ``os.system("touch <path>")``: harmless proof of code execution if unpickled."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


@pytest.fixture(scope="module")
def secured(tmp_path_factory):
    """redis-server with requirepass + ``deposium-worker`` (the CLI users run, DEBUG logging)."""
    root = tmp_path_factory.mktemp("security")
    server = RedisServer(root / "redis").start()
    server.client().config_set("requirepass", PASSWORD)
    url = f"redis://:{PASSWORD}@127.0.0.1:{server.port}/0"
    yield server, url, root
    server.stop(kill=True)


@pytest.fixture(scope="module")
def worker(secured, minilm_artifact):
    server, url, root = secured
    log = root / "worker.log"
    # the image's entry point (python -m deposium.worker.cli), its output written to the log
    w = Worker(url, minilm_artifact, log, concurrency=1, name="sec", queue=QUEUE, loglevel="DEBUG",
               command="deposium-worker", DEPOSIUM_LOG_LEVEL="DEBUG", **LIMITS)
    try:
        w.start()
        yield w, create_app(Settings(redis_url=url, queue=QUEUE))
    finally:
        w.stop()


def _send(app, request: EmbedRequest, **options):
    return app.send_task(TASK_NAME, kwargs=request.to_wire(), task_id=request.task_id, **options)


def test_pickled_message_is_refused_and_the_worker_keeps_serving(worker, tmp_path: Path):
    w, app = worker
    child = {c.pid for c in w.children()}
    proof = tmp_path / "pickle-executed"
    req = EmbedRequest(job_id="sec", batch_id=f"pickle{uuid.uuid4().hex[:6]}", paragraphs=["x"])
    wire = req.to_wire() | {"paragraphs": [Boom(proof)]}
    app.send_task(TASK_NAME, kwargs=wire, task_id=req.task_id, serializer="pickle")
    # the next batch in the same queue is served: the pickled one before it was dealt with
    ok = EmbedRequest(job_id="sec", batch_id="after", paragraphs=["Still serving after a pickle."])
    out = EmbedResponse.from_wire(_send(app, ok).get(timeout=RESULT_TIMEOUT))
    assert out.vectors.shape[0] == 1 and out.errors == [None]
    assert "Refusing to deserialize untrusted content of type pickle" in w.text()
    assert not proof.exists(), "the pickled payload was executed"
    assert app.AsyncResult(req.task_id).state == "PENDING"  # never run, so no result at all
    assert {c.pid for c in w.children()} == child and w.proc.poll() is None


def test_worker_enforces_batch_and_paragraph_limits_itself(worker):
    """Limits hold for messages that never went through the producer."""
    w, app = worker
    too_many = EmbedRequest(job_id="sec", batch_id="many", paragraphs=[f"paragraph {i}" for i in range(17)])
    with pytest.raises(EmbedRequestError, match="17 paragraphs, more than the limit of 16"):
        _send(app, too_many).get(timeout=RESULT_TIMEOUT)
    mb = "word " * (1536 * 1024 // 5)  # 1.5 MiB paragraphs (MB-sized input)
    too_big = EmbedRequest(job_id="sec", batch_id="bytes", paragraphs=[mb, mb, mb])
    with pytest.raises(EmbedRequestError, match="more than the limit of 3145728"):
        _send(app, too_big).get(timeout=RESULT_TIMEOUT)
    # one over-long paragraph is that paragraph's error; the rest of the batch embeds
    huge = "a" * (2**20 + 1)
    mixed = EmbedRequest(job_id="sec", batch_id="mixed", paragraphs=["fine one", huge, "fine two"])
    out = EmbedResponse.from_wire(_send(app, mixed).get(timeout=RESULT_TIMEOUT))
    assert out.errors[0] is None and out.errors[2] is None
    assert out.errors[1] == f"paragraph has {2**20 + 1} bytes, more than the limit of {2**20}"
    assert not out.vectors[1].any() and out.vectors[0].any() and out.vectors[2].any()
    # the largest paragraph the limit allows is embedded (truncated to the model's window)
    near = "word " * (2**20 // 5 - 1)
    edge = EmbedRequest(job_id="sec", batch_id="edge", paragraphs=[near])
    out = EmbedResponse.from_wire(_send(app, edge).get(timeout=RESULT_TIMEOUT))
    assert out.errors == [None] and out.truncated == [True]
    np.testing.assert_allclose(np.linalg.norm(out.vectors[0]), 1.0, atol=1e-3)
    assert w.proc.poll() is None


def test_no_secret_in_worker_or_producer_output(worker, secured, minilm_artifact, tmp_path: Path):
    """Runs last in this module: the worker's DEBUG log by now holds start-up, every batch above,
    refusals and failures; a producer job with the same URL adds its own output."""
    w, _ = worker
    _, url, _ = secured
    write_jsonl(tmp_path / "in.jsonl", ["A paragraph sent by a producer whose Redis URL holds a password.",
                                        "A second paragraph for the same job."])
    env = producer_env(tmp_path, minilm_artifact, url, DEPOSIUM_QUEUE=QUEUE, **LIMITS)
    rc, summary, err = run_submit(["in.jsonl", "--out", "o.parquet"], env, tmp_path)
    assert rc == 0, err
    assert summary["embedded"] == 2
    log = w.text()
    assert "redis://:***@127.0.0.1" in log  # the start-up line names the broker, masked
    assert "sec:many" in log and "Refusing to deserialize" in log  # failures were logged too
    for where, text in (("worker log", log), ("producer stderr", err), ("producer summary", str(summary))):
        assert PASSWORD not in text, f"Redis password printed in the {where}"


@pytest.mark.parametrize("password", ["change-me-redis", "CHANGE_ME", "changeme"])
def test_worker_refuses_a_placeholder_redis_password(password: str, tmp_path: Path):
    """The example configuration's publicly known passwords never run a worker (or a producer)."""
    from deposium.worker.config import ConfigError, load_settings

    url = f"redis://:{password}@redis:6379/0"
    with pytest.raises(ConfigError, match="placeholder password .* set REDIS_PASSWORD"):
        load_settings({"REDIS_URL": url})
    assert load_settings({"REDIS_URL": "redis://:a-secret-of-my-own@redis:6379/0"}).redis_url
    # the worker's own command: one line on stderr naming the variable, no start-up, the secret not echoed
    r = subprocess.run([sys.executable, "-m", "deposium.worker.cli"], env=clean_env(REDIS_URL=url),
                       capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "REDIS_PASSWORD" in lines[0], r.stderr
    assert password not in r.stderr
