"""Where ``int8-rot`` can skip its in-graph rotation: read off the fp32 graph before quantizing.

Why: the rotation of the attention output before ``o_proj`` is redundant. That activation is
softmax(..) @ V, linear in V along the head's channels, so (P V) H = P (V H): rotating the value
projection's weight columns by H at conversion time hands ``o_proj`` an activation that is
already rotated (block 32 inside a head of 256 or 64 channels keeps every block in one head).
Three nodes and a small GEMM fewer per layer, on EmbeddingGemma and MiniLM alike.

The rotation is found by walking the graph through operations proven to commute with it, never
by node names, so a graph without the pattern simply keeps its rotation nodes. Only exact identities
are used: an RMS norm absorbing the row scale of the GEMM before it is not one (its epsilon breaks
scale invariance for rows near zero), see docs/design.md, Recipes.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx

from deposium.convert.graph import Dim, GraphIndex, perm_of


def _splits_last_axis(source: list[Dim] | None, target: list[Dim] | None, block: int = 1) -> bool:
    """``target`` is ``source`` with its last axis split in two (the new last axis a multiple of
    ``block``), so each row of the target's last axis lies inside one row of the source's."""
    return (source is not None and target is not None and len(target) == len(source) + 1
            and target[:-2] == source[:-1] and isinstance(target[-1], int) and target[-1] % block == 0)


@dataclass
class RotationDonor:
    """The GEMM whose weight columns can carry another activation's rotation, and the constant
    bias vectors added on the way that must be rotated with them."""

    matmul: onnx.NodeProto
    biases: list[str]


def _one_reader_node(index: GraphIndex, name: str) -> bool:
    """One node reads ``name`` (a Concat of several copies of it counts once)."""
    return len({id(r) for r in index.consumers.get(name, [])}) == 1


def rotation_donor(index: GraphIndex, x: str, block: int, donors: set[str]) -> RotationDonor | None:
    """The MatMul among ``donors`` (output names) that ``x`` is a block-rotatable linear image of:
    x H equals the graph with that MatMul's weights W replaced by W H, through Add of a constant
    bias (rotated too), Reshape splitting or merging the last axis in multiples of ``block``,
    Transpose keeping the last axis, Cast, MatMul where the path is the right operand, Concat of
    copies of the path, and MultiHeadAttention through its value input (deposium.convert.attention). Every
    tensor on the way must have that single reader, so nothing else sees the rotation."""
    biases: list[str] = []
    name = x
    while True:
        node = index.producer.get(name)
        if node is None:
            return None
        if node.output[0] in donors and node.op_type == "MatMul":
            return RotationDonor(node, biases) if _one_reader_node(index, name) else None
        if name != x and not _one_reader_node(index, name):
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
        perm = perm_of(node)
        return node.input[0] if perm is not None and perm[-1] == len(perm) - 1 else None
    if node.op_type == "Reshape":
        ok = _splits_last_axis(shape_in, shape_out, block) or _splits_last_axis(shape_out, shape_in, block)
        return node.input[0] if ok else None
    if node.op_type == "MatMul":
        left, right = node.input
        return right if right not in index.constants and left != right else None
    if node.op_type == "Concat":  # copies of one tensor side by side (one kv head handed to every query head)
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        rank = len(shape_out) if shape_out else 0
        width = shape_in[-1] if shape_in else None
        same = len(set(node.input)) == 1 and axis in (-1, rank - 1)
        return node.input[0] if same and isinstance(width, int) and width % block == 0 else None
    if node.op_type == "MultiHeadAttention" and node.domain == "com.microsoft":
        # softmax(..) V per head is linear in V along each head's channels: through the value input, when
        # every block lies inside one head and nothing else (a packed bias) is added to V
        heads = next((a.i for a in node.attribute if a.name == "num_heads"), 0)
        width = shape_out[-1] if shape_out else None
        plain = len(node.input) < 4 or not node.input[3]
        ok = plain and heads > 0 and isinstance(width, int) and width % heads == 0 and (width // heads) % block == 0
        return node.input[2] if ok and node.input[2] not in node.input[:2] else None
    if node.op_type == "Add":
        for i, other in enumerate(node.input):
            bias = index.constants.get(other)
            if bias is not None and len(bias.dims) == 1 and shape_out and bias.dims[0] == shape_out[-1] \
                    and bias.dims[0] % block == 0 and len(index.consumers.get(other, [])) == 1:
                biases.append(other)
                return node.input[1 - i]
        return None
    return None
