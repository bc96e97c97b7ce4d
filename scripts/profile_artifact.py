"""Where an artifact's time goes, for short queries and for paragraphs (figures for BENCHMARKS.md).

Usage: python scripts/profile_artifact.py ARTIFACT [--paragraphs N] [--queries N]

Why beside ``deposium-bench``'s per-op profile: a recipe decision needs the time of each part the
recipe adds (rotation, per-row quantization, the row-scale ``Mul``) rather than of each op type, and
a query's cost is mostly how many nodes run. Both are read from ONNX Runtime's own profile of the
worker's session options, on the gate's held-out paragraphs (document prompt, the Embedder's token
budget) and on short queries (<= 16 tokens with the query prompt, one per call). Query latency is
CPU time, median over two passes of every query, with profiling off.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import onnxruntime as ort

from convert.validate import load_paragraphs
from worker.bench.timing import short_queries
from worker.embedder import Embedder, session_options


def recipe_part(node_name: str, op_type: str) -> str:
    """The part of the int8 recipe (see convert.quantize / convert.rotate node names) a node belongs to."""
    if "/rot/" in node_name:
        return f"rotation {op_type}"
    if "/tq/" in node_name:
        if op_type == "MatMulIntegerToFloat":
            return "int8 GEMM"
        return "row-scale Mul" if node_name.endswith("/tq/out") else f"per-row quantization {op_type}"
    return f"{'attention' if 'self_attn' in node_name or '/attention/' in node_name else 'other'} {op_type}"


def profile(embedder: Embedder, work: Callable[[], None]) -> tuple[dict[str, float], dict[str, float], int]:
    """Kernel ms per op type and per recipe part, and the node kernels run, for ``work()`` under profiling."""
    original = embedder.session
    with tempfile.TemporaryDirectory(prefix="deposium-profile-") as tmp:
        opts = session_options(embedder.settings)
        opts.enable_profiling = True
        opts.profile_file_prefix = str(Path(tmp) / "ort")
        embedder.session = ort.InferenceSession(str(embedder.artifact_dir / embedder.model_file),
                                                sess_options=opts, providers=["CPUExecutionProvider"])
        try:
            work()  # warm-up: a fresh session's first calls allocate and are slow
            work()
            events = json.loads(Path(embedder.session.end_profiling()).read_text())
        finally:
            embedder.session = original
    kernel_events = sorted((e for e in events if e.get("cat") == "Node"
                            and str(e.get("name", "")).endswith("_kernel_time")), key=lambda e: e.get("ts", 0))
    by_op: dict[str, float] = {}
    by_part: dict[str, float] = {}
    kernels = 0
    for event in kernel_events[len(kernel_events) // 2:]:  # the second call of work() only
        op, ms = event.get("args", {}).get("op_name", "?"), float(event.get("dur", 0)) / 1000.0
        part = recipe_part(str(event["name"]).removesuffix("_kernel_time"), op)
        by_op[op] = by_op.get(op, 0.0) + ms
        by_part[part] = by_part.get(part, 0.0) + ms
        kernels += 1
    return by_op, by_part, kernels


def print_table(title: str, ms: dict[str, float], per: int, rows: int = 14) -> None:
    total = sum(ms.values()) or 1.0
    print(f"\n{title}: {total / per:.2f} ms of kernel time per call")
    for name, value in sorted(ms.items(), key=lambda item: -item[1])[:rows]:
        print(f"  {name:40s} {value / per:9.3f} ms {100 * value / total:5.1f} %")


def query_latency_ms(embedder: Embedder, queries: Sequence[str], task: str | None) -> float:
    times = []
    for _ in range(2):
        for query in queries:
            start = time.process_time()
            embedder.embed([query], task=task)
            times.append(time.process_time() - start)
    return 1000 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact", type=Path)
    parser.add_argument("--paragraphs", type=int, default=60, help="held-out paragraphs to profile")
    parser.add_argument("--queries", type=int, default=50)
    args = parser.parse_args()

    embedder = Embedder(args.artifact)
    prompts = embedder.manifest.prompts
    document, query = ("document" if "document" in prompts else None), ("query" if "query" in prompts else None)
    paragraphs = load_paragraphs(limit=max(args.paragraphs, 160))
    queries = short_queries(paragraphs, embedder, max_tokens=16, count=args.queries, task=query)
    paragraphs = paragraphs[: args.paragraphs]
    for text in queries[:5]:  # warm-up
        embedder.embed([text], task=query)
    tokens = embedder.tokenizer.count_tokens(queries, task=query)
    print(f"{len(queries)} queries, mean {statistics.mean(tokens):.1f} tokens: "
          f"{query_latency_ms(embedder, queries, query):.1f} ms median (CPU time, profiling off)")

    by_op, by_part, kernels = profile(embedder, lambda: [embedder.embed([q], task=query) for q in queries])
    print(f"node kernels per query: {kernels / len(queries):.0f}")
    print_table("queries by op type", by_op, len(queries))
    print_table("queries by recipe part", by_part, len(queries))
    by_op, by_part, _ = profile(embedder, lambda: embedder.embed(paragraphs, task=document))
    print_table(f"{len(paragraphs)} paragraphs by op type (per paragraph)", by_op, len(paragraphs))
    print_table(f"{len(paragraphs)} paragraphs by recipe part (per paragraph)", by_part, len(paragraphs), rows=20)


if __name__ == "__main__":
    main()
