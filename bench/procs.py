"""The processes a measurement or a test runs around the product: redis-server, Celery workers, PostgreSQL.

Why one module: the bench and the test suite both drive real processes (a private redis-server on a
free port that can be killed and restarted, a prefork ``celery worker`` in its own process group, a
throw-away PostgreSQL cluster with pgvector), and every copy of that code drifted in small ways (one
waited for AOF loading, one did not; one killed the prefork children, one orphaned them). Nothing
here belongs to the runtime: ``deposium.worker``, ``producer`` and ``convert`` never import it.

Redis and PostgreSQL are started as plain subprocesses: no library starts a throw-away server
with the persistence and kill/restart control fault tests need.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

#: The directory of this interpreter's console scripts (``celery``, ``deposium-submit``).
VENV_BIN = Path(sys.executable).parent

#: Upper bound on a worker's start-up; only stops a hung run, nothing asserts a duration.
READY_TIMEOUT_S = 180.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(**extra: str) -> dict[str, str]:
    """The caller's environment minus any DEPOSIUM_* / REDIS_URL / PROMETHEUS_* / FLOWER_*, plus ``extra``.

    Why: a process started for a test or a measurement must run with what the caller decides, not
    with whatever a developer's shell exports."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("DEPOSIUM_", "PROMETHEUS_", "FLOWER_")) and k != "REDIS_URL"}
    env.update(extra)
    return env


def wait_for(predicate: Callable[[], Any], what: str, timeout: float = 300.0, interval: float = 0.1,
             alive: subprocess.Popen | None = None) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail (naming ``what``) if ``alive``
    (a Popen) exits first or ``timeout`` passes. Returns the predicate's value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if alive is not None and alive.poll() is not None:
            raise AssertionError(f"process exited with {alive.returncode} while waiting for {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


# --- redis-server ------------------------------------------------------------------------------


class RedisServer:
    """Start, stop and restart one redis-server whose data lives in ``directory``.

    ``appendonly`` keeps the queue across a kill (fault tests restart it); ``appendfsync`` is
    ``always`` for tests (nothing acknowledged is lost to a kill) and ``everysec`` (Redis's default)
    where a measurement wants the cost a production Redis has.
    """

    def __init__(self, directory: Path, port: int | None = None, appendonly: bool = True,
                 appendfsync: str = "always") -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.appendonly = appendonly
        self.appendfsync = appendfsync
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> RedisServer:
        import redis

        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
        args = [
            binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.directory),
            "--save", "", "--appendonly", "yes" if self.appendonly else "no",
            "--appendfsync", self.appendfsync, "--daemonize", "no", "--logfile", str(self.directory / "redis.log"),
        ]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        client = redis.Redis.from_url(self.url, socket_connect_timeout=0.5)
        while True:
            try:
                if client.ping():
                    # a restart loads the AOF; wait until loading has finished
                    if client.info("persistence").get("loading", 0) == 0:
                        return self
            except redis.exceptions.RedisError:
                pass
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited early; see {self.directory / 'redis.log'}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"redis-server on port {self.port} did not answer in {timeout}s")
            time.sleep(0.05)

    def stop(self, kill: bool = False) -> None:
        if self.proc is None:
            return
        if kill:
            self.proc.kill()
        else:
            self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def client(self) -> Any:
        """A ``redis.Redis`` client on this server."""
        import redis

        return redis.Redis.from_url(self.url)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --- Celery worker -----------------------------------------------------------------------------


def deposium_worker_args(*, concurrency: int = 2, queue: str = "deposium", name: str = "w1",
                         loglevel: str = "INFO") -> list[str]:
    """The command line of ``python -m deposium.worker.cli`` (what the image runs), which logs to stderr."""
    return [sys.executable, "-m", "deposium.worker.cli", "--concurrency", str(concurrency), "--queue", queue,
            "--hostname", f"{name}@%h", "--loglevel", loglevel]


def celery_worker_args(log: Path, *, concurrency: int = 2, queue: str = "deposium", name: str = "w1",
                       loglevel: str = "INFO") -> list[str]:
    """The command line of one prefork ``celery -A deposium.worker.celery_app worker`` logging to ``log``.

    Gossip, mingle and heartbeat are off: a worker started alone has no peers to talk to, and their
    traffic would show in the Redis figures."""
    return [str(VENV_BIN / "celery"), "-A", "deposium.worker.celery_app", "worker", "--pool", "prefork",
            "--concurrency", str(concurrency), "-Q", queue, "--loglevel", loglevel, "-n", f"{name}@%h",
            "--without-gossip", "--without-mingle", "--without-heartbeat", "--logfile", str(log)]


class Worker:
    """One ``celery -A deposium.worker.celery_app worker`` (prefork) in its own session/process group.

    Its own process group, so "kill the whole worker" means parent *and* prefork children. The
    environment is :func:`clean_env` (or ``base_env``) plus the Redis URL, artifact, queue and ``env``.
    ``command`` ``"celery"`` runs ``celery ... worker --logfile LOG``; ``"deposium-worker"`` runs the
    image's entry point (``python -m deposium.worker.cli``) with its output written to ``log``.
    """

    def __init__(self, redis_url: str, artifact: Path, log: Path, *, concurrency: int = 2, name: str = "w1",
                 queue: str = "deposium", base_env: Mapping[str, str] | None = None, loglevel: str = "INFO",
                 cwd: Path | None = None, command: str = "celery", **env: str) -> None:
        if command not in ("celery", "deposium-worker"):
            raise ValueError(f"worker command {command!r}: choose celery or deposium-worker")
        self.log = Path(log)
        self.name = name
        base = clean_env() if base_env is None else {k: v for k, v in base_env.items() if k != "REDIS_URL"}
        self.env = dict(base, REDIS_URL=redis_url, DEPOSIUM_ARTIFACT=str(artifact), DEPOSIUM_QUEUE=queue, **env)
        self.command = command
        if command == "celery":
            self.args = celery_worker_args(self.log, concurrency=concurrency, queue=queue, name=name,
                                           loglevel=loglevel)
        else:
            self.args = deposium_worker_args(concurrency=concurrency, queue=queue, name=name, loglevel=loglevel)
        self.cwd = cwd
        self.proc: subprocess.Popen | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None, "worker not started"
        return self.proc.pid

    def start(self, wait: bool = True) -> Worker:
        if self.command == "celery":
            self.proc = subprocess.Popen(self.args, env=self.env, cwd=self.cwd, stdout=subprocess.DEVNULL,
                                         stderr=subprocess.DEVNULL, start_new_session=True)
        else:
            with self.log.open("ab") as out:
                self.proc = subprocess.Popen(self.args, env=self.env, cwd=self.cwd, stdout=out,
                                             stderr=subprocess.STDOUT, start_new_session=True)
        if wait:
            self.wait_ready()
        return self

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.is_file() else ""

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> None:
        """Until the worker logs one more `` ready.`` than before (it then consumes)."""
        start = self.text().count(" ready.")
        wait_for(lambda: self.text().count(" ready.") > start, f"worker {self.name} ready (log {self.log})",
                 timeout, interval=0.2, alive=self.proc)

    def process(self) -> Any:
        """The parent as a ``psutil.Process``."""
        import psutil

        return psutil.Process(self.pid)

    def children(self) -> list[Any]:
        return self.process().children()

    def kill_all(self) -> None:
        """SIGKILL the parent and every child at once (an OOM-killed or evicted container)."""
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # stragglers (orphaned children)
        except ProcessLookupError:
            pass
        self.proc.wait()

    def __enter__(self) -> Worker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --- PostgreSQL + pgvector ---------------------------------------------------------------------

PG_ROOT = Path("/usr/lib/postgresql")


def find_bindir() -> Path | None:
    """The newest installed PostgreSQL server's bin directory, or None when there is none."""
    if not PG_ROOT.is_dir():
        return None
    versions = sorted((p for p in PG_ROOT.iterdir() if (p / "bin" / "initdb").is_file()),
                      key=lambda p: int(p.name) if p.name.isdigit() else 0, reverse=True)
    return versions[0] / "bin" if versions else None


def pgvector_installed(bindir: Path) -> bool:
    sharedir = subprocess.run([str(bindir / "pg_config"), "--sharedir"], capture_output=True, text=True,
                              check=True).stdout.strip()
    return (Path(sharedir) / "extension" / "vector.control").is_file()


class PgCluster:
    """initdb + pg_ctl start on 127.0.0.1:<free port>; superuser ``postgres`` over the socket.

    Why not the machine's server: tests need a superuser to create roles (wrong password, a table
    owned by someone else) and must never touch anyone's data. initdb refuses to run as root, so as
    root the cluster belongs to the ``postgres`` system user. Durability is off (fsync,
    synchronous_commit, full_page_writes): the cluster is thrown away.
    """

    #: The ``deposium`` role's password: a throw-away cluster's, never a deployment's.
    PASSWORD = "s3cret-pw"

    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="deposium-pg-"))
        self.data = self.root / "data"
        self.sock = self.root / "sock"
        self.sock.mkdir()
        self.user = None
        if os.geteuid() == 0:
            self.user = pwd.getpwnam("postgres")
            for p in (self.root, self.sock):
                os.chown(p, self.user.pw_uid, self.user.pw_gid)
        os.chmod(self.root, 0o755)

    def _run(self, *args: str) -> subprocess.CompletedProcess:
        cmd = list(args)
        if self.user is not None:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd="/")

    def start(self) -> PgCluster:
        r = self._run(str(self.bindir / "initdb"), "-D", str(self.data), "-U", "postgres", "--no-sync",
                      "--auth-local=trust", "--auth-host=scram-sha-256", "-E", "UTF8", "--locale=C.UTF-8")
        if r.returncode != 0:
            raise RuntimeError(f"initdb failed: {r.stderr[-2000:]}")
        opts = (f"-p {self.port} -k {self.sock} -c listen_addresses=127.0.0.1 -c fsync=off "
                "-c synchronous_commit=off -c full_page_writes=off -c shared_buffers=32MB "
                "-c max_connections=40 -c maintenance_work_mem=64MB")
        r = self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-o", opts, "-l",
                      str(self.root / "server.log"), "-w", "-t", "60", "start")
        if r.returncode != 0:
            log = (self.root / "server.log").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"pg_ctl start failed: {r.stderr[-1000:]} {log}")
        self.sql(f"CREATE ROLE deposium LOGIN PASSWORD {self._lit(self.PASSWORD)}")
        self.sql("CREATE ROLE stranger LOGIN PASSWORD 'other'")
        self.sql("CREATE DATABASE vectors OWNER deposium")
        self.sql("CREATE EXTENSION vector", db="vectors")
        return self

    @staticmethod
    def _lit(s: str) -> str:
        return "'" + s.replace("'", "''") + "'"

    def sql(self, statement: str, db: str = "postgres", user: str = "postgres") -> str:
        """Run SQL as a role over the trusted socket (psql), return its unaligned output."""
        r = subprocess.run([str(self.bindir / "psql"), "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1",
                            "-h", str(self.sock), "-p", str(self.port), "-U", user, "-d", db, "-c", statement],
                           capture_output=True, text=True, timeout=120)
        if r.returncode != 0:
            raise RuntimeError(f"psql failed: {statement}: {r.stderr}")
        return r.stdout.strip()

    def url(self, table: str, *, password: str | None = None, user: str = "deposium", db: str = "vectors") -> str:
        pw = self.PASSWORD if password is None else password
        return f"postgresql://{user}:{pw}@127.0.0.1:{self.port}/{db}?table={table}"

    def stop(self) -> None:
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> PgCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
