"""Compare quantization recipes on a real sentence-transformers model (e.g. EmbeddingGemma-300m).

Usage: python -m deposium.bench.gemma_recipes MODEL_DIR WORK_DIR [N_PARAGRAPHS] [recipe,recipe...]
(e.g. ``int8-token,int8-rot,rot=*down_proj*@32``; see ``variants`` below for the named ones)
Prints size, cosine vs torch fp32 on held-out paragraphs, batch invariance and CPU-time tokens/s.
Builds everything under WORK_DIR (never commit it).
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import numpy as np

from deposium.convert.api import _write_artifact_dir, _write_tokenizer, fp32_graph
from deposium.convert.export import export_transformer
from deposium.convert.quantize import QuantizeOptions, quantize, save_model
from deposium.convert.source import read_source
from deposium.convert.validate import load_paragraphs
from deposium.worker.config import Settings
from deposium.worker.embedder import Embedder

S = Settings(max_batch_paragraphs=100000, max_batch_bytes=1 << 30)


def cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def named_variants() -> dict[str, QuantizeOptions | None]:
    """The recipes and recipe variants this tool knows by name (``fp32``: the unquantized graph)."""
    return {
        "fp32": None,
        "int8-token": QuantizeOptions(recipe="int8-token"),
        "int8-token-keepdown": QuantizeOptions(recipe="int8-token", keep_fp32=["*down_proj*"]),
        "int8-block": QuantizeOptions(recipe="int8-block"),
        "tok-w8": QuantizeOptions(recipe="int8-token", weight_bits=8),
        "tok-a7w8": QuantizeOptions(recipe="int8-token", weight_bits=8, activation_bits=7),
        "tok-widedown": QuantizeOptions(recipe="int8-token", wide_activations=["*down_proj*"]),
        "tok-wideall": QuantizeOptions(recipe="int8-token", wide_activations=["*"]),
        "tok-fp32table": QuantizeOptions(recipe="int8-token", quantize_embeddings=False),
        "int8-rot": QuantizeOptions(recipe="int8-rot"),
        "int8-rot-a7": QuantizeOptions(recipe="int8-rot", activation_bits=7),
        "int8-rot-a7-table4": QuantizeOptions(recipe="int8-rot", activation_bits=7, embedding_bits=4),
        "int8-wide": QuantizeOptions(recipe="int8-wide"),
        "int8-wide-fp32table": QuantizeOptions(recipe="int8-wide", quantize_embeddings=False),
        "int8-wide-table4": QuantizeOptions(recipe="int8-wide", embedding_bits=4),
        "int8-token-table4": QuantizeOptions(recipe="int8-token", embedding_bits=4),
    }


def variant(name: str, known: dict[str, QuantizeOptions | None]) -> QuantizeOptions | None:
    """A named variant, or an ad-hoc one: "wide=PATTERN+PATTERN[~keep=PATTERN+PATTERN]" or
    "rot=PATTERN+PATTERN[@BLOCK]" (int8-token + rotation of the matching activations)."""
    if name.startswith("wide="):
        wide, _, keep = name[5:].partition("~keep=")
        return QuantizeOptions(recipe="int8-token", wide_activations=wide.split("+") if wide else [],
                               keep_fp32=keep.split("+") if keep else [])
    if name.startswith("rot="):
        patterns, _, block = name[4:].partition("@")
        return QuantizeOptions(recipe="int8-token", rotate_activations=patterns.split("+"),
                               rotation_block=int(block or 32))
    if name not in known:
        raise SystemExit(f"unknown variant {name!r}; named ones: {', '.join(known)}")
    return known[name]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m deposium.bench.gemma_recipes", description=__doc__.split("\n\n")[0])
    p.add_argument("model", type=Path, help="sentence-transformers directory")
    p.add_argument("work", type=Path, help="where exports and artifacts are built (never commit it)")
    p.add_argument("paragraphs", type=int, nargs="?", default=48)
    p.add_argument("variants", nargs="?", default=None, help="comma-separated (default: every named one)")
    args = p.parse_args(argv)
    G, W, N = args.model, args.work, args.paragraphs
    W.mkdir(parents=True, exist_ok=True)
    src = read_source(G)
    print(src.max_seq_length, src.dim, src.matryoshka_dims(), src.pooling, len(src.dense), flush=True)
    fp32 = W / "fp32"
    if not (fp32 / "manifest.json").exists():
        t = time.time()
        tr = export_transformer(src, W / "export")
        print("export", time.time() - t, flush=True)
        fp32.mkdir(exist_ok=True)
        save_model(fp32_graph(tr, src), fp32 / "model.onnx")  # the same graph convert starts from
        pad = _write_tokenizer(src, fp32)
        _write_artifact_dir(fp32, fp32 / "model.onnx", src, {"recipe": "fp32"}, src.matryoshka_dims(), pad, fp32,
                            None)
        shutil.rmtree(W / "export")
    paras = load_paragraphs(limit=N)
    refp = W / f"torch_{N}.npy"
    if refp.exists():
        ref = np.load(refp)
    else:
        import torch

        torch.set_num_threads(1)
        from sentence_transformers import SentenceTransformer

        st = SentenceTransformer(str(G), device="cpu")
        t = time.time()
        ref = st.encode(paras, prompt_name="document", batch_size=8, show_progress_bar=False)
        print("torch", time.time() - t, flush=True)
        np.save(refp, ref)
    known = named_variants()
    sel = args.variants.split(",") if args.variants else list(known)
    for name in sel:
        opts = variant(name, known)
        d = W / name.replace("*", "S").replace("/", "_").replace("+", "_").replace("~", "-").replace("@", "-b")
        if opts is not None and not (d / "manifest.json").exists():
            d.mkdir(exist_ok=True)
            t = time.time()
            q = quantize(fp32 / "model.onnx", d / "model.onnx", opts)
            print(name, "quantize", round(time.time() - t, 1), flush=True)
            _write_artifact_dir(d, d / "model.onnx", src, q, src.matryoshka_dims(), 0, fp32, None)
        d = fp32 if opts is None else d
        e = Embedder(d, settings=S, verify=False)
        t = time.process_time()
        r = e.embed(paras, task="document")
        cpu = time.process_time() - t
        alone = np.stack([e.embed([p], task="document").vectors[0] for p in paras[:16]])
        c = cos(r.vectors, ref)
        inv = cos(alone, r.vectors[:16])
        ntok = sum(r.token_counts)
        print(
            f"{name:22s} size {sum(f.stat().st_size for f in d.glob('model.onnx*')) / 1e6:7.1f}MB "
            f"cos mean {c.mean():.5f} min {c.min():.5f} inv {inv.min():.6f} cpu tok/s {ntok / cpu:6.0f} "
            f"({ntok} tok)",
            flush=True,
        )


if __name__ == "__main__":
    main()
