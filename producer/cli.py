"""``deposium-submit``: embed files, directories, globs or stdin into a sink, resumably.

Exit codes: 0 every paragraph written; 1 the job finished but something failed (see the
errors file); 2 the job could not run (unknown flag or bad value, an input path that does not
exist or a glob that matches nothing, an output that cannot be written or is not ``.parquet``,
a task or dim the model does not offer, unknown or malformed sink target, Redis unreachable,
sink refused, another producer writing the same output or the same ``--shard``, ``--shard``
with stdin, ``--sync`` or ``--replace``), with one line saying why, before
any paragraph is sent and before any output or job record is created; 3 the job stopped
mid-way (Redis lost for longer than DEPOSIUM_REDIS_RECONNECT_TIMEOUT, no worker online for
``--wait-for-workers`` seconds), with one line saying why: resume with the same command;
130 interrupted (resume with the same command or ``--resume JOB_ID``).
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from deposium.worker.wire import WIRE_DTYPES

if TYPE_CHECKING:
    from deposium.producer.runner import JobOptions
    from deposium.producer.shard import Shard
    from deposium.worker.config import Settings

EXIT_OK, EXIT_FAILED, EXIT_ERROR, EXIT_STOPPED, EXIT_INTERRUPTED = 0, 1, 2, 3, 130


def _at_least(minimum: int):
    """An argparse type: an integer >= ``minimum`` (0 would otherwise silently mean "the default")."""
    def parse(raw: str) -> int:
        try:
            value = int(raw)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{raw!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, not {value}")
        return value
    parse.__name__ = "integer"
    return parse


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="deposium-submit",
        description="Split documents into paragraphs and embed them into a sink (Parquet by default). "
                    "In-process with --local or when REDIS_URL is unset; through Celery workers otherwise. "
                    "Re-running the same command resumes the job.",
        epilog="Inputs: PDF, HTML, Word .docx, Markdown and text files (recognised by content; text in "
               "UTF-8, UTF-16 or a legacy code page), .jsonl files with 'id' and 'text' per line, .csv/.parquet "
               "tables (one document per row), directories (recursively; other files are listed as "
               "unsupported), quoted globs, '-' for stdin. Rich formats need the 'documents' extra. "
               "Exit: 0 ok, 1 finished with failures, 2 could not run, 3 stopped mid-job (resume with the "
               "same command), 130 interrupted.")
    p.add_argument("paths", nargs="*", help="files, directories, globs, or - for stdin")
    p.add_argument("--out", "--sink", dest="out", default=None,
                   help="output: a .parquet path (default embeddings.parquet), "
                        "postgresql://user@host/db?table=NAME (pgvector; password from the URL or PGPASSWORD) "
                        "or lancedb://PATH?table=NAME")
    p.add_argument("--local", action="store_true",
                   help="embed in this process (default when REDIS_URL is unset)")
    p.add_argument("--resume", metavar="JOB_ID",
                   help="continue a job by id with its recorded inputs and options")
    p.add_argument("--job-id", help="name the job yourself instead of deriving it from inputs and options")
    prompt = p.add_mutually_exclusive_group()
    prompt.add_argument("--task", help="task prompt name from the model's manifest (default: its 'document' "
                                       "prompt when it has one, e.g. EmbeddingGemma; none otherwise)")
    prompt.add_argument("--no-prompt", action="store_true",
                        help="embed the texts as they are, even with a model that has a document prompt")
    p.add_argument("--dim", type=_at_least(1), help="Matryoshka dimension (one of the model's dims)")
    p.add_argument("--dtype", choices=list(WIRE_DTYPES), default="float32")
    p.add_argument("--batch-tokens", type=_at_least(1), default=None,
                   help="tokens per batch sent as one task (default DEPOSIUM_BATCH_TOKENS, 8192)")
    p.add_argument("--max-in-flight", type=_at_least(1), default=None,
                   help="batches sent but not yet written (default DEPOSIUM_MAX_IN_FLIGHT)")
    p.add_argument("--max-tokens", type=_at_least(1), default=None,
                   help="split paragraphs longer than this (default: the model's max sequence length)")
    p.add_argument("--min-chars", type=_at_least(0), default=20, help="merge fragments shorter than this")
    p.add_argument("--chunk-tokens", type=_at_least(8), default=None,
                   help="embed token-counted chunks of at most N tokens (cut at sentences, never across a "
                        "heading) instead of paragraphs")
    p.add_argument("--chunk-overlap", type=_at_least(0), default=0,
                   help="with --chunk-tokens: tokens of the previous chunk's last sentences repeated at the "
                        "start of the next (default 0)")
    p.add_argument("--artifact", type=Path, default=None,
                   help="artifact directory (default DEPOSIUM_ARTIFACT)")
    p.add_argument("--errors", type=Path, default=None, help="errors file (default OUT.errors.jsonl)")
    p.add_argument("--stdin-format", choices=["txt", "jsonl"], default="txt")
    p.add_argument("--readers", type=_at_least(1), default=None,
                   help="processes reading and splitting documents (default: the CPUs available); "
                        "the output is the same whatever the number")
    p.add_argument("--text-column", default="text", help="column holding the text in .csv/.parquet inputs")
    p.add_argument("--id-column", default="id",
                   help="column holding the document id in .csv/.parquet inputs (default id; FILE:ROW without it)")
    p.add_argument("--replace", action="store_true", help="overwrite an output that holds another job")
    p.add_argument("--index", choices=["hnsw", "ivf_pq"], default=None,
                   help="build a cosine vector index once the job is complete (pgvector: hnsw; "
                        "LanceDB: hnsw or ivf_pq)")
    sync = p.add_argument_group("sync", "keep the output in step with the sources (docs/sync.md)")
    sync.add_argument("--sync", action="store_true",
                      help="embed only what changed since the last --sync into this output, delete what vanished")
    missing = sync.add_mutually_exclusive_group()
    missing.add_argument("--keep-missing", action="store_true",
                         help="keep documents the store holds but the sources no longer name (incremental feeds)")
    missing.add_argument("--delete-missing", action="store_true",
                         help="confirm deleting documents of a store last synced from other sources")
    sync.add_argument("--dry-run", action="store_true", help="print what --sync would do; embed and write nothing")
    bar = p.add_mutually_exclusive_group()
    bar.add_argument("--progress", dest="progress", action="store_true", default=None,
                     help="show the progress bar even when stderr is not a terminal")
    bar.add_argument("--no-progress", dest="progress", action="store_false")
    p.add_argument("--wait-for-workers", type=_at_least(1), default=None, metavar="SECONDS",
                   help="queue mode: stop (exit 3, resumable) when no batch finished and no worker was "
                        "online on the queue for SECONDS (default DEPOSIUM_WAIT_FOR_WORKERS; 0 = wait)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON instead of one line")
    shards = p.add_mutually_exclusive_group()
    shards.add_argument("--shard", metavar="I/N", default=None,
                        help="run shard I of N of the job (0 <= I < N): this producer reads only the documents "
                             "whose id hashes to I; run all N, on one machine or several, into one output")
    shards.add_argument("--producers", type=_at_least(1), default=None, metavar="N",
                        help="run the job as N producer processes here (each with --shard k/N)")
    return p


def _input_bytes(paths: list[str], stdin_path: Path | None, shard: Shard | None = None) -> int | None:
    """Total size of what this producer reads, for the progress bar's ETA (text bytes done / input bytes)."""
    from deposium.producer.readers import shard_bytes

    total = shard_bytes([p for p in paths if p != "-"], shard)
    if "-" in paths and stdin_path is not None:
        try:
            total += stdin_path.stat().st_size
        except OSError:
            pass
    return total or None


def _share_done(progress: Any) -> Callable[[], float | None]:
    """Share of the job done, as the progress bar estimates it (input bytes read x read text
    committed), for the progress a queued job publishes to autoscalers; None until known."""
    def share() -> float | None:
        if not (progress.total_bytes and progress.read_bytes and progress.text_read):
            return None
        read = min(progress.read_bytes() / progress.total_bytes, 1.0)
        return read * min(progress.nbytes / progress.text_read, 1.0)
    return share


def missing_inputs(paths: list[str]) -> list[str]:
    """Inputs naming nothing: a path that does not exist, a glob that matches no file.

    Why checked before anything else: such an input is a typo, not a bad document; running
    the job without it would create an output and a job record for the wrong job.
    """
    missing = []
    for raw in paths:
        if raw == "-":
            continue
        if glob.has_magic(raw):
            if not glob.glob(raw, recursive=True):
                missing.append(f"{raw} (matches nothing)")
        elif not os.path.exists(raw):
            missing.append(raw)
    return missing


def _identity_extras(columns: dict[str, str], options: object) -> dict[str, object]:
    """Options of the document readers that shape paragraphs, only when not the default
    (so a job started before they existed keeps its id)."""
    extras: dict[str, object] = {k: v for k, v in columns.items() if v != k.split("_")[0]}
    if getattr(options, "chunk_tokens", 0):
        extras.update(chunk_tokens=options.chunk_tokens, chunk_overlap=options.chunk_overlap)  # type: ignore[attr-defined]
    return extras


def _reader_pool(readers: int | None, paths: list[str], plan: Any) -> Any:
    """The reader processes for this job, or None to read in this process (one reader, or stdin)."""
    from deposium.producer.documents.pool import ReaderPool, SplitSpec, available_cpus

    n = readers or available_cpus()
    if n < 2 or "-" in paths:
        return None
    o = plan.options
    return ReaderPool(n, SplitSpec(artifact_dir=str(plan.artifact_dir), task=o.task, max_tokens=o.max_tokens,
                                   min_chars=o.min_chars, chunk_tokens=o.chunk_tokens,
                                   chunk_overlap=o.chunk_overlap))


def _fail(message: str) -> int:
    print(f"deposium-submit: error: {message}", file=sys.stderr)
    return EXIT_ERROR


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.producers is not None and args.producers > 1:
        from deposium.producer.producers import run_producers

        return run_producers(list(sys.argv[1:] if argv is None else argv), args.producers,
                             progress=args.progress)
    try:
        return _main(args)
    except KeyboardInterrupt:
        print("deposium-submit: interrupted; re-run the same command to resume", file=sys.stderr)
        return EXIT_INTERRUPTED


def _main(args: argparse.Namespace) -> int:
    from deposium.producer.backends import BackendError, JobStopped, QueueBackend
    from deposium.producer.job import build_runner, job_store, plan_job, with_in_flight
    from deposium.producer.progress import Progress
    from deposium.producer.readers import Meter, read_inputs, spool
    from deposium.producer.runner import JobError, JobOptions
    from deposium.producer.shard import WHOLE, Shard
    from deposium.producer.sinks import SinkError, configure_sink
    from deposium.worker.artifact import ArtifactError
    from deposium.worker.config import ConfigError, load_settings, mask_url
    from deposium.worker.errors import EmbedRequestError
    from deposium.worker.tokenize import NO_PROMPT

    redis_lost: tuple[type[BaseException], ...] = ()
    try:
        from redis.exceptions import ConnectionError as RedisConnectionError
        from redis.exceptions import TimeoutError as RedisTimeoutError

        redis_lost = (RedisConnectionError, RedisTimeoutError)
    except ImportError:  # local mode without the queue extras
        pass

    stdin_path: Path | None = None
    try:
        shard = Shard.parse(args.shard) if args.shard else WHOLE
    except ValueError as exc:
        return _fail(str(exc))
    try:
        settings = load_settings()
        if args.wait_for_workers is not None:
            settings = dataclasses.replace(settings, wait_for_workers_s=args.wait_for_workers)
        if args.chunk_overlap and not args.chunk_tokens:
            return _fail("--chunk-overlap needs --chunk-tokens")
        if args.chunk_tokens and args.chunk_overlap >= args.chunk_tokens:
            return _fail(f"--chunk-overlap {args.chunk_overlap} must be less than --chunk-tokens {args.chunk_tokens}")
        options = JobOptions(task=NO_PROMPT if args.no_prompt else args.task, dim=args.dim, dtype=args.dtype,
                             batch_tokens=args.batch_tokens, max_tokens=args.max_tokens, min_chars=args.min_chars,
                             chunk_tokens=args.chunk_tokens or 0, chunk_overlap=args.chunk_overlap)
        paths = list(args.paths)
        target = args.out
        local = True if args.local else None
        artifact = args.artifact
        errors = args.errors
        if shard.sharded and (args.sync or args.replace or "-" in args.paths):
            return _fail(f"--shard {shard.label()} splits a job's input files: it cannot read stdin, and "
                         "--sync and --replace apply to a whole output (run them unsharded)")
        if args.resume:
            store = job_store(settings, local=bool(args.local) or not settings.redis_url)
            record = store.load(shard.key(args.resume))
            if record is None and not shard.sharded:
                counts = {r["spec"]["shard"]["count"] for r in store.list()
                          if r.get("spec", {}).get("shard", {}).get("job") == args.resume}
                if counts:
                    return _fail(f"job {args.resume} runs as {max(counts)} shards: resume each with "
                                 f"--resume {args.resume} --shard I/{max(counts)}")
            if record is None:
                return _fail(f"no job {args.resume} found "
                             f"({'in Redis' if settings.redis_url and not args.local else 'in the cache'})")
            spec = record["spec"]
            if "-" in spec["inputs"] or any(i.startswith("stdin:") for i in spec["inputs"]):
                return _fail("a job that read stdin is resumed by re-running it with the same stdin")
            paths, target = spec.get("paths", spec["inputs"]), spec["target"]
            args.text_column = spec.get("text_column", args.text_column)
            args.id_column = spec.get("id_column", args.id_column)
            if spec.get("cwd"):
                os.chdir(spec["cwd"])  # document ids are the paths as first given, relative to this
            options = JobOptions(**spec["options"])  # final: the task it started with, resolved
            artifact = artifact or Path(spec["artifact_dir"])
            errors = errors or Path(spec["errors_path"])
        if not paths:
            return _fail("no input given (paths, globs, directories or - for stdin)")
        missing = missing_inputs(paths)
        if missing:
            return _fail(f"no such input: {', '.join(missing)}")
        if not args.sync and (args.keep_missing or args.delete_missing or args.dry_run):
            return _fail("--keep-missing, --delete-missing and --dry-run apply to --sync only")
        if args.sync and (args.resume or args.job_id or "-" in paths):
            return _fail("--sync reads its state from the output itself: no --resume, --job-id or stdin")
        target = target or "embeddings.parquet"
        identity_inputs = []
        for raw in paths:
            if raw == "-":
                stdin_path, digest = spool(sys.stdin.buffer)
                identity_inputs.append(f"stdin:{digest}")
            else:
                identity_inputs.append(os.path.join(os.getcwd(), raw))
        options = with_in_flight(options, settings, args.max_in_flight)
        columns = {"text_column": args.text_column, "id_column": args.id_column}
        if args.sync:
            return _sync(args, settings, options, paths, identity_inputs, target, local, artifact, errors,
                         columns)
        plan = plan_job(inputs=identity_inputs, target=target, options=options, settings=settings,
                        local=local, artifact_dir=artifact, job_id=args.job_id or args.resume,
                        errors_path=errors, resolve_task=not args.resume,
                        extra_identity=_identity_extras(columns, options), shard=shard)
        plan.spec.update(paths=paths, cwd=os.getcwd(), stdin_format=args.stdin_format, **columns)
        meter = Meter()
        progress = Progress(enabled=args.progress, total_bytes=_input_bytes(paths, stdin_path, shard),
                            read_bytes=lambda: meter.nbytes)
        if plan.errors_path is not None:  # a URL target's errors file lives in the (maybe new) cache
            plan.errors_path.parent.mkdir(parents=True, exist_ok=True)
        configure_sink(plan.sink, index=args.index, model_id=str(plan.spec.get("model_source", "")))
        runner = build_runner(plan, progress=progress, replace=args.replace)
        if isinstance(runner.backend, QueueBackend):
            runner.backend.fraction_done = _share_done(progress)
        pool = _reader_pool(args.readers, paths, plan)
        try:
            summary = runner.run(read_inputs(paths, stdin_path=stdin_path, stdin_format=args.stdin_format,
                                             meter=meter, max_chars=settings.max_document_chars, pool=pool,
                                             shard=shard, **columns))
        except redis_lost as exc:  # the job record's Redis, gone mid-job for its whole retry time
            raise JobStopped(f"lost Redis at {mask_url(settings.redis_url)} ({exc}); the job can be "
                             "resumed") from None
        finally:
            if pool is not None:
                pool.close()
    except JobStopped as exc:
        print(f"deposium-submit: stopped: {exc}", file=sys.stderr)
        return EXIT_STOPPED
    except (BackendError, SinkError, JobError, ArtifactError, ConfigError, EmbedRequestError,
            ValueError, OSError) as exc:
        return _fail(str(exc))
    finally:
        if stdin_path is not None:
            stdin_path.unlink(missing_ok=True)
    if args.json:
        print(json.dumps(summary.to_json()))
    else:
        print(summary.line())
    return EXIT_OK if summary.ok else EXIT_FAILED


def _sync(args: argparse.Namespace, settings: Settings, options: JobOptions, paths: list[str],
          sources_key: list[str], target: str, local: bool | None, artifact: Path | None,
          errors: Path | None, columns: dict[str, str]) -> int:
    """``--sync``: the same inputs and options as a job, applied to the output as a synced store."""
    from deposium.producer.progress import Progress
    from deposium.producer.readers import Meter, read_inputs
    from deposium.producer.sync.job import run_sync

    meter = Meter()
    progress = Progress(enabled=args.progress and not args.dry_run, total_bytes=_input_bytes(paths, None),
                        read_bytes=lambda: meter.nbytes)
    # read in this process: a sync hashes each document's blocks and splits only the changed ones
    sources = read_inputs(paths, meter=meter, max_chars=settings.max_document_chars, **columns)
    summary = run_sync(sources, sources_key=sources_key, target=target,
                       options=options, settings=settings, local=local, artifact_dir=artifact,
                       keep_missing=args.keep_missing, delete_missing=args.delete_missing, dry_run=args.dry_run,
                       replace=args.replace, errors_path=errors, progress=progress, columns=columns)
    print(json.dumps(summary.to_json()) if args.json else summary.line())
    return EXIT_OK if summary.ok else EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
