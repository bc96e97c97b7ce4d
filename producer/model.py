"""Plain data records shared by the producer's modules.

Why a module of its own: readers, splitter, batcher, backends and sinks all pass these
records to each other; keeping them free of behaviour lets each of those modules stay small
and be tested alone.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Document:
    """One input document: an id stable across runs of the same command, and its text."""

    id: str
    text: str
    #: Where it came from (path[:line]); used only in error messages.
    origin: str = ""


@dataclass(frozen=True)
class Block:
    """One unit of a document's extracted text, with where it sits in that text.

    ``char_start``/``char_end`` are offsets into the document's extracted text (for a plain
    text file: its decoded characters, newlines normalised to ``\n``). ``heading`` is the
    heading path the block sits under (``Installation > Docker``); a heading block carries
    the path it opens. ``whole`` blocks (a code block, a table) are never cut nor merged
    with a neighbour unless they exceed the model's window.
    """

    text: str
    char_start: int | None = None
    char_end: int | None = None
    page: int | None = None
    heading: str | None = None
    is_heading: bool = False
    whole: bool = False


@dataclass(frozen=True)
class InputError:
    """A document, file or line that could not be read; recorded, the job goes on.

    ``skipped`` names the reason class for the job summary (``unsupported format: .xyz``)
    when the file was deliberately left out rather than broken.
    """

    origin: str
    reason: str
    document: str | None = None
    skipped: str | None = None

    def to_json(self) -> dict[str, object]:
        return {"kind": "input", "origin": self.origin, "document": self.document, "reason": self.reason}


@dataclass(frozen=True)
class InputWarning:
    """A document that was read, but not exactly as written (replaced bytes); it is embedded."""

    origin: str
    reason: str
    document: str | None = None

    def to_json(self) -> dict[str, object]:
        return {"kind": "input", "level": "WARNING", "origin": self.origin, "document": self.document,
                "reason": self.reason}


def content_hash(text: str) -> str:
    """sha256 of the paragraph's UTF-8 text: the dedup key and a row-level checksum."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class Paragraph:
    """A unit that gets one vector. ``id`` = ``f"{document}#{index}"`` (stable across runs)."""

    document: str
    index: int
    text: str
    tokens: int
    hash: str
    #: Provenance (None where the format has no such notion): 1-based PDF page, heading path,
    #: span in the document's extracted text, document title.
    page: int | None = None
    heading: str | None = None
    char_start: int | None = None
    char_end: int | None = None
    title: str | None = None

    @property
    def id(self) -> str:
        return f"{self.document}#{self.index}"


@dataclass
class Batch:
    """A deterministic group of paragraphs sent as one task.

    ``texts`` are the distinct texts this batch embeds; ``rows`` are all paragraphs that
    get their vector from this batch. A row whose hash was already embedded by an earlier
    batch is an *alias*: its vector is looked up in the sink once that batch is committed,
    so identical paragraphs are embedded once per job.
    """

    id: str
    seq: int
    rows: list[Paragraph] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    #: content hash -> index into ``texts`` for the hashes this batch embeds itself.
    own: dict[str, int] = field(default_factory=dict)
    #: content hash -> id of the earlier batch that embeds it (aliases).
    refs: dict[str, str] = field(default_factory=dict)
    tokens: int = 0
    nbytes: int = 0

    def digest(self) -> str:
        """Fingerprint of the batch's rows; a resumed job proves it formed the same batches."""
        h = hashlib.sha256()
        for p in self.rows:
            h.update(p.id.encode("utf-8", "surrogatepass"))
            h.update(b"\0")
            h.update(p.hash.encode())
            h.update(b"\n")
        return h.hexdigest()[:16]
