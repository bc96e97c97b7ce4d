"""The Embedder against sentence-transformers on the real MiniLM artifacts built by `convert`.

Reference vectors come from sentence-transformers' own ``encode`` (torch, fp32) on the
source model directory: an independent implementation of tokenize -> pool -> normalize.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from deposium.worker.artifact import MANIFEST, MODEL_FILE, TOKENIZER_FILE, ArtifactError, read_manifest, write_manifest
from deposium.worker.config import Settings
from deposium.worker.embedder import (
    DISABLED_OPTIMIZERS,
    Embedder,
    EmbedRequestError,
    EmbedResult,
    pack_batches,
    session_options,
)

SENTENCES = [
    "The quarterly report shows revenue growth across all regions.",
    "A cat sat quietly on the warm windowsill, watching birds.",
    "Quantization maps floating point weights to eight-bit integers.",
    "Celery distributes tasks to worker processes through a broker.",
    "Paris is the capital and most populous city of France.",
    "The mitochondria is the powerhouse of the cell.",
    "Le modèle encode chaque paragraphe en un vecteur de dimension fixe.",
    "Die Katze schläft auf dem Sofa, während es draußen regnet.",
    "Redis keeps the job record so progress survives a restart.",
    "Short.",
]


def make_paragraphs(n: int, seed: int = 0) -> list[str]:
    """Mixed lengths from one sentence to far beyond the 256-token limit (some get truncated)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        k = rng.choice([1, 1, 2, 3, 5, 8, 13, 30])
        out.append(" ".join(rng.choice(SENTENCES) for _ in range(k)) + f" ({i})")
    return out


@pytest.fixture(scope="module")
def st_model(minilm_dir):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(minilm_dir), device="cpu")


@pytest.fixture(scope="module")
def paragraphs() -> list[str]:
    return make_paragraphs(32)


@pytest.fixture(scope="module")
def reference(st_model, paragraphs) -> np.ndarray:
    return st_model.encode(paragraphs, batch_size=16, convert_to_numpy=True)


@pytest.fixture(scope="module")
def fp32(minilm_fp32_artifact) -> Embedder:
    return Embedder(minilm_fp32_artifact, settings=Settings(), token_budget=1024)


@pytest.fixture(scope="module")
def int8(minilm_artifact) -> Embedder:
    return Embedder(minilm_artifact, settings=Settings(), token_budget=1024)


@pytest.fixture(scope="module")
def results(fp32, int8, paragraphs) -> dict[str, EmbedResult]:
    """Each artifact's result for the whole mixed-length batch, computed once."""
    return {"fp32": fp32.embed(paragraphs), "int8": int8.embed(paragraphs)}


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def linked_copy(src: Path, dst: Path, manifest_changes: dict | None = None) -> Path:
    """A copy of an artifact (files hard-linked, never modified) with an edited manifest."""
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.name != MANIFEST:
            try:
                os.link(f, dst / f.name)
            except OSError:
                shutil.copy2(f, dst / f.name)
    manifest = read_manifest(src)
    write_manifest(dst, dataclasses.replace(manifest, **(manifest_changes or {})))
    return dst


# --- fidelity --------------------------------------------------------------------------------


def test_fp32_artifact_matches_sentence_transformers_in_order(fp32, results, paragraphs, reference):
    result = results["fp32"]
    lengths = [c for c in result.token_counts]
    assert len(pack_batches(lengths, fp32.token_budget)) >= 4, "test must span several token-budget batches"
    assert any(result.truncated) and not all(result.truncated)
    assert result.vectors.shape == reference.shape and result.vectors.dtype == np.float32
    np.testing.assert_allclose(result.vectors, reference, atol=1e-4)
    # every row is closest to its own reference: the order was restored
    assert (np.argmax(result.vectors @ reference.T, axis=1) == np.arange(len(paragraphs))).all()


def test_int8_artifact_is_within_the_convert_gate(results, paragraphs, reference):
    result = results["int8"]
    cos = _cos(result.vectors, reference)
    assert cos.mean() >= 0.99 and cos.min() >= 0.97, (cos.mean(), cos.min())
    assert (np.argmax(result.vectors @ reference.T, axis=1) == np.arange(len(paragraphs))).all()


def test_token_counts_and_truncation_match_the_tokenizer(fp32, results, st_model, paragraphs):
    result = results["fp32"]
    features = st_model.tokenize(paragraphs)
    expected = features["attention_mask"].sum(1).tolist()
    assert result.token_counts == expected
    untruncated = fp32.tokenizer.count_tokens(paragraphs)
    assert result.truncated == [n > fp32.manifest.max_seq_length for n in untruncated]


@pytest.mark.parametrize("which", ["fp32", "int8"])
def test_batch_invariance(which, request, results, paragraphs):
    """A paragraph alone and inside a padded batch of others gets the same vector."""
    embedder: Embedder = request.getfixturevalue(which)
    in_batch = results[which].vectors
    counts = results[which].token_counts
    # short paragraphs (padded most inside their batch) and a few others
    picks = sorted(range(len(paragraphs)), key=counts.__getitem__)[:4] + [7, 19, 31]
    alone = np.stack([embedder.embed([paragraphs[i]]).vectors[0] for i in picks])
    cos = _cos(alone, in_batch[picks])
    assert cos.min() >= 0.9999, cos


def test_default_budget_keeps_each_call_under_the_mmap_threshold(minilm_fp32_artifact):
    """Why the default token budget is small (docs/design.md): with the ORT arena off, every activation of
    a call is allocated afresh for every op, and one above glibc's mmap threshold is a new mapping
    the kernel zero-fills page by page; at budget 4096 that was over half the CPU time and packed
    batches ran 3x slower than batch 1. The widest activation of a full call (budget x widest
    MatMul output x 4 bytes) must fit under the threshold."""
    import onnx

    settings = Settings()
    graph = onnx.load(str(minilm_fp32_artifact / MODEL_FILE), load_external_data=False).graph
    dims = {i.name: list(i.dims) for i in graph.initializer}
    widths = [dims[n.input[1]][1] for n in graph.node
              if n.op_type in ("MatMul", "MatMulInteger") and len(dims.get(n.input[1], [])) == 2]
    assert max(widths) == 1536  # MiniLM's feed-forward layer
    assert settings.token_budget * max(widths) * 4 <= settings.malloc_mmap_threshold
    assert Embedder(minilm_fp32_artifact, settings=settings, verify=False).token_budget == settings.token_budget


def test_budget_changes_batches_not_vectors(minilm_fp32_artifact, results, paragraphs):
    texts = [p for p, n in zip(paragraphs, results["fp32"].token_counts, strict=True) if n < 120]
    small = Embedder(minilm_fp32_artifact, settings=Settings(), token_budget=64)
    large = Embedder(minilm_fp32_artifact, settings=Settings(), token_budget=100_000)
    got_small, got_large = small.embed(texts), large.embed(texts)
    lengths = got_small.token_counts
    assert len(pack_batches(lengths, 64)) > len(pack_batches(lengths, 100_000))
    np.testing.assert_allclose(got_small.vectors, got_large.vectors, atol=2e-5)


# --- Matryoshka, prompts, dtype ----------------------------------------------------------------


@pytest.fixture(scope="module")
def prompted_artifact(minilm_fp32_artifact, tmp_path_factory) -> Path:
    """The fp32 artifact with task prompts and Matryoshka dims declared in its manifest."""
    return linked_copy(
        minilm_fp32_artifact,
        tmp_path_factory.mktemp("prompted") / "a",
        {
            "prompts": {"query": "query: ", "document": "passage: "},
            "default_prompt_name": "document",
            "matryoshka_dims": [384, 256, 64],
        },
    )


def test_prompts_and_matryoshka_match_direct_computation(prompted_artifact, st_model, results, paragraphs):
    emb = Embedder(prompted_artifact, settings=Settings(), token_budget=2048)
    shortest = sorted(range(len(paragraphs)), key=results["fp32"].token_counts.__getitem__)[:6]
    texts = [paragraphs[i] for i in shortest]
    for task, prompt in [("query", "query: "), (None, "passage: ")]:
        full = st_model.encode([prompt + t for t in texts], convert_to_numpy=True)
        for dim in (None, 256, 64):
            got = emb.embed(texts, task=task, dim=dim)
            ref = (
                full if dim is None else full[:, :dim] / np.linalg.norm(full[:, :dim], axis=1, keepdims=True)
            )
            assert got.vectors.shape == (len(texts), dim or 384)
            np.testing.assert_allclose(np.linalg.norm(got.vectors, axis=1), 1.0, rtol=1e-5)
            np.testing.assert_allclose(got.vectors, ref, atol=1e-4)
    # the prompt is really applied: query and document vectors differ, and counts include it
    q, d = emb.embed(texts[:1], task="query"), emb.embed(texts[:1], task="document")
    assert _cos(q.vectors, d.vectors)[0] < 0.999
    prompt_tokens = len(st_model.tokenizer.tokenize("query: "))
    assert prompt_tokens > 0
    assert q.token_counts[0] == len(st_model.tokenizer.tokenize(texts[0])) + 2 + prompt_tokens
    assert emb.tokenizer.count_tokens(texts[:1], task=None) == d.token_counts  # default prompt = document


def test_unknown_task_lists_known_ones(prompted_artifact, fp32):
    emb = Embedder(prompted_artifact, settings=Settings())
    with pytest.raises(EmbedRequestError, match=r"unknown task 'search'.*document, query"):
        emb.embed(["x"], task="search")
    with pytest.raises(EmbedRequestError, match="no task prompts"):
        fp32.embed(["x"], task="query")


def test_float16_output(fp32, paragraphs):
    f32 = fp32.embed(paragraphs[:4])
    f16 = fp32.embed(paragraphs[:4], dtype="float16")
    assert f16.vectors.dtype == np.float16
    np.testing.assert_allclose(f16.vectors.astype(np.float32), f32.vectors, atol=1e-3)


# --- bad input -------------------------------------------------------------------------------


def test_bad_paragraphs_get_errors_while_the_rest_embeds(minilm_fp32_artifact, st_model):
    emb = Embedder(minilm_fp32_artifact, settings=Settings(max_paragraph_bytes=100))
    good = ["first good paragraph", "second good one"]
    batch = [good[0], 42, "", "   \n", "lone \udc00 surrogate", "é" * 60, None, good[1]]
    result = emb.embed(batch)
    assert [e is None for e in result.errors] == [True, False, False, False, False, False, False, True]
    assert "not a string" in result.errors[1] and "not a string" in result.errors[6]
    assert "empty" in result.errors[2] and "empty" in result.errors[3]
    assert "surrogate" in result.errors[4]
    assert "120 bytes" in result.errors[5]
    bad_rows = result.vectors[[1, 2, 3, 4, 5, 6]]
    assert not bad_rows.any() and result.token_counts[1:7] == [0] * 6
    np.testing.assert_allclose(result.vectors[[0, 7]], st_model.encode(good), atol=1e-4)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"dim": 100}, r"dim 100 is not offered.*\[384\]"),
        ({"dim": True}, "dim True"),
        ({"dtype": "float64"}, "dtype 'float64'"),
        ({"task": 3}, "task must be a string"),
    ],
)
def test_malformed_requests_raise_one_error(fp32, kwargs, message):
    with pytest.raises(EmbedRequestError, match=message):
        fp32.embed(["fine"], **kwargs)


def test_oversize_batches_raise(minilm_fp32_artifact):
    emb = Embedder(minilm_fp32_artifact, settings=Settings(max_batch_paragraphs=3, max_batch_bytes=50))
    with pytest.raises(EmbedRequestError, match="4 paragraphs, more than the limit of 3"):
        emb.embed(["a", "b", "c", "d"])
    with pytest.raises(EmbedRequestError, match="60 bytes of text, more than the limit of 50"):
        emb.embed(["x" * 30, "y" * 30])
    with pytest.raises(EmbedRequestError, match="must be a list"):
        emb.embed("a single string")


# --- artifact refusal ------------------------------------------------------------------------


def test_tampered_or_foreign_artifacts_are_refused(minilm_artifact, tmp_path):
    tampered = tmp_path / "tampered"
    shutil.copytree(minilm_artifact, tampered)
    with open(tampered / TOKENIZER_FILE, "r+b") as fh:
        fh.seek(100)
        byte = fh.read(1)
        fh.seek(100)
        fh.write(bytes([byte[0] ^ 1]))
    with pytest.raises(ArtifactError, match=r"tokenizer\.json is corrupt"):
        Embedder(tampered, settings=Settings())

    future = tmp_path / "future"
    shutil.copytree(minilm_artifact, future)
    raw = json.loads((future / MANIFEST).read_text())
    raw["format_version"] = 2
    (future / MANIFEST).write_text(json.dumps(raw))
    with pytest.raises(ArtifactError, match="format_version 2"):
        Embedder(future, settings=Settings())

    wrong_dim = linked_copy(minilm_artifact, tmp_path / "wrongdim", {"dim": 512, "matryoshka_dims": [512]})
    with pytest.raises(ArtifactError, match=r"shape \(384,\).*dim 512"):
        Embedder(wrong_dim, settings=Settings())

    truncated = tmp_path / "truncated"
    shutil.copytree(minilm_artifact, truncated)
    with open(truncated / MODEL_FILE, "r+b") as fh:
        fh.truncate(1000)
    with pytest.raises(ArtifactError, match=r"model\.onnx is corrupt"):
        Embedder(truncated, settings=Settings())


# --- threads ---------------------------------------------------------------------------------

THREAD_PROBE = """
import sys, psutil, dataclasses
from deposium.worker.threads import pin_single_thread
pin_single_thread()
import onnxruntime
from deposium.worker import embedder
from deposium.worker.config import Settings
if sys.argv[2] != "1":  # negative control: what a multi-threaded session would look like
    original = embedder.session_options
    def wide(settings, *args):
        opts = original(settings, *args)
        opts.intra_op_num_threads = int(sys.argv[2])
        return opts
    embedder.session_options = wide
proc = psutil.Process()
before = proc.num_threads()
emb = embedder.Embedder(sys.argv[1], settings=Settings())
emb.embed(["some text to embed"] * 20 + ["a longer paragraph " * 50])
print(before, proc.num_threads())
"""


def test_session_adds_no_threads(minilm_artifact):
    """The session runs on the calling thread: creating and using it starts no thread. The
    negative control (intra_op_num_threads=3) shows the probe does see a thread pool."""
    counts = {}
    for n in ("1", "3"):
        out = subprocess.run(
            [sys.executable, "-c", THREAD_PROBE, str(minilm_artifact), n],
            capture_output=True,
            text=True,
            check=True,
        )
        before, after = map(int, out.stdout.split())
        counts[n] = after - before
    assert counts["1"] == 0
    assert counts["3"] == 2  # the control: a pool of 3 = the caller + 2 threads


def test_session_options_are_single_threaded():
    opts = session_options(Settings())
    assert (opts.intra_op_num_threads, opts.inter_op_num_threads) == (1, 1)
    import onnxruntime as ort

    assert opts.execution_mode == ort.ExecutionMode.ORT_SEQUENTIAL
    assert opts.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    assert not opts.enable_cpu_mem_arena and not opts.enable_mem_pattern
    on = session_options(Settings(ort_arena=True, ort_mem_pattern=True))
    assert on.enable_cpu_mem_arena and on.enable_mem_pattern


def test_session_leaves_out_the_slow_skip_layer_norm_fusion(tmp_path):
    """Residual Add + LayerNormalization with known shapes: ORT would fuse them into
    SkipLayerNormalization (the control shows it does), our options keep them apart."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    assert "SkipLayerNormFusion" in DISABLED_OPTIMIZERS
    hidden = ["batch", "seq", 8]
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "residual"], ["sum"]),
         helper.make_node("LayerNormalization", ["sum", "gamma", "beta"], ["y"], axis=-1, epsilon=1e-12)],
        "skip_ln",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, hidden) for n in ("x", "residual")],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, hidden)],
        initializer=[numpy_helper.from_array(np.ones(8, np.float32), "gamma"),
                     numpy_helper.from_array(np.zeros(8, np.float32), "beta")],
        value_info=[helper.make_tensor_value_info("sum", TensorProto.FLOAT, hidden)],
    )
    source = tmp_path / "skip_ln.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(source))

    def optimized_ops(opts: ort.SessionOptions, name: str) -> set[str]:
        opts.optimized_model_filepath = str(tmp_path / name)
        ort.InferenceSession(str(source), sess_options=opts, providers=["CPUExecutionProvider"])
        return {n.op_type for n in onnx.load(str(tmp_path / name)).graph.node}

    control = ort.SessionOptions()
    control.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    assert "SkipLayerNormalization" in optimized_ops(control, "control.onnx")
    assert optimized_ops(session_options(Settings()), "ours.onnx") == {"Add", "LayerNormalization"}
