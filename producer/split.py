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
from dataclasses import dataclass

from deposium.producer.model import Block, Paragraph, content_hash
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


@dataclass(frozen=True)
class _Piece:
    text: str
    tokens: int
    start: int | None
    end: int | None
    page: int | None
    heading: str | None
    is_heading: bool


def _spans(block: Block, pieces: list[tuple[str, int]]) -> list[_Piece]:
    """Give each piece cut from ``block`` its span: found word by word, in order, in the block."""
    if len(pieces) == 1 or block.char_start is None:
        start, end = block.char_start, block.char_end
        return [_Piece(t, n, start if len(pieces) == 1 else None, end if len(pieces) == 1 else None,
                       block.page, block.heading, block.is_heading) for t, n in pieces]
    out = []
    cursor = 0
    for text, n in pieces:
        first = None
        for word in text.split():
            at = block.text.find(word, cursor)
            if at < 0:
                continue
            first = at if first is None else first
            cursor = at + len(word)
        lo = block.char_start + (first if first is not None else cursor)
        out.append(_Piece(text, n, lo, block.char_start + cursor, block.page, block.heading, block.is_heading))
    return out


def _merge(a: _Piece, b: _Piece, counter: TokenCounter, *, heading_from: _Piece) -> _Piece | None:
    """``a`` then ``b`` as one piece, or None when the result would not fit the window."""
    merged = f"{a.text}\n\n{b.text}"
    n = counter.count([merged])[0]
    if n > counter.max_tokens:
        return None
    start = a.start if a.start is not None and b.start is not None else None
    end = b.end if start is not None else None
    return _Piece(merged, n, start, end, a.page if a.page is not None else b.page, heading_from.heading, False)


def _within(piece: _Piece, carry: _Piece) -> bool:
    """``piece`` belongs to ``carry``'s section (same heading path, or a subsection of it)."""
    if piece.heading == carry.heading:
        return True
    return carry.heading is not None and (piece.heading or "").startswith(carry.heading + " > ")


def _may_close(prev: _Piece, carry: _Piece) -> bool:
    """A fragment may join the previous paragraph only in its own section, and never a heading."""
    return not carry.is_heading and prev.heading == carry.heading


def split_blocks(document: str, blocks: Iterable[Block | str], counter: TokenCounter,
                 *, min_chars: int = 20, title: str | None = None) -> Iterator[Paragraph]:
    """Yield the document's paragraphs with consecutive indices from 0, with their provenance.

    A fragment shorter than ``min_chars`` characters (a heading, a lone "Note:") is merged
    into the next paragraph, or into the previous one at the end of the document, when the
    result still fits the window. A fragment joins the next paragraph only within its section
    (or a subsection of it), and a heading never joins the previous section's paragraph.
    """
    index = 0
    prev: _Piece | None = None
    carry: _Piece | None = None

    def emit(piece: _Piece) -> Paragraph:
        nonlocal index
        p = Paragraph(document=document, index=index, text=piece.text, tokens=piece.tokens,
                      hash=content_hash(piece.text), page=piece.page, heading=piece.heading,
                      char_start=piece.start, char_end=piece.end, title=title)
        index += 1
        return p

    for raw in blocks:
        block = raw if isinstance(raw, Block) else Block(text=raw)
        for piece in _spans(block, fit(block.text, counter)):
            if carry is not None:
                merged = _merge(carry, piece, counter, heading_from=piece) if _within(piece, carry) else None
                if merged is not None:
                    piece = merged
                else:
                    back = None
                    if prev is not None and _may_close(prev, carry) and carry.heading != piece.heading:
                        back = _merge(prev, carry, counter, heading_from=prev)
                    if back is not None:
                        prev = back
                    else:
                        if prev is not None:
                            yield emit(prev)
                        prev = carry
                carry = None
            if len(piece.text) < min_chars:
                carry = piece
                continue
            if prev is not None:
                yield emit(prev)
            prev = piece
    if carry is not None:
        if prev is not None and _may_close(prev, carry):
            merged = _merge(prev, carry, counter, heading_from=prev)
            if merged is not None:
                prev, carry = merged, None
        if carry is not None:
            if prev is not None:
                yield emit(prev)
            prev = carry
    if prev is not None:
        yield emit(prev)
