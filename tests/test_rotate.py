"""deposium.convert.rotate: the block-Hadamard rotation int8-rot puts in front of every quantized GEMM."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from deposium.convert.quantize import QuantizeOptions, quantize
from deposium.convert.rotate import block_for, hadamard, rotate_activation, rotate_weights
from tests.sessions import worker_session


@pytest.mark.parametrize("n", [1, 2, 16, 32, 128])
def test_hadamard_is_orthonormal_and_symmetric(n):
    h = hadamard(n)
    np.testing.assert_allclose(h @ h.T, np.eye(n), atol=1e-12)
    np.testing.assert_array_equal(h, h.T)
    assert np.all(np.isclose(np.abs(h), 1 / np.sqrt(n)))  # every entry +-1/sqrt(n): spreads, never amplifies


@pytest.mark.parametrize("n", [0, 3, 24])
def test_hadamard_refuses_orders_that_are_not_powers_of_two(n):
    with pytest.raises(ValueError, match="power of two"):
        hadamard(n)


def test_block_for_takes_the_largest_power_of_two_that_divides_the_width():
    assert block_for(768) == 32 and block_for(1152) == 32 and block_for(384) == 32
    assert block_for(48) == 16 and block_for(40) == 8 and block_for(768, 64) == 64
    assert block_for(36) is None and block_for(30) is None  # no block of at least 8 fits


def _rotation_graph(tmp_path: Path, width: int, block: int, rank: int) -> str:
    graph = helper.make_graph([], "rot", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None] * rank)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None] * rank)])
    nodes, out = rotate_activation(graph, "x", width, rank, block, "p")
    graph.node.extend(nodes)
    graph.node.append(helper.make_node("Identity", [out], ["y"]))
    path = tmp_path / "rot.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)
    return str(path)


@pytest.mark.parametrize(("rank", "shape"), [(3, (2, 5, 96)), (2, (7, 96))])
def test_rotation_nodes_compute_x_times_the_block_diagonal_hadamard(tmp_path, rank, shape):
    """The graph's Reshape -> MatMul -> Reshape must equal x @ blockdiag(H_32, H_32, H_32), keep the
    leading dims whatever they are, and with the weights' H^T leave the product x W unchanged."""
    x = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    session = ort.InferenceSession(_rotation_graph(tmp_path, 96, 32, rank), providers=["CPUExecutionProvider"])
    rotated = session.run(None, {"x": x})[0]
    blocks = np.kron(np.eye(3), hadamard(32))
    np.testing.assert_allclose(rotated, x @ blocks, atol=1e-5)
    weights = np.random.default_rng(1).normal(size=(96, 40)).astype(np.float32)
    np.testing.assert_allclose(rotate_weights(weights, 32), blocks.T @ weights, atol=1e-5)
    np.testing.assert_allclose(rotated @ rotate_weights(weights, 32), x @ weights, atol=1e-4)


def test_rotation_cuts_the_int8_error_of_outlier_channels(tmp_path):
    """EmbeddingGemma's pattern: a few channels 40x the others. Per-row int8 gives every channel the
    outliers' step; rotated first, the outliers are spread over their block and the error falls."""
    rng = np.random.default_rng(0)
    weights = rng.normal(size=(256, 64)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="/layers.0/mlp/down_proj/MatMul")], "one",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", 256])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", 64])],
        [numpy_helper.from_array(weights, "w")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), tmp_path / "fp32.onnx")
    x = rng.normal(size=(3, 20, 256)).astype(np.float32)
    x[..., [3, 77, 140]] *= 40
    exact = x @ weights

    def error(**options) -> tuple[dict, float]:
        out = tmp_path / f"{options['recipe']}.onnx"
        settings = quantize(tmp_path / "fp32.onnx", out, QuantizeOptions(**options))
        got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
        return settings, float(np.abs(got - exact).mean() / np.abs(exact).mean())

    _, plain = error(recipe="int8-token", activation_bits=7)  # 7 bits: exact with the signed graph on any CPU
    settings, rotated = error(recipe="int8-rot", activation_bits=7)
    assert settings["rotation"].startswith("block Hadamard, block 32")
    assert rotated < plain / 2.5, (plain, rotated)  # measured 0.054 -> 0.013


def test_an_activation_of_unknown_rank_stays_unrotated_and_the_manifest_says_so(tmp_path, caplog):
    """Rotation only buys fidelity (the gate judges the result): an activation whose rank the graph
    does not record is quantized unrotated, with a warning, and the counts tell how many were rotated."""
    rng = np.random.default_rng(2)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["h"], name="/up/MatMul"),
         helper.make_node("MatMul", ["h", "w2"], ["y"], name="/down/MatMul")], "two",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", 32])],
        [numpy_helper.from_array(rng.normal(size=(64, 96)).astype(np.float32), "w1"),
         numpy_helper.from_array(rng.normal(size=(96, 32)).astype(np.float32), "w2")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), tmp_path / "fp32.onnx")
    with caplog.at_level("WARNING", logger="deposium.convert.token_gemm"):
        settings = quantize(tmp_path / "fp32.onnx", tmp_path / "q.onnx", QuantizeOptions(recipe="int8-rot"))
    assert settings["quantized_activations"] == 2 and settings["rotated_activations"] == 1  # h has no recorded rank
    assert "not rotating the activation h" in caplog.text
    w1, w2 = (numpy_helper.to_array(i) for i in graph.initializer)
    x = rng.normal(size=(2, 5, 64)).astype(np.float32)
    got = worker_session(tmp_path / "q.onnx").run(None, {"x": x})[0]  # 8-bit: exact kernel on every CPU
    exact = (x @ w1) @ w2
    assert np.abs(got - exact).mean() < 0.02 * np.abs(exact).mean()  # still the same function, int8-rounded
