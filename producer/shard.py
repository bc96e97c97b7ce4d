"""Which documents, batches, locks and records belong to one shard of a sharded job.

Why a hash of the document id: every producer of a job must agree, without talking to each
other, on who reads which document, and the split must not change when a run is resumed or
a file is added elsewhere in the inputs. ``sha256(document id) mod N`` depends on nothing
but the id, spreads any naming scheme evenly, and is known before a file is opened (a
file's id is its path), so a shard never extracts a document it does not own.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

_SPEC = re.compile(r"(\d+)/(\d+)")


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` of ``count`` (``count == 1``: the whole job, exactly as unsharded)."""

    index: int = 0
    count: int = 1

    @classmethod
    def parse(cls, raw: str) -> Shard:
        """``"i/N"`` with ``0 <= i < N``; ValueError with a one-line reason otherwise."""
        m = _SPEC.fullmatch(raw.strip())
        if m is None:
            raise ValueError(f"--shard {raw!r}: expected i/N, e.g. 0/4")
        index, count = int(m.group(1)), int(m.group(2))
        if count < 1 or count > 999:
            raise ValueError(f"--shard {raw!r}: N must be between 1 and 999")
        if index >= count:
            raise ValueError(f"--shard {raw!r}: i must be between 0 and {count - 1}")
        return cls(index, count)

    @property
    def sharded(self) -> bool:
        return self.count > 1

    def owns(self, document_id: str) -> bool:
        """Whether this shard reads the document named ``document_id``."""
        if self.count == 1:
            return True
        digest = hashlib.sha256(document_id.encode("utf-8", "surrogatepass")).digest()
        return int.from_bytes(digest[:4], "big") % self.count == self.index  # = int(hexdigest[:8], 16)

    @property
    def batch_prefix(self) -> str:
        """Prefix of this shard's batch ids, so shards never name the same batch."""
        return f"s{self.index:03d}-" if self.sharded else ""

    def key(self, job_id: str) -> str:
        """This shard's own name for the job: its record, its queue tasks, its locks.

        Only wire-safe characters, since queue mode names the shard's tasks with it.
        """
        return f"{job_id}.{self.index}-of-{self.count}" if self.sharded else job_id

    def label(self) -> str:
        return f"{self.index}/{self.count}"


WHOLE = Shard()


def pending_message(target: str, missing: list[int], count: int) -> str:
    """The line a finished shard prints while others still run."""
    names = ", ".join(str(i) for i in missing)
    which = f"shard {names} of {count} finishes" if len(missing) == 1 else f"shards {names} of {count} finish"
    return f"{target}: this shard is done; the output will be published when {which}"
