"""Graph simplifications of the exported transformer that the runtime cannot do itself.

Why: on a short query every ONNX node costs its dispatch whatever it computes, and a large part of
the exported nodes only recompute shapes from the dynamic batch and sequence dims (Shape -> Gather ->
Unsqueeze -> Concat -> Reshape, per layer, for q/k/v and the grouped-query ``repeat_kv``), and ten
more per layer spell out the tanh GELU. ORT folds neither: the dims are symbolic, and its FastGelu
fusion does not match this export. Both rewrites here are exact: a Reshape or Expand whose
target can be written with ONNX's own placeholders (0 = keep this dim, -1 = infer it, 1 =
broadcast) gets that constant, and the GELU chain becomes one ``FastGelu`` node (the same
formula). With a single key/value head, grouped-query attention's copies of K and V per query
head are bypassed: MatMul broadcasts the one head itself (exact, see
:func:`share_single_kv_head`). Dead shape arithmetic is then dropped.

Input: a model with symbolic shapes on every tensor (``deposium.convert.api.with_named_shapes``).
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
from onnx import helper, numpy_helper

from deposium.convert.graph import MS_DOMAIN, Dim, GraphIndex, drop_dead_nodes, perm_of, use_domain, value_shapes

log = logging.getLogger(__name__)

#: Constants read here are shape indices and scalars; larger initializers (the weights) are
#: never decoded.
SMALL_CONSTANT = 64
#: tanh-GELU constants: 0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x^3))).
GELU_CUBIC, GELU_SQRT_2_OVER_PI = 0.044715, float(np.sqrt(2.0 / np.pi))


def reshape_target(source: list[Dim], target: list[Dim]) -> list[int] | None:
    """A constant Reshape shape giving ``target`` from ``source`` (0 keeps a dim, one -1 infers),
    or None when the symbolic shapes do not pin it down."""
    out: list[int] = []
    for i, dim in enumerate(target):
        if isinstance(dim, int) and dim > 0:
            out.append(dim)
        elif isinstance(dim, str) and i < len(source) and source[i] == dim:
            out.append(0)
        else:
            out.append(-1)
    if out.count(-1) > 1 or any(d == 0 for d in target):
        return None
    return out


def expand_target(source: list[Dim], target: list[Dim]) -> list[int] | None:
    """A constant Expand shape broadcasting ``source`` to ``target`` (1 where the dim is kept),
    or None when that is not exact."""
    if len(source) != len(target):
        return None
    out: list[int] = []
    for have, want in zip(source, target, strict=True):
        if have == want and have is not None:
            out.append(1)
        elif have == 1 and isinstance(want, int) and want > 0:
            out.append(want)
        else:
            return None
    return out


def _constant_inputs(graph: onnx.GraphProto) -> set[str]:
    names = {init.name for init in graph.initializer}
    names |= {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    return names


def fold_shape_computations(model: onnx.ModelProto) -> int:
    """Give computed Reshape/Expand shapes their constant form; return how many were folded."""
    graph = model.graph
    shapes, constants = value_shapes(graph), _constant_inputs(graph)
    folded = 0
    for node in graph.node:
        if node.op_type not in ("Reshape", "Expand") or len(node.input) < 2 or node.input[1] in constants:
            continue
        if any(a.name == "allowzero" and a.i for a in node.attribute):
            continue
        source, target = shapes.get(node.input[0]), shapes.get(node.output[0])
        if source is None or target is None:
            continue
        value = (reshape_target if node.op_type == "Reshape" else expand_target)(source, target)
        if value is None:
            continue
        name = f"{node.output[0]}/folded_shape"
        graph.initializer.append(numpy_helper.from_array(np.array(value, np.int64), name))
        node.input[1] = name
        folded += 1
    return folded


def fold_static_dims(model: onnx.ModelProto) -> int:
    """``Gather(Shape(x), i)`` where dim i of x is a fixed number becomes that constant (rotary
    embeddings split head_dim / 2 this way), and a Slice from 0 that leaves its input's shape as
    it was becomes Identity (the attention mask cut to the key length); return how many."""
    graph = model.graph
    shapes, consts = value_shapes(graph), _const_values(graph)
    producer = {o: n for n in graph.node for o in n.output}
    folded, kept = 0, []
    for node in graph.node:
        source = producer.get(node.input[0]) if node.op_type == "Gather" and node.input else None
        index = consts.get(node.input[1]) if source is not None and source.op_type == "Shape" else None
        dims = shapes.get(source.input[0]) if index is not None and not source.attribute else None
        if dims is not None and index.dtype.kind == "i":
            picked = [dims[int(i)] if -len(dims) <= int(i) < len(dims) else None for i in index.reshape(-1)]
            if all(isinstance(d, int) and d > 0 for d in picked):
                graph.initializer.append(numpy_helper.from_array(np.array(picked, np.int64).reshape(index.shape),
                                                                 node.output[0]))
                folded += 1
                continue
        if node.op_type == "Slice" and _is_identity_slice(node, shapes, consts):
            node.op_type = "Identity"
            del node.input[1:]
            folded += 1
        kept.append(node)
    del graph.node[:]
    graph.node.extend(kept)
    return folded


def _is_identity_slice(node: onnx.NodeProto, shapes: dict[str, list[Dim]], consts: dict[str, np.ndarray]) -> bool:
    source, target = shapes.get(node.input[0]), shapes.get(node.output[0])
    starts = consts.get(node.input[1]) if len(node.input) > 1 else None
    steps = consts.get(node.input[4]) if len(node.input) > 4 and node.input[4] else np.ones(1, np.int64)
    return (source is not None and source == target and all(d is not None for d in source)
            and starts is not None and not starts.any() and steps is not None and bool((steps == 1).all()))


def _const_values(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    values = {init.name: numpy_helper.to_array(init) for init in graph.initializer
              if int(np.prod(init.dims)) <= SMALL_CONSTANT}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            values[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return values


def fuse_tanh_gelu(model: onnx.ModelProto) -> int:
    """Replace 0.5*x*(1+tanh(c*(x+0.044715*x^3))) chains by ``FastGelu``; return how many."""
    graph = model.graph
    matcher = _GeluMatcher(graph)
    remove: set[int] = set()
    fused: dict[int, onnx.NodeProto] = {}  # the chain's last node -> its FastGelu (same place in the order)
    for tanh in [n for n in graph.node if n.op_type == "Tanh"]:
        chain = matcher.match(tanh)
        if chain is None:
            continue
        x, nodes, out = chain
        remove |= {id(n) for n in nodes[:-1]}
        fused[id(nodes[-1])] = helper.make_node("FastGelu", [x], [out], name=f"{tanh.name}/FastGelu",
                                                domain=MS_DOMAIN)
    if fused:
        kept = [fused.get(id(n), n) for n in graph.node if id(n) not in remove]
        del graph.node[:]
        graph.node.extend(kept)
        use_domain(model, MS_DOMAIN)
    return len(fused)


class _GeluMatcher:
    """Finds x*x -> *x -> *0.044715 -> +x -> *sqrt(2/pi) -> Tanh -> +1 -> *x -> *0.5 around a Tanh,
    with either operand order, and only where no intermediate is read outside the chain."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        self.consts = _const_values(graph)
        self.producer = {o: n for n in graph.node for o in n.output}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for n in graph.node:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)

    def _scalar_input(self, node: onnx.NodeProto, expected: float) -> str | None:
        for name in node.input:
            value = self.consts.get(name)
            if value is not None and value.size == 1 and abs(float(value.reshape(-1)[0]) - expected) <= 1e-4 * expected:
                return name
        return None

    def _other(self, node: onnx.NodeProto, name: str | None) -> str | None:
        rest = [i for i in node.input if i != name]
        return rest[0] if len(rest) == 1 else None

    def _made_by(self, name: str | None, op: str) -> onnx.NodeProto | None:
        node = self.producer.get(name or "")
        return node if node is not None and node.op_type == op else None

    def _only_user(self, name: str, op: str) -> onnx.NodeProto | None:
        users = self.consumers.get(name, [])
        return users[0] if len(users) == 1 and users[0].op_type == op else None

    def match(self, tanh: onnx.NodeProto) -> tuple[str, list[onnx.NodeProto], str] | None:
        inner = self._made_by(tanh.input[0], "Mul")  # sqrt(2/pi) * (x + 0.044715 x^3)
        add = inner and self._made_by(self._other(inner, self._scalar_input(inner, GELU_SQRT_2_OVER_PI)), "Add")
        if not add:
            return None
        for x in add.input:
            cubic = self._made_by(self._other(add, x), "Mul")  # 0.044715 * x^3
            cube = cubic and self._made_by(self._other(cubic, self._scalar_input(cubic, GELU_CUBIC)), "Mul")
            square = cube and x in cube.input and self._made_by(self._other(cube, x), "Mul")
            if not square or list(square.input) != [x, x]:
                continue
            one_plus = self._only_user(tanh.output[0], "Add")
            times_x = one_plus and self._scalar_input(one_plus, 1.0) and self._only_user(one_plus.output[0], "Mul")
            if not times_x or self._other(times_x, one_plus.output[0]) != x:
                continue
            half = self._only_user(times_x.output[0], "Mul")
            if not half or not self._scalar_input(half, 0.5):
                continue
            chain = [square, cube, cubic, add, inner, tanh, one_plus, times_x, half]
            private = all(len(self.consumers.get(n.output[0], [])) == 1 for n in chain[:-1])
            return (x, chain, half.output[0]) if private else None
        return None


def share_single_kv_head(model: onnx.ModelProto) -> int:
    """Let attention MatMuls broadcast a single key/value head instead of copying it per query head.

    Why: grouped-query attention exports ``repeat_kv`` as Unsqueeze -> Expand -> Reshape, turning
    K and V of shape [b, 1, t, d] into [b, h, t, d] copies, three nodes and a copy per layer for
    each. When there is one kv head (EmbeddingGemma-300m), MatMul's own batch broadcasting gives
    the same product from [b, 1, t, d] directly, so the readers of the copy read the source
    instead (exact). Only MatMuls (directly, or through a Transpose that keeps the head axis) may
    read the copy, and their other operand must have the h heads, so every result keeps its
    shape. Returns how many copies were bypassed; the dead chain is dropped afterwards."""
    graph = model.graph
    index = GraphIndex.of(graph)
    shapes, producer, consumers = index.shapes, index.producer, index.consumers
    shared = 0
    for reshape in [n for n in graph.node if n.op_type == "Reshape"]:
        expand = producer.get(reshape.input[0])
        unsqueeze = producer.get(expand.input[0]) if expand is not None and expand.op_type == "Expand" else None
        if unsqueeze is None or unsqueeze.op_type != "Unsqueeze":
            continue
        source, copy = shapes.get(unsqueeze.input[0]), shapes.get(reshape.output[0])
        if source is None or copy is None or len(source) != 4 or len(copy) != 4 or source[1] != 1:
            continue
        if [source[0], source[2], source[3]] != [copy[0], copy[2], copy[3]] or not isinstance(copy[1], int):
            continue
        if not _broadcasts_heads(reshape.output[0], copy[1], shapes, consumers):
            continue
        for reader in consumers.get(reshape.output[0], []):
            for i, name in enumerate(reader.input):
                if name == reshape.output[0]:
                    reader.input[i] = unsqueeze.input[0]
            if reader.op_type == "Transpose":
                _set_head_axis_to_one(graph, reader.output[0])
        shared += 1
    return shared


def _set_head_axis_to_one(graph: onnx.GraphProto, name: str) -> None:
    for vi in graph.value_info:
        if vi.name == name and vi.type.tensor_type.HasField("shape"):
            dim = vi.type.tensor_type.shape.dim[1]
            dim.Clear()
            dim.dim_value = 1


def _broadcasts_heads(name: str, heads: int, shapes: dict[str, list[Dim]],
                      consumers: dict[str, list[onnx.NodeProto]]) -> bool:
    """Every reader of ``name`` is a MatMul whose other operand has ``heads`` on axis 1, or a
    Transpose keeping axes 0 and 1 whose readers are such MatMuls (then the Transpose's output
    shape is rewritten with a head axis of 1)."""
    readers = consumers.get(name, [])
    if not readers:
        return False
    for node in readers:
        if node.op_type == "Transpose":
            perm = perm_of(node)
            if perm is None or perm[:2] != [0, 1] or not _broadcasts_heads(node.output[0], heads, shapes, consumers):
                return False
        elif node.op_type == "MatMul":
            other = shapes.get(node.input[1] if node.input[0] == name else node.input[0])
            if other is None or len(other) != 4 or other[1] != heads or node.input[0] == node.input[1]:
                return False
        else:
            return False
    return True


def simplify(model: onnx.ModelProto) -> onnx.ModelProto:
    """Fold shape arithmetic, fuse tanh GELU, let attention broadcast a single kv head, drop what
    became dead. An optimization only: on any failure the export is returned unchanged (the gate
    still checks the result against torch)."""
    work = onnx.ModelProto()
    work.CopyFrom(model)
    try:
        folded = fold_shape_computations(work) + fold_static_dims(work)
        fused = fuse_tanh_gelu(work)
        dropped = drop_dead_nodes(work.graph)  # first: dead shape reads would pin the kv copies
        shared = share_single_kv_head(work)
        dropped += drop_dead_nodes(work.graph)
    except Exception as exc:  # noqa: BLE001 - never fail a conversion on an optimization
        log.warning("graph simplification failed (%s); keeping the export as it was", exc)
        return model
    log.info("simplified the export: %d shapes folded, %d GELU chains fused, %d kv-head copies bypassed, %d nodes "
             "dropped", folded, fused, shared, dropped)
    return work

