"""Build a tiny random-weight EmbeddingGemma-shaped sentence-transformers model in a directory.

Same module layout as google/embeddinggemma-300m (Gemma3 with bidirectional attention and a
sliding window, mean pooling, Dense up, Dense down, Normalize, task prompts), but small enough
to convert in seconds. The sliding window is shorter than the test sequences, so a conversion
that lost the window or the bidirectional mask produces different vectors.
"""

from __future__ import annotations

import shutil
from pathlib import Path

EMBEDDINGGEMMA_PROMPTS = {
    "query": "task: search result | query: ",
    "document": "title: none | text: ",
    "STS": "task: sentence similarity | query: ",
    "Classification": "task: classification | query: ",
}


def build_tiny_gemma(out: Path, tokenizer_dir: Path, *, hidden: int = 64, layers: int = 2,
                     sliding_window: int = 8, seed: int = 0, mlp_outliers: float = 1.0) -> Path:
    """Save the model to ``out`` and return it. ``tokenizer_dir`` lends a real tokenizer.

    ``mlp_outliers`` > 1 scales two intermediate channels of every MLP by that factor (rows of
    ``up_proj``), so the down-projection inputs carry outlier channels like real EmbeddingGemma's
    (45-230x their RMS) while the weights stay ordinary.
    """
    import torch
    from sentence_transformers import SentenceTransformer, models
    from transformers import AutoTokenizer, Gemma3TextConfig, Gemma3TextModel

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    config = Gemma3TextConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=hidden // 2,
        max_position_embeddings=512,
        sliding_window=sliding_window,
        layer_types=["sliding_attention"] * (layers - 1) + ["full_attention"],
        use_bidirectional_attention=True,
        pad_token_id=tokenizer.pad_token_id,
        use_cache=False,
    )
    model = Gemma3TextModel(config).eval()
    with torch.no_grad():  # random init is tiny; make activations large enough to matter
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.2)
        for layer in model.layers:
            layer.mlp.up_proj.weight[:2] *= mlp_outliers
    raw = out.parent / (out.name + "-transformer")
    if raw.exists():
        shutil.rmtree(raw)
    model.save_pretrained(raw)
    tokenizer.save_pretrained(raw)
    transformer = models.Transformer(str(raw), max_seq_length=256)
    pooling = models.Pooling(hidden, pooling_mode="mean")
    up = models.Dense(hidden, hidden * 4, bias=False, activation_function=torch.nn.Identity())
    down = models.Dense(hidden * 4, hidden, bias=False, activation_function=torch.nn.Identity())
    st = SentenceTransformer(modules=[transformer, pooling, up, down, models.Normalize()],
                             prompts=dict(EMBEDDINGGEMMA_PROMPTS), device="cpu")
    st.save(str(out))
    shutil.rmtree(raw)
    return out
