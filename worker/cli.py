"""``deposium-worker``: verify the artifact, report the CPU, then run a prefork Celery worker.

Why verify in the parent before any child exists: a corrupt or tampered artifact must
stop the deployment with one clear message naming the file, not make every child crash
and restart in a loop, and not produce wrong vectors. The parent never creates an ONNX
Runtime session (children do, lazily, see ``deposium.worker.tasks``).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from deposium.worker.artifact import ArtifactError, Manifest, load_manifest
from deposium.worker.config import ConfigError, Settings, load_settings, mask_url
from deposium.worker.cpu import available_cpus, cpu_features, quantization_warning
from deposium.worker.kernels import probe_isa, require_library
from deposium.worker.variant import kernel_label, wants_unsigned_kernel

log = logging.getLogger("deposium.worker")

#: Exit codes: configuration error, artifact refused, Redis unreachable at start-up. Once Celery
#: runs, its own: 0 after a shutdown by SIGTERM (warm) or SIGQUIT (cold), 1 after SIGINT or an
#: unrecoverable error (e.g. the queue's Redis key holds something else).
EXIT_CONFIG = 2
EXIT_ARTIFACT = 3
EXIT_REDIS = 4


def wait_for_redis(settings: Settings) -> str | None:
    """Ping the broker, retrying (each attempt logged) for ``redis_connect_timeout_s``; return why
    it is unreachable, or None. Why here: Celery itself would retry 100 times with back-off, so a
    worker pointed at a wrong or dead Redis would hang for many minutes instead of saying so."""
    import redis

    url = settings.redis_url or ""
    give_up = time.monotonic() + settings.redis_connect_timeout_s
    while True:
        try:
            client = redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=5)
            try:
                client.ping()
            finally:
                client.close()
            return None
        except (redis.exceptions.RedisError, OSError, ValueError) as exc:
            left = give_up - time.monotonic()
            if left <= 0:
                return f"cannot reach Redis at {mask_url(url)}: {exc}"
            log.warning("Redis at %s unreachable (%s); retrying for %.0fs more", mask_url(url), exc, left)
            time.sleep(min(1.0, left))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="deposium-worker",
        description=(
            "Run a Celery embedding worker: one process per available CPU, each holding one "
            "single-threaded ONNX Runtime session. Configuration comes from the environment "
            "(REDIS_URL, DEPOSIUM_*; see README); these flags override it."
        ),
    )
    parser.add_argument("--artifact", type=Path, help="artifact directory (default: DEPOSIUM_ARTIFACT)")
    parser.add_argument(
        "--concurrency",
        type=int,
        help="worker processes (default: DEPOSIUM_CONCURRENCY, or 0 = CPUs available to this container)",
    )
    parser.add_argument("--queue", help="queue to consume (default: DEPOSIUM_QUEUE)")
    parser.add_argument("--token-budget", type=int, help="padded tokens per ONNX Runtime call")
    parser.add_argument("--loglevel", help="log level (default: DEPOSIUM_LOG_LEVEL)")
    parser.add_argument("--hostname", help="Celery node name (default: celery@<host>)")
    parser.add_argument(
        "--max-tasks-per-child", type=int, default=0, help="recycle a child after N batches (0 = never)"
    )
    return parser


def apply_overrides(settings: Settings, args: argparse.Namespace) -> Settings:
    """Settings with the flags given on the command line replacing environment values."""
    changes: dict[str, object] = {}
    if args.artifact is not None:
        changes["artifact_dir"] = args.artifact.expanduser()
    if args.concurrency is not None:
        if args.concurrency < 0:
            raise ConfigError("--concurrency must be >= 0")
        changes["concurrency"] = args.concurrency
    if args.queue:
        changes["queue"] = args.queue
    if args.token_budget is not None:
        if args.token_budget < 16:
            raise ConfigError("--token-budget must be at least 16")
        changes["token_budget"] = args.token_budget
    if args.loglevel:
        changes["log_level"] = args.loglevel.upper()
    return dataclasses.replace(settings, **changes) if changes else settings


def describe_startup(settings: Settings, manifest: Manifest, concurrency: int) -> list[str]:
    """The start-up lines (also used by tests): artifact, CPU, queue; the Redis password masked."""
    features = cpu_features()
    lines = [
        f"artifact {settings.artifact_dir}: model {manifest.source} ({manifest.architecture}), "
        f"dim {manifest.dim}, matryoshka dims {manifest.matryoshka_dims}, max_seq_length "
        f"{manifest.max_seq_length}, quantization {manifest.quantization.get('recipe', '?')}, "
        f"model.onnx sha256 {manifest.model_sha256[:12]}",
        f"cpu: int8 features {', '.join(sorted(features)) or 'none'}; {available_cpus()} CPUs available; "
        f"concurrency {concurrency}",
        f"broker {mask_url(settings.redis_url)}, queue {settings.queue!r}, "
        f"token budget {settings.token_budget}",
    ]
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = apply_overrides(load_settings(), args)
    except ConfigError as exc:
        print(f"deposium-worker: configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not settings.redis_url:
        print("deposium-worker: REDIS_URL is not set (the worker needs a broker)", file=sys.stderr)
        return EXIT_CONFIG
    features = cpu_features()
    try:
        manifest = load_manifest(settings.artifact_dir)
        unsigned = wants_unsigned_kernel(manifest.quantization, settings.int8_weights, features)
        fused_isa = ""
        if manifest.quantization.get("kernel_library"):  # refuse now, not in every forked child
            require_library(manifest.quantization["kernel_library"])
            fused_isa = probe_isa(settings.kernel_isa)  # a forced path this CPU lacks is refused here too
    except ArtifactError as exc:
        print(f"deposium-worker: refusing to start: {exc}", file=sys.stderr)
        return EXIT_ARTIFACT
    problem = wait_for_redis(settings)
    if problem:
        print(f"deposium-worker: {problem}", file=sys.stderr)
        return EXIT_REDIS
    concurrency = settings.concurrency or available_cpus()
    for line in describe_startup(settings, manifest, concurrency):
        log.info(line)
    log.info("int8 GEMM kernel %s (DEPOSIUM_INT8_WEIGHTS=%s)", kernel_label(unsigned, manifest.quantization),
             settings.int8_weights)
    if manifest.quantization.get("kernel_library"):
        log.info("fused kernels %s on %s (DEPOSIUM_KERNEL_ISA=%s; auto takes amx, then vnni, then avx2)",
                 manifest.quantization["kernel_library"], fused_isa, settings.kernel_isa)
    warning = quantization_warning(manifest.quantization, features)
    if warning:
        log.warning(warning)

    from deposium.worker import tasks
    from deposium.worker.celery_app import app, celery_config

    tasks.configure(settings)
    app.conf.update(celery_config(settings))
    worker_argv = [
        "worker",
        "--pool=prefork",
        f"--concurrency={concurrency}",
        f"--queues={settings.queue}",
        f"--loglevel={settings.log_level}",
    ]
    if args.hostname:
        worker_argv.append(f"--hostname={args.hostname}")
    if args.max_tasks_per_child:
        worker_argv.append(f"--max-tasks-per-child={args.max_tasks_per_child}")
    # Celery's own exit code (1 after an unrecoverable error), so a supervisor's "restart on
    # failure" sees the failure: app.worker_main() drops it and always returns as if all went well.
    from celery.bin.celery import celery as celery_command

    code = celery_command.main(args=["-A", "deposium.worker.celery_app", *worker_argv], standalone_mode=False)
    return code if isinstance(code, int) else 0


if __name__ == "__main__":
    sys.exit(main())
