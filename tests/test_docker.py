"""The Docker images and the compose file: built from this checkout, run against test-owned Redis.

Why opt-in (``pytest -m docker``) for the tests that need a daemon: the first build installs torch
in the convert stage and converts the model, minutes on a small CPU; the default suite (.ci/run)
must stay short and must not depend on a Docker daemon. Selected but without a daemon, those tests
skip and say why, loudly. The checks of the configuration files themselves (.env.example,
docker-compose.yml) need no daemon and run in the default suite.

What is checked is what the deployment promises: the runtime image holds no torch, transformers,
optimum or onnx, no compiler and no pip; it runs as a non-root user whose uid and gid are both
10001; its entrypoint is deposium-worker; its HEALTHCHECK turns healthy by pinging the worker
through the broker; concurrency follows the container's CPU quota; embedding works end to end and
the Redis password is masked in the container log. Redis and Flower refuse missing or placeholder
secrets, and Redis's password is on no command line. The producer writes as the owner of the
output directory. The documented compose commands work as written on a fresh .env. Sizes and
build time are printed for the report. Every image is built once per tag and reused.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from tests.redis_proc import RedisServer, free_port
from tests.test_metrics import BATCHES, client_app, http_get, scrape, send_batches, wait_until


def needs_docker(test):
    """Marks a test that needs a Docker daemon (opt-in: ``pytest -m docker``)."""
    return pytest.mark.docker(pytest.mark.timeout(3600)(test))


ROOT = Path(__file__).resolve().parent.parent
TAG = "deposium-worker:pytest"
CONVERT_TAG = "deposium-worker:pytest-convert"
FLOWER_TAG = "deposium-flower:pytest"
#: Base images tried in order when none is given: the default, then the local debootstrap base
#: that docs/deploy.md builds on hosts without Docker Hub.
BASE_CANDIDATES = ("python:3.11-slim", "local/bookworm-python")


def _loud_skip(reason: str) -> None:
    banner = f"DOCKER TESTS SKIPPED: {reason}"
    print("\n" + "!" * len(banner) + "\n" + banner + "\n" + "!" * len(banner))
    pytest.skip(banner)


@pytest.fixture(scope="module")
def docker(request: pytest.FixtureRequest) -> dict[str, str]:
    """The docker client, build environment and base image, or a loud skip saying why not."""
    if "docker" not in (request.config.getoption("markexpr") or ""):
        _loud_skip("opt-in; run `pytest -m docker` (needs a Docker daemon, builds the image: minutes)")
    # Debian's 20.10 client has BuildKit built in; a newer client without buildx needs the
    # legacy builder. Prefer the former when both are installed.
    client = "/usr/bin/docker" if Path("/usr/bin/docker").exists() else shutil.which("docker")
    if client is None:
        _loud_skip("no docker client on PATH (Debian: apt-get install docker.io)")
    info = subprocess.run([client, "info", "--format", "{{.ServerVersion}}"], capture_output=True, text=True)
    if info.returncode != 0:
        _loud_skip(f"no Docker daemon answers ({info.stderr.strip()[:200]}); start dockerd (docs/deploy.md)")
    version = subprocess.run([client, "version", "--format", "{{.Client.Version}}"],
                             capture_output=True, text=True).stdout.strip()
    buildx = subprocess.run([client, "buildx", "version"], capture_output=True).returncode == 0
    env = dict(os.environ, DOCKER_BUILDKIT="1" if (buildx or version.startswith("20.")) else "0")
    base = os.environ.get("DEPOSIUM_DOCKER_BASE_IMAGE")
    if not base:
        for candidate in BASE_CANDIDATES:
            if subprocess.run([client, "image", "inspect", candidate], capture_output=True).returncode == 0:
                base = candidate
                break
        else:
            base = BASE_CANDIDATES[0]  # let the build pull it
    return {"client": client, "base": base, "buildkit": env["DOCKER_BUILDKIT"], "env": env}


def _run(docker: dict, *args: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([docker["client"], *args], env=docker["env"], capture_output=True, text=True,
                          check=check, **kw)


#: Tags built in this session: each image is built once and reused by every test that needs it.
_BUILT: dict[str, float] = {}


def _build(docker: dict, tag: str, *extra: str) -> float:
    if tag in _BUILT:
        return _BUILT[tag]
    began = time.monotonic()
    # e.g. DEPOSIUM_DOCKER_BUILD_ARGS="ARTIFACT_FROM=artifact-download ARTIFACT_URL=… ARTIFACT_SHA256=…"
    args = [a for kv in os.environ.get("DEPOSIUM_DOCKER_BUILD_ARGS", "").split() for a in ("--build-arg", kv)]
    proc = subprocess.run(
        [docker["client"], "build", "--network", "host", "--build-arg", f"BASE_IMAGE={docker['base']}",
         *args, "-t", tag, *extra, str(ROOT)],
        env=docker["env"], capture_output=True, text=True,
    )
    if proc.returncode != 0:
        pytest.fail(f"docker build {' '.join(extra)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    _BUILT[tag] = time.monotonic() - began
    return _BUILT[tag]


def _size_mb(docker: dict, tag: str) -> float:
    return int(_run(docker, "image", "inspect", tag, "--format", "{{.Size}}").stdout) / 1e6


@pytest.fixture(scope="module")
def image(docker: dict) -> str:
    seconds = _build(docker, TAG)
    _build(docker, CONVERT_TAG, "--target", "artifact")  # cached layers: only for the size report
    runtime, convert = _size_mb(docker, TAG), _size_mb(docker, CONVERT_TAG)
    print(f"\n[docker report] base {docker['base']}, BuildKit={docker['buildkit']}: build {seconds:.0f} s "
          f"(cached layers count); runtime image {runtime:.0f} MB, convert (build) stage {convert:.0f} MB")
    return TAG


@needs_docker
def test_runtime_image_contents(docker: dict, image: str):
    """Torch-free, compiler-free, pip-free, non-root, deposium-worker entrypoint, healthcheck."""
    config = json.loads(_run(docker, "image", "inspect", image).stdout)[0]["Config"]
    assert config["User"] == "deposium"
    assert config["Entrypoint"] == ["deposium-worker"]
    assert "inspect ping" in " ".join(config["Healthcheck"]["Test"])
    probe = (
        "import importlib.util as u, json, os, shutil;"
        "print(json.dumps({'modules': [m for m in ('torch', 'transformers', 'optimum', 'onnx',"
        " 'sentence_transformers', 'pip', 'deposium.convert', 'deposium.bench', 'pypdfium2', 'docx', 'lxml')"
        " if u.find_spec(m)],"
        " 'tools': [t for t in ('gcc', 'cc', 'g++', 'make', 'deposium-convert') if shutil.which(t)],"
        " 'uid': os.getuid(), 'gid': os.getgid(), 'artifact': sorted(os.listdir(os.environ['DEPOSIUM_ARTIFACT'])),"
        " 'kernels': bool(u.find_spec('deposium.worker.kernels._rowq')),"
        " 'recipe': json.load(open(os.environ['DEPOSIUM_ARTIFACT'] + '/manifest.json'))['quantization']['recipe']}))"
    )
    out = json.loads(_run(docker, "run", "--rm", "--network", "none", "--entrypoint", "python3", image,
                          "-c", probe).stdout)
    assert out["modules"] == [], out
    assert out["tools"] == [], out
    assert (out["uid"], out["gid"]) == (10001, 10001), out  # one id for user and group, never root
    assert {"model.onnx", "tokenizer.json", "manifest.json"} <= set(out["artifact"])
    # the build stages compiled the fused kernels (gcc there, none here) and convert shipped int8-fused
    assert out["kernels"] and out["recipe"] == "int8-fused", out


@needs_docker
def test_image_embeds_against_test_redis(docker: dict, image: str, redis_server: RedisServer):
    """The container consumes batches from a Redis it does not own, and turns healthy."""
    password = f"pw-{uuid.uuid4().hex[:12]}"
    redis_server.client().config_set("requirepass", password)
    url = f"redis://:{password}@127.0.0.1:{redis_server.port}/0"
    queue = f"docker-{uuid.uuid4().hex[:8]}"
    port = free_port()
    name = f"deposium-pytest-{uuid.uuid4().hex[:8]}"
    _run(docker, "run", "-d", "--name", name, "--network", "host", "--cpus", "1",
         "--health-interval", "5s", "--health-start-period", "5s",
         "-e", f"REDIS_URL={url}", "-e", f"DEPOSIUM_QUEUE={queue}", "-e", f"DEPOSIUM_METRICS_PORT={port}",
         image)
    try:
        def logs() -> str:
            p = _run(docker, "logs", name, check=False)
            return p.stdout + p.stderr

        def healthy() -> bool:
            state = json.loads(_run(docker, "inspect", name).stdout)[0]["State"]
            if state["Status"] != "running":
                pytest.fail(f"container stopped ({state['Status']}):\n{logs()[-4000:]}")
            return state.get("Health", {}).get("Status") == "healthy"

        wait_until(healthy, "the container's HEALTHCHECK (celery inspect ping) to pass", timeout=300)
        app = client_app(url, queue)
        results = send_batches(app, "job-docker", BATCHES)
        for r in results:
            vectors = np.frombuffer(r["vectors"], dtype="<f4").reshape(len(r["errors"]), r["dim"])
            ok = [i for i, e in enumerate(r["errors"]) if e is None]
            assert np.allclose(np.linalg.norm(vectors[ok], axis=1), 1.0, atol=1e-3)
        assert results[0]["dim"] == 384
        first = np.frombuffer(results[0]["vectors"], dtype="<f4").reshape(2, 384)
        assert results[1]["errors"][0] is not None and results[1]["errors"][1] is None

        # Exporter of the replica, reached on the host network.
        node = f"celery@{_hostname(docker, name)}"
        done = ("deposium_batches_total", (("outcome", "success"), ("worker", node)))
        samples = wait_until(lambda: (s := scrape(port)).get(done) == len(BATCHES) and s,
                             "the container's exporter to count the batches", timeout=60)
        assert sum(v for (n, _), v in samples.items() if n == "deposium_paragraphs_total") == 6
        assert http_get(f"http://127.0.0.1:{port}/healthz")[0] == 200

        text = logs()
        # --cpus 1: one worker process, whatever the host has.
        assert "concurrency 1" in text, text[-3000:]
        assert password not in text
        assert "redis://:***@127.0.0.1" in text or "redis://:**@127.0.0.1" in text
        assert float(first[0] @ first[1]) < 0.99  # two different paragraphs, two different vectors
    finally:
        _run(docker, "rm", "-f", name, check=False)


def _hostname(docker: dict, name: str) -> str:
    probe = "import socket; print(socket.gethostname())"
    return _run(docker, "exec", name, "python3", "-c", probe).stdout.strip()


@needs_docker
def test_flower_image_refuses_to_start_without_auth(docker: dict):
    """No credentials in the environment: Flower must not start at all (exit 64, clear message)."""
    _build(docker, FLOWER_TAG, "-f", str(ROOT / "docker" / "flower.Dockerfile"))
    proc = _run(docker, "run", "--rm", "--network", "none", "-e", "REDIS_URL=redis://127.0.0.1:1/0",
                FLOWER_TAG, check=False)
    assert proc.returncode == 64, (proc.stdout, proc.stderr)
    assert "FLOWER_BASIC_AUTH" in proc.stderr
    # the placeholder login of .env.example is refused the same way, in one line naming the variable
    proc = _run(docker, "run", "--rm", "--network", "none", "-e", "REDIS_URL=redis://127.0.0.1:1/0",
                "-e", "FLOWER_BASIC_AUTH=admin:change-me-flower", FLOWER_TAG, check=False)
    assert proc.returncode == 64, (proc.stdout, proc.stderr)
    assert len(proc.stderr.strip().splitlines()) == 1 and "set FLOWER_BASIC_AUTH" in proc.stderr, proc.stderr


# --- the configuration files (no daemon needed: default suite) ---------------------------------

COMPOSE_FILE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
#: Compose defaults that differ from the worker's own on purpose: compose turns the exporter on.
COMPOSE_OWN_DEFAULTS = {"DEPOSIUM_METRICS_PORT"}


def _env_example() -> dict[str, str]:
    """Every ``NAME=value`` of .env.example, set or suggested (commented out)."""
    pairs = re.findall(r"^#?([A-Z][A-Z0-9_]*)=(.*)$", ENV_EXAMPLE.read_text(), flags=re.M)
    return {name: value.strip() for name, value in pairs}


def _compose_defaults() -> dict[str, str]:
    return dict(re.findall(r"\$\{([A-Z][A-Z0-9_]*):-([^}]*)\}", COMPOSE_FILE.read_text()))


def _compose() -> dict:
    import yaml  # PyYAML: installed with the convert extra (transformers needs it)

    return yaml.safe_load(COMPOSE_FILE.read_text())


def test_env_example_secrets_must_be_set_and_are_no_placeholders():
    """A fresh copy of .env.example starts nothing with a publicly known password."""
    from deposium.worker.config import PLACEHOLDER_SECRET

    env = _env_example()
    assert env["REDIS_PASSWORD"] == "" and env["FLOWER_BASIC_AUTH"] == "", env
    assert not [v for v in env.values() if PLACEHOLDER_SECRET.search(v)]
    uses = re.findall(r"\$\{(REDIS_PASSWORD|FLOWER_BASIC_AUTH)([^}]*)\}", COMPOSE_FILE.read_text())
    assert {name for name, _ in uses} == {"REDIS_PASSWORD", "FLOWER_BASIC_AUTH"}
    for name, rest in uses:  # compose itself refuses to start while one is empty, naming it
        assert rest.startswith(":?") and f"set {name}" in rest, (name, rest)


def test_env_example_suggests_the_defaults_it_documents():
    """Every DEPOSIUM_* suggestion is a real variable, at the value compose (or the worker) uses."""
    from deposium.worker.config import ENVIRONMENT, Settings

    compose = _compose_defaults()
    suggested = {k: v for k, v in _env_example().items() if k.startswith("DEPOSIUM_")}
    assert "DEPOSIUM_TOKEN_BUDGET" in suggested
    for name, value in suggested.items():
        assert name in ENVIRONMENT, f".env.example names {name}, which no component reads"
        expected = compose.get(name, str(getattr(Settings(), ENVIRONMENT[name])))
        assert value == expected, f".env.example suggests {name}={value}, the default is {expected}"
    for name, value in compose.items():
        if name.startswith("DEPOSIUM_") and name not in COMPOSE_OWN_DEFAULTS:
            assert value == str(getattr(Settings(), ENVIRONMENT[name])), (name, value)


def test_compose_builds_on_the_host_network_and_keeps_secrets_off_command_lines():
    services = _compose()["services"]
    built = {name: s["build"] for name, s in services.items() if "build" in s}
    assert set(built) == {"worker", "flower", "producer"}
    # a daemon started with --bridge=none gives build stages no network otherwise
    assert all(b.get("network") == "host" for b in built.values()), built
    redis = services["redis"]
    command_line = json.dumps([redis.get("entrypoint"), redis.get("command")])
    assert "REDIS_PASSWORD" not in command_line and "requirepass" not in command_line, command_line
    assert "./docker/redis-entrypoint.sh:/usr/local/bin/deposium-redis:ro" in redis["volumes"]
    # the producer writes as the owner of the output directory, not as a fixed uid
    assert "user" not in services["producer"], services["producer"]


# --- Redis, producer and compose (daemon needed) -------------------------------------------------

PRODUCER_TAG = "deposium-producer:pytest"
#: Redis images tried in order when REDIS_IMAGE is not given; else docker/redis.Dockerfile is built.
REDIS_CANDIDATES = ("redis:7-bookworm", "local/redis:7")
REDIS_ENTRYPOINT = ROOT / "docker" / "redis-entrypoint.sh"


@pytest.fixture(scope="module")
def redis_image(docker: dict) -> str:
    wanted = os.environ.get("REDIS_IMAGE")
    for candidate in ((wanted,) if wanted else REDIS_CANDIDATES):
        if _run(docker, "image", "inspect", candidate, check=False).returncode == 0:
            return candidate
    _build(docker, "local/redis:7", "-f", str(ROOT / "docker" / "redis.Dockerfile"))
    return "local/redis:7"


def _redis_args(image: str, *env: str) -> list[str]:
    """`docker run` arguments that start ``image`` the way compose does (entrypoint mounted, user redis)."""
    return ["--user", "redis", "--tmpfs", "/tmp", "-v", f"{REDIS_ENTRYPOINT}:/usr/local/bin/deposium-redis:ro",
            *[a for e in env for a in ("-e", e)], "--entrypoint", "sh", image, "/usr/local/bin/deposium-redis"]


@needs_docker
@pytest.mark.parametrize("password", ["", "change-me-redis"])
def test_redis_refuses_a_missing_or_placeholder_password(docker: dict, redis_image: str, password: str):
    proc = _run(docker, "run", "--rm", "--network", "none",
                *_redis_args(redis_image, f"REDIS_PASSWORD={password}"), check=False)
    assert proc.returncode == 64, (proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "set REDIS_PASSWORD in .env" in lines[0], proc.stderr


@needs_docker
def test_redis_password_is_on_no_command_line(docker: dict, redis_image: str):
    """requirepass comes from a generated config file: not in `docker inspect`'s command, not in ps."""
    import redis

    password = f'pw-{uuid.uuid4().hex[:12]}"\\x'  # a quote and a backslash survive the config file
    port = free_port()
    name = f"deposium-pytest-redis-{uuid.uuid4().hex[:8]}"
    _run(docker, "run", "-d", "--name", name, "--network", "host",
         *_redis_args(redis_image, f"REDIS_PASSWORD={password}"), "--port", str(port), "--bind", "127.0.0.1")
    try:
        client = redis.Redis(port=port, password=password, socket_timeout=5)
        wait_until(lambda: _pings(client), "the Redis container to answer an authenticated PING", timeout=60)
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=port, socket_timeout=5).ping()
        assert client.config_get("appendonly") == {"appendonly": "yes"}
        state = json.loads(_run(docker, "inspect", name).stdout)[0]
        command = json.dumps([state["Path"], state["Args"], state["Config"]["Cmd"], state["Config"]["Entrypoint"]])
        assert password not in command and "requirepass" not in command, command
        processes = _run(docker, "exec", name, "sh", "-c", "cat /proc/[0-9]*/cmdline | tr '\\0' ' '").stdout
        assert "redis-server" in processes and password not in processes, processes
    finally:
        _run(docker, "rm", "-f", name, check=False)


def _pings(client) -> bool:
    import redis

    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False


@pytest.fixture(scope="module")
def producer_image(docker: dict, image: str) -> str:
    _build(docker, PRODUCER_TAG, "--target", "producer")
    return PRODUCER_TAG


def _input_dir(root: Path) -> Path:
    """Three documents, one a PDF (the producer image carries the documents extra), in a directory
    any uid may read (the producer does not run as root)."""
    directory = root / "input"
    directory.mkdir(parents=True)
    (directory / "one.txt").write_text("A first paragraph about container images and who owns their files.\n\n"
                                       "A second paragraph, about the directory the Parquet file lands in.\n")
    (directory / "two.md").write_text("# Title\n\nA paragraph in a Markdown file, long enough to stand alone.\n")
    shutil.copyfile(ROOT / "tests" / "data" / "shared-mime-info-spec.pdf", directory / "spec.pdf")
    for path in (root, directory, *directory.iterdir()):
        path.chmod(0o755 if path.is_dir() else 0o644)
    return directory


@needs_docker
def test_producer_writes_as_the_owner_of_the_output_directory(docker: dict, producer_image: str, tmp_path: Path):
    """A directory you made gets files that are yours; one docker had to create gets the image's user."""
    import pyarrow.parquet as pq

    inputs = _input_dir(tmp_path)
    mine = tmp_path / "out"
    mine.mkdir()
    os.chown(mine, 4321, 4322)
    missing = tmp_path / "not-yet"  # docker creates it, as root
    for out, owner in ((mine, (4321, 4322)), (missing, (10001, 10001))):
        proc = _run(docker, "run", "--rm", "--network", "none", "-v", f"{inputs}:/input:ro", "-v", f"{out}:/output",
                    producer_image, "/input", "--out", "/output/embeddings.parquet", "--no-progress", check=False)
        assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-4000:])
        written = out / "embeddings.parquet"
        assert (written.stat().st_uid, written.stat().st_gid) == owner
        table = pq.read_table(written)
        assert table.num_rows >= 3
        assert {p for p in table.column("page").to_pylist() if p is not None} >= {1, 2}, "the PDF was not read"


def _compose_command(docker: dict) -> list[str]:
    """Compose v2 (`docker compose`) when the client has it, else Debian's docker-compose 1.29."""
    if _run(docker, "compose", "version", check=False).returncode == 0:
        return [docker["client"], "compose"]
    legacy = shutil.which("docker-compose")
    if legacy is None:
        _loud_skip("neither `docker compose` nor docker-compose is installed (Debian: apt-get install docker-compose)")
    return [legacy]


def _compose_runner(docker: dict, project: str, env_file: Path, *files: Path):
    """``compose(*args)`` for one project, with the BuildKit client first on PATH for compose's builds."""
    # compose's own builds run `docker build`: give it the client with BuildKit (see the docker fixture)
    env = dict(docker["env"], PATH=f"{Path(docker['client']).parent}:{os.environ['PATH']}",
               COMPOSE_DOCKER_CLI_BUILD="1")
    base = [*_compose_command(docker), "-p", project, "--env-file", str(env_file)]
    for file in (COMPOSE_FILE, *files):
        base += ["-f", str(file)]

    def compose(*args: str, check: bool = True, timeout: float = 1800) -> subprocess.CompletedProcess:
        proc = subprocess.run([*base, *args], env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
        if check and proc.returncode != 0:
            pytest.fail(f"compose {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
        return proc

    return compose


@needs_docker
def test_compose_build_stages_reach_the_network(docker: dict, tmp_path: Path):
    """compose's `build: network: host` lets the build stages fetch what they need (gcc by apt) even
    from a daemon whose containers get no network by default (dockerd --bridge=none). Only the
    cheap first stage is built, uncached, through the real compose file's worker build settings."""
    if _run(docker, "run", "--rm", "--network", "none", "--entrypoint", "sh", docker["base"], "-c",
            "command -v gcc", check=False).returncode == 0:
        _loud_skip(f"{docker['base']} already has gcc: its build stage fetches nothing to prove network with")
    tag = f"deposium-pytest-builder:{uuid.uuid4().hex[:8]}"
    override = tmp_path / "builder-only.yml"
    override.write_text(f"services:\n  worker:\n    image: {tag}\n    build:\n      target: builder\n")
    env_file = tmp_path / ".env"
    env_file.write_text(f"REDIS_PASSWORD={uuid.uuid4().hex}\nFLOWER_BASIC_AUTH=admin:{uuid.uuid4().hex}\n"
                        f"BASE_IMAGE={docker['base']}\n")
    compose = _compose_runner(docker, f"deposium-pytest-{uuid.uuid4().hex[:8]}", env_file, override)
    try:
        compose("build", "--no-cache", "worker", timeout=900)
        probe = _run(docker, "run", "--rm", "--network", "none", "--entrypoint", "gcc", tag, "--version", check=False)
        assert probe.returncode == 0 and "gcc" in probe.stdout, (probe.stdout, probe.stderr)
    finally:
        _run(docker, "image", "rm", "-f", tag, check=False)


@needs_docker
def test_compose_as_documented(docker: dict, image: str, producer_image: str, redis_image: str, tmp_path: Path):
    """docs/deploy.md's commands on a copy of .env.example: refused until the secrets are set, then
    Redis + 2 workers + Flower come up, the producer writes the Parquet file as its directory's owner,
    Redis's password is on no command line and the exporters are published on no host port."""
    import pyarrow.parquet as pq

    project = f"deposium-pytest-{uuid.uuid4().hex[:8]}"
    env_file = tmp_path / ".env"
    inputs = _input_dir(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    os.chown(out, 4321, 4321)
    flower_port = free_port()
    images = {"BASE_IMAGE": docker["base"], "REDIS_IMAGE": redis_image, "WORKER_IMAGE": image,
              "FLOWER_IMAGE": FLOWER_TAG, "PRODUCER_IMAGE": producer_image, "INPUT_DIR": str(inputs),
              "OUTPUT_DIR": str(out), "FLOWER_PORT": str(flower_port), "WORKER_CPUS": "1"}
    fresh = ENV_EXAMPLE.read_text() + "".join(f"{k}={v}\n" for k, v in images.items())
    env_file.write_text(fresh)
    compose = _compose_runner(docker, project, env_file)

    try:
        refused = compose("up", "-d", "--build", "--scale", "worker=2", check=False)
        assert refused.returncode != 0 and "set REDIS_PASSWORD in .env" in refused.stderr, refused.stderr[-2000:]
        password, login = uuid.uuid4().hex, ("admin", uuid.uuid4().hex)
        env_file.write_text(fresh.replace("REDIS_PASSWORD=\n", f"REDIS_PASSWORD={password}\n")
                            .replace("FLOWER_BASIC_AUTH=\n", f"FLOWER_BASIC_AUTH={':'.join(login)}\n"))
        began = time.monotonic()
        compose("up", "-d", "--build", "--scale", "worker=2")
        print(f"\n[docker report] compose up -d --build (cached images): {time.monotonic() - began:.0f} s")
        began = time.monotonic()
        run = compose("--profile", "producer", "run", "--rm", "producer", "/input", "--out",
                      "/output/embeddings.parquet", "--no-progress", timeout=900)
        print(f"[docker report] compose run producer: {time.monotonic() - began:.0f} s")
        written = out / "embeddings.parquet"
        assert (written.stat().st_uid, written.stat().st_gid) == (4321, 4321), run.stderr[-2000:]
        table = pq.read_table(written)
        assert table.num_rows >= 3
        assert {p for p in table.column("page").to_pylist() if p is not None} >= {1, 2}, "the PDF was not read"

        redis_id = compose("ps", "-q", "redis").stdout.strip()
        state = json.loads(_run(docker, "inspect", redis_id).stdout)[0]
        command = json.dumps([state["Path"], state["Args"], state["Config"]["Cmd"], state["Config"]["Entrypoint"]])
        assert password not in command, command
        workers = compose("ps", "-q", "worker").stdout.split()
        assert len(workers) == 2
        for worker in workers:
            details = json.loads(_run(docker, "inspect", worker).stdout)[0]
            assert not any(details["NetworkSettings"]["Ports"].values()), details["NetworkSettings"]["Ports"]
            # as documented: the compose network and this host reach the exporter at the container's address
            address = next(iter(details["NetworkSettings"]["Networks"].values()))["IPAddress"]
            wait_until(lambda a=address: http_get(f"http://{a}:9100/metrics")[0] == 200,
                       f"the exporter of worker {worker[:12]} at {address}:9100", timeout=120)
        flower = f"http://127.0.0.1:{flower_port}/api/workers"
        wait_until(lambda: http_get(flower)[0] == 401, "Flower to answer (and ask for credentials)", timeout=120)
        assert http_get(flower, auth=login)[0] == 200
    finally:
        compose("--profile", "producer", "down", "-v", check=False, timeout=300)


def test_offline_recipe_leaves_the_host_alone_and_builds_on_the_host_network():
    """docs/deploy.md's offline recipe as written: its dockerd flags leave the host's iptables,
    ip_forward and bridges alone, so its builds need (and use) host networking."""
    recipe = (ROOT / "docs" / "deploy.md").read_text()
    daemon = re.findall(r"^dockerd .*$", recipe, flags=re.M)
    assert daemon, "no dockerd command in docs/deploy.md"
    for line in daemon:
        for flag in ("--iptables=false", "--ip-masq=false", "--bridge=none", "--ip-forward=false"):
            assert flag in line.split(), (flag, line)
    builds = re.findall(r"^(?:DOCKER_BUILDKIT=1 )?docker build .*$", recipe[recipe.index(daemon[0]):], flags=re.M)
    assert builds and all("--network host" in b for b in builds[:2]), builds
