"""Word .docx → paragraphs in order, heading styles as structure, tables as text rows (python-docx, MIT).

Why the zip is checked before python-docx opens it: a .docx is a zip, and a few kilobytes can
declare gigabytes of XML. Member sizes are read from the zip's directory (no decompression) and
a document whose declared total or compression ratio is absurd is refused before any XML is read.
"""

from __future__ import annotations

import re
import zipfile
from pathlib import Path
from typing import Any

from deposium.producer.documents import DocumentError, Extracted, TextBuilder, require

#: Most uncompressed bytes a .docx may declare; Word documents with images stay far below.
MAX_UNCOMPRESSED = 512 * 1024 * 1024
#: Most a single member may expand (uncompressed / compressed); XML compresses ~10-20x.
MAX_RATIO = 200
_HEADING_STYLE = re.compile(r"^heading\s*(\d)$", re.I)


def check_zip(path: Path, *, fmt: str = "DOCX") -> None:
    """Refuse a truncated/corrupt zip or a zip bomb from its central directory alone."""
    try:
        with zipfile.ZipFile(path) as zf:
            members = zf.infolist()
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise DocumentError(f"corrupt or truncated {fmt} (not a readable zip: {exc})") from None
    total = sum(m.file_size for m in members)
    if total > MAX_UNCOMPRESSED:
        raise DocumentError(f"{fmt} declares {total:,} uncompressed bytes (limit {MAX_UNCOMPRESSED:,}); "
                            "refused as a zip bomb")
    for m in members:
        if m.compress_size and m.file_size > 1024 * 1024 and m.file_size / m.compress_size > MAX_RATIO:
            raise DocumentError(f"{fmt} member {m.filename} expands {m.file_size // m.compress_size}x "
                                f"(limit {MAX_RATIO}x); refused as a zip bomb")


def _style_names(document: Any) -> dict[str, str]:
    """Style id → style name, read once: python-docx's ``paragraph.style`` rescans every style per call."""
    names: dict[str, str] = {}
    for style in document.styles:
        try:
            names[style.style_id] = style.name or ""
        except (KeyError, AttributeError, ValueError):
            continue
    return names


def _heading_level(paragraph: Any, names: dict[str, str]) -> int | None:
    style_id = paragraph._p.style  # the pStyle id, or None for the default paragraph style
    name = names.get(style_id, "") if style_id else ""
    if name.lower() == "title":
        return 0
    match = _HEADING_STYLE.match(name)
    return int(match.group(1)) if match else None


def _table_rows(table: Any) -> list[str]:
    rows = []
    for row in table.rows:
        cells: list[str] = []
        for cell in row.cells:
            text = " ".join(cell.text.split())
            if not cells or text != cells[-1]:  # a merged cell repeats itself across the span
                cells.append(text)
        if any(cells):
            rows.append(" | ".join(cells))
    return rows


def extract_docx(path: Path, *, max_chars: int | None = None) -> Extracted:
    check_zip(path)
    docx = require("docx", "DOCX")
    from docx.table import Table
    from docx.text.paragraph import Paragraph

    try:
        document = docx.Document(str(path))
    except Exception as exc:  # noqa: BLE001 - python-docx raises KeyError/ValueError/lxml errors on bad parts
        raise DocumentError(f"corrupt DOCX: {type(exc).__name__}: {exc}") from None
    title = (document.core_properties.title or "").strip() or None
    out = TextBuilder(max_chars)
    names = _style_names(document)
    body = document.element.body
    for child in body.iterchildren():
        tag = child.tag.rsplit("}", 1)[-1]
        if tag == "p":
            paragraph = Paragraph(child, document)
            text = paragraph.text
            level = _heading_level(paragraph, names)
            if level is not None and text.strip():
                if level == 0:
                    title = title or text.strip()
                out.open_heading(level, " ".join(text.split()))
                out.add(text, is_heading=True)
            else:
                out.add(text)
        elif tag == "tbl":
            out.add("\n".join(_table_rows(Table(child, document))), whole=True)
    return out.result(title=title)
