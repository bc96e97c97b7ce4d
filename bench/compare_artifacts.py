"""Side-by-side speed of several artifacts in ONE process: short-query latency and paragraph tokens/s.

Usage: python -m deposium.bench.compare_artifacts ARTIFACT[@ISA] [ARTIFACT[@ISA] ...] [--paragraphs N] [--rounds R]

``@ISA`` (amx, vnni, avx2) runs an ``int8-fused`` artifact's kernels on that path (DEPOSIUM_KERNEL_ISA),
so the paths of one artifact can be timed side by side too.

Why a tool of its own beside ``deposium-bench``: recipe decisions need ratios between artifacts, and
on a shared, noisy host only ratios measured round-robin in the same process hold (the same
artifact measured 1,137 and 885 tokens/s an hour apart on one machine). Each round runs every
artifact once: the gate's held-out paragraphs (document prompt, the Embedder's token budget),
then up to 50 short queries (<= 16 tokens with the query prompt, one per call, each query on every
artifact back to back). CPU time of this process, medians over rounds (queries: over every call,
and the median of each query's time ratio to the first artifact's).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from pathlib import Path

from deposium.bench.timing import short_queries
from deposium.convert.validate import load_paragraphs
from deposium.worker.config import load_settings
from deposium.worker.embedder import Embedder


def open_artifact(spec: str) -> Embedder:
    """``PATH`` or ``PATH@ISA``: the artifact, its fused kernels on that path if one is named."""
    path, _, isa = spec.partition("@")
    settings = load_settings()
    return Embedder(Path(path), settings=dataclasses.replace(settings, kernel_isa=isa) if isa else settings)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifacts", nargs="+", help="artifact directories, each optionally @amx, @vnni or @avx2")
    parser.add_argument("--paragraphs", type=int, default=160, help="held-out paragraphs per round")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    embedders = {spec: open_artifact(spec) for spec in args.artifacts}
    paragraphs = load_paragraphs(limit=args.paragraphs)
    prompts = next(iter(embedders.values())).manifest.prompts  # models without task prompts: none
    document, query = ("document" if "document" in prompts else None), ("query" if "query" in prompts else None)
    queries = short_queries(paragraphs, next(iter(embedders.values())), max_tokens=16, count=50, task=query)
    tokens = {name: sum(e.tokenizer.count_tokens(paragraphs, task=document)) for name, e in embedders.items()}
    query_ms: dict[str, list[float]] = {name: [] for name in embedders}
    tokens_per_s: dict[str, list[float]] = {name: [] for name in embedders}
    for e in embedders.values():  # warm-up: first-call allocations stay out of the figures
        e.embed(queries[:3], task=query)
        e.embed(paragraphs[:8], task=document)
    for _ in range(args.rounds):
        for name, e in embedders.items():
            start = time.process_time()
            e.embed(paragraphs, task=document)
            tokens_per_s[name].append(tokens[name] / (time.process_time() - start))
        for text in queries:  # each query on every artifact back to back: the pairs share the noise
            for name, e in embedders.items():
                start = time.process_time()
                e.embed([text], task=query)
                query_ms[name].append((time.process_time() - start) * 1000)
    print(f"{len(paragraphs)} paragraphs ({next(iter(tokens.values()))} tokens), "
          f"{len(queries)} queries, {args.rounds} rounds; CPU time, medians")
    first = next(iter(embedders))
    for name in embedders:
        rounds = ", ".join(f"{v:,.0f}" for v in tokens_per_s[name])
        paired = statistics.median(a / b for a, b in zip(query_ms[name], query_ms[first], strict=True))
        print(f"{name}: {statistics.median(tokens_per_s[name]):,.0f} tokens/s ({rounds}); "
              f"query {statistics.median(query_ms[name]):.1f} ms (p90 "
              f"{statistics.quantiles(query_ms[name], n=10)[-1]:.1f}; {paired:.3f}x the first's, per-query median)")


if __name__ == "__main__":
    main()
