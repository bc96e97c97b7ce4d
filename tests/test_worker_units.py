"""Fast unit tests of the worker's pure parts: packing, validation, wire format, CPU detection,
Celery configuration and CLI flag handling. No model, no Redis."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from deposium.worker.celery_app import celery_config
from deposium.worker.cli import apply_overrides, build_parser
from deposium.worker.config import ConfigError, Settings
from deposium.worker.cpu import available_cpus, cgroup_cpu_limit, cpu_features, quantization_warning
from deposium.worker.embedder import PAD_RATIO, PAD_SLACK, check_paragraphs, pack_batches, truncate_dims
from deposium.worker.threads import SINGLE_THREAD_ENV
from deposium.worker.wire import TASK_NAME, EmbedRequest, EmbedResponse, WireError, task_id

# --- packing ---------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=300), max_size=80), st.integers(min_value=16, max_value=5000))
def test_pack_batches_respects_budget_and_covers_every_index(lengths, budget):
    batches = pack_batches(lengths, budget)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(len(lengths)))
    for batch in batches:
        width = max(lengths[i] for i in batch)
        # a single over-budget paragraph may run alone; anything packed together fits
        assert len(batch) == 1 or len(batch) * width <= budget
        assert [lengths[i] for i in batch] == sorted(lengths[i] for i in batch)
        shortest = min(lengths[i] for i in batch)
        assert width <= max(shortest * PAD_RATIO, shortest + PAD_SLACK)  # padding stays bounded


def test_pack_batches_groups_similar_lengths():
    lengths = [200, 5, 190, 6, 7, 210]
    batches = pack_batches(lengths, 420)
    assert batches == [[1, 3, 4], [2, 0], [5]]


def test_truncate_dims_renormalizes_and_keeps_zero_rows():
    rng = np.random.default_rng(0)
    v = rng.normal(size=(4, 16)).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    v[2] = 0
    cut = truncate_dims(v, 8)
    assert cut.shape == (4, 8)
    norms = np.linalg.norm(cut, axis=1)
    np.testing.assert_allclose(norms[[0, 1, 3]], 1.0, rtol=1e-6)
    assert norms[2] == 0
    expected = v[0, :8] / np.linalg.norm(v[0, :8])
    np.testing.assert_allclose(cut[0], expected, rtol=1e-6)
    assert truncate_dims(v, 16) is v


def test_check_paragraphs_reports_each_bad_paragraph():
    paragraphs = [
        "ok",
        3,
        None,
        "",
        "  \n\t",
        "caf\u00e9",
        "bad \ud800 surrogate",
        "x" * 11,
        b"bytes",
        "fine",
    ]
    ok_index, ok_text, errors, total = check_paragraphs(paragraphs, max_paragraph_bytes=10)
    assert ok_index == [0, 5, 9]
    assert ok_text == ["ok", "caf\u00e9", "fine"]
    assert "not a string (got int)" in errors[1]
    assert "not a string (got NoneType)" in errors[2]
    assert "empty or whitespace" in errors[3] and "empty or whitespace" in errors[4]
    assert "surrogate" in errors[6]
    assert "11 bytes" in errors[7] and "10" in errors[7]
    assert "not a string (got bytes)" in errors[8]
    assert [e is None for e in errors] == [i in ok_index for i in range(len(paragraphs))]
    assert total == 2 + 0 + 4 + 5 + 11 + 4  # UTF-8 bytes of the valid-Unicode strings


# --- wire ------------------------------------------------------------------------------------


def _request(**over):
    payload = EmbedRequest(job_id="j1", batch_id="b0000001", paragraphs=["a", "b"]).to_wire()
    payload.update(over)
    return payload


def test_request_round_trips_through_msgpack():
    req = EmbedRequest(job_id="job-1", batch_id="b0000002", paragraphs=["x", "y"], task="query", dim=128)
    back = EmbedRequest.from_wire(msgpack.unpackb(msgpack.packb(req.to_wire(), use_bin_type=True), raw=False))
    assert back == req
    assert back.task_id == "job-1:b0000002" == task_id("job-1", "b0000002")


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ("not a dict", "must be a mapping"),
        (_request(extra=1), "unknown fields: extra"),
        ({k: v for k, v in _request().items() if k != "dtype"}, "lacks fields: dtype"),
        (_request(v=2), "wire version 2"),
        (_request(v=True), "wire version True"),
        (_request(job_id="a:b"), "job_id"),
        (_request(job_id=""), "job_id"),
        (_request(batch_id=7), "batch_id"),
        (_request(paragraphs="one string"), "paragraphs must be a list"),
        (_request(task=5), "task must be a string"),
        (_request(dim="128"), "dim must be an integer"),
        (_request(dim=True), "dim must be an integer"),
        (_request(dtype="float64"), "dtype must be one of"),
    ],
)
def test_forged_requests_are_clear_errors(payload, message):
    with pytest.raises(WireError, match=message):
        EmbedRequest.from_wire(payload)


def test_request_keeps_non_string_paragraphs_for_per_paragraph_errors():
    req = EmbedRequest.from_wire(_request(paragraphs=["a", 1, None]))
    assert req.paragraphs == ["a", 1, None]


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_response_vectors_travel_as_little_endian_bytes(dtype):
    vectors = np.arange(12, dtype=dtype).reshape(3, 4) / 7
    resp = EmbedResponse("j", "b", "ab" * 32, vectors, [3, 0, 5], [False, False, True], [None, "bad", None])
    wire = resp.to_wire()
    itemsize = np.dtype(dtype).itemsize
    assert isinstance(wire["vectors"], bytes) and len(wire["vectors"]) == 12 * itemsize
    assert wire["vectors"] == vectors.astype("<f" + str(itemsize)).tobytes()
    back = EmbedResponse.from_wire(msgpack.unpackb(msgpack.packb(wire, use_bin_type=True), raw=False))
    assert back.dtype == dtype and back.dim == 4
    np.testing.assert_array_equal(back.vectors, vectors)
    assert back.errors == [None, "bad", None] and back.truncated == [False, False, True]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"vectors": b"\x00" * 7}, "expected 3 x 4 x 4"),
        ({"vectors": [0.0] * 12}, "vectors must be bytes"),
        ({"truncated": [False]}, "one entry per paragraph"),
        ({"token_counts": [1, 2, "3"]}, "token_counts must be integers"),
        ({"errors": [None, 1, None]}, "errors must be strings"),
        ({"dtype": "int8"}, "result dtype"),
        ({"surprise": 1}, "unknown fields"),
    ],
)
def test_forged_results_are_rejected(change, message):
    wire = EmbedResponse("j", "b", "0" * 64, np.zeros((3, 4), np.float32), [1, 2, 3], [False] * 3, [None] * 3).to_wire()
    wire.update(change)
    with pytest.raises(WireError, match=message):
        EmbedResponse.from_wire(wire)


# --- CPU -------------------------------------------------------------------------------------


def _cgroup(tmp_path: Path, files: dict[str, str], self_cgroup: str) -> tuple[Path, Path]:
    root = tmp_path / "cg"
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    root.mkdir(exist_ok=True)
    proc = tmp_path / "self_cgroup"
    proc.write_text(self_cgroup)
    return root, proc


def test_cgroup_v2_quota_of_own_group_and_ancestors(tmp_path):
    root, proc = _cgroup(
        tmp_path,
        {
            "cpu.max": "max 100000",
            "kubepods/cpu.max": "300000 100000",
            "kubepods/pod1/cpu.max": "150000 100000",
        },
        "0::/kubepods/pod1\n",
    )
    assert cgroup_cpu_limit(root, proc) == pytest.approx(1.5)
    assert available_cpus(root, proc, affinity={0, 1, 2, 3, 4, 5, 6, 7}) == 2
    # the affinity mask can be tighter than the quota
    assert available_cpus(root, proc, affinity={3}) == 1


def test_cgroup_v2_unlimited_uses_affinity(tmp_path):
    root, proc = _cgroup(tmp_path, {"cpu.max": "max 100000"}, "0::/\n")
    assert cgroup_cpu_limit(root, proc) is None
    assert available_cpus(root, proc, affinity={0, 1, 2}) == 3


def test_cgroup_v1_cfs_quota(tmp_path):
    root, proc = _cgroup(
        tmp_path,
        {
            "cpu,cpuacct/cpu.cfs_quota_us": "-1",
            "cpu,cpuacct/cpu.cfs_period_us": "100000",
            "cpu,cpuacct/docker/abc/cpu.cfs_quota_us": "50000",
            "cpu,cpuacct/docker/abc/cpu.cfs_period_us": "100000",
        },
        "4:memory:/docker/abc\n2:cpu,cpuacct:/docker/abc\n",
    )
    assert cgroup_cpu_limit(root, proc) == pytest.approx(0.5)
    assert available_cpus(root, proc, affinity={0, 1, 2, 3}) == 1


def test_cpu_features_from_cpuinfo(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx avx2 avx512f avx512bw avx512_vnni\n\nprocessor: 1\n")
    assert cpu_features(info) == {"avx2", "avx512bw", "avx512_vnni"}
    info.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx avx2 avx_vnni\n")
    assert cpu_features(info) == {"avx2", "avx_vnni"}
    assert cpu_features(tmp_path / "missing") == frozenset()


def test_quantization_warning_depends_on_cpu():
    avx2, vnni = frozenset({"avx2"}), frozenset({"avx2", "avx512_vnni"})
    token8, token7 = {"recipe": "int8-token", "weight_bits": 8}, {"recipe": "int8-token", "weight_bits": 7}
    rot = {"recipe": "int8-rot", "weight_bits": 8, "activation_bits": 8, "wide_activations": []}
    # one int8 pass per activation: exact via the u8 x u8 kernel on AVX2 and faster than fp32 there
    assert quantization_warning(rot, avx2) is None and quantization_warning(token8, avx2) is None
    wide8 = {"recipe": "int8-wide", "activation_bits": 8}
    assert "u8 x u8" in quantization_warning(wide8, avx2) and "slower than fp32" in quantization_warning(wide8, avx2)
    wide7 = {"recipe": "int8-wide", "activation_bits": 7}  # 7-bit activations: one signed graph
    assert "16-bit" in quantization_warning(wide7, avx2) and "int8-rot" in quantization_warning(wide7, avx2)
    attn = {"recipe": "int8-attn", "activation_bits": 8, "wide_activations": ["*attention*"]}
    assert "doubles the GEMM rows it covers" in quantization_warning(attn, avx2)
    assert quantization_warning(wide7, vnni) is None
    assert quantization_warning(token8, vnni) is None
    assert quantization_warning(wide8, frozenset({"avx2", "amx_int8"})) is None
    assert "7-bit weights" in quantization_warning(token7, vnni)
    assert "no VNNI" in quantization_warning({"recipe": "int8-block"}, avx2)
    assert quantization_warning({"recipe": "int8-block"}, vnni) is None
    assert "neither AVX2 nor VNNI" in quantization_warning(token7, frozenset())
    assert quantization_warning({"recipe": "fp32"}, frozenset()) is None


# --- Celery configuration and CLI ------------------------------------------------------------


def test_celery_config_is_safe_and_follows_settings():
    s = Settings(
        redis_url="redis://:pw@h:6379/1",
        queue="q1",
        visibility_timeout_s=5000,
        task_soft_time_limit_s=100,
        task_time_limit_s=200,
        result_expires_s=77,
    )
    c = celery_config(s)
    assert c["broker_url"] == c["result_backend"] == "redis://:pw@h:6379/1"
    assert c["task_serializer"] == c["result_serializer"] == "msgpack"
    assert set(c["accept_content"]) == {"msgpack", "json"} and "pickle" not in c["result_accept_content"]
    assert c["task_acks_late"] and c["task_reject_on_worker_lost"]
    assert c["worker_prefetch_multiplier"] == 1
    assert c["broker_transport_options"]["visibility_timeout"] == 5000
    assert (c["task_soft_time_limit"], c["task_time_limit"], c["result_expires"]) == (100, 200, 77)
    assert c["worker_send_task_events"] and c["task_send_sent_event"]
    assert c["broker_connection_retry_on_startup"]
    assert c["task_default_queue"] == "q1" and c["task_routes"][TASK_NAME]["queue"] == "q1"
    assert c["worker_proc_alive_timeout"] >= 30


def test_cli_flags_override_environment_settings(tmp_path):
    args = build_parser().parse_args(
        [
            "--artifact",
            str(tmp_path),
            "--concurrency",
            "3",
            "--queue",
            "qq",
            "--token-budget",
            "1024",
            "--loglevel",
            "debug",
        ]
    )
    s = apply_overrides(Settings(), args)
    assert (s.artifact_dir, s.concurrency, s.queue, s.token_budget, s.log_level) == (
        tmp_path,
        3,
        "qq",
        1024,
        "DEBUG",
    )
    assert apply_overrides(Settings(queue="env"), build_parser().parse_args([])).queue == "env"
    with pytest.raises(ConfigError):
        apply_overrides(Settings(), argparse.Namespace(**{**vars(args), "concurrency": -1}))


def test_cli_help_runs():
    out = subprocess.run([sys.executable, "-m", "deposium.worker.cli", "--help"],
                         capture_output=True, text=True, check=True)
    assert "--concurrency" in out.stdout and "--artifact" in out.stdout


def test_thread_variables_are_forced_before_onnxruntime_is_imported():
    """Importing the Embedder module sets every thread variable to 1, even over an operator's 8,
    and onnxruntime is not yet imported the first time that happens."""
    code = (
        "import os, sys\n"
        "import deposium.worker.threads as t\n"
        "orig, seen = t.pin_single_thread, []\n"
        "def spy():\n"
        "    seen.append('onnxruntime' in sys.modules)\n"
        "    orig()\n"
        "t.pin_single_thread = spy\n"
        "import deposium.worker.embedder\n"
        "print(repr((seen[0], {k: os.environ[k] for k in t.SINGLE_THREAD_ENV})))\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "8", "TOKENIZERS_PARALLELISM": "true"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    ort_already_imported, values = eval(out.stdout)  # noqa: S307 (our own subprocess output)
    assert ort_already_imported is False
    assert values == SINGLE_THREAD_ENV


def test_success_log_line_carries_no_vectors():
    import celery.app.trace as trace

    from deposium.worker.celery_app import create_app

    create_app(Settings())
    assert "return_value" not in trace.LOG_SUCCESS and "%(id)s" in trace.LOG_SUCCESS


def test_wire_errors_quoting_forged_surrogates_stay_encodable():
    """A forged field name with a lone surrogate must not break storing the failure (msgpack)."""
    import msgpack

    from deposium.worker.wire import EmbedRequest, WireError

    payload = {"v": 1, "job_id": "j", "batch_id": "b", "paragraphs": ["x"], "task": None, "dim": None,
               "dtype": "float32", "bad\udc80": 1}
    with pytest.raises(WireError) as exc:
        EmbedRequest.from_wire(payload)
    msgpack.packb(str(exc.value))  # raised UnicodeEncodeError before the fix
    assert "\\udc80" in str(exc.value)
