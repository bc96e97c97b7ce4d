"""HTML/XHTML → main content blocks under their heading path (lxml, BSD).

Why a small walker over lxml rather than a readability library: a page's heading structure is
the provenance we keep, and boilerplate removers drop or flatten headings; the structural rules
needed here are short (drop nav/script/style/footer and friends, prefer ``<main>``/``<article>``,
one block per leaf block element, one line per table row), and lxml parses broken markup the
way browsers do, fast.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from deposium.producer.documents import DocumentError, Extracted, TextBuilder, require

#: Never content: removed with everything inside them.
DROP = {"script", "style", "noscript", "template", "nav", "footer", "aside", "form", "iframe", "svg",
        "button", "select", "head", "object", "embed", "canvas", "menu", "dialog"}
#: Landmark roles that are never content (site navigation, search box, page footer).
DROP_ROLES = {"navigation", "search", "contentinfo", "banner", "complementary"}
#: Permalink anchors generators put in headings (Sphinx, MkDocs, Hugo): a glyph, not a word.
PERMALINK_CLASSES = {"headerlink", "anchor", "anchorjs-link", "heading-anchor"}
HEADINGS = {f"h{i}": i for i in range(1, 7)}
#: Elements that start a block of their own.
BLOCKS = {"p", "div", "section", "article", "main", "li", "ul", "ol", "dl", "dt", "dd", "blockquote", "pre",
          "table", "tr", "figure", "figcaption", "caption", "address", "details", "summary", "header", "body",
          "hr", "center", *HEADINGS}
_SPACES = re.compile(r"[ \t\r\n\f\v\u00a0]+")


def _tag(el: Any) -> str:
    tag = el.tag if isinstance(el.tag, str) else ""
    return tag.rsplit("}", 1)[-1].lower()


def _clean(text: str) -> str:
    return _SPACES.sub(" ", text).strip()


class _Walker:
    def __init__(self, out: TextBuilder) -> None:
        self.out = out
        self.inline: list[str] = []

    def flush(self) -> None:
        text = _clean("".join(self.inline))
        self.inline = []
        if text:
            self.out.add(text)

    def text_of(self, el: Any) -> str:
        return _clean(" ".join(_texts(el)))

    def walk(self, el: Any) -> None:
        tag = _tag(el)
        if tag in HEADINGS:
            self.flush()
            title = self.text_of(el)
            if title:
                self.out.open_heading(HEADINGS[tag], title)
                self.out.add(title, is_heading=True)
        elif tag == "pre":
            self.flush()
            self.out.add("".join(el.itertext()), whole=True)
        elif tag == "table":
            self.flush()
            rows = []
            for tr in el.iter():
                if _tag(tr) == "tr":
                    cells = [self.text_of(c) for c in tr if _tag(c) in {"td", "th"}]
                    if any(cells):
                        rows.append(" | ".join(cells))
            caption = next((self.text_of(c) for c in el if _tag(c) == "caption"), "")
            self.out.add("\n".join(([caption] if caption else []) + rows), whole=True)
        elif tag == "br":
            self.inline.append(" ")  # a line break inside a paragraph (an address, a verse) is not a new block
        elif tag in BLOCKS:
            self.flush()
            if el.text:
                self.inline.append(el.text)
            for child in el:
                self.child(child)
            self.flush()
        else:
            if el.text:
                self.inline.append(el.text)
            for child in el:
                self.child(child)
        return None

    def child(self, child: Any) -> None:
        if isinstance(child.tag, str) and _keep(child):
            self.walk(child)
        if child.tail:
            self.inline.append(child.tail)


def _texts(el: Any) -> list[str]:
    """The element's text without what :func:`_keep` drops (a heading's permalink glyph, a script)."""
    out = [el.text or ""]
    for child in el:
        if isinstance(child.tag, str) and _keep(child):
            out.extend(_texts(child))
        out.append(child.tail or "")
    return out


def _keep(el: Any) -> bool:
    if _tag(el) in DROP or (el.get("role") or "").lower() in DROP_ROLES:
        return False
    return not PERMALINK_CLASSES & set((el.get("class") or "").split())


def _main_content(root: Any) -> Any:
    for xpath in ("//*[local-name()='main']", "//*[@role='main']", "//*[local-name()='article']"):
        found = root.xpath(xpath)
        if len(found) == 1:
            return found[0]
    body = root.xpath("//*[local-name()='body']")
    return body[0] if body else root


def extract_html(path: Path, *, max_chars: int | None = None) -> Extracted:
    lxml_html = require("lxml.html", "HTML")
    data = path.read_bytes()
    try:
        root = lxml_html.document_fromstring(data)
    except Exception as exc:  # noqa: BLE001 - lxml raises several types for unparsable input
        raise DocumentError(f"unparsable HTML: {exc}") from None
    titles = root.xpath("//*[local-name()='title']")
    title = _clean(titles[0].text_content()) if titles else None
    out = TextBuilder(max_chars)
    _Walker(out).walk(_main_content(root))
    return out.result(title=title)
