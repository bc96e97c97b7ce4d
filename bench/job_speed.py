"""Measure end-to-end job speed: local mode and Redis with 1 and 2 worker processes, one run.

Why a module and not a test: throughput is a figure to report, never an assertion (the
box is shared). Every mode embeds the same corpus from scratch into its own output, through
the real CLI (``deposium-submit``), a private ``redis-server`` on a free port and a real
``celery -A deposium.worker.celery_app worker`` (both from :mod:`deposium.bench.procs`); the
producer's peak RSS is sampled with psutil.

    python -m deposium.bench.job_speed CORPUS.jsonl --artifact DIR [--modes local,queue1,queue2]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

from deposium.bench.procs import VENV_BIN, RedisServer, Worker


def run_submit(args: list[str], env: Mapping[str, str], cwd: Path) -> tuple[dict, float, int]:
    """Run deposium-submit, sampling its RSS; return (summary, seconds, peak RSS bytes)."""
    import psutil

    started = time.monotonic()
    cmd = [str(VENV_BIN / "deposium-submit"), *args, "--json", "--no-progress"]
    proc = subprocess.Popen(cmd, env=dict(env), cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ps = psutil.Process(proc.pid)
    peak = 0
    while proc.poll() is None:
        try:
            peak = max(peak, ps.memory_info().rss)
        except psutil.Error:
            pass
        time.sleep(0.1)
    out, err = proc.communicate()
    seconds = time.monotonic() - started
    if proc.returncode not in (0, 1):
        raise RuntimeError(f"deposium-submit failed ({proc.returncode}): {err.strip()[-500:]}")
    return json.loads(out), seconds, peak


def measurement_redis(directory: Path) -> RedisServer:
    """A private redis-server as a production one runs: append-only, fsync every second."""
    return RedisServer(directory, appendonly=True, appendfsync="everysec")


def measurement_worker(url: str, artifact: Path, concurrency: int, log: Path, env: Mapping[str, str]) -> Worker:
    """A prefork worker with ``concurrency`` children and the caller's environment (its DEPOSIUM_* kept)."""
    return Worker(url, artifact, log, concurrency=concurrency, name=f"m{concurrency}", base_env=env)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m deposium.bench.job_speed", description=__doc__.split("\n\n")[0])
    p.add_argument("corpus", type=Path, help=".jsonl (id, text) or any deposium-submit input")
    p.add_argument("--artifact", type=Path, required=True)
    p.add_argument("--modes", default="local,queue1,queue2")
    p.add_argument("--keep", type=Path, default=None, help="keep outputs in this directory")
    args = p.parse_args(argv)
    work = Path(args.keep or tempfile.mkdtemp(prefix="deposium-measure-"))
    work.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    env.update(DEPOSIUM_ARTIFACT=str(args.artifact), DEPOSIUM_CACHE_DIR=str(work / "cache"))
    corpus = str(args.corpus.absolute())
    rows = []
    for mode in args.modes.split(","):
        out = work / f"{mode}.parquet"
        for stale in (out, Path(f"{out}.parts"), Path(f"{out}.job.json")):
            shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)
        if mode == "local":
            summary, seconds, peak = run_submit([corpus, "--out", str(out), "--local"], env, work)
        else:
            concurrency = int(mode.removeprefix("queue"))
            with measurement_redis(work / f"redis-{mode}") as server, \
                    measurement_worker(server.url, args.artifact, concurrency, work / f"worker-{mode}.log", env):
                summary, seconds, peak = run_submit([corpus, "--out", str(out)],
                                                    dict(env, REDIS_URL=server.url), work)
        written = summary["embedded"]
        rows.append((mode, written, seconds, written / seconds, summary["tokens"] / seconds, peak))
        print(f"{mode:>7}: {written:,} paragraphs in {seconds:.1f}s = {written / seconds:,.1f} par/s, "
              f"{summary['tokens'] / seconds:,.0f} tokens/s, producer peak RSS {peak / 2**20:,.0f} MiB",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
