"""Opt-in checks on the real EmbeddingGemma-300m weights (1.2 GB; never in CI).

Enable with ``DEPOSIUM_GEMMA_DIR=$(../shared/tools/fetch-embeddinggemma) pytest -m gemma_real``.
Set ``DEPOSIUM_GEMMA_ARTIFACT`` to reuse an artifact converted earlier (it is built once,
with the shipped recipe and the model's own strict gate, otherwise).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from deposium.convert.validate import load_paragraphs, long_inputs
from deposium.worker.artifact import load_manifest
from deposium.worker.config import Settings

GEMMA_DIR = os.environ.get("DEPOSIUM_GEMMA_DIR")

pytestmark = [
    pytest.mark.gemma_real,
    # The suite's 900 s per test cannot hold the first test here: it converts the real model with the
    # full gate (torch on 160 paragraphs, STS-B at four dims, 2,048-token inputs), 22.6 min alone on an
    # AVX2-only AMD EPYC Zen 3, where the module timed out without a prebuilt DEPOSIUM_GEMMA_ARTIFACT.
    pytest.mark.timeout(3 * 3600),
    pytest.mark.skipif(not GEMMA_DIR, reason="opt-in: set DEPOSIUM_GEMMA_DIR to the real EmbeddingGemma-300m "
                       "directory (../shared/tools/fetch-embeddinggemma prints it)"),
]

BIG = Settings(max_batch_paragraphs=10_000, max_batch_bytes=1 << 28)


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


@pytest.fixture(scope="module")
def gemma_st():
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(GEMMA_DIR, device="cpu")


@pytest.fixture(scope="module")
def gemma_artifact(tmp_path_factory) -> Path:
    reuse = os.environ.get("DEPOSIUM_GEMMA_ARTIFACT")
    if reuse and (Path(reuse) / "manifest.json").is_file():
        return Path(reuse)
    from deposium.convert.api import build_artifact

    out = Path(reuse) if reuse else tmp_path_factory.mktemp("gemma") / "artifact"
    return build_artifact(GEMMA_DIR, out, force=True)


def test_gate_passed_with_the_models_strict_thresholds(gemma_artifact):
    report = json.loads((gemma_artifact / "validation.json").read_text())
    assert report["passed"], report["failures"]
    assert report["thresholds"]["min_mean_cosine"] >= 0.9995 and report["thresholds"]["min_min_cosine"] >= 0.999
    # auto: int8-fused where the fused kernels are built (always, with scripts/setup.sh), int8-rot otherwise
    assert report["recipe"]["recipe"] == "int8-fused"
    # 8-bit activations: CPUs whose u8 x s8 kernel saturates run it through u8 x u8 (deposium.worker.variant)
    assert report["recipe"]["activation_bits"] == 8
    assert report["rejected_recipes"] == []
    assert report["thresholds"]["max_stsb_drop"] <= 0.1
    stsb = report["stsb_spearman_x100"]
    for dim in ("768", "512", "256", "128"):
        assert stsb["torch_fp32"][dim] - stsb["onnx_int8"][dim] <= 0.1
    assert report["batch_invariance_min_cosine"] >= 0.9999
    long = report["long_inputs"]  # beyond the 512-token window, up to the 2048 maximum
    assert long["tokens"] == [623, 1097, 2048] and min(long["int8_vs_torch_cosine"]) >= 0.999


def test_prompts_come_from_the_models_config(gemma_artifact, gemma_st):
    from deposium.worker.embedder import Embedder

    manifest = load_manifest(gemma_artifact)
    assert manifest.prompts == gemma_st.prompts
    assert manifest.matryoshka_dims == [768, 512, 256, 128]
    queries = ["which planet is the largest?", "how do I reset my password"]
    ours = Embedder(gemma_artifact, settings=BIG).embed(queries, task="query").vectors
    ref = gemma_st.encode(queries, prompt_name="query", convert_to_numpy=True, show_progress_bar=False)
    assert _cos(ours, ref).min() >= 0.998


def test_sequences_beyond_the_sliding_window_match_torch(gemma_artifact, gemma_st, tmp_path):
    """Inputs of 623-2048 tokens (the window is 512): the fp32 export must match torch exactly
    (a lost window drifts to cosine 0.887-0.986, NOTES.md), the shipped int8 artifact to 0.999
    (the value projections' weight residual pass is what gets inputs beyond 1,000 tokens there)."""
    from deposium.convert.api import build_artifact
    from deposium.worker.embedder import Embedder

    long_texts = long_inputs(load_paragraphs())
    ref = gemma_st.encode(long_texts, prompt_name="document", convert_to_numpy=True, show_progress_bar=False)
    fp32 = build_artifact(GEMMA_DIR, tmp_path / "fp32", recipe="fp32", validate=False)
    for artifact, floor in ((fp32, 0.9999), (gemma_artifact, 0.999)):
        ours = Embedder(artifact, settings=BIG).embed(long_texts, task="document")
        assert max(ours.token_counts) == 2048 and min(ours.token_counts) > 512
        assert _cos(ours.vectors, ref).min() >= floor, (artifact.name, _cos(ours.vectors, ref))


def test_a_queued_job_stores_what_torch_computes(gemma_artifact, gemma_st, redis_server, tmp_path):
    """The real model on the path users run: ``deposium-submit`` -> Redis -> two Celery prefork
    processes -> Parquet. Every paragraph lands once, its stored vector is the in-process Embedder's
    for that paragraph alone (whatever batch and process it went through) and llama.cpp-grade
    against torch: the gate's figures hold for what is stored, not only for the gate's own calls."""
    import pyarrow.parquet as pq

    from deposium.worker.embedder import Embedder
    from tests.procs import Worker, exactly_once, producer_env, run_submit, write_jsonl

    paragraphs = load_paragraphs()
    corpus = write_jsonl(tmp_path / "job.jsonl", paragraphs)
    out = tmp_path / "out.parquet"
    env = producer_env(tmp_path, gemma_artifact, redis_server.url)
    with Worker(redis_server.url, gemma_artifact, tmp_path / "worker.log", concurrency=2) as worker:
        # no --task: a job takes the model's document prompt. ~1,000 tokens per task: ~20 batches of
        # varied make-up, shared by both processes
        code, summary, stderr = run_submit([str(corpus), "--out", str(out), "--batch-tokens", "1024"], env,
                                           tmp_path, timeout=3600)
        succeeded = [line for line in worker.text().splitlines() if "succeeded" in line]
    assert code == 0, stderr[-3000:]
    table = pq.read_table(out).to_pylist()
    rows, duplicated, missing = exactly_once(out, {row["id"] for row in table})
    assert (rows, duplicated, missing) == (summary["embedded"], 0, set())
    assert summary["failed_paragraphs"] == summary["batches_failed"] == 0
    assert rows >= len(paragraphs), rows  # a record may split into paragraphs, never merge
    assert summary["batches"] >= 10 and len(succeeded) == summary["batches_sent"] == summary["batches"]
    assert len({line.split("ForkPoolWorker-")[1].split("]")[0] for line in succeeded}) == 2

    texts = [row["text"] for row in table]
    stored = np.array([row["embedding"] for row in table], dtype=np.float32)
    embedder = Embedder(gemma_artifact, settings=BIG)
    alone = np.concatenate([embedder.embed([t], task="document").vectors for t in texts])
    vs_alone = _cos(stored, alone).min()
    assert vs_alone >= 0.9999
    ref = gemma_st.encode(texts, prompt_name="document", convert_to_numpy=True, show_progress_bar=False)
    vs_torch = _cos(stored, ref)
    print(f"\n{rows} paragraphs, {summary['batches']} batches: stored vs alone min {vs_alone:.6f}, "
          f"vs torch mean {vs_torch.mean():.5f} min {vs_torch.min():.5f}")
    assert vs_torch.mean() >= 0.999 and vs_torch.min() >= 0.998, (vs_torch.mean(), vs_torch.min())
