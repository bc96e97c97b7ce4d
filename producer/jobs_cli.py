"""``deposium-jobs``: list jobs with their state and counts, show one, or forget one.

Why it reads both stores: queue-mode jobs live in Redis (any operator can see them), local
jobs next to their output with a pointer in the cache directory; a user asks "what are my
jobs" without caring which mode ran them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

STALE_AFTER_S = 60.0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="deposium-jobs",
                                description="List deposium ingestion jobs (Redis when REDIS_URL is set, "
                                            "and local jobs from the cache directory).")
    sub = p.add_subparsers(dest="command")
    ls = sub.add_parser("list", help="one line per job (default)")
    ls.add_argument("--json", action="store_true")
    show = sub.add_parser("show", help="the full record of one job")
    show.add_argument("job_id")
    forget = sub.add_parser("forget", help="delete a job's record (not its output)")
    forget.add_argument("job_id")
    return p


def state_of(record: dict[str, Any], now: float | None = None) -> str:
    """The recorded state; a 'running' job without a heartbeat for a minute is 'stalled'."""
    state = str(record.get("state", "?"))
    now = time.time() if now is None else now
    if state == "running" and now - float(record.get("updated", 0)) > STALE_AFTER_S:
        return "stalled (resume it)"
    return state


def combine_shards(records: list[dict[str, Any]], now: float | None = None) -> list[dict[str, Any]]:
    """One record per job: the records of a sharded job's shards (``spec.shard``) become one,
    with summed counts, a combined state and each shard's own state under ``shards``.

    The combined state is the least advanced one: a job is done when every shard is, and
    "incomplete" when the shards that ran finished but some never started.
    """
    out: list[dict[str, Any]] = []
    groups: dict[str, dict[str, Any]] = {}
    for r in records:
        info = r.get("spec", {}).get("shard")
        if not isinstance(info, dict):
            out.append(r)
            continue
        job = str(info.get("job"))
        group = groups.get(job)
        if group is None:
            group = {"id": job, "spec": {k: v for k, v in r.get("spec", {}).items() if k != "shard"},
                     "counts": {}, "shards": {}, "count": int(info.get("count", 1)), "updated": 0.0}
            groups[job] = group
            out.append(group)
        for k, v in r.get("counts", {}).items():
            if isinstance(v, int | float):
                group["counts"][k] = group["counts"].get(k, 0) + v
        group["updated"] = max(group["updated"], float(r.get("updated", 0)))
        group["shards"][str(info.get("index"))] = {"state": state_of(r, now), "counts": r.get("counts", {}),
                                                   "host": r.get("host"), "pid": r.get("pid")}
    for group in groups.values():
        states = [group["shards"].get(str(i), {}).get("state", "not started") for i in range(group["count"])]
        finished = [s for s in states if s in {"done", "done_with_errors"}]
        if len(finished) == len(states):
            group["state"] = "done_with_errors" if "done_with_errors" in finished else "done"
        else:
            waiting = [s for s in states if s not in finished]
            started = [s for s in waiting if s != "not started"]
            group["state"] = ("running" if "running" in waiting else started[0] if started
                              else "incomplete")
        group["shards_done"] = f"{len(finished)}/{len(states)}"
        group["shards"] = {i: group["shards"].get(str(i), {"state": "not started"}) for i in
                           map(str, range(group["count"]))}
    return out


def _shown_state(record: dict[str, Any]) -> str:
    if "shards_done" in record:
        return f"{record['state']} ({record['shards_done']} shards)"
    return state_of(record)


def _stores() -> list[tuple[str, Any]]:
    from deposium.producer.jobstore import FileJobStore, RedisJobStore
    from deposium.worker.config import load_settings

    settings = load_settings()
    stores: list[tuple[str, Any]] = [("local", FileJobStore(settings.cache_dir))]
    if settings.redis_url:
        import redis

        from deposium.producer.backends import check_redis

        check_redis(settings)
        stores.insert(0, ("queue", RedisJobStore(redis.Redis.from_url(settings.redis_url))))
    return stores


def main(argv: Sequence[str] | None = None) -> int:
    try:
        code = _main(argv)
        sys.stdout.flush()
        return code
    except BrokenPipeError:
        # The reader left (``deposium-jobs | head``): point stdout at /dev/null so the
        # interpreter's final flush is silent too.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def _main(argv: Sequence[str] | None) -> int:
    args = parser().parse_args(argv)
    from deposium.producer.backends import BackendError
    from deposium.worker.config import ConfigError

    try:
        stores = _stores()
    except (BackendError, ConfigError) as exc:
        print(f"deposium-jobs: error: {exc}", file=sys.stderr)
        return 2
    command = args.command or "list"
    if command == "list":
        rows = [(mode, r) for mode, store in stores for r in combine_shards(store.list())]
        if getattr(args, "json", False):
            print(json.dumps([dict(r, mode=mode, state=r["state"] if "shards" in r else state_of(r))
                              for mode, r in rows]))
            return 0
        if not rows:
            print("no jobs")
            return 0
        print(f"{'JOB':<17} {'MODE':<6} {'STATE':<26} {'WRITTEN':>9} {'FAILED':>7} {'BATCHES':>13}  TARGET")
        for mode, r in rows:
            c = r.get("counts", {})
            batches = f"{c.get('batches_done', 0)}/{c.get('batches', 0)}"
            print(f"{r['id']:<17} {mode:<6} {_shown_state(r):<26} {c.get('written', 0):>9,} "
                  f"{c.get('failed_paragraphs', 0):>7,} {batches:>13}  {r.get('spec', {}).get('target', '')}")
        return 0
    for mode, store in stores:
        record = store.load(args.job_id)
        if record is None:
            shards = [r for r in store.list() if r.get("spec", {}).get("shard", {}).get("job") == args.job_id]
            if not shards:
                continue
            if command == "show":
                print(json.dumps(dict(combine_shards(shards)[0], mode=mode), indent=2, sort_keys=True))
                return 0
            if not hasattr(store, "forget"):
                print(f"deposium-jobs: a local job's records are the files {shards[0]['spec'].get('target')}"
                      ".job.*.json", file=sys.stderr)
                return 2
            for r in shards:
                store.forget(r["id"])
            print(f"forgot job {args.job_id} ({len(shards)} shards)")
            return 0
        if command == "show":
            print(json.dumps(dict(record, mode=mode, state=state_of(record)), indent=2, sort_keys=True))
        elif hasattr(store, "forget"):
            store.forget(args.job_id)
            print(f"forgot job {args.job_id}")
        else:
            target = record.get("spec", {}).get("target")
            print(f"deposium-jobs: a local job's record is the file {target}.job.json", file=sys.stderr)
            return 2
        return 0
    print(f"deposium-jobs: error: no job {args.job_id}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
