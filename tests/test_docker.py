"""The Docker images: built from this checkout, run against a test-owned Redis.

Why opt-in (``pytest -m docker``): the first build installs torch in the convert stage and
converts the model, minutes on a small CPU; the default suite (.ci/run) must stay short and must
not depend on a Docker daemon. Selected but without a daemon, the tests skip and say why, loudly.

What is checked is what the deployment promises (issue 6): the runtime image holds no torch,
transformers, optimum or onnx, no compiler and no pip; it runs as a non-root user; its
entrypoint is deposium-worker; its HEALTHCHECK turns healthy by pinging the worker through the
broker; concurrency follows the container's CPU quota; embedding works end to end and the Redis
password is masked in the container log. Sizes and build time are printed for the report.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from tests.redis_proc import RedisServer, free_port
from tests.test_metrics import BATCHES, client_app, http_get, scrape, send_batches, wait_until

pytestmark = [pytest.mark.docker, pytest.mark.timeout(3600)]

ROOT = Path(__file__).resolve().parent.parent
TAG = "deposium-worker:pytest"
CONVERT_TAG = "deposium-worker:pytest-convert"
FLOWER_TAG = "deposium-flower:pytest"
#: Base images tried in order when none is given: the default, then the local debootstrap base
#: that docs/deploy.md builds on hosts without Docker Hub.
BASE_CANDIDATES = ("python:3.11-slim", "local/bookworm-python")


def _loud_skip(reason: str) -> None:
    banner = f"DOCKER TESTS SKIPPED: {reason}"
    print("\n" + "!" * len(banner) + "\n" + banner + "\n" + "!" * len(banner))
    pytest.skip(banner)


@pytest.fixture(scope="module")
def docker(request: pytest.FixtureRequest) -> dict[str, str]:
    """The docker client, build environment and base image, or a loud skip saying why not."""
    if "docker" not in (request.config.getoption("markexpr") or ""):
        _loud_skip("opt-in; run `pytest -m docker` (needs a Docker daemon, builds the image: minutes)")
    # Debian's 20.10 client has BuildKit built in; a newer client without buildx needs the
    # legacy builder. Prefer the former when both are installed.
    client = "/usr/bin/docker" if Path("/usr/bin/docker").exists() else shutil.which("docker")
    if client is None:
        _loud_skip("no docker client on PATH (Debian: apt-get install docker.io)")
    info = subprocess.run([client, "info", "--format", "{{.ServerVersion}}"], capture_output=True, text=True)
    if info.returncode != 0:
        _loud_skip(f"no Docker daemon answers ({info.stderr.strip()[:200]}); start dockerd (docs/deploy.md)")
    version = subprocess.run([client, "version", "--format", "{{.Client.Version}}"],
                             capture_output=True, text=True).stdout.strip()
    buildx = subprocess.run([client, "buildx", "version"], capture_output=True).returncode == 0
    env = dict(os.environ, DOCKER_BUILDKIT="1" if (buildx or version.startswith("20.")) else "0")
    base = os.environ.get("DEPOSIUM_DOCKER_BASE_IMAGE")
    if not base:
        for candidate in BASE_CANDIDATES:
            if subprocess.run([client, "image", "inspect", candidate], capture_output=True).returncode == 0:
                base = candidate
                break
        else:
            base = BASE_CANDIDATES[0]  # let the build pull it
    return {"client": client, "base": base, "buildkit": env["DOCKER_BUILDKIT"], "env": env}


def _run(docker: dict, *args: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([docker["client"], *args], env=docker["env"], capture_output=True, text=True,
                          check=check, **kw)


def _build(docker: dict, tag: str, *extra: str) -> float:
    began = time.monotonic()
    # e.g. DEPOSIUM_DOCKER_BUILD_ARGS="ARTIFACT_FROM=artifact-download ARTIFACT_URL=… ARTIFACT_SHA256=…"
    args = [a for kv in os.environ.get("DEPOSIUM_DOCKER_BUILD_ARGS", "").split() for a in ("--build-arg", kv)]
    proc = subprocess.run(
        [docker["client"], "build", "--network", "host", "--build-arg", f"BASE_IMAGE={docker['base']}",
         *args, "-t", tag, *extra, str(ROOT)],
        env=docker["env"], capture_output=True, text=True,
    )
    if proc.returncode != 0:
        pytest.fail(f"docker build {' '.join(extra)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return time.monotonic() - began


def _size_mb(docker: dict, tag: str) -> float:
    return int(_run(docker, "image", "inspect", tag, "--format", "{{.Size}}").stdout) / 1e6


@pytest.fixture(scope="module")
def image(docker: dict) -> str:
    seconds = _build(docker, TAG)
    _build(docker, CONVERT_TAG, "--target", "artifact")  # cached layers: only for the size report
    runtime, convert = _size_mb(docker, TAG), _size_mb(docker, CONVERT_TAG)
    print(f"\n[docker report] base {docker['base']}, BuildKit={docker['buildkit']}: build {seconds:.0f} s "
          f"(cached layers count); runtime image {runtime:.0f} MB, convert (build) stage {convert:.0f} MB")
    return TAG


def test_runtime_image_contents(docker: dict, image: str):
    """Torch-free, compiler-free, pip-free, non-root, deposium-worker entrypoint, healthcheck."""
    config = json.loads(_run(docker, "image", "inspect", image).stdout)[0]["Config"]
    assert config["User"] == "deposium"
    assert config["Entrypoint"] == ["deposium-worker"]
    assert "inspect ping" in " ".join(config["Healthcheck"]["Test"])
    probe = (
        "import importlib.util as u, json, os, shutil;"
        "print(json.dumps({'modules': [m for m in ('torch', 'transformers', 'optimum', 'onnx',"
        " 'sentence_transformers', 'pip', 'deposium.convert', 'deposium.bench') if u.find_spec(m)],"
        " 'tools': [t for t in ('gcc', 'cc', 'g++', 'make', 'deposium-convert') if shutil.which(t)],"
        " 'uid': os.getuid(), 'artifact': sorted(os.listdir(os.environ['DEPOSIUM_ARTIFACT'])),"
        " 'kernels': bool(u.find_spec('deposium.worker.kernels._rowq')),"
        " 'recipe': json.load(open(os.environ['DEPOSIUM_ARTIFACT'] + '/manifest.json'))['quantization']['recipe']}))"
    )
    out = json.loads(_run(docker, "run", "--rm", "--network", "none", "--entrypoint", "python3", image,
                          "-c", probe).stdout)
    assert out["modules"] == [], out
    assert out["tools"] == [], out
    assert out["uid"] != 0
    assert {"model.onnx", "tokenizer.json", "manifest.json"} <= set(out["artifact"])
    # the build stages compiled the fused kernels (gcc there, none here) and convert shipped int8-fused
    assert out["kernels"] and out["recipe"] == "int8-fused", out


def test_image_embeds_against_test_redis(docker: dict, image: str, redis_server: RedisServer):
    """The container consumes batches from a Redis it does not own, and turns healthy."""
    password = f"pw-{uuid.uuid4().hex[:12]}"
    redis_server.client().config_set("requirepass", password)
    url = f"redis://:{password}@127.0.0.1:{redis_server.port}/0"
    queue = f"docker-{uuid.uuid4().hex[:8]}"
    port = free_port()
    name = f"deposium-pytest-{uuid.uuid4().hex[:8]}"
    _run(docker, "run", "-d", "--name", name, "--network", "host", "--cpus", "1",
         "--health-interval", "5s", "--health-start-period", "5s",
         "-e", f"REDIS_URL={url}", "-e", f"DEPOSIUM_QUEUE={queue}", "-e", f"DEPOSIUM_METRICS_PORT={port}",
         image)
    try:
        def logs() -> str:
            p = _run(docker, "logs", name, check=False)
            return p.stdout + p.stderr

        def healthy() -> bool:
            state = json.loads(_run(docker, "inspect", name).stdout)[0]["State"]
            if state["Status"] != "running":
                pytest.fail(f"container stopped ({state['Status']}):\n{logs()[-4000:]}")
            return state.get("Health", {}).get("Status") == "healthy"

        wait_until(healthy, "the container's HEALTHCHECK (celery inspect ping) to pass", timeout=300)
        app = client_app(url, queue)
        results = send_batches(app, "job-docker", BATCHES)
        for r in results:
            vectors = np.frombuffer(r["vectors"], dtype="<f4").reshape(len(r["errors"]), r["dim"])
            ok = [i for i, e in enumerate(r["errors"]) if e is None]
            assert np.allclose(np.linalg.norm(vectors[ok], axis=1), 1.0, atol=1e-3)
        assert results[0]["dim"] == 384
        first = np.frombuffer(results[0]["vectors"], dtype="<f4").reshape(2, 384)
        assert results[1]["errors"][0] is not None and results[1]["errors"][1] is None

        # Exporter of the replica, reached on the host network.
        node = f"celery@{_hostname(docker, name)}"
        done = ("deposium_batches_total", (("outcome", "success"), ("worker", node)))
        samples = wait_until(lambda: (s := scrape(port)).get(done) == len(BATCHES) and s,
                             "the container's exporter to count the batches", timeout=60)
        assert sum(v for (n, _), v in samples.items() if n == "deposium_paragraphs_total") == 6
        assert http_get(f"http://127.0.0.1:{port}/healthz")[0] == 200

        text = logs()
        # --cpus 1: one worker process, whatever the host has.
        assert "concurrency 1" in text, text[-3000:]
        assert password not in text
        assert "redis://:***@127.0.0.1" in text or "redis://:**@127.0.0.1" in text
        assert float(first[0] @ first[1]) < 0.99  # two different paragraphs, two different vectors
    finally:
        _run(docker, "rm", "-f", name, check=False)


def _hostname(docker: dict, name: str) -> str:
    probe = "import socket; print(socket.gethostname())"
    return _run(docker, "exec", name, "python3", "-c", probe).stdout.strip()


def test_flower_image_refuses_to_start_without_auth(docker: dict):
    """No credentials in the environment: Flower must not start at all (exit 64, clear message)."""
    _build(docker, FLOWER_TAG, "-f", str(ROOT / "docker" / "flower.Dockerfile"))
    proc = _run(docker, "run", "--rm", "--network", "none", "-e", "REDIS_URL=redis://127.0.0.1:1/0",
                FLOWER_TAG, check=False)
    assert proc.returncode == 64, (proc.stdout, proc.stderr)
    assert "FLOWER_BASIC_AUTH" in proc.stderr
