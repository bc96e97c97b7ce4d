"""PDF text layer → paragraphs with 1-based page numbers (pypdfium2, Apache-2.0/BSD).

Why pdfium: it is the fastest permissively licensed text-layer reader and returns the text in
reading order with per-character boxes. What pdfium does not do is done here, by hand,
because no library does it for a bare text layer: lines are grouped into paragraphs by the
vertical gap between them, words hyphenated across a line end are joined, and running
headers/footers (the same first or last line on most pages, page numbers folded) are dropped.
"""

from __future__ import annotations

import re
import statistics
from pathlib import Path
from typing import Any

from deposium.producer.documents import DocumentError, Extracted, TextBuilder, require

_DIGITS = re.compile(r"\d+")
_SPACES = re.compile(r"\s+")
#: A line ending in a hyphen after a letter, continued by a lower-case letter: one word.
_HYPHEN_END = re.compile(r"[^\W\d_][-\u00ad\u2010\x02\ufffe]$")
#: A line opening a list item starts a paragraph of its own whatever the gap.
_BULLET = re.compile(r"^(?:[\u2022\u25e6\u25aa\u2023\u2043*\u2013-]|\d{1,3}[.)])\s")
#: A section number in front of a heading's text ("2.1 ", "A.3. ", "IV. ").
_SECTION_NUMBER = re.compile(r"(?:\d{1,3}|[A-Z]|[IVX]{1,5})(?:\.\d{1,3})*\.?\s+")
#: A paragraph break is a vertical gap wider than this many typical line pitches.
_GAP = 1.45


def _norm(line: str) -> str:
    return _SPACES.sub(" ", _DIGITS.sub("#", line)).strip().lower()


def _page_lines(textpage: Any) -> list[tuple[str, float, float]]:
    """(text, top, height) for each text line of a page, in pdfium's reading order."""
    text = textpage.get_text_range()
    lines: list[tuple[str, float, float]] = []
    index = 0
    for raw in text.split("\r\n"):
        stripped = raw.strip()
        if stripped:
            first = index + (len(raw) - len(raw.lstrip()))
            try:
                _, bottom, _, top = textpage.get_charbox(first)
            except Exception:  # noqa: BLE001 - a box pdfium cannot give: keep the line, no geometry
                bottom = top = 0.0
            lines.append((stripped, top, max(top - bottom, 0.0)))
        index += len(raw) + 2
    return lines


def _running_lines(pages: list[list[tuple[str, float, float]]]) -> set[str]:
    """Normalised first/last lines repeated on a quarter of the pages or more (three at least):
    headers, footers, page numbers; a chapter's running header lasts only as long as its chapter."""
    if len(pages) < 3:
        return set()
    seen: dict[str, int] = {}
    for lines in pages:
        for key in {_norm(line[0]) for line in lines[:1] + lines[-1:]}:
            seen[key] = seen.get(key, 0) + 1
    need = max(3, (len(pages) + 3) // 4)
    return {k for k, n in seen.items() if n >= need}


def _join(lines: list[str]) -> str:
    out = ""
    for line in lines:
        if out and _HYPHEN_END.search(out) and line[:1].islower():
            out = out[:-1] + line
        elif out:
            out += " " + line
        else:
            out = line
    return out


def _paragraphs(lines: list[tuple[str, float, float]]) -> list[str]:
    pitches = [a[1] - b[1] for a, b in zip(lines, lines[1:], strict=False) if 0 < a[1] - b[1]]
    pitch = statistics.median(pitches) if pitches else 0.0
    paragraphs: list[list[str]] = []
    prev_top: float | None = None
    for text, top, _ in lines:
        gap = (prev_top - top) if prev_top is not None else None
        new = not paragraphs or gap is None or bool(_BULLET.match(text)) or pitch <= 0 or gap > _GAP * pitch or gap < 0
        if new:
            paragraphs.append([text])
        else:
            paragraphs[-1].append(text)
        prev_top = top
    return [_join(p) for p in paragraphs]


def extract_pdf(path: Path, *, max_chars: int | None = None) -> Extracted:
    pdfium = require("pypdfium2", "PDF")
    try:
        doc = pdfium.PdfDocument(str(path))
    except pdfium.PdfiumError as exc:
        message = str(exc).lower()
        if "password" in message:
            raise DocumentError("encrypted PDF (password required); not read") from None
        raise DocumentError(f"corrupt or truncated PDF: {exc}") from None
    try:
        pages = []
        for i in range(len(doc)):
            page = doc[i]
            textpage = page.get_textpage()
            pages.append(_page_lines(textpage))
            textpage.close()
            page.close()
        title = (doc.get_metadata_dict().get("Title") or "").strip() or None
        outline = _outline(doc)
    except pdfium.PdfiumError as exc:
        raise DocumentError(f"corrupt or truncated PDF: {exc}") from None
    finally:
        doc.close()
    if not any(pages):
        raise DocumentError(f"PDF without a text layer ({len(pages)} pages; scanned; no OCR)")
    running = _running_lines(pages)
    blank = [n for n, lines in enumerate(pages, start=1) if not lines]
    warnings = [f"{len(blank)} of {len(pages)} pages without a text layer (scanned; no OCR): pages "
                f"{', '.join(map(str, blank[:10]))}{', ...' if len(blank) > 10 else ''}"] if blank else []
    out = TextBuilder(max_chars)
    for number, lines in enumerate(pages, start=1):
        body = list(lines)
        while body and _norm(body[0][0]) in running:
            body.pop(0)
        while body and _norm(body[-1][0]) in running:
            body.pop()
        marks = outline.get(number, [])
        for paragraph in _paragraphs(body):
            _add_with_headings(out, paragraph, number, marks)
        for level, heading in marks:  # not found in the page's text: the section still starts here
            out.open_heading(level, heading)
    return out.result(title=title, warnings=warnings)


def _title_end(paragraph: str, heading: str) -> int | None:
    """Where ``heading`` ends if it starts ``paragraph``, after an optional section number that
    the text shows and the outline omits ("2.1 ASN.1 syntax" for the bookmark "ASN.1 syntax")."""
    for start in (0, m.end() if (m := _SECTION_NUMBER.match(paragraph)) else 0):
        end = start + len(heading)
        if paragraph[start:end].casefold() == heading.casefold() and (end == len(paragraph)
                                                                     or not paragraph[end].isalnum()):
            return end
    return None


def _outline(doc: Any) -> dict[int, list[tuple[int, str]]]:
    """The PDF's bookmarks by 1-based page: (level, title), in order. Empty without an outline."""
    marks: dict[int, list[tuple[int, str]]] = {}
    for bookmark in doc.get_toc(max_depth=8):
        dest = bookmark.get_dest()
        heading = _SPACES.sub(" ", bookmark.get_title() or "").strip()
        if dest is None or dest.get_index() is None or not heading:
            continue
        marks.setdefault(dest.get_index() + 1, []).append((bookmark.level + 1, heading))
    return marks


def _add_with_headings(out: TextBuilder, paragraph: str, page: int, marks: list[tuple[int, str]]) -> None:
    """Add a paragraph, opening the outline's sections whose titles start it (and cutting them off).

    Why: the outline is the one reliable heading structure a PDF carries; its titles sit at the
    start of a paragraph (alone, or run together with the first lines below them when the gap
    above the text is small), so a title found there opens its section at that very point.
    """
    while marks:
        found = next(((k, end) for k, (_, heading) in enumerate(marks)
                      if (end := _title_end(paragraph, heading)) is not None), None)
        if found is None:
            break
        k, end = found
        for level, heading in marks[:k]:  # earlier sections of this page whose titles were not seen
            out.open_heading(level, heading)
        level, heading = marks[k]
        del marks[:k + 1]
        out.open_heading(level, heading)
        out.add(paragraph[:end], page=page, is_heading=True)
        paragraph = paragraph[end:].lstrip()
    if paragraph:
        out.add(paragraph, page=page)
