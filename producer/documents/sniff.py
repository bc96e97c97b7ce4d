"""Which reader a file needs, decided by its content first and its name second.

Why content first: files arrive misnamed (a PDF saved as ``.txt``, a page saved from a browser
as ``.txt``), and reading a PDF or a page as text embeds bytes and tags. Signatures are
unambiguous (``%PDF-``, a zip holding ``word/document.xml``, Parquet's ``PAR1``, an HTML
doctype or root element); only text without a signature falls back to the file's suffix.
"""

from __future__ import annotations

import codecs
import zipfile
from pathlib import Path

from deposium.producer.documents import DocumentError

TEXT_SUFFIXES = {".txt", ".text", ".rst", ""}
MARKDOWN_SUFFIXES = {".md", ".markdown"}
HTML_SUFFIXES = {".html", ".htm", ".xhtml"}
JSONL_SUFFIXES = {".jsonl", ".ndjson"}
#: Every suffix a directory walk takes without looking inside (others are sniffed).
KNOWN_SUFFIXES = TEXT_SUFFIXES | MARKDOWN_SUFFIXES | HTML_SUFFIXES | JSONL_SUFFIXES | {
    ".pdf", ".docx", ".csv", ".parquet"}
_HEAD = 4096


class Unsupported(DocumentError):
    """A file no reader takes; ``kind`` is the summary's reason class (``unsupported format: .xyz``)."""

    def __init__(self, reason: str, kind: str) -> None:
        super().__init__(reason)
        self.kind = kind


def _looks_html(head: bytes) -> bool:
    for bom in (codecs.BOM_UTF8,):
        if head.startswith(bom):
            head = head[len(bom):]
    start = head.lstrip()[:1024].lower()
    if start.startswith((b"<!doctype html", b"<html")):
        return True
    if start.startswith((b"<?xml", b"<!--", b"<!doctype")):
        return b"<html" in start or b"<html" in head[:_HEAD].lower()
    return start.startswith(b"<") and (b"<head" in start or b"<body" in start)


def sniff(path: Path, *, explicit: bool) -> str:
    """The reader for ``path``: pdf, docx, html, markdown, text, jsonl, csv or parquet.

    ``explicit``: the file was named on the command line (an unknown suffix is read as text);
    found in a directory, a file of unknown suffix and no signature is :class:`Unsupported`.
    """
    suffix = path.suffix.lower()
    with open(path, "rb") as fh:
        head = fh.read(_HEAD)
    if b"%PDF-" in head[:1024]:
        return "pdf"
    if head.startswith(b"PK\x03\x04"):
        try:
            with zipfile.ZipFile(path) as zf:
                if "word/document.xml" in zf.namelist():
                    return "docx"
        except (zipfile.BadZipFile, OSError, EOFError):
            if suffix == ".docx":
                return "docx"
            raise DocumentError("corrupt or truncated zip archive") from None
        if suffix == ".docx":
            return "docx"  # its reader says which part is missing
        raise Unsupported(f"unsupported format: zip archive ({suffix or 'no extension'})", "unsupported format: zip")
    if suffix == ".docx":
        return "docx"  # not a zip at all: its reader says so
    if head.startswith(b"PAR1"):
        return "parquet"
    if _looks_html(head) or suffix in HTML_SUFFIXES:
        return "html"
    if suffix in JSONL_SUFFIXES:
        return "jsonl"
    if suffix == ".csv":
        return "csv"
    if suffix == ".parquet":
        return "parquet"
    if suffix in MARKDOWN_SUFFIXES:
        return "markdown"
    utf16 = head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE))
    nul = -1 if utf16 else head.find(b"\0")
    if suffix in TEXT_SUFFIXES or explicit:
        if nul >= 0 and not explicit:
            raise Unsupported(f"binary file (NUL byte at offset {nul})", "binary file")
        return "text"
    raise Unsupported(f"unsupported format: {suffix}", f"unsupported format: {suffix}")
