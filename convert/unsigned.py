"""The artifact's second graph: the same int8 GEMMs with unsigned weights (u8, zero point 128).

Why: ONNX Runtime's x86 u8 x s8 GEMM on a CPU without VNNI or AMX (plain AVX2, or AVX-512
without VNNI) multiplies with ``vpmaddubsw``, which adds each pair of products in int16 and
saturates. With per-row u8 activations (zero point 128) and 8-bit weights that is wrong by up
to a third of the result: measured on an AMD EPYC (Zen 3, AVX2), a 16x768 @ 768x1152
``MatMulIntegerToFloat`` with full-range values was off by up to 140,000 in results of 400,000.
Its u8 x u8 kernel widens to int16 before multiplying and is exact (1.3x slower there); VNNI
and AMX accumulate u8 x s8 in int32 and are exact and fastest. Shifting a weight by 128 and
giving the GEMM that zero point computes the very same integers, so both graphs give the same
vectors and the worker picks the one that is exact on its CPU (``worker.variant``).

Only artifacts with 8-bit weights AND 8-bit activations need it (``int8-token``, ``int8-rot``,
``int8-attn``): with 7-bit activations, ``int8-wide``'s default, no pair of products can saturate
(``worker.variant.needs_unsigned_graph``). Only the shifted GEMM weights are new data
(``model.u8.onnx.data``, ~30 % of an EmbeddingGemma artifact); every other tensor, the
token-embedding table included, stays a reference into ``model.onnx.data``, so neither disk nor
the page cache holds it twice.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

#: Integer GEMMs and where their weight (B) and weight zero point sit among the node's inputs.
WEIGHT_INPUTS: dict[str, tuple[int, int]] = {
    "MatMulIntegerToFloat": (1, 5),
    "DynamicQuantizeMatMul": (1, 3),
    "MatMulInteger": (1, 3),
}

SHARED_ZERO_POINT = "u8w/zero_point"


def _signed_weights(graph: onnx.GraphProto, initializers: dict[str, onnx.TensorProto]
                    ) -> list[tuple[onnx.NodeProto, onnx.TensorProto]]:
    found = []
    for node in graph.node:
        slots = WEIGHT_INPUTS.get(node.op_type)
        if slots is None or len(node.input) <= slots[0]:
            continue
        weight = initializers.get(node.input[slots[0]])
        if weight is not None and weight.data_type == onnx.TensorProto.INT8:
            found.append((node, weight))
    return found


def _shifted(tensor: onnx.TensorProto, base_dir: Path) -> np.ndarray:
    return (numpy_helper.to_array(tensor, base_dir=str(base_dir)).astype(np.int16) + 128).astype(np.uint8)


def unsigned_path(model_path: Path) -> Path:
    """``model.onnx`` -> ``model.u8.onnx`` (worker.artifact.UNSIGNED_MODEL_FILE), ``x.onnx`` -> ``x.u8.onnx``."""
    return model_path.with_name(model_path.name.removesuffix(".onnx") + ".u8.onnx")


def write_unsigned_variant(model_path: Path) -> list[Path]:
    """Write the unsigned-weight graph (+ its data file) beside ``model_path`` when that graph has
    int8 GEMM weights; return the paths written (none for fp32 or ``MatMulNBits`` graphs)."""
    model_path = Path(model_path)
    directory = model_path.parent
    model = onnx.load(str(model_path), load_external_data=False)
    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    targets = _signed_weights(graph, initializers)
    if not targets:
        return []
    added: dict[str, str] = {}
    for node, weight in targets:
        b_index, zp_index = WEIGHT_INPUTS[node.op_type]
        if weight.name not in added:
            shifted = numpy_helper.from_array(_shifted(weight, directory), f"{weight.name}.u8")
            graph.initializer.append(shifted)
            added[weight.name] = shifted.name
        node.input[b_index] = added[weight.name]
        while len(node.input) <= zp_index:
            node.input.append("")
        old_zp = initializers.get(node.input[zp_index])
        if old_zp is not None:  # per-column int8 zero points move by the same 128
            zp = numpy_helper.from_array(_shifted(old_zp, directory), f"{old_zp.name}.u8")
            graph.initializer.append(zp)
            node.input[zp_index] = zp.name
        else:
            if SHARED_ZERO_POINT not in initializers:
                initializers[SHARED_ZERO_POINT] = numpy_helper.from_array(np.array(128, np.uint8), SHARED_ZERO_POINT)
                graph.initializer.append(initializers[SHARED_ZERO_POINT])
            node.input[zp_index] = SHARED_ZERO_POINT
    still_used = {name for node in graph.node for name in node.input}
    kept = [t for t in graph.initializer if t.name in still_used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    out = unsigned_path(model_path)
    data = out.with_name(out.name + ".data")
    if data.exists():
        data.unlink()  # onnx appends to an existing external-data file
    # Only tensors holding data in memory (the shifted weights) move to the new file; the others
    # keep their ``location`` in the original data file.
    onnx.save(model, str(out), save_as_external_data=True, all_tensors_to_one_file=True, location=data.name,
              size_threshold=1024)
    if not data.exists():  # tiny graphs: every tensor under the threshold
        return [out]
    data.chmod(0o644)  # onnx creates it 0600: a non-root worker (the Docker image's) must read it
    return [out, data]
