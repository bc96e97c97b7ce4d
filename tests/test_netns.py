"""Worker replicas on separate network namespaces against one Redis: a replica lost whole and a
replica added mid-job (opt-in: ``pytest -m netns``, as root with ``ip netns``).

Why namespaces: replicas in production are separate hosts reaching Redis over a network. Here each
replica runs in a network namespace of its own, linked to the namespace holding Redis (and the
producer) by a veth pair with link-local /30 addresses (169.254.N.1 on the Redis side, .2 on the
replica side), so killing "a replica" means killing every process of its namespace, and the
replica added mid-job reaches Redis the way a new host would. Everything lives in namespaces this
test creates and deletes; the host's own network is not touched.

Why opt-in: creating namespaces needs root (CAP_SYS_ADMIN, CAP_NET_ADMIN), which CI runners and
developer machines usually do not grant.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.procs import Worker, exactly_once, producer_env, received_task_ids, submit_cmd, wait_for, write_jsonl
from tests.redis_proc import free_port
from tests.test_faults import MARK, _expected, _texts

pytestmark = [pytest.mark.netns, pytest.mark.slow]

REPLICAS = 3


def _loud_skip(reason: str) -> None:
    banner = f"NETNS TESTS SKIPPED: {reason}"
    print("\n" + "!" * len(banner) + "\n" + banner + "\n" + "!" * len(banner))
    pytest.skip(banner)


def _ip(*args: str) -> None:
    r = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if r.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {r.stderr.strip()}")


def _kill_namespace(ns: str) -> None:
    """SIGKILL every process in namespace ``ns`` at once (a host lost whole)."""
    pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split()
    for pid in pids:
        try:
            os.kill(int(pid), signal.SIGKILL)
        except ProcessLookupError:
            pass


class Network:
    """A hub namespace (Redis, producer) and one namespace per replica, each on its own veth /30."""

    def __init__(self) -> None:
        tag = uuid.uuid4().hex[:6]
        self.hub = f"dq{tag}-hub"
        self.replicas = [f"dq{tag}-w{i}" for i in range(1, REPLICAS + 1)]
        self.created: list[str] = []

    def build(self) -> None:
        for ns in (self.hub, *self.replicas):
            _ip("netns", "add", ns)
            self.created.append(ns)
            _ip("-n", ns, "link", "set", "lo", "up")
        for i, ns in enumerate(self.replicas, start=1):
            hub_if, replica_if = f"dqh{i}", f"dqw{i}"
            _ip("-n", self.hub, "link", "add", hub_if, "type", "veth", "peer", "name", replica_if, "netns", ns)
            _ip("-n", self.hub, "addr", "add", f"169.254.{i}.1/30", "dev", hub_if)
            _ip("-n", self.hub, "link", "set", hub_if, "up")
            _ip("-n", ns, "addr", "add", f"169.254.{i}.2/30", "dev", replica_if)
            _ip("-n", ns, "link", "set", replica_if, "up")

    def redis_address(self, replica: int) -> str:
        """Redis as replica ``replica`` (1-based) reaches it."""
        return f"169.254.{replica}.1"

    def destroy(self) -> None:
        for ns in reversed(self.created):
            _kill_namespace(ns)
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


@pytest.fixture()
def network(request: pytest.FixtureRequest) -> Iterator[Network]:
    if "netns" not in (request.config.getoption("markexpr") or ""):
        _loud_skip("opt-in; run `pytest -m netns` as root (creates network namespaces)")
    if os.geteuid() != 0:
        _loud_skip("needs root to create network namespaces")
    if shutil.which("ip") is None or shutil.which("redis-server") is None:
        _loud_skip("needs `ip` (iproute2) and redis-server")
    net = Network()
    try:
        net.build()
    except RuntimeError as exc:
        net.destroy()
        _loud_skip(f"cannot create network namespaces here: {exc}")
    try:
        yield net
    finally:
        net.destroy()


def _in(ns: str, worker: Worker) -> Worker:
    worker.args = ["ip", "netns", "exec", ns, *worker.args]
    return worker


def test_replica_lost_whole_and_replica_added_mid_job(tmp_path: Path, network: Network, minilm_artifact: Path):
    """Two replicas on their own namespaces; one is killed whole (every process of its namespace)
    while it holds a batch, a third is added mid-job: every paragraph is written exactly once, the
    lost replica's batches are re-sent (after the holder TTL, default settings), and the added
    replica takes work."""
    port = free_port()
    binds = ["127.0.0.1", *(network.redis_address(i) for i in range(1, REPLICAS + 1))]
    redis_log = tmp_path / "redis.log"
    # no protected mode: replicas connect over the veth links, which exist only in our namespaces
    redis = subprocess.Popen(["ip", "netns", "exec", network.hub, "redis-server", "--port", str(port), "--bind",
                              *binds, "--save", "", "--appendonly", "no", "--protected-mode", "no",
                              "--logfile", str(redis_log)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: redis_log.is_file() and "Ready to accept connections" in redis_log.read_text(), "Redis",
             timeout=30, alive=redis)
    texts = _texts(1200, marked=tuple(range(0, 1200, 5)))
    fault = {"DEPOSIUM_TEST_FAULT": f"sleep=1:{MARK}"}
    workers = [_in(ns, Worker(f"redis://{network.redis_address(i)}:{port}/0", minilm_artifact,
                              tmp_path / f"w{i}.log", name=f"w{i}", **fault))
               for i, ns in enumerate(network.replicas, start=1)]
    write_jsonl(tmp_path / "in.jsonl", texts)
    try:
        workers[0].start()
        workers[1].start()
        job = subprocess.Popen(
            ["ip", "netns", "exec", network.hub,
             *submit_cmd("in.jsonl", "--out", "out.parquet", "--batch-tokens", "300", "--no-progress", "--json")],
            env=producer_env(tmp_path, minilm_artifact, f"redis://127.0.0.1:{port}/0"), cwd=tmp_path,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        held, _ = wait_for(lambda: workers[0].fault_pids("sleep=1")[:1], "w1 holding a batch", alive=job)[0]
        _kill_namespace(network.replicas[0])
        workers[2].start()  # a replica added mid-job
        out, err = job.communicate(timeout=600)
    finally:
        for w in workers:
            if w.proc is not None:
                w.stop()
        redis.kill()
        redis.wait()
    assert job.returncode == 0, err
    assert re.search(r"worker w1@\S+ stopped answering", err), err
    found, dups, missing = exactly_once(tmp_path / "out.parquet", _expected(texts))
    assert (found, dups, missing) == (len(texts), 0, set())
    survivors = received_task_ids(workers[1].log) + received_task_ids(workers[2].log)
    assert held in survivors, f"{held}, lost with w1, was never run again"
    assert received_task_ids(workers[2].log), "the replica added mid-job took no batch"
