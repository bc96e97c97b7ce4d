"""What ``--sync`` costs against a full run: CPU time of a sync after a small edit, and of a no-op sync.

    python -m deposium.bench.sync_cost --artifact DIR [--paragraphs 10000] [--sinks parquet,lancedb,pgvector]
        [--pg postgresql://user@host/db] [--repeats 3]

Per sink: a full sync of a corpus of stdlib-docstring paragraphs (documents of 40 paragraphs,
written as text files), then a sync after 1 % of the paragraphs changed (spread over many
documents) plus one document added and one deleted, then a sync of the unchanged folder; each
is timed as this process's CPU time (the local backend embeds in this process, so embedding is
included; a PostgreSQL server's own CPU is not). The ratios against the full sync are what
docs/sync.md and docs/benchmarks.md quote. The edited syncs are repeated on fresh copies of the
synced store and the medians reported.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from deposium.bench.corpus import stdlib_paragraphs


def _write(folder: Path, docs: dict[str, list[str]]) -> None:
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    for name, paras in docs.items():
        (folder / f"{name}.txt").write_text("\n\n".join(paras) + "\n", encoding="utf-8")


def _edit(docs: dict[str, list[str]], spare: list[str], share: float, seed: int) -> dict[str, list[str]]:
    """Change ``share`` of all paragraphs (each in a different place), add one document, delete one."""
    rng = random.Random(seed)
    new = {k: list(v) for k, v in docs.items()}
    names = sorted(new)
    total = sum(len(v) for v in new.values())
    for n in range(max(1, round(total * share))):
        name = names[rng.randrange(len(names) - 1)]
        k = rng.randrange(len(new[name]))
        new[name][k] = f"{new[name][k]} (revised {n})"
    del new[names[-1]]
    new["added"] = spare[:40]
    return new


def _cpu(fn) -> tuple[float, object]:  # noqa: ANN001 - any callable
    start = time.process_time()
    out = fn()
    return time.process_time() - start, out


def _target(kind: str, work: Path, name: str, pg: str | None) -> str:
    if kind == "parquet":
        return str(work / f"{name}.parquet")
    if kind == "lancedb":
        return f"lancedb://{work / 'lance'}?table={name}"
    return f"{pg}?table={name}"


def _copy_store(kind: str, src: str, dst: str, pg: str | None) -> None:
    if kind == "parquet":
        shutil.copyfile(src, dst)
    elif kind == "lancedb":
        import lancedb

        path, _, name = src.removeprefix("lancedb://").partition("?table=")
        new = dst.partition("?table=")[2]
        db = lancedb.connect(path)
        for suffix in ("", "_deposium_documents", "_deposium_sync"):
            db.create_table(new + suffix, db.open_table(name + suffix).to_arrow(), mode="overwrite")
    else:
        import psycopg

        a, b = src.partition("?table=")[2], dst.partition("?table=")[2]
        with psycopg.connect(pg or "", autocommit=True) as conn:
            for suffix in ("", "_deposium_documents", "_deposium_sync"):
                conn.execute(f'DROP TABLE IF EXISTS "{b}{suffix}"')
                conn.execute(f'CREATE TABLE "{b}{suffix}" (LIKE "{a}{suffix}" INCLUDING ALL)')
                conn.execute(f'INSERT INTO "{b}{suffix}" SELECT * FROM "{a}{suffix}"')


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m deposium.bench.sync_cost", description=__doc__.split("\n\n")[0])
    p.add_argument("--artifact", type=Path, required=True)
    p.add_argument("--paragraphs", type=int, default=10_000)
    p.add_argument("--sinks", default="parquet,lancedb,pgvector")
    p.add_argument("--pg", default=None, help="PostgreSQL URL without ?table= (needed for pgvector)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = p.parse_args(argv)

    from deposium.producer import submit
    from deposium.worker.config import load_settings

    paragraphs = list(dict.fromkeys(stdlib_paragraphs()))
    need = args.paragraphs + 40
    if len(paragraphs) < need:
        raise SystemExit(f"only {len(paragraphs)} distinct paragraphs available, need {need}")
    random.Random(0).shuffle(paragraphs)
    docs = {f"doc{i:05d}": paragraphs[i:i + 40] for i in range(0, args.paragraphs, 40)}
    spare = paragraphs[args.paragraphs:need]
    work = Path(tempfile.mkdtemp(prefix="deposium-sync-cost-"))
    settings = load_settings({**os.environ, "DEPOSIUM_CACHE_DIR": str(work / "cache"),
                              "DEPOSIUM_ARTIFACT": str(args.artifact)})
    results = []
    try:
        for kind in args.sinks.split(","):
            if kind == "pgvector" and not args.pg:
                print("pgvector: skipped (give --pg)")
                continue

            def run(folder: Path, target: str, fresh: bool = False) -> object:
                items = [(str(f.relative_to(work)), f.read_text(encoding="utf-8"))
                         for f in sorted(folder.glob("*.txt"))]
                return submit(items, out=target, local=True, sync=True, background=False, settings=settings,
                              artifact_dir=args.artifact, name="corpus", replace_output=fresh).wait()

            folder = work / "docs"
            _write(folder, docs)
            base = _target(kind, work, "base", args.pg)
            full_cpu, full = _cpu(lambda folder=folder, base=base: run(folder, base, fresh=True))
            edited_cpu, unchanged_cpu, summaries = [], [], []
            for r in range(args.repeats):
                _write(folder, docs)
                copy = _target(kind, work, f"edit{r}", args.pg)
                _copy_store(kind, base, copy, args.pg)
                _write(folder, _edit(docs, spare, 0.01, seed=r))
                cpu, summary = _cpu(lambda folder=folder, copy=copy: run(folder, copy))
                edited_cpu.append(cpu)
                summaries.append(summary)
                cpu, again = _cpu(lambda folder=folder, copy=copy: run(folder, copy))
                assert again.paragraphs_embedded == 0, again  # type: ignore[attr-defined]
                unchanged_cpu.append(cpu)
            row = {
                "sink": kind, "paragraphs": args.paragraphs, "full_cpu_s": round(full_cpu, 2),
                "full_embedded": full.paragraphs_embedded,  # type: ignore[attr-defined]
                "edited_cpu_s": round(statistics.median(edited_cpu), 2),
                "edited_share": round(statistics.median(edited_cpu) / full_cpu, 4),
                "edited_embedded": summaries[0].paragraphs_embedded,  # type: ignore[attr-defined]
                "unchanged_cpu_s": round(statistics.median(unchanged_cpu), 2),
                "unchanged_share": round(statistics.median(unchanged_cpu) / full_cpu, 4),
            }
            results.append(row)
            print(json.dumps(row))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    header = {"date": time.strftime("%Y-%m-%d"), "cpu": platform.processor() or platform.machine(),
              "artifact": str(args.artifact), "repeats": args.repeats, "results": results}
    if args.json:
        args.json.write_text(json.dumps(header, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
