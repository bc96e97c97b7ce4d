"""End to end: a test-owned redis-server, real Celery prefork workers as subprocesses, batches sent
by task name exactly as the producer sends them. No mocks of Redis, Celery or onnxruntime."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import psutil
import pytest

from deposium.worker.artifact import MANIFEST, MODEL_FILE, read_manifest
from deposium.worker.celery_app import create_app
from deposium.worker.cli import EXIT_ARTIFACT, main
from deposium.worker.config import Settings
from deposium.worker.cpu import cpu_features, quantization_warning
from deposium.worker.embedder import Embedder
from deposium.worker.wire import TASK_NAME, EmbedRequest, EmbedResponse, WireError

pytestmark = pytest.mark.slow

VENV_BIN = Path(sys.executable).parent
PARAGRAPHS = [
    "Celery hands each batch to one prefork child.",
    "Un paragraphe en français, avec des accents: é, è, ç.",
    "short",
    "A much longer paragraph that keeps going " * 40,
    "",
    12345,
    "Redis is both the broker and the result backend here.",
]


def clean_env(**extra: str) -> dict[str, str]:
    """The test's environment without any DEPOSIUM_* / REDIS_URL a developer may have exported."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEPOSIUM_") and k != "REDIS_URL"}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    env.update(extra)
    return env


@contextmanager
def running_worker(
    cmd: list[str], env: dict[str, str], log: Path, timeout: float = 120
) -> Iterator[psutil.Process]:
    """Start a worker in its own process group, wait for Celery's "ready", stop it afterwards."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while b" ready." not in log.read_bytes():
            if proc.poll() is not None:
                pytest.fail(f"worker exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"worker not ready after {timeout}s:\n{log.read_text()[-3000:]}")
            time.sleep(0.1)
        yield psutil.Process(proc.pid)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def loaded_onnxruntime(proc: psutil.Process) -> bool:
    """Whether a process has mapped onnxruntime's native library (i.e. imported it)."""
    return "onnxruntime_pybind11_state" in Path(f"/proc/{proc.pid}/maps").read_text()


def threads_added_by_importing_onnxruntime() -> int:
    """Reference: threads a fresh, thread-pinned interpreter gains from ``import onnxruntime``
    alone (a fixed runtime thread, not a session pool)."""
    code = (
        "import psutil\nfrom deposium.worker.threads import pin_single_thread\npin_single_thread()\n"
        "p = psutil.Process(); a = p.num_threads()\nimport onnxruntime, tokenizers, numpy\n"
        "print(p.num_threads() - a)\n"
    )
    return int(
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    )


def send(app, request: EmbedRequest, **options):
    return app.send_task(TASK_NAME, kwargs=request.to_wire(), task_id=request.task_id, **options)


@pytest.mark.parametrize("share", ["1", "0"], ids=["shared-model", "model-per-child"])
def test_celery_worker_concurrency_2_end_to_end(redis_server, minilm_artifact, tmp_path, share):
    settings = Settings(redis_url=redis_server.url, queue="e2e", artifact_dir=minilm_artifact)
    env = clean_env(REDIS_URL=redis_server.url, DEPOSIUM_QUEUE="e2e", DEPOSIUM_ARTIFACT=str(minilm_artifact),
                    DEPOSIUM_SHARE_MODEL=share)
    cmd = [
        str(VENV_BIN / "celery"),
        "-A",
        "deposium.worker.celery_app",
        "worker",
        "--pool=prefork",
        "--concurrency=2",
        "--loglevel=INFO",
        "--hostname=e2e@%h",
    ]
    ort_threads = threads_added_by_importing_onnxruntime()
    local = Embedder(minilm_artifact, settings=Settings())
    app = create_app(settings)
    with running_worker(cmd, env, tmp_path / "worker.log") as parent:
        children = parent.children()
        assert len(children) == 2
        before = {c.pid: c.num_threads() for c in children}
        if share == "1":  # loaded once by the parent before forking; children inherit it
            assert loaded_onnxruntime(parent) and all(loaded_onnxruntime(c) for c in children)
        else:
            assert not any(loaded_onnxruntime(c) for c in children), "session must be created lazily"

        requests = [
            EmbedRequest(job_id="job1", batch_id=f"b{i:07d}", paragraphs=PARAGRAPHS[i:] + PARAGRAPHS[:i])
            for i in range(6)
        ]
        pending = [send(app, r) for r in requests]
        outputs = [EmbedResponse.from_wire(p.get(timeout=120)) for p in pending]

        for request, out in zip(requests, outputs, strict=True):
            expected = local.embed(request.paragraphs)
            assert (out.job_id, out.batch_id) == (request.job_id, request.batch_id)
            assert out.model_sha256 == local.manifest.model_sha256
            np.testing.assert_array_equal(out.vectors, expected.vectors)
            assert out.token_counts == expected.token_counts and out.truncated == expected.truncated
            assert out.errors == expected.errors
            assert sum(e is not None for e in out.errors) == 2

        # No session thread pool: a child that loaded the model itself gained only the thread that
        # `import onnxruntime` starts; one sharing the parent's session gained none (threads do not
        # survive fork); a session with a pool would add intra_op-1 more.
        assert sorted(c.pid for c in parent.children()) == sorted(before), "no child was replaced"
        log_text = (tmp_path / "worker.log").read_text()
        if share == "1":
            assert "pool children share it" in log_text and "uses the model shared by the main process" in log_text
            for child in children:
                assert child.num_threads() == before[child.pid], child.pid
        else:
            assert not loaded_onnxruntime(parent), "with DEPOSIUM_SHARE_MODEL=0 the parent never loads the model"
            assert "pool children share it" not in log_text
            loaded = [c for c in children if loaded_onnxruntime(c)]
            assert loaded, "no child ran a batch"
            for child in children:
                gained = child.num_threads() - before[child.pid]
                assert gained == (ort_threads if child in loaded else 0), (child.pid, gained, ort_threads)

        # float16 + Matryoshka request, sent as JSON (accepted besides msgpack)
        half = EmbedRequest(job_id="job1", batch_id="half", paragraphs=PARAGRAPHS[:3], dtype="float16")
        out = EmbedResponse.from_wire(send(app, half, serializer="json").get(timeout=60))
        assert out.vectors.dtype == np.float16
        np.testing.assert_array_equal(out.vectors, local.embed(PARAGRAPHS[:3], dtype="float16").vectors)

        # idempotent by (job id, batch id): a re-sent batch overwrites the same result key
        app.AsyncResult(requests[0].task_id).forget()  # as the producer does after collecting
        again = EmbedResponse.from_wire(send(app, requests[0]).get(timeout=60))
        np.testing.assert_array_equal(again.vectors, outputs[0].vectors)
        keys = redis_server.client().keys("celery-task-meta-job1:b0000000*")
        assert keys == [b"celery-task-meta-job1:b0000000"]

        # forged payloads fail cleanly and the worker keeps serving
        forged = EmbedRequest(job_id="job1", batch_id="forged", paragraphs=["x"])
        with pytest.raises(WireError, match="unknown fields: evil"):
            app.send_task(TASK_NAME, kwargs=forged.to_wire() | {"evil": True}, task_id=forged.task_id).get(
                timeout=60
            )
        with pytest.raises(WireError, match="must be job_id:batch_id"):
            app.send_task(TASK_NAME, kwargs=requests[2].to_wire(), task_id="other-id").get(timeout=60)
        bad_dim = EmbedRequest(job_id="job1", batch_id="dim", paragraphs=["x"], dim=7)
        with pytest.raises(ValueError, match="dim 7 is not offered"):
            send(app, bad_dim).get(timeout=60)
        app.AsyncResult(requests[3].task_id).forget()
        out = EmbedResponse.from_wire(send(app, requests[3]).get(timeout=60))
        np.testing.assert_array_equal(out.vectors, outputs[3].vectors)
        assert sorted(c.pid for c in parent.children()) == sorted(before)


def test_deposium_worker_cli_starts_logs_and_serves(redis_server, minilm_artifact, tmp_path):
    password = "s3cret-Pw"
    redis_server.client().config_set("requirepass", password)
    url = f"redis://:{password}@127.0.0.1:{redis_server.port}/0"
    env = clean_env(REDIS_URL=url, DEPOSIUM_ARTIFACT=str(minilm_artifact))
    cmd = [str(VENV_BIN / "deposium-worker"), "--concurrency", "1", "--queue", "cliq", "--hostname", "cli@%h"]
    log = tmp_path / "cli.log"
    manifest = read_manifest(minilm_artifact)
    with running_worker(cmd, env, log) as parent:
        assert len(parent.children()) == 1
        app = create_app(Settings(redis_url=url, queue="cliq"))
        request = EmbedRequest(job_id="cli", batch_id="b1", paragraphs=PARAGRAPHS)
        out = EmbedResponse.from_wire(send(app, request).get(timeout=120))
        np.testing.assert_array_equal(
            out.vectors, Embedder(minilm_artifact, settings=Settings()).embed(PARAGRAPHS).vectors
        )
    text = log.read_text()
    assert password not in text
    assert f"sha256 {manifest.model_sha256[:12]}" in text and f"dim {manifest.dim}" in text
    features = cpu_features()
    assert f"int8 features {', '.join(sorted(features)) or 'none'}" in text
    assert "concurrency 1" in text and "redis://:***@127.0.0.1" in text
    warning = quantization_warning(manifest.quantization, features)
    if warning is not None:  # e.g. an int8-wide artifact on a CPU without VNNI
        assert warning in text


def test_tampered_artifact_stops_the_worker_before_start(minilm_artifact, tmp_path):
    tampered = tmp_path / "tampered"
    shutil.copytree(minilm_artifact, tampered)
    with open(tampered / MODEL_FILE, "r+b") as fh:
        fh.seek(-64, os.SEEK_END)
        byte = fh.read(1)
        fh.seek(-64, os.SEEK_END)
        fh.write(bytes([byte[0] ^ 0xFF]))
    env = clean_env(REDIS_URL="redis://127.0.0.1:9/0", DEPOSIUM_ARTIFACT=str(tampered))
    proc = subprocess.run(
        [str(VENV_BIN / "deposium-worker")], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == EXIT_ARTIFACT
    assert f"{tampered / MODEL_FILE} is corrupt" in proc.stderr
    assert "ready" not in proc.stdout + proc.stderr


def test_foreign_or_missing_artifacts_stop_the_cli(minilm_artifact, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:9/0")
    future = tmp_path / "future"
    shutil.copytree(minilm_artifact, future)
    raw = json.loads((future / MANIFEST).read_text())
    raw["format_version"] = 99
    (future / MANIFEST).write_text(json.dumps(raw))
    assert main(["--artifact", str(future)]) == EXIT_ARTIFACT
    assert f"{future / MANIFEST} has format_version 99" in capsys.readouterr().err
    assert main(["--artifact", str(tmp_path / "nowhere")]) == EXIT_ARTIFACT
    assert "does not exist" in capsys.readouterr().err
    monkeypatch.delenv("REDIS_URL")
    assert main(["--artifact", str(minilm_artifact)]) != 0
    assert "REDIS_URL is not set" in capsys.readouterr().err


def test_the_cli_refuses_an_int8_fused_artifact_it_cannot_run(minilm_artifact, monkeypatch, capsys):
    """Without the kernel library, or on a kernel path the CPU lacks, the worker stops before it forks
    children or touches Redis, and says how to fix it."""
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:9/0")  # never reached
    monkeypatch.setattr("deposium.worker.kernels.library_path", lambda: None)  # an install without a C compiler
    assert main(["--artifact", str(minilm_artifact)]) == EXIT_ARTIFACT
    err = capsys.readouterr().err
    assert "refusing to start" in err and "deposium_rowq kernel library" in err and "--recipe int8-rot" in err
    monkeypatch.undo()
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:9/0")
    monkeypatch.setenv("DEPOSIUM_KERNEL_ISA", "sse2")
    assert main(["--artifact", str(minilm_artifact)]) != 0
    assert "DEPOSIUM_KERNEL_ISA" in capsys.readouterr().err
