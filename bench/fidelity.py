"""Fidelity of every single-core configuration: cosine of its vectors against torch fp32's.

Why beside the timings: a faster configuration is only a win if its vectors stay those of
the model. Every configuration embeds the same paragraphs in the timed passes anyway, so the
vectors of the last pass are kept (outside the timed window) and compared row by row with the
reference configuration's, sentence-transformers on torch fp32 (what every user starts from).
numpy only.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

#: The configuration every other one is compared with (its batched row when there are two).
REFERENCE = "ST torch fp32"


def as_vectors(output: object) -> np.ndarray | None:
    """The 2-D float matrix a configuration's call returned (an array, an EmbedResult with
    ``.vectors``, or a list of rows), or None when it returned no vectors."""
    output = getattr(output, "vectors", output)
    if output is None:
        return None
    try:
        matrix = np.asarray(output, dtype=np.float32)
    except (TypeError, ValueError):
        return None
    return matrix if matrix.ndim == 2 and matrix.shape[0] > 0 else None


def row_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine of each row of ``a`` with the same row of ``b`` (a zero row scores 0)."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"cannot compare vectors of shape {a.shape} with {b.shape}")
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    dots = np.einsum("ij,ij->i", a, b)
    return np.divide(dots, norms, out=np.zeros_like(dots), where=norms > 0)


def reference_index(names: Sequence[str], batchings: Sequence[str], has_vectors: Sequence[bool],
                    reference: str = REFERENCE) -> int | None:
    """Which configuration is the reference: ``reference`` with vectors, batched row first."""
    candidates = [i for i, (n, ok) in enumerate(zip(names, has_vectors, strict=True)) if n == reference and ok]
    batched = [i for i in candidates if batchings[i] != "1"]
    return (batched or candidates or [None])[0]


def apply_fidelity(timings: Sequence[object], reference: str = REFERENCE) -> int | None:
    """Set ``cosine_mean``/``cosine_min`` on every timing that kept vectors, against the reference
    configuration's vectors on the same paragraphs; mark the reference (``is_reference``). Returns
    the reference's index, or None (then no configuration gets a cosine: there is nothing to compare
    with). The kept vectors are dropped afterwards (they are not part of the report)."""
    vectors = [getattr(t, "vectors", None) for t in timings]
    ref = reference_index([t.name for t in timings], [t.batching for t in timings],  # type: ignore[attr-defined]
                          [v is not None for v in vectors], reference)
    if ref is not None:
        for t, v in zip(timings, vectors, strict=True):
            if v is None or v.shape != vectors[ref].shape:
                continue
            cos = row_cosines(v, vectors[ref])
            t.cosine_mean, t.cosine_min = float(cos.mean()), float(cos.min())  # type: ignore[attr-defined]
        timings[ref].is_reference = True  # type: ignore[attr-defined]
    for t in timings:
        t.vectors = None  # type: ignore[attr-defined]
    return ref
