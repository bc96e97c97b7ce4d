"""deposium.convert.simplify: exact rewrites only (folded shapes, fused tanh GELU), checked by running
the graph before and after in ONNX Runtime on inputs of several shapes."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from deposium.convert.api import with_named_shapes
from deposium.convert.simplify import expand_target, reshape_target, simplify


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def _model(nodes: list[onnx.NodeProto], inits: list[onnx.TensorProto], in_dims: list,
           out_dims: list) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, in_dims)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_dims)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    return model


@pytest.mark.parametrize(("source", "target", "expected"), [
    (["b", "t", 768], ["b", "t", 3, 256], [0, 0, 3, 256]),
    (["b", 1, 3, "t", 256], ["b", 3, "t", 256], [0, 3, -1, 256]),
    (["b", "t", 3, 256], ["b", "t", 768], [0, 0, 768]),
    (["b", "t", 768], ["t", "b", 768], None),  # two dims to infer: not expressible
    (["b", "t", 768], ["b", "t", None], [0, 0, -1]),
])
def test_reshape_target(source, target, expected):
    assert reshape_target(source, target) == expected


@pytest.mark.parametrize(("source", "target", "expected"), [
    (["b", 1, 1, "t", 256], ["b", 1, 3, "t", 256], [1, 1, 3, 1, 1]),
    (["b", "t"], ["b", "t", 1], None),  # rank change
    (["b", 1], ["b", "n"], None),  # symbolic broadcast: not a constant
])
def test_expand_target(source, target, expected):
    assert expand_target(source, target) == expected


def test_shape_arithmetic_is_folded_and_the_result_unchanged():
    """x[b, t, 8] -> Reshape(x, [dim0(x), dim1(x), 2, 4]) built from Shape/Gather/Concat, as exports do."""
    ints = [numpy_helper.from_array(np.array(v, np.int64), n) for n, v in (("i0", [0]), ("i1", [1]), ("tail", [2, 4]))]
    nodes = [helper.make_node("Shape", ["x"], ["s"]),
             helper.make_node("Gather", ["s", "i0"], ["d0"], axis=0),
             helper.make_node("Gather", ["s", "i1"], ["d1"], axis=0),
             helper.make_node("Concat", ["d0", "d1", "tail"], ["shape"], axis=0),
             helper.make_node("Reshape", ["x", "shape"], ["r"]),
             helper.make_node("Relu", ["r"], ["y"])]
    model = with_named_shapes(_model(nodes, ints, ["batch", "seq", 8], ["batch", "seq", 2, 4]))
    simple = simplify(model)
    assert [n.op_type for n in simple.graph.node] == ["Reshape", "Relu"]
    for shape in ((1, 5, 8), (3, 2, 8)):
        x = np.random.default_rng(0).normal(size=shape).astype(np.float32)
        np.testing.assert_array_equal(_run(simple, x), _run(model, x))


def _gelu_chain(swap: bool, leak: bool = False) -> onnx.ModelProto:
    """0.5*x*(1+tanh(sqrt(2/pi)*(x+0.044715*x^3))) as the Gemma export spells it (operand order
    swapped when ``swap``); ``leak`` also reads an intermediate elsewhere (must then stay)."""
    c = {"k": 0.044715, "c": float(np.sqrt(2 / np.pi)), "one": 1.0, "half": 0.5}
    inits = [numpy_helper.from_array(np.array(v, np.float32), n) for n, v in c.items()]

    def mul(a: str, b: str, out: str) -> onnx.NodeProto:
        return helper.make_node("Mul", [b, a] if swap else [a, b], [out])

    nodes = [mul("x", "x", "sq"), mul("x", "sq", "cube"), mul("k", "cube", "kc"),
             helper.make_node("Add", ["x", "kc"], ["inner"]), mul("c", "inner", "arg"),
             helper.make_node("Tanh", ["arg"], ["t"]), helper.make_node("Add", ["one", "t"], ["onep"]),
             mul("x", "onep", "xt"), mul("half", "xt", "g")]
    nodes.append(helper.make_node("Add", ["g", "t"], ["y"]) if leak else helper.make_node("Identity", ["g"], ["y"]))
    return _model(nodes, inits, ["n", 16], ["n", 16])


@pytest.mark.parametrize("swap", [False, True])
def test_tanh_gelu_chain_becomes_one_fastgelu_with_the_same_values(swap):
    model = _gelu_chain(swap)
    simple = simplify(model)
    ops = [n.op_type for n in simple.graph.node]
    assert ops == ["FastGelu", "Identity"], ops
    x = np.linspace(-6, 6, 64, dtype=np.float32).reshape(4, 16)
    np.testing.assert_allclose(_run(simple, x), _run(model, x), atol=2e-6)


def test_gelu_chain_with_an_intermediate_read_elsewhere_is_left_alone():
    simple = simplify(_gelu_chain(False, leak=True))
    assert "FastGelu" not in {n.op_type for n in simple.graph.node}
    assert "Tanh" in {n.op_type for n in simple.graph.node}


def test_static_dims_and_identity_slices_are_folded():
    """Rotary-style half split (start = last dim / 2 read from Shape) and a Slice from 0 to a
    dim's own length (mask cut to the key length): both become constants / Identity."""
    c = {"last": [-1], "two": [2], "zero": [0], "big": [1 << 30], "axis": [-1], "i1": [1], "ax1": [1]}
    inits = [numpy_helper.from_array(np.array(v, np.int64), n) for n, v in c.items()]
    nodes = [helper.make_node("Shape", ["x"], ["s"]),
             helper.make_node("Gather", ["s", "last"], ["d"], axis=0),
             helper.make_node("Div", ["d", "two"], ["half"]),
             helper.make_node("Slice", ["x", "half", "big", "axis"], ["upper"]),  # x[..., 4:]
             helper.make_node("Gather", ["s", "i1"], ["t"], axis=0),
             helper.make_node("Slice", ["x", "zero", "t", "ax1"], ["all_t"]),  # x[:, :t]: the whole tensor
             helper.make_node("Slice", ["all_t", "zero", "half", "axis"], ["lower"]),
             helper.make_node("Concat", ["upper", "lower"], ["y"], axis=-1)]
    model = with_named_shapes(_model(nodes, inits, ["batch", "seq", 8], ["batch", "seq", 8]))
    simple = simplify(model)
    ops = [n.op_type for n in simple.graph.node]
    assert "Shape" not in ops and "Gather" not in ops and ops.count("Slice") == 2, ops
    for shape in ((1, 5, 8), (2, 3, 8)):
        x = np.random.default_rng(1).normal(size=shape).astype(np.float32)
        np.testing.assert_array_equal(_run(simple, x), _run(model, x))


def _gqa_attention(kv_heads: int, extra_reader: bool = False) -> onnx.ModelProto:
    """softmax(Q K^T) V with q [b, 3, t, 4] from x and K = V = x[:, :kv_heads] repeated to 3 heads
    the way grouped-query exports spell ``repeat_kv`` (Unsqueeze -> Expand -> Reshape)."""
    groups = 3 // kv_heads
    c = {"ax2": [2], "grow": [1, 1, groups, 1, 1], "heads": [0, 3, -1, 4], "first": [0], "kv": [kv_heads],
         "ax1": [1]}
    inits = [numpy_helper.from_array(np.array(v, np.int64), n) for n, v in c.items()]
    nodes = [helper.make_node("Slice", ["x", "first", "kv", "ax1"], ["k"]),
             helper.make_node("Unsqueeze", ["k", "ax2"], ["k5"]),
             helper.make_node("Expand", ["k5", "grow"], ["k_rep5"]),
             helper.make_node("Reshape", ["k_rep5", "heads"], ["k_rep"]),
             helper.make_node("Transpose", ["k_rep"], ["k_t"], perm=[0, 1, 3, 2]),
             helper.make_node("MatMul", ["x", "k_t"], ["scores"]),
             helper.make_node("Softmax", ["scores"], ["p"], axis=-1),
             helper.make_node("MatMul", ["p", "k_rep"], ["ctx"])]
    if extra_reader:  # something other than a MatMul reads the copy: it must stay
        nodes.append(helper.make_node("Add", ["ctx", "k_rep"], ["y"]))
    else:
        nodes.append(helper.make_node("Identity", ["ctx"], ["y"]))
    return with_named_shapes(_model(nodes, inits, ["batch", 3, "seq", 4], ["batch", 3, "seq", 4]))


def test_a_single_kv_head_is_broadcast_by_the_attention_matmuls_not_copied():
    model = _gqa_attention(kv_heads=1)
    simple = simplify(model)
    ops = [n.op_type for n in simple.graph.node]
    assert "Expand" not in ops and "Unsqueeze" not in ops and "Reshape" not in ops, ops
    for shape in ((1, 3, 5, 4), (2, 3, 7, 4)):
        x = np.random.default_rng(2).normal(size=shape).astype(np.float32)
        np.testing.assert_allclose(_run(simple, x), _run(model, x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(("kv_heads", "extra_reader"), [(3, False), (1, True)])
def test_kv_copies_stay_where_broadcasting_would_change_the_result(kv_heads, extra_reader):
    """Several kv heads (broadcasting cannot repeat them) or a non-MatMul reader: left alone."""
    model = _gqa_attention(kv_heads, extra_reader)
    assert "Expand" in [n.op_type for n in simplify(model).graph.node]
