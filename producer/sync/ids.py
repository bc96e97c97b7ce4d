"""Stable paragraph ids and document text hashes for synced stores.

Why content ids: a positional ``document#index`` renames every paragraph after an insertion,
so downstream references (citations, feedback, caches keyed by row id) would break at every
edit. ``document#<text hash>`` stays put when text is inserted or removed elsewhere in the
document; only the edited paragraph gets a new id (it is a new paragraph). The k-th repeat of
the same text inside one document takes a ``~k`` suffix so ids stay unique.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence

from deposium.producer.model import Block, Paragraph

#: Hex digits of the content hash kept in an id: 64 bits, unique among any document's paragraphs.
ID_HASH_CHARS = 16


def stable_ids(paragraphs: Sequence[Paragraph]) -> list[str]:
    """``document#hash16``, with ``~2``, ``~3`` … for repeats of one text inside a document."""
    seen: dict[tuple[str, str], int] = {}
    ids = []
    for p in paragraphs:
        key = (p.document, p.hash)
        n = seen.get(key, 0) + 1
        seen[key] = n
        base = f"{p.document}#{p.hash[:ID_HASH_CHARS]}"
        ids.append(base if n == 1 else f"{base}~{n}")
    return ids


def document_hash(blocks: Iterable[Block | str], title: str | None = None) -> str:
    """sha256 of a document's extracted text and its structure (blocks in order, with their page,
    heading and kind, and the title): "unchanged" means every row would be written the same."""
    h = hashlib.sha256()
    h.update(json.dumps(title).encode())
    for block in blocks:
        if isinstance(block, str):
            block = Block(block)
        meta = [block.page, block.heading, block.is_heading, block.whole, block.char_start, block.char_end]
        h.update(json.dumps(meta).encode())
        h.update(block.text.encode("utf-8", "surrogatepass"))
        h.update(b"\0")
    return h.hexdigest()
