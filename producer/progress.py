"""Progress display: a tqdm bar on a terminal, nothing otherwise, and one summary line.

Why separate from the runner: the runner only reports counts; whether they become a bar
(TTY), nothing (cron, CI logs) or a callback (library users) is a presentation choice.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    """Paragraph bar with tokens/s, failed count and an ETA (from ``total`` or input bytes)."""

    def __init__(self, *, enabled: bool | None = None, total: int | None = None,
                 total_bytes: int | None = None, initial: int = 0, stream: TextIO | None = None) -> None:
        stream = stream or sys.stderr
        if enabled is None:
            enabled = bool(getattr(stream, "isatty", lambda: False)())
        self.total_bytes = total_bytes
        self.started = time.monotonic()
        self.tokens = 0
        self.failed = 0
        self.nbytes = 0
        self._bar = None
        if enabled:
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=initial, unit="par", file=stream, dynamic_ncols=True,
                             smoothing=0.1, desc="embedding")

    def update(self, paragraphs: int, tokens: int, failed: int, nbytes: int) -> None:
        self.tokens += tokens
        self.failed += failed
        self.nbytes += nbytes
        if self._bar is None:
            return
        elapsed = max(time.monotonic() - self.started, 1e-9)
        postfix = {"tok/s": f"{self.tokens / elapsed:,.0f}", "failed": self.failed}
        if self._bar.total is None and self.total_bytes and self.nbytes:
            rate = self.nbytes / elapsed
            postfix["eta"] = _clock(max(self.total_bytes - self.nbytes, 0) / rate)
        self._bar.set_postfix(postfix, refresh=False)
        self._bar.update(paragraphs + failed)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
