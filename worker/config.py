"""Every environment variable the project reads, in one place.

Why one module: operators configure workers on Railway and in compose files
through the environment only, so the full list (and its defaults) must be
discoverable here and in README's "Configuration" table. No other module
calls ``os.environ`` for configuration; they receive a :class:`Settings`.
Secrets (the Redis password inside ``REDIS_URL``, Flower credentials) are
only ever read from the environment and are masked by :func:`mask_url`
before anything is logged.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from urllib.parse import unquote

from deposium.worker.kernels import ISAS as KERNEL_ISAS

DEFAULT_CACHE_DIR = Path.home() / ".cache" / "deposium"


class ConfigError(ValueError):
    """An environment variable holds a value we cannot use."""


def _int(env: Mapping[str, str], name: str, default: int, minimum: int = 0) -> int:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not an integer") from None
    if value < minimum:
        raise ConfigError(f"{name}={value} must be >= {minimum}")
    return value


def _float(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a number") from None
    if value < 0:
        raise ConfigError(f"{name}={value} must be >= 0")
    return value


def _bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    lowered = raw.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off"}:
        return False
    raise ConfigError(f"{name}={raw!r} is not a boolean (use 1/0, true/false)")


@dataclass(frozen=True)
class Settings:
    """Resolved configuration. Field docs double as README's configuration table."""

    # --- queue -------------------------------------------------------------------------------
    #: Broker and result backend. Unset means "no queue": the producer runs in-process (--local).
    redis_url: str | None = None
    #: Celery queue the producer sends to and workers consume.
    queue: str = "deposium"
    #: Seconds a delivered-but-unacknowledged batch stays invisible before Redis redelivers it.
    #: Must exceed the hard time limit so a slow batch is never run twice concurrently.
    visibility_timeout_s: int = 3600
    #: Soft and hard per-batch time limits (seconds). The soft limit records a clean failure.
    task_soft_time_limit_s: int = 600
    #: Hard per-batch time limit (seconds): the child running the batch is killed.
    task_time_limit_s: int = 900
    #: Seconds a finished batch's result stays in Redis if the producer never collects it.
    result_expires_s: int = 86400
    #: How many times a batch that crashed or timed out a worker is retried before it is failed.
    max_batch_retries: int = 3
    #: Seconds to keep retrying a Redis connection at start-up before failing (0 = fail fast).
    redis_connect_timeout_s: float = 10.0

    # --- model / runtime ---------------------------------------------------------------------
    #: Artifact directory written by deposium-convert (model.onnx + model.onnx.data + tokenizer.json + manifest.json).
    artifact_dir: Path = DEFAULT_CACHE_DIR / "artifacts" / "all-MiniLM-L6-v2"
    #: Cache for artifacts, downloaded models and job state.
    cache_dir: Path = DEFAULT_CACHE_DIR
    #: Padded tokens per ONNX Runtime call (rows x longest row). Small on purpose: a call's
    #: activations must stay under the mmap threshold and in cache (at 4096, page faults took
    #: over half the CPU and packed batches ran 3x slower than batch 1; worker/embedder.py).
    token_budget: int = 128
    #: ONNX Runtime CPU memory arena / memory pattern (off by default: RSS must not ratchet
    #: upwards as batch shapes vary; measured in docs/benchmarks.md).
    ort_arena: bool = False
    #: ONNX Runtime memory pattern planning (off by default, same measurement).
    ort_mem_pattern: bool = False
    #: glibc mmap threshold (bytes) fixed per worker process so RSS stays flat as batch shapes
    #: vary (worker/memory.py has the measurement); 0 keeps glibc's dynamic default.
    malloc_mmap_threshold: int = 4 * 1024 * 1024
    #: glibc trim threshold (bytes): free heap kept for the next call instead of being returned
    #: and zero-filled again (worker/memory.py); 0 keeps glibc's default.
    malloc_trim_threshold: int = 32 * 1024 * 1024
    #: Which int8 GEMM kernel to run: ``auto`` asks for ONNX Runtime's u8 x u8 one where the CPU's u8 x s8
    #: GEMM saturates (AVX2 without VNNI/AMX; worker/variant.py), ``signed`` / ``unsigned`` force one.
    int8_weights: str = "auto"
    #: Which path the fused kernels of ``int8-fused`` artifacts run (worker/kernels): ``auto`` takes the
    #: fastest the CPU offers (AMX, then AVX-512 VNNI, then AVX2); ``amx`` / ``vnni`` / ``avx2`` force one
    #: (refused where the CPU lacks it). Every path gives the same vectors, bit for bit.
    kernel_isa: str = "auto"
    #: Load the model once in the prefork parent so every child shares its weights copy-on-write
    #: (PSS per child measured in docs/benchmarks.md); 0 loads a private copy in each child instead.
    share_model: bool = True

    # --- limits enforced by the worker (not only by the producer) ----------------------------
    #: Most paragraphs one task may carry; a larger batch is refused whole by the worker.
    max_batch_paragraphs: int = 512
    #: Most UTF-8 bytes of text one task may carry; a larger batch is refused whole.
    max_batch_bytes: int = 8 * 1024 * 1024
    #: Largest paragraph the worker embeds; a larger one gets a per-paragraph error.
    max_paragraph_bytes: int = 1024 * 1024

    # --- worker process ----------------------------------------------------------------------
    #: Worker processes per replica. 0 = CPUs this container may actually use (cgroup quota, affinity).
    concurrency: int = 0
    #: Port for the Prometheus exporter of throughput metrics (0 = off).
    metrics_port: int = 0
    #: Address the exporter binds: 0.0.0.0 (IPv4), or :: for dual-stack (IPv6-only private networks).
    metrics_addr: str = "0.0.0.0"
    #: Directory for prometheus_client multiprocess files (prefork-safe metrics).
    metrics_dir: Path | None = None
    #: Log level of deposium-worker and deposium-submit.
    log_level: str = "INFO"

    # --- producer ----------------------------------------------------------------------------
    #: Batches sent to the queue but not yet written out (bounds Redis and producer memory).
    max_in_flight: int = 8
    #: Tokens (prompt and special tokens included) of distinct text per batch sent as one task.
    #: Part of a job's identity: changing it starts a new job instead of resuming.
    batch_tokens: int = 8192
    #: ``--sync``: paragraphs of changed documents embedded, then committed to the store together.
    #: Smaller commits more often (less work lost to a kill); larger keeps more batches in flight.
    sync_group_paragraphs: int = 4096
    #: Seconds the producer waits for a sent batch before re-sending it (0 = visibility
    #: timeout + hard time limit, i.e. after Redis itself would have redelivered it).
    batch_timeout_s: int = 0
    #: Seconds the producer keeps retrying a lost Redis connection mid-job (a Redis restart)
    #: before it stops; the job then resumes with the same command.
    redis_reconnect_timeout_s: int = 120
    #: Seconds without a finished batch before the producer says why it waits (workers online,
    #: batches queued and held); repeated every ten times as long while nothing finishes.
    stall_report_s: int = 30
    #: Seconds the producer waits with no batch finishing and no worker online on its queue before
    #: it stops (exit 3, resumable). 0 = wait for workers as long as it takes.
    wait_for_workers_s: int = 0

    # --- replica liveness --------------------------------------------------------------------
    #: Seconds a worker's claim on the batches it holds lives without a refresh (refreshed every
    #: third of it). A replica lost whole (killed, cut off) lets its batches go after this, and the
    #: producer re-sends them, instead of waiting for the visibility timeout.
    hold_ttl_s: int = 20
    #: Seconds a worker asked to stop (SIGTERM: a scale-down, a redeploy) lets its running batches
    #: finish; then it stops them and returns them to the queue for other replicas. Keep it under the
    #: platform's drain time (railway.json ``drainingSeconds``). 0 = wait for them however long.
    drain_s: int = 100
    #: Most characters of extracted text one document may yield (PDF, HTML, DOCX, text, a JSON
    #: line or table row); a larger document gets a per-document error and the job goes on.
    max_document_chars: int = 50_000_000

    # --- tests only ----------------------------------------------------------------------------
    #: Fault injection for the reliability tests (tests/test_faults.py). Empty = off; never set it
    #: in a deployment. ``crash:MARKER`` SIGKILLs the worker child running a batch that holds a
    #: paragraph containing MARKER, ``hang:MARKER`` blocks that batch until its time limit, and
    #: ``sleep=SECONDS:MARKER`` delays it (so a test can kill a process that is mid-batch).
    test_fault: str = ""

    extra: dict[str, str] = field(default_factory=dict, compare=False, repr=False)


#: Environment variable -> Settings field, with the parser used. The README table mirrors this.
ENVIRONMENT: dict[str, str] = {
    "REDIS_URL": "redis_url",
    "DEPOSIUM_QUEUE": "queue",
    "DEPOSIUM_VISIBILITY_TIMEOUT": "visibility_timeout_s",
    "DEPOSIUM_TASK_SOFT_TIME_LIMIT": "task_soft_time_limit_s",
    "DEPOSIUM_TASK_TIME_LIMIT": "task_time_limit_s",
    "DEPOSIUM_RESULT_EXPIRES": "result_expires_s",
    "DEPOSIUM_MAX_BATCH_RETRIES": "max_batch_retries",
    "DEPOSIUM_REDIS_CONNECT_TIMEOUT": "redis_connect_timeout_s",
    "DEPOSIUM_ARTIFACT": "artifact_dir",
    "DEPOSIUM_CACHE_DIR": "cache_dir",
    "DEPOSIUM_TOKEN_BUDGET": "token_budget",
    "DEPOSIUM_ORT_ARENA": "ort_arena",
    "DEPOSIUM_ORT_MEM_PATTERN": "ort_mem_pattern",
    "DEPOSIUM_MALLOC_MMAP_THRESHOLD": "malloc_mmap_threshold",
    "DEPOSIUM_MALLOC_TRIM_THRESHOLD": "malloc_trim_threshold",
    "DEPOSIUM_INT8_WEIGHTS": "int8_weights",
    "DEPOSIUM_KERNEL_ISA": "kernel_isa",
    "DEPOSIUM_SHARE_MODEL": "share_model",
    "DEPOSIUM_MAX_BATCH_PARAGRAPHS": "max_batch_paragraphs",
    "DEPOSIUM_MAX_BATCH_BYTES": "max_batch_bytes",
    "DEPOSIUM_MAX_PARAGRAPH_BYTES": "max_paragraph_bytes",
    "DEPOSIUM_CONCURRENCY": "concurrency",
    "DEPOSIUM_METRICS_PORT": "metrics_port",
    "DEPOSIUM_METRICS_ADDR": "metrics_addr",
    "PROMETHEUS_MULTIPROC_DIR": "metrics_dir",
    "DEPOSIUM_LOG_LEVEL": "log_level",
    "DEPOSIUM_MAX_IN_FLIGHT": "max_in_flight",
    "DEPOSIUM_BATCH_TOKENS": "batch_tokens",
    "DEPOSIUM_SYNC_GROUP_PARAGRAPHS": "sync_group_paragraphs",
    "DEPOSIUM_BATCH_TIMEOUT": "batch_timeout_s",
    "DEPOSIUM_REDIS_RECONNECT_TIMEOUT": "redis_reconnect_timeout_s",
    "DEPOSIUM_STALL_REPORT": "stall_report_s",
    "DEPOSIUM_WAIT_FOR_WORKERS": "wait_for_workers_s",
    "DEPOSIUM_HOLD_TTL": "hold_ttl_s",
    "DEPOSIUM_DRAIN_SECONDS": "drain_s",
    "DEPOSIUM_MAX_DOCUMENT_CHARS": "max_document_chars",
    "DEPOSIUM_TEST_FAULT": "test_fault",
}

#: Accepted values of DEPOSIUM_TEST_FAULT (tests only, see Settings.test_fault).
TEST_FAULT = re.compile(r"(?P<action>crash|hang|sleep=(?P<seconds>[0-9]+(?:\.[0-9]+)?)):(?P<marker>.+)", re.S)


def load_settings(env: Mapping[str, str] | None = None) -> Settings:
    """Read :class:`Settings` from ``env`` (default: ``os.environ``), validating every value."""
    env = os.environ if env is None else env
    defaults = Settings()
    cache_dir = Path(env.get("DEPOSIUM_CACHE_DIR") or defaults.cache_dir).expanduser()
    default_artifact = cache_dir / "artifacts" / "all-MiniLM-L6-v2"
    values: dict[str, object] = {}
    for f in fields(Settings):
        if f.name == "extra":
            continue
        var = next((k for k, v in ENVIRONMENT.items() if v == f.name), None)
        default = getattr(defaults, f.name)
        if f.name == "artifact_dir":
            default = default_artifact
        if var is None:
            values[f.name] = default
        elif isinstance(default, bool):
            values[f.name] = _bool(env, var, default)
        elif isinstance(default, int):
            values[f.name] = _int(env, var, default)
        elif isinstance(default, float):
            values[f.name] = _float(env, var, default)
        elif f.name in {"artifact_dir", "cache_dir", "metrics_dir"}:
            raw = env.get(var)
            values[f.name] = Path(raw).expanduser() if raw else default
        else:
            raw = env.get(var)
            values[f.name] = raw if raw else default
    settings = Settings(**values)  # type: ignore[arg-type]
    if settings.task_time_limit_s <= settings.task_soft_time_limit_s:
        raise ConfigError("DEPOSIUM_TASK_TIME_LIMIT must be greater than DEPOSIUM_TASK_SOFT_TIME_LIMIT")
    if settings.visibility_timeout_s <= settings.task_time_limit_s:
        raise ConfigError(
            "DEPOSIUM_VISIBILITY_TIMEOUT must be greater than DEPOSIUM_TASK_TIME_LIMIT, "
            "or Redis redelivers batches that are still running"
        )
    if settings.test_fault and not TEST_FAULT.fullmatch(settings.test_fault):
        raise ConfigError("DEPOSIUM_TEST_FAULT must be crash:MARKER, hang:MARKER or sleep=SECONDS:MARKER")
    if settings.int8_weights not in ("auto", "signed", "unsigned"):
        raise ConfigError("DEPOSIUM_INT8_WEIGHTS must be auto, signed or unsigned")
    if settings.kernel_isa not in ("auto", *KERNEL_ISAS):
        raise ConfigError(f"DEPOSIUM_KERNEL_ISA must be auto, {', '.join(KERNEL_ISAS)}")
    if settings.hold_ttl_s < 3:
        raise ConfigError("DEPOSIUM_HOLD_TTL must be at least 3 (it is refreshed every third of it)")
    if settings.stall_report_s < 1:
        raise ConfigError("DEPOSIUM_STALL_REPORT must be at least 1")
    if settings.token_budget < 16:
        raise ConfigError("DEPOSIUM_TOKEN_BUDGET must be at least 16")
    if settings.redis_url and (password := url_password(settings.redis_url)) and PLACEHOLDER_SECRET.search(password):
        raise ConfigError(
            "REDIS_URL holds a placeholder password (a 'change-me' value from .env.example): "
            "set REDIS_PASSWORD (compose) or REDIS_URL to a secret of your own"
        )
    return settings


_URL_PASSWORD = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<user>[^:@/]*):(?P<pw>[^@/]*)@")

#: The publicly known placeholder secrets of the example configuration (``change-me-redis``,
#: ``changeme``...). Why refuse them: a copied example left unedited would otherwise run the broker
#: (and so every worker) behind a password anyone can read in this repository. The Redis and Flower
#: entrypoints (docker/) refuse the same pattern.
PLACEHOLDER_SECRET = re.compile(r"change[-_]?me", re.IGNORECASE)


def url_password(url: str) -> str:
    """The password part of ``scheme://user:password@host`` (empty when the URL carries none)."""
    match = _URL_PASSWORD.match(url)
    return unquote(match["pw"]) if match else ""


def mask_url(url: str | None, *, drop_password: bool = False) -> str:
    """Return ``url`` with any password replaced by ``***`` (safe to log).

    ``drop_password`` removes it instead (``scheme://user@host``): a URL that is stored and
    used again later (a job's sink target), where a client then reads the password from its
    own environment (libpq's ``PGPASSWORD``) rather than trying ``***``.
    """
    if not url:
        return str(url)
    if drop_password:
        return _URL_PASSWORD.sub(lambda m: f"{m['scheme']}{m['user']}@", url)
    return _URL_PASSWORD.sub(lambda m: f"{m['scheme']}{m['user']}:***@", url)


def _field_docs() -> dict[str, str]:
    """The ``#:`` comment above each Settings field, read from this file (one source of truth)."""
    import inspect

    docs: dict[str, str] = {}
    pending: list[str] = []
    for line in inspect.getsource(Settings).splitlines():
        stripped = line.strip()
        if stripped.startswith("#:"):
            pending.append(stripped[2:].strip())
        elif ":" in stripped and not stripped.startswith(("#", '"')) and pending is not None:
            name = stripped.split(":", 1)[0].strip()
            if name.isidentifier():
                docs[name] = " ".join(pending)
            pending = []
        elif not stripped.startswith("#"):
            pending = []
    return docs


def configuration_table() -> str:
    """Markdown table of every environment variable, its default and meaning (docs/guide.md mirrors it)."""
    defaults = Settings()
    docs = _field_docs()
    rows = ["| variable | default | meaning |", "|---|---|---|"]
    for var, name in ENVIRONMENT.items():
        default = getattr(defaults, name)
        shown = "unset" if default in (None, "") else str(default).replace(str(Path.home()), "~")
        rows.append(f"| `{var}` | `{shown}` | {docs.get(name, '')} |")
    return "\n".join(rows)


def main() -> int:
    """Print the configuration table; a closed stdout (``| head``) ends it quietly."""
    import sys

    try:
        print(configuration_table(), flush=True)
    except BrokenPipeError:
        # The reader left: point stdout at /dev/null so the interpreter's final flush is silent.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
