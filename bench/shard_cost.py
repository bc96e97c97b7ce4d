"""How the producer's coordination work scales with shards: 1 shard against N shards of one job.

    python -m deposium.bench.shard_cost [--artifact DIR] [--documents 2000] [--shards 4] [--rounds 3]
                                        [--corpus folder|jsonl] [--json]

Runs ``deposium-submit``'s own entry point (:func:`deposium.producer.cli.main`) in this process,
local mode, ``--readers 1``, into Parquet, once unsharded and once per shard (``--shard k/N``,
one after the other into the same output, so the last shard also publishes the output, as it
would in production). The corpus is a folder of small text documents (``folder``, what PDF,
web and Word ingestion looks like) or one JSON Lines file of the same documents (``jsonl``:
every shard reads the whole file and keeps its records).

Only inside this bench, the local backend is replaced by a trivial fake embedding (rows of a
fixed pool of random unit vectors), so the model's time does not hide the coordination work: reading,
splitting, token counting, hashing and dedupe, packing, sink writes and the job's own work
(the parts of :mod:`deposium.bench.producer_cost`, charged with ``time.process_time``). The fake
embedding's own CPU and the start-up (imports, tokenizer, planning) are left out.

Shards run on separate cores (or machines) in production, so N shards' aggregate rate is the
job's paragraphs divided by the CPU seconds of the slowest shard; the figure reported is that
rate divided by one unsharded producer's rate. Medians over ``--rounds`` (each into fresh outputs).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from deposium.bench.producer_cost import PARTS, TARGETS, CpuAccounts

FAKE = "fake embedding"
PUBLISH = "publishing the output"
#: The producer_cost parts plus the one-off join of the parts into ``--out`` (in the last shard).
SHARD_PARTS = (*PARTS, PUBLISH)


class FakeBackend:
    """A backend that "embeds" a batch at once with rows of a fixed random pool (bench only).

    Why random rows and not a constant: the sink compresses what it writes, and constant
    vectors would make every Parquet write look far cheaper than real vectors make it.
    """

    POOL = 4096

    def __init__(self, dim: int, model_sha256: str) -> None:
        self.model_sha256 = model_sha256
        self.sent = 0
        self.dim = dim
        pool = np.random.default_rng(0).standard_normal((self.POOL, dim)).astype(np.float32)
        self._pool = pool / np.linalg.norm(pool, axis=1, keepdims=True)
        self._next = 0
        self._done: list[Any] = []

    def submit(self, batch: Any) -> None:
        from deposium.producer.backends import Outcome

        n = len(batch.texts)
        rows = (np.arange(n) + self._next) % self.POOL
        self._next += n
        vectors = self._pool[rows]
        self._done.append(Outcome(batch, vectors, token_counts=[1] * n, truncated=[False] * n, errors=[None] * n))
        self.sent += 1

    def completed(self, block: bool) -> list[Any]:
        done, self._done = self._done, []
        return done

    def in_flight(self) -> int:
        return len(self._done)

    def close(self) -> None:
        self._done = []


def distinct_texts(paragraphs: Sequence[str], n: int) -> list[str]:
    """``n`` paragraphs, no two alike.

    Why: a repeated paragraph is embedded once per job but once per shard, and its vector is
    looked up in the sink, so repeats would make the two runs do different work.
    """
    from deposium.bench.corpus import repeat_to

    return repeat_to(list(dict.fromkeys(paragraphs)), n)


def write_folder(root: Path, paragraphs: Sequence[str], documents: int, per_document: int = 3) -> int:
    """``documents`` text files of ``per_document`` paragraphs; returns the paragraphs written."""
    texts = distinct_texts(paragraphs, documents * per_document)
    root.mkdir(parents=True, exist_ok=True)
    for d in range(documents):
        chunk = texts[d * per_document:(d + 1) * per_document]
        (root / f"doc{d:06d}.txt").write_text("\n\n".join(chunk) + "\n", encoding="utf-8")
    return len(texts)


def write_jsonl(path: Path, paragraphs: Sequence[str], documents: int, per_document: int = 3) -> int:
    texts = distinct_texts(paragraphs, documents * per_document)
    with path.open("w", encoding="utf-8") as fh:
        for d in range(documents):
            text = "\n\n".join(texts[d * per_document:(d + 1) * per_document])
            fh.write(json.dumps({"id": f"doc{d:06d}", "text": text}) + "\n")
    return len(texts)


def run_producer(corpus: Path, out: Path, shard: str | None) -> tuple[int, float, dict[str, float]]:
    """One producer run with accounting: (paragraphs, coordination CPU seconds, seconds per part);
    the run's duplicates (paragraphs that reused an identical one's vector) are under ``"duplicates"``."""
    import deposium.producer.job as job_module
    from deposium.producer.cli import main as submit_main

    real = job_module.make_backend

    def fake(plan: Any, job_id: str) -> FakeBackend:
        return FakeBackend(plan.dim, plan.manifest.model_sha256)

    accounts = CpuAccounts()
    for module, path, part in TARGETS:
        accounts.wrap(module, path, part)
    for name in ("submit", "completed"):
        accounts.wrap(__name__, f"FakeBackend.{name}", FAKE)
    accounts.wrap("deposium.producer.sinks.parquet", "ParquetSink._close", PUBLISH)
    job_module.make_backend = fake  # type: ignore[assignment]
    try:
        stdout = io.StringIO()
        argv = [str(corpus), "--local", "--readers", "1", "--out", str(out), "--json", "--no-progress"]
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(io.StringIO()):
            code = submit_main(argv + (["--shard", shard] if shard else []))
    finally:
        job_module.make_backend = real  # type: ignore[assignment]
        accounts.unwrap()
    if code != 0:
        raise RuntimeError(f"the producer failed (exit {code}): {stdout.getvalue().strip()[-500:]}")
    summary = json.loads(stdout.getvalue())
    parts = {p: accounts.seconds.get(p, 0.0) for p in SHARD_PARTS}
    cpu = sum(parts.values())
    parts["duplicates"] = float(summary["duplicates"])
    return int(summary["paragraphs"]), cpu, parts


def measure(corpus: Path, work: Path, shards: int, round_no: int) -> dict[str, Any]:
    """One round: the unsharded run and the ``shards`` runs, each into its own fresh output."""
    n1, cpu1, parts1 = run_producer(corpus, work / f"one-{round_no}.parquet", None)
    per_shard = [run_producer(corpus, work / f"sharded-{round_no}.parquet", f"{k}/{shards}")
                 for k in range(shards)]
    total = sum(n for n, _, _ in per_shard)
    if total != n1:
        raise RuntimeError(f"the shards embedded {total} paragraphs, the unsharded run {n1}")
    slowest = max(cpu for _, cpu, _ in per_shard)
    slowest_before_publish = max(cpu - parts[PUBLISH] for _, cpu, parts in per_shard)
    return {"paragraphs": n1, "one_cpu_s": cpu1, "shard_cpu_s": [cpu for _, cpu, _ in per_shard],
            "shard_paragraphs": [n for n, _, _ in per_shard], "one_rate": n1 / cpu1,
            "sharded_rate": total / slowest, "one_parts_s": parts1,
            "one_rate_before_publish": n1 / (cpu1 - parts1[PUBLISH]),
            "sharded_rate_before_publish": total / slowest_before_publish,
            "shard_parts_s": [parts for _, _, parts in per_shard]}


def summarize(rounds: Sequence[dict[str, Any]], shards: int, corpus_kind: str) -> dict[str, Any]:
    med = statistics.median
    one = med([r["one_rate"] for r in rounds])
    sharded = med([r["sharded_rate"] for r in rounds])
    return {
        "corpus": corpus_kind, "rounds": len(rounds), "shards": shards, "paragraphs": rounds[0]["paragraphs"],
        "shard_paragraphs": rounds[0]["shard_paragraphs"],
        "largest_shard_over_mean": round(max(rounds[0]["shard_paragraphs"]) * shards
                                         / sum(rounds[0]["shard_paragraphs"]) - 1, 3),
        "one_shard_paragraphs_per_cpu_s": round(one),
        "sharded_paragraphs_per_slowest_shard_cpu_s": round(sharded),
        "ratio": round(med([r["sharded_rate"] / r["one_rate"] for r in rounds]), 2),
        "ratio_before_publish": round(med([r["sharded_rate_before_publish"] / r["one_rate_before_publish"]
                                           for r in rounds]), 2),
        "one_cpu_s": round(med([r["one_cpu_s"] for r in rounds]), 3),
        "shard_cpu_s_median_round": [round(v, 3) for v in sorted(rounds, key=lambda r: r["sharded_rate"])[
            len(rounds) // 2]["shard_cpu_s"]],
        "one_parts_s": {p: round(med([r["one_parts_s"][p] for r in rounds]), 3) for p in SHARD_PARTS},
        "shard_parts_s_sum": {p: round(med([sum(s[p] for s in r["shard_parts_s"]) for r in rounds]), 3)
                              for p in SHARD_PARTS},
        "duplicates_one": int(rounds[0]["one_parts_s"]["duplicates"]),
        "duplicates_shards": int(sum(s["duplicates"] for s in rounds[0]["shard_parts_s"])),
    }


def render(f: dict[str, Any]) -> str:
    lines = [f"{f['paragraphs']:,} paragraphs ({f['corpus']} corpus), {f['rounds']} rounds, medians of "
             "coordination CPU (fake embedding):", "",
             f"- 1 producer: {f['one_shard_paragraphs_per_cpu_s']:,} paragraphs per CPU second "
             f"({f['one_cpu_s']} s)",
             f"- {f['shards']} shards: {f['sharded_paragraphs_per_slowest_shard_cpu_s']:,} paragraphs per CPU "
             f"second of the slowest shard (shards' CPU s: {f['shard_cpu_s_median_round']}; "
             f"paragraphs: {f['shard_paragraphs']}, the largest {f['largest_shard_over_mean']:.1%} above "
             "the mean)",
             f"- {f['shards']} shards' aggregate coordination rate / 1 shard's: **{f['ratio']}x** "
             f"({f['ratio_before_publish']}x before publishing the output, which the last "
             "shard runs alone)",
             f"- duplicates reused instead of embedded: {f['duplicates_one']:,} by 1 producer, "
             f"{f['duplicates_shards']:,} by the shards (each dedupes its own documents only)", "",
             "| part | 1 producer, CPU s | all shards together, CPU s |", "|---|---:|---:|"]
    for p in SHARD_PARTS:
        lines.append(f"| {p} | {f['one_parts_s'][p]:.3f} | {f['shard_parts_s_sum'][p]:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m deposium.bench.shard_cost", description=__doc__.split("\n\n")[0])
    p.add_argument("--artifact", type=Path, default=None,
                   help="artifact directory, for its tokenizer (default: the bench's MiniLM int8 artifact)")
    p.add_argument("--documents", type=int, default=2000, help="documents of 3 paragraphs each")
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--corpus", choices=["folder", "jsonl"], default="folder")
    p.add_argument("--work", type=Path, default=None, help="working directory (default: a temporary one)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    if args.documents < 1 or args.rounds < 1 or args.shards < 2:
        p.error("--documents and --rounds must be >= 1, --shards >= 2")

    from deposium.bench.corpus import stdlib_paragraphs
    from deposium.bench.producer_cost import default_artifact
    from deposium.worker.config import load_settings

    work = Path(args.work or tempfile.mkdtemp(prefix="deposium-shard-cost-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    artifact = args.artifact or default_artifact(load_settings().cache_dir / "bench")
    # relative inputs: document ids (and so the split) do not depend on where the corpus lives
    os.chdir(work)
    if args.corpus == "folder":
        corpus = Path("docs")
        write_folder(corpus, stdlib_paragraphs(), args.documents)
    else:
        corpus = Path("docs.jsonl")
        write_jsonl(corpus, stdlib_paragraphs(), args.documents)
    os.environ.pop("REDIS_URL", None)
    os.environ.update(DEPOSIUM_ARTIFACT=str(artifact), DEPOSIUM_CACHE_DIR=str(work / "cache"))
    run_producer(corpus, work / "warm-up.parquet", None)  # imports and first-use costs out of the rounds
    rounds = []
    for r in range(args.rounds):
        rounds.append(measure(corpus, work, args.shards, r))
        print(f"  round {r + 1}/{args.rounds}: ratio {rounds[-1]['sharded_rate'] / rounds[-1]['one_rate']:.2f}",
              file=sys.stderr, flush=True)
    figures = summarize(rounds, args.shards, args.corpus)
    print(json.dumps(figures, indent=1) if args.json else render(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
