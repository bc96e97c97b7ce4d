"""``build_artifact``: source model -> validated artifact directory, all or nothing.

Why staging + rename: a worker must never load half an artifact. Everything is built in a
sibling temporary directory; only when the gate has passed is it renamed to ``out``. A failure
at any step (bad source, export, quantization, gate) leaves ``out`` untouched.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx

from deposium.convert.options import AUTO, QuantizeError, QuantizeOptions
from deposium.convert.quantize import quantize, save_model
from deposium.convert.recipes import candidates
from deposium.convert.source import SentenceTransformerSource, read_source, resolve_source
from deposium.convert.validate import EMBEDDINGGEMMA_THRESHOLDS, Thresholds, validate_artifact
from deposium.worker.artifact import (
    FORMAT_VERSION,
    MODEL_FILE,
    TOKENIZER_FILE,
    VALIDATION_FILE,
    WEIGHTS_FILE,
    Manifest,
    sha256_file,
    write_manifest,
)

log = logging.getLogger(__name__)

DEFAULT_STSB = Path(__file__).resolve().parents[2] / "shared" / "eval" / "stsb_test.tsv"


class ConvertError(RuntimeError):
    """Any failure that leaves nothing published."""


@dataclass
class ConvertOptions:
    #: "auto": the fastest batch-invariant recipe that passes the gate, tried in the order of
    #: deposium.convert.recipes.candidates; or a recipe name of deposium.convert.recipes.RECIPES.
    recipe: str = AUTO
    weight_bits: int = 8
    quantize_embeddings: bool = True
    keep_fp32: list[str] = field(default_factory=list)
    #: int8-token: MatMul name patterns given ~15-bit activations (see deposium.convert.token_gemm).
    wide_activations: list[str] = field(default_factory=list)
    quantize_head: bool = False
    #: Token-embedding table: 8 (default) or 4 bits (smaller artifact; the gate reports fidelity).
    embedding_bits: int = 8
    #: Integer-GEMM activations: 8 or 7 (faster on CPUs without VNNI; see cli); None = each recipe's
    #: default (deposium.convert.recipes: 7 for int8-wide, 8 otherwise).
    activation_bits: int | None = None
    #: None = model defaults (stricter for EmbeddingGemma).
    thresholds: Thresholds | None = None
    #: STS-B file; "default" finds ../shared/eval/stsb_test.tsv when present; None skips STS-B.
    stsb: Path | str | None = "default"
    validate: bool = True
    paragraph_limit: int | None = None
    matryoshka_dims: list[int] | None = None
    revision: str | None = None
    force: bool = False


def _tools() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    tools = {}
    for package in ("onnx", "onnxruntime", "optimum-onnx", "optimum", "transformers", "torch",
                    "sentence-transformers", "tokenizers", "deposium-embeddings"):
        try:
            tools[package] = version(package)
        except PackageNotFoundError:
            pass
    return tools


def _write_tokenizer(source: SentenceTransformerSource, out: Path) -> int:
    """Copy tokenizer.json with padding and truncation off (the Embedder sets both)."""
    from tokenizers import Tokenizer, normalizers

    tokenizer = Tokenizer.from_file(str(source.transformer_dir / "tokenizer.json"))
    tokenizer.no_padding()
    tokenizer.no_truncation()
    if source.do_lower_case:  # sentence-transformers lower-cases before tokenizing
        existing = tokenizer.normalizer
        parts = [normalizers.Lowercase()] + ([existing] if existing is not None else [])
        tokenizer.normalizer = normalizers.Sequence(parts)
    tokenizer.save(str(out / TOKENIZER_FILE))
    config = json.loads((source.transformer_dir / "config.json").read_text())
    pad = tokenizer.token_to_id(tokenizer.padding["pad_token"]) if tokenizer.padding else None
    for candidate in (config.get("pad_token_id"), pad, 0):
        if isinstance(candidate, int):
            return candidate
    return 0


def with_named_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """The export with symbolic shapes for every tensor (ORT's symbolic shape inference).

    Why: optimum's MiniLM export loses its dimension names after the position-id Slice and the
    attention Reshapes; ORT then cannot plan buffer reuse and, with the arena off, maps a fresh
    buffer per op, which costs long inputs most of their speed; with the names restored the vectors
    are bit-identical (docs/benchmarks.md). Runs before the head is appended (the tool fails on it);
    where it fails, the export is kept as it was.
    """
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    try:
        return SymbolicShapeInference.infer_shapes(model, auto_merge=True)
    except Exception as exc:  # noqa: BLE001 - an optimization only; never fail a conversion on it
        log.warning("symbolic shape inference failed (%s); keeping the export's own shapes", exc)
        return model


def fp32_graph(transformer: Path, source: SentenceTransformerSource) -> onnx.ModelProto:
    """The fp32 pipeline every recipe starts from: the export with named shapes, simplified
    (deposium.convert.simplify), with the sentence-transformers head appended."""
    from deposium.convert.head import append_head
    from deposium.convert.simplify import simplify

    return append_head(simplify(with_named_shapes(onnx.load(str(transformer)))), source)


def _graph_inputs(path: Path) -> list[str]:
    return [i.name for i in onnx.load(str(path), load_external_data=False).graph.input]


def _write_artifact_dir(directory: Path, model_src: Path, source: SentenceTransformerSource,
                        quant: dict[str, Any], dims: list[int], pad_id: int, tokenizer_dir: Path,
                        validation: dict[str, Any] | None) -> Manifest:
    directory.mkdir(parents=True, exist_ok=True)
    if model_src != directory / MODEL_FILE:
        save_model(onnx.load(str(model_src)), directory / MODEL_FILE)
    if tokenizer_dir != directory:
        shutil.copyfile(tokenizer_dir / TOKENIZER_FILE, directory / TOKENIZER_FILE)
    files = [MODEL_FILE, TOKENIZER_FILE] + ([WEIGHTS_FILE] if (directory / WEIGHTS_FILE).is_file() else [])
    if validation is not None:
        (directory / VALIDATION_FILE).write_text(json.dumps(validation, indent=2, sort_keys=True) + "\n")
        files.append(VALIDATION_FILE)
    manifest = Manifest(
        format_version=FORMAT_VERSION,
        source=source.source_id,
        source_revision=source.revision,
        architecture=source.architecture,
        dim=source.dim,
        matryoshka_dims=dims,
        pooling=source.pooling,
        max_seq_length=source.max_seq_length,
        inputs=_graph_inputs(directory / MODEL_FILE),
        pad_token_id=pad_id,
        prompts=dict(source.prompts),
        default_prompt_name=source.default_prompt_name,
        quantization=quant,
        files={name: sha256_file(directory / name) for name in files},
        tools=_tools(),
        created_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    )
    write_manifest(directory, manifest)
    return manifest


def _resolve_stsb(value: Path | str | None) -> Path | None:
    if value is None:
        return None
    if value == "default":
        return DEFAULT_STSB if DEFAULT_STSB.is_file() else None
    path = Path(value)
    if not path.is_file():
        raise ConvertError(f"STS-B file {path} does not exist")
    return path


def _check_output(out: Path, force: bool) -> None:
    if out.exists() and not force:
        raise ConvertError(f"{out} already exists; pass --force to replace it")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConvertError(f"cannot write the artifact under {out.parent}: {exc.strerror or exc}") from None
    if not os.access(out.parent, os.W_OK):
        raise ConvertError(f"cannot write the artifact: {out.parent} is not writable")


def build_artifact(source: str | Path, out: Path | str, options: ConvertOptions | None = None,
                   **overrides: Any) -> Path:
    """Convert ``source`` (directory or hub id) into a validated artifact at ``out``."""
    source = str(source)  # a Path is a directory; the manifest records the string the caller gave
    from deposium.convert.export import ExportError, export_transformer
    from deposium.convert.source import SourceError

    opts = options or ConvertOptions()
    for key, value in overrides.items():
        if not hasattr(opts, key):
            raise TypeError(f"unknown option {key!r}")
        setattr(opts, key, value)
    try:  # before any work: an unknown or unbuildable recipe costs no export
        recipes, skipped = candidates(opts.recipe, opts.activation_bits)
    except QuantizeError as exc:
        raise ConvertError(str(exc)) from None
    out = Path(out).expanduser().absolute()
    _check_output(out, opts.force)
    stsb = _resolve_stsb(opts.stsb)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.staging-", dir=out.parent))
    try:
        try:
            path, revision = resolve_source(source, opts.revision)
            src = read_source(path, source_id=source, revision=revision)
        except SourceError as exc:
            raise ConvertError(str(exc)) from None
        dims = opts.matryoshka_dims or src.matryoshka_dims()
        if dims[0] != src.dim or any(d <= 0 or d > src.dim for d in dims):
            raise ConvertError(f"matryoshka dims {dims} must start with the model dim {src.dim}")
        thresholds = opts.thresholds or (
            EMBEDDINGGEMMA_THRESHOLDS if (src.model_type, src.dim) == ("gemma3_text", 768) else Thresholds()
        )
        work = staging / "work"
        log.info("exporting %s (%s) with optimum", source, src.architecture)
        try:
            transformer = export_transformer(src, work / "export")
        except ExportError as exc:
            raise ConvertError(str(exc)) from None
        fp32_dir = work / "fp32"
        fp32_dir.mkdir(parents=True)
        save_model(fp32_graph(transformer, src), fp32_dir / MODEL_FILE)
        pad_id = _write_tokenizer(src, fp32_dir)
        _write_artifact_dir(fp32_dir, fp32_dir / MODEL_FILE, src, {"recipe": "fp32"}, dims, pad_id, fp32_dir, None)
        rejected: list[dict[str, Any]] = []
        for attempt, recipe in enumerate(recipes):
            final = staging / f"artifact-{attempt}"
            final.mkdir()
            log.info("quantizing with recipe %s", recipe)
            try:
                quant = quantize(fp32_dir / MODEL_FILE, final / MODEL_FILE,
                                 QuantizeOptions(recipe=recipe, weight_bits=opts.weight_bits,
                                                 quantize_embeddings=opts.quantize_embeddings,
                                                 keep_fp32=list(opts.keep_fp32),
                                                 wide_activations=list(opts.wide_activations),
                                                 quantize_head=opts.quantize_head,
                                                 embedding_bits=opts.embedding_bits,
                                                 activation_bits=opts.activation_bits))
            except QuantizeError as exc:
                raise ConvertError(str(exc)) from None
            _write_artifact_dir(final, final / MODEL_FILE, src, quant, dims, pad_id, fp32_dir, None)
            validation = None
            if not opts.validate:
                break
            log.info("validating %s against sentence-transformers (torch fp32)", recipe)
            validation = validate_artifact(final, fp32_dir, src.path, thresholds=thresholds, stsb_path=stsb,
                                           paragraph_limit=opts.paragraph_limit)
            validation["recipe"] = quant
            validation["rejected_recipes"] = list(rejected)
            validation["skipped_recipes"] = skipped
            if validation["passed"]:
                break
            rejected.append({"recipe": recipe, "failures": validation["failures"],
                             "int8_vs_torch_cosine": validation["paragraphs"]["int8_vs_torch_cosine"]})
            if attempt + 1 < len(recipes):
                log.warning("recipe %s failed the gate (%s); trying %s", recipe,
                            "; ".join(validation["failures"]), recipes[attempt + 1])
                continue
            (out.parent / f"{out.name}.rejected-validation.json").write_text(
                json.dumps(validation, indent=2, sort_keys=True) + "\n")
            raise ConvertError("validation gate failed, nothing published: " + "; ".join(validation["failures"]))
        _write_artifact_dir(final, final / MODEL_FILE, src, quant, dims, pad_id, fp32_dir, validation)
        if out.exists():
            shutil.rmtree(out)
        os.replace(final, out)
        return out
    finally:
        shutil.rmtree(staging, ignore_errors=True)
