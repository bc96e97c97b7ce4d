"""Experiment (not shipped): an `int8-rot` artifact whose integer GEMMs run as ONE custom op each.

Usage (build the op first, see README.md beside this file):
    python scripts/experiments/fused_gemm/fused_op.py rewrite SHIPPED_ARTIFACT OUT [--rotation] [--epilogue]
    python scripts/experiments/fused_gemm/fused_op.py check SHIPPED_ARTIFACT OUT --lib LIB [--source MODEL_DIR]
    python scripts/experiments/fused_gemm/fused_op.py compare SHIPPED_ARTIFACT OUT --lib LIB [compare_artifacts options]
    python scripts/experiments/fused_gemm/fused_op.py profile OUT --lib LIB [profile_artifact options]
    python scripts/experiments/fused_gemm/fused_op.py bench --lib LIB [deposium-bench options, --int8-artifact OUT]
    python scripts/experiments/fused_gemm/fused_op.py dump OUT FILE.npy --lib LIB   (the gate paragraphs' vectors)

Why: the shipped graph quantizes each activation row with five ONNX Runtime nodes (Abs, ReduceMax,
Max, Div, QuantizeLinear), runs ``MatMulIntegerToFloat`` and multiplies by the row scale with a sixth.
``rewrite`` replaces every such chain by ``FusedRowQGemm`` (``fused_rowq_gemm_op.cc``: per-row
quantization, AMX int8 GEMM, zero-point and scales in one kernel), its weights packed once into AMX's
layout. ``--rotation`` also folds each block-32 Hadamard rotation in (``FusedRotRowQGemm``);
``--epilogue`` folds the bias ``Add`` after the GEMM, and the erf GELU after that (BERT-style models:
all-MiniLM-L6-v2's FFN), into the op's epilogue (``...Bias``, ``...BiasGelu``). Attention and norms
are left as they are. ``compare``, ``profile`` and ``bench`` run the
repository's own scripts (``bench``: ``deposium-bench``, whose single-core peers run in-process)
with the op's library registered in the worker's session options, so the figures are measured
exactly like the shipped artifact's.
"""

from __future__ import annotations

import argparse
import json
import runpy
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx
from onnx import helper, numpy_helper

if TYPE_CHECKING:
    from worker.embedder import Embedder

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


def constant(name: str, inits: dict[str, onnx.TensorProto], producer: dict[str, onnx.NodeProto]) -> np.ndarray | None:
    """The value of an initializer or a ``Constant`` node's output; None for computed tensors."""
    if name in inits:
        return numpy_helper.to_array(inits[name])
    node = producer.get(name)
    if node is not None and node.op_type == "Constant":
        return numpy_helper.to_array(node.attribute[0].t)
    return None


def other_input(node: onnx.NodeProto, name: str) -> str:
    """The operand of a binary node that is not ``name``."""
    return node.input[1] if node.input[0] == name else node.input[0]


def sole(name: str, consumers: dict[str, list[onnx.NodeProto]], op_type: str) -> onnx.NodeProto | None:
    found = consumers.get(name, [])
    return found[0] if len(found) == 1 and found[0].op_type == op_type else None


def epilogue_after(out: str, n: int, inits: dict[str, onnx.TensorProto], producer: dict[str, onnx.NodeProto],
                   consumers: dict[str, list[onnx.NodeProto]]) -> tuple[str, str, list[onnx.NodeProto], str] | None:
    """(suffix, bias name, nodes folded, new output) when ``out`` only feeds ``Add(out, bias[n])``, and
    the exact GELU after it when that Add only feeds ``x * 0.5 * (1 + erf(x / sqrt 2))`` as exported."""
    add = sole(out, consumers, "Add")
    if add is None:
        return None
    bias = other_input(add, out)
    value = constant(bias, inits, producer)
    if value is None or value.shape != (n,):
        return None
    y = add.output[0]
    users = consumers.get(y, [])
    if sorted(u.op_type for u in users) != ["Div", "Mul"]:
        return "Bias", bias, [add], y
    div = next(u for u in users if u.op_type == "Div")
    times_x = next(u for u in users if u.op_type == "Mul")
    root2 = constant(div.input[1], inits, producer)
    erf = sole(div.output[0], consumers, "Erf")
    plus = erf and sole(erf.output[0], consumers, "Add")
    if root2 is None or root2.size != 1 or abs(float(root2) - 2 ** 0.5) > 1e-6 or plus is None:
        return "Bias", bias, [add], y
    one = constant(other_input(plus, erf.output[0]), inits, producer)
    half_mul = sole(times_x.output[0], consumers, "Mul")
    if one is None or float(one) != 1.0 or half_mul is None or plus.output[0] not in times_x.input:
        return "Bias", bias, [add], y
    half = constant(other_input(half_mul, times_x.output[0]), inits, producer)
    if half is None or float(half) != 0.5:
        return "Bias", bias, [add], y
    return "BiasGelu", bias, [add, div, erf, plus, times_x, half_mul], half_mul.output[0]


def rewrite(src: Path, dst: Path, rotation: bool = False, epilogue: bool = False) -> None:
    from convert.quantize import drop_unused_initializers
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
    epilogues = {"Bias": 0, "BiasGelu": 0}
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
        inputs, output = [x, f"{base}/b", gemm.input[3], f"{base}/colsum"], scale_mul.output[0]
        if epilogue and (after := epilogue_after(output, w.shape[1], inits, producer, consumers)) is not None:
            suffix, bias, folded, output = after
            op_type += suffix
            inputs.append(bias)
            chain = [*chain, *folded]
            epilogues[suffix] += 1
        op = helper.make_node(op_type, inputs, [output], name=base, domain=DOMAIN)
        graph.node.insert(list(graph.node).index(gemm), op)
        dropped |= {id(n) for n in (gemm, scale_mul, quantize, divide, floor, absmax, absolute, *chain)}
        fused += 1
    kept = [n for n in graph.node if id(n) not in dropped]
    read = {name for node in kept for name in node.input} | {o.name for o in graph.output}
    kept = [n for n in kept if n.op_type != "Constant" or n.output[0] in read]  # the GELU's 0.5, 1, sqrt 2
    del graph.node[:]
    graph.node.extend(kept)
    graph.initializer.extend(added)
    drop_unused_initializers(graph)  # the unpacked weights the fused chains no longer read
    model.opset_import.append(helper.make_opsetid(DOMAIN, 1))
    dst.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(dst / "model.onnx"), save_as_external_data=True, location="model.onnx.data")
    manifest = json.loads((src / "manifest.json").read_text())
    for name in manifest["files"]:
        if not (dst / name).exists():
            shutil.copy(src / name, dst / name)
    manifest["files"] = {name: sha256_file(dst / name) for name in manifest["files"]}
    (dst / "manifest.json").write_text(json.dumps(manifest, indent=2))
    rotated = sum(n.op_type.startswith("FusedRot") for n in graph.node)
    print(f"{fused} integer GEMM chains fused ({rotated} with their rotation, {epilogues['Bias']} with their bias, "
          f"{epilogues['BiasGelu']} with bias + GELU); {len(graph.node)} nodes; wrote {dst}")


def register(lib: Path) -> None:
    """Every session the worker's code opens from now on loads the op's library."""
    import worker.embedder as embedder

    plain = embedder.session_options

    def with_library(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        options = plain(*args, **kwargs)
        options.register_custom_ops_library(str(lib))
        return options

    embedder.session_options = with_library


def document_task(embedder: Embedder) -> str | None:
    """The document prompt where the model has task prompts (EmbeddingGemma), else none (MiniLM)."""
    return "document" if "document" in embedder.manifest.prompts else None


def check(shipped: Path, fused: Path, source: Path | None) -> None:
    from convert.validate import load_paragraphs
    from worker.embedder import Embedder

    texts = load_paragraphs(limit=160)
    shipped_embedder, fused_embedder = Embedder(shipped), Embedder(fused)
    task = document_task(shipped_embedder)
    a = shipped_embedder.embed(texts, task=task).vectors
    b = fused_embedder.embed(texts, task=task).vectors
    cosine = (a * b).sum(axis=1)
    alone = np.stack([fused_embedder.embed([t], task=task).vectors[0] for t in texts[:32]])
    print(f"{len(texts)} gate paragraphs: cosine fused vs shipped mean {cosine.mean():.6f} min {cosine.min():.6f}; "
          f"fused, 32 alone vs in one batch: min {(alone * b[:32]).sum(axis=1).min():.6f}")
    if source is not None:  # the same paragraphs through sentence-transformers, torch fp32
        from sentence_transformers import SentenceTransformer

        torch_vectors = SentenceTransformer(str(source), device="cpu").encode(
            texts, prompt_name=task, normalize_embeddings=True)
        for name, vectors in (("shipped", a), ("fused", b)):
            c = (vectors * torch_vectors).sum(axis=1)
            print(f"{name} vs torch fp32: mean {c.mean():.5f} min {c.min():.5f}")


def dump(artifact: Path, file: Path) -> None:
    """The gate paragraphs' vectors, to compare the op's kernel paths bit for bit (ROWQ_PATH=avx2 / vnni)."""
    from convert.validate import load_paragraphs
    from worker.embedder import Embedder

    embedder = Embedder(artifact)
    task = document_task(embedder)
    vectors = embedder.embed(load_paragraphs(limit=160), task=task).vectors
    np.save(file, vectors)
    print(f"{len(vectors)} vectors -> {file}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=("rewrite", "check", "compare", "profile", "bench", "dump"))
    parser.add_argument("--lib", type=Path, default=Path("/tmp/libfused_rowq_gemm.so"))
    parser.add_argument("--rotation", action="store_true",
                        help="rewrite: fold each block-32 Hadamard rotation into the op (FusedRotRowQGemm)")
    parser.add_argument("--epilogue", action="store_true",
                        help="rewrite: fold the bias Add and the erf GELU after it into the op")
    parser.add_argument("--source", type=Path, help="check: also compare with this sentence-transformers model")
    args, rest = parser.parse_known_args()
    if args.command == "rewrite":
        rewrite(Path(rest[0]), Path(rest[1]), args.rotation, args.epilogue)
        return
    register(args.lib)
    if args.command == "check":
        check(Path(rest[0]), Path(rest[1]), args.source)
        return
    if args.command == "dump":
        dump(Path(rest[0]), Path(rest[1]))
        return
    if args.command == "bench":
        from worker.bench.cli import main as bench

        sys.argv = ["deposium-bench", *rest]
        bench()
        return
    script = REPO / "scripts" / f"{args.command}_artifact{'s' if args.command == 'compare' else ''}.py"
    sys.argv = [str(script), *rest]
    runpy.run_path(str(script), run_name="__main__")


if __name__ == "__main__":
    main()
