"""Real documents in: PDF, HTML, DOCX, Markdown, legacy-encoded text, tables; bad documents out.

Real files live in tests/data (see tests/data/SOURCES.md); edge cases (encrypted, scanned,
truncated, zip bomb, code pages) are generated here, small and fast. No model is needed except
for the splitter tests, which use the MiniLM tokenizer.
"""

from __future__ import annotations

import collections
import re
import zipfile
from pathlib import Path

import pytest

from deposium.producer.documents import DocumentError
from deposium.producer.documents.docx import extract_docx
from deposium.producer.documents.html import extract_html
from deposium.producer.documents.markdown import extract_markdown
from deposium.producer.documents.pdf import _join, extract_pdf
from deposium.producer.documents.sniff import sniff
from deposium.producer.model import InputError, InputWarning
from deposium.producer.readers import Source, read_inputs
from deposium.producer.split import chunk_blocks, split_blocks
from deposium.producer.tokens import TokenCounter
from deposium.worker.tokenize import ParagraphTokenizer

DATA = Path(__file__).parent / "data"
PDF = DATA / "shared-mime-info-spec.pdf"
PDF_REFERENCE = DATA / "shared-mime-info-spec.pdftotext.txt"
HTML = DATA / "libffi-closure-api.html"
_WORD = re.compile(r"\w+")


def words(text: str) -> collections.Counter[str]:
    return collections.Counter(w.lower() for w in _WORD.findall(text))


def coverage(reference: str, extracted: str) -> float:
    """Share of the reference's words (with multiplicity) found in the extracted text."""
    ref, got = words(reference), words(extracted)
    return sum(min(n, got[w]) for w, n in ref.items()) / sum(ref.values())


def _items(inputs: list[Path | str], **kw) -> tuple[dict[str, Source], list[InputError], list[InputWarning]]:
    items = list(read_inputs([str(i) for i in inputs], **kw))
    return ({i.id: i for i in items if isinstance(i, Source)}, [i for i in items if isinstance(i, InputError)],
            [i for i in items if isinstance(i, InputWarning)])


# -- generated documents ------------------------------------------------------------------------
def make_docx(path: Path, *, title: str = "Field guide") -> Path:
    import docx

    document = docx.Document()
    document.core_properties.title = title
    document.add_heading("Installation", level=1)
    document.add_paragraph("Install the package with pip on any Linux machine you have around.")
    document.add_heading("Docker", level=2)
    document.add_paragraph("Build the image from the repository root, then run it with two CPUs.")
    table = document.add_table(rows=2, cols=2)
    for r, row in enumerate([("Variable", "Meaning"), ("REDIS_URL", "the broker")]):
        for c, value in enumerate(row):
            table.cell(r, c).text = value
    document.add_heading("Usage", level=1)
    document.add_paragraph("Submit a folder of documents and watch the progress bar fill up.")
    document.save(path)
    return path


def make_scanned_pdf(path: Path) -> Path:
    """One page holding only an image: what a scanner without OCR produces."""
    import pypdfium2 as pdfium

    pdf = pdfium.PdfDocument.new()
    page = pdf.new_page(200, 200)
    image = pdfium.PdfImage.new(pdf)
    image.set_bitmap(pdfium.PdfBitmap.new_native(40, 40, pdfium.raw.FPDFBitmap_BGR))
    image.set_matrix(pdfium.PdfMatrix().scale(200, 200))
    page.insert_obj(image)
    page.gen_content()
    pdf.save(str(path))
    return path


def make_encrypted_pdf(path: Path) -> Path:
    from pypdf import PdfReader, PdfWriter

    writer = PdfWriter(clone_from=PdfReader(PDF))
    writer.encrypt(user_password="secret", owner_password="owner", algorithm="RC4-128")
    with open(path, "wb") as fh:
        writer.write(fh)
    return path


def make_zip_bomb_docx(path: Path) -> Path:
    """A .docx whose document part declares megabytes of zeros in a few kilobytes."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("[Content_Types].xml", "<Types/>")
        zf.writestr("word/document.xml", b"\0" * (8 << 20))
    return path


# -- PDF ------------------------------------------------------------------------------------------
def test_pdf_text_matches_pdftotext_and_each_paragraph_is_on_its_page():
    extracted = extract_pdf(PDF)
    reference = PDF_REFERENCE.read_text(encoding="utf-8")
    text = "\n\n".join(b.text for b in extracted.blocks)
    assert coverage(reference, text) >= 0.95
    pages = reference.split("\f")
    assert {b.page for b in extracted.blocks} == set(range(1, 18))
    for block in extracted.blocks:
        page_words = _WORD.findall(pages[block.page - 1].lower())
        allowed = set(page_words) | {a + b for a, b in zip(page_words, page_words[1:], strict=False)}
        stray = [w for w in _WORD.findall(block.text.lower()) if w not in allowed]
        assert not stray, (block.page, block.text[:80], stray)
    # offsets point into the extracted text (blocks joined by a blank line)
    assert all(text[b.char_start:b.char_end] == b.text for b in extracted.blocks)


def test_pdf_outline_gives_heading_paths():
    extracted = extract_pdf(PDF)
    headings = [b.text for b in extracted.blocks if b.is_heading]
    assert headings[:4] == ["1. Introduction", "1.1. Version", "1.3. Language used in this specification",
                            "2. Unified system"]
    xdg = next(b for b in extracted.blocks if b.text.startswith("This specification uses the XDG Base Directory"))
    assert (xdg.page, xdg.heading) == (2, "2. Unified system > 2.1. Directory layout")
    # a title run together with the text below it is cut off into a heading block of its own
    version = next(b for b in extracted.blocks if b.text.startswith("This is version 0.21"))
    assert version.heading == "1. Introduction > 1.1. Version"


def test_pdf_running_header_and_page_numbers_are_dropped():
    extracted = extract_pdf(PDF)
    assert not any(b.text == "Shared MIME-info Database" for b in extracted.blocks)
    assert not any(b.text.isdigit() for b in extracted.blocks)
    # but the words themselves stay where they are content
    assert any("Shared MIME-info Database specification" in b.text for b in extracted.blocks)


def test_words_hyphenated_across_line_ends_are_joined():
    assert _join(["the infor-", "mation is kept"]) == "the information is kept"
    assert _join(["see page 12-", "15 for more"]) == "see page 12- 15 for more"  # not a word break
    assert _join(["Emacs-", "Lisp mode"]) == "Emacs- Lisp mode"  # capital: a compound, kept


# -- HTML -----------------------------------------------------------------------------------------
def test_html_keeps_title_headings_and_text_but_no_markup_or_scripts():
    extracted = extract_html(HTML)
    assert extracted.title == "The Closure API (libffi: the portable foreign function interface library)"
    text = "\n".join(b.text for b in extracted.blocks)
    assert "<" not in text.replace("<=", "") and "text/css" not in text and "{" not in text.split("ffi_")[0]
    body = [b for b in extracted.blocks if b.heading]
    assert body and all(b.heading == "2.5 The Closure API" for b in body)
    import lxml.html  # reference: every word of the page's body, scripts and styles aside

    root = lxml.html.parse(str(HTML)).getroot()
    for element in root.xpath("//script|//style|//head"):
        element.drop_tree()
    assert coverage(root.text_content(), text) >= 0.95
    assert any(b.text.startswith("Allocate a chunk of memory holding size bytes") for b in body)


def test_html_main_content_only_with_heading_paths(tmp_path: Path):
    page = tmp_path / "page.txt"  # saved from a browser as .txt: still HTML
    page.write_text("""<!DOCTYPE html><html><head><title>Guide</title><style>p {color: red}</style>
<script>var secret = "tracking";</script></head><body>
<nav><a href="/">Home</a> | <a href="/docs">Docs</a></nav>
<main><h1>Installation</h1><p>Install it with <b>pip</b> in a fresh virtual environment.</p>
<h2>Docker<a class="headerlink" href="#docker">¶</a></h2><div role="navigation">Prev | Next</div>
<p>Build the image and run it.</p><script>alert("inline")</script>
<table><tr><th>Variable</th><th>Meaning</th></tr><tr><td>REDIS_URL</td><td>broker</td></tr></table>
<h1>Usage</h1><ul><li>First step of the usage list.</li><li>Second step.</li></ul></main>
<footer>Copyright footer text</footer></body></html>""", encoding="utf-8")
    assert sniff(page, explicit=True) == "html"
    extracted = extract_html(page)
    got = [(b.heading, b.text) for b in extracted.blocks]
    assert got == [
        ("Installation", "Installation"),
        ("Installation", "Install it with pip in a fresh virtual environment."),
        ("Installation > Docker", "Docker"),
        ("Installation > Docker", "Build the image and run it."),
        ("Installation > Docker", "Variable | Meaning\nREDIS_URL | broker"),
        ("Usage", "Usage"),
        ("Usage", "First step of the usage list."),
        ("Usage", "Second step."),
    ]
    assert extracted.title == "Guide"


def test_html_line_breaks_stay_inside_their_paragraph(tmp_path: Path):
    page = tmp_path / "address.html"
    page.write_text("<html><body><p>12 Main Street<br>Springfield</p><p>Next paragraph.</p></body></html>")
    assert [b.text for b in extract_html(page).blocks] == ["12 Main Street Springfield", "Next paragraph."]


# -- DOCX -----------------------------------------------------------------------------------------
def test_docx_paragraphs_headings_and_table_rows(tmp_path: Path):
    extracted = extract_docx(make_docx(tmp_path / "guide.docx"))
    assert extracted.title == "Field guide"
    got = [(b.heading, b.text) for b in extracted.blocks]
    assert got == [
        ("Installation", "Installation"),
        ("Installation", "Install the package with pip on any Linux machine you have around."),
        ("Installation > Docker", "Docker"),
        ("Installation > Docker", "Build the image from the repository root, then run it with two CPUs."),
        ("Installation > Docker", "Variable | Meaning\nREDIS_URL | the broker"),
        ("Usage", "Usage"),
        ("Usage", "Submit a folder of documents and watch the progress bar fill up."),
    ]


# -- Markdown -------------------------------------------------------------------------------------
MARKDOWN = """---
title: front matter is metadata
draft: true
---
# Guide

Intro paragraph of the guide, long enough to stand alone.

## Install

```bash
pip install deposium

deposium-submit docs/
```

| Option | Default |
|--------|---------|
| --out  | embeddings.parquet |

## Use

Run it.
"""


def test_markdown_headings_fences_and_tables_whole_front_matter_skipped():
    extracted = extract_markdown(MARKDOWN)
    assert extracted.title == "Guide"
    got = [(b.heading, b.text) for b in extracted.blocks]
    assert got[0] == ("Guide", "# Guide")
    assert ("Guide > Install", "```bash\npip install deposium\n\ndeposium-submit docs/\n```") in got
    assert ("Guide > Install", "| Option | Default |\n|--------|---------|\n| --out  | embeddings.parquet |") in got
    assert got[-1] == ("Guide > Use", "Run it.")
    assert "front matter" not in "".join(t for _, t in got)


# -- text encodings -------------------------------------------------------------------------------
def test_text_in_legacy_and_unicode_encodings_is_decoded_not_dropped(tmp_path: Path):
    phrase = "Le cœur de l’été — « déjà » vu, naïve façade."
    (tmp_path / "cp1252.txt").write_bytes(phrase.encode("cp1252"))
    (tmp_path / "utf16.txt").write_bytes(phrase.encode("utf-16"))  # with BOM
    (tmp_path / "bom.txt").write_bytes(b"\xef\xbb\xbf" + phrase.encode())
    (tmp_path / "onebad.txt").write_bytes("Déjà vu: one damaged byte \xff here, the rest is fine.".encode()
                                          .replace(b"\xc3\xbf", b"\xff"))
    docs, errors, warnings = _items(sorted(tmp_path.iterdir()))
    assert not errors
    text = {Path(k).name: "\n".join(b.text for b in v.blocks()) for k, v in docs.items()}
    assert text["cp1252.txt"] == text["utf16.txt"] == text["bom.txt"] == phrase
    assert text["onebad.txt"] == "Déjà vu: one damaged byte \ufffd here, the rest is fine."
    assert [(Path(w.origin).name, w.reason) for w in warnings] == [
        ("onebad.txt", "1 invalid byte sequence(s) replaced by U+FFFD (read as utf-8)")]


# -- tables ---------------------------------------------------------------------------------------
def test_csv_and_parquet_rows_are_documents(tmp_path: Path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "faq.csv").write_text("key,body\nq1,How do I resume a job?\nq2,\"Multi-line,\nanswer\"\n")
    pq.write_table(pa.table({"body": ["First row text.", "Second row text."]}), tmp_path / "rows.parquet")
    docs, errors, _ = _items([tmp_path / "faq.csv", tmp_path / "rows.parquet"], text_column="body",
                             id_column="key")
    assert {k: [b.text for b in v.blocks()] for k, v in docs.items()} == {
        "q1": ["How do I resume a job?"], "q2": ["Multi-line,\nanswer"],
        str(tmp_path / "rows.parquet") + ":1": ["First row text."],
        str(tmp_path / "rows.parquet") + ":2": ["Second row text."]}
    assert not errors
    _, errors, _ = _items([tmp_path / "faq.csv"])
    assert [e.reason for e in errors] == [
        "faq.csv has no column 'text' (columns: key, body); name it with --text-column"]


# -- sniffing and skipped files -------------------------------------------------------------------
def test_formats_are_recognised_by_content_and_unknown_files_are_listed(tmp_path: Path):
    (tmp_path / "report.txt").write_bytes(PDF.read_bytes())
    make_docx(tmp_path / "letter.bin")
    (tmp_path / "notes.rst").write_text("Title\n=====\n\nSome restructured text.\n")
    (tmp_path / "photo.xyz").write_bytes(b"\x89PNG\r\n\x1a\n\0\0")
    (tmp_path / "data.json").write_text("{}")
    docs, errors, _ = _items([tmp_path])
    assert {Path(k).name for k in docs} == {"report.txt", "letter.bin", "notes.rst"}
    assert docs[str(tmp_path / "report.txt")].title is None
    assert next(iter(docs[str(tmp_path / "report.txt")].blocks())).page == 1
    assert sorted((Path(e.origin).name, e.skipped) for e in errors) == [
        ("data.json", "unsupported format: .json"), ("photo.xyz", "unsupported format: .xyz")]


# -- bad documents --------------------------------------------------------------------------------
def test_bad_documents_each_get_one_error_and_the_rest_is_read(tmp_path: Path):
    pdf = PDF.read_bytes()
    (tmp_path / "truncated.pdf").write_bytes(pdf[: len(pdf) // 2])
    make_encrypted_pdf(tmp_path / "encrypted.pdf")
    make_scanned_pdf(tmp_path / "scanned.pdf")
    good = make_docx(tmp_path / "good.docx")
    (tmp_path / "truncated.docx").write_bytes(good.read_bytes()[:1500])
    make_zip_bomb_docx(tmp_path / "bomb.docx")
    (tmp_path / "ok.txt").write_text("A fine paragraph of plain text.\n")
    docs, errors, _ = _items([tmp_path])
    assert {Path(k).name for k in docs} == {"good.docx", "ok.txt"}
    reasons = {Path(e.origin).name: e.reason for e in errors}
    assert reasons["encrypted.pdf"] == "encrypted PDF (password required); not read"
    assert reasons["scanned.pdf"] == "PDF without a text layer (1 pages; scanned; no OCR)"
    assert reasons["truncated.pdf"].startswith("corrupt or truncated PDF")
    assert reasons["truncated.docx"].startswith("corrupt or truncated DOCX")
    assert "refused as a zip bomb" in reasons["bomb.docx"]
    assert len(errors) == 5


def test_a_pdf_with_some_scanned_pages_is_read_with_a_warning(tmp_path: Path):
    from pypdf import PdfReader, PdfWriter

    writer = PdfWriter(clone_from=PdfReader(PDF))
    writer.merge(len(writer.pages), str(make_scanned_pdf(tmp_path / "scan.pdf")))
    writer.write(str(tmp_path / "mixed.pdf"))
    docs, errors, warnings = _items([tmp_path / "mixed.pdf"])
    assert not errors and len(docs) == 1
    assert [w.reason for w in warnings] == ["1 of 18 pages without a text layer (scanned; no OCR): pages 18"]


def test_documents_over_the_character_limit_are_refused_alone(tmp_path: Path):
    (tmp_path / "big.txt").write_text("word " * 400)
    (tmp_path / "small.txt").write_text("tiny")
    make_docx(tmp_path / "guide.docx")
    docs, errors, _ = _items([tmp_path], max_chars=150)
    assert {Path(k).name for k in docs} == {"small.txt"}
    assert {Path(e.origin).name for e in errors} == {"big.txt", "guide.docx"}
    assert all("DEPOSIUM_MAX_DOCUMENT_CHARS" in e.reason for e in errors)


def test_missing_extra_names_the_install_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    import builtins

    real_import = builtins.__import__

    def no_pdfium(name, *args, **kwargs):
        if name == "pypdfium2":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_pdfium)
    monkeypatch.delitem(__import__("sys").modules, "pypdfium2", raising=False)
    with pytest.raises(DocumentError, match=r"pip install 'deposium-embeddings\[documents\]'"):
        extract_pdf(PDF)


# -- provenance through the splitter ---------------------------------------------------------------
@pytest.fixture(scope="module")
def counter(minilm_dir: Path) -> TokenCounter:
    return TokenCounter(ParagraphTokenizer(minilm_dir / "tokenizer.json", max_seq_length=64))


def test_paragraphs_carry_page_heading_offsets_and_title(tmp_path: Path, counter: TokenCounter):
    extracted = extract_docx(make_docx(tmp_path / "guide.docx"))
    text = "\n\n".join(b.text for b in extracted.blocks)
    paragraphs = list(split_blocks("guide", extracted.blocks, counter, title=extracted.title))
    assert [p.heading for p in paragraphs] == ["Installation", "Installation > Docker", "Installation > Docker",
                                               "Usage"]
    assert paragraphs[0].text.startswith("Installation\n\nInstall the package")  # heading opens its section
    assert all(p.title == "Field guide" and p.page is None for p in paragraphs)
    for p in paragraphs:
        assert text[p.char_start:p.char_end] == p.text
    pdf = extract_pdf(PDF)
    pdf_text = "\n\n".join(b.text for b in pdf.blocks)
    pdf_paragraphs = list(split_blocks("spec", pdf.blocks, counter))
    assert {p.page for p in pdf_paragraphs} == set(range(1, 18))
    for p in pdf_paragraphs:  # a cut paragraph's span holds its words (whitespace may differ)
        assert _WORD.findall(pdf_text[p.char_start:p.char_end]) == _WORD.findall(p.text)


def test_a_heading_never_joins_the_previous_section(counter: TokenCounter):
    extracted = extract_markdown("# A\n\nFirst section text that is long enough.\n\n# B\n\nShort.\n")
    paragraphs = list(split_blocks("d", extracted.blocks, counter))
    assert [(p.heading, p.text) for p in paragraphs] == [
        ("A", "# A\n\nFirst section text that is long enough."), ("B", "# B\n\nShort.")]


# -- token chunks -----------------------------------------------------------------------------------
def test_token_chunks_fit_overlap_at_sentences_and_stop_at_headings(counter: TokenCounter):
    sentences = [f"Sentence {i} says something about topic {i * 3} here." for i in range(12)]
    text = "# Alpha\n\n" + " ".join(sentences) + "\n\n```\ncode line one\ncode line two\n```\n\n# Beta\n\nTiny."
    extracted = extract_markdown(text)
    chunks = list(chunk_blocks("d", extracted.blocks, counter, chunk_tokens=40, overlap=15))
    alpha = [c for c in chunks if c.heading == "Alpha"]
    assert [c.heading for c in chunks] == ["Alpha"] * len(alpha) + ["Beta"]
    assert chunks[-1].text == "# Beta\n\nTiny."  # never merged into the previous section's chunk
    assert len(alpha) >= 3 and all(c.tokens <= 40 for c in chunks)
    assert [c.index for c in chunks] == list(range(len(chunks)))
    body = [c for c in alpha if "Sentence" in c.text]
    for prev, nxt in zip(body, body[1:], strict=False):
        last = re.findall(r"Sentence \d+ [^.]*\.", prev.text)[-1]
        assert nxt.text.startswith(last) or nxt.text.startswith("```"), (prev.text, nxt.text)
        assert counter.count([last])[0] - counter.base <= 15
    assert any(c.text.endswith("```\ncode line one\ncode line two\n```") for c in alpha)  # whole, uncut
    joined = " ".join(c.text for c in chunks)
    assert all(s in joined for s in sentences)
    full = "\n\n".join(b.text for b in extracted.blocks)
    assert all(_WORD.findall(full[c.char_start:c.char_end]) == _WORD.findall(c.text) for c in chunks)
