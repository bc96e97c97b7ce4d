"""The token-embedding table stored in fewer bits: every recipe but ``fp32`` applies this step.

Why: a large vocabulary makes the table most of a small model's weights (EmbeddingGemma's 262144 x 768
table is two thirds of its weights), yet a paragraph reads only its own rows. The table is stored int8
with one scale per row (or 4-bit with one fp16 scale per 32 values), and the graph gathers the integer
rows and their scales and multiplies: exact per row, so a text's vector never depends on other rows.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from deposium.convert.graph import add_constant, initializers, op_builder
from deposium.convert.options import QuantizeError, QuantizeOptions

#: Gather tables at least this large (elements) are quantized; position tables are small.
MIN_GATHER_TABLE = 1 << 20


def table_label(opts: QuantizeOptions) -> str:
    """How the manifest names the table's storage."""
    if not opts.quantize_embeddings:
        return "fp32"
    return "int8 per row" if opts.embedding_bits == 8 else "4-bit, fp16 scale per 32 values"



def _big_tables(graph: onnx.GraphProto, nodes: list[onnx.NodeProto]) -> dict[str, np.ndarray]:
    """Gather nodes (by output name) reading a large constant 2-D table along axis 0."""
    inits = initializers(graph)
    found = {}
    for node in nodes:
        table = inits.get(node.input[0]) if node.op_type == "Gather" else None
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        if table is not None and axis == 0 and len(table.dims) == 2 and int(np.prod(table.dims)) >= MIN_GATHER_TABLE:
            found[node.output[0]] = numpy_helper.to_array(table).astype(np.float32)
    return found


def _int8_rows(graph: onnx.GraphProto, node: onnx.NodeProto, weights: np.ndarray,
               out: list[onnx.NodeProto]) -> None:
    """Gather int8 rows and their per-row scales, multiply."""
    prefix = f"{node.name or node.output[0]}/q8"
    op, ids = op_builder(out, prefix), node.input[1]
    scale = np.maximum(np.abs(weights).max(axis=1, keepdims=True), 1e-12) / 127.0
    q = np.clip(np.round(weights / scale), -127, 127).astype(np.int8)
    rows = op("Cast", [op("Gather", [add_constant(graph, f"{prefix}/table", q), ids], "rows", axis=0)], "rows_f",
              to=TensorProto.FLOAT)
    scales = op("Gather", [add_constant(graph, f"{prefix}/row_scale", scale.astype(np.float32)), ids], "scales", axis=0)
    out.append(helper.make_node("Mul", [rows, scales], [node.output[0]], name=f"{prefix}/dequant"))


def _int4_rows(graph: onnx.GraphProto, node: onnx.NodeProto, weights: np.ndarray,
               out: list[onnx.NodeProto]) -> None:
    """Gather packed 4-bit rows (two values per byte, offset by 8) and fp16 scales per 32 values;
    unpack with standard ops (BitwiseAnd / BitShift, interleave, reshape) and multiply."""
    vocab, dim = weights.shape
    if dim % 32:
        raise QuantizeError(f"4-bit embedding table needs a width divisible by 32, not {dim}")
    prefix = f"{node.name or node.output[0]}/q4"
    op, ids = op_builder(out, prefix), node.input[1]
    blocks = weights.reshape(vocab, dim // 32, 32)
    scale = np.maximum(np.abs(blocks).max(axis=2, keepdims=True), 1e-12) / 7.0
    scale = scale.astype(np.float16).astype(np.float32)  # stored fp16: quantize against what is stored
    q = (np.clip(np.round(blocks / np.maximum(scale, 1e-12)), -7, 7) + 8).astype(np.uint8).reshape(vocab, dim)
    packed = (q[:, 0::2] | (q[:, 1::2] << 4)).astype(np.uint8)
    last = add_constant(graph, f"{prefix}/last", np.array([-1], np.int64))
    rows = op("Gather", [add_constant(graph, f"{prefix}/table", packed), ids], "rows", axis=0)
    mask = add_constant(graph, f"{prefix}/mask", np.array(15, np.uint8))
    low = op("Unsqueeze", [op("BitwiseAnd", [rows, mask], "low"), last], "low3")
    four = add_constant(graph, f"{prefix}/four", np.array(4, np.uint8))
    high = op("Unsqueeze", [op("BitShift", [rows, four], "high", direction="RIGHT"), last], "high3")
    pairs = op("Concat", [low, high], "pairs", axis=-1)  # [..., dim/2, 2] -> even, odd
    block_shape = add_constant(graph, f"{prefix}/block_shape", np.array([0, 0, dim // 32, 32], np.int64))
    values = op("Sub", [op("Cast", [op("Reshape", [pairs, block_shape], "blocks")], "blocks_f", to=TensorProto.FLOAT),
                        add_constant(graph, f"{prefix}/eight", np.array(8.0, np.float32))], "centered")
    scale_table = add_constant(graph, f"{prefix}/block_scale", scale[..., 0].astype(np.float16))
    scales = op("Unsqueeze", [op("Cast", [op("Gather", [scale_table, ids], "scales16", axis=0)], "scales",
                                 to=TensorProto.FLOAT), last], "scales3")
    row_shape = add_constant(graph, f"{prefix}/row_shape", np.array([0, 0, dim], np.int64))
    out.append(helper.make_node("Reshape", [op("Mul", [values, scales], "dequant"), row_shape], [node.output[0]],
                                name=f"{prefix}/rows_out"))


def quantize_embedding_tables(graph: onnx.GraphProto, nodes: list[onnx.NodeProto],
                               bits: int = 8) -> list[onnx.NodeProto]:
    """Replace Gather on a big fp32 table by a Gather of quantized rows and their scales
    (8 bits: one scale per row; 4 bits: one fp16 scale per 32 values)."""
    if bits not in (4, 8):
        raise QuantizeError(f"embedding_bits must be 4 or 8, not {bits!r}")
    tables = _big_tables(graph, nodes)
    out: list[onnx.NodeProto] = []
    for node in nodes:
        weights = tables.get(node.output[0])
        if weights is None:
            out.append(node)
        else:
            (_int8_rows if bits == 8 else _int4_rows)(graph, node, weights, out)
    return out


