"""A test-owned PostgreSQL cluster (initdb in a temporary directory, free port), with pgvector.

Why not the machine's server: tests need a superuser to create roles (wrong password, a
table owned by someone else) and must never touch anyone's data. initdb refuses to run as
root, so as root the cluster belongs to the ``postgres`` system user.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

from tests.redis_proc import free_port

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
    """initdb + pg_ctl start on 127.0.0.1:<free port>; superuser ``postgres`` over the socket."""

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
