"""Where the producer's CPU goes in a real queued job, and how many worker cores one producer core feeds.

    python -m deposium.bench.producer_cost [--artifact DIR] [--paragraphs 6000] [--rounds 3] [--json]

Runs ``deposium-submit``'s own entry point (:func:`deposium.producer.cli.main`) in this process on a
generated JSON Lines corpus (documents of several real paragraphs, a few paragraphs repeated so
the dedupe path runs), against a private redis-server and one Celery worker process (both from
:mod:`deposium.bench.procs`). The producer's functions are wrapped at run time with
``time.process_time`` accounting; each part is charged its own CPU time (time spent in a nested
wrapped part is charged to that part only):

- reading and splitting: the runner's paragraph stream (JSON Lines reading, block splitting, fitting);
- token counting: ``TokenCounter.count``;
- hashing and dedupe: content hashes, batch digests and ``make_batches`` (first-seen map, grouping);
- packing and encoding: building each ``EmbedRequest`` and its wire form;
- Redis round trips, sending: the backend's send of each batch (the awaited-set pipeline and
  ``send_task``, which includes Celery/kombu's own message serialization);
- Redis round trips, polling and fetching: the backend's polls of batches in flight (state, result,
  forget, awaited-set removal), which include the Celery backend's msgpack decoding of results.
  Polling runs at a fixed interval while batches are in flight, so this part grows with the job's
  wall time: a slower (or busier) worker makes it larger per paragraph;
- result decoding: ``EmbedResponse.from_wire`` (bytes to vectors, checks);
- sink writes: the Arrow table of each batch, ``write_batch``, ``lookup`` and the final ``close``;
- other job work: the rest of ``JobRunner.run`` (job record saves, progress, the polling loop).

Start-up (imports, tokenizer load, Celery app) is reported apart: it does not grow with the job.
The worker's CPU (parent + prefork child, from psutil) and redis-server's (``/proc/PID/stat``) are
read before and after each job. "One producer core keeps N worker cores busy" is worker CPU per
paragraph / producer CPU per paragraph. Every figure is CPU time, so it holds on a shared machine;
medians over ``--rounds`` jobs (each into a fresh output).

Why monkeypatching and not counters in the producer: measurement stays out of the runtime, and a
part whose function was renamed is reported as not found instead of silently reading zero.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import inspect
import io
import json
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: The parts, in report order ("other job work" is the runner's own remainder).
PARTS = ("reading and splitting", "token counting", "hashing and dedupe", "packing and encoding",
         "Redis round trips: sending", "Redis round trips: polling and fetching", "result decoding", "sink writes",
         "other job work")

#: (module, attribute path, part): what is wrapped. The runner's ``run`` is the outermost part.
TARGETS: tuple[tuple[str, str, str], ...] = (
    ("deposium.producer.runner", "JobRunner.run", "other job work"),
    ("deposium.producer.runner", "JobRunner._save", "other job work"),
    ("deposium.producer.runner", "JobRunner._paragraphs", "reading and splitting"),
    ("deposium.producer.cli", "_input_bytes", "reading and splitting"),
    ("deposium.producer.tokens", "TokenCounter.count", "token counting"),
    ("deposium.producer.split", "content_hash", "hashing and dedupe"),
    ("deposium.producer.model", "Batch.digest", "hashing and dedupe"),
    ("deposium.producer.runner", "make_batches", "hashing and dedupe"),
    ("deposium.worker.wire", "EmbedRequest.__init__", "packing and encoding"),
    ("deposium.worker.wire", "EmbedRequest.to_wire", "packing and encoding"),
    ("deposium.producer.backends", "QueueBackend._send", "Redis round trips: sending"),
    ("deposium.producer.backends", "QueueBackend._poll_one", "Redis round trips: polling and fetching"),
    ("deposium.producer.backends", "QueueBackend._finished_ids", "Redis round trips: polling and fetching"),
    ("deposium.worker.wire", "EmbedResponse.from_wire", "result decoding"),
    ("deposium.producer.runner", "rows_table", "sink writes"),
    ("deposium.producer.sinks.parquet", "ParquetSink.write_batch", "sink writes"),
    ("deposium.producer.sinks.parquet", "ParquetSink.lookup", "sink writes"),
    ("deposium.producer.sinks.parquet", "ParquetSink.close", "sink writes"),
)


class CpuAccounts:
    """Exclusive CPU seconds per part: a wrapped call is charged its own time minus its wrapped callees'.

    Generators are charged per ``next()``, so a lazy pipeline (reader -> splitter -> batcher) is
    split where its stages really spend their time.
    """

    def __init__(self, clock: Callable[[], float] = time.process_time) -> None:
        self.clock = clock
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.missing: list[str] = []
        self._stack: list[list[Any]] = []  # [part, start, seconds of wrapped callees]
        self._restore: list[tuple[object, str, object]] = []

    def _enter(self, part: str) -> None:
        self._stack.append([part, self.clock(), 0.0])

    def _exit(self) -> None:
        part, start, callees = self._stack.pop()
        elapsed = self.clock() - start
        self.seconds[part] += elapsed - callees
        self.calls[part] += 1
        if self._stack:
            self._stack[-1][2] += elapsed

    def timed(self, part: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        """``fn`` charging its CPU time to ``part``."""
        if inspect.isgeneratorfunction(fn):
            @functools.wraps(fn)
            def generator(*args: Any, **kwargs: Any) -> Iterator[Any]:
                it = fn(*args, **kwargs)
                while True:
                    self._enter(part)
                    try:
                        item = next(it)
                    except StopIteration:
                        return
                    finally:
                        self._exit()
                    yield item

            return generator

        @functools.wraps(fn)
        def call(*args: Any, **kwargs: Any) -> Any:
            self._enter(part)
            try:
                return fn(*args, **kwargs)
            finally:
                self._exit()

        return call

    def wrap(self, module: str, path: str, part: str) -> bool:
        """Replace ``module.path`` (``name`` or ``Class.name``) by a timed version; False (and noted in
        :attr:`missing`) when it does not exist."""
        import importlib

        try:
            owner: Any = importlib.import_module(module)
            *parents, name = path.split(".")
            for parent in parents:
                owner = getattr(owner, parent)
            raw = inspect.getattr_static(owner, name)
        except (ImportError, AttributeError):
            self.missing.append(f"{module}.{path} ({part})")
            return False
        if isinstance(raw, classmethod):
            new: object = classmethod(self.timed(part, raw.__func__))
        elif isinstance(raw, staticmethod):
            new = staticmethod(self.timed(part, raw.__func__))
        else:
            new = self.timed(part, raw)
        setattr(owner, name, new)
        self._restore.append((owner, name, raw))
        return True

    def unwrap(self) -> None:
        for owner, name, raw in reversed(self._restore):
            setattr(owner, name, raw)
        self._restore.clear()


def proc_stat_cpu(pid: int) -> float:
    """User + system CPU seconds of one process from ``/proc/PID/stat`` (fields 14 and 15)."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2:].split()  # the command name may hold spaces and parentheses
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def tree_cpu(pid: int) -> float:
    """CPU seconds of a process and its living children (a prefork worker and its pool)."""
    import psutil

    total = 0.0
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return total
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


def write_corpus(path: Path, paragraphs: Sequence[str], n: int, per_document: int = 5,
                 repeat_every: int = 20) -> int:
    """``n`` paragraphs as JSON Lines documents of ``per_document`` paragraphs (blank-line separated);
    every ``repeat_every``-th paragraph repeats an earlier one (the dedupe path). Returns documents."""
    from deposium.bench.corpus import repeat_to

    distinct = repeat_to(list(paragraphs), n)
    chosen = [distinct[i // 2] if i and i % repeat_every == 0 else distinct[i] for i in range(n)]
    docs = 0
    with path.open("w", encoding="utf-8") as f:
        for start in range(0, n, per_document):
            text = "\n\n".join(chosen[start:start + per_document])
            f.write(json.dumps({"id": f"doc{docs:06d}", "text": text}) + "\n")
            docs += 1
    return docs


@dataclass
class Round:
    """One job's figures (CPU seconds)."""

    paragraphs: int
    embedded: int
    producer_total_s: float
    producer_job_s: float
    parts_s: dict[str, float]
    worker_s: float
    redis_s: float
    wall_s: float
    missing: list[str] = field(default_factory=list)
    #: Wrapped calls per part (generators: one per item, plus the last).
    calls: dict[str, int] = field(default_factory=dict)

    @property
    def startup_s(self) -> float:
        return self.producer_total_s - self.producer_job_s


def run_job(corpus: Path, out: Path, worker_pid: int, redis_pid: int) -> Round:
    """One queued job through the producer's CLI entry point, in this process, with accounting."""
    from deposium.producer.cli import main as submit_main

    accounts = CpuAccounts()
    for module, path, part in TARGETS:
        accounts.wrap(module, path, part)
    try:
        worker0, redis0 = tree_cpu(worker_pid), proc_stat_cpu(redis_pid)
        wall0, cpu0 = time.monotonic(), time.process_time()
        stdout = io.StringIO()
        with contextlib.redirect_stdout(stdout):
            code = submit_main([str(corpus), "--out", str(out), "--json", "--no-progress"])
        producer = time.process_time() - cpu0
        wall = time.monotonic() - wall0
        worker, redis_cpu = tree_cpu(worker_pid) - worker0, proc_stat_cpu(redis_pid) - redis0
    finally:
        accounts.unwrap()
    if code != 0:
        raise RuntimeError(f"the job failed (exit {code}): {stdout.getvalue().strip()[-500:]}")
    summary = json.loads(stdout.getvalue())
    parts = {p: accounts.seconds.get(p, 0.0) for p in PARTS}
    return Round(paragraphs=int(summary["paragraphs"]), embedded=int(summary["embedded"]),
                 producer_total_s=producer, producer_job_s=sum(parts.values()), parts_s=parts, worker_s=worker,
                 redis_s=redis_cpu, wall_s=wall, missing=accounts.missing,
                 calls={p: accounts.calls.get(p, 0) for p in PARTS})


def summarize(rounds: Sequence[Round]) -> dict[str, Any]:
    """Medians over rounds, per paragraph (µs), and the producer-to-worker ratio."""
    def med(values: Sequence[float]) -> float:
        return statistics.median(values)

    per = {p: med([r.parts_s[p] / r.paragraphs for r in rounds]) * 1e6 for p in PARTS}
    producer = med([r.producer_job_s / r.paragraphs for r in rounds]) * 1e6
    worker = med([r.worker_s / r.paragraphs for r in rounds]) * 1e6
    redis_cpu = med([r.redis_s / r.paragraphs for r in rounds]) * 1e6
    top = sorted(PARTS, key=lambda p: per[p], reverse=True)[:3]
    return {
        "rounds": len(rounds),
        "paragraphs": rounds[0].paragraphs,
        "embedded": rounds[0].embedded,
        "producer_us_per_paragraph": round(producer, 1),
        "parts_us_per_paragraph": {p: round(v, 1) for p, v in per.items()},
        "parts_share": {p: round(per[p] / producer, 3) if producer else 0.0 for p in PARTS},
        "parts_calls_per_job": {p: int(med([r.calls.get(p, 0) for r in rounds])) for p in PARTS},
        "top_three": top,
        "producer_startup_s": round(med([r.startup_s for r in rounds]), 2),
        "worker_us_per_paragraph": round(worker, 1),
        "redis_us_per_paragraph": round(redis_cpu, 1),
        "worker_cores_per_producer_core": round(worker / producer, 1) if producer else None,
        "wall_s": [round(r.wall_s, 1) for r in rounds],
        "not_found": sorted({m for r in rounds for m in r.missing}),
    }


def render(figures: dict[str, Any]) -> str:
    """The figures as a short Markdown report."""
    lines = [f"{figures['paragraphs']:,} paragraphs ({figures['embedded']:,} embedded) per job, "
             f"{figures['rounds']} jobs, medians of CPU time per paragraph:", "",
             "| part | µs / paragraph | share of producer | wrapped calls per job |", "|---|---:|---:|---:|"]
    for part, us in figures["parts_us_per_paragraph"].items():
        lines.append(f"| {part} | {us:,.1f} | {figures['parts_share'][part]:.1%} "
                     f"| {figures['parts_calls_per_job'][part]:,} |")
    lines += [f"| **producer, job total** | **{figures['producer_us_per_paragraph']:,.1f}** | 100% | |",
              f"| redis-server | {figures['redis_us_per_paragraph']:,.1f} | | |",
              f"| worker (parent + 1 child) | {figures['worker_us_per_paragraph']:,.1f} | | |", "",
              f"One producer core keeps {figures['worker_cores_per_producer_core']} worker cores busy "
              "(worker CPU per paragraph / producer CPU per paragraph).",
              f"Top three producer costs: {', '.join(figures['top_three'])}.",
              f"Producer start-up (once per job, not per paragraph): {figures['producer_startup_s']} s CPU."]
    if figures["not_found"]:
        lines.append("Not found (those parts read low): " + ", ".join(figures["not_found"]) + ".")
    return "\n".join(lines)


def default_artifact(cache: Path) -> Path:
    """The MiniLM int8 artifact the bench builds (once, cached) when ``--artifact`` is not given."""
    from deposium.bench.cli import _artifact, _minilm_dir

    return _artifact(None, _minilm_dir(), cache, "auto", True, label="int8-auto")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m deposium.bench.producer_cost", description=__doc__.split("\n\n")[0])
    p.add_argument("--artifact", type=Path, default=None,
                   help="artifact directory (default: the MiniLM int8 artifact, built once in the bench cache)")
    p.add_argument("--paragraphs", type=int, default=6000, help="paragraphs per job (>= 5,000 for stable figures)")
    p.add_argument("--rounds", type=int, default=3, help="jobs, each into a fresh output (medians reported)")
    p.add_argument("--work", type=Path, default=None, help="working directory (default: a temporary one)")
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = p.parse_args(argv)
    if args.paragraphs < 1 or args.rounds < 1:
        p.error("--paragraphs and --rounds must be >= 1")

    from deposium.bench.corpus import stdlib_paragraphs
    from deposium.bench.job_speed import measurement_redis, measurement_worker
    from deposium.worker.config import load_settings

    work = Path(args.work or tempfile.mkdtemp(prefix="deposium-producer-cost-"))
    work.mkdir(parents=True, exist_ok=True)
    artifact = args.artifact or default_artifact(load_settings().cache_dir / "bench")
    corpus = work / "corpus.jsonl"
    write_corpus(corpus, stdlib_paragraphs(), args.paragraphs)
    # the producer reads its configuration from the environment (deposium.worker.config), like the CLI
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    env.update(DEPOSIUM_ARTIFACT=str(artifact), DEPOSIUM_CACHE_DIR=str(work / "cache"))
    rounds = []
    with measurement_redis(work / "redis") as server, \
            measurement_worker(server.url, artifact, 1, work / "worker.log", env) as worker:
        os.environ.update(env, REDIS_URL=server.url)
        import deposium.producer.cli  # noqa: F401  (imports before the first job's clock)
        import deposium.worker.celery_app  # noqa: F401

        for r in range(args.rounds):
            out = work / f"round{r}.parquet"
            rounds.append(run_job(corpus, out, worker.pid, server.proc.pid))  # type: ignore[union-attr]
            print(f"  job {r + 1}/{args.rounds}: {rounds[-1].wall_s:.1f} s wall", file=sys.stderr, flush=True)
    figures = summarize(rounds)
    print(json.dumps(figures, indent=1) if args.json else render(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
