"""The tests' tiny EmbeddingGemma-layout model: :mod:`deposium.bench.gemma` (one builder for tests and bench)."""

from deposium.bench.gemma import EMBEDDINGGEMMA_PROMPTS, build_tiny_gemma

__all__ = ["EMBEDDINGGEMMA_PROMPTS", "build_tiny_gemma"]
