"""Where an artifact's time goes, for short queries and for paragraphs (figures for the benchmarks docs).

Usage: python -m deposium.bench.profile_artifact ARTIFACT [--paragraphs N] [--queries N]

Why beside ``deposium-bench``'s per-op profile: a recipe decision needs the time of each part the
recipe adds (rotation, per-row quantization, the row-scale ``Mul``) rather than of each op type, and
a query's cost is mostly how many nodes run. Both are read from ONNX Runtime's own profile of the
worker's session options, on the gate's held-out paragraphs (document prompt, the Embedder's token
budget) and on short queries (<= 16 tokens with the query prompt, one per call). Query latency is
CPU time, median over two passes of every query, with profiling off.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from deposium.bench.timing import profile_kernel_events, short_queries, summarize_profile
from deposium.convert.validate import load_paragraphs
from deposium.worker.embedder import Embedder


def recipe_part(node_name: str, op_type: str) -> str:
    """The part of the int8 recipe (see convert.quantize / convert.rotate node names) a node belongs to."""
    if "/rot/" in node_name:
        return f"rotation {op_type}"
    if "/tq/" in node_name:
        if op_type == "MatMulIntegerToFloat":
            return "int8 GEMM"
        if node_name.endswith(("/tq/out", "/tq/merged/scaled_all")):
            return "row-scale Mul"
        if node_name.endswith(("/split", "/wide_w")):
            return f"GEMM output {op_type}"
        return f"per-row quantization {op_type}"
    return f"{'attention' if 'self_attn' in node_name or '/attention/' in node_name else 'other'} {op_type}"


def part_of(event: dict) -> str:
    return recipe_part(str(event["name"]).removesuffix("_kernel_time"), event.get("args", {}).get("op_name", "?"))


def profile(embedder: Embedder, work: Callable[[], object]) -> list[dict]:
    """Kernel events of the second of two ``work()`` calls: a fresh session's first call allocates."""
    def twice() -> None:
        work()
        work()

    events = profile_kernel_events(embedder, twice)
    return events[len(events) // 2:]


def print_table(title: str, rows: list[tuple[str, float, float]], per: int, limit: int = 14) -> None:
    print(f"\n{title}: {sum(ms for _, ms, _ in rows) / per:.2f} ms of kernel time per call")
    for name, ms, share in rows[:limit]:
        print(f"  {name:40s} {ms / per:9.3f} ms {share:5.1f} %")


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

    events = profile(embedder, lambda: [embedder.embed([q], task=query) for q in queries])
    print(f"node kernels per query: {len(events) / len(queries):.0f}")
    print_table("queries by op type", summarize_profile(events), len(queries))
    print_table("queries by recipe part", summarize_profile(events, key=part_of), len(queries))
    events = profile(embedder, lambda: embedder.embed(paragraphs, task=document))
    title = f"{len(paragraphs)} paragraphs by %s (per paragraph)"
    print_table(title % "op type", summarize_profile(events), len(paragraphs))
    print_table(title % "recipe part", summarize_profile(events, key=part_of), len(paragraphs), limit=20)

if __name__ == "__main__":
    main()
