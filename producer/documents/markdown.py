"""Markdown → blocks under their heading path (markdown-it-py, MIT).

Why the blocks keep their Markdown source: the parser is used for structure only (where a
block starts and ends, which lines are headings, fences or tables); the text embedded is the
author's own, so a fenced code block or a table arrives whole, exactly as written. Front
matter (a leading ``---`` YAML block) is metadata, not content, and is skipped.
"""

from __future__ import annotations

from deposium.producer.documents import Extracted, TextBuilder, require


def _strip_front_matter(lines: list[str]) -> list[str]:
    if lines and lines[0].strip() == "---":
        for i in range(1, len(lines)):
            if lines[i].strip() in {"---", "..."}:
                return [""] * (i + 1) + lines[i + 1:]  # keep line numbers for the parser's maps
    return lines


def extract_markdown(text: str, *, max_chars: int | None = None) -> Extracted:
    mdit = require("markdown_it", "Markdown")
    lines = _strip_front_matter(text.splitlines())
    source = "\n".join(lines)
    tokens = mdit.MarkdownIt("commonmark").enable("table").parse(source)
    out = TextBuilder(max_chars)
    title = None
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        if tok.level != 0 or tok.map is None or tok.nesting == -1:
            i += 1
            continue
        start, end = tok.map
        raw = "\n".join(lines[start:end])
        if tok.type == "heading_open":
            level = int(tok.tag[1:])
            heading = tokens[i + 1].content.strip() if i + 1 < len(tokens) else raw.strip("# ")
            if level == 1 and title is None:
                title = heading
            out.open_heading(level, heading or raw.strip())
            out.add(raw, is_heading=True)
        elif tok.type in {"fence", "code_block", "table_open", "html_block"}:
            out.add(raw, whole=True)
        else:
            out.add(raw)
        i += 1
    return out.result(title=title)
