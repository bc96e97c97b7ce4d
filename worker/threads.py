"""Pin every native thread pool to one thread, before any of them is created.

Why: on throttled container CPUs (Railway) a runtime that spawned one thread per
visible core made a single paragraph take 40 s — threads fought over a quota of one
core. Each worker process owns exactly one core's worth of work, so every library
that could start a pool (OpenMP, MKL, OpenBLAS, the ``tokenizers`` Rayon pool) is
told "one" here. These variables are read once, when the library initialises, so
:func:`pin_single_thread` runs before ``onnxruntime`` is imported (see the top of
``deposium.worker.embedder``) and before ``tokenizers`` encodes anything (``deposium.worker.tokenize``).

This module *writes* the environment for native libraries; it reads no
configuration (that is :mod:`deposium.worker.config`'s job).
"""

from __future__ import annotations

import os

#: Variables that size native thread pools, all forced to one thread.
SINGLE_THREAD_ENV: dict[str, str] = {
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "NUMEXPR_NUM_THREADS": "1",
    "VECLIB_MAXIMUM_THREADS": "1",
    "BLIS_NUM_THREADS": "1",
    "RAYON_NUM_THREADS": "1",
    # tokenizers' batch encoding otherwise starts a Rayon pool sized to the visible cores,
    # and after a fork it prints a warning per child.
    "TOKENIZERS_PARALLELISM": "false",
}


def pin_single_thread() -> None:
    """Force the single-thread values (an operator's ``OMP_NUM_THREADS=8`` would break the design)."""
    os.environ.update(SINGLE_THREAD_ENV)
