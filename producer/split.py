"""Documents → paragraphs: blank-line blocks, over-long ones cut at sentences, tiny ones merged.

Why here and not in the worker: the paragraph is the unit of identity (``document#index``),
of deduplication and of output rows, so it must be fixed before anything is sent; and a
paragraph longer than the model's window would otherwise be truncated without notice.
The result depends only on the text, the tokenizer and the options, so a resumed job
produces the very same paragraphs.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator

from deposium.producer.model import Paragraph, content_hash
from deposium.producer.tokens import TokenCounter

_SENTENCE_END = re.compile(r"(?<=[.!?。！？])\s+|\n+")
_WORD = re.compile(r"\s+")


def _pack(parts: list[str], sep: str, counter: TokenCounter) -> list[tuple[str, int]]:
    """Greedily join ``parts`` into chunks that fit ``counter.max_tokens``."""
    counts = counter.count(parts)
    limit = counter.max_tokens
    chunks: list[tuple[str, int]] = []
    cur: list[str] = []
    cur_tokens = counter.base
    for part, n in zip(parts, counts, strict=True):
        content = n - counter.base
        if cur and cur_tokens + content > limit:
            chunks.append((sep.join(cur), cur_tokens))
            cur, cur_tokens = [], counter.base
        cur.append(part)
        cur_tokens += content
    if cur:
        chunks.append((sep.join(cur), cur_tokens))
    # the sum of parts approximates the joined count; recount and report the exact value
    exact = counter.count([c for c, _ in chunks])
    return [(c, n) for (c, _), n in zip(chunks, exact, strict=True)]


def fit(block: str, counter: TokenCounter, tokens: int | None = None) -> list[tuple[str, int]]:
    """Cut ``block`` into pieces of at most ``max_tokens`` tokens, at sentences, else at words.

    A single word longer than the window stays whole (the worker truncates it and says so).
    """
    if tokens is None:
        tokens = counter.count([block])[0]
    if tokens <= counter.max_tokens:
        return [(block, tokens)]
    sentences = [s for s in _SENTENCE_END.split(block) if s.strip()]
    if len(sentences) <= 1:
        words = [w for w in _WORD.split(block) if w]
        if len(words) <= 1:
            return [(block, tokens)]
        return _pack(words, " ", counter)
    out: list[tuple[str, int]] = []
    for chunk, n in _pack(sentences, " ", counter):
        out.extend(fit(chunk, counter, n) if n > counter.max_tokens else [(chunk, n)])
    return out


def split_blocks(document: str, blocks: Iterable[str], counter: TokenCounter,
                 *, min_chars: int = 20) -> Iterator[Paragraph]:
    """Yield the document's paragraphs with consecutive indices from 0.

    A fragment shorter than ``min_chars`` characters (a heading, a lone "Note:") is merged
    into the next paragraph, or into the previous one at the end of the document, when the
    result still fits the window.
    """
    index = 0
    prev: tuple[str, int] | None = None
    carry: tuple[str, int] | None = None

    def emit(piece: tuple[str, int]) -> Paragraph:
        nonlocal index
        p = Paragraph(document=document, index=index, text=piece[0], tokens=piece[1],
                      hash=content_hash(piece[0]))
        index += 1
        return p

    for block in blocks:
        for piece in fit(block, counter):
            if carry is not None:
                merged = f"{carry[0]}\n\n{piece[0]}"
                n = counter.count([merged])[0]
                if n <= counter.max_tokens:
                    piece = (merged, n)
                else:
                    if prev is not None:
                        yield emit(prev)
                    prev = carry
                carry = None
            if len(piece[0]) < min_chars:
                carry = piece
                continue
            if prev is not None:
                yield emit(prev)
            prev = piece
    if carry is not None:
        if prev is not None:
            merged = f"{prev[0]}\n\n{carry[0]}"
            n = counter.count([merged])[0]
            if n <= counter.max_tokens:
                prev, carry = (merged, n), None
        if carry is not None:
            if prev is not None:
                yield emit(prev)
            prev = carry
    if prev is not None:
        yield emit(prev)
