"""Each self-attention of a Gemma3 export becomes ONE ``MultiHeadAttention`` node.

Why: on a short query each ONNX Runtime node costs its dispatch whatever it computes, and about 30
nodes per layer are attention: the q/k RMS norms, the rotary embedding spelled out as Slice / Neg /
Concat / Mul / Add for q and for k, the head Reshape / Transpose pairs, the scores MatMul, scale, mask
Add, Softmax, the value MatMul and the Transpose / Reshape back. Here the same arithmetic is written
with ONNX Runtime's own kernels: per layer the norms (the form the runtime fuses into
``SimplifiedLayerNormalization``), ``com.microsoft.RotaryEmbedding`` for q and k, and
``com.microsoft.MultiHeadAttention`` for scores, scale, additive mask, softmax and the value
product; about ten nodes instead of ~30 (speed: docs/benchmarks.md).

The rewrite keeps the graph's own inputs to the attention: the q/k/v projections, the additive mask
the export builds once per graph (it carries the padding and the sliding window), and the cos / sin
tables it computes per call (their first half is the rotary cache; positions are 0..S-1 for every
row, as Gemma3 exports them: right padding). One key/value head is handed to every query head by a
Concat (grouped-query attention with a single kv head); other head layouts keep their attention.

It is matched structurally, anchored on each ``Softmax``; a layer whose attention differs in any
step keeps its nodes (counted as not fused). Exactness on the fp32 graph, beyond the sliding window
too, is a test (tests/test_convert.py, tiny Gemma3); the conversion gate measures the artifact against torch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from deposium.convert.graph import MS_DOMAIN, GraphIndex, drop_dead_nodes, perm_of, use_domain


@dataclass
class _Branch:
    """One of q / k: the projection output [B, S, heads * head_dim], its heads, and what the export
    did to it before the scores: an RMS norm over each head (weight, epsilon) and a rotary
    embedding (cos, sin [B, S, head_dim])."""

    x: str
    heads: int
    head_dim: int
    norm: tuple[str, float] | None
    rotary: tuple[str, str] | None


@dataclass
class _Attention:
    q: _Branch
    k: _Branch
    v: str
    mask: str
    scale: float
    anchor: onnx.NodeProto  # the Reshape that ends the attention ([B, S, heads * head_dim]): the new nodes
    # take its place and write its output


def _scalar(name: str, index: GraphIndex) -> float | None:
    value = index.value(name)
    return float(value.reshape(-1)[0]) if value is not None and value.size == 1 else None


def _made(name: str, index: GraphIndex, op_type: str) -> onnx.NodeProto | None:
    node = index.producer.get(name)
    return node if node is not None and node.op_type == op_type else None


def _through_casts(name: str, index: GraphIndex) -> str:
    """Skip float -> float Casts (the export writes several around norms and softmax)."""
    while (node := _made(name, index, "Cast")) is not None:
        name = node.input[0]
    return name


def _operands(node: onnx.NodeProto, index: GraphIndex, op_type: str) -> tuple[onnx.NodeProto, str] | None:
    """For a binary node: (the input made by ``op_type``, the other input)."""
    for i in (0, 1):
        made = _made(node.input[i], index, op_type)
        if made is not None:
            return made, node.input[1 - i]
    return None


def _rms_norm(name: str, index: GraphIndex) -> tuple[str, str, float] | None:
    """``name`` = x * (1 / sqrt(mean(x^2, -1) + eps)) * w as the export writes it: (x, w, eps)."""
    outer = _made(name, index, "Mul")
    found = outer and _operands(outer, index, "Mul")
    if found is None:
        return None
    inner, weight = found
    while (alias := _made(weight, index, "Identity")) is not None:  # the export's shared copies of equal weights
        weight = alias.input[0]
    if weight not in index.constants and _made(weight, index, "Constant") is None:
        return None
    divided = _operands(inner, index, "Div")
    if divided is None:
        return None
    div, x = divided
    sqrt = _made(div.input[1], index, "Sqrt")
    add = sqrt and _made(sqrt.input[0], index, "Add")
    found_mean = add and _operands(add, index, "ReduceMean")
    if _scalar(div.input[0], index) != 1.0 or found_mean is None:
        return None
    mean, eps_name = found_mean
    pow_ = _made(mean.input[0], index, "Pow")
    axes = index.value(mean.input[1]) if len(mean.input) > 1 else None
    eps = _scalar(eps_name, index)
    if pow_ is None or pow_.input[0] != x or _scalar(pow_.input[1], index) != 2.0 or eps is None:
        return None
    if axes is None or axes.reshape(-1).tolist() != [-1]:
        return None
    return _through_casts(x, index), weight, eps


def _rotate_half_of(name: str, index: GraphIndex) -> str | None:
    """``name`` = Concat(-x[..., half:], x[..., :half]) along the last axis: x."""
    concat = _made(name, index, "Concat")
    if concat is None or len(concat.input) != 2 or next((a.i for a in concat.attribute if a.name == "axis"), 0) != -1:
        return None
    neg = _made(concat.input[0], index, "Neg")
    upper = neg and _made(neg.input[0], index, "Slice")
    lower = _made(concat.input[1], index, "Slice")
    if upper is None or lower is None or upper.input[0] != lower.input[0]:
        return None
    return lower.input[0]


def _table(name: str, index: GraphIndex) -> str | None:
    """The [B, S, D] cos or sin table behind ``Unsqueeze(table, 1)``, when its two halves are the same
    (cos(Concat(f, f)) as Gemma3's rotary embedding builds it), so its first half is the cache."""
    unsqueeze = _made(name, index, "Unsqueeze")
    axes = unsqueeze and index.value(unsqueeze.input[1])
    if axes is None or axes.reshape(-1).tolist() != [1]:
        return None
    table = unsqueeze.input[0]
    node = index.producer.get(_through_casts(table, index))
    if node is not None and node.op_type == "Mul":  # the attention scaling, a scalar
        found = _operands(node, index, "Cos") or _operands(node, index, "Sin")
        node = found[0] if found and _scalar(found[1], index) is not None else None
    if node is None or node.op_type not in ("Cos", "Sin"):
        return None
    concat = _made(node.input[0], index, "Concat")
    if concat is None or len(concat.input) != 2 or concat.input[0] != concat.input[1]:
        return None
    return table


def _rotary(name: str, index: GraphIndex) -> tuple[str, tuple[str, str]] | None:
    """``name`` = x * cos + rotate_half(x) * sin: (x, (cos table, sin table))."""
    add = _made(name, index, "Add")
    if add is None:
        return None
    muls = [_made(i, index, "Mul") for i in add.input]
    if any(m is None for m in muls):
        return None
    for plain, turned in (muls, muls[::-1]):
        for xi in (0, 1):
            x, cos = plain.input[xi], plain.input[1 - xi]
            for ri in (0, 1):
                if _rotate_half_of(turned.input[ri], index) == x:
                    cos_table, sin_table = _table(cos, index), _table(turned.input[1 - ri], index)
                    if cos_table and sin_table:
                        return x, (cos_table, sin_table)
    return None


def _heads_of(name: str, index: GraphIndex) -> tuple[str, int, int] | None:
    """``name`` = Transpose(Reshape(x, [B, S, heads, head_dim]), [0, 2, 1, 3]): (x, heads, head_dim)."""
    transpose = _made(name, index, "Transpose")
    reshape = transpose and _made(transpose.input[0], index, "Reshape")
    if reshape is None or perm_of(transpose) != [0, 2, 1, 3]:
        return None
    shape = index.shapes.get(reshape.output[0])
    source = index.shapes.get(reshape.input[0])
    if not shape or not source or len(shape) != 4 or len(source) != 3:
        return None
    heads, head_dim = shape[2], shape[3]
    if not isinstance(heads, int) or not isinstance(head_dim, int) or source[2] != heads * head_dim:
        return None
    return reshape.input[0], heads, head_dim


def _branch(name: str, index: GraphIndex) -> _Branch | None:
    rotary = _rotary(name, index)
    if rotary is not None:
        name = rotary[0]
    norm = _rms_norm(name, index)
    if norm is not None:
        name = norm[0]
    heads = _heads_of(_through_casts(name, index), index)
    if heads is None:
        return None
    return _Branch(heads[0], heads[1], heads[2], norm and (norm[1], norm[2]), rotary and rotary[1])


def _match(softmax: onnx.NodeProto, index: GraphIndex) -> _Attention | None:
    """softmax(q k^T * scale + mask) v, heads merged back, as the export writes it."""
    if next((a.i for a in softmax.attribute if a.name == "axis"), -1) != -1:
        return None
    add = _made(softmax.input[0], index, "Add")
    found = add and _operands(add, index, "Mul")
    if found is None:
        return None
    scaled, mask = found
    found_scale = _operands(scaled, index, "MatMul")
    if found_scale is None or (scale := _scalar(found_scale[1], index)) is None:
        return None
    scores = found_scale[0]
    k_t = _made(scores.input[1], index, "Transpose")
    if k_t is None or perm_of(k_t) != [0, 1, 3, 2]:
        return None
    q, k = _branch(scores.input[0], index), _branch(k_t.input[0], index)
    probs = softmax.output[0]
    readers = index.consumers.get(probs, [])
    while len(readers) == 1 and readers[0].op_type == "Cast":
        probs, readers = readers[0].output[0], index.consumers.get(readers[0].output[0], [])
    value_mm = readers[0] if len(readers) == 1 and readers[0].op_type == "MatMul" else None
    v = value_mm and value_mm.input[0] == probs and _heads_of(value_mm.input[1], index)
    back = v and index.only_reader(value_mm.output[0])
    merged = back and back.op_type == "Transpose" and perm_of(back) == [0, 2, 1, 3] and index.only_reader(
        back.output[0])
    if not (q and k and v and merged) or merged.op_type != "Reshape":
        return None
    out_shape, mask_shape = index.shapes.get(merged.output[0]), index.shapes.get(mask)
    if q.head_dim != k.head_dim or v[2] != k.head_dim or v[1] != k.heads or not out_shape or len(out_shape) != 3:
        return None
    if k.heads not in (1, q.heads) or (k.rotary is None) != (q.rotary is None):
        return None
    if mask_shape is None or len(mask_shape) != 4 or mask_shape[1] not in (1, q.heads):
        return None
    return _Attention(q, k, v[0], mask, scale, merged)


class _Builder:
    """New nodes and initializers, named under one prefix."""

    def __init__(self, graph: onnx.GraphProto, prefix: str) -> None:
        self.graph, self.prefix, self.nodes = graph, prefix, []

    def const(self, suffix: str, value: np.ndarray) -> str:
        name = f"{self.prefix}/{suffix}"
        self.graph.initializer.append(numpy_helper.from_array(value, name))
        return name

    def op(self, op_type: str, inputs: list[str], suffix: str, domain: str = "", **attrs: object) -> str:
        out = f"{self.prefix}/{suffix}"
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=out, domain=domain, **attrs))
        return out


def _norm(b: _Builder, x: str, weight: str, eps: float, tag: str) -> str:
    """The RMS norm in the form ONNX Runtime fuses into one SimplifiedLayerNormalization node."""
    squared = b.op("Pow", [x, b.const(f"{tag}/two", np.array(2.0, np.float32))], f"{tag}/pow")
    mean = b.op("ReduceMean", [squared, b.const(f"{tag}/axes", np.array([-1], np.int64))], f"{tag}/mean", keepdims=1)
    shifted = b.op("Add", [mean, b.const(f"{tag}/eps", np.array(eps, np.float32))], f"{tag}/add")
    root = b.op("Sqrt", [shifted], f"{tag}/sqrt")
    inverse = b.op("Div", [b.const(f"{tag}/one", np.array(1.0, np.float32)), root], f"{tag}/inv")
    return b.op("Mul", [b.op("Mul", [x, inverse], f"{tag}/scaled"), weight], f"{tag}/normed")


def _cache(b: _Builder, table: str, head_dim: int, tag: str) -> str:
    """[B, S, D] cos or sin -> [S, D / 2]: row 0, first half (every row has the same positions)."""
    row = b.op("Gather", [table, b.const(f"{tag}/row0", np.array(0, np.int64))], f"{tag}/row", axis=0)
    return b.op("Slice", [row, b.const(f"{tag}/start", np.array([0], np.int64)),
                          b.const(f"{tag}/end", np.array([head_dim // 2], np.int64)),
                          b.const(f"{tag}/axis", np.array([-1], np.int64))], f"{tag}/half")


def _prepared(b: _Builder, branch: _Branch, caches: dict[str, str], tag: str) -> str:
    """Norm and rotary embedding of q or k, in [B, S, heads * head_dim]."""
    x = branch.x
    if branch.norm is not None:
        split = branch.heads > 1
        if split:  # the norm is per head: [B, S, heads, head_dim] while it runs
            per_head = b.const(f"{tag}/heads", np.array([0, 0, branch.heads, branch.head_dim], np.int64))
            x = b.op("Reshape", [x, per_head], f"{tag}/split")
        x = _norm(b, x, branch.norm[0], branch.norm[1], f"{tag}/norm")
        if split:
            merged = b.const(f"{tag}/merged", np.array([0, 0, branch.heads * branch.head_dim], np.int64))
            x = b.op("Reshape", [x, merged], f"{tag}/merge")
    if branch.rotary is not None:
        cos, sin = (caches[t] for t in branch.rotary)
        position = b.const(f"{tag}/position", np.array([0], np.int64))
        x = b.op("RotaryEmbedding", [x, position, cos, sin], f"{tag}/rotary", domain=MS_DOMAIN,
                 num_heads=branch.heads, interleaved=0)
    return x


def fuse_attention(model: onnx.ModelProto) -> dict[str, int]:
    """Rewrite ``model`` in place; returns counts for the manifest (fused / left as exported)."""
    graph = model.graph
    index = GraphIndex.of(graph)
    softmaxes = [n for n in graph.node if n.op_type == "Softmax"]
    matched = [a for a in (_match(s, index) for s in softmaxes) if a is not None]
    caches: dict[str, str] = {}
    replaced: dict[int, list[onnx.NodeProto]] = {}
    for attention in matched:
        b = _Builder(graph, f"{attention.anchor.name}/mha")
        for table in (t for branch in (attention.q, attention.k) if branch.rotary for t in branch.rotary):
            if table not in caches:
                caches[table] = _cache(b, table, attention.q.head_dim, f"cache{len(caches)}")
        q = _prepared(b, attention.q, caches, "q")
        k = _prepared(b, attention.k, caches, "k")
        v = attention.v
        if attention.k.heads != attention.q.heads:  # one kv head: every query head reads it
            k = b.op("Concat", [k] * attention.q.heads, "k_heads", axis=-1)
            v = b.op("Concat", [v] * attention.q.heads, "v_heads", axis=-1)
        b.nodes.append(helper.make_node("MultiHeadAttention", [q, k, v, "", "", attention.mask],
                                        [attention.anchor.output[0]],
                                        name=f"{b.prefix}/attention", domain=MS_DOMAIN,
                                        num_heads=attention.q.heads, scale=attention.scale))
        replaced[id(attention.anchor)] = b.nodes
    nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        nodes.extend(replaced.get(id(node), [node]))
    del graph.node[:]
    graph.node.extend(nodes)
    if replaced:
        drop_dead_nodes(graph)
        use_domain(model, MS_DOMAIN)
    return {"fused_attention": len(replaced), "unfused_attention": len(softmaxes) - len(replaced)}
