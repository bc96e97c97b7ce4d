"""A full-size, random-weight EmbeddingGemma-shaped model, for timing only.

Why random weights: the real checkpoint is 1.2 GB and must never be a dependency of the
bench; its *shape* alone (Gemma3, 24 layers, hidden 768, vocab 262144, 5 sliding : 1 full
attention layers, Dense 768->3072->768) decides how long a forward pass takes. Its vectors
mean nothing, so the artifact is converted with ``validate=False``. torch, transformers and
sentence-transformers are imported inside the functions: ``import deposium.bench`` stays light.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

log = logging.getLogger(__name__)

#: EmbeddingGemma-300m's shape (google/embeddinggemma-300m config.json).
GEMMA_SHAPE: dict[str, int] = {
    "hidden_size": 768,
    "num_hidden_layers": 24,
    "vocab_size": 262144,
    "intermediate_size": 1152,
    "num_attention_heads": 3,
    "num_key_value_heads": 1,
    "head_dim": 256,
    "sliding_window": 512,
    "max_position_embeddings": 2048,
}

PROMPTS = {"query": "task: search result | query: ", "document": "title: none | text: "}


def build_gemma_shaped_source(out: Path, tokenizer_dir: Path, *, seed: int = 0, **shape: int) -> Path:
    """Save a random EmbeddingGemma-shaped sentence-transformers directory to ``out``.

    ``tokenizer_dir`` lends a tokenizer (any vocabulary smaller than the model's works: only
    the sequence length matters for timing). ``shape`` overrides :data:`GEMMA_SHAPE` so tests
    can build a small one through the same code.
    """
    import torch
    from sentence_transformers import SentenceTransformer, models
    from transformers import AutoTokenizer, Gemma3TextConfig, Gemma3TextModel

    dims = dict(GEMMA_SHAPE, **shape)
    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    layers = dims["num_hidden_layers"]
    config = Gemma3TextConfig(
        **dims,
        layer_types=["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(layers)],
        use_bidirectional_attention=True,
        pad_token_id=tokenizer.pad_token_id or 0,
        use_cache=False,
    )
    model = Gemma3TextModel(config).eval()
    raw = out.parent / (out.name + "-transformer")
    if raw.exists():
        shutil.rmtree(raw)
    model.save_pretrained(raw)
    tokenizer.save_pretrained(raw)
    hidden = dims["hidden_size"]
    transformer = models.Transformer(str(raw), max_seq_length=dims["max_position_embeddings"])
    pooling = models.Pooling(hidden, pooling_mode="mean")
    up = models.Dense(hidden, hidden * 4, bias=False, activation_function=torch.nn.Identity())
    down = models.Dense(hidden * 4, hidden, bias=False, activation_function=torch.nn.Identity())
    st = SentenceTransformer(modules=[transformer, pooling, up, down, models.Normalize()],
                             prompts=dict(PROMPTS), device="cpu")
    st.save(str(out))
    shutil.rmtree(raw)
    return out


def ensure_gemma_artifact(cache: Path, tokenizer_dir: Path, recipe: str = "int8-rot", **shape: int) -> Path:
    """Build (once, cached under ``cache``) the Gemma-shaped source and its ``recipe`` artifact.

    ``int8-rot`` by default: the recipe ``convert --recipe auto`` ships for the real
    EmbeddingGemma-300m (random weights cannot run the gate that picks it).
    """
    from deposium.convert.api import build_artifact

    tag = "gemma-shaped" + "".join(f"-{k[:3]}{v}" for k, v in sorted(shape.items()))
    source = cache / f"{tag}-source"
    artifact = cache / f"{tag}-{recipe}"
    if not (source / "modules.json").is_file():
        log.info("building random %s source in %s", tag, source)
        if source.exists():
            shutil.rmtree(source)
        build_gemma_shaped_source(source, tokenizer_dir, **shape)
    if not (artifact / "manifest.json").is_file():
        log.info("converting %s with recipe %s (validate=False: random weights)", tag, recipe)
        build_artifact(str(source), artifact, recipe=recipe, stsb=None, validate=False, force=True)
    return artifact


def text_of_tokens(embedder: object, source_text: str, tokens: int) -> str:
    """A prefix of ``source_text`` that the embedder turns into exactly ``tokens`` tokens (prompt
    and special tokens included), or the closest it can get. Why real text cut to length: timing
    at a stated length must not depend on how a tokenizer happens to split a synthetic filler."""
    from tokenizers import Tokenizer

    from deposium.worker.artifact import TOKENIZER_FILE

    raw = Tokenizer.from_file(str(embedder.artifact_dir / TOKENIZER_FILE))  # type: ignore[attr-defined]
    raw.no_truncation()
    raw.no_padding()
    offsets = raw.encode(source_text, add_special_tokens=False).offsets
    if not offsets:
        raise ValueError("source text has no tokens")
    keep = min(tokens, len(offsets))
    best = source_text
    for _ in range(8):
        text = source_text[: offsets[max(1, keep) - 1][1]]
        got = embedder.tokenizer.encode([text]).lengths[0]  # type: ignore[attr-defined]
        best = text
        if got == tokens or keep >= len(offsets) and got < tokens:
            break
        keep = max(1, min(len(offsets), keep + tokens - got))
    return best


def time_lengths(embedder: object, source_texts: list[str], lengths: tuple[int, ...] = (64, 128, 256),
                 repeats: int = 3) -> dict[int, dict[str, object]]:
    """CPU ms per paragraph at batch 1 for texts cut to each length; median over texts x repeats.

    Returns, per length: measured token count, every sample (ms), and its summary.
    """
    import time

    from deposium.bench.stats import summarize

    out: dict[int, dict[str, object]] = {}
    for n in lengths:
        texts = [text_of_tokens(embedder, t, n) for t in source_texts]
        counts = embedder.tokenizer.encode(texts).lengths  # type: ignore[attr-defined]
        embedder.embed(texts[:1])  # type: ignore[attr-defined]  # warm-up at this shape
        samples = []
        for _ in range(repeats):
            for text in texts:
                t0 = time.process_time()
                embedder.embed([text])  # type: ignore[attr-defined]
                samples.append(1000 * (time.process_time() - t0))
        s = summarize(samples)
        mean_tokens = sum(counts) / len(counts)
        out[n] = {"tokens": mean_tokens, "samples_ms": samples, "summary": s,
                  "tokens_per_s": 1000 * mean_tokens / s.median}
        log.info("gemma-shaped %d tokens: median %.0f ms, %.0f tokens/s", n, s.median, out[n]["tokens_per_s"])
    return out
