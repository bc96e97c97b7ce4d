"""Read and split documents in a pool of processes (``--readers N``), in input order.

Why processes: PDF, HTML and DOCX extraction and token counting are CPU-bound Python and
native code holding the GIL for long stretches; one process per core is the only way a
producer keeps up with a fleet of workers. Why a sliding window of futures rather than
``Pool.imap``: results must come back in input order (ids, batches and so vectors do not
depend on N), and at most ``2 x N`` documents may be held at once whatever the job's size.
Record files (.jsonl, .csv, .parquet) and large text files stream in the calling process instead:
they hold many small documents (shipping them one by one would cost more than splitting them),
or stream block by block in bounded memory.
Reader processes are spawned, never forked: the caller may hold an ONNX Runtime session.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from deposium.producer.model import InputError, InputWarning, Paragraph

if TYPE_CHECKING:
    from deposium.producer.readers import Source
    from deposium.producer.tokens import TokenCounter


@dataclass(frozen=True)
class SplitSpec:
    """Everything a reader process needs to split exactly as the job does (picklable)."""

    artifact_dir: str
    task: str | None
    max_tokens: int | None
    min_chars: int
    chunk_tokens: int = 0
    chunk_overlap: int = 0


@dataclass(frozen=True)
class SplitDocument:
    """A document read and split by a reader process: its paragraphs, or why reading stopped."""

    id: str
    origin: str
    paragraphs: tuple[Paragraph, ...]
    failure: str | None = None


def available_cpus() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def split_source(source: Source, spec: SplitSpec, counter: TokenCounter) -> SplitDocument:
    """Split one source the way the job's runner would (the same functions, the same options)."""
    from deposium.producer.split import split_document

    parts = split_document(source.id, source.blocks(), counter, min_chars=spec.min_chars,
                           chunk_tokens=spec.chunk_tokens, chunk_overlap=spec.chunk_overlap, title=source.title)
    out: list[Paragraph] = []
    try:
        for p in parts:
            out.append(p)
    except (OSError, UnicodeDecodeError) as exc:
        return SplitDocument(source.id, source.origin, tuple(out), str(exc))
    return SplitDocument(source.id, source.origin, tuple(out))


#: The reader process's job options and tokenizer (set once by :func:`_start`).
_state: dict[str, Any] = {}


def _orphan_watch(parent: int) -> None:
    """Exit once the producer is gone (killed with -9, it cannot shut its readers down)."""
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(0)


def _start(spec: SplitSpec, parent: int) -> None:
    from deposium.producer.tokens import TokenCounter

    # Ctrl-C is the producer's to handle (it stops the pool); readers must not each print a traceback
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_orphan_watch, args=(parent,), daemon=True, name="orphan-watch").start()
    _state["spec"] = spec
    _state["counter"] = TokenCounter.from_artifact(Path(spec.artifact_dir), task=spec.task,
                                                   max_tokens=spec.max_tokens)


Task = tuple[str, str, bool, dict[str, Any]]


def _work(task: Task) -> list[InputError | InputWarning | SplitDocument]:
    from deposium.producer.readers import Source, file_sources

    doc_id, path, explicit, kwargs = task
    out: list[InputError | InputWarning | SplitDocument] = []
    for item in file_sources(Path(path), doc_id, explicit=explicit, **kwargs):
        out.append(split_source(item, _state["spec"], _state["counter"]) if isinstance(item, Source) else item)
    return out


class ReaderPool:
    """``readers`` processes, started on first use and stopped by :meth:`close`."""

    def __init__(self, readers: int, spec: SplitSpec) -> None:
        self.readers = readers
        self.spec = spec
        self._pool: ProcessPoolExecutor | None = None

    def _executor(self) -> ProcessPoolExecutor:
        if self._pool is None:
            self._pool = ProcessPoolExecutor(self.readers, mp_context=multiprocessing.get_context("spawn"),
                                             initializer=_start, initargs=(self.spec, os.getpid()))
        return self._pool

    def map(self, tasks: Iterable[Task]) -> Iterator[list[InputError | InputWarning | SplitDocument]]:
        """Results of ``tasks`` in order, with at most ``2 x readers`` submitted at a time."""
        window: deque[Future] = deque()
        for task in tasks:
            window.append(self._executor().submit(_work, task))
            if len(window) >= 2 * self.readers:
                yield window.popleft().result()
        while window:
            yield window.popleft().result()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
