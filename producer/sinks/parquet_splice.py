"""Concatenate Parquet files of one schema by copying their row groups' bytes, without decoding them.

Why by hand: publishing ``--out`` joins every batch's part file into one file, and doing that
through Arrow decompresses, decodes, re-encodes and re-compresses every value, which would be
the largest single step of a job's coordination work and, in a sharded job, the one step
only the last shard can run. A row group's column chunks are self-contained byte ranges,
so joining files is a copy plus a new footer whose offsets point at the copies. pyarrow
offers no such splice (apache/arrow#35638, #42896); arrow-rs does (``append_column``) but
has no Python binding. The footer is Thrift compact protocol, a small, frozen encoding:
this module scans it once, keeping every byte it does not change and noting where the
offset fields are (:func:`scan_footer`), and writes the joined footer from those slices with
only the offsets, the row count and the ordinals re-encoded. Nothing is decoded into objects,
so joining costs about a file copy plus a few microseconds per column chunk.

What is refused (:class:`CannotSplice`, and the caller falls back to decoding): encrypted
files, column chunks stored in other files, page indexes and bloom filters (they live
outside the row groups' byte range), and any part whose Parquet schema or Arrow schema is
not byte-for-byte the target's.
"""

from __future__ import annotations

import io
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import pyarrow as pa
import pyarrow.parquet as pq

MAGIC = b"PAR1"

# Thrift compact protocol type codes.
_TRUE, _FALSE, _BYTE, _I16, _I32, _I64, _DOUBLE, _BINARY, _LIST, _SET, _MAP, _STRUCT = range(1, 13)

# Field ids of parquet.thrift that splicing reads or rewrites.
_FMD_NUM_ROWS, _FMD_ROW_GROUPS = 3, 4
_FMD_ENCRYPTION = (8, 9)
_RG_COLUMNS, _RG_NUM_ROWS, _RG_FILE_OFFSET, _RG_ORDINAL = 1, 3, 5, 7
_CC_FILE_PATH, _CC_FILE_OFFSET, _CC_META = 1, 2, 3
_CC_PAGE_INDEX = (4, 5, 6, 7)
_CC_ENCRYPTED = (8, 9)
_CMD_OFFSETS = (9, 10, 11)  # data, index and dictionary page offsets
_CMD_BLOOM = (14, 15)


class CannotSplice(Exception):
    """These files cannot be joined by copying; decode and re-encode them instead."""


class ThriftError(CannotSplice):
    """A footer this module cannot read (truncated or not Thrift compact)."""


# -- Thrift compact protocol: a scanner that skips values and notes where fields are ----------

def _varint(data: bytes, pos: int) -> tuple[int, int]:
    shift = result = 0
    while True:
        try:
            b = data[pos]
        except IndexError:
            raise ThriftError("footer ends inside a value") from None
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
        if shift > 70:
            raise ThriftError("varint too long")


def _zigzag(data: bytes, pos: int) -> tuple[int, int]:
    n, pos = _varint(data, pos)
    return (n >> 1) ^ -(n & 1), pos


def encode_varint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def encode_zigzag(n: int) -> bytes:
    return encode_varint((n << 1) ^ (n >> 63))


_INTS = (_I16, _I32, _I64)


def _skip(data: bytes, pos: int, kind: int) -> int:
    """The position just past one value of type ``kind`` starting at ``pos``.

    Hot: a footer holds about a hundred values per column chunk, so integers, strings and
    struct fields are stepped over inline rather than through a call each.
    """
    if kind in _INTS:
        while data[pos] & 0x80:
            pos += 1
        return pos + 1
    if kind == _BINARY:
        n, pos = _varint(data, pos)
        return pos + n
    if kind in (_TRUE, _FALSE, _BYTE):  # a bool outside a struct header is one byte
        return pos + 1
    if kind == _DOUBLE:
        return pos + 8
    if kind == _STRUCT:
        while True:
            head = data[pos]
            pos += 1
            if head == 0:
                return pos
            t = head & 0x0F
            if not head >> 4:  # the field id follows, as a zigzag varint
                while data[pos] & 0x80:
                    pos += 1
                pos += 1
            if t in _INTS:
                while data[pos] & 0x80:
                    pos += 1
                pos += 1
            elif t not in (_TRUE, _FALSE):
                pos = _skip(data, pos, t)
    if kind in (_LIST, _SET):
        head = data[pos]
        pos += 1
        size = head >> 4
        if size == 15:
            size, pos = _varint(data, pos)
        elem = head & 0x0F
        if elem in _INTS:
            for _ in range(size):
                while data[pos] & 0x80:
                    pos += 1
                pos += 1
        else:
            for _ in range(size):
                pos = _skip(data, pos, elem)
        return pos
    if kind == _MAP:
        size, pos = _varint(data, pos)
        if size:
            types = data[pos]
            pos += 1
            for _ in range(size):
                pos = _skip(data, _skip(data, pos, types >> 4), types & 0x0F)
        return pos
    raise ThriftError(f"unknown Thrift type {kind}")


def _fields(data: bytes, pos: int) -> Any:
    """Yield (field id, type, value start, value end) of the struct at ``pos``, up to its stop byte."""
    last = 0
    while True:
        try:
            head = data[pos]
        except IndexError:
            raise ThriftError("footer ends inside a struct") from None
        if head == 0:
            return
        kind, delta = head & 0x0F, head >> 4
        pos += 1
        if delta:
            fid = last + delta
        else:
            fid, pos = _zigzag(data, pos)
        end = pos if kind in (_TRUE, _FALSE) else _skip(data, pos, kind)
        yield fid, kind, pos, end
        # the caller may read the value between pos and end; the scan goes on from end
        pos = end
        last = fid


def _list_items(data: bytes, pos: int) -> tuple[int, int]:
    """(element count, position of the first element) of the list at ``pos``."""
    head = data[pos]
    size = head >> 4
    pos += 1
    if size == 15:
        size, pos = _varint(data, pos)
    return size, pos


def _list_header(size: int, elem: int) -> bytes:
    return bytes([(size << 4) | elem]) if size < 15 else bytes([0xF0 | elem]) + encode_varint(size)


@dataclass
class RowGroup:
    """One row group's footer bytes, with the spans of the fields a move rewrites."""

    start: int
    end: int
    rows: int
    offsets: list[tuple[int, int, int]]  # (value start, value end, offset) of every file offset
    ordinal: tuple[int, int, int] | None  # (field start, value start, value end) of the i16 ordinal


@dataclass
class Footer:
    """A scanned Parquet footer: its bytes and where the fields splicing reads or rewrites are."""

    data: bytes
    spans: dict[int, tuple[int, int]]  # top-level field id -> (value start, value end)
    row_groups: list[RowGroup]



def _head(data: bytes, pos: int, last: int) -> tuple[int, int, int]:
    """(field id, type, value start) of the field header at ``pos``; field id 0 at the stop byte."""
    head = data[pos]
    if head == 0:
        return 0, 0, pos + 1
    if head >> 4:
        return last + (head >> 4), head & 0x0F, pos + 1
    fid, pos = _zigzag(data, pos + 1)
    return fid, head & 0x0F, pos


def _int_end(data: bytes, pos: int) -> int:
    while data[pos] & 0x80:
        pos += 1
    return pos + 1


def _scan_meta(data: bytes, pos: int, offsets: list[tuple[int, int, int]]) -> int:
    """Note a ColumnMetaData's page offsets; returns where it ends."""
    fid = 0
    while True:
        fid, kind, pos = _head(data, pos, fid)
        if fid == 0:
            return pos
        if fid in _CMD_OFFSETS:
            end = _int_end(data, pos)
            offsets.append((pos, end, _zigzag(data, pos)[0]))
            pos = end
        elif fid in _CMD_BLOOM:
            raise CannotSplice("a column chunk has a bloom filter")
        elif kind in _INTS:
            pos = _int_end(data, pos)
        elif kind not in (_TRUE, _FALSE):
            pos = _skip(data, pos, kind)


def _scan_column_chunk(data: bytes, pos: int, offsets: list[tuple[int, int, int]]) -> int:
    """Note a column chunk's file offsets; returns where the chunk ends."""
    fid = 0
    while True:
        fid, kind, pos = _head(data, pos, fid)
        if fid == 0:
            return pos
        if fid == _CC_FILE_OFFSET:
            end = _int_end(data, pos)
            offsets.append((pos, end, _zigzag(data, pos)[0]))
            pos = end
        elif fid == _CC_META:
            pos = _scan_meta(data, pos, offsets)
        elif fid == _CC_FILE_PATH or fid in _CC_PAGE_INDEX or fid in _CC_ENCRYPTED:
            raise CannotSplice("a column chunk has a page index, encryption or an external file")
        elif kind not in (_TRUE, _FALSE):
            pos = _skip(data, pos, kind)


def _scan_row_group(data: bytes, start: int) -> RowGroup:
    offsets: list[tuple[int, int, int]] = []
    rows = 0
    ordinal = None
    fid, pos = 0, start
    while True:
        field_start = pos
        fid, kind, pos = _head(data, pos, fid)
        if fid == 0:
            break
        if fid == _RG_COLUMNS:
            count, pos = _list_items(data, pos)
            for _ in range(count):
                pos = _scan_column_chunk(data, pos, offsets)
            continue
        end = pos if kind in (_TRUE, _FALSE) else _skip(data, pos, kind)
        if fid == _RG_FILE_OFFSET:
            offsets.append((pos, end, _zigzag(data, pos)[0]))
        elif fid == _RG_NUM_ROWS:
            rows = _zigzag(data, pos)[0]
        elif fid == _RG_ORDINAL:
            ordinal = (field_start, pos, end)
        pos = end
    if ordinal is not None and ordinal[2] != pos - 1:
        raise CannotSplice("a row group's ordinal is not its last field")
    return RowGroup(start, pos, rows, offsets, ordinal)


def scan_footer(data: bytes) -> Footer:
    """Scan a FileMetaData struct: top-level spans, and each row group's offsets."""
    spans: dict[int, tuple[int, int]] = {}
    groups: list[RowGroup] = []
    try:
        for fid, _, pos, end in _fields(data, 0):
            spans[fid] = (pos, end)
            if fid == _FMD_ROW_GROUPS:
                groups = _scan_row_groups(data, pos)
    except IndexError:
        raise ThriftError("footer ends inside a value") from None
    if any(fid in spans for fid in _FMD_ENCRYPTION):
        raise CannotSplice("the file is encrypted")
    return Footer(data, spans, groups)


def _scan_row_groups(data: bytes, pos: int) -> list[RowGroup]:
    count, item = _list_items(data, pos)
    groups = []
    for _ in range(count):
        groups.append(_scan_row_group(data, item))
        item = groups[-1].end
    return groups


def scan_part(data: bytes, like: Footer) -> Footer:
    """Scan the footer of a file written like ``like`` (a footer without row groups): every byte
    but the row count and the row groups must be ``like``'s, which is checked by comparing
    them, not by reading them (the schema alone is a few hundred values)."""
    rows_start, rows_end = like.spans[_FMD_NUM_ROWS]
    groups_start, groups_end = like.spans[_FMD_ROW_GROUPS]
    head, between, tail = (like.data[:rows_start], like.data[rows_end:groups_start],
                           like.data[groups_end:])
    if not data.startswith(head):
        raise CannotSplice("another Parquet schema or writer")
    try:
        pos = _varint(data, len(head))[1]
        if data[pos:pos + len(between)] != between:
            raise CannotSplice("another footer layout")
        start = pos + len(between)
        groups = _scan_row_groups(data, start)
    except IndexError:
        raise ThriftError("footer ends inside a value") from None
    end = groups[-1].end if groups else _list_items(data, start)[1]
    if data[end:] != tail:
        raise CannotSplice("another Arrow schema or key-value metadata")
    return Footer(data, {_FMD_NUM_ROWS: (len(head), pos), _FMD_ROW_GROUPS: (start, end)}, groups)


def moved(footer: Footer, group: RowGroup, delta: int, ordinal: int) -> bytes:
    """A row group's footer bytes with its file offsets moved ``delta`` bytes and its ordinal
    set to ``ordinal`` (dropped past the i16 range; only encryption uses it)."""
    data = footer.data
    edits = [(s, e, encode_zigzag(v + delta)) for s, e, v in group.offsets]
    if group.ordinal is not None:
        field_start, s, e = group.ordinal
        edits.append((s, e, encode_zigzag(ordinal)) if ordinal <= 0x7FFF else (field_start, e, b""))
    edits.sort()
    out = []
    at = group.start
    for s, e, new in edits:
        out.append(data[at:s])
        out.append(new)
        at = e
    out.append(data[at:group.end])
    return b"".join(out)


# -- Parquet files ----------------------------------------------------------------------------

def read_footer(fh: BinaryIO, size: int, like: Footer | None = None) -> tuple[Footer, int]:
    """The scanned footer of an open Parquet file and where it starts (= where the row data ends);
    with ``like``, scanned by :func:`scan_part`."""
    if size < 12:
        raise CannotSplice("too short to be a Parquet file")
    fh.seek(size - 8)
    tail = fh.read(8)
    if tail[4:] != MAGIC:
        raise CannotSplice("not a plain Parquet file (encrypted, or not Parquet)")
    length = struct.unpack("<I", tail[:4])[0]
    start = size - 8 - length
    if start < len(MAGIC):
        raise CannotSplice("footer length runs past the start of the file")
    fh.seek(start)
    data = fh.read(length)
    return (scan_footer(data) if like is None else scan_part(data, like)), start


def _template(schema: pa.Schema, options: dict[str, Any]) -> Footer:
    """The footer pyarrow writes for an empty file of ``schema``: the target's Parquet schema,
    key-value metadata (the Arrow schema included) and writer fields, with no row group."""
    buf = io.BytesIO()
    pq.write_table(schema.empty_table(), buf, **options)
    data = buf.getvalue()
    return read_footer(io.BytesIO(data), len(data))[0]


def splice(parts: Sequence[Path], out: BinaryIO, schema: pa.Schema, options: dict[str, Any]) -> int:
    """Write to ``out`` one Parquet file holding every row group of ``parts``, in order, under
    ``schema`` (whose metadata becomes the file's); returns the rows written.

    Each part must have been written by pyarrow with ``options`` from a table of ``schema``
    without its metadata (what :func:`deposium.producer.schema.rows_table` builds), else
    :class:`CannotSplice` is raised before anything is written to ``out``.
    """
    target = _template(schema, options)
    plain = _template(schema.remove_metadata(), options)
    for footer in (target, plain):
        if _FMD_NUM_ROWS not in footer.spans or _FMD_ROW_GROUPS not in footer.spans:
            raise CannotSplice("pyarrow wrote a footer without a row count or row groups")
        if footer.spans[_FMD_NUM_ROWS][1] > footer.spans[_FMD_ROW_GROUPS][0]:
            raise CannotSplice("pyarrow wrote the row groups before the row count")
    footers: list[tuple[Path, Footer, int]] = []
    for path in parts:
        with open(path, "rb") as fh:
            try:
                footer, start = read_footer(fh, os.fstat(fh.fileno()).st_size, like=plain)
            except CannotSplice as exc:
                raise CannotSplice(f"{path.name}: {exc}") from None
        footers.append((path, footer, start))

    groups: list[bytes] = []
    rows = 0
    out.write(MAGIC)
    position = len(MAGIC)
    for path, footer, start in footers:
        for group in footer.row_groups:
            groups.append(moved(footer, group, position - len(MAGIC), len(groups)))
            rows += group.rows
        with open(path, "rb") as fh:
            fh.seek(len(MAGIC))
            remaining = start - len(MAGIC)
            while remaining:
                chunk = fh.read(min(remaining, 1 << 20))
                if not chunk:
                    raise CannotSplice(f"{path.name} shrank while it was copied")
                out.write(chunk)
                remaining -= len(chunk)
        position += start - len(MAGIC)

    data = target.data
    (rows_start, rows_end), (groups_start, groups_end) = (target.spans[_FMD_NUM_ROWS],
                                                          target.spans[_FMD_ROW_GROUPS])
    footer_bytes = b"".join([data[:rows_start], encode_zigzag(rows), data[rows_end:groups_start],
                             _list_header(len(groups), _STRUCT), *groups, data[groups_end:]])
    out.write(footer_bytes)
    out.write(struct.pack("<I", len(footer_bytes)))
    out.write(MAGIC)
    return rows
