"""``deposium-convert SOURCE --out DIR``: build a validated int8 artifact from a sentence-transformers model."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from deposium.convert.options import AUTO, QuantizeError
from deposium.convert.recipes import AUTO_RECIPES, AUTO_RECIPES_PORTABLE, RECIPES, choices, recipe_named
from deposium.convert.validate import Thresholds


def _dims(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None


def _recipe(text: str) -> str:
    """A recipe name, checked while the arguments are parsed: a wrong one stops before any work."""
    try:
        return text if text == AUTO else recipe_named(text).name
    except QuantizeError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _recipe_help() -> str:
    listed = "; ".join(f"{name}: {recipe.summary}" for name, recipe in RECIPES.items())
    return (f"quantization recipe (default {AUTO}: {', '.join(AUTO_RECIPES)} in that order, or "
            f"{', '.join(AUTO_RECIPES_PORTABLE)} where the fused kernels are not built; the first that passes "
            f"the gate ships). Recipes: {listed}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="deposium-convert",
        description="Export a sentence-transformers model (local directory or hub id) to one ONNX graph "
        "holding the whole pipeline (transformer, pooling, Dense, normalize), quantize it, validate it "
        "against the torch model, and publish the artifact directory only if it passes.",
        epilog="Hub ids (e.g. google/embeddinggemma-300m) need a reachable hub; gated models need HF_TOKEN "
        "in the environment. Offline, pass the model's local directory.",
    )
    p.add_argument("source", help="sentence-transformers model directory, or a hub id such as org/name")
    p.add_argument("--out", required=True, type=Path, help="artifact directory to create")
    p.add_argument("--recipe", type=_recipe, default=AUTO, metavar="{" + ",".join(choices()) + "}",
                   help=_recipe_help())
    p.add_argument("--weight-bits", default="8", choices=["7", "8"],
                   help="integer-GEMM weight bits (8 is exact on every CPU: workers on CPUs without VNNI "
                        "run ONNX Runtime's u8 x u8 kernel)")
    p.add_argument("--no-quantize-embeddings", action="store_true", help="keep the token-embedding table fp32")
    p.add_argument("--keep-fp32", action="append", default=[], metavar="PATTERN",
                   help="fnmatch pattern of MatMul node names to leave in fp32 (repeatable)")
    p.add_argument("--wide-activations", action="append", default=[], metavar="PATTERN",
                   help="int8-token: fnmatch pattern of MatMul node names whose activations get a second "
                        "int8 pass (~15 bits; repeatable; int8-wide = every MatMul)")
    p.add_argument("--activation-bits", type=int, choices=(8, 7), default=None,
                   help="integer-GEMM activations, 8 or 7 (default: 7 for int8-wide, whose residual pass keeps the "
                        "precision, 8 for the single-pass recipes). 7-bit activations cannot saturate the u8 x s8 "
                        "kernel of CPUs without VNNI, so workers there run that faster kernel instead of "
                        "u8 x u8, at some fidelity; the gate reports it")
    p.add_argument("--embedding-bits", type=int, choices=(8, 4), default=8,
                   help="token-embedding table: 8-bit per row (default) or 4-bit per 32 values (smaller)")
    p.add_argument("--quantize-head", action="store_true",
                   help="also quantize the head's Dense layers (smaller, less faithful, no faster)")
    p.add_argument("--matryoshka-dims", type=_dims, help="comma-separated dims, first = model dim")
    p.add_argument("--revision", help="hub revision (hub ids only)")
    p.add_argument("--stsb", default="default",
                   help="STS-B tsv for the gate (default: ../shared/eval/stsb_test.tsv if present; 'none' skips)")
    p.add_argument("--min-mean-cosine", type=float, help="gate: mean cosine vs torch on paragraphs")
    p.add_argument("--min-min-cosine", type=float,
                   help="gate: min cosine vs torch on any paragraph and on each long input")
    p.add_argument("--max-stsb-drop", type=float, help="gate: max STS-B Spearman drop in points")
    p.add_argument("--min-batch-invariance", type=float, help="gate: min cosine alone vs in a batch")
    p.add_argument("--no-validate", action="store_true", help="skip the gate (the artifact says so)")
    p.add_argument("--force", action="store_true", help="replace an existing artifact at --out")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("deposium.convert").setLevel(logging.INFO)
    from deposium.convert.api import ConvertError, ConvertOptions, build_artifact

    custom = {k: getattr(args, k) for k in ("min_mean_cosine", "min_min_cosine", "max_stsb_drop",
                                             "min_batch_invariance") if getattr(args, k) is not None}
    thresholds = Thresholds(**custom) if custom else None
    opts = ConvertOptions(
        recipe=args.recipe,
        weight_bits=int(args.weight_bits),
        quantize_embeddings=not args.no_quantize_embeddings,
        keep_fp32=args.keep_fp32,
        wide_activations=args.wide_activations,
        quantize_head=args.quantize_head,
        embedding_bits=args.embedding_bits,
        activation_bits=args.activation_bits,
        thresholds=thresholds,
        stsb=None if args.stsb == "none" else args.stsb,
        validate=not args.no_validate,
        matryoshka_dims=args.matryoshka_dims,
        revision=args.revision,
        force=args.force,
    )
    try:
        out = build_artifact(args.source, args.out, opts)
    except ConvertError as exc:
        print(f"deposium-convert: error: {exc}", file=sys.stderr)
        return 1
    validation = out / "validation.json"
    if validation.is_file():
        report = json.loads(validation.read_text())
        cos = report["paragraphs"]["int8_vs_torch_cosine"]
        line = (f"cosine vs torch mean {cos['mean']:.5f} min {cos['min']:.5f}, "
                f"batch invariance {report['batch_invariance_min_cosine']:.6f}")
        stsb = report.get("stsb_spearman_x100")
        if stsb:
            full = str(max(int(d) for d in stsb["torch_fp32"]))
            line += (f", STS-B torch {stsb['torch_fp32'][full]:.2f} / onnx fp32 {stsb['onnx_fp32'][full]:.2f}"
                     f" / int8 {stsb['onnx_int8'][full]:.2f}")
        print(f"artifact written to {out}: {line}")
    else:
        print(f"artifact written to {out} (not validated)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
