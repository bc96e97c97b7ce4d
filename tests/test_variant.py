"""The artifact's unsigned-weight graph and the worker's choice between the two (worker.variant).

Why this matters: on x86 CPUs without VNNI/AMX, ONNX Runtime's u8 x s8 GEMM saturates in int16,
so an artifact with 8-bit signed weights gives wrong vectors there. These tests check the rule
against the installed onnxruntime on this very CPU, and that the unsigned graph is exact.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from convert.unsigned import unsigned_path, write_unsigned_variant
from worker.artifact import MODEL_FILE, UNSIGNED_MODEL_FILE, ArtifactError, Manifest
from worker.config import ConfigError, Settings, load_settings
from worker.cpu import cpu_features
from worker.embedder import Embedder
from worker.variant import choose_model_file, needs_unsigned_graph, u8s8_saturates

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


def _run(path: Path, a: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"A": a})[0]


def _full_range(rng: np.random.Generator, m: int = 16, k: int = 768, n: int = 256) -> tuple[np.ndarray, np.ndarray]:
    return (rng.integers(0, 256, (m, k)).astype(np.uint8), rng.integers(-127, 128, (k, n)).astype(np.int8))


def test_saturation_rule_matches_onnxruntime_on_this_cpu(tmp_path):
    """u8s8_saturates() must say exactly what the installed onnxruntime does on this CPU, and the
    unsigned graph must be exact here whatever the CPU."""
    a, w = _full_range(np.random.default_rng(0))
    _integer_gemm(tmp_path / "model.onnx", w)
    exact = (a.astype(np.int64) - 128) @ w.astype(np.int64)
    signed_exact = np.array_equal(_run(tmp_path / "model.onnx", a), exact)
    assert signed_exact == (not u8s8_saturates(cpu_features())), sorted(cpu_features())
    write_unsigned_variant(tmp_path / "model.onnx")
    np.testing.assert_array_equal(_run(tmp_path / UNSIGNED_MODEL_FILE, a), exact)


def test_seven_bit_activations_never_saturate_the_signed_kernel(tmp_path):
    """Activations in [1, 127] (7 bits, zero point 64) with full-range int8 weights: every pair of
    products stays below int16's limit, so the signed graph is exact on every CPU (--activation-bits 7)."""
    rng = np.random.default_rng(2)
    a, w = rng.integers(1, 128, (16, 768)).astype(np.uint8), rng.integers(-127, 128, (768, 256)).astype(np.int8)
    a[:, :8], w[:8] = 127, 127  # the worst pairs
    _integer_gemm(tmp_path / "m.onnx", w, zero_point_a=64)
    np.testing.assert_array_equal(_run(tmp_path / "m.onnx", a), (a.astype(np.int64) - 64) @ w.astype(np.int64))
    assert not needs_unsigned_graph({"recipe": "int8-attn", "weight_bits": 8, "activation_bits": 7})
    assert needs_unsigned_graph({"recipe": "int8-attn", "weight_bits": 8, "activation_bits": 8})
    assert not needs_unsigned_graph({"recipe": "int8-block"})


def test_saturation_rule_by_cpu():
    assert u8s8_saturates({"avx2"}, "x86_64")
    assert u8s8_saturates({"avx2", "avx512bw"}, "x86_64")  # AVX-512 without VNNI: vpmaddubsw too
    assert not u8s8_saturates({"avx2", "avx512bw", "avx512_vnni"}, "x86_64")
    assert not u8s8_saturates({"avx2", "avx_vnni"}, "x86_64")
    assert not u8s8_saturates({"avx2", "amx_int8"}, "x86_64")
    assert not u8s8_saturates(set(), "x86_64")  # SSE fallback widens to 16 bit first
    assert not u8s8_saturates(set(), "aarch64")


@pytest.mark.parametrize("op", ["MatMulIntegerToFloat", "MatMulInteger"])
def test_unsigned_variant_shifts_only_the_gemm_weights(tmp_path, op):
    """Weights +128 as u8 with zero point 128 (or the old per-column zero point +128); other
    tensors stay references into the original data file; results are the exact integers."""
    rng = np.random.default_rng(1)
    a, w = _full_range(rng, n=64)
    zero_point = rng.integers(-3, 4, 64).astype(np.int8) if op == "MatMulInteger" else None
    model_path = tmp_path / "m.onnx"
    _integer_gemm(model_path, w, op, zero_point)
    written = write_unsigned_variant(model_path)
    assert written == [unsigned_path(model_path), tmp_path / "m.u8.onnx.data"]
    model = onnx.load(str(written[0]), load_external_data=False)
    inits = {t.name: t for t in model.graph.initializer}
    assert "W" not in inits and inits["W.u8"].data_type == TensorProto.UINT8
    assert written[1].stat().st_size == w.size  # the shifted weights and nothing else
    shifted = numpy_helper.to_array(inits["W.u8"], base_dir=str(tmp_path))
    np.testing.assert_array_equal(shifted.astype(np.int16) - 128, w)
    if zero_point is None:
        assert numpy_helper.to_array(inits["u8w/zero_point"]) == 128
    else:
        np.testing.assert_array_equal(numpy_helper.to_array(inits["w_zp.u8"]).astype(np.int16) - 128, zero_point)
    reference = (a.astype(np.int64) - 128) @ (w.astype(np.int64) - (0 if zero_point is None else zero_point))
    np.testing.assert_array_equal(_run(written[0], a), reference)


def test_graphs_without_integer_weights_get_no_variant(tmp_path):
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "fp32",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 4])],
                              [numpy_helper.from_array(np.eye(4, dtype=np.float32), "w")])
    onnx.save(helper.make_model(graph), str(tmp_path / "model.onnx"))
    assert write_unsigned_variant(tmp_path / "model.onnx") == []
    assert not (tmp_path / UNSIGNED_MODEL_FILE).exists()


def _manifest(files: list[str], **quantization: object) -> Manifest:
    return Manifest(format_version=1, source="s", source_revision="r", architecture="a", dim=4, matryoshka_dims=[4],
                    pooling="mean", max_seq_length=8, inputs=["input_ids"], pad_token_id=0, prompts={},
                    default_prompt_name=None, quantization=dict(quantization), files={f: "0" for f in files})


def test_choose_model_file():
    both = _manifest([MODEL_FILE, UNSIGNED_MODEL_FILE], recipe="int8-attn", weight_bits=8)
    avx2, vnni = {"avx2"}, {"avx2", "avx512_vnni"}
    assert choose_model_file(both, "auto", avx2) == UNSIGNED_MODEL_FILE
    assert choose_model_file(both, "auto", vnni) == MODEL_FILE
    assert choose_model_file(both, "signed", avx2) == MODEL_FILE
    assert choose_model_file(both, "unsigned", vnni) == UNSIGNED_MODEL_FILE
    old = _manifest([MODEL_FILE], recipe="int8-token", weight_bits=8)  # converted before the variant existed
    with pytest.raises(ArtifactError, match="saturate on this CPU"):
        choose_model_file(old, "auto", avx2)
    with pytest.raises(ArtifactError, match="has no model.u8.onnx"):
        choose_model_file(old, "unsigned", vnni)
    assert choose_model_file(old, "auto", vnni) == MODEL_FILE
    assert choose_model_file(_manifest([MODEL_FILE], recipe="int8-token", weight_bits=7), "auto", avx2) == MODEL_FILE
    seven = _manifest([MODEL_FILE], recipe="int8-token", weight_bits=8, activation_bits=7)
    assert choose_model_file(seven, "auto", avx2) == MODEL_FILE  # cannot saturate: no unsigned graph needed
    assert choose_model_file(_manifest([MODEL_FILE], recipe="int8-block"), "auto", avx2) == MODEL_FILE
    assert choose_model_file(_manifest([MODEL_FILE], recipe="fp32"), "auto", avx2) == MODEL_FILE


def test_int8_weights_setting_is_validated():
    assert load_settings({"DEPOSIUM_INT8_WEIGHTS": "unsigned"}).int8_weights == "unsigned"
    with pytest.raises(ConfigError, match="DEPOSIUM_INT8_WEIGHTS"):
        load_settings({"DEPOSIUM_INT8_WEIGHTS": "u8"})


def test_both_graphs_give_the_same_vectors(minilm_artifact):
    """The worker's automatic choice and the forced unsigned graph agree, and where the signed graph is
    exact too (VNNI/AMX) it agrees with them: one text, one vector, on every CPU."""
    texts = ["short", "A sentence about ONNX Runtime and integer kernels.", "Ein deutscher Satz über Vektoren. " * 9]
    big = Settings(max_batch_paragraphs=100, max_batch_bytes=1 << 20)
    unsigned = Embedder(minilm_artifact, settings=dataclasses.replace(big, int8_weights="unsigned"))
    auto = Embedder(minilm_artifact, settings=big)
    assert unsigned.model_file == UNSIGNED_MODEL_FILE
    saturates = u8s8_saturates(cpu_features())
    assert auto.model_file == (UNSIGNED_MODEL_FILE if saturates else MODEL_FILE)
    vectors = unsigned.embed(texts).vectors
    np.testing.assert_allclose(auto.embed(texts).vectors, vectors, rtol=0, atol=1e-6)
    if saturates:  # the signed graph is measurably wrong here: the reason the variant exists
        signed = Embedder(minilm_artifact, settings=dataclasses.replace(big, int8_weights="signed"))
        assert np.abs(signed.embed(texts).vectors - vectors).max() > 1e-3
