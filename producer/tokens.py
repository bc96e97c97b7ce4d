"""Count tokens exactly as the worker will, without an ONNX Runtime session.

Why the producer counts tokens at all: over-long paragraphs must be split at sentence
boundaries *before* the model silently truncates them, and batches are sized by tokens so
one task costs about the same time whatever the paragraph lengths. The counting itself is
the worker's own :class:`deposium.worker.tokenize.ParagraphTokenizer`, so prompts and special tokens
are counted the way the model will see them.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from deposium.worker.tokenize import ParagraphTokenizer


class TokenCounter:
    """Tokens per text for one task (prompt and special tokens included, no truncation)."""

    def __init__(self, tokenizer: ParagraphTokenizer, *, task: str | None = None,
                 max_tokens: int | None = None) -> None:
        self._tok = tokenizer
        self.task = task
        tokenizer.prompt(task)  # unknown task: EmbedRequestError naming the known ones, up front
        limit = tokenizer.max_seq_length
        self.max_tokens = min(max_tokens, limit) if max_tokens else limit
        #: tokens of an empty text: the prompt plus special tokens, paid by every paragraph.
        self.base = self.count([""])[0]
        if self.max_tokens <= self.base:
            raise ValueError(f"max tokens {self.max_tokens} leaves no room after the prompt ({self.base})")

    @classmethod
    def from_artifact(cls, artifact_dir: Path, *, task: str | None = None,
                      max_tokens: int | None = None) -> TokenCounter:
        """A counter with its own tokenizer, for a process that holds no job plan (a reader
        process); within a job the plan's one parsed tokenizer is shared instead."""
        return cls(ParagraphTokenizer.from_artifact(Path(artifact_dir)), task=task, max_tokens=max_tokens)

    def count(self, texts: Sequence[str]) -> list[int]:
        if not texts:
            return []
        return self._tok.count_tokens(list(texts), self.task)
