"""Quantization recipes that turn the fp32 pipeline graph into the int8 artifact.

Why our own default recipe (``int8-token``) instead of ``quantize_dynamic``: ONNX Runtime's
dynamic quantization uses ONE activation scale per tensor, i.e. per batch, so a paragraph's
vector changes with the other paragraphs it is batched with. Stored embeddings must not depend
on batching. ``int8-token`` quantizes activations with one scale per token row (computed in the
graph), weights per output channel, and multiplies with ONNX Runtime's ``MatMulIntegerToFloat``
(the int8 GEMM with the weight steps applied in its output stage); it is batch invariant by
construction and keeps the int8 GEMM speed. An activation read by several MatMuls (q/k/v,
gate/up) is quantized once. Measured on MiniLM (AVX2 core, see
BENCHMARKS.md): cosine vs fp32 0.997 mean / 0.994 min on paragraphs, batch invariance 0.999999,
~2x fp32 speed; ``int8-dynamic`` was 0.993 / 0.984 and only 0.989 batch-invariant.

Weight bits: 8 by default, on every build machine, so an artifact does not depend on where it
was converted. Where ONNX Runtime's u8 x s8 kernel saturates (x86 without VNNI/AMX), the worker
asks ONNX Runtime for its u8 x u8 kernel, which shifts the weights to u8 at load
(``deposium.worker.variant``): same integers, same vectors. ``weight_bits=7`` remains as an option.

The token-embedding table is stored int8 with one scale per row (Gather the int8 rows and their
scales, then multiply): EmbeddingGemma's 262144x768 table is two thirds of its weights.

The head's Dense layers stay fp32 in every recipe: they run once per paragraph (after pooling),
so int8 there saves no time, only ~14 MB on EmbeddingGemma, yet it was most of that model's
quantization error (cosine vs torch 0.99722 -> 0.99877 mean when kept fp32; 48 real paragraphs).

``int8-rot`` is ``int8-token`` with every quantized activation rotated by a block-Hadamard matrix
first (and the weights by its transpose, so the product is unchanged; see :mod:`deposium.convert.rotate`):
the rotation spreads outlier channels over their block, so one step per token row fits every
channel. On real EmbeddingGemma-300m it reached 0.99975 / 0.99952 (with the value projections'
weight residual below) at 1.6x the speed of ``int8-wide`` on an AVX-512 VNNI core without AMX.

Every per-token recipe runs one integer GEMM per quantized activation (q/k/v side by side, and
gate/up), and ``int8-rot`` lets the value projection's weight columns carry the attention
output's rotation instead of rotating it in the graph (:mod:`deposium.convert.fold`).

``int8-wide`` is ``int8-token`` with a second int8 pass over every activation's rounding
residual (see ``_per_token_matmul``): ~15-bit activations (~13 with its default 7-bit passes,
:data:`DEFAULT_ACTIVATION_BITS`), 8-bit weights, both passes stacked
into one GEMM so the prepacked weights exist once. On real
EmbeddingGemma-300m it reached cosine 0.99966 mean / 0.99950 min (llama.cpp Q8_0 level) at
about 1.5x the integer cost of ``int8-token``, still well above the speed of the block-wise
``MatMulNBits`` recipe on this CPU family (BENCHMARKS.md).

``int8-fused`` is ``int8-rot`` whose integer-GEMM chains :mod:`deposium.convert.fuse` then rewrites into the
custom ops of ``worker/kernels`` (one pass per GEMM instead of seven nodes): same quantization, other
float rounding, 1.2-1.4x the speed (BENCHMARKS.md).
"""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from deposium.convert.fold import GraphIndex, rotation_donor
from deposium.convert.rotate import DEFAULT_BLOCK, block_for, rotate_activation, rotate_columns, rotate_weights
from deposium.worker.cpu import cpu_features
from deposium.worker.variant import EXACT_U8S8

log = logging.getLogger(__name__)

RECIPES = ("int8-fused", "int8-token", "int8-rot", "int8-attn", "int8-wide", "int8-block", "int8-dynamic", "fp32")
DEFAULT_RECIPE = "int8-token"
#: What ``--recipe auto`` (convert's default) tries, fastest first; the first one to pass the gate
#: ships. Measured (cosine vs torch on the gate's 160 held-out paragraphs, mean / min):
#: all-MiniLM-L6-v2 int8-token 0.99808 / 0.99651 fails the 0.999 mean gate, int8-rot 0.99971 /
#: 0.99949 ships (int8-attn 0.99919 / 0.99839 and int8-wide 0.99963 / 0.99914, both slower, are no
#: longer tried); EmbeddingGemma-300m int8-token 0.99874 / 0.99816 fails its llama.cpp-level gate
#: (0.9995 / 0.999), int8-rot 0.99975 / 0.99952 ships (int8-wide 0.99977 / 0.99961 at 0.6x its
#: speed is the next step where a model needs more). The block-wise recipe is the last resort (as
#: faithful, slower without fast 8-bit kernels). That is the order where the fused kernels are not built
#: (:data:`AUTO_RECIPES_PORTABLE`); where they are, ``int8-fused`` replaces both single-pass recipes: it
#: computes ``int8-rot``'s numbers with each integer-GEMM chain as one op of worker/kernels
#: (:mod:`deposium.convert.fuse`), faster than either (all-MiniLM-L6-v2 0.99971 / 0.99937 at 1.29x int8-rot's
#: tokens/s, EmbeddingGemma-300m 0.99975 / 0.99964 at 1.18x; Zen 4, BENCHMARKS.md), so where it fails
#: the gate int8-rot would too and int8-token, less faithful, is no use either.
AUTO_RECIPES = ("int8-fused", "int8-wide", "int8-block")
AUTO_RECIPES_PORTABLE = ("int8-token", "int8-rot", "int8-wide", "int8-block")
#: Inputs of the attention q/k/v projections (Gemma/Llama-style and BERT-style export names):
#: where all-MiniLM-L6-v2's int8 error concentrates (its LayerNorm outputs carry outlier
#: channels). A residual pass there alone took its paragraphs from 0.99808 to 0.99910 mean
#: cosine; on the feed-forward inputs only to 0.99850, at a higher cost.
ATTENTION_INPUTS = ("*q_proj*", "*k_proj*", "*v_proj*", "*/attention/self/*")
#: Attention value projections (Gemma/Llama-style and BERT-style export names). Why wide weights
#: there: values are averaged over up to 2048 positions, so their weight rounding error does not
#: average out the way per-token activation error does; on real EmbeddingGemma inputs of
#: 623/1097/2048 tokens int8-wide reached cosine 0.99913/0.99893/0.99870 vs torch, and keeping
#: only v_proj fp32 gave 0.99940/0.99926/0.99911 (q, k, o or the MLP did not get there).
VALUE_PROJECTIONS = ("*v_proj*", "*/value/*")
#: Activation bits of each integer-GEMM recipe unless the caller chooses. ``int8-wide`` takes 7: its
#: residual pass already carries the bits a 7-bit first pass drops (coarse + fine, a step 126x finer:
#: ~13 bits), so on real EmbeddingGemma paragraphs 7 and 8 gave the same cosine vs torch to five digits,
#: while 7-bit activations cannot saturate the u8 x s8 kernel of CPUs without VNNI: the exact signed
#: kernel on every CPU, 1.2x faster than u8 x u8 on CPUs without VNNI (BENCHMARKS.md). The
#: single-pass recipes keep 8: their first pass is all the precision they have.
#: ``int8-rot`` keeps 8: with 7 bits EmbeddingGemma fell to 0.99951 / 0.99927, at the gate's edge.
#: ``int8-fused`` only takes 8: its kernels quantize with zero point 128 themselves.
DEFAULT_ACTIVATION_BITS = {"int8-fused": 8, "int8-token": 8, "int8-rot": 8, "int8-attn": 8, "int8-wide": 7}
#: MatMuls of the sentence-transformers head (see deposium.convert.head): never quantized by default.
HEAD_PATTERN = "head/*"
#: Gather tables at least this large (elements) are quantized; position tables are small.
MIN_GATHER_TABLE = 1 << 20


class QuantizeError(RuntimeError):
    """A recipe could not be applied to this graph."""


@dataclass
class QuantizeOptions:
    recipe: str = DEFAULT_RECIPE
    #: 8, or 7 (an explicit option); integer-GEMM recipes only.
    weight_bits: int = 8
    quantize_embeddings: bool = True
    #: fnmatch patterns of MatMul node names left in fp32 (e.g. outlier-heavy projections).
    keep_fp32: list[str] = field(default_factory=list)
    block_size: int = 32  # int8-block only
    #: Activation bits of the integer-GEMM recipes: 8, or 7 (|a| <= 63 with zero point 64, so no pair
    #: of u8 x s8 products can saturate: exact with the fast signed kernel on every CPU, less faithful);
    #: None = the recipe's own default (:data:`DEFAULT_ACTIVATION_BITS`).
    activation_bits: int | None = None
    #: int8-token: fnmatch patterns of MatMul node names whose activations get a second int8 pass
    #: on the rounding residual (~15-bit activations at twice that MatMul's integer cost).
    #: ``int8-wide`` means every MatMul.
    wide_activations: list[str] = field(default_factory=list)
    #: int8-token: fnmatch patterns of MatMul node names whose weights get a second int8 pass on
    #: their rounding residual (~15-bit weights; the GEMM gets twice the columns).
    #: ``int8-attn``, ``int8-rot`` and ``int8-wide`` add :data:`VALUE_PROJECTIONS`.
    wide_weights: list[str] = field(default_factory=list)
    #: int8-token: fnmatch patterns of MatMul node names whose activation is rotated by a block-Hadamard
    #: matrix before quantization (:mod:`deposium.convert.rotate`); ``int8-rot`` means every MatMul.
    rotate_activations: list[str] = field(default_factory=list)
    #: Rotation block (a power of two; a smaller one where an activation's width needs it).
    rotation_block: int = DEFAULT_BLOCK
    #: Quantize the head's Dense MatMuls too (they run once per paragraph: size only, no speed).
    quantize_head: bool = False
    #: int8-rot: skip an activation's rotation where an upstream GEMM's weight columns can carry it
    #: (deposium.convert.fold); False keeps every rotation node.
    fold: bool = True
    #: One integer GEMM per quantized activation (q/k/v, gate/up side by side) instead of one per MatMul.
    merge_gemms: bool = True
    #: Token-embedding table bits: 8 (one scale per row) or 4 (one fp16 scale per 32 values;
    #: EmbeddingGemma's table drops from 201 MB to 113 MB; fidelity reported by the gate).
    embedding_bits: int = 8

    def fp32_patterns(self) -> list[str]:
        return list(self.keep_fp32) + ([] if self.quantize_head else [HEAD_PATTERN])

def _table_label(opts: QuantizeOptions) -> str:
    if not opts.quantize_embeddings:
        return "fp32"
    return "int8 per row" if opts.embedding_bits == 8 else "4-bit, fp16 scale per 32 values"


def cpu_has_vnni() -> bool:
    return bool(cpu_features() & EXACT_U8S8)


def _const(graph: onnx.GraphProto, name: str, value: np.ndarray) -> str:
    graph.initializer.append(numpy_helper.from_array(value, name))
    return name


def _initializers(graph: onnx.GraphProto) -> dict[str, onnx.TensorProto]:
    return {init.name: init for init in graph.initializer}


def _op_builder(nodes: list[onnx.NodeProto], prefix: str) -> Callable[..., str]:
    """``op(kind, inputs, suffix, **attrs)``: append a node named and outputting ``prefix/suffix``."""
    def op(kind: str, inputs: list[str], suffix: str, **attrs: Any) -> str:
        name = f"{prefix}/{suffix}"
        nodes.append(helper.make_node(kind, inputs, [name], name=name, **attrs))
        return name
    return op


def drop_unused_initializers(graph: onnx.GraphProto) -> None:
    used = {name for node in graph.node for name in node.input}
    used |= {o.name for o in graph.output}
    keep = [init for init in graph.initializer if init.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)


def _big_tables(graph: onnx.GraphProto, nodes: list[onnx.NodeProto]) -> dict[str, np.ndarray]:
    """Gather nodes (by output name) reading a large constant 2-D table along axis 0."""
    inits = _initializers(graph)
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
    op, ids = _op_builder(out, prefix), node.input[1]
    scale = np.maximum(np.abs(weights).max(axis=1, keepdims=True), 1e-12) / 127.0
    q = np.clip(np.round(weights / scale), -127, 127).astype(np.int8)
    rows = op("Cast", [op("Gather", [_const(graph, f"{prefix}/table", q), ids], "rows", axis=0)], "rows_f",
              to=TensorProto.FLOAT)
    scales = op("Gather", [_const(graph, f"{prefix}/row_scale", scale.astype(np.float32)), ids], "scales", axis=0)
    out.append(helper.make_node("Mul", [rows, scales], [node.output[0]], name=f"{prefix}/dequant"))


def _int4_rows(graph: onnx.GraphProto, node: onnx.NodeProto, weights: np.ndarray,
               out: list[onnx.NodeProto]) -> None:
    """Gather packed 4-bit rows (two values per byte, offset by 8) and fp16 scales per 32 values;
    unpack with standard ops (BitwiseAnd / BitShift, interleave, reshape) and multiply."""
    vocab, dim = weights.shape
    if dim % 32:
        raise QuantizeError(f"4-bit embedding table needs a width divisible by 32, not {dim}")
    prefix = f"{node.name or node.output[0]}/q4"
    op, ids = _op_builder(out, prefix), node.input[1]
    blocks = weights.reshape(vocab, dim // 32, 32)
    scale = np.maximum(np.abs(blocks).max(axis=2, keepdims=True), 1e-12) / 7.0
    scale = scale.astype(np.float16).astype(np.float32)  # stored fp16: quantize against what is stored
    q = (np.clip(np.round(blocks / np.maximum(scale, 1e-12)), -7, 7) + 8).astype(np.uint8).reshape(vocab, dim)
    packed = (q[:, 0::2] | (q[:, 1::2] << 4)).astype(np.uint8)
    last = _const(graph, f"{prefix}/last", np.array([-1], np.int64))
    rows = op("Gather", [_const(graph, f"{prefix}/table", packed), ids], "rows", axis=0)
    low = op("Unsqueeze", [op("BitwiseAnd", [rows, _const(graph, f"{prefix}/mask", np.array(15, np.uint8))], "low"),
                           last], "low3")
    high = op("Unsqueeze", [op("BitShift", [rows, _const(graph, f"{prefix}/four", np.array(4, np.uint8))], "high",
                               direction="RIGHT"), last], "high3")
    pairs = op("Concat", [low, high], "pairs", axis=-1)  # [..., dim/2, 2] -> even, odd
    block_shape = _const(graph, f"{prefix}/block_shape", np.array([0, 0, dim // 32, 32], np.int64))
    values = op("Sub", [op("Cast", [op("Reshape", [pairs, block_shape], "blocks")], "blocks_f", to=TensorProto.FLOAT),
                        _const(graph, f"{prefix}/eight", np.array(8.0, np.float32))], "centered")
    scale_table = _const(graph, f"{prefix}/block_scale", scale[..., 0].astype(np.float16))
    scales = op("Unsqueeze", [op("Cast", [op("Gather", [scale_table, ids], "scales16", axis=0)], "scales",
                                 to=TensorProto.FLOAT), last], "scales3")
    row_shape = _const(graph, f"{prefix}/row_shape", np.array([0, 0, dim], np.int64))
    out.append(helper.make_node("Reshape", [op("Mul", [values, scales], "dequant"), row_shape], [node.output[0]],
                                name=f"{prefix}/rows_out"))


def _quantize_embedding_tables(graph: onnx.GraphProto, nodes: list[onnx.NodeProto],
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


#: ONNX Runtime's contrib domain: ``MatMulIntegerToFloat`` (int8 GEMM with the weight scales applied
#: in the GEMM's output stage, one node instead of MatMulInteger + Cast + Mul).
MS_DOMAIN = "com.microsoft"


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
    inits = _initializers(graph)
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
    side by side in ONE GEMM: at 16 rows a 256-column GEMM (EmbeddingGemma's k_proj) ran at ~0.8x
    the rate of a 1,152-column one on Zen 5, and one output split replaces per-GEMM nodes. The
    widest output, gate/up's [rows, 2,304] floats, is 1.2 MB at the default 128-token budget:
    under the worker's 4 MiB mmap threshold, so it costs no page faults per call.

    ``wide``: the rounding residual of X (at most half a step) is quantized again with a step
    ``2 * a_max`` times finer and multiplied by the same int8 W. Why: EmbeddingGemma's MLP
    down-projection inputs carry outliers 45-230x their RMS, so one int8 step per token row
    swamps the ordinary channels; the second pass gives them ~15 bits (~13 with 7-bit passes), stays per token (batch
    invariant) and needs no calibration data. Both passes are stacked on the batch axis into
    the same GEMM, so the prepacked weights exist once.

    ``rotation`` = (rank, block) of the activation when ``group.rotate``: X is multiplied by a
    block-Hadamard matrix first and every W_i by its transpose (:mod:`deposium.convert.rotate`), unless an
    upstream GEMM's weight columns already rotated it (``folds.prerotated``).
    """
    folds = folds or _Folds()
    qmax = float(2 ** (weight_bits - 1) - 1)
    first = group.nodes[0]
    p = f"{first.name or first.output[0]}/tq"
    nodes: list[onnx.NodeProto] = []
    op = _op_builder(nodes, p)
    a_max = 2 ** (activation_bits - 1) - 1
    shared = f"tq/shared{activation_bits}"
    if not any(i.name == f"{shared}/axis" for i in graph.initializer):
        _const(graph, f"{shared}/axis", np.array([-1], np.int64))
        _const(graph, f"{shared}/eps", np.array(1e-10 * a_max, np.float32))
        _const(graph, f"{shared}/zp", np.array(a_max + 1, np.uint8))
        _const(graph, f"{shared}/one", np.array(1.0, np.float32))
        _const(graph, f"{shared}/step", np.array(1.0 / a_max, np.float32))
        _const(graph, f"{shared}/fine_step", np.array(1.0 / (2 * a_max * a_max), np.float32))
        _const(graph, f"{shared}/fine", np.array(1.0 / (2 * a_max), np.float32))
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

    Why one GEMM: the parts read the same u8 activation, and on a 16-token query a narrow GEMM
    (EmbeddingGemma's k_proj has 256 columns) runs at ~0.8x the rate of a wide one, besides the
    dispatch; the output is multiplied by the row's m and split once.
    """
    nodes: list[onnx.NodeProto] = []
    g = _op_builder(nodes, prefix)
    w_int8 = np.concatenate([part.w_int8 for part in parts], axis=1)
    w_scale = np.concatenate([part.w_scale for part in parts])
    acc = g("MatMulIntegerToFloat", [x_u8, _const(graph, f"{prefix}/w_int8", w_int8), f"{shared}/one",
                                     _const(graph, f"{prefix}/w_scale", w_scale), f"{shared}/zp"], "acc",
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
        split = _const(graph, f"{prefix}/split", np.array(widths, np.int64))
        nodes.append(helper.make_node("Split", [acc, split], pieces, name=f"{prefix}/split", axis=-1))
    else:
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


def use_domain(model: onnx.ModelProto, domain: str) -> None:
    """Import opset 1 of ``domain`` (ONNX Runtime's contrib ops, our fused kernels) unless the model does."""
    if not any(entry.domain == domain for entry in model.opset_import):
        model.opset_import.append(helper.make_opsetid(domain, 1))


def _int8_token(model: onnx.ModelProto, opts: QuantizeOptions, weight_bits: int,
                activation_bits: int) -> tuple[onnx.ModelProto, dict[str, int]]:
    """The per-token-row recipes; also returns counts for the manifest (activations quantized / rotated)."""
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
        nodes = _quantize_embedding_tables(graph, nodes, opts.embedding_bits)
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


def quantize(fp32_path: Path, out_path: Path, opts: QuantizeOptions) -> dict[str, Any]:
    """Write the quantized model to ``out_path``; return the settings for the manifest."""
    if opts.recipe not in RECIPES:
        raise QuantizeError(f"unknown recipe {opts.recipe!r}; choose one of {', '.join(RECIPES)}")
    settings: dict[str, Any] = {"recipe": opts.recipe, "keep_fp32": opts.fp32_patterns(),
                                "build_cpu_vnni": cpu_has_vnni()}
    if opts.recipe in ("int8-attn", "int8-wide"):
        wide = ["*"] if opts.recipe == "int8-wide" else [*opts.wide_activations, *ATTENTION_INPUTS]
        opts = replace(opts, wide_activations=wide, wide_weights=[*opts.wide_weights, *VALUE_PROJECTIONS])
    if opts.recipe in ("int8-rot", "int8-fused"):
        opts = replace(opts, rotate_activations=["*"], wide_weights=[*opts.wide_weights, *VALUE_PROJECTIONS])
    if opts.recipe == "int8-fused" and opts.activation_bits not in (None, 8):
        raise QuantizeError("int8-fused takes 8-bit activations only (its kernels quantize with zero point 128)")
    if opts.recipe == "fp32":
        model = onnx.load(str(fp32_path))
    elif opts.recipe in DEFAULT_ACTIVATION_BITS:
        bits = opts.weight_bits
        if bits not in (7, 8):
            raise QuantizeError(f"weight_bits must be 7 or 8, not {bits!r}")
        a_bits = DEFAULT_ACTIVATION_BITS[opts.recipe] if opts.activation_bits is None else opts.activation_bits
        if a_bits not in (7, 8):
            raise QuantizeError(f"activation_bits must be 7 or 8, not {a_bits!r}")
        settings.update(weight_bits=bits, activation_bits=a_bits,
                        activations=f"{a_bits}-bit per token row (u8 with zero point)"
                        + (", plus a second pass on the rounding residual where wide" if opts.wide_activations else ""),
                        weights="int8 per output channel, symmetric",
                        embedding_table=_table_label(opts),
                        wide_activations=list(opts.wide_activations), wide_weights=list(opts.wide_weights),
                        batch_invariant=True)
        if opts.rotate_activations:
            settings.update(rotate_activations=list(opts.rotate_activations),
                            rotation=f"block Hadamard, block {opts.rotation_block} (smaller where a width needs it)")
        model, counts = _int8_token(onnx.load(str(fp32_path)), opts, int(bits), int(a_bits))
        settings.update(counts)
        if opts.recipe == "int8-fused":
            from deposium.convert.fuse import fuse_gemms
            from deposium.worker.kernels import DOMAIN, LIBRARY

            settings.update(fuse_gemms(model), kernel_library=LIBRARY,
                            kernels=f"{DOMAIN} ops: per-row quantization, int8 GEMM, scales, bias and GELU in one "
                                    "pass (AMX, AVX-512 VNNI or AVX2; the same bits on each)")
    elif opts.recipe == "int8-block":
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)
        quantizer = MatMulNBitsQuantizer(onnx.load(str(fp32_path)), bits=8, block_size=opts.block_size,
                                         is_symmetric=True, accuracy_level=4,
                                         nodes_to_exclude=_matching_nodes(fp32_path, opts.fp32_patterns()))
        quantizer.process()
        model = quantizer.model.model
        graph = model.graph
        if opts.quantize_embeddings:
            nodes = _quantize_embedding_tables(graph, list(graph.node), opts.embedding_bits)
            del graph.node[:]
            graph.node.extend(nodes)
            drop_unused_initializers(graph)
        settings.update(weights=f"MatMulNBits 8-bit block {opts.block_size}, accuracy_level 4",
                        embedding_table=_table_label(opts),
                        batch_invariant=True)
    else:  # int8-dynamic: onnxruntime's own recipe, kept as an explicit, reported option
        from onnxruntime.quantization import QuantType, quantize_dynamic

        logging.getLogger().setLevel(max(logging.getLogger().level, logging.WARNING))
        reduce_range = False  # 8-bit weights; saturating CPUs run u8 x u8 (deposium.worker.variant)
        op_types = ["MatMul", "Gather"] if opts.quantize_embeddings else ["MatMul"]
        quantize_dynamic(str(fp32_path), str(out_path), per_channel=True, reduce_range=reduce_range,
                         weight_type=QuantType.QInt8, op_types_to_quantize=op_types,
                         nodes_to_exclude=_matching_nodes(fp32_path, opts.fp32_patterns()))
        settings.update(per_channel=True, reduce_range=reduce_range, batch_invariant=False,
                        activations="one dynamic scale per tensor (per batch)")
        model = onnx.load(str(out_path))
    from deposium.convert.attention import fuse_attention  # imports this module

    settings.update(fuse_attention(model))
    onnx.checker.check_model(model)
    save_model(model, out_path)
    return settings


def save_model(model: onnx.ModelProto, path: Path) -> None:
    """Save with every weight in ``<name>.data`` beside it (the artifact layout; see deposium.worker.artifact)."""
    data = path.with_name(path.name + ".data")
    if data.exists():
        data.unlink()  # onnx appends to an existing external-data file
    onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=data.name,
              size_threshold=1024)
    if data.exists():  # absent when every tensor is under the threshold (tiny test graphs)
        data.chmod(0o644)  # onnx creates it 0600: a non-root worker (the Docker image's) must read it


def _matching_nodes(path: Path, patterns: list[str]) -> list[str]:
    if not patterns:
        return []
    graph = onnx.load(str(path), load_external_data=False).graph
    return [n.name for n in graph.node if any(fnmatch.fnmatch(n.name, p) for p in patterns)]
