"""Random-weight EmbeddingGemma-layout models: full size for timing, tiny for the tests.

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

#: EmbeddingGemma-300m's task prompts (its config_sentence_transformers.json, the ones the tests check).
EMBEDDINGGEMMA_PROMPTS: dict[str, str] = {
    "query": "task: search result | query: ",
    "document": "title: none | text: ",
    "STS": "task: sentence similarity | query: ",
    "Classification": "task: classification | query: ",
}


def build_gemma_source(out: Path, tokenizer_dir: Path, *, seed: int = 0, layer_types: list[str] | None = None,
                       weight_std: float | None = None, mlp_outliers: float = 1.0, max_seq_length: int | None = None,
                       **shape: int) -> Path:
    """Save a random-weight EmbeddingGemma-layout sentence-transformers directory to ``out``; return it.

    The one builder for the bench's full-size model and the tests' tiny one: Gemma3 with
    bidirectional attention and a sliding window, mean pooling, Dense up (x4), Dense down,
    Normalize, EmbeddingGemma's task prompts. ``tokenizer_dir`` lends a real tokenizer (its
    vocabulary sets ``vocab_size`` unless ``shape`` does). ``shape`` overrides :data:`GEMMA_SHAPE`;
    ``layer_types`` defaults to EmbeddingGemma's five sliding layers to one full one.
    ``weight_std`` redraws every matrix from N(0, std) (a tiny model's default init is too small
    for its activations to matter); ``mlp_outliers`` > 1 scales two intermediate channels of
    every MLP by that factor (rows of ``up_proj``), so the down-projection inputs carry outlier
    channels like real EmbeddingGemma's while the weights stay ordinary.
    """
    import torch
    from sentence_transformers import SentenceTransformer, models
    from transformers import AutoTokenizer, Gemma3TextConfig, Gemma3TextModel

    dims = dict(GEMMA_SHAPE, **shape)
    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    layers = dims["num_hidden_layers"]
    if layer_types is None:
        layer_types = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(layers)]
    config = Gemma3TextConfig(
        **dims,
        layer_types=layer_types,
        use_bidirectional_attention=True,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0,
        use_cache=False,
    )
    model = Gemma3TextModel(config).eval()
    with torch.no_grad():
        if weight_std is not None:
            for p in model.parameters():
                if p.dim() > 1:
                    p.normal_(0, weight_std)
        if mlp_outliers != 1.0:
            for layer in model.layers:
                layer.mlp.up_proj.weight[:2] *= mlp_outliers
    raw = out.parent / (out.name + "-transformer")
    if raw.exists():
        shutil.rmtree(raw)
    model.save_pretrained(raw)
    tokenizer.save_pretrained(raw)
    hidden = dims["hidden_size"]
    transformer = models.Transformer(str(raw), max_seq_length=max_seq_length or dims["max_position_embeddings"])
    pooling = models.Pooling(hidden, pooling_mode="mean")
    up = models.Dense(hidden, hidden * 4, bias=False, activation_function=torch.nn.Identity())
    down = models.Dense(hidden * 4, hidden, bias=False, activation_function=torch.nn.Identity())
    st = SentenceTransformer(modules=[transformer, pooling, up, down, models.Normalize()],
                             prompts=dict(EMBEDDINGGEMMA_PROMPTS), device="cpu")
    st.save(str(out))
    shutil.rmtree(raw)
    return out


def build_gemma_shaped_source(out: Path, tokenizer_dir: Path, *, seed: int = 0, **shape: int) -> Path:
    """The full-size random EmbeddingGemma-shaped model (timing only). ``tokenizer_dir`` lends a
    tokenizer (any vocabulary smaller than the model's works: only the sequence length matters
    for timing); ``shape`` overrides :data:`GEMMA_SHAPE` so tests can build a small one."""
    return build_gemma_source(out, tokenizer_dir, seed=seed, **shape)


def build_tiny_gemma(out: Path, tokenizer_dir: Path, *, hidden: int = 64, layers: int = 2,
                     sliding_window: int = 8, seed: int = 0, mlp_outliers: float = 1.0) -> Path:
    """A tiny EmbeddingGemma-layout model that converts in seconds (the tests' model).

    The sliding window is shorter than the test sequences and the last layer is the only full one,
    so a conversion that lost the window or the bidirectional mask produces different vectors.
    Weights are redrawn from N(0, 0.2) so activations are large enough to matter.
    """
    from transformers import AutoTokenizer

    vocab = AutoTokenizer.from_pretrained(str(tokenizer_dir)).vocab_size
    return build_gemma_source(
        out, tokenizer_dir, seed=seed, weight_std=0.2, mlp_outliers=mlp_outliers, max_seq_length=256,
        layer_types=["sliding_attention"] * (layers - 1) + ["full_attention"],
        vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
        num_attention_heads=2, num_key_value_heads=1, head_dim=hidden // 2, max_position_embeddings=512,
        sliding_window=sliding_window)


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
