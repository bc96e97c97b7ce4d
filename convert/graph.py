"""Reading and editing an ONNX graph: the helpers every rewrite of the converter shares.

Why a module of its own: the rewrites (simplify, attention, fold, the recipes, fuse) each read the
graph the same way (who produces a tensor, who reads it, its symbolic shape, its constant value) and
leave it the same way (new constants and nodes under one name prefix, dead nodes and unused weights
dropped, contrib domains imported). Kept here, below all of them, no rewrite has to import another
to borrow a helper.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

#: ONNX Runtime's contrib domain: ``MatMulIntegerToFloat``, ``FastGelu``, ``RotaryEmbedding``,
#: ``MultiHeadAttention``.
MS_DOMAIN = "com.microsoft"

#: A tensor dimension as the graph records it: a number, a symbolic name, or unknown.
Dim = int | str | None


def value_shapes(graph: onnx.GraphProto) -> dict[str, list[Dim]]:
    """Every tensor's shape the graph records (value_info, inputs, outputs): ints for fixed dims,
    names for symbolic ones, None for unknown ones."""
    found = {}
    for vi in [*graph.value_info, *graph.input, *graph.output]:
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.HasField("shape"):
            found[vi.name] = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                              for d in vi.type.tensor_type.shape.dim]
    return found


def perm_of(transpose: onnx.NodeProto) -> list[int] | None:
    return next((list(a.ints) for a in transpose.attribute if a.name == "perm"), None)


def initializers(graph: onnx.GraphProto) -> dict[str, onnx.TensorProto]:
    return {init.name: init for init in graph.initializer}


@dataclass
class GraphIndex:
    """Producer, readers, symbolic shape and constant of every tensor: what a pattern match or a walk
    needs to prove a rewrite exact. Built once per pass; the passes only read the graph while matching."""

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
        return cls({o: n for n in graph.node for o in n.output}, consumers, value_shapes(graph),
                   initializers(graph))

    def value(self, name: str) -> np.ndarray | None:
        """An initializer's or a ``Constant`` node's value; None for computed tensors (and for weights
        left in an external file by a model loaded without them)."""
        tensor = self.constants.get(name)
        node = self.producer.get(name)
        if tensor is None and node is not None and node.op_type == "Constant" and node.attribute:
            tensor = node.attribute[0].t if node.attribute[0].type == onnx.AttributeProto.TENSOR else None
        return numpy_helper.to_array(tensor) if tensor is not None and not tensor.external_data else None

    def only_reader(self, name: str) -> onnx.NodeProto | None:
        readers = self.consumers.get(name, [])
        return readers[0] if len(readers) == 1 else None


def add_constant(graph: onnx.GraphProto, name: str, value: np.ndarray) -> str:
    """Store ``value`` as the initializer ``name``; return the name (for use as a node input)."""
    graph.initializer.append(numpy_helper.from_array(value, name))
    return name


def op_builder(nodes: list[onnx.NodeProto], prefix: str) -> Callable[..., str]:
    """``op(kind, inputs, suffix, **attrs)``: append a node named and outputting ``prefix/suffix``."""
    def op(kind: str, inputs: list[str], suffix: str, **attrs: Any) -> str:
        name = f"{prefix}/{suffix}"
        nodes.append(helper.make_node(kind, inputs, [name], name=name, **attrs))
        return name
    return op


def use_domain(model: onnx.ModelProto, domain: str) -> None:
    """Import opset 1 of ``domain`` (ONNX Runtime's contrib ops, our fused kernels) unless the model does."""
    if not any(entry.domain == domain for entry in model.opset_import):
        model.opset_import.append(helper.make_opsetid(domain, 1))


def drop_unused_initializers(graph: onnx.GraphProto) -> None:
    used = {name for node in graph.node for name in node.input}
    used |= {o.name for o in graph.output}
    keep = [init for init in graph.initializer if init.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)


def drop_dead_nodes(graph: onnx.GraphProto) -> int:
    """Remove nodes none of whose outputs reach a graph output, then the weights nothing reads; return
    how many nodes."""
    needed = {o.name for o in graph.output}
    keep: list[onnx.NodeProto] = []
    for node in reversed(graph.node):
        if any(o in needed for o in node.output):
            keep.append(node)
            needed.update(node.input)
    dropped = len(graph.node) - len(keep)
    del graph.node[:]
    graph.node.extend(reversed(keep))
    drop_unused_initializers(graph)
    return dropped
