"""``int8-fused``: every integer-GEMM chain of an ``int8-rot`` graph becomes ONE custom op.

Why: ``int8-rot`` quantizes each activation row with five ONNX Runtime nodes (Abs, ReduceMax, Max,
Div, QuantizeLinear), multiplies with ``MatMulIntegerToFloat`` and applies the row scale with a sixth,
each a pass over the whole activation. The ``deposium.rowq`` ops (worker/kernels/rowq_op.c) do the
chain in one pass: same per-row u8 codes, same int8 weights, same scales, other float rounding
(speed against ``int8-rot`` and the peers: docs/benchmarks.md).

The rewrite also folds, where the graph allows it:
- the block-32 Hadamard rotation before a chain (``deposium.convert.rotate``'s Reshape / MatMul / Reshape), into
  the op's quantization step (``FusedRot...``: a fast Walsh-Hadamard transform in registers);
- the bias ``Add`` after a chain, and the exact erf GELU after that as the BERT export writes it, into
  the op's epilogue (``...Bias``, ``...BiasGelu``);
- the ``Split`` after a merged GEMM (q/k/v, gate/up: ``deposium.convert.token_gemm._merged_gemm``), into the op's
  outputs (``...Split``): each part gets its own tensor, written in place, instead of a copy.

Chains the kernels cannot take (K or N not a multiple of 64) stay as they are, counted in the manifest.
The weights are packed here, once, into the kernels' layout (:func:`pack_weights`), with their column
sums; the unpacked copies leave the artifact.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from deposium.convert.graph import GraphIndex, drop_unused_initializers, use_domain
from deposium.worker.kernels import DOMAIN

#: The kernels' tile: K and N of a fused GEMM must be multiples of it.
TILE = 64


def pack_weights(w: np.ndarray) -> np.ndarray:
    """[K, N] int8 -> for each 16-column block and 64-deep k step, 16 rows of (16 columns x 4 k values):
    AMX's B tile, and read per column block a run of 64-byte vectors, what VNNI's vpdpbusd and the AVX2
    path read too (worker/kernels/rowq_kernels.h). One layout for every path: one artifact for every CPU."""
    k, n = w.shape
    return np.ascontiguousarray(w.reshape(k // 64, 16, 4, n // 16, 16).transpose(3, 0, 1, 4, 2)).reshape(-1)


def _other_input(node: onnx.NodeProto, name: str) -> str:
    """The operand of a binary node that is not ``name``."""
    return node.input[1] if node.input[0] == name else node.input[0]


def _sole(name: str, index: GraphIndex, op_type: str) -> onnx.NodeProto | None:
    reader = index.only_reader(name)
    return reader if reader is not None and reader.op_type == op_type else None


def _rotation_before(x: str, index: GraphIndex) -> tuple[str, list[onnx.NodeProto]] | None:
    """When ``x`` is a block-32 rotation's output (convert/rotate.py: Reshape, MatMul by the shared
    ``rot/hadamard32``, Reshape) that only this chain reads: the unrotated input and the three nodes."""
    joined = index.producer.get(x)
    if joined is None or not joined.name.endswith("/rot/rotated"):
        return None
    turned = index.producer.get(joined.input[0])
    blocks = turned and index.producer.get(turned.input[0])
    if blocks is None or turned.input[1] != "rot/hadamard32":
        return None
    if any(index.only_reader(n.output[0]) is None for n in (blocks, turned)):
        return None
    return blocks.input[0], [blocks, turned, joined]


def _is_scalar(name: str, index: GraphIndex, value: float, tolerance: float = 0.0) -> bool:
    found = index.value(name)
    return found is not None and found.size == 1 and abs(float(found.reshape(-1)[0]) - value) <= tolerance


def _epilogue_after(out: str, n: int, index: GraphIndex) -> tuple[str, str, list[onnx.NodeProto], str] | None:
    """(op suffix, bias name, nodes folded, new output) when ``out`` only feeds ``Add(out, bias[n])``; with
    the exact GELU when that Add only feeds ``x * 0.5 * (1 + erf(x / sqrt 2))`` as the BERT export writes it."""
    add = _sole(out, index, "Add")
    if add is None:
        return None
    bias = _other_input(add, out)
    value = index.value(bias)
    if value is None or value.shape != (n,):
        return None
    y = add.output[0]
    plain = "Bias", bias, [add], y
    readers = index.consumers.get(y, [])
    if sorted(r.op_type for r in readers) != ["Div", "Mul"]:
        return plain
    div = next(r for r in readers if r.op_type == "Div")
    times_x = next(r for r in readers if r.op_type == "Mul")
    erf = _sole(div.output[0], index, "Erf")
    plus = erf and _sole(erf.output[0], index, "Add")
    half_mul = _sole(times_x.output[0], index, "Mul")
    if (div.input[0] != y or not _is_scalar(div.input[1], index, 2 ** 0.5, 1e-6) or plus is None
            or half_mul is None or plus.output[0] not in times_x.input
            or not _is_scalar(_other_input(plus, erf.output[0]), index, 1.0)
            or not _is_scalar(_other_input(half_mul, times_x.output[0]), index, 0.5)):
        return plain
    return "BiasGelu", bias, [add, div, erf, plus, times_x, half_mul], half_mul.output[0]


def _split_after(out: str, n: int, index: GraphIndex) -> tuple[onnx.NodeProto, np.ndarray] | None:
    """The ``Split`` along the last axis that alone reads ``out``, with its widths, when every width is a
    multiple of the kernels' tile (so each 64-column panel of the GEMM belongs to one part)."""
    split = _sole(out, index, "Split")
    if split is None or len(split.input) < 2:
        return None
    axis = next((a.i for a in split.attribute if a.name == "axis"), 0)
    widths = index.value(split.input[1])
    rank = len(index.shapes.get(out) or [])
    if widths is None or (axis != -1 and (rank == 0 or axis != rank - 1)):
        return None
    widths = widths.astype(np.int64).reshape(-1)
    if int(widths.sum()) != n or any(int(w) % TILE for w in widths):
        return None
    return split, widths


def fuse_gemms(model: onnx.ModelProto) -> dict[str, int]:
    """Rewrite ``model`` (an ``int8-rot`` or ``int8-token`` graph) in place; returns counts for the manifest."""
    graph = model.graph
    index = GraphIndex.of(graph)
    dropped: set[int] = set()
    added: list[onnx.TensorProto] = []
    counts = {"fused_gemms": 0, "fused_rotations": 0, "fused_bias": 0, "fused_bias_gelu": 0, "fused_splits": 0,
              "unfused_gemms": 0}
    for gemm in [n for n in graph.node if n.op_type == "MatMulIntegerToFloat"]:
        quantize = index.producer.get(gemm.input[0])
        divide = quantize and index.producer.get(quantize.input[0])
        scale_mul = _sole(gemm.output[0], index, "Mul")
        w = index.value(gemm.input[1])
        if divide is None or divide.op_type != "Div" or scale_mul is None or w is None:
            counts["unfused_gemms"] += 1  # not the per-row chain this op computes
            continue
        x, row_scale = divide.input
        floor = index.producer[row_scale]
        absmax = index.producer[floor.input[0]]
        absolute = index.producer[absmax.input[0]]
        if w.ndim != 2 or w.shape[0] % TILE or w.shape[1] % TILE:
            counts["unfused_gemms"] += 1
            continue
        base, op_type, chain = f"{gemm.name}/fused", "FusedRowQGemm", []
        found = _rotation_before(x, index)
        if found is not None and {r.op_type for r in index.consumers[x]} == {"Abs", "Div"}:
            (x, chain), op_type = found, "FusedRotRowQGemm"
            counts["fused_rotations"] += 1
        w8 = w.astype(np.int8)
        added += [numpy_helper.from_array(pack_weights(w8), f"{base}/b"),
                  numpy_helper.from_array(w8.astype(np.int32).sum(axis=0).astype(np.int32), f"{base}/colsum")]
        inputs, output = [x, f"{base}/b", gemm.input[3], f"{base}/colsum"], scale_mul.output[0]
        outputs = [output]
        after = _epilogue_after(output, w.shape[1], index)
        parts = _split_after(output, w.shape[1], index) if after is None else None
        if after is not None:
            suffix, bias, folded, output = after
            op_type += suffix
            inputs.append(bias)
            chain = [*chain, *folded]
            outputs = [output]
            counts["fused_bias_gelu" if suffix == "BiasGelu" else "fused_bias"] += 1
        elif parts is not None:
            split_node, widths = parts
            op_type += "Split"
            added.append(numpy_helper.from_array(widths, f"{base}/widths"))
            inputs.append(f"{base}/widths")
            chain = [*chain, split_node]
            outputs = list(split_node.output)
            counts["fused_splits"] += 1
        graph.node.insert(list(graph.node).index(gemm), helper.make_node(op_type, inputs, outputs, name=base,
                                                                         domain=DOMAIN))
        dropped |= {id(n) for n in (gemm, scale_mul, quantize, divide, floor, absmax, absolute, *chain)}
        counts["fused_gemms"] += 1
    kept = [n for n in graph.node if id(n) not in dropped]
    read = {name for node in kept for name in node.input} | {o.name for o in graph.output}
    kept = [n for n in kept if n.op_type != "Constant" or n.output[0] in read]  # the GELU's 0.5, 1, sqrt 2
    del graph.node[:]
    graph.node.extend(kept)
    graph.initializer.extend(added)
    drop_unused_initializers(graph)  # the unpacked weights no chain reads any more
    if counts["fused_gemms"]:
        use_domain(model, DOMAIN)
    return counts
