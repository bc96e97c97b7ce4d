"""The worker's choice of int8 GEMM kernel (deposium.worker.variant): u8 x s8, or u8 x u8 where that saturates.

Why this matters: on x86 CPUs without VNNI/AMX, ONNX Runtime's u8 x s8 GEMM saturates in int16,
so an artifact with 8-bit signed weights gives wrong vectors there unless the session asks for the
u8 x u8 kernel (``session.x64quantprecision``). These tests check the rule against the installed
onnxruntime on this very CPU, and that the u8 x u8 kernel is exact on every CPU.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from deposium.worker.artifact import read_manifest, sha256_file, write_manifest
from deposium.worker.config import ConfigError, Settings, load_settings
from deposium.worker.cpu import cpu_features
from deposium.worker.embedder import Embedder
from deposium.worker.variant import (
    UNSIGNED_KERNEL_KEY,
    can_saturate,
    kernel_label,
    u8s8_saturates,
    wants_unsigned_kernel,
)

MS = "com.microsoft"


def _integer_gemm(path: Path, weights: np.ndarray, op: str = "MatMulIntegerToFloat",
                  weight_zero_point: np.ndarray | None = None, zero_point_a: int = 128) -> None:
    """Y = (A - zero_point_a) @ (W - zp) as one integer GEMM, saved with W in an external data file."""
    k, n = weights.shape
    inits = [numpy_helper.from_array(weights, "W"), numpy_helper.from_array(np.array(zero_point_a, np.uint8), "a_zp")]
    if op == "MatMulIntegerToFloat":
        inits += [numpy_helper.from_array(np.array(1.0, np.float32), "a_scale"),
                  numpy_helper.from_array(np.ones(n, np.float32), "w_scale")]
        inputs, y_type, domain = ["A", "W", "a_scale", "w_scale", "a_zp"], TensorProto.FLOAT, MS
    else:
        inputs, y_type, domain = ["A", "W", "a_zp"], TensorProto.INT32, ""
    if weight_zero_point is not None:
        inits.append(numpy_helper.from_array(weight_zero_point, "w_zp"))
        inputs += [""] * (5 - len(inputs)) + ["w_zp"] if op == "MatMulIntegerToFloat" else ["w_zp"]
    graph = helper.make_graph([helper.make_node(op, inputs, ["Y"], domain=domain)], "gemm",
                              [helper.make_tensor_value_info("A", TensorProto.UINT8, [None, k])],
                              [helper.make_tensor_value_info("Y", y_type, [None, n])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(MS, 1)])
    onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
              location=path.name + ".data", size_threshold=1024)


def _run(path: Path, a: np.ndarray, unsigned_kernel: bool = False) -> np.ndarray:
    opts = ort.SessionOptions()
    if unsigned_kernel:
        opts.add_session_config_entry(UNSIGNED_KERNEL_KEY, "1")
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"]).run(None, {"A": a})[0]


def _full_range(rng: np.random.Generator, m: int = 16, k: int = 768, n: int = 256) -> tuple[np.ndarray, np.ndarray]:
    return (rng.integers(0, 256, (m, k)).astype(np.uint8), rng.integers(-127, 128, (k, n)).astype(np.int8))


def test_saturation_rule_matches_onnxruntime_on_this_cpu(tmp_path):
    """u8s8_saturates() must say exactly what the installed onnxruntime does on this CPU, and the
    u8 x u8 kernel the worker asks for there must be exact here whatever the CPU."""
    a, w = _full_range(np.random.default_rng(0))
    _integer_gemm(tmp_path / "model.onnx", w)
    exact = (a.astype(np.int64) - 128) @ w.astype(np.int64)
    signed_exact = np.array_equal(_run(tmp_path / "model.onnx", a), exact)
    assert signed_exact == (not u8s8_saturates(cpu_features())), sorted(cpu_features())
    np.testing.assert_array_equal(_run(tmp_path / "model.onnx", a, unsigned_kernel=True), exact)


def test_seven_bit_activations_never_saturate_the_signed_kernel(tmp_path):
    """Activations in [1, 127] (7 bits, zero point 64) with full-range int8 weights: every pair of
    products stays below int16's limit, so the signed graph is exact on every CPU (--activation-bits 7)."""
    rng = np.random.default_rng(2)
    a, w = rng.integers(1, 128, (16, 768)).astype(np.uint8), rng.integers(-127, 128, (768, 256)).astype(np.int8)
    a[:, :8], w[:8] = 127, 127  # the worst pairs
    _integer_gemm(tmp_path / "m.onnx", w, zero_point_a=64)
    np.testing.assert_array_equal(_run(tmp_path / "m.onnx", a), (a.astype(np.int64) - 64) @ w.astype(np.int64))
    assert not can_saturate({"recipe": "int8-attn", "weight_bits": 8, "activation_bits": 7})
    assert can_saturate({"recipe": "int8-attn", "weight_bits": 8, "activation_bits": 8})
    assert not can_saturate({"recipe": "int8-block"})


def test_saturation_rule_by_cpu():
    assert u8s8_saturates({"avx2"}, "x86_64")
    assert u8s8_saturates({"avx2", "avx512bw"}, "x86_64")  # AVX-512 without VNNI: vpmaddubsw too
    assert not u8s8_saturates({"avx2", "avx512bw", "avx512_vnni"}, "x86_64")
    assert not u8s8_saturates({"avx2", "avx_vnni"}, "x86_64")
    assert not u8s8_saturates({"avx2", "amx_int8"}, "x86_64")
    assert not u8s8_saturates(set(), "x86_64")  # SSE fallback widens to 16 bit first
    assert not u8s8_saturates(set(), "aarch64")


@pytest.mark.parametrize("op", ["MatMulIntegerToFloat", "MatMulInteger"])
@pytest.mark.parametrize("zero_points", [False, True])
def test_the_unsigned_kernel_is_exact_for_every_integer_gemm_the_recipes_write(tmp_path, op, zero_points):
    """Full-range u8 activations and int8 weights, with and without per-column weight zero points (the
    ``int8-dynamic`` recipe's MatMulInteger may carry them): ONNX Runtime's load-time shift to u8 must
    give the exact integers, on this CPU whatever it is."""
    rng = np.random.default_rng(1)
    a, w = _full_range(rng, n=64)
    zero_point = rng.integers(-3, 4, 64).astype(np.int8) if zero_points else None
    _integer_gemm(tmp_path / "m.onnx", w, op, zero_point)
    reference = (a.astype(np.int64) - 128) @ (w.astype(np.int64) - (0 if zero_point is None else zero_point))
    np.testing.assert_array_equal(_run(tmp_path / "m.onnx", a, unsigned_kernel=True), reference)


def test_wants_unsigned_kernel():
    avx2, vnni = {"avx2"}, {"avx2", "avx512_vnni"}
    eight = {"recipe": "int8-attn", "weight_bits": 8}
    assert wants_unsigned_kernel(eight, "auto", avx2) and not wants_unsigned_kernel(eight, "auto", vnni)
    assert not wants_unsigned_kernel(eight, "signed", avx2) and wants_unsigned_kernel(eight, "unsigned", vnni)
    assert wants_unsigned_kernel({"recipe": "int8-rot", "activation_bits": 8}, "auto", avx2)
    # cannot saturate: the faster signed kernel stays
    assert not wants_unsigned_kernel({"recipe": "int8-token", "weight_bits": 7}, "auto", avx2)
    assert not wants_unsigned_kernel({"recipe": "int8-token", "weight_bits": 8, "activation_bits": 7}, "auto", avx2)
    # no int8 GEMM to change (harmless), and safe should the manifest understate its graph
    assert wants_unsigned_kernel({"recipe": "fp32"}, "auto", avx2) and not wants_unsigned_kernel({}, "auto", vnni)
    with pytest.raises(ValueError, match="choose one of auto, signed, unsigned"):
        wants_unsigned_kernel(eight, "u8", avx2)
    assert UNSIGNED_KERNEL_KEY in kernel_label(True) and kernel_label(False) == "u8 x s8"
    assert kernel_label(True, {"recipe": "int8-rot"}) == kernel_label(True)
    assert kernel_label(True, {"recipe": "fp32"}) == "none (fp32 recipe)"
    assert kernel_label(False, {"recipe": "int8-block"}) == "none (int8-block recipe)"  # MatMulNBits


def test_int8_weights_setting_is_validated():
    assert load_settings({"DEPOSIUM_INT8_WEIGHTS": "unsigned"}).int8_weights == "unsigned"
    with pytest.raises(ConfigError, match="DEPOSIUM_INT8_WEIGHTS"):
        load_settings({"DEPOSIUM_INT8_WEIGHTS": "u8"})


def test_both_kernels_give_the_same_vectors(minilm_artifact):
    """The worker's automatic choice and the forced u8 x u8 kernel agree, and where the signed kernel is
    exact too (VNNI/AMX) it agrees with them: one text, one vector, on every CPU."""
    texts = ["short", "A sentence about ONNX Runtime and integer kernels.", "Ein deutscher Satz über Vektoren. " * 9]
    big = Settings(max_batch_paragraphs=100, max_batch_bytes=1 << 20)
    unsigned = Embedder(minilm_artifact, settings=dataclasses.replace(big, int8_weights="unsigned"))
    auto = Embedder(minilm_artifact, settings=big)
    assert unsigned.unsigned_kernel
    saturates = u8s8_saturates(cpu_features())
    assert auto.unsigned_kernel == saturates
    vectors = unsigned.embed(texts).vectors
    np.testing.assert_allclose(auto.embed(texts).vectors, vectors, rtol=0, atol=1e-6)
    if saturates:  # the signed kernel is measurably wrong here: the reason for the choice
        signed = Embedder(minilm_artifact, settings=dataclasses.replace(big, int8_weights="signed"))
        assert np.abs(signed.embed(texts).vectors - vectors).max() > 1e-3


def test_an_artifact_from_before_the_session_option_still_loads(minilm_artifact, tmp_path):
    """Artifacts converted before this version carry ``model.u8.onnx`` (listed and hashed in their
    manifest): they verify and load, the worker reads ``model.onnx`` with the kernel option, and the
    vectors are those of a current artifact."""
    legacy = tmp_path / "legacy"
    shutil.copytree(minilm_artifact, legacy)
    (legacy / "model.u8.onnx").write_bytes(b"an unsigned-weight graph this version never reads")
    manifest = read_manifest(legacy)
    write_manifest(legacy, dataclasses.replace(
        manifest, files={**manifest.files, "model.u8.onnx": sha256_file(legacy / "model.u8.onnx")}))
    texts = ["short", "A sentence about ONNX Runtime and integer kernels."]
    old, new = Embedder(legacy), Embedder(minilm_artifact)
    assert old.model_file == new.model_file == "model.onnx" and old.unsigned_kernel == new.unsigned_kernel
    np.testing.assert_array_equal(old.embed(texts).vectors, new.embed(texts).vectors)
