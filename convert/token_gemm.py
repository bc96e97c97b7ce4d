"""The per-token-row integer GEMM that every ``int8-*`` recipe but ``int8-block`` builds on.

Why our own rewrite instead of ONNX Runtime's ``quantize_dynamic``: dynamic quantization uses ONE
activation scale per tensor, i.e. per batch, so a paragraph's vector would change with the other
paragraphs it is batched with, and stored embeddings must not depend on batching. Here activations are
quantized with one scale per token row (computed in the graph), weights per output channel, and the
product is ONNX Runtime's ``MatMulIntegerToFloat`` (the int8 GEMM with the weight steps applied in its
output stage): batch invariant by construction at the int8 GEMM's speed. An activation read by several
MatMuls (q/k/v, gate/up) is quantized once, for one GEMM over their weights side by side.

Weight bits are 8 on every build machine, so an artifact does not depend on where it was converted.
Where ONNX Runtime's u8 x s8 kernel saturates (x86 without VNNI/AMX), the worker asks ONNX Runtime for
its u8 x u8 kernel, which shifts the weights to u8 at load (``deposium.worker.variant``): same integers,
same vectors. The recipes choose what this step adds to the plain form (:mod:`deposium.convert.recipes`):
a second pass on an activation's or a weight's rounding residual, a block-Hadamard rotation of the
activation (:mod:`deposium.convert.rotate`), carried by an upstream GEMM's weight columns where the
graph allows it (:mod:`deposium.convert.fold`). Why each exists: docs/design.md, Recipes.
"""

from __future__ import annotations

import fnmatch
import logging
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from deposium.convert.fold import rotation_donor
from deposium.convert.graph import (
    MS_DOMAIN,
    GraphIndex,
    add_constant,
    drop_unused_initializers,
    initializers,
    op_builder,
    use_domain,
)
from deposium.convert.options import QuantizeError, QuantizeOptions
from deposium.convert.rotate import block_for, rotate_activation, rotate_columns, rotate_weights
from deposium.convert.tables import quantize_embedding_tables

log = logging.getLogger(__name__)


@dataclass
class _MatMulGroup:
    """MatMuls that read the same activation (EmbeddingGemma's q/k/v, gate/up): one quantization of
    that activation and ONE integer GEMM over their weights concatenated along N."""

    nodes: list[onnx.NodeProto]
    weights: list[onnx.TensorProto]  # decoded one at a time, where each GEMM is built
    wide: bool
    #: Rotate the activation (and so every weight of the group) before quantizing; see deposium.convert.rotate.
    rotate: bool = False


def _matmul_groups(graph: onnx.GraphProto, opts: QuantizeOptions) -> dict[str, _MatMulGroup]:
    """Quantizable MatMuls (constant 2-D weight, not kept fp32) grouped by (input, wide), keyed by
    the output of each group's first node in graph order (where the group is emitted)."""
    inits = initializers(graph)
    by_input: dict[tuple[str, bool], _MatMulGroup] = {}
    for node in graph.node:
        weight = inits.get(node.input[1]) if node.op_type == "MatMul" and len(node.input) == 2 else None
        if weight is None or len(weight.dims) != 2 or any(fnmatch.fnmatch(node.name, p) for p in opts.fp32_patterns()):
            continue
        wide = any(fnmatch.fnmatch(node.name, pattern) for pattern in opts.wide_activations)
        group = by_input.setdefault((node.input[0], wide), _MatMulGroup([], [], wide))
        group.nodes.append(node)
        group.weights.append(weight)
        group.rotate = group.rotate or any(fnmatch.fnmatch(node.name, p) for p in opts.rotate_activations)
    return {group.nodes[0].output[0]: group for group in by_input.values()}


def _int8_columns(weights: np.ndarray, qmax: float, wide: bool) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-column int8 weights and their float steps; ``wide`` appends the rounding
    residual quantized again with a step 2*qmax times finer (|residual| <= step / 2)."""
    step = np.maximum(np.abs(weights).max(axis=0), 1e-12) / qmax
    q = np.clip(np.round(weights / step), -qmax, qmax)
    if not wide:
        return q.astype(np.int8), step.astype(np.float32)
    fine = step / (2 * qmax)
    residual = np.clip(np.round((weights - q * step) / fine), -qmax, qmax)
    return (np.concatenate([q, residual], axis=1).astype(np.int8),
            np.concatenate([step, fine]).astype(np.float32))


@dataclass
class _Folds:
    """Rotations the graph lets ``int8-rot`` skip (:mod:`deposium.convert.fold`): MatMuls whose weight columns
    carry the next activation's rotation (output name -> block), and the rotated activations that
    therefore arrive already rotated (group keys)."""

    column_blocks: dict[str, int] = field(default_factory=dict)
    prerotated: set[str] = field(default_factory=set)


def _per_token_matmul(graph: onnx.GraphProto, group: _MatMulGroup, weight_bits: int,
                      activation_bits: int = 8, wide_weights: tuple[str, ...] = (),
                      rotation: tuple[int, int] | None = None, folds: _Folds | None = None,
                      merge: bool = True) -> list[onnx.NodeProto]:
    """MatMul(X, W_i) for every W_i of ``group`` -> per-row u8 X x per-column int8 W_i -> float.

    X is quantized ONCE for all MatMuls that read it (q/k/v, gate/up), each with one step per
    row taken from the row's own max, so a row's result never depends on the other rows of
    its batch. The weight scales (and the activation's 1 / a_max) are applied inside
    ``MatMulIntegerToFloat`` and the row's max by one ``Mul``. ``merge`` puts the group's weights
    side by side in ONE GEMM (:func:`_merged_gemm` says why), and one output split replaces per-GEMM
    nodes.

    ``wide``: the rounding residual of X (at most half a step) is quantized again with a step
    ``2 * a_max`` times finer and multiplied by the same int8 W. Why: activations with outlier
    channels (EmbeddingGemma's MLP down-projection inputs) get one int8 step per token row set by the
    outliers, which swamps the ordinary channels; the second pass gives them about twice the bits,
    stays per token (batch invariant) and needs no calibration data. Both passes are stacked on the
    batch axis into the same GEMM, so the prepacked weights exist once.

    ``rotation`` = (rank, block) of the activation when ``group.rotate``: X is multiplied by a
    block-Hadamard matrix first and every W_i by its transpose (:mod:`deposium.convert.rotate`), unless an
    upstream GEMM's weight columns already rotated it (``folds.prerotated``).
    """
    folds = folds or _Folds()
    qmax = float(2 ** (weight_bits - 1) - 1)
    first = group.nodes[0]
    p = f"{first.name or first.output[0]}/tq"
    nodes: list[onnx.NodeProto] = []
    op = op_builder(nodes, p)
    a_max = 2 ** (activation_bits - 1) - 1
    shared = f"tq/shared{activation_bits}"
    if not any(i.name == f"{shared}/axis" for i in graph.initializer):
        add_constant(graph, f"{shared}/axis", np.array([-1], np.int64))
        add_constant(graph, f"{shared}/eps", np.array(1e-10 * a_max, np.float32))
        add_constant(graph, f"{shared}/zp", np.array(a_max + 1, np.uint8))
        add_constant(graph, f"{shared}/one", np.array(1.0, np.float32))
        add_constant(graph, f"{shared}/step", np.array(1.0 / a_max, np.float32))
        add_constant(graph, f"{shared}/fine_step", np.array(1.0 / (2 * a_max * a_max), np.float32))
        add_constant(graph, f"{shared}/fine", np.array(1.0 / (2 * a_max), np.float32))
    x = first.input[0]
    block = 0
    if rotation is not None:
        rank, block = rotation
        if first.output[0] not in folds.prerotated:
            rotated, x = rotate_activation(graph, x, group.weights[0].dims[0], rank, block, f"{p}/rot")
            nodes += rotated
    # Row max m, X / m in [-1, 1], QuantizeLinear with step 1 / a_max: round, saturate, shift to u8
    # in one vectorized pass. The 1 / a_max goes into the weight scales, m into the output Mul.
    absmax = op("ReduceMax", [op("Abs", [x], "abs"), f"{shared}/axis"], "absmax", keepdims=1)
    scale = op("Max", [absmax, f"{shared}/eps"], "scale")
    scaled = op("Div", [x, scale], "scaled")
    x_u8 = op("QuantizeLinear", [scaled, f"{shared}/step", f"{shared}/zp"], "x_u8")
    if group.wide:
        rounded = op("DequantizeLinear", [x_u8, f"{shared}/step", f"{shared}/zp"], "rounded")
        residual = op("Sub", [scaled, rounded], "residual")
        fine_u8 = op("QuantizeLinear", [residual, f"{shared}/fine_step", f"{shared}/zp"], "residual_u8")
        x_u8 = op("Concat", [x_u8, fine_u8], "stacked", axis=0)
    parts = []
    for node, weight in zip(group.nodes, group.weights, strict=True):
        weights = numpy_helper.to_array(weight).astype(np.float32)
        if block:
            weights = rotate_weights(weights, block)
        if node.output[0] in folds.column_blocks:
            weights = rotate_columns(weights, folds.column_blocks[node.output[0]])
        wide_w = any(fnmatch.fnmatch(node.name, pattern) for pattern in wide_weights)
        w_int8, w_scale = _int8_columns(weights, qmax, wide_w)
        parts.append(_GemmPart(node, w_int8, w_scale / np.float32(a_max), wide_w))
    if merge and len(parts) > 1:
        return nodes + _merged_gemm(graph, parts, x_u8, scale, shared, group.wide, f"{p}/merged")
    for part in parts:
        own = f"{part.node.name or part.node.output[0]}/tq"
        nodes += _merged_gemm(graph, [part], x_u8, scale, shared, group.wide, own)
    return nodes


@dataclass
class _GemmPart:
    """One MatMul of a group, ready for the integer GEMM: its int8 columns and their float steps."""

    node: onnx.NodeProto
    w_int8: np.ndarray
    w_scale: np.ndarray
    wide_w: bool  # columns [W_int8 | residual_int8], the residual's steps already scaled in w_scale


def _merged_gemm(graph: onnx.GraphProto, parts: list[_GemmPart], x_u8: str, scale: str, shared: str, wide: bool,
                 prefix: str) -> list[onnx.NodeProto]:
    """ONE ``MatMulIntegerToFloat`` over the parts' columns side by side, then each part's output.

    Why one GEMM: the parts read the same u8 activation, and on a short query a narrow GEMM (a
    grouped-query k_proj) runs at a lower rate than a wide one, besides its own dispatch; the output
    is multiplied by the row's m and split once.
    """
    nodes: list[onnx.NodeProto] = []
    g = op_builder(nodes, prefix)
    w_int8 = np.concatenate([part.w_int8 for part in parts], axis=1)
    w_scale = np.concatenate([part.w_scale for part in parts])
    acc = g("MatMulIntegerToFloat", [x_u8, add_constant(graph, f"{prefix}/w_int8", w_int8), f"{shared}/one",
                                     add_constant(graph, f"{prefix}/w_scale", w_scale), f"{shared}/zp"], "acc",
            domain=MS_DOMAIN)
    if wide:  # y = m * (coarse + fine / (2 * a_max))
        coarse, fine = g("Split", [acc], "coarse", axis=0, num_outputs=2), f"{prefix}/fine_acc"
        nodes[-1].output.append(fine)
        acc = g("Add", [coarse, g("Mul", [fine, f"{shared}/fine"], "fine_term")], "wide")
    scale_once = len(parts) > 1
    if scale_once:
        acc = g("Mul", [acc, scale], "scaled_all")
    pieces: list[str] = []
    for part in parts:
        name = part.node.output[0]
        if part.wide_w:
            pieces += [f"{name}/tq/w_main", f"{name}/tq/w_rest"]
        else:
            pieces.append(name if scale_once else f"{name}/tq/acc")
    if len(pieces) > 1:
        widths = [part.w_int8.shape[1] // (2 if part.wide_w else 1) for part in parts for _ in range(1 + part.wide_w)]
        split = add_constant(graph, f"{prefix}/split", np.array(widths, np.int64))
        nodes.append(helper.make_node("Split", [acc, split], pieces, name=f"{prefix}/split", axis=-1))
    else:
        if any(pieces[0] in node.output for node in nodes[:-1]):  # a MatMul named after its output (the head's)
            _rename(nodes[:-1], pieces[0], f"{prefix}/gemm_acc")  # gave the GEMM that name: SSA wants it once
        nodes[-1].output[0] = pieces[0]
    for part in parts:
        name, node_prefix = part.node.output[0], f"{part.node.name or part.node.output[0]}/tq"
        out = f"{name}/tq/acc"
        if part.wide_w:
            add_out = name if scale_once else out
            nodes.append(helper.make_node("Add", [f"{name}/tq/w_main", f"{name}/tq/w_rest"], [add_out],
                                          name=f"{node_prefix}/wide_w"))
        if not scale_once:
            nodes.append(helper.make_node("Mul", [out, scale], [name], name=f"{node_prefix}/out"))
    return nodes


def _rename(nodes: list[onnx.NodeProto], old: str, new: str) -> None:
    for node in nodes:
        for names in (node.input, node.output):
            for i, name in enumerate(names):
                if name == old:
                    names[i] = new


def per_token_graph(model: onnx.ModelProto, opts: QuantizeOptions, weight_bits: int,
                    activation_bits: int) -> tuple[onnx.ModelProto, dict[str, int]]:
    """Rewrite ``model`` in place: every quantizable MatMul as a per-token-row integer GEMM, the embedding
    table quantized as asked; also return counts for the manifest (activations quantized / rotated)."""
    graph = model.graph
    groups = _matmul_groups(graph, opts)
    if not groups:
        raise QuantizeError("no MatMul with constant weights found to quantize")
    grouped = {node.output[0] for group in groups.values() for node in group.nodes}
    rotations = _rotations(graph, groups, opts.rotation_block)
    folds = _find_folds(graph, groups, rotations) if opts.fold else _Folds()
    nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        if node.output[0] in groups:
            nodes += _per_token_matmul(graph, groups[node.output[0]], weight_bits, activation_bits,
                                       tuple(opts.wide_weights), rotations.get(node.output[0]), folds,
                                       opts.merge_gemms)
        elif node.output[0] not in grouped:
            nodes.append(node)
    if opts.quantize_embeddings:
        nodes = quantize_embedding_tables(graph, nodes, opts.embedding_bits)
    del graph.node[:]
    graph.node.extend(nodes)
    drop_unused_initializers(graph)
    use_domain(model, MS_DOMAIN)
    log.info("%s: quantized %d MatMuls (%d distinct activations, %d rotated) with %d-bit weights, %d-bit "
             "activations", opts.recipe, len(grouped), len(groups), len(rotations), weight_bits, activation_bits)
    return model, {"quantized_matmuls": len(grouped), "quantized_activations": len(groups),
                   "rotated_activations": len(rotations), "rotations_folded_into_weights": len(folds.prerotated)}


def _find_folds(graph: onnx.GraphProto, groups: dict[str, _MatMulGroup],
                rotations: dict[str, tuple[int, int]]) -> _Folds:
    """Rotations an upstream GEMM's columns can carry (:mod:`deposium.convert.fold`); the donors' bias
    vectors are rotated here, in the graph."""
    folds = _Folds()
    outputs = {node.output[0] for group in groups.values() for node in group.nodes}
    index = GraphIndex.of(graph)  # once: the walks only read the graph
    for key, (_rank, block) in rotations.items():
        donor = rotation_donor(index, groups[key].nodes[0].input[0], block, outputs)
        if donor is None:
            continue
        folds.prerotated.add(key)
        folds.column_blocks[donor.matmul.output[0]] = block
        for name in donor.biases:
            bias = index.constants[name]
            bias.CopyFrom(numpy_helper.from_array(rotate_columns(numpy_helper.to_array(bias), block), name))
    log.info("folds: %d rotations carried by upstream weights", len(folds.prerotated))
    return folds


def _rotations(graph: onnx.GraphProto, groups: dict[str, _MatMulGroup], block: int) -> dict[str, tuple[int, int]]:
    """(rank, block) of every group that asks for rotation and can have it. Why skip rather than
    fail: rotation only buys fidelity, and the gate judges the result; an activation of unknown
    rank, or a width with no power-of-two block of at least 8, stays unrotated (logged)."""
    wanted = {key: g for key, g in groups.items() if g.rotate}
    if not wanted:
        return {}
    ranks = {vi.name: len(vi.type.tensor_type.shape.dim) for vi in (*graph.value_info, *graph.input)
             if vi.type.HasField("tensor_type") and vi.type.tensor_type.HasField("shape")}
    out = {}
    for key, group in wanted.items():
        x, width = group.nodes[0].input[0], group.weights[0].dims[0]
        b = block_for(width, block)
        if x not in ranks or ranks[x] < 2 or b is None:
            log.warning("not rotating the activation %s (rank %s, width %d)", x, ranks.get(x), width)
            continue
        out[key] = (ranks[x], b)
    return out
