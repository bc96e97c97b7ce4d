"""Real paragraphs to time: a file, a directory, or the Python standard library's docstrings.

Why stdlib docstrings by default: they are present on every machine with Python, real prose
of mixed length (a few tokens to several hundred), and need no download, so two runs of the
bench on two machines time the same text.
"""

from __future__ import annotations

import ast
import json
import random
import re
import sysconfig
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

#: Paragraphs shorter than this (characters) are mostly signatures and ``:param:`` stubs.
MIN_CHARS = 40
TEXT_SUFFIXES = {".txt", ".md", ".rst", ".markdown", ".text"}
_BLANK = re.compile(r"\n\s*\n")
_SPACE = re.compile(r"\s+")


def split_paragraphs(text: str, min_chars: int = MIN_CHARS) -> list[str]:
    """Blank-line separated blocks, whitespace collapsed, short blocks dropped."""
    out = []
    for block in _BLANK.split(text):
        para = _SPACE.sub(" ", block).strip()
        if len(para) >= min_chars:
            out.append(para)
    return out


def docstrings(source: str) -> Iterator[str]:
    """Module, class and function docstrings of one Python source text (unparsable: none)."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            doc = ast.get_docstring(node)
            if doc:
                yield doc


def _python_files(root: Path) -> Iterator[Path]:
    for path in sorted(root.rglob("*.py")):
        parts = set(path.relative_to(root).parts)
        if parts & {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3"}:
            continue
        yield path


def stdlib_paragraphs(root: Path | None = None, min_chars: int = MIN_CHARS) -> list[str]:
    """Every docstring paragraph of the standard library at ``root`` (default: this Python's)."""
    root = root or Path(sysconfig.get_paths()["stdlib"])
    out: list[str] = []
    for path in _python_files(root):
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        for doc in docstrings(text):
            out.extend(split_paragraphs(doc, min_chars))
    return out


def _file_paragraphs(path: Path, min_chars: int) -> list[str]:
    if path.suffix in {".jsonl", ".ndjson"}:
        out = []
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                record = json.loads(line)
                text = record.get("text") if isinstance(record, dict) else None
                if isinstance(text, str):
                    out.extend(split_paragraphs(text, min_chars))
        return out
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".py":
        return [p for doc in docstrings(text) for p in split_paragraphs(doc, min_chars)]
    return split_paragraphs(text, min_chars)


def load_corpus(source: Path | None = None, *, min_chars: int = MIN_CHARS) -> list[str]:
    """All paragraphs of ``source``: a text/Markdown/JSONL/Python file, a directory of those,
    or (None) the standard library's docstrings. Duplicates are dropped (first kept), so a
    repeated licence header does not count twice. Raises ValueError when nothing is found."""
    if source is None:
        found: Iterable[str] = stdlib_paragraphs(min_chars=min_chars)
    elif source.is_dir():
        found = [p for f in sorted(source.rglob("*"))
                 if f.is_file() and f.suffix in TEXT_SUFFIXES | {".py", ".jsonl", ".ndjson"}
                 for p in _file_paragraphs(f, min_chars)]
    elif source.is_file():
        found = _file_paragraphs(source, min_chars)
    else:
        raise ValueError(f"corpus {source} does not exist")
    paragraphs = list(dict.fromkeys(found))
    if not paragraphs:
        raise ValueError(f"corpus {source or 'stdlib'} holds no paragraph of at least {min_chars} characters")
    return paragraphs


def sample(paragraphs: Sequence[str], n: int | None, seed: int = 0) -> list[str]:
    """A reproducible sample of ``n`` paragraphs spread over the whole corpus (all if n is None
    or larger). Why not the first n: the stdlib's first files would dominate the length mix."""
    if n is None or n >= len(paragraphs):
        return list(paragraphs)
    return random.Random(seed).sample(list(paragraphs), n)


def repeat_to(paragraphs: Sequence[str], n: int) -> list[str]:
    """``n`` paragraphs cycling through ``paragraphs`` (an end-to-end job needs >= 10,000 and a
    small corpus may hold fewer). Each repeat gets a suffix so dedup in the producer keeps it."""
    if not paragraphs:
        raise ValueError("no paragraphs to repeat")
    out = []
    for i in range(n):
        base = paragraphs[i % len(paragraphs)]
        round_ = i // len(paragraphs)
        out.append(base if round_ == 0 else f"{base} ({round_})")
    return out
