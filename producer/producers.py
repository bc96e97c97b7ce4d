"""``deposium-submit --producers N``: one job run by N producer processes on this machine.

Why child processes running the same command with ``--shard k/N``: a producer's coordination
work (reading, splitting, hashing, packing, sink writes) is one Python thread per process, so N
cores need N processes; and a sharded run started this way is exactly the run an operator
would start by hand on several machines, resumable shard by shard with the same command.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Sequence

#: Exit codes from best to worst: ok, finished with failures, stopped, interrupted, could not run.
_SEVERITY = {0: 0, 1: 1, 3: 2, 130: 3, 2: 4}


def child_argv(argv: Sequence[str]) -> list[str]:
    """The command line without ``--producers N`` / ``--producers=N``."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg == "--producers":
            skip = True
            continue
        if arg.startswith("--producers="):
            continue
        out.append(arg)
    return out


def worst(codes: Sequence[int]) -> int:
    """The exit code that says the most about what went wrong (a signal death counts as 2)."""
    return max(codes, key=lambda c: _SEVERITY.get(c, 5), default=0) if codes else 0


def run_producers(argv: Sequence[str], count: int, *, progress: bool | None = None) -> int:
    """Run ``count`` shards of the command and wait for all; Ctrl-C stops them all (exit 130)."""
    base = [sys.executable, "-m", "deposium.producer.cli", *child_argv(argv)]
    if progress is None:
        base.append("--no-progress")  # N bars on one terminal would overwrite each other
    children = [subprocess.Popen([*base, "--shard", f"{k}/{count}"]) for k in range(count)]
    try:
        codes = [child.wait() for child in children]
    except KeyboardInterrupt:
        for child in children:
            if child.poll() is None:
                child.send_signal(signal.SIGINT)
        for child in children:
            child.wait()
        print("deposium-submit: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130
    return worst([c if c >= 0 else 2 for c in codes])
