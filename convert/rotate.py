"""Block-Hadamard rotation of the activations an int8 GEMM reads (the ``int8-rot`` recipe).

Why: per-row int8 quantization gives every channel of a token row the step of the row's largest
value, so a few outlier channels (EmbeddingGemma's MLP down-projection inputs reach many times their
row RMS) leave the ordinary channels only a few effective bits. Multiplying the activation by an
orthogonal block-Hadamard matrix H spreads each outlier over its block, and multiplying the
weights by H^T undoes it inside the GEMM: (x H)(H^T W) = x W exactly in real arithmetic, so
nothing changes but what the int8 rounding sees (QuaRot, Ashkboos et al. 2024, rotates the same
way). Unlike SmoothQuant-style scaling it needs no calibration data, and unlike the residual
pass of ``int8-wide`` it does not double the GEMM's rows. Its fidelity against the other recipes:
docs/design.md, Recipes.

The rotation runs in the graph as Reshape -> MatMul(H_b) -> Reshape: b multiply-adds per value
(32 against the GEMM's hundreds to thousands), one small fp32 GEMM per quantized activation.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

#: Rotation block (a power of two). Why 32: larger blocks were no more faithful and cost more per value.
DEFAULT_BLOCK = 32


def hadamard(n: int) -> np.ndarray:
    """The orthonormal Sylvester-Hadamard matrix of order ``n`` (a power of two); symmetric, so it
    is its own inverse."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"Hadamard order must be a power of two, not {n}")
    h = np.ones((1, 1))
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h / np.sqrt(n)


def block_for(width: int, block: int = DEFAULT_BLOCK) -> int | None:
    """The rotation block for an activation ``width`` wide: ``block``, or the largest smaller power
    of two dividing ``width`` (at least 8); None when no useful block fits."""
    b = block
    while b >= 8:
        if width % b == 0:
            return b
        b //= 2
    return None


def rotate_weights(weights: np.ndarray, block: int) -> np.ndarray:
    """H^T W for a [K, N] weight, H block-diagonal with ``block``-sized Hadamard blocks."""
    k, n = weights.shape
    h = hadamard(block)
    rotated = np.einsum("ij,gjn->gin", h.T, weights.astype(np.float64).reshape(k // block, block, n))
    return rotated.reshape(k, n).astype(np.float32)


def rotate_columns(weights: np.ndarray, block: int) -> np.ndarray:
    """W H for a [K, N] weight (or an [N] bias): the GEMM's output comes out already rotated, so
    the next GEMM reading it needs no rotation of its own (see :mod:`deposium.convert.fold`)."""
    flat = weights.reshape(1, -1) if weights.ndim == 1 else weights
    return rotate_weights(flat.T, block).T.reshape(weights.shape)


def rotate_activation(graph: onnx.GraphProto, x: str, width: int, rank: int, block: int,
                      prefix: str) -> tuple[list[onnx.NodeProto], str]:
    """Nodes computing x H (H block-diagonal) over the last axis of ``x``; returns them and the
    rotated tensor's name. The blocks become a trailing axis so one MatMul with the b x b matrix
    rotates them all: [..., K] -> [..., K/b, b] @ H_b -> [..., K]."""
    keep = [0] * (rank - 1)  # Reshape's 0 copies the input's dim: batch and sequence stay symbolic
    split = _shared_constant(graph, f"rot/shape{rank}x{width // block}x{block}",
                             np.array([*keep, width // block, block], np.int64))
    joined = _shared_constant(graph, f"rot/shape{rank}x{width}", np.array([*keep, width], np.int64))
    matrix = _shared_constant(graph, f"rot/hadamard{block}", hadamard(block).astype(np.float32))
    blocks, turned, out = f"{prefix}/blocks", f"{prefix}/turned", f"{prefix}/rotated"
    nodes = [helper.make_node("Reshape", [x, split], [blocks], name=blocks),
             helper.make_node("MatMul", [blocks, matrix], [turned], name=turned),
             helper.make_node("Reshape", [turned, joined], [out], name=out)]
    return nodes, out


def _shared_constant(graph: onnx.GraphProto, name: str, value: np.ndarray) -> str:
    """One initializer per distinct constant, however many activations use it."""
    if not any(init.name == name for init in graph.initializer):
        graph.initializer.append(numpy_helper.from_array(value, name))
    return name
