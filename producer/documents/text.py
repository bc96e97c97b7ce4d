"""Plain text in any common encoding → blank-line separated blocks with character offsets.

Why a check pass before the read pass: the encoding must be settled for the whole file before
its first block is embedded (a Windows-1252 byte on line 90,000 changes how line 1 decodes),
and the pass also counts characters against ``DEPOSIUM_MAX_DOCUMENT_CHARS`` and finds NUL
bytes of a binary file, all in 1 MiB chunks so a large file is never held in memory.

Decision: a BOM settles UTF-8/UTF-16. Otherwise UTF-8 is kept when the file decodes as UTF-8,
or when its valid multi-byte characters outnumber its invalid bytes (a UTF-8 file with a few
damaged bytes: these are replaced by U+FFFD and counted in a warning). A file whose non-ASCII
bytes are all invalid UTF-8 is legacy-encoded: charset-normalizer names the code page, with
Windows-1252 preferred whenever it is among the plausible ones, because on short Western texts
charset-normalizer's scores cannot tell the Latin code pages apart and Windows-1252 (a superset of
the printable Latin-1) is by far the most common of them.
"""

from __future__ import annotations

import codecs
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from deposium.producer.documents import DocumentError, require
from deposium.producer.model import Block

_CHUNK = 1 << 20
_REPLACEMENT_BYTES = "\ufffd".encode()
#: Legacy code pages worth telling apart (charset-normalizer tries only these).
LEGACY = ["cp1252", "cp1250", "cp1251", "cp1253", "cp1254", "cp1255", "cp1256", "cp1257", "koi8_r",
          "shift_jis", "euc_jp", "gb18030", "big5", "euc_kr"]


@dataclass(frozen=True)
class TextEncoding:
    """How to decode a text file, and what decoding it with ``errors="replace"`` costs."""

    encoding: str
    replaced: int = 0
    chars: int = 0

    def warning(self) -> str | None:
        if not self.replaced:
            return None
        return f"{self.replaced} invalid byte sequence(s) replaced by U+FFFD (read as {self.encoding})"


def _bom(head: bytes) -> str | None:
    if head.startswith(codecs.BOM_UTF8):
        return "utf-8-sig"
    if head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return "utf-16"
    return None


def _scan(path: Path, encoding: str, *, nul_is_binary: bool) -> tuple[int, int, int]:
    """(replaced sequences, valid non-ASCII chars, chars) of ``path`` decoded as ``encoding``."""
    decoder = codecs.getincrementaldecoder(encoding)("replace")
    replaced = non_ascii = chars = offset = 0
    with open(path, "rb") as fh:
        while True:
            chunk = fh.read(_CHUNK)
            final = not chunk
            if nul_is_binary and chunk:
                nul = chunk.find(b"\0")
                if nul >= 0:
                    raise DocumentError(f"binary file (NUL byte at offset {offset + nul})")
            text = decoder.decode(chunk, final=final)
            bad = text.count("\ufffd") - chunk.count(_REPLACEMENT_BYTES)
            replaced += max(bad, 0)
            non_ascii += len(text) - len(text.encode("ascii", "ignore")) - max(bad, 0)
            chars += len(text)
            offset += len(chunk)
            if final:
                return replaced, non_ascii, chars


def _legacy(path: Path) -> str:
    cn = require("charset_normalizer", "legacy-encoded text")
    with open(path, "rb") as fh:
        sample = fh.read(4 * _CHUNK)
    matches = cn.from_bytes(sample, cp_isolation=LEGACY)
    names = [m.encoding for m in matches]
    if "cp1252" in names or not names:
        return "cp1252"
    return names[0]


def detect_encoding(path: Path, *, max_chars: int | None = None) -> TextEncoding:
    """Settle ``path``'s encoding (see module docstring); raise DocumentError for binary/oversized."""
    with open(path, "rb") as fh:
        head = fh.read(4)
    encoding = _bom(head)
    if encoding is None:
        replaced, non_ascii, chars = _scan(path, "utf-8", nul_is_binary=True)
        encoding = "utf-8"
        if replaced and non_ascii <= replaced:
            encoding = _legacy(path)
            replaced, _, chars = _scan(path, encoding, nul_is_binary=True)
    else:
        replaced, _, chars = _scan(path, encoding, nul_is_binary=False)
    if max_chars is not None and chars > max_chars:
        raise DocumentError(f"extracted text over DEPOSIUM_MAX_DOCUMENT_CHARS ({chars:,} > {max_chars:,} characters)")
    return TextEncoding(encoding=encoding, replaced=replaced, chars=chars)


def read_text(path: Path, encoding: TextEncoding) -> str:
    with open(path, encoding=encoding.encoding, errors="replace") as fh:
        return fh.read()


def line_blocks(lines: Iterable[str]) -> Iterator[Block]:
    """Blank-line separated blocks of ``lines`` (newline-terminated), stripped, with their span.

    The span runs from the block's first non-blank character to the end of its last line's
    text; inside it, trailing spaces of lines are dropped from the block's text.
    """
    buf: list[str] = []
    start = pos = end = 0
    for line in lines:
        body = line.rstrip("\r\n")
        if body.strip():
            if not buf:
                start = pos + (len(body) - len(body.lstrip()))
            buf.append(body.rstrip())
            end = pos + len(body.rstrip())
        elif buf:
            yield Block(text="\n".join(buf).strip(), char_start=start, char_end=end)
            buf = []
        pos += len(line)
    if buf:
        yield Block(text="\n".join(buf).strip(), char_start=start, char_end=end)


def text_lines(path: Path, encoding: TextEncoding, on_bytes: Callable[[int], None] | None = None) -> Iterator[str]:
    """Decoded lines (universal newlines, so offsets count ``\\r\\n`` as one character)."""
    with open(path, encoding=encoding.encoding, errors="replace") as fh:
        for line in fh:
            if on_bytes is not None:
                on_bytes(len(line))
            yield line
