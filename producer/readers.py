"""Turn command-line inputs (files, directories, globs, stdin) into streamed documents.

Why a check pass before the read pass for text files: the encoding, the size limit and binary
content are settled for the whole file first (see :mod:`deposium.producer.documents.text`), so
a broken file is rejected whole, as one recorded error, instead of contributing half its
paragraphs; and neither pass holds more than one block of text in memory, whatever the input
size. Rich formats (PDF, HTML, DOCX, Markdown) are recognised by content
(:mod:`deposium.producer.documents.sniff`) and extracted one document at a time.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from deposium.producer.documents import DocumentError, Extracted
from deposium.producer.documents.pool import ReaderPool, SplitDocument
from deposium.producer.documents.sniff import JSONL_SUFFIXES, Unsupported, sniff
from deposium.producer.documents.text import detect_encoding, line_blocks, read_text, text_lines
from deposium.producer.model import Block, InputError, InputWarning, Paragraph
from deposium.producer.shard import Shard

_CHUNK = 1 << 20


@dataclass(frozen=True)
class Source:
    """A readable document: its id, a re-startable stream of blocks and its title if it has one.

    A document read by a reader process arrives already split: ``paragraphs`` holds them and
    ``failure`` says why reading stopped early, if it did.
    """

    id: str
    origin: str
    blocks: Callable[[], Iterator[Block]]
    title: str | None = None
    paragraphs: tuple[Paragraph, ...] | None = None
    failure: str | None = None

    def presplit(self) -> Iterator[Paragraph]:
        yield from self.paragraphs or ()
        if self.failure:
            raise OSError(self.failure)


Item = Source | InputError | InputWarning


def blocks_of_text(text: str) -> Iterator[Block]:
    """Blank-line separated blocks of an in-memory text, with their offsets in it."""
    return line_blocks(text.splitlines(keepends=True))


class Meter:
    """Bytes of input consumed so far (read pass only): the progress bar's ETA basis."""

    def __init__(self) -> None:
        self.nbytes = 0

    def add(self, n: int) -> None:
        self.nbytes += n


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _unreadable(exc: OSError) -> str:
    return f"unreadable: {exc.strerror or exc}"


def _read_error(path: Path, doc_id: str, exc: DocumentError | OSError) -> InputError:
    """The one error of a document that could not be read: what is wrong with it, or why the
    system could not read it."""
    reason = _unreadable(exc) if isinstance(exc, OSError) else str(exc)
    return InputError(origin=str(path), document=doc_id, reason=reason)


def text_file_sources(path: Path, doc_id: str, meter: Meter | None = None, *,
                      max_chars: int | None = None) -> Iterator[Item]:
    try:
        encoding = detect_encoding(path, max_chars=max_chars)
    except DocumentError as exc:
        problem = str(exc)
    except OSError as exc:
        problem = _unreadable(exc)
    else:
        if encoding.warning():
            yield InputWarning(origin=str(path), document=doc_id, reason=encoding.warning() or "")
        on_bytes = meter.add if meter is not None else None
        yield Source(id=doc_id, origin=str(path),
                     blocks=lambda: line_blocks(text_lines(path, encoding, on_bytes)))
        return
    if meter is not None:
        meter.nbytes += _size(path)
    yield InputError(origin=str(path), reason=problem, document=doc_id)


def _check_record_text(text: str) -> str | None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return "text holds a lone surrogate (not encodable as UTF-8)"
    return None


def _too_long(text: str, max_chars: int | None) -> str | None:
    if max_chars is not None and len(text) > max_chars:
        return f"text over DEPOSIUM_MAX_DOCUMENT_CHARS ({len(text):,} > {max_chars:,} characters)"
    return None


def jsonl_sources(path: Path, meter: Meter | None = None, *, max_chars: int | None = None) -> Iterator[Item]:
    """One document per line: ``{"id": ..., "text": ...}``. A bad line is an error of its own."""
    try:
        fh = open(path, "rb")
    except OSError as exc:
        yield InputError(origin=str(path), reason=_unreadable(exc))
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
            problem = _check_record_text(text) or _check_record_text(doc_id) or _too_long(text, max_chars)
            if problem:
                yield InputError(origin=origin, reason=problem, document=doc_id)
                continue
            yield Source(id=doc_id, origin=origin, blocks=lambda t=text: blocks_of_text(t))


def table_sources(path: Path, doc_id: str, kind: str, *, text_column: str, id_column: str,
                  max_chars: int | None = None, meter: Meter | None = None) -> Iterator[Item]:
    """One document per row of a .csv or .parquet table (see :mod:`deposium.producer.documents.tables`)."""
    from deposium.producer.documents.tables import csv_rows, parquet_rows

    rows = csv_rows if kind == "csv" else parquet_rows
    try:
        for row in rows(path, text_column, id_column):
            origin = f"{path}:{row.number}"
            rid = row.id if row.id not in (None, "") else f"{doc_id}:{row.number}"
            if not isinstance(row.text, str):
                yield InputError(origin=origin, document=rid, reason=f"missing or non-string {text_column!r}")
                continue
            problem = _check_record_text(row.text) or _check_record_text(rid) or _too_long(row.text, max_chars)
            if problem:
                yield InputError(origin=origin, document=rid, reason=problem)
                continue
            yield Source(id=rid, origin=origin, blocks=lambda t=row.text: blocks_of_text(t))
    except DocumentError as exc:
        yield InputError(origin=str(path), document=doc_id, reason=str(exc))
    except OSError as exc:
        yield InputError(origin=str(path), document=doc_id, reason=_unreadable(exc))
    if meter is not None:
        meter.nbytes += _size(path)


def extract(path: Path, kind: str, *, max_chars: int | None = None) -> Extracted:
    """Extract a rich document (pdf, html, docx, markdown); DocumentError says why it cannot be."""
    if kind == "pdf":
        from deposium.producer.documents.pdf import extract_pdf

        return extract_pdf(path, max_chars=max_chars)
    if kind == "html":
        from deposium.producer.documents.html import extract_html

        return extract_html(path, max_chars=max_chars)
    if kind == "docx":
        from deposium.producer.documents.docx import extract_docx

        return extract_docx(path, max_chars=max_chars)
    if kind == "markdown":
        from deposium.producer.documents.markdown import extract_markdown

        encoding = detect_encoding(path, max_chars=max_chars)
        extracted = extract_markdown(read_text(path, encoding), max_chars=max_chars)
        if encoding.warning():
            extracted.warnings.append(encoding.warning() or "")
        return extracted
    raise DocumentError(f"no extractor for {kind}")


def document_sources(path: Path, doc_id: str, kind: str, *, max_chars: int | None = None,
                     meter: Meter | None = None) -> Iterator[Item]:
    try:
        extracted = extract(path, kind, max_chars=max_chars)
    except (DocumentError, OSError) as exc:
        yield _read_error(path, doc_id, exc)
        return
    finally:
        if meter is not None:
            meter.nbytes += _size(path)
    for warning in extracted.warnings:
        yield InputWarning(origin=str(path), document=doc_id, reason=warning)
    blocks = extracted.blocks
    yield Source(id=doc_id, origin=str(path), blocks=lambda: iter(blocks), title=extracted.title)


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


def expand_found(inputs: Iterable[str], shard: Shard | None = None) -> Iterator[tuple[str, Path | None, bool]]:
    """Globs and directories expanded into (document id, path, named explicitly) in a stable order.

    ``("-", None, True)`` stands for stdin; a path matching nothing becomes an error downstream.

    With a ``shard``, files found in a directory that hold one document of another shard
    (see :func:`shard_share`) are left out by name, before any object is made for them: each
    shard walks every input, so a file it does not own must cost it next to nothing.
    """
    for doc_id, raw, explicit in _expand_names(inputs, shard):
        yield doc_id, None if raw is None else Path(raw), explicit


def _expand_names(inputs: Iterable[str], shard: Shard | None) -> Iterator[tuple[str, str | None, bool]]:
    """:func:`expand_found` with paths as strings (a walk of many files makes no Path it does not need)."""
    if shard is not None and not shard.sharded:
        shard = None
    for raw in inputs:
        if raw == "-":
            yield "-", None, True
            continue
        if glob.has_magic(raw):
            matches = sorted(glob.glob(raw, recursive=True))
            if not matches:
                yield os.path.normpath(raw), raw, True
            for m in matches:
                if os.path.isdir(m):
                    yield from _walk(m, shard)
                else:
                    yield os.path.normpath(m), m, True
        elif os.path.isdir(raw):
            yield from _walk(raw, shard)
        else:
            yield os.path.normpath(raw), raw, True


def _walk(directory: str, shard: Shard | None = None) -> Iterator[tuple[str, str, bool]]:
    """Every non-hidden file: those no reader takes become listed errors, never silently skipped.

    A file's id is its normalized path; a directory's normalized path joined with a file name
    is normalized already (a name is one component, never ``.`` or ``..``), except under ``.``.
    """
    for root, dirs, files in os.walk(directory):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        base = os.path.normpath(root)
        for name in sorted(files):
            if name.startswith("."):
                continue
            doc_id = name if base == "." else os.path.join(base, name)
            if shard is not None and not _maybe_shared(name) and not shard.owns(doc_id):
                continue
            yield doc_id, doc_id, False


def file_sources(path: Path, doc_id: str, *, explicit: bool, meter: Meter | None = None,
                 max_chars: int | None = None, text_column: str = "text",
                 id_column: str = "id") -> Iterator[Item]:
    """The documents of one file, whatever its format, or the error saying why there are none."""
    if not path.exists():
        yield InputError(origin=str(path), reason="no such file or directory")
        return
    try:
        kind = sniff(path, explicit=explicit)
    except Unsupported as exc:
        yield InputError(origin=str(path), document=doc_id, reason=str(exc), skipped=exc.kind)
        return
    except (DocumentError, OSError) as exc:
        yield _read_error(path, doc_id, exc)
        return
    if kind == "jsonl":
        yield from jsonl_sources(path, meter, max_chars=max_chars)
    elif kind in {"csv", "parquet"}:
        yield from table_sources(path, doc_id, kind, text_column=text_column, id_column=id_column,
                                 max_chars=max_chars, meter=meter)
    elif kind == "text":
        yield from text_file_sources(path, doc_id, meter, max_chars=max_chars)
    else:
        yield from document_sources(path, doc_id, kind, max_chars=max_chars, meter=meter)


def read_inputs(inputs: Iterable[str], *, stdin: BinaryIO | None = None,
                stdin_format: str = "txt", stdin_path: Path | None = None,
                meter: Meter | None = None, max_chars: int | None = None, text_column: str = "text",
                id_column: str = "id", pool: ReaderPool | None = None,
                shard: Shard | None = None) -> Iterator[Item]:
    """Every document of ``inputs`` in a stable order, or an error for what cannot be read.

    ``stdin_path`` is an already spooled copy of stdin (see :func:`spool`). Warnings
    (replaced bytes) come just before the document they concern. With a ``pool``, documents
    are read and split by its processes and arrive split (:attr:`Source.paragraphs`), in the
    same order. With a ``shard``, only that shard's documents (and the errors about them):
    a one-document file it does not own is not even opened (see :func:`shard_share`).
    """
    kw: dict[str, Any] = {"max_chars": max_chars, "text_column": text_column, "id_column": id_column}
    if shard is not None and not shard.sharded:
        shard = None
    items = _pooled(inputs, pool, meter, kw, shard) if pool is not None else _serial(
        inputs, stdin, stdin_format, stdin_path, meter, kw, shard)
    seen: dict[str, str] = {}
    for item in items:
        if isinstance(item, Source):
            first = seen.get(item.id)
            if first is not None:
                yield InputError(origin=item.origin, document=item.id,
                                 reason=f"duplicate document id (first seen at {first})")
                continue
            seen[item.id] = item.origin
        yield item


_RECORD_KINDS = {"jsonl", "csv", "parquet"}
RECORD_SUFFIXES = JSONL_SUFFIXES | {".csv", ".parquet"}


def _maybe_shared(name: str) -> bool:
    """Whether a file may hold records of every shard (see :func:`shard_share`): by its suffix."""
    return os.path.splitext(name)[1].lower() in RECORD_SUFFIXES


def shard_bytes(inputs: Iterable[str], shard: Shard | None = None) -> int:
    """Total size of what ``shard`` (or an unsharded job) reads of ``inputs``: the files it owns
    and the record files every shard reads whole; the progress meter counts the same bytes."""
    total = 0
    for doc_id, raw, explicit in _expand_names(inputs, shard):
        if raw is None:
            continue
        if shard is not None and shard.sharded:
            if _maybe_shared(raw):
                if shard_share(doc_id, Path(raw), explicit, shard) == "none":
                    continue
            elif explicit and not shard.owns(doc_id):  # a file found in a walk is owned already
                continue
        try:
            total += os.stat(raw).st_size
        except OSError:
            pass
    return total


def shard_share(doc_id: str, path: Path, explicit: bool, shard: Shard) -> str:
    """What ``shard`` reads of one input file: ``"all"``, ``"records"`` or ``"none"``.

    A record file (.jsonl, .csv, .parquet) holds many documents with their own ids: every
    shard reads it and keeps its records. Any other file is one document named by its path,
    owned whole by one shard (its errors included, so each is reported once).

    Why the suffix decides first: each shard walks every input, so a file it does not own must
    cost it next to nothing, not an open. A record file without a record suffix (a Parquet
    file named ``.dat``) is read whole by the one shard owning its path: still exactly once,
    just not split, since every shard classifies it the same way.
    """
    if path.suffix.lower() in RECORD_SUFFIXES:
        try:
            kind = sniff(path, explicit=explicit) if path.is_file() else ""
        except (Unsupported, DocumentError, OSError):
            kind = ""
        if kind in _RECORD_KINDS:
            return "records"
    return "all" if shard.owns(doc_id) else "none"


def owned_items(items: Iterable[Item], shard: Shard) -> Iterator[Item]:
    """The items of a record file that belong to ``shard``: by document id, else by origin."""
    for item in items:
        if isinstance(item, Source):
            key = item.id
        else:
            key = item.document if item.document is not None else item.origin
        if shard.owns(key):
            yield item


def _serial_file(doc_id: str, path: Path, explicit: bool, meter: Meter | None, kw: dict[str, Any],
                 shard: Shard | None) -> Iterator[Item]:
    share = "all" if shard is None else shard_share(doc_id, path, explicit, shard)
    if share == "none":  # another shard's document: not read, and not in this shard's total
        return
    items = file_sources(path, doc_id, explicit=explicit, meter=meter, **kw)
    yield from (items if share == "all" else owned_items(items, shard))  # type: ignore[arg-type]


def _serial(inputs: Iterable[str], stdin: BinaryIO | None, stdin_format: str, stdin_path: Path | None,
            meter: Meter | None, kw: dict[str, Any], shard: Shard | None = None) -> Iterator[Item]:
    for doc_id, path, explicit in expand_found(inputs, shard):
        if path is None:
            if stdin_path is None:
                stdin_path, _ = spool(stdin or sys.stdin.buffer)
            if stdin_format == "jsonl":
                yield from jsonl_sources(stdin_path, meter, max_chars=kw["max_chars"])
            else:
                yield from text_file_sources(stdin_path, "<stdin>", meter, max_chars=kw["max_chars"])
        else:
            yield from _serial_file(doc_id, path, explicit, meter, kw, shard)


#: Plain text files larger than this stream here, block by block, instead of being split whole
#: in a reader process (which holds a document's paragraphs until it is done).
POOL_MAX_TEXT_BYTES = 8 << 20


def _in_pool(path: Path | None, explicit: bool) -> bool:
    """Whether a reader process takes this file: one document per file (records stream here)."""
    if path is None or not path.is_file():
        return False
    try:
        kind = sniff(path, explicit=explicit)
    except (DocumentError, OSError):
        return False  # its error is recorded here, cheaply
    if kind == "text" and _size(path) > POOL_MAX_TEXT_BYTES:
        return False
    return kind not in _RECORD_KINDS


def _pooled(inputs: Iterable[str], pool: ReaderPool, meter: Meter | None, kw: dict[str, Any],
            shard: Shard | None = None) -> Iterator[Item]:
    found = iter(expand_found(inputs, shard))
    held: list[tuple[str, Path | None, bool]] = []

    def run() -> Iterator[tuple[str, str, bool, dict[str, Any]]]:
        for doc_id, path, explicit in found:
            if shard is not None and path is not None and shard_share(doc_id, path, explicit, shard) == "none":
                continue
            if not _in_pool(path, explicit):
                held.append((doc_id, path, explicit))
                return
            yield doc_id, str(path), explicit, kw

    while True:
        tasks = run()
        for results in pool.map(_metered(tasks, meter)):
            for result in results:
                if isinstance(result, SplitDocument):
                    yield Source(id=result.id, origin=result.origin, blocks=lambda: iter(()),
                                 paragraphs=result.paragraphs, failure=result.failure)
                else:
                    yield result
        if not held:
            return
        doc_id, path, explicit = held.pop()
        if path is None:  # stdin is spooled and read by the caller's serial path (see the CLI)
            yield InputError(origin="-", reason="stdin cannot be read with --readers above 1")
        else:
            yield from _serial_file(doc_id, path, explicit, meter, kw, shard)


def _metered(tasks: Iterator[tuple[str, str, bool, dict[str, Any]]],
             meter: Meter | None) -> Iterator[tuple[str, str, bool, dict[str, Any]]]:
    for task in tasks:
        if meter is not None:
            meter.nbytes += _size(Path(task[1]))
        yield task
