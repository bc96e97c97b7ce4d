"""Tokenizer wrapper built from an artifact's ``tokenizer.json`` and manifest.

Why separate from the Embedder: the producer counts tokens (to split over-long
paragraphs before they are silently truncated) without loading ONNX Runtime.
Prompts and truncation must be applied exactly as the worker applies them, so both
sides use this one class.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from deposium.worker.threads import pin_single_thread

pin_single_thread()  # before tokenizers can size its Rayon pool

from tokenizers import Encoding, Tokenizer  # noqa: E402

from deposium.worker.artifact import TOKENIZER_FILE, ArtifactError, Manifest, read_manifest  # noqa: E402
from deposium.worker.errors import EmbedRequestError  # noqa: E402
from deposium.worker.memory import release_free_heap  # noqa: E402

#: The task a job of documents embeds with when it names none: the prompt sentence-transformers'
#: ``encode_document`` uses (EmbeddingGemma: ``title: none | text: ``).
DOCUMENT_TASK = "document"
#: A task that asks for no prompt at all, even from a model that defines a document prompt.
NO_PROMPT = ""


def ingestion_task(requested: str | None, prompts: Mapping[str, str]) -> str | None:
    """The task an ingestion job embeds with: the one it names, else the model's document prompt.

    Why a default at all: a model with a document prompt was trained to see it before the texts
    a search retrieves, and a job that forgot ``--task`` would otherwise store, silently and for
    good, vectors made without it. Models without one (MiniLM) keep ``None``: their default.
    """
    if requested is not None:
        return requested
    return DOCUMENT_TASK if DOCUMENT_TASK in prompts else None


def _parse(tokenizer_file: Path) -> Tokenizer:
    try:
        tokenizer = Tokenizer.from_file(str(tokenizer_file))
    except Exception as exc:  # tokenizers raises a bare Exception on bad JSON
        raise ArtifactError(f"{tokenizer_file} is not a valid tokenizers file: {exc}") from None
    release_free_heap()  # the parse's garbage (worker/memory.py)
    return tokenizer


@dataclass(frozen=True)
class Tokenized:
    """Token ids per paragraph, ready for the model (prompt included, truncated)."""

    ids: list[list[int]]
    type_ids: list[list[int]]
    truncated: list[bool]

    @property
    def lengths(self) -> list[int]:
        return [len(row) for row in self.ids]


class ParagraphTokenizer:
    """Tokenize paragraphs the way the artifact's model expects: prompt, special tokens, truncation.

    Padding is off (the Embedder pads per packed batch to that batch's longest row, so
    short paragraphs never pay for long ones); truncation is at the manifest's
    ``max_seq_length`` and reported per paragraph.
    """

    def __init__(
        self,
        tokenizer_file: Path,
        *,
        max_seq_length: int,
        prompts: dict[str, str] | None = None,
        default_prompt_name: str | None = None,
    ) -> None:
        self.max_seq_length = max_seq_length
        self._tokenizer: Tokenizer = _parse(tokenizer_file)  # a broken file fails here, at load
        self._tokenizer.no_padding()
        self._tokenizer.no_truncation()
        self._truncates = False
        self.prompts: dict[str, str] = dict(prompts or {})
        if default_prompt_name is not None and default_prompt_name not in self.prompts:
            raise ArtifactError(f"default prompt {default_prompt_name!r} is not among the prompts")
        self.default_prompt_name = default_prompt_name

    def _configured(self, *, truncate: bool) -> Tokenizer:
        """The one parsed tokenizer, set to truncate (``encode``) or not (``count_tokens``).

        Why one parse switched between the two modes rather than two copies: a copy of a large
        vocabulary (EmbeddingGemma's) is a large share of a producer's memory, and the producer's
        local mode both counts and encodes with the same tokenizer. Switching
        only sets truncation parameters; a worker (encode only) or a queue-mode producer (count
        only) never switches after its first call.
        """
        if self._truncates != truncate:
            if truncate:
                self._tokenizer.enable_truncation(max_length=self.max_seq_length)
            else:
                self._tokenizer.no_truncation()
            self._truncates = truncate
        return self._tokenizer

    @classmethod
    def from_artifact(cls, artifact_dir: Path, manifest: Manifest | None = None) -> ParagraphTokenizer:
        """Build from an artifact directory (reads, but does not hash, the manifest if not given)."""
        artifact_dir = Path(artifact_dir)
        manifest = manifest or read_manifest(artifact_dir)
        return cls(
            artifact_dir / TOKENIZER_FILE,
            max_seq_length=manifest.max_seq_length,
            prompts=manifest.prompts,
            default_prompt_name=manifest.default_prompt_name,
        )

    def prompt(self, task: str | None) -> str:
        """The text prepended for ``task`` ('' for none). ``None`` means the model's default prompt,
        as sentence-transformers does, ``NO_PROMPT`` none at all; an unknown name is a request error
        listing the known ones."""
        if task == NO_PROMPT:
            return ""
        if task is None:
            return self.prompts[self.default_prompt_name] if self.default_prompt_name else ""
        try:
            return self.prompts[task]
        except (KeyError, TypeError):
            known = ", ".join(sorted(self.prompts)) or "none (this model has no task prompts)"
            raise EmbedRequestError(f"unknown task {task!r}; known tasks: {known}") from None

    def encode(self, texts: Sequence[str], task: str | None = None) -> Tokenized:
        """Tokenize ``texts`` (all must be valid strings) with the task prompt, truncating."""
        prefix = self.prompt(task)
        inputs = [prefix + t for t in texts] if prefix else list(texts)
        encodings: list[Encoding] = self._configured(truncate=True).encode_batch(inputs)
        return Tokenized(
            ids=[e.ids for e in encodings],
            type_ids=[e.type_ids for e in encodings],
            truncated=[bool(e.overflowing) for e in encodings],
        )

    def count_tokens(self, texts: Sequence[str], task: str | None = None) -> list[int]:
        """Tokens each text would need *without* truncation (prompt and special tokens included),
        so a caller can split a paragraph longer than ``max_seq_length`` instead of losing its tail."""
        prefix = self.prompt(task)
        inputs = [prefix + t for t in texts] if prefix else list(texts)
        return [len(e.ids) for e in self._configured(truncate=False).encode_batch(inputs)]
