"""Measure the sinks: rows/s written by each store alone, and job rate per sink against Parquet.

Why: a sink must never be the bottleneck of an ingestion job (goal: a job into pgvector or
LanceDB within 5 % of the same job into Parquet). Figures to report, never assertions.

1. Sink alone: synthetic rows (random unit vectors, 300-character texts) written with
   ``write_batch`` in batches of ``--batch-rows``: pgvector (binary COPY + upsert +
   done-mark, one transaction per batch) at 384 and 768 dimensions, LanceDB, Parquet.
2. End to end: the same local-mode job (stdlib docstrings, the real model) into each sink,
   ``--rounds`` times interleaved; median paragraphs/s.

    python -m deposium.bench.sink_speed --artifact DIR [--pg postgresql://...] [--rows 20000]

Without ``--pg`` a throw-away PostgreSQL cluster is started (:class:`deposium.bench.procs.PgCluster`;
the PostgreSQL server and pgvector installed: scripts/install-pgvector.sh).
"""

from __future__ import annotations

import argparse
import ast
import json
import re
import statistics
import sys
import sysconfig
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa

from deposium.producer.schema import PROVENANCE, output_schema
from deposium.producer.sinks import SinkJob, open_sink


def synthetic_rows(n: int, dim: int, offset: int = 0, seed: int = 0) -> pa.Table:
    """``n`` rows shaped like a real batch (unit vectors, 300-character texts)."""
    rng = np.random.default_rng(seed + offset)
    vec = rng.standard_normal((n, dim), dtype=np.float32)
    vec /= np.linalg.norm(vec, axis=1, keepdims=True)
    schema = output_schema(dim)
    text = "lorem ipsum dolor sit amet " * 11
    ids = [f"doc{(offset + i) // 8}#{(offset + i) % 8}" for i in range(n)]
    return pa.Table.from_arrays([
        pa.array(ids), pa.array([i.split("#")[0] for i in ids]),
        pa.array([(offset + i) % 8 for i in range(n)], pa.int32()),
        pa.array([uuid.uuid4().hex for _ in range(n)]), pa.array([text] * n),
        pa.FixedSizeListArray.from_arrays(pa.array(vec.reshape(-1)), dim),
        pa.array([80] * n, pa.int32()), pa.array([False] * n),
        *(pa.nulls(n, f.type) for f in PROVENANCE)], schema=schema)


def sink_rate(target: str, rows: int, dim: int, batch_rows: int) -> float:
    """Rows/s through ``write_batch`` alone (data prepared before the clock starts)."""
    sink = open_sink(target)
    sink.open(SinkJob(job_id=f"bench{dim}", dim=dim, dtype="float32", model_sha256="0" * 64, replace=True))
    batches = [synthetic_rows(min(batch_rows, rows - o), dim, o) for o in range(0, rows, batch_rows)]
    started = time.perf_counter()
    for i, b in enumerate(batches):
        sink.write_batch(f"b{i:07d}", "d", b)
    seconds = time.perf_counter() - started
    sink.close(complete=False)
    return rows / seconds


def docstrings(n: int) -> Iterator[tuple[str, str]]:
    """``n`` real paragraphs: first paragraphs of stdlib docstrings (present everywhere)."""
    lib = Path(sysconfig.get_paths()["stdlib"])
    count = 0
    for path in sorted(lib.glob("*.py")) + sorted(lib.glob("*/*.py")):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                doc = ast.get_docstring(node)
                first = re.sub(r"\s+", " ", doc.split("\n\n")[0]).strip() if doc else ""
                if 40 <= len(first) <= 400:
                    yield f"d{count:06d}", first
                    count += 1
                    if count == n:
                        return


def job_rate(target: str, artifact: Path, docs: list[tuple[str, str]], cache: Path) -> float:
    """Paragraphs/s of one fresh local-mode job into ``target`` (the runner's own clock)."""
    from deposium.producer import submit
    from deposium.worker.config import load_settings

    settings = load_settings({"DEPOSIUM_CACHE_DIR": str(cache), "DEPOSIUM_ARTIFACT": str(artifact)})
    summary = submit(docs, out=target, local=True, artifact_dir=artifact, settings=settings, min_chars=1,
                     background=False, replace_output=True, name=uuid.uuid4().hex).wait()
    if not summary.ok:
        raise RuntimeError(f"job into {target} failed: {summary.line()}")
    return summary.rate


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m deposium.bench.sink_speed", description=__doc__.split("\n\n")[0])
    p.add_argument("--artifact", type=Path, required=True)
    p.add_argument("--pg", help="postgresql:// URL of a database with pgvector (default: a temporary cluster)")
    p.add_argument("--rows", type=int, default=20000, help="synthetic rows per sink-alone measurement")
    p.add_argument("--batch-rows", type=int, default=256, help="rows per write_batch (a typical batch)")
    p.add_argument("--paragraphs", type=int, default=1500, help="paragraphs in the end-to-end job")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)

    cluster = None
    pg = args.pg
    if pg is None:
        from deposium.bench.procs import PgCluster, find_bindir

        bindir = find_bindir()
        if bindir is None:
            p.error("no PostgreSQL installed; pass --pg URL")
        cluster = PgCluster(bindir).start()
        pg = cluster.url("bench").split("?")[0]
    work = Path(tempfile.mkdtemp(prefix="deposium-sink-measure-"))
    results: dict[str, object] = {"rows": args.rows, "batch_rows": args.batch_rows}
    try:
        for dim in (384, 768):
            print(f"  sinks alone, {dim} dimensions...", file=sys.stderr)
            results[f"pgvector_copy_rows_per_s_{dim}"] = round(
                sink_rate(f"{pg}?table=bench{dim}", args.rows, dim, args.batch_rows))
            results[f"lancedb_rows_per_s_{dim}"] = round(
                sink_rate(f"lancedb://{work}/lance?table=bench{dim}", args.rows, dim, args.batch_rows))
            results[f"parquet_rows_per_s_{dim}"] = round(
                sink_rate(str(work / f"bench{dim}.parquet"), args.rows, dim, args.batch_rows))
        docs = list(docstrings(args.paragraphs))
        rates: dict[str, list[float]] = {"parquet": [], "pgvector": [], "lancedb": []}
        for r in range(args.rounds):  # a fresh target per round: every job inserts, none updates
            targets = {"parquet": str(work / f"job{r}.parquet"), "pgvector": f"{pg}?table=job{r}",
                       "lancedb": f"lancedb://{work}/lance?table=job{r}"}
            for name, target in targets.items():
                rates[name].append(job_rate(target, args.artifact, docs, work / "cache"))
                print(f"  round {r + 1}: job into {name}: {rates[name][-1]:.1f} paragraphs/s", file=sys.stderr)
        med = {k: statistics.median(v) for k, v in rates.items()}
        results["job_paragraphs"] = len(docs)
        results["job_rate_paragraphs_per_s"] = {k: [round(x, 1) for x in v] for k, v in rates.items()}
        results["job_rate_median"] = {k: round(v, 1) for k, v in med.items()}
        results["job_rate_vs_parquet_pct"] = {k: round(100 * (v / med["parquet"] - 1), 1) for k, v in med.items()}
    finally:
        if cluster is not None:
            cluster.stop()
    if args.json:
        print(json.dumps(results, indent=1))
    else:
        for k, v in results.items():
            print(f"{k}: {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
