"""Helpers shared by the producer tests: a real corpus, a worker subprocess, log counting.

No tests here; the module name only follows the producer tests' naming so it stays theirs.
"""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
import sysconfig
import time
from collections.abc import Iterator
from pathlib import Path

import redis

from deposium.bench.procs import celery_worker_args

ROOT = Path(__file__).resolve().parent.parent
EVAL = ROOT.parent / "shared" / "eval"
VENV_BIN = Path(sys.executable).parent


def stsb_sentences() -> Iterator[str]:
    """STS-B sentences (tab split: some hold unmatched quotes)."""
    for name in ("stsb_test.tsv", "stsb_dev.tsv"):
        path = EVAL / name
        if not path.is_file():
            continue
        with open(path, encoding="utf-8") as fh:
            next(fh)
            for line in fh:
                cols = line.rstrip("\n").split("\t")
                yield from (c.strip() for c in cols[1:3] if c.strip())


def stdlib_docstrings() -> Iterator[str]:
    """First paragraph of each docstring in the Python standard library (present everywhere)."""
    lib = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(lib.glob("*.py")) + sorted(lib.glob("*/*.py")):
        if "test" in path.parts[-2:][0] or path.name.startswith("test"):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                doc = ast.get_docstring(node)
                if doc:
                    first = re.sub(r"\s+", " ", doc.split("\n\n")[0]).strip()
                    if 20 <= len(first) <= 300:
                        yield first


def corpus(n: int) -> list[str]:
    """``n`` real, short paragraphs (STS-B sentences, then stdlib docstrings), repeats included."""
    out: list[str] = []
    for source in (stsb_sentences(), stdlib_docstrings()):
        for text in source:
            out.append(text)
            if len(out) == n:
                return out
    raise RuntimeError(f"only {len(out)} paragraphs available, wanted {n}")


def write_jsonl(path: Path, texts: list[str], docs_per_file: int | None = None) -> Path:
    with open(path, "w", encoding="utf-8") as fh:
        for i, t in enumerate(texts):
            fh.write(json.dumps({"id": f"p{i:06d}", "text": t}) + "\n")
    return path


def start_worker(redis_url: str, artifact: Path, log: Path, *, concurrency: int = 2,
                 name: str = "w1") -> subprocess.Popen:
    """A real ``celery -A deposium.worker.celery_app worker`` subprocess (prefork, ``concurrency`` children)."""
    env = dict(os.environ, REDIS_URL=redis_url, DEPOSIUM_ARTIFACT=str(artifact))
    args = celery_worker_args(log, concurrency=concurrency, queue="deposium", name=name)
    return subprocess.Popen(args, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def wait_for_worker(redis_url: str, proc: subprocess.Popen, log: Path, timeout: float = 120.0) -> None:
    """Until the worker logs ``ready`` (it then consumes); fails early if it exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace")[-2000:] if log.is_file() else ""
            raise RuntimeError(f"worker exited with {proc.returncode}: {tail}")
        if log.is_file() and " ready." in log.read_text(errors="replace"):
            return
        time.sleep(0.2)
    raise RuntimeError("worker did not become ready")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def received_task_ids(log: Path) -> list[str]:
    """Task ids the worker logged as received (one line per delivery)."""
    pattern = re.compile(r"Task deposium\.embed_batch\[([^\]]+)\] received")
    return pattern.findall(log.read_text(errors="replace")) if log.is_file() else []


def submit_cmd(*args: str) -> list[str]:
    return [str(VENV_BIN / "deposium-submit"), *args]


def redis_keys(url: str, pattern: str) -> list[bytes]:
    return list(redis.Redis.from_url(url).scan_iter(pattern))
