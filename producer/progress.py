"""Progress display: a tqdm bar on a terminal, nothing otherwise, and one summary line.

Why separate from the runner: the runner only reports counts; whether they become a bar
(TTY), nothing (cron, CI logs) or a callback (library users) is a presentation choice.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO


class Progress:
    """Paragraph bar with tokens/s, failed count and an ETA (from ``total`` or input bytes)."""

    def __init__(self, *, enabled: bool | None = None, total: int | None = None,
                 total_bytes: int | None = None, read_bytes: Callable[[], int] | None = None,
                 initial: int = 0, stream: TextIO | None = None) -> None:
        stream = stream or sys.stderr
        if enabled is None:
            enabled = bool(getattr(stream, "isatty", lambda: False)())
        self.total_bytes = total_bytes
        self.read_bytes = read_bytes
        #: text of paragraphs handed to batches so far (committed text / this = share of read input done)
        self.text_read = 0
        self.started = time.monotonic()
        self.tokens = 0
        self.failed = 0
        self.nbytes = 0
        self._bar = None
        if enabled:
            import shutil

            from tqdm import tqdm

            # a pseudo-terminal without a size reports 0 columns: tqdm would then draw nothing
            sized = shutil.get_terminal_size((0, 0)).columns > 0
            self._bar = tqdm(total=total, initial=initial, unit="par", file=stream, dynamic_ncols=sized,
                             ncols=None if sized else 110, nrows=None if sized else 24, smoothing=0.1,
                             desc="embedding")

    def update(self, paragraphs: int, tokens: int, failed: int, nbytes: int) -> None:
        self.tokens += tokens
        self.failed += failed
        self.nbytes += nbytes
        if self._bar is None:
            return
        elapsed = max(time.monotonic() - self.started, 1e-9)
        postfix = {"tok/s": f"{self.tokens / elapsed:,.0f}", "failed": self.failed}
        known = self.total_bytes and self.read_bytes and self.nbytes and self.text_read
        if self._bar.total is None and known:
            # share of the input done = share of input read x share of read text committed
            done = min(self.read_bytes() / self.total_bytes, 1.0) * min(self.nbytes / self.text_read, 1.0)
            postfix["eta"] = _clock(elapsed * (1 - done) / max(done, 1e-9))
        self._bar.set_postfix(postfix, refresh=False)
        self._bar.update(paragraphs + failed)

    def input_done(self, paragraphs: int) -> None:
        """All input is read: the total is now known, so tqdm's own ETA takes over."""
        if self._bar is not None and self._bar.total is None:
            self._bar.total = paragraphs
            self._bar.refresh()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
