"""Experiment (not shipped): an `int8-rot` artifact whose integer GEMMs run as ONE custom op each.

Usage (build the op first, see README.md beside this file):
    python scripts/experiments/fused_gemm/fused_op.py rewrite SHIPPED_ARTIFACT OUT [--rotation]
    python scripts/experiments/fused_gemm/fused_op.py check SHIPPED_ARTIFACT OUT --lib LIB [--source MODEL_DIR]
    python scripts/experiments/fused_gemm/fused_op.py compare SHIPPED_ARTIFACT OUT --lib LIB [compare_artifacts options]
    python scripts/experiments/fused_gemm/fused_op.py profile OUT --lib LIB [profile_artifact options]

Why: the shipped graph quantizes each activation row with five ONNX Runtime nodes (Abs, ReduceMax,
Max, Div, QuantizeLinear), runs ``MatMulIntegerToFloat`` and multiplies by the row scale with a sixth.
``rewrite`` replaces every such chain by ``FusedRowQGemm`` (``fused_rowq_gemm_op.cc``: per-row
quantization, AMX int8 GEMM, zero-point and scales in one kernel), its weights packed once into AMX's
layout. ``--rotation`` also folds each block-32 Hadamard rotation in (``FusedRotRowQGemm``); attention
and norms are left as they are. ``compare`` and ``profile`` run the
repository's own scripts with the op's library registered in the worker's session options, so the
figures are measured exactly like the shipped artifact's.
"""

from __future__ import annotations

import argparse
import json
import runpy
import shutil
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

DOMAIN = "deposium.experiment"
HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]


def amx_layout(w: np.ndarray) -> np.ndarray:
    """[K, N] int8 -> per 16-column block and 64-deep k step, 16 rows of (16 columns x 4 k values)."""
    k, n = w.shape
    return np.ascontiguousarray(w.reshape(k // 64, 16, 4, n // 16, 16).transpose(3, 0, 1, 4, 2)).reshape(-1)


def rotation_input(x: str, producer: dict[str, onnx.NodeProto], consumers: dict[str, list[onnx.NodeProto]]
                   ) -> tuple[str, list[onnx.NodeProto]] | None:
    """When ``x`` is a block-32 rotation's output (convert/rotate.py: Reshape, MatMul by
    rot/hadamard32, Reshape) that nothing else reads: the unrotated input and the three nodes."""
    joined = producer.get(x)
    if joined is None or not joined.name.endswith("/rot/rotated"):
        return None
    turned = producer[joined.input[0]]
    blocks = producer[turned.input[0]]
    if turned.input[1] != "rot/hadamard32":
        return None
    if any(len(consumers[n.output[0]]) != 1 for n in (blocks, turned)):
        return None
    return blocks.input[0], [blocks, turned, joined]


def rewrite(src: Path, dst: Path, rotation: bool = False) -> None:
    from worker.artifact import sha256_file

    model = onnx.load(str(src / "model.onnx"))
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    producer = {out: node for node in graph.node for out in node.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    dropped: set[int] = set()
    added: list[onnx.TensorProto] = []
    fused = 0
    for gemm in [n for n in graph.node if n.op_type == "MatMulIntegerToFloat"]:
        quantize = producer[gemm.input[0]]
        divide = producer[quantize.input[0]]
        x, row_scale = divide.input
        scale_mul = next(c for c in consumers[gemm.output[0]] if c.op_type == "Mul")
        floor = producer[row_scale]
        absmax = producer[floor.input[0]]
        absolute = producer[absmax.input[0]]
        w = numpy_helper.to_array(inits[gemm.input[1]]).astype(np.int8)
        if w.shape[0] % 64 or w.shape[1] % 64:
            raise SystemExit(f"{gemm.name}: K and N must be multiples of 64, got {w.shape}")
        base, op_type, chain = f"{gemm.name}/fused", "FusedRowQGemm", []
        if rotation and (found := rotation_input(x, producer, consumers)) is not None:
            if {c.op_type for c in consumers[x]} == {"Abs", "Div"}:
                (x, chain), op_type = found, "FusedRotRowQGemm"
        added += [numpy_helper.from_array(amx_layout(w), f"{base}/b"),
                  numpy_helper.from_array(w.astype(np.int32).sum(axis=0).astype(np.int32), f"{base}/colsum")]
        op = helper.make_node(op_type, [x, f"{base}/b", gemm.input[3], f"{base}/colsum"],
                              [scale_mul.output[0]], name=base, domain=DOMAIN)
        graph.node.insert(list(graph.node).index(gemm), op)
        dropped |= {id(n) for n in (gemm, scale_mul, quantize, divide, floor, absmax, absolute, *chain)}
        fused += 1
    kept = [n for n in graph.node if id(n) not in dropped]
    del graph.node[:]
    graph.node.extend(kept)
    graph.initializer.extend(added)
    used = {name for node in graph.node for name in node.input}
    live = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(live)
    model.opset_import.append(helper.make_opsetid(DOMAIN, 1))
    dst.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(dst / "model.onnx"), save_as_external_data=True, location="model.onnx.data")
    manifest = json.loads((src / "manifest.json").read_text())
    for name in manifest["files"]:
        if not (dst / name).exists():
            shutil.copy(src / name, dst / name)
    manifest["files"] = {name: sha256_file(dst / name) for name in manifest["files"]}
    (dst / "manifest.json").write_text(json.dumps(manifest, indent=2))
    rotated = sum(n.op_type == "FusedRotRowQGemm" for n in graph.node)
    print(f"{fused} integer GEMM chains fused ({rotated} with their rotation); {len(graph.node)} nodes; wrote {dst}")


def register(lib: Path) -> None:
    """Every session the worker's code opens from now on loads the op's library."""
    import worker.embedder as embedder

    plain = embedder.session_options

    def with_library(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        options = plain(*args, **kwargs)
        options.register_custom_ops_library(str(lib))
        return options

    embedder.session_options = with_library


def check(shipped: Path, fused: Path, source: Path | None) -> None:
    from convert.validate import load_paragraphs
    from worker.embedder import Embedder

    texts = load_paragraphs(limit=160)
    a = Embedder(shipped).embed(texts, task="document").vectors
    fused_embedder = Embedder(fused)
    b = fused_embedder.embed(texts, task="document").vectors
    cosine = (a * b).sum(axis=1)
    alone = np.stack([fused_embedder.embed([t], task="document").vectors[0] for t in texts[:32]])
    print(f"{len(texts)} gate paragraphs: cosine fused vs shipped mean {cosine.mean():.6f} min {cosine.min():.6f}; "
          f"fused, 32 alone vs in one batch: min {(alone * b[:32]).sum(axis=1).min():.6f}")
    if source is not None:  # the same paragraphs through sentence-transformers, torch fp32
        from sentence_transformers import SentenceTransformer

        torch_vectors = SentenceTransformer(str(source), device="cpu").encode(
            texts, prompt_name="document", normalize_embeddings=True)
        for name, vectors in (("shipped", a), ("fused", b)):
            c = (vectors * torch_vectors).sum(axis=1)
            print(f"{name} vs torch fp32: mean {c.mean():.5f} min {c.min():.5f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=("rewrite", "check", "compare", "profile"))
    parser.add_argument("--lib", type=Path, default=Path("/tmp/libfused_rowq_gemm.so"))
    parser.add_argument("--rotation", action="store_true",
                        help="rewrite: fold each block-32 Hadamard rotation into the op (FusedRotRowQGemm)")
    parser.add_argument("--source", type=Path, help="check: also compare with this sentence-transformers model")
    args, rest = parser.parse_known_args()
    if args.command == "rewrite":
        rewrite(Path(rest[0]), Path(rest[1]), args.rotation)
        return
    register(args.lib)
    if args.command == "check":
        check(Path(rest[0]), Path(rest[1]), args.source)
        return
    script = REPO / "scripts" / f"{args.command}_artifact{'s' if args.command == 'compare' else ''}.py"
    sys.argv = [str(script), *rest]
    runpy.run_path(str(script), run_name="__main__")


if __name__ == "__main__":
    main()
