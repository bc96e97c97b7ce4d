"""Append the sentence-transformers head (pooling, Dense layers, Normalize) to the ONNX graph.

Why in the graph: like llama.cpp's GGUF carries a model's whole embedding head, the artifact
then maps token ids straight to the final unit vector, so the runtime needs no knowledge of
pooling modes, Dense layers or architectures, and the head runs inside ONNX Runtime instead
of in per-batch numpy code.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from deposium.convert.graph import add_constant as _const
from deposium.convert.source import SentenceTransformerSource
from deposium.worker.artifact import OUTPUT_NAME


def append_head(model: onnx.ModelProto, source: SentenceTransformerSource) -> onnx.ModelProto:
    """Return ``model`` whose only output is ``sentence_embedding`` [batch, dim] float32."""
    graph = model.graph
    nodes: list[onnx.NodeProto] = []

    def node(op: str, inputs: list[str], name: str, **attrs: object) -> str:
        out = f"head/{name}"
        nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    hidden = "last_hidden_state"
    axis1 = _const(graph, "head/axis1", np.array([1], dtype=np.int64))
    mask_f = node("Cast", ["attention_mask"], "mask_f", to=TensorProto.FLOAT)
    if source.pooling == "mean":
        mask3 = node("Unsqueeze", [mask_f, _const(graph, "head/axis_last", np.array([-1], np.int64))], "mask3")
        summed = node("ReduceSum", [node("Mul", [hidden, mask3], "masked"), axis1], "summed", keepdims=0)
        count = node("ReduceSum", [mask_f, axis1], "count", keepdims=1)
        count = node("Max", [count, _const(graph, "head/eps_count", np.array(1e-9, np.float32))], "count_clamped")
        pooled = node("Div", [summed, count], "pooled")
    elif source.pooling == "cls":
        pooled = node("Gather", [hidden, _const(graph, "head/zero", np.array(0, np.int64))], "pooled", axis=1)
    elif source.pooling == "lasttoken":
        length = node("ReduceSum", [node("Cast", ["attention_mask"], "mask_i", to=TensorProto.INT64), axis1],
                      "length", keepdims=1)
        last = node("Sub", [length, _const(graph, "head/one", np.array(1, np.int64))], "last_index")
        pooled = node("GatherND", [hidden, last], "pooled", batch_dims=1)
    elif source.pooling == "max":
        mask3 = node("Unsqueeze", [mask_f, _const(graph, "head/axis_last", np.array([-1], np.int64))], "mask3")
        penalty = node("Mul", [node("Sub", [mask3, _const(graph, "head/one_f", np.array(1.0, np.float32))], "inv"),
                               _const(graph, "head/big", np.array(1e9, np.float32))], "penalty")
        pooled = node("ReduceMax", [node("Add", [hidden, penalty], "masked_max"), axis1], "pooled", keepdims=0)
    else:  # read_source refuses other modes
        raise ValueError(f"unsupported pooling {source.pooling}")

    x = pooled
    for i, layer in enumerate(source.dense):
        w = _const(graph, f"head/dense{i}.weight_t", np.ascontiguousarray(layer.weight.T))
        x = node("MatMul", [x, w], f"dense{i}")
        if layer.bias is not None:
            x = node("Add", [x, _const(graph, f"head/dense{i}.bias", layer.bias)], f"dense{i}_bias")
        if layer.activation == "tanh":
            x = node("Tanh", [x], f"dense{i}_tanh")
    if source.normalize:
        norm = node("ReduceL2", [x, axis1], "l2", keepdims=1)
        norm = node("Max", [norm, _const(graph, "head/eps_norm", np.array(1e-12, np.float32))], "l2_clamped")
        x = node("Div", [x, norm], "normalized")
    nodes.append(helper.make_node("Identity", [x], [OUTPUT_NAME], name="head/output"))
    graph.node.extend(nodes)
    while len(graph.output):
        graph.output.pop()
    graph.output.append(helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["batch", source.dim]))
    onnx.checker.check_model(model)
    return model
