"""Rich documents (PDF, HTML, Word, Markdown, legacy-encoded text) into blocks with provenance.

Why a package of one small module per format: each format needs its own library and its own
notion of structure (pages, headings, tables), but all of them hand the splitter the same
thing: :class:`Extracted`, a list of :class:`~deposium.producer.model.Block` whose offsets
point into one extracted text. The libraries live in the optional ``documents`` extra and are
imported only when a file of that format is met, so a missing extra fails that format alone.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from types import ModuleType

from deposium.producer.model import Block

EXTRA_HINT = "pip install 'deposium-embeddings[documents]'"
#: Separator put between blocks in a rich document's extracted text (offsets count it).
BLOCK_SEPARATOR = "\n\n"


class DocumentError(ValueError):
    """This document cannot be extracted (encrypted, scanned, corrupt, too large); the job goes on."""


def require(module: str, fmt: str) -> ModuleType:
    """Import a format's library, or fail this format alone with the install line to run."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise DocumentError(f"{fmt} support needs the documents extra: {EXTRA_HINT}") from None


@dataclass
class Extracted:
    """A document's blocks in reading order, its title and any warnings met while reading it."""

    blocks: list[Block] = field(default_factory=list)
    title: str | None = None
    warnings: list[str] = field(default_factory=list)
    #: Length of the extracted text the blocks' offsets point into.
    chars: int = 0


class TextBuilder:
    """Collects blocks and lays them out as one extracted text (blocks joined by a blank line).

    Why: offsets must be reproducible from the stored rows alone; defining the extracted text
    as the blocks joined by :data:`BLOCK_SEPARATOR` makes ``text[char_start:char_end]`` the
    block's own text whatever the source format.
    """

    def __init__(self, max_chars: int | None = None) -> None:
        self.max_chars = max_chars
        self.blocks: list[Block] = []
        self.pos = 0
        self.headings: list[tuple[int, str]] = []

    def heading_path(self) -> str | None:
        return " > ".join(t for _, t in self.headings) or None

    def open_heading(self, level: int, title: str) -> None:
        while self.headings and self.headings[-1][0] >= level:
            self.headings.pop()
        self.headings.append((level, title))

    def add(self, text: str, *, page: int | None = None, is_heading: bool = False, whole: bool = False) -> None:
        text = text.strip("\n") if whole else text.strip()
        if not text.strip():
            return
        if self.blocks:
            self.pos += len(BLOCK_SEPARATOR)
        start, end = self.pos, self.pos + len(text)
        self.pos = end
        if self.max_chars is not None and end > self.max_chars:
            raise DocumentError(f"extracted text over DEPOSIUM_MAX_DOCUMENT_CHARS ({self.max_chars:,} characters)")
        self.blocks.append(Block(text=text, char_start=start, char_end=end, page=page,
                                 heading=self.heading_path(), is_heading=is_heading, whole=whole))

    def result(self, title: str | None = None, warnings: list[str] | None = None) -> Extracted:
        return Extracted(blocks=self.blocks, title=title or None, warnings=warnings or [], chars=self.pos)
