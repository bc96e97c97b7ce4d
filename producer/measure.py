"""Measure end-to-end job speed: local mode and Redis with 1 and 2 worker processes, one run.

Why a module and not a test: throughput is a figure to report, never an assertion (the
box is shared). Every mode embeds the same corpus from scratch into its own output, through
the real CLI (``deposium-submit``), a test-owned ``redis-server`` on a free port and a real
``celery -A deposium.worker.celery_app worker``; the producer's peak RSS is sampled with psutil.

    python -m deposium.producer.measure CORPUS.jsonl --artifact DIR [--modes local,queue1,queue2]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_submit(args: list[str], env: dict[str, str], cwd: Path) -> tuple[dict, float, int]:
    """Run deposium-submit, sampling its RSS; return (summary, seconds, peak RSS bytes)."""
    import psutil

    started = time.monotonic()
    cmd = [str(BIN / "deposium-submit"), *args, "--json", "--no-progress"]
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
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


def _worker(url: str, artifact: Path, concurrency: int, log: Path, env: dict[str, str]) -> subprocess.Popen:
    args = [str(BIN / "celery"), "-A", "deposium.worker.celery_app", "worker", "--concurrency", str(concurrency),
            "--pool", "prefork", "-Q", "deposium", "--loglevel", "INFO", "--without-gossip",
            "--without-mingle", "--without-heartbeat", "--logfile", str(log), "-n", f"m{concurrency}@%h"]
    proc = subprocess.Popen(args, env=dict(env, REDIS_URL=url, DEPOSIUM_ARTIFACT=str(artifact)),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (log.is_file() and " ready." in log.read_text(errors="replace")):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"worker did not start; see {log}")
        time.sleep(0.2)
    return proc


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m deposium.producer.measure", description=__doc__.split("\n\n")[0])
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
    redis_proc = None
    rows = []
    try:
        for mode in args.modes.split(","):
            out = work / f"{mode}.parquet"
            for stale in (out, Path(f"{out}.parts"), Path(f"{out}.job.json")):
                shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)
            if mode == "local":
                summary, seconds, peak = _run_submit([corpus, "--out", str(out), "--local"], env, work)
            else:
                concurrency = int(mode.removeprefix("queue"))
                port = _free_port()
                rdir = work / f"redis-{mode}"
                rdir.mkdir(exist_ok=True)
                redis_proc = subprocess.Popen(["redis-server", "--port", str(port), "--save", "", "--dir",
                                               str(rdir), "--appendonly", "yes"], stdout=subprocess.DEVNULL)
                time.sleep(0.5)
                url = f"redis://127.0.0.1:{port}/0"
                worker = _worker(url, args.artifact, concurrency, work / f"worker-{mode}.log", env)
                try:
                    summary, seconds, peak = _run_submit([corpus, "--out", str(out)],
                                                         dict(env, REDIS_URL=url), work)
                finally:
                    worker.terminate()
                    worker.wait(timeout=60)
                    redis_proc.terminate()
                    redis_proc.wait(timeout=30)
                    redis_proc = None
            written = summary["embedded"]
            rows.append((mode, written, seconds, written / seconds, summary["tokens"] / seconds, peak))
            print(f"{mode:>7}: {written:,} paragraphs in {seconds:.1f}s = {written / seconds:,.1f} par/s, "
                  f"{summary['tokens'] / seconds:,.0f} tokens/s, producer peak RSS {peak / 2**20:,.0f} MiB",
                  flush=True)
    finally:
        if redis_proc is not None:
            redis_proc.terminate()
    return 0


if __name__ == "__main__":
    sys.exit(main())
