"""Turn command-line inputs (files, directories, globs, stdin) into streamed documents.

Why two passes per file: a file is first checked (NUL bytes, invalid UTF-8, unreadable) in
1 MiB chunks, then read line by line into blank-line separated blocks. A broken file is
therefore rejected whole, as one recorded error, instead of contributing half its paragraphs;
and neither pass holds more than one block of text in memory, whatever the input size.
"""

from __future__ import annotations

import codecs
import glob
import hashlib
import json
import os
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from deposium.producer.model import InputError

TEXT_SUFFIXES = {".txt", ".md", ".markdown", ".text"}
JSONL_SUFFIXES = {".jsonl", ".ndjson"}
_CHUNK = 1 << 20


@dataclass(frozen=True)
class Source:
    """A readable document: its id and a re-startable stream of raw text blocks."""

    id: str
    origin: str
    blocks: Callable[[], Iterator[str]]


def blocks_of_lines(lines: Iterable[str]) -> Iterator[str]:
    """Group lines into blocks separated by blank (whitespace-only) lines, stripped."""
    buf: list[str] = []
    for line in lines:
        if line.strip():
            buf.append(line.rstrip())
        elif buf:
            yield "\n".join(buf).strip()
            buf = []
    if buf:
        yield "\n".join(buf).strip()


def blocks_of_text(text: str) -> Iterator[str]:
    return blocks_of_lines(text.splitlines())


def check_text_file(path: Path) -> str | None:
    """Return why ``path`` cannot be used as UTF-8 text, or None when it is fine."""
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    offset = 0
    try:
        with open(path, "rb") as fh:
            while chunk := fh.read(_CHUNK):
                nul = chunk.find(b"\0")
                if nul >= 0:
                    return f"binary file (NUL byte at offset {offset + nul})"
                try:
                    decoder.decode(chunk)
                except UnicodeDecodeError as exc:
                    return f"invalid UTF-8 at byte {offset + exc.start}"
                offset += len(chunk)
            decoder.decode(b"", final=True)
    except UnicodeDecodeError as exc:
        return f"invalid UTF-8 at byte {offset + exc.start} (truncated character at end of file)"
    except OSError as exc:
        return f"unreadable: {exc.strerror or exc}"
    return None


class Meter:
    """Bytes of input consumed so far (read pass only): the progress bar's ETA basis."""

    def __init__(self) -> None:
        self.nbytes = 0


def _text_lines(path: Path, meter: Meter | None = None) -> Iterator[str]:
    with open(path, encoding="utf-8", errors="strict") as fh:
        for line in fh:
            if meter is not None:
                meter.nbytes += len(line)
            yield line


def text_file_sources(path: Path, doc_id: str, meter: Meter | None = None) -> Iterator[Source | InputError]:
    problem = check_text_file(path)
    if problem:
        if meter is not None:
            meter.nbytes += _size(path)
        yield InputError(origin=str(path), reason=problem, document=doc_id)
        return
    yield Source(id=doc_id, origin=str(path), blocks=lambda: blocks_of_lines(_text_lines(path, meter)))


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _check_record_text(text: str) -> str | None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return "text holds a lone surrogate (not encodable as UTF-8)"
    return None


def jsonl_sources(path: Path, meter: Meter | None = None) -> Iterator[Source | InputError]:
    """One document per line: ``{"id": ..., "text": ...}``. A bad line is an error of its own."""
    try:
        fh = open(path, "rb")
    except OSError as exc:
        yield InputError(origin=str(path), reason=f"unreadable: {exc.strerror or exc}")
        return
    with fh:
        for lineno, raw in enumerate(fh, start=1):
            origin = f"{path}:{lineno}"
            if meter is not None:
                meter.nbytes += len(raw)
            if not raw.strip():
                continue
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield InputError(origin=origin, reason=f"invalid UTF-8 at byte {exc.start} of the line")
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                yield InputError(origin=origin, reason=f"malformed JSON: {exc.msg} (column {exc.colno})")
                continue
            if not isinstance(record, dict):
                yield InputError(origin=origin, reason="line is not a JSON object")
                continue
            doc_id, text = record.get("id"), record.get("text")
            if isinstance(doc_id, bool) or not isinstance(doc_id, str | int) or str(doc_id) == "":
                yield InputError(origin=origin, reason="missing or invalid 'id' (string or integer)")
                continue
            doc_id = str(doc_id)
            if not isinstance(text, str):
                yield InputError(origin=origin, reason="missing or non-string 'text'", document=doc_id)
                continue
            problem = _check_record_text(text) or _check_record_text(doc_id)
            if problem:
                yield InputError(origin=origin, reason=problem, document=doc_id)
                continue
            yield Source(id=doc_id, origin=origin, blocks=lambda t=text: blocks_of_text(t))


def spool(stream: BinaryIO, directory: Path | None = None) -> tuple[Path, str]:
    """Copy a stream (stdin) to a temporary file in chunks; return its path and sha256.

    Why: stdin can be read only once, but a file is checked before it is read, and the
    content hash lets a re-run with the same stdin resume the same job.
    """
    digest = hashlib.sha256()
    fd, name = tempfile.mkstemp(prefix="deposium-stdin-", dir=directory)
    with os.fdopen(fd, "wb") as out:
        while chunk := stream.read(_CHUNK):
            digest.update(chunk)
            out.write(chunk)
    return Path(name), digest.hexdigest()


def expand(inputs: Iterable[str]) -> Iterator[tuple[str, Path | None]]:
    """Expand globs and directories into (document id, path) pairs in a stable order.

    ``("-", None)`` stands for stdin. A path matching nothing becomes an error downstream.
    """
    for raw in inputs:
        if raw == "-":
            yield "-", None
            continue
        if glob.has_magic(raw):
            matches = sorted(glob.glob(raw, recursive=True))
            if not matches:
                yield os.path.normpath(raw), Path(raw)
            for m in matches:
                if os.path.isdir(m):
                    yield from _walk(m)
                else:
                    yield os.path.normpath(m), Path(m)
        elif os.path.isdir(raw):
            yield from _walk(raw)
        else:
            yield os.path.normpath(raw), Path(raw)


def _walk(directory: str) -> Iterator[tuple[str, Path]]:
    for root, dirs, files in os.walk(directory):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if Path(name).suffix.lower() in TEXT_SUFFIXES | JSONL_SUFFIXES:
                full = os.path.join(root, name)
                yield os.path.normpath(full), Path(full)


def read_inputs(inputs: Iterable[str], *, stdin: BinaryIO | None = None,
                stdin_format: str = "txt", stdin_path: Path | None = None,
                meter: Meter | None = None) -> Iterator[Source | InputError]:
    """Every document of ``inputs`` in a stable order, or an error for what cannot be read.

    ``stdin_path`` is an already spooled copy of stdin (see :func:`spool`).
    """
    seen: dict[str, str] = {}
    for doc_id, path in expand(inputs):
        if path is None:
            if stdin_path is None:
                stdin_path, _ = spool(stdin or sys.stdin.buffer)
            items = jsonl_sources(stdin_path, meter) if stdin_format == "jsonl" else \
                text_file_sources(stdin_path, "<stdin>", meter)
        elif not path.exists():
            items = iter([InputError(origin=str(path), reason="no such file or directory")])
        elif path.suffix.lower() in JSONL_SUFFIXES:
            items = jsonl_sources(path, meter)
        else:
            items = text_file_sources(path, doc_id, meter)
        for item in items:
            if isinstance(item, Source):
                first = seen.get(item.id)
                if first is not None:
                    yield InputError(origin=item.origin, document=item.id,
                                     reason=f"duplicate document id (first seen at {first})")
                    continue
                seen[item.id] = item.origin
            yield item
