"""Errors shared by the tokenizer, the Embedder and the wire format.

Why a module of its own: the producer validates requests with the tokenizer alone
(no ONNX Runtime session) and must see the same exception type the worker raises.
"""

from __future__ import annotations


class EmbedRequestError(ValueError):
    """A malformed request as a whole: unknown task, bad dim or dtype, too many paragraphs
    or bytes in one batch. Per-paragraph problems are *not* this: they are reported in
    ``EmbedResult.errors`` while the rest of the batch still embeds."""
