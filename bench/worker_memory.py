"""Measure the worker's single-core speed and memory.

Why a module and not a test: timings and RSS depend on the machine and its load, so they are
recorded, never asserted. Every measurement runs single-threaded (ORT session options; torch
``set_num_threads(1)``), on real text: paragraphs of the Python standard library's docstrings.

    python -m deposium.bench.worker_memory throughput --artifact DIR [--model ST_DIR]
    python -m deposium.bench.worker_memory rss --artifact DIR     (arena / mem pattern, varying shapes)
    python -m deposium.bench.worker_memory worker-rss --artifact DIR [--concurrency 2] [--share 0|1]
                                                  (real Celery worker: RSS and PSS per process)
"""

from __future__ import annotations

import argparse
import importlib
import json
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

STDLIB_MODULES = (
    "ssl difflib json argparse asyncio collections functools itertools logging os pathlib re socket "
    "subprocess threading typing unittest urllib.request email http.client datetime decimal fractions "
    "statistics random tarfile zipfile sqlite3 csv shutil tempfile textwrap inspect dataclasses enum heapq "
    "bisect queue multiprocessing concurrent.futures contextlib abc io codecs string struct pickle copy "
    "pprint traceback warnings weakref signal selectors mailbox ftplib smtplib imaplib calendar locale "
    "gettext optparse configparser hashlib hmac secrets base64 zlib gzip bz2 lzma glob fnmatch filecmp "
    "platform ctypes sched timeit trace tracemalloc doctest pdb ast dis tokenize operator numbers math "
    "array uuid ipaddress html.parser xmlrpc.client shelve plistlib mimetypes getpass zipapp runpy "
    "importlib pkgutil sysconfig code graphlib contextvars logging.handlers unittest.mock http.server "
    "urllib.parse email.message"
).split()


def stdlib_paragraphs() -> list[str]:
    """Deterministic real prose: docstring paragraphs of 200-2500 characters."""
    warnings.simplefilter("ignore")
    seen: dict[str, None] = {}
    for name in STDLIB_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        for obj in [module, *(getattr(module, a) for a in sorted(dir(module)) if not a.startswith("_"))]:
            doc = getattr(obj, "__doc__", None)
            if not isinstance(doc, str):
                continue
            for block in re.split(r"\n\s*\n", doc):
                text = " ".join(block.split())
                if 200 <= len(text) <= 2500 and not text.startswith((">>>", "..")):
                    seen.setdefault(text)
    return list(seen)


#: CPU time of this process: on a shared box, wall time measures the neighbours too. Every timed
#: section is single-threaded, so CPU seconds = seconds of one core.
CLOCK = time.process_time


def rss_mb(pid: int | None = None) -> float:
    import psutil

    return psutil.Process(pid).memory_info().rss / 2**20


def throughput(args: argparse.Namespace) -> dict:
    from deposium.worker.config import Settings
    from deposium.worker.embedder import Embedder

    texts = stdlib_paragraphs()[: args.paragraphs]
    emb = Embedder(args.artifact, settings=Settings(), token_budget=args.token_budget)
    tokens = sum(emb.tokenizer.encode(texts).lengths)
    out: dict = {"paragraphs": len(texts), "tokens": tokens, "mean_tokens": tokens / len(texts)}
    emb.embed(texts[:8])  # warm-up
    per = []
    for t in texts:
        t0 = CLOCK()
        emb.embed([t])
        per.append(CLOCK() - t0)
    out["ort_batch1_median_ms"] = statistics.median(per) * 1e3
    t0 = CLOCK()
    for i in range(0, len(texts), args.request_size):
        emb.embed(texts[i : i + args.request_size])
    dt = CLOCK() - t0
    out["ort_budget_paragraphs_s"] = len(texts) / dt
    out["ort_budget_tokens_s"] = tokens / dt

    import torch
    from sentence_transformers import SentenceTransformer

    torch.set_num_threads(1)
    torch.set_num_interop_threads(1)
    st = SentenceTransformer(args.model, device="cpu")
    st.encode(texts[:8])
    per = []
    for t in texts:
        t0 = CLOCK()
        st.encode([t])
        per.append(CLOCK() - t0)
    out["torch_batch1_median_ms"] = statistics.median(per) * 1e3
    t0 = CLOCK()
    st.encode(texts, batch_size=32)
    dt = CLOCK() - t0
    out["torch_batched_paragraphs_s"] = len(texts) / dt
    out["torch_batched_tokens_s"] = tokens / dt
    out["ratio_paragraphs_s"] = out["ort_budget_paragraphs_s"] / out["torch_batched_paragraphs_s"]
    out["ratio_batch1"] = out["torch_batch1_median_ms"] / out["ort_batch1_median_ms"]
    return out


def rss_one(args: argparse.Namespace) -> dict:
    """One configuration in a fresh process: RSS after load, then while batch shapes vary."""
    from deposium.worker.config import Settings
    from deposium.worker.embedder import Embedder

    texts = stdlib_paragraphs()
    rng = random.Random(0)
    if args.mallopt:
        import ctypes

        # M_MMAP_THRESHOLD = -3: a fixed threshold also switches off glibc's dynamic raise of it
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)
    settings = Settings(ort_arena=args.arena, ort_mem_pattern=args.mem_pattern)
    emb = Embedder(args.artifact, settings=settings, token_budget=args.token_budget)
    out = {"arena": args.arena, "mem_pattern": args.mem_pattern, "mallopt": args.mallopt}
    out["after_load_mb"] = rss_mb()
    trace = []
    for i in range(args.batches):
        n = rng.choice([1, 2, 3, 5, 8, 13, 21, 34, 64])
        emb.embed(rng.sample(texts, n))
        if (i + 1) % (args.batches // 10) == 0:
            trace.append(round(rss_mb(), 1))
    out["during_mb"] = trace
    out["growth_last_half_mb"] = round(trace[-1] - trace[len(trace) // 2 - 1], 1)
    out["max_mb"] = round(max(trace), 1)
    return out


def rss(args: argparse.Namespace) -> list[dict]:
    results = []
    for arena in (False, True):
        for pattern in (False, True):
            cmd = [
                sys.executable,
                "-m",
                "deposium.bench.worker_memory",
                "rss-one",
                "--artifact",
                str(args.artifact),
                "--batches",
                str(args.batches),
                "--token-budget",
                str(args.token_budget),
            ]
            cmd += ["--arena"] if arena else []
            cmd += ["--mem-pattern"] if pattern else []
            done = subprocess.run(cmd, capture_output=True, text=True, check=True)
            results.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(json.dumps(results[-1]), file=sys.stderr)
    return results


def memory_mb(pid: int) -> dict[str, float]:
    """RSS and PSS (shared pages divided among the processes mapping them) of one process."""
    import psutil

    info = psutil.Process(pid).memory_full_info()
    return {"rss_mb": round(info.rss / 2**20, 1), "pss_mb": round(info.pss / 2**20, 1)}


def worker_rss(args: argparse.Namespace) -> dict:
    """A real ``celery worker`` (prefork, ``--concurrency``) on a private redis-server.

    Reports RSS and PSS of the parent and of every child after load and after all paragraphs;
    ``--share 0/1`` sets DEPOSIUM_SHARE_MODEL (model loaded once by the parent, or per child).
    """
    import psutil

    from deposium.bench.procs import READY_TIMEOUT_S, RedisServer, Worker, wait_for
    from deposium.worker.celery_app import create_app
    from deposium.worker.config import Settings
    from deposium.worker.wire import TASK_NAME, EmbedRequest

    texts = stdlib_paragraphs()
    with tempfile.TemporaryDirectory() as tmp:
        server = RedisServer(Path(tmp) / "redis", appendonly=False).start()
        worker = Worker(server.url, args.artifact, Path(tmp) / "worker.log", concurrency=args.concurrency,
                        name="measure", queue="measure", loglevel="WARNING", DEPOSIUM_SHARE_MODEL=str(args.share))
        proc = worker.start(wait=False).proc
        assert proc is not None

        def snapshot() -> dict:
            children = parent.children()
            return {"parent": memory_mb(proc.pid), "children": [memory_mb(c.pid) for c in children],
                    "children_pss_total_mb": round(sum(memory_mb(c.pid)["pss_mb"] for c in children), 1)}

        try:
            app = create_app(Settings(redis_url=server.url, queue="measure"))
            parent = psutil.Process(proc.pid)
            wait_for(lambda: len(parent.children()) >= args.concurrency, "the worker's prefork children",
                     READY_TIMEOUT_S, interval=0.2, alive=proc)
            pids = sorted(c.pid for c in parent.children())
            out: dict = {"concurrency": args.concurrency, "share_model": args.share}
            sent = batch = 0
            t0 = time.monotonic()
            while sent < args.total:
                pending = []
                for _ in range(args.concurrency):  # one batch per child at a time
                    n = min(args.batch_size, args.total - sent)
                    if n <= 0:
                        break
                    req = EmbedRequest(job_id="measure", batch_id=f"b{batch:07d}",
                                       paragraphs=[texts[(sent + i) % len(texts)] for i in range(n)])
                    pending.append((req, app.send_task(TASK_NAME, kwargs=req.to_wire(), task_id=req.task_id)))
                    sent += n
                    batch += 1
                for req, result in pending:
                    result.get(timeout=600)
                    app.AsyncResult(req.task_id).forget()
                if "after_first_batches" not in out:
                    out["after_first_batches"] = snapshot()
            out["wall_seconds"] = round(time.monotonic() - t0, 1)
            out["paragraphs"] = sent
            out["after_all"] = snapshot()
            out["children_unchanged"] = sorted(c.pid for c in parent.children()) == pids
        finally:
            worker.stop()
            server.stop()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    for name in ("throughput", "rss", "rss-one", "worker-rss"):
        p = sub.add_parser(name)
        p.add_argument("--artifact", type=Path, required=True)
        p.add_argument("--token-budget", type=int, default=4096)
    sub.choices["throughput"].add_argument("--model", required=True, help="sentence-transformers directory")
    sub.choices["throughput"].add_argument("--paragraphs", type=int, default=300)
    sub.choices["throughput"].add_argument("--request-size", type=int, default=128)
    for name in ("rss", "rss-one"):
        sub.choices[name].add_argument("--batches", type=int, default=400)
    sub.choices["rss-one"].add_argument("--arena", action="store_true")
    sub.choices["rss-one"].add_argument("--mem-pattern", action="store_true")
    sub.choices["rss-one"].add_argument("--mallopt", action="store_true")
    sub.choices["worker-rss"].add_argument("--total", type=int, default=10_000)
    sub.choices["worker-rss"].add_argument("--batch-size", type=int, default=100)
    sub.choices["worker-rss"].add_argument("--concurrency", type=int, default=1)
    sub.choices["worker-rss"].add_argument("--share", type=int, choices=(0, 1), default=1,
                                           help="DEPOSIUM_SHARE_MODEL for the worker")
    args = parser.parse_args()
    fn = {"throughput": throughput, "rss": rss, "rss-one": rss_one, "worker-rss": worker_rss}[args.cmd]
    print(json.dumps(fn(args)))


if __name__ == "__main__":
    main()
