"""Where the per-token int8 recipes can skip work, read off the fp32 graph before quantizing.

Why: a 16-token query on EmbeddingGemma is as much node dispatch as arithmetic (BENCHMARKS.md),
and two of the nodes ``int8-rot`` adds per GEMM are often redundant:

- The row-scale ``Mul`` after a GEMM whose output only feeds an RMS normalization. The row step
  is one positive number per token; RMSNorm(x / s) = RMSNorm(x) up to its epsilon, so the
  normalization absorbs it. Gemma3 normalizes the q and k heads (``q_norm`` / ``k_norm``) and the
  attention and MLP outputs (``post_attention_layernorm`` / ``post_feedforward_layernorm``): 4 of
  its 7 GEMMs per layer. BERT-style LayerNorms read ``residual + x``, which is not scale-free.
- The in-graph rotation of the attention output before ``o_proj``. That activation is
  softmax(..) @ V, linear in V along the head's channels, so (P V) H = P (V H): rotating the
  value projection's weight columns by H at conversion time hands ``o_proj`` an activation that
  is already rotated (block 32 inside a head of 256 or 64 channels keeps every block in one head).

Both are found by walking the graph through operations proven to commute with them, never by
node names, so a graph that does not have the pattern simply keeps the nodes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

Dim = int | str | None


@dataclass
class GraphIndex:
    producer: dict[str, onnx.NodeProto]
    consumers: dict[str, list[onnx.NodeProto]]
    shapes: dict[str, list[Dim]]
    constants: dict[str, onnx.TensorProto]

    @classmethod
    def of(cls, graph: onnx.GraphProto) -> GraphIndex:
        consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in graph.node:
            for name in node.input:
                consumers.setdefault(name, []).append(node)
        shapes: dict[str, list[Dim]] = {}
        for vi in [*graph.value_info, *graph.input, *graph.output]:
            if vi.type.HasField("tensor_type") and vi.type.tensor_type.HasField("shape"):
                shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                                   for d in vi.type.tensor_type.shape.dim]
        return cls({o: n for n in graph.node for o in n.output}, consumers, shapes,
                   {init.name: init for init in graph.initializer})

    def only_reader(self, name: str) -> onnx.NodeProto | None:
        readers = self.consumers.get(name, [])
        return readers[0] if len(readers) == 1 else None

    def scalar(self, name: str) -> float | None:
        init = self.constants.get(name)
        if init is not None and int(np.prod(init.dims)) == 1:
            return float(numpy_helper.to_array(init).reshape(-1)[0])
        node = self.producer.get(name)
        if node is not None and node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            value = numpy_helper.to_array(node.attribute[0].t)
            return float(value.reshape(-1)[0]) if value.size == 1 else None
        return None

    def ints(self, name: str) -> list[int] | None:
        init = self.constants.get(name)
        if init is not None:
            return [int(v) for v in numpy_helper.to_array(init).reshape(-1)]
        node = self.producer.get(name)
        if node is not None and node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            return [int(v) for v in numpy_helper.to_array(node.attribute[0].t).reshape(-1)]
        return None


def _perm(node: onnx.NodeProto) -> list[int] | None:
    return next((list(a.ints) for a in node.attribute if a.name == "perm"), None)


def _splits_last_axis(source: list[Dim] | None, target: list[Dim] | None, block: int = 1) -> bool:
    """``target`` is ``source`` with its last axis split in two (the new last axis a multiple of
    ``block``), so each row of the target's last axis lies inside one row of the source's."""
    return (source is not None and target is not None and len(target) == len(source) + 1
            and target[:-2] == source[:-1] and isinstance(target[-1], int) and target[-1] % block == 0)


def rms_normalized_outputs(graph: onnx.GraphProto, matmuls: list[onnx.NodeProto]) -> set[str]:
    """Outputs of ``matmuls`` read only by an RMS normalization over (a split of) their last axis,
    possibly through Reshape (splitting the last axis), Transpose (keeping it last) and Cast."""
    index = GraphIndex.of(graph)
    return {m.output[0] for m in matmuls if _reaches_rms_norm(index, m.output[0])}


def _reaches_rms_norm(index: GraphIndex, name: str) -> bool:
    while True:
        readers = index.consumers.get(name, [])
        if len(readers) == 2:
            return _is_rms_norm_of(index, name, readers)
        node = readers[0] if len(readers) == 1 else None
        if node is None:
            return False
        if node.op_type == "Reshape" and _splits_last_axis(index.shapes.get(name), index.shapes.get(node.output[0])):
            pass
        elif node.op_type == "Transpose" and (perm := _perm(node)) is not None and perm[-1] == len(perm) - 1:
            pass
        elif not (node.op_type == "Cast" and any(a.name == "to" and a.i == onnx.TensorProto.FLOAT
                                                  for a in node.attribute)):
            return False
        name = node.output[0]


def _is_rms_norm_of(index: GraphIndex, x: str, readers: list[onnx.NodeProto]) -> bool:
    """x * 1/sqrt(mean(x^2, last axis) + eps), as exports spell it (Pow or x*x; Div(1, .) or
    Reciprocal): the only two readers of x are the square and the final Mul."""
    square = next((n for n in readers if (n.op_type == "Pow" and index.scalar(n.input[1]) == 2.0)
                   or (n.op_type == "Mul" and list(n.input) == [x, x])), None)
    scale = next((n for n in readers if n is not square and n.op_type == "Mul"), None)
    if square is None or scale is None:
        return False
    mean = index.only_reader(square.output[0])
    rank = len(index.shapes.get(x) or [])
    axes = None
    if mean is not None and mean.op_type == "ReduceMean":
        axes = next((list(a.ints) for a in mean.attribute if a.name == "axes"), None)
        if axes is None and len(mean.input) > 1:
            axes = index.ints(mean.input[1])
    if axes is None or len(axes) != 1 or axes[0] not in (-1, rank - 1):
        return False
    other = next((i for i in scale.input if i != x), None)
    node = index.producer.get(other or "")
    for _ in range(4):  # Div(1, s) | Reciprocal  <-  Sqrt  <-  Add(eps)  <-  the ReduceMean
        if node is None or node.op_type not in ("Div", "Reciprocal", "Sqrt", "Add"):
            return False
        if node.op_type == "Div" and index.scalar(node.input[0]) != 1.0:
            return False
        source = node.input[1] if node.op_type == "Div" else node.input[0]
        if node.op_type == "Add" and index.scalar(node.input[1]) is None:
            return False
        if source == mean.output[0]:
            return True
        node = index.producer.get(source)
    return False


@dataclass
class RotationDonor:
    """The GEMM whose weight columns can carry another activation's rotation, and the constant
    bias vectors added on the way that must be rotated with them."""

    matmul: onnx.NodeProto
    biases: list[str]


def rotation_donor(graph: onnx.GraphProto, x: str, block: int, donors: set[str]) -> RotationDonor | None:
    """The MatMul among ``donors`` (output names) that ``x`` is a block-rotatable linear image of:
    x H equals the graph with that MatMul's weights W replaced by W H, through Add of a constant
    bias (rotated too), Reshape splitting or merging the last axis in multiples of ``block``,
    Transpose keeping the last axis, Cast, and MatMul where the path is the right operand. Every
    tensor on the way must have that single reader, so nothing else sees the rotation."""
    index = GraphIndex.of(graph)
    biases: list[str] = []
    name = x
    while True:
        node = index.producer.get(name)
        if node is None:
            return None
        if node.output[0] in donors and node.op_type == "MatMul":
            return RotationDonor(node, biases) if index.only_reader(name) is not None else None
        if name != x and index.only_reader(name) is None:
            return None
        source = _rotatable_input(index, node, name, block, biases)
        if source is None:
            return None
        name = source


def _rotatable_input(index: GraphIndex, node: onnx.NodeProto, out: str, block: int,
                     biases: list[str]) -> str | None:
    """The input of ``node`` through which a right rotation of ``out`` passes, or None."""
    shape_in = index.shapes.get(node.input[0]) if node.input else None
    shape_out = index.shapes.get(out)
    if node.op_type == "Cast":
        return node.input[0]
    if node.op_type == "Transpose":
        perm = _perm(node)
        return node.input[0] if perm is not None and perm[-1] == len(perm) - 1 else None
    if node.op_type == "Reshape":
        ok = _splits_last_axis(shape_in, shape_out, block) or _splits_last_axis(shape_out, shape_in, block)
        return node.input[0] if ok else None
    if node.op_type == "MatMul":
        left, right = node.input
        return right if right not in index.constants and left != right else None
    if node.op_type == "Add":
        for i, other in enumerate(node.input):
            bias = index.constants.get(other)
            if bias is not None and len(bias.dims) == 1 and shape_out and bias.dims[0] == shape_out[-1] \
                    and bias.dims[0] % block == 0 and len(index.consumers.get(other, [])) == 1:
                biases.append(other)
                return node.input[1 - i]
        return None
    return None
