"""Small, dependency-free statistics for timings and token lengths.

Why our own (numpy only): the bench must report the same figures whatever else is
installed, and each figure is defined here once (nearest-rank percentiles, spread as
(max - min) / median across repeats), so the report can say exactly what it shows.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100]); a value that actually occurred, no interpolation."""
    if not values:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError(f"q must be within [0, 100], got {q}")
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return float(ordered[rank - 1])


def median(values: Sequence[float]) -> float:
    """Middle value (mean of the two middle ones for an even count)."""
    if not values:
        raise ValueError("median of no values")
    ordered = sorted(values)
    mid = len(ordered) // 2
    return float(ordered[mid]) if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


@dataclass(frozen=True)
class Summary:
    """Distribution of one measured quantity."""

    n: int
    median: float
    p95: float
    min: float
    max: float
    #: (max - min) / median: how far repeats of the same measurement disagree (0 = identical).
    spread: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def summarize(values: Sequence[float]) -> Summary:
    """Median, p95, extremes and relative spread of ``values``."""
    med = median(values)
    lo, hi = float(min(values)), float(max(values))
    return Summary(n=len(values), median=med, p95=percentile(values, 95), min=lo, max=hi,
                   spread=(hi - lo) / med if med else 0.0)


@dataclass(frozen=True)
class TokenStats:
    """Token-length distribution of a corpus (model tokens, prompt and special tokens included)."""

    paragraphs: int
    tokens: int
    mean: float
    p10: float
    p50: float
    p90: float
    p99: float
    max: int
    #: (lower bound inclusive, upper bound exclusive, count); the last bin is open-ended.
    histogram: list[tuple[int, int | None, int]]


#: Histogram edges in tokens; they match the model limits that matter (128, 256, 512).
EDGES = (0, 16, 32, 64, 128, 256, 512)


def token_stats(lengths: Sequence[int], edges: Sequence[int] = EDGES) -> TokenStats:
    """Summarize paragraph lengths in tokens. Why a histogram: a mean hides the long tail
    that decides padding waste and the per-paragraph latency users see."""
    if not lengths:
        raise ValueError("no paragraphs")
    bins: list[tuple[int, int | None, int]] = []
    for i, lo in enumerate(edges):
        hi = edges[i + 1] if i + 1 < len(edges) else None
        count = sum(1 for n in lengths if n >= lo and (hi is None or n < hi))
        bins.append((lo, hi, count))
    return TokenStats(
        paragraphs=len(lengths), tokens=int(sum(lengths)), mean=sum(lengths) / len(lengths),
        p10=percentile(lengths, 10), p50=percentile(lengths, 50), p90=percentile(lengths, 90),
        p99=percentile(lengths, 99), max=int(max(lengths)), histogram=bins,
    )


def format_token_stats(stats: TokenStats) -> str:
    """Human-readable lines (printed by the CLI, embedded in the report)."""
    lines = [f"{stats.paragraphs:,} paragraphs, {stats.tokens:,} tokens; mean {stats.mean:.1f}, "
             f"p10 {stats.p10:.0f}, median {stats.p50:.0f}, p90 {stats.p90:.0f}, p99 {stats.p99:.0f}, "
             f"max {stats.max}"]
    width = max((c for *_, c in stats.histogram), default=1) or 1
    for lo, hi, count in stats.histogram:
        label = f"{lo}-{hi - 1}" if hi is not None else f">={lo}"
        lines.append(f"  {label:>8} tokens: {count:6,d} {'#' * round(40 * count / width)}")
    return "\n".join(lines)
