"""Paragraph stream → deterministic batches, with identical paragraphs embedded once per job.

Why deterministic: a resumed job must form exactly the batches of the first run so the
sink's "done" marks (batch ids) still mean the same rows. Batches therefore depend only
on the paragraph order and the limits, never on timing or on which batches are done.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from deposium.producer.model import Batch, Paragraph


@dataclass(frozen=True)
class Limits:
    """How big one task may be. ``tokens`` counts the distinct texts it embeds."""

    tokens: int = 8192
    paragraphs: int = 512
    nbytes: int = 8 * 1024 * 1024

    @property
    def rows(self) -> int:
        """Rows per batch including aliases (bounds memory when a corpus repeats itself)."""
        return self.paragraphs * 4


def batch_id(seq: int, prefix: str = "") -> str:
    return f"{prefix}b{seq:07d}"


def make_batches(paragraphs: Iterable[Paragraph], limits: Limits, prefix: str = "") -> Iterator[Batch]:
    """Group paragraphs in input order; a batch closes before it would exceed a limit.

    ``prefix`` starts every batch id (a shard's, so shards of one job never share a batch id).

    ``first_seen`` maps a 16-byte hash prefix to the sequence number of the batch that embeds
    that text: about 100 bytes per distinct paragraph, the one per-job structure that grows
    with the input.
    """
    first_seen: dict[bytes, int] = {}
    seq = 0
    cur = Batch(id=batch_id(0, prefix), seq=0)
    for p in paragraphs:
        key = bytes.fromhex(p.hash[:32])
        owner = first_seen.get(key)
        if owner is None or owner == cur.seq:
            new_text = owner is None
            size = len(p.text.encode("utf-8")) if new_text else 0
            if cur.rows and new_text and (
                cur.tokens + p.tokens > limits.tokens
                or len(cur.texts) + 1 > limits.paragraphs
                or cur.nbytes + size > limits.nbytes
                or len(cur.rows) + 1 > limits.rows
            ):
                yield cur
                seq += 1
                cur = Batch(id=batch_id(seq, prefix), seq=seq)
            if new_text:
                first_seen[key] = cur.seq
                cur.own[p.hash] = len(cur.texts)
                cur.texts.append(p.text)
                cur.tokens += p.tokens
                cur.nbytes += size
        else:
            if len(cur.rows) + 1 > limits.rows:
                yield cur
                seq += 1
                cur = Batch(id=batch_id(seq, prefix), seq=seq)
            cur.refs[p.hash] = batch_id(owner, prefix)
        cur.rows.append(p)
    if cur.rows:
        yield cur
