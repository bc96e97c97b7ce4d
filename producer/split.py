"""Documents → paragraphs (blocks, over-long ones cut at sentences, tiny ones merged), or
token-counted chunks with overlap (``--chunk-tokens``), each carrying its provenance.

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


class _Window:
    """A :class:`TokenCounter` seen through a smaller window (the chunk size), for :func:`fit`."""

    def __init__(self, counter: TokenCounter, max_tokens: int) -> None:
        self._counter = counter
        self.base = counter.base
        self.max_tokens = max(min(max_tokens, counter.max_tokens), counter.base + 1)

    def count(self, texts: list[str]) -> list[int]:
        return self._counter.count(texts)


@dataclass(frozen=True)
class _Unit:
    """A sentence (or a whole code block / table) of one block, with its span and block number."""

    text: str
    tokens: int  # content tokens (without the prompt and special tokens)
    start: int | None
    end: int | None
    block: int
    page: int | None


def _units(block: Block, number: int, window: _Window) -> list[_Unit]:
    if block.whole:
        texts = [t for t, _ in fit(block.text, window)]
    else:
        texts = [t for t in _SENTENCE_END.split(block.text) if t.strip()]
        texts = [piece for t in texts for piece, _ in fit(t.strip(), window)]
    counts = window.count(texts)
    pieces = _spans(block, list(zip(texts, counts, strict=True)))
    return [_Unit(p.text, n - window.base, p.start, p.end, number, block.page)
            for p, n in zip(pieces, counts, strict=True)]


def _sections(blocks: Iterable[Block]) -> Iterator[list[tuple[int, Block]]]:
    """Consecutive blocks under one heading path; a heading block always opens a new section."""
    section: list[tuple[int, Block]] = []
    for number, block in enumerate(blocks):
        if section and (block.is_heading or block.heading != section[-1][1].heading):
            yield section
            section = []
        section.append((number, block))
    if section:
        yield section


def chunk_blocks(document: str, blocks: Iterable[Block | str], counter: TokenCounter, *, chunk_tokens: int,
                 overlap: int = 0, title: str | None = None) -> Iterator[Paragraph]:
    """Token-counted chunks of at most ``chunk_tokens`` tokens, cut at sentences, never across a heading.

    Each chunk after the first of a section starts with the last sentences of the previous one,
    up to ``overlap`` tokens, so a fact cut at a boundary is still whole in one chunk. Code
    blocks and tables (``Block.whole``) are one unit: cut only when longer than a chunk.
    """
    window = _Window(counter, chunk_tokens)
    limit = window.max_tokens - window.base
    index = 0
    as_blocks = (b if isinstance(b, Block) else Block(text=b) for b in blocks)
    for section in _sections(as_blocks):
        units = [u for number, block in section for u in _units(block, number, window)]
        chunk: list[_Unit] = []
        fresh = 0  # units of ``chunk`` not carried over from the previous chunk
        for unit in units:
            if chunk and fresh and sum(u.tokens for u in chunk) + unit.tokens > limit:
                yield _chunk(document, index, chunk, counter, section[0][1].heading, title)
                index += 1
                carried: list[_Unit] = []
                for u in reversed(chunk):
                    if sum(c.tokens for c in carried) + u.tokens > overlap:
                        break
                    carried.insert(0, u)
                while carried and sum(c.tokens for c in carried) + unit.tokens > limit:
                    carried.pop(0)
                chunk, fresh = carried, 0
            chunk.append(unit)
            fresh += 1
        if chunk:
            yield _chunk(document, index, chunk, counter, section[0][1].heading, title)
            index += 1


def _chunk(document: str, index: int, units: list[_Unit], counter: TokenCounter, heading: str | None,
           title: str | None) -> Paragraph:
    parts = [units[0].text]
    for prev, unit in zip(units, units[1:], strict=False):
        parts.append((" " if unit.block == prev.block else "\n\n") + unit.text)
    text = "".join(parts)
    spans = units[0].start is not None and units[-1].end is not None
    return Paragraph(document=document, index=index, text=text, tokens=counter.count([text])[0],
                     hash=content_hash(text), page=units[0].page, heading=heading,
                     char_start=units[0].start if spans else None, char_end=units[-1].end if spans else None,
                     title=title)


def split_document(document: str, blocks: Iterable[Block | str], counter: TokenCounter, *, min_chars: int = 20,
                   chunk_tokens: int = 0, chunk_overlap: int = 0, title: str | None = None) -> Iterator[Paragraph]:
    """The job's units for one document: token chunks when ``chunk_tokens`` is set, else paragraphs.

    The one entry point the runner and the reader processes share, so both split alike.
    """
    if chunk_tokens:
        return chunk_blocks(document, blocks, counter, chunk_tokens=chunk_tokens, overlap=chunk_overlap,
                            title=title)
    return split_blocks(document, blocks, counter, min_chars=min_chars, title=title)
