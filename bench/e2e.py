"""End to end: one job through ``deposium-submit`` in-process, and through Redis + Celery.

Why reuse :mod:`deposium.bench.job_speed`'s helpers: that module already drives the real CLI, a
private ``redis-server`` and a real prefork ``celery worker`` (:mod:`deposium.bench.procs`); the
bench adds what the report needs on top (CPU seconds of every process involved, worker RSS at start and end) and
returns figures instead of printing them. Wall-clock rates are what users see; CPU seconds
per paragraph say what the queue itself costs even when the box is shared.
"""

from __future__ import annotations

import json
import resource
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class ModeResult:
    """One job run in one mode."""

    mode: str
    paragraphs: int
    tokens: int
    wall_s: float
    #: CPU seconds: producer (+ workers + redis in queue modes).
    cpu_s: float
    producer_peak_rss: int
    #: Worker child processes' RSS (bytes) right after start-up and right before shutdown.
    worker_rss_start: list[int] = field(default_factory=list)
    worker_rss_end: list[int] = field(default_factory=list)
    #: Against the first mode of the run, paragraph by paragraph: how many vectors are bit-identical,
    #: and the lowest cosine (None for the first mode itself).
    identical_to_first: int | None = None
    min_cosine_to_first: float | None = None

    @property
    def paragraphs_per_s(self) -> float:
        return self.paragraphs / self.wall_s

    @property
    def cpu_ms_per_paragraph(self) -> float:
        return 1000 * self.cpu_s / self.paragraphs


def write_jsonl(paragraphs: Sequence[str], path: Path) -> Path:
    """The corpus as ``deposium-submit`` input: one record per paragraph."""
    with path.open("w", encoding="utf-8") as f:
        for i, text in enumerate(paragraphs):
            f.write(json.dumps({"id": f"p{i}", "text": text}) + "\n")
    return path


def _tree(pid: int) -> list[object]:
    import psutil

    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return []


def _cpu(procs: list[object]) -> float:
    import psutil

    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()  # type: ignore[attr-defined]
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


def _child_rss(pid: int) -> list[int]:
    import psutil

    out = []
    for p in _tree(pid)[1:]:
        try:
            out.append(p.memory_info().rss)  # type: ignore[attr-defined]
        except psutil.Error:
            pass
    return out


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_modes(paragraphs: Sequence[str], artifact: Path, modes: Sequence[str] = ("local", "queue1", "queue2"),
              work: Path | None = None, log: Callable[[str], None] = print) -> list[ModeResult]:
    """Embed ``paragraphs`` from scratch once per mode (``local`` or ``queueN`` = N worker processes)."""
    import os

    from deposium.bench.job_speed import measurement_redis, measurement_worker, run_submit

    if shutil.which("redis-server") is None and any(m != "local" for m in modes):
        raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
    work = Path(work or tempfile.mkdtemp(prefix="deposium-bench-e2e-"))
    work.mkdir(parents=True, exist_ok=True)
    corpus = write_jsonl(paragraphs, work / "corpus.jsonl")
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    env.update(DEPOSIUM_ARTIFACT=str(artifact), DEPOSIUM_CACHE_DIR=str(work / "cache"))
    results = []
    for mode in modes:
        out = work / f"{mode}.parquet"
        # a worker log left by an earlier run would read as "ready" before this run's worker is
        for stale in (out, Path(f"{out}.parts"), Path(f"{out}.job.json"), Path(f"{out}.errors.jsonl"),
                      work / f"worker-{mode}.log"):
            shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)
        rss_start: list[int] = []
        rss_end: list[int] = []
        if mode == "local":
            before = _children_cpu()
            summary, seconds, peak = run_submit([str(corpus), "--out", str(out), "--local"], env, work)
            cpu = _children_cpu() - before
        else:
            concurrency = int(mode.removeprefix("queue"))
            with measurement_redis(work / f"redis-{mode}") as server:
                redis_pid = server.proc.pid  # type: ignore[union-attr]
                with measurement_worker(server.url, artifact, concurrency, work / f"worker-{mode}.log", env) as worker:
                    time.sleep(1.0)
                    rss_start = _child_rss(worker.pid)
                    cpu0 = _cpu(_tree(worker.pid)) + _cpu(_tree(redis_pid))
                    before = _children_cpu()
                    summary, seconds, peak = run_submit([str(corpus), "--out", str(out)],
                                                        dict(env, REDIS_URL=server.url), work)
                    rss_end = _child_rss(worker.pid)
                    cpu = (_children_cpu() - before) + _cpu(_tree(worker.pid)) + _cpu(_tree(redis_pid)) - cpu0
        result = ModeResult(mode, int(summary["embedded"]), int(summary["tokens"]), seconds, cpu, peak,
                            rss_start, rss_end)
        if results:
            result.identical_to_first, result.min_cosine_to_first = agreement(work / f"{modes[0]}.parquet", out)
        results.append(result)
        same = "" if result.identical_to_first is None else (
            f"; {result.identical_to_first:,} vectors identical to {modes[0]}, min cosine "
            f"{result.min_cosine_to_first:.6f}")
        log(f"  {mode:>7}: {result.paragraphs:,} paragraphs in {seconds:.1f} s wall = "
            f"{result.paragraphs_per_s:,.1f} par/s; {result.cpu_ms_per_paragraph:.2f} CPU ms/paragraph{same}")
    return results


def agreement(reference: Path, other: Path) -> tuple[int, float]:
    """Bit-identical vectors and the lowest cosine between two outputs of one job, joined by id.

    Why in the bench: a mode, a worker count or a batch split must not change what users store, and
    this is the one place the same large job runs every way; the suite checks it on small batches.
    Raises if the two outputs do not hold the same paragraph ids: a lost row is a failure too.
    """
    import numpy as np
    import pyarrow.parquet as pq

    tables = [pq.read_table(path, columns=["id", "embedding"]) for path in (reference, other)]
    ids = [t.column("id").to_pylist() for t in tables]
    if sorted(ids[0]) != sorted(ids[1]):
        missing = len(set(ids[0]) - set(ids[1]))
        extra = len(set(ids[1]) - set(ids[0]))
        raise RuntimeError(f"{other.name} holds different paragraphs than {reference.name}: "
                           f"{missing} missing, {extra} extra, {len(ids[1]) - len(set(ids[1]))} duplicated")
    vectors = []
    for table, order in zip(tables, ids, strict=True):
        emb = table.column("embedding").combine_chunks()
        flat = emb.values.to_numpy(zero_copy_only=False).astype(np.float32)
        vectors.append(flat.reshape(len(order), -1)[np.argsort(order, kind="stable")])
    a, b = vectors
    identical = int(np.all(a == b, axis=1).sum())
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    return identical, float(cos.min())


def overhead(results: Sequence[ModeResult]) -> dict[str, float]:
    """Queue overhead and scaling from the modes of one run (keys present when both modes ran).

    ``queue_overhead_wall``: 1 - queue1 rate / local rate (what a user sees).
    ``queue_overhead_cpu``: queue1 CPU per paragraph / local CPU per paragraph - 1 (the queue's
    own cost, robust to a loaded box). ``scaling``: queue2 rate / queue1 rate.
    """
    by = {r.mode: r for r in results}
    out: dict[str, float] = {}
    if "local" in by and "queue1" in by:
        out["queue_overhead_wall"] = 1 - by["queue1"].paragraphs_per_s / by["local"].paragraphs_per_s
        out["queue_overhead_cpu"] = by["queue1"].cpu_ms_per_paragraph / by["local"].cpu_ms_per_paragraph - 1
    if "queue1" in by and "queue2" in by:
        out["scaling"] = by["queue2"].paragraphs_per_s / by["queue1"].paragraphs_per_s
    return out
