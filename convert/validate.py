"""The gate every artifact passes before ``convert`` publishes it.

Why measure on paragraphs and not only STS-B: STS-B sentences are short, and quantization error
grows with length and with outlier activations; a recipe can keep STS-B within a tenth of a
point while paragraphs drift to cosine 0.97. Why through :class:`deposium.worker.embedder.Embedder`:
the gate must judge the vectors workers will actually produce (same tokenizer settings, prompt,
padding and batching), not a separate evaluation path.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

PARAGRAPHS_FILE = Path(__file__).parent / "data" / "paragraphs.jsonl"
#: Padded tokens per call when the gate embeds paragraphs together (the batch-invariance check
#: compares that with each paragraph alone).
GATE_TOKEN_BUDGET = 8192


class GateError(RuntimeError):
    """The artifact is less faithful than the thresholds allow; nothing is published."""


@dataclass
class Thresholds:
    #: Default gate for any model: above the best int8 peer measured for all-MiniLM-L6-v2
    #: (sentence-transformers' OpenVINO static int8; figures in docs/benchmarks.md).
    min_mean_cosine: float = 0.999
    #: The floor for every text: each held-out paragraph and each long input (:func:`long_inputs`).
    min_min_cosine: float = 0.995
    max_stsb_drop: float = 1.0
    min_batch_invariance: float = 0.9999


#: The production model's gate sits at its peer's measured level: llama.cpp Q8_0 on the same
#: paragraphs (figures in docs/benchmarks.md), and STS-B within 0.1 point of torch.
EMBEDDINGGEMMA_THRESHOLDS = Thresholds(min_mean_cosine=0.9995, min_min_cosine=0.999, max_stsb_drop=0.1)


def load_paragraphs(path: Path = PARAGRAPHS_FILE, limit: int | None = None) -> list[str]:
    texts = [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return texts[:limit] if limit else texts


#: (first paragraph, how many) joined into each long input: 623, 1,097 and 2,048 tokens for
#: EmbeddingGemma with its document prompt (the model's maximum; its attention window is 512), the
#: model's maximum for models with shorter limits (the Embedder and torch truncate alike).
LONG_INPUTS = ((0, 6), (10, 12), (30, 24))


def long_inputs(paragraphs: list[str]) -> list[str]:
    """Inputs far longer than a paragraph, for the gate's long-input check. Why in the gate:
    quantization error accumulates with length (a recipe faithful on paragraphs can drift well below
    the floor at 2,048 tokens), and a recipe must not be shipped on short text alone."""
    return [" ".join(paragraphs[first:first + count]) for first, count in LONG_INPUTS]


def load_stsb(path: Path) -> tuple[list[str], list[str], np.ndarray]:
    """STS-B as ``score<TAB>sentence1<TAB>sentence2``; split on tabs (unbalanced quotes inside)."""
    left, right, scores = [], [], []
    lines = path.read_text(encoding="utf-8").splitlines()
    for line in lines[1:]:
        parts = line.split("\t")
        if len(parts) != 3:
            continue
        scores.append(float(parts[0]))
        left.append(parts[1])
        right.append(parts[2])
    return left, right, np.asarray(scores)


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


def _normalize(v: np.ndarray) -> np.ndarray:
    v = v.astype(np.float64)
    return v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(_normalize(a) * _normalize(b), axis=1)


def validate_artifact(
    int8_dir: Path,
    fp32_dir: Path,
    source_dir: Path,
    *,
    thresholds: Thresholds,
    stsb_path: Path | None,
    paragraph_limit: int | None = None,
) -> dict[str, Any]:
    """Measure the artifact against torch and return the validation report (raises GateError)."""
    from sentence_transformers import SentenceTransformer

    from deposium.worker.config import Settings
    from deposium.worker.embedder import Embedder

    settings = Settings(max_batch_paragraphs=100_000, max_batch_bytes=1 << 30)
    # Batches far larger than a worker's default budget: batch dependence must show if it exists.
    quantized = Embedder(int8_dir, settings=settings, token_budget=GATE_TOKEN_BUDGET)
    reference = Embedder(fp32_dir, settings=settings, token_budget=GATE_TOKEN_BUDGET)
    torch_model = SentenceTransformer(str(source_dir), device="cpu")
    prompts = quantized.manifest.prompts
    task = "document" if "document" in prompts else None
    sts_task = "STS" if "STS" in prompts else None

    def torch_encode(texts: list[str], prompt_name: str | None) -> np.ndarray:
        return torch_model.encode(texts, prompt_name=prompt_name, batch_size=16, convert_to_numpy=True,
                                  show_progress_bar=False)

    held_out = load_paragraphs()  # read once: the gate's paragraphs and the long inputs joined from them
    paragraphs = held_out[:paragraph_limit] if paragraph_limit else held_out
    torch_vecs = torch_encode(paragraphs, task)
    fp32_vecs = reference.embed(paragraphs, task=task).vectors
    int8_result = quantized.embed(paragraphs, task=task)
    int8_vecs = int8_result.vectors
    cos = _cosines(int8_vecs, torch_vecs)
    per_dim = {}
    for d in quantized.manifest.matryoshka_dims:
        c = _cosines(int8_vecs[:, :d], torch_vecs[:, :d])
        per_dim[str(d)] = {"mean": float(c.mean()), "min": float(c.min())}
    alone = np.stack([quantized.embed([p], task=task).vectors[0] for p in paragraphs])
    invariance = _cosines(alone, int8_vecs)
    long_texts = long_inputs(held_out)
    long_torch = torch_encode(long_texts, task)
    long_int8 = quantized.embed(long_texts, task=task)
    report: dict[str, Any] = {
        "paragraphs": {
            "count": len(paragraphs),
            "source": PARAGRAPHS_FILE.name,
            "prompt": task,
            "mean_tokens": float(np.mean(int8_result.token_counts)),
            "onnx_fp32_vs_torch_max_abs": float(np.abs(fp32_vecs - torch_vecs).max()),
            "onnx_fp32_vs_torch_min_cosine": float(_cosines(fp32_vecs, torch_vecs).min()),
            "int8_vs_torch_cosine": {"mean": float(cos.mean()), "min": float(cos.min()),
                                     "p1": float(np.percentile(cos, 1))},
            "int8_vs_torch_cosine_per_dim": per_dim,
        },
        "long_inputs": {
            "tokens": long_int8.token_counts,
            "int8_vs_torch_cosine": [float(c) for c in _cosines(long_int8.vectors, long_torch)],
            "onnx_fp32_vs_torch_cosine": [float(c) for c in _cosines(reference.embed(long_texts, task=task).vectors,
                                                                     long_torch)],
        },
        "batch_invariance_min_cosine": float(invariance.min()),
        "thresholds": asdict(thresholds),
    }
    if stsb_path is not None and gate_failures(report, thresholds):
        # STS-B costs minutes on a large model; a recipe already failing on paragraphs is rejected anyway.
        report["stsb_spearman_x100"] = {"skipped": "the paragraph checks failed first"}
    elif stsb_path is not None:
        left, right, gold = load_stsb(stsb_path)
        encoders = {
            "torch_fp32": lambda t: torch_encode(t, sts_task),
            "onnx_fp32": lambda t: reference.embed(t, task=sts_task).vectors,
            "onnx_int8": lambda t: quantized.embed(t, task=sts_task).vectors,
        }
        stsb: dict[str, Any] = {"file": str(stsb_path), "pairs": len(gold), "prompt": sts_task}
        for name, encode in encoders.items():
            a, b = encode(left), encode(right)  # once per encoder; each dim is a truncation
            stsb[name] = {str(d): 100.0 * spearman(_cosines(a[:, :d], b[:, :d]), gold)
                          for d in quantized.manifest.matryoshka_dims}
        report["stsb_spearman_x100"] = stsb
    failures = gate_failures(report, thresholds)
    report["passed"] = not failures
    report["failures"] = failures
    return report


def gate_failures(report: dict[str, Any], t: Thresholds) -> list[str]:
    failures = []
    cos = report["paragraphs"]["int8_vs_torch_cosine"]
    if cos["mean"] < t.min_mean_cosine:
        failures.append(f"mean cosine vs torch {cos['mean']:.5f} < {t.min_mean_cosine}")
    if cos["min"] < t.min_min_cosine:
        failures.append(f"min cosine vs torch {cos['min']:.5f} < {t.min_min_cosine}")
    long = report.get("long_inputs")
    if long and min(long["int8_vs_torch_cosine"]) < t.min_min_cosine:
        worst = int(np.argmin(long["int8_vs_torch_cosine"]))
        failures.append(f"long input of {long['tokens'][worst]} tokens: cosine vs torch "
                        f"{long['int8_vs_torch_cosine'][worst]:.5f} < {t.min_min_cosine}")
    if report["batch_invariance_min_cosine"] < t.min_batch_invariance:
        failures.append(f"batch invariance {report['batch_invariance_min_cosine']:.6f} < {t.min_batch_invariance} "
                        "(a paragraph's vector depends on its batch)")
    stsb = report.get("stsb_spearman_x100")
    if stsb and "torch_fp32" in stsb:
        for d, ref in stsb["torch_fp32"].items():
            drop = ref - stsb["onnx_int8"][d]
            if drop > t.max_stsb_drop:
                failures.append(f"STS-B at dim {d} drops {drop:.2f} points (> {t.max_stsb_drop})")
    return failures
