"""Flower against the test-owned Redis and a real worker: the job's tasks are visible, behind auth.

Why: operators watch the fleet in Flower (docs/monitoring.md). That only works if the worker
sends task events (``worker_send_task_events``) and Flower can read our app's configuration;
and Flower must not be readable without credentials. Flower 2.2.0 leaves ``/metrics`` and
``/healthcheck`` open even with ``--basic-auth``; that is asserted too, because the docs (and
compose, which binds Flower to 127.0.0.1) depend on it being known.

Also checked on the way: the Redis password in REDIS_URL reaches neither the worker's nor
Flower's log.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from deposium.worker.wire import TASK_NAME
from tests.redis_proc import RedisServer, free_port
from tests.test_metrics import (
    BATCHES,
    client_app,
    http_get,
    send_batches,
    wait_until,
    worker_env,
    worker_process,
)

pytestmark = pytest.mark.slow

USER, PASSWORD = "ops", f"pw-{uuid.uuid4().hex[:10]}"
REDIS_PASSWORD = f"redis-{uuid.uuid4().hex[:10]}"


def test_flower_shows_job_tasks_with_auth(redis_server: RedisServer, minilm_artifact: Path, tmp_path: Path):
    redis_server.client().config_set("requirepass", REDIS_PASSWORD)
    url = f"redis://:{REDIS_PASSWORD}@127.0.0.1:{redis_server.port}/0"
    queue = f"flower-{uuid.uuid4().hex[:8]}"
    node = f"flower-{uuid.uuid4().hex[:6]}@testhost"
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    auth = (USER, PASSWORD)

    # Flower first, so it sees every event of the job. Credentials come from the environment
    # (FLOWER_BASIC_AUTH), as in compose and on Railway, never from the command line.
    flower_env = worker_env(url, minilm_artifact, queue, FLOWER_BASIC_AUTH=f"{USER}:{PASSWORD}")
    flower_log = tmp_path / "flower.log"
    cmd = [sys.executable, "-m", "celery", "-A", "deposium.worker.celery_app", "flower",
           "--address=127.0.0.1", f"--port={port}"]
    with flower_log.open("wb") as out:
        flower = subprocess.Popen(cmd, env=flower_env, stdout=out, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    worker_log = tmp_path / "worker.log"
    try:
        wait_until(lambda: http_get(f"{base}/healthcheck")[0] == 200, "flower", flower, flower_log)
        env = worker_env(url, minilm_artifact, queue)
        with worker_process(env, node, worker_log, "--concurrency=1") as proc:
            app = client_app(url, queue)
            job = f"job-{uuid.uuid4().hex[:8]}"
            results = send_batches(app, job, BATCHES)
            assert [r["batch_id"] for r in results] == [f"b{i:04d}" for i in range(len(BATCHES))]
            expected = {f"{job}:b{i:04d}" for i in range(len(BATCHES))}

            def job_tasks():
                status, body = http_get(f"{base}/api/tasks?limit=1000", auth)
                assert status == 200, body[:300]
                tasks = {k: v for k, v in json.loads(body).items() if k.startswith(f"{job}:")}
                done = {k for k, v in tasks.items() if v.get("state") == "SUCCESS"}
                return tasks if done == expected else None

            tasks = wait_until(job_tasks, "flower to see the job's tasks succeed", proc, flower_log,
                               timeout=120)
            assert set(tasks) == expected
            assert {t["name"] for t in tasks.values()} == {TASK_NAME}
            assert {t["worker"] for t in tasks.values()} == {node}

            status, body = http_get(f"{base}/api/workers?refresh=1", auth)
            assert status == 200 and node in json.loads(body), body[:300]

            # Task counts through Flower's Prometheus endpoint.
            status, body = http_get(f"{base}/metrics", auth)
            assert status == 200
            succeeded = {
                s.labels["task"]: s.value
                for f in text_string_to_metric_families(body.decode())
                for s in f.samples
                if s.name == "flower_events_total" and s.labels.get("type") == "task-succeeded"
                and s.labels.get("worker") == node
            }
            assert succeeded == {TASK_NAME: len(BATCHES)}

            # Without (or with wrong) credentials: 401 on the UI and the API.
            for path in ("/", "/api/tasks", "/api/workers", f"/api/task/info/{job}:b0000", "/tasks"):
                assert http_get(f"{base}{path}")[0] == 401, path
                assert http_get(f"{base}{path}", (USER, "wrong"))[0] == 401, path
            # Known Flower behaviour the deployment docs rely on: these stay open.
            assert http_get(f"{base}/metrics")[0] == 200
            assert http_get(f"{base}/healthcheck")[0] == 200
    finally:
        if flower.poll() is None:
            os.killpg(flower.pid, signal.SIGTERM)
            try:
                flower.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(flower.pid, signal.SIGKILL)
                flower.wait()

    for log in (worker_log, flower_log):
        text = log.read_text(errors="replace")
        assert REDIS_PASSWORD not in text, f"Redis password leaked into {log.name}"
        assert PASSWORD not in text, f"Flower password leaked into {log.name}"
    assert "Connected to redis://:**@" in worker_log.read_text(errors="replace")
