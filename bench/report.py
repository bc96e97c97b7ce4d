"""The benchmark report and its plot, written from one run's figures.

Why generated, never edited by hand: every speed claim in the report must come from the run
that produced it, next to the machine, versions and command that ran it. Sections whose part
was skipped say so (and why) instead of disappearing, so a reader can tell "not measured"
from "measured and fine".
"""

from __future__ import annotations

import os
import platform
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from deposium.bench.stats import TokenStats, format_token_stats, median
from deposium.bench.timing import Roofline, Timing

#: Every section the report always has, in order (tests check them).
SECTIONS = ("Machine", "Command", "Corpus", "Single core", "Goals", "EmbeddingGemma-shaped",
            "End to end", "Where the time goes", "Noise", "Plot")

#: The project's speed goals (shown against, never asserted).
GOAL_INT8_VS_TORCH = 4.0
GOAL_INT8_VS_ST_ONNX = 1.3
GOAL_ROOFLINE = 0.5
GOAL_QUEUE_OVERHEAD = 0.05
GOAL_SCALING = 1.8
GOAL_QUERY_MS = 15.0
PACKAGES = ("onnxruntime", "tokenizers", "numpy", "torch", "transformers", "sentence-transformers", "optimum",
            "optimum-onnx", "openvino", "optimum-intel", "nncf", "llama-cpp-python", "celery", "redis", "matplotlib")


@dataclass
class BenchResult:
    """Everything one ``deposium-bench`` run measured (None = that part was skipped)."""

    command: str
    corpus_label: str
    token_stats: TokenStats
    lengths: list[int]
    repeats: int
    timings: list[Timing] = field(default_factory=list)
    single_skipped: str | None = None
    gemma: dict[int, dict[str, object]] | None = None
    gemma_ops_per_token: float | None = None
    gemma_skipped: str | None = None
    roofline: Roofline | None = None
    e2e: list[object] | None = None
    e2e_overhead: dict[str, float] | None = None
    e2e_skipped: str | None = None
    #: (what was profiled, [(op type, ms, %)]).
    profiles: list[tuple[str, list[tuple[str, float, float]]]] = field(default_factory=list)
    machine: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    reduced: list[str] = field(default_factory=list)
    elapsed_s: float = 0.0
    #: Which of our artifacts ran, with the recipe each holds (from its manifest).
    artifacts: list[str] = field(default_factory=list)
    #: The prompt every single-core configuration embedded with.
    prompt: str = ""
    #: Short-query latency (models with a ``query`` prompt), see timing.query_latency.
    queries: dict[str, object] | None = None
    #: Optional peers: what ran (one sentence each) or why it was skipped.
    peers: list[str] = field(default_factory=list)
    #: STS-B Spearman x100 by configuration-name prefix, from the int8 artifact's validation record.
    stsb: dict[str, float] = field(default_factory=dict)


def machine_info() -> dict[str, str]:
    """CPU model, the SIMD flags that decide int8 speed, cores, load, memory, versions."""
    info: dict[str, str] = {"python": platform.python_version(), "platform": platform.platform()}
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        cpuinfo = ""
    model = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.M)
    info["cpu"] = model.group(1).strip() if model else platform.processor() or "unknown"
    flags_line = re.search(r"^flags\s*:\s*(.+)$", cpuinfo, re.M)
    flags = set(flags_line.group(1).split()) if flags_line else set()
    wanted = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni",
              "avx512_bf16", "amx_int8")
    info["flags"] = " ".join(f for f in wanted if f in flags) or "none of the SIMD flags we look for"
    info["missing flags"] = " ".join(f for f in wanted if f not in flags) or "none"
    from deposium.worker.cpu import cpu_features
    from deposium.worker.variant import u8s8_saturates

    info["u8 x s8 int8 GEMM"] = ("saturates with 8-bit operands (their artifacts run the u8 x u8 kernel here, "
                                 "worker/variant.py)" if u8s8_saturates(cpu_features()) else "exact")
    try:  # which code produced the figures (a dirty tree is said so)
        import subprocess

        here = Path(__file__).parent
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        if rev:
            info["git commit"] = rev + (" (working tree has uncommitted changes)" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    info["cores"] = f"{os.cpu_count()} visible, {len(os.sched_getaffinity(0))} usable by this process"
    try:
        info["load average at start"] = " ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        pass
    for package in PACKAGES:
        try:
            info[f"version {package}"] = version(package)
        except PackageNotFoundError:
            pass
    return info


def _fmt_ratio(x: float | None) -> str:
    return "—" if x is None else f"{x:.2f}×"


def _fmt_cosine(t: Timing) -> tuple[str, str]:
    """(mean, min) cosine vs the reference for the table; the reference itself says so."""
    if t.is_reference:
        return "reference", "reference"
    if t.cosine_mean is None or t.cosine_min is None:
        return "—", "—"
    return f"{t.cosine_mean:.4f}", f"{t.cosine_min:.4f}"


def _peer_rate(timings: Sequence[Timing], prefix: str, batched: bool) -> float | None:
    for t in timings:
        if t.kind == "peer" and t.name.startswith(prefix) and (t.batching != "1") == batched:
            return t.tokens_per_s
    return None


def _best(timings: Sequence[Timing], predicate: object) -> Timing | None:
    chosen = [t for t in timings if predicate(t)]  # type: ignore[operator]
    return max(chosen, key=lambda t: t.tokens_per_s) if chosen else None


def goal_rows(result: BenchResult) -> list[tuple[str, str, str, str]]:
    """(goal, measured, target, met?) rows; '—' where that part did not run."""
    rows = []
    t = result.timings
    ours = _best(t, lambda x: x.kind == "ours" and "int8" in x.name)
    torch_ = _best(t, lambda x: x.name.startswith("ST torch"))
    st_onnx = _best(t, lambda x: x.name.startswith("ST ONNX"))

    def row(goal: str, value: float | None, target: float, fmt: str, higher: bool = True) -> None:
        if value is None:
            rows.append((goal, "not measured", fmt.format(target), "—"))
            return
        met = value >= target if higher else value < target
        bound = ("≥ " if higher else "< ") + fmt.format(target)
        rows.append((goal, fmt.format(value), bound, "yes" if met else "**no**"))

    row("int8 Embedder vs torch fp32 (best vs best, tokens/s)",
        ours.tokens_per_s / torch_.tokens_per_s if ours and torch_ else None, GOAL_INT8_VS_TORCH, "{:.2f}×")
    row("int8 Embedder vs ST ONNX int8 (best vs best)",
        ours.tokens_per_s / st_onnx.tokens_per_s if ours and st_onnx else None, GOAL_INT8_VS_ST_ONNX, "{:.2f}×")
    for label, prefix in (("OpenVINO static int8", "ST OpenVINO"), ("llama.cpp", "llama.cpp")):
        peer = _best(t, lambda x, p=prefix: x.kind == "peer" and x.name.startswith(p))
        if peer is None:
            continue
        row(f"int8 Embedder vs {label} (best vs best, tokens/s)",
            ours.tokens_per_s / peer.tokens_per_s if ours else None, 1.0, "{:.2f}×")
        rows.append(fidelity_row(f"int8 Embedder vs {label}: cosine vs torch fp32 (mean / min)", ours, peer))
    if result.queries is not None:
        q = result.queries["summary"]
        row(f"Short query (≤ {result.queries['max_tokens']} tokens, query prompt), CPU ms median",
            q.median, GOAL_QUERY_MS, "{:.1f} ms", higher=False)
    frac = gemma_roofline_fraction(result)
    row("EmbeddingGemma-shaped int8: fraction of int8 roofline at 128 tokens", frac, GOAL_ROOFLINE, "{:.0%}")
    g128 = (result.gemma or {}).get(128)
    row("EmbeddingGemma-shaped: one 128-token paragraph, CPU ms", g128["summary"].median if g128 else None,
        1000.0, "{:,.0f} ms", higher=False)
    ov = result.e2e_overhead or {}
    row("Queue overhead (1 worker vs in-process, wall rate)", ov.get("queue_overhead_wall"), GOAL_QUEUE_OVERHEAD,
        "{:.1%}", higher=False)
    row("Queue overhead (CPU per paragraph, all processes)", ov.get("queue_overhead_cpu"), GOAL_QUEUE_OVERHEAD,
        "{:.1%}", higher=False)
    row("Scaling 1 → 2 worker processes (wall rate)", ov.get("scaling"), GOAL_SCALING, "{:.2f}×")
    return rows


def fidelity_row(goal: str, ours: Timing | None, peer: Timing) -> tuple[str, str, str, str]:
    """Ours must be at least as close to torch fp32 as the peer, on the mean and on the worst paragraph."""
    if ours is None or None in (ours.cosine_mean, ours.cosine_min, peer.cosine_mean, peer.cosine_min):
        return goal, "not measured", "ours ≥ peer", "—"
    met = ours.cosine_mean >= peer.cosine_mean and ours.cosine_min >= peer.cosine_min  # type: ignore[operator]
    measured = (f"ours {ours.cosine_mean:.4f} / {ours.cosine_min:.4f}, "
                f"peer {peer.cosine_mean:.4f} / {peer.cosine_min:.4f}")
    return goal, measured, "ours ≥ peer (both)", "yes" if met else "**no**"


def gemma_roofline_fraction(result: BenchResult, length: int = 128) -> float | None:
    """Achieved int8 ops/s at ``length`` tokens over the measured int8 peak."""
    g = (result.gemma or {}).get(length)
    if not g or not result.roofline or not result.gemma_ops_per_token:
        return None
    return float(g["tokens_per_s"]) * result.gemma_ops_per_token / result.roofline.int8_peak


def _single_section(result: BenchResult) -> list[str]:
    if result.single_skipped:
        return [f"Skipped: {result.single_skipped}."]
    t = result.timings
    lines = [
        f"Same {result.token_stats.paragraphs:,} paragraphs ({result.token_stats.tokens:,} tokens) for every "
        f"configuration, one thread each, {result.repeats} passes run round-robin. Rates use the median pass "
        "CPU time; ms/paragraph is each paragraph's share of its call's CPU time (median over passes), "
        "then median and p95 over paragraphs. Ratios compare like with like: batch-1 rows against the "
        "peer at batch 1, batched rows against the peer's batched row. Cosine: each configuration's "
        "vectors (last pass) against (1) torch fp32's batched row on the same paragraphs, mean and "
        "minimum over paragraphs.",
        "",
    ]
    if result.prompt:
        lines += [f"Every configuration embeds with the same prompt: {result.prompt}.", ""]
    if result.peers:
        lines += ["Optional peers:", "", *[f"- {p}" for p in result.peers], ""]
    lines += [
        "| configuration | batching | median ms/paragraph | p95 ms/paragraph | paragraphs/s | tokens/s "
        "| × (1) torch fp32 | × (2) ST ONNX int8 | cosine vs (1) mean | cosine vs (1) min | pass spread "
        "| CPU share |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for x in t:
        batched = x.batching != "1"
        torch_rate = _peer_rate(t, "ST torch", batched)
        onnx_rate = _peer_rate(t, "ST ONNX", batched)
        cos_mean, cos_min = _fmt_cosine(x)
        lines.append(
            f"| {x.name} | {x.batching} | {x.ms_median:.2f} | {x.ms_p95:.2f} | {x.paragraphs_per_s:,.1f} | "
            f"{x.tokens_per_s:,.0f} | {_fmt_ratio(x.tokens_per_s / torch_rate if torch_rate else None)} | "
            f"{_fmt_ratio(x.tokens_per_s / onnx_rate if onnx_rate else None)} | {cos_mean} | {cos_min} | "
            f"{x.pass_cpu.spread:.0%} | {x.cpu_share:.0%} |")
    lines += ["", "(1) and (2) are the peers (sentence-transformers); \"pass spread\" = (max − min) / median "
              "of the passes' CPU time; \"CPU share\" = CPU time / wall time (below 100 % = the core was "
              "shared with other work while this configuration ran); \"—\" in the cosine columns = no "
              "torch fp32 vectors to compare with in this run."]
    return lines


def _query_section(result: BenchResult) -> list[str]:
    if result.queries is None:
        return []
    q, r = result.queries["summary"], result.queries
    return ["### Short queries", "",
            f"Our int8 artifact, one query per call with the `query` prompt, {r['queries']} queries of "
            f"{r['mean_tokens']:.1f} tokens on average (max {r['max_tokens']}), {q.n} timed calls, CPU time:", "",
            "| median ms | p95 ms | min ms | max ms |", "|---:|---:|---:|---:|",
            f"| {q.median:.2f} | {q.p95:.2f} | {q.min:.2f} | {q.max:.2f} |", ""]


def _gemma_section(result: BenchResult) -> list[str]:
    lines = []
    if result.roofline:
        r = result.roofline
        lines += ["Roofline of this core, measured in ONNX Runtime with one thread (median of repeats, "
                  "ops = 2·M·K·N):", "", "| shape M×K×N | int8 `MatMulInteger` GOP/s | fp32 `MatMul` GFLOP/s |",
                  "|---|---:|---:|"]
        for shape in r.int8_ops:
            lines.append(f"| {shape} | {r.int8_ops[shape] / 1e9:.1f} | {r.fp32_ops.get(shape, 0) / 1e9:.1f} |")
        lines += ["", f"int8 peak used below: **{r.int8_peak / 1e9:.1f} GOP/s** (fp32 {r.fp32_peak / 1e9:.1f} "
                  f"GFLOP/s; worst repeat spread {r.spread:.0%}).", ""]
    if result.gemma_skipped:
        return lines + [f"Gemma-shaped timing skipped: {result.gemma_skipped}."]
    if not result.gemma:
        return lines + ["Gemma-shaped timing not measured."]
    opt = result.gemma_ops_per_token or 0
    lines += [f"Random-weight Gemma3 (24 layers, hidden 768, vocab 262144, Dense 768→3072→768), converted with "
              f"the default recipe, batch 1, one thread; {opt / 1e6:,.0f} M int8 ops per token counted in the "
              "graph (MatMulInteger weights; fp32 attention scores not counted).", "",
              "| tokens | median ms/paragraph | p95 ms | spread | tokens/s | int8 GOP/s reached | "
              "fraction of roofline |", "|---:|---:|---:|---:|---:|---:|---:|"]
    for _, g in sorted(result.gemma.items()):
        s = g["summary"]
        tps = float(g["tokens_per_s"])
        gops = tps * opt / 1e9
        frac = f"{tps * opt / result.roofline.int8_peak:.0%}" if result.roofline and opt else "—"
        lines.append(f"| {g['tokens']:.0f} | {s.median:,.0f} | {s.p95:,.0f} | {s.spread:.0%} | {tps:,.0f} | "
                     f"{gops:.1f} | {frac} |")
    return lines


def _e2e_section(result: BenchResult) -> list[str]:
    if result.e2e_skipped:
        return [f"Skipped: {result.e2e_skipped}."]
    if not result.e2e:
        return ["Not measured."]
    mib = 2 ** 20
    lines = ["`deposium-submit` on the same job (fresh output per mode): in-process (`--local`) and through a "
             "test-owned `redis-server` + `celery worker --pool prefork` with 1 and 2 processes, int8 artifact. "
             "CPU ms/paragraph sums the producer, the worker processes and redis-server.", "",
             "| mode | paragraphs | tokens | wall s | paragraphs/s (wall) | CPU ms/paragraph | producer peak RSS MiB "
             "| worker RSS start → end MiB (per child) | vectors identical to the first mode (min cosine) |",
             "|---|---:|---:|---:|---:|---:|---:|---|---|"]
    for r in result.e2e:
        rss = ", ".join(f"{a / mib:.0f} → {b / mib:.0f}" for a, b in zip(r.worker_rss_start, r.worker_rss_end,
                                                                        strict=False)) or "—"
        same_text = ("reference" if r.identical_to_first is None
                     else f"{r.identical_to_first:,} / {r.paragraphs:,} ({r.min_cosine_to_first:.6f})")
        lines.append(f"| {r.mode} | {r.paragraphs:,} | {r.tokens:,} | {r.wall_s:.1f} | {r.paragraphs_per_s:,.1f} | "
                     f"{r.cpu_ms_per_paragraph:.2f} | {r.producer_peak_rss / mib:.0f} | {rss} | {same_text} |")
    ov = result.e2e_overhead or {}
    parts = []
    if "queue_overhead_wall" in ov:
        parts.append(f"queue overhead {ov['queue_overhead_wall']:.1%} (wall rate), "
                     f"{ov['queue_overhead_cpu']:.1%} (CPU per paragraph)")
    if "scaling" in ov:
        parts.append(f"scaling 1→2 workers {ov['scaling']:.2f}×")
    if parts:
        lines += ["", "; ".join(parts) + "."]
    return lines


def _profile_section(result: BenchResult) -> list[str]:
    if not result.profiles:
        return ["No profile taken in this run."]
    lines = []
    for label, ops in result.profiles:
        lines += [f"**{label}** (ORT profiling, kernel time per op type):", "", "| op type | ms | % |",
                  "|---|---:|---:|"]
        for op, ms, pct in ops[:10]:
            lines.append(f"| {op} | {ms:,.1f} | {pct:.1f} |")
        rest = sum(p for *_, p in ops[10:])
        if rest:
            lines.append(f"| (other {len(ops) - 10} op types) | | {rest:.1f} |")
        lines.append("")
    return lines


def _noise_section(result: BenchResult) -> list[str]:
    spreads = [t.pass_cpu.spread for t in result.timings]
    shares = [t.cpu_share for t in result.timings]
    lines = []
    if spreads:
        lines.append(f"Single-core passes: CPU-time spread between passes median {median(spreads):.0%}, worst "
                     f"{max(spreads):.0%}; CPU share (CPU / wall) median {median(shares):.0%}, "
                     f"lowest {min(shares):.0%}.")
    load = result.machine.get("load average at start")
    end = result.machine.get("load average at end")
    if load:
        lines.append(f"Load average at start {load}, at end {end or '?'} on {os.cpu_count()} CPUs.")
    lines.append("CPU time per process is robust to other work sharing the core (it counts only our cycles) "
                 "but not to cache and memory-bandwidth contention, nor to hypervisor steal that is billed as "
                 "our time; wall-clock figures (end to end, scaling) are directly hit by load.")
    return lines


def render(result: BenchResult, plot_name: str | None) -> str:
    """The whole report's Markdown."""
    m = result.machine
    out = ["# Benchmarks", "",
           "Generated by `deposium-bench` — do not edit by hand; re-run the command below to refresh.", ""]
    if result.reduced:
        out += ["**Reduced run.** " + " ".join(result.reduced), ""]
    out += ["## Machine", ""]
    out += [f"- {k}: {v}" for k, v in m.items() if not k.startswith("version ")]
    out += ["- versions: " + ", ".join(f"{k.removeprefix('version ')} {v}" for k, v in m.items()
                                       if k.startswith("version "))]
    out += ["", "## Command", "", "```", result.command, "```", "",
            f"Total run time {result.elapsed_s / 60:.1f} min.", "",
            *[f"- {a}" for a in result.artifacts], *([""] if result.artifacts else []),
            "## Corpus", "", f"{result.corpus_label}. Token lengths (the model's tokenizer, prompt and special tokens "
            "included):",
            "", "```", format_token_stats(result.token_stats), "```", "",
            "## Single core", "", *_single_section(result), "",
            *_query_section(result),
            "## Goals", "", "The project's goals, shown against, never asserted in tests.", "",
            "| goal | measured | target | met |", "|---|---:|---:|---|",
            *[f"| {g} | {v} | {t} | {ok} |" for g, v, t, ok in goal_rows(result)], "",
            "## EmbeddingGemma-shaped", "", *_gemma_section(result), "",
            "## End to end", "", *_e2e_section(result), "",
            "## Where the time goes", "", *_profile_section(result), *result.notes, "",
            "## Noise", "", *_noise_section(result), "",
            "## Plot", ""]
    out += [f"![tokens/s per configuration and latency vs paragraph length]({plot_name})" if plot_name
            else "No plot (nothing timed per configuration, matplotlib missing, or plotting skipped)."]
    return "\n".join(out) + "\n"


def plot(result: BenchResult, path: Path) -> Path | None:
    """Two panels: tokens/s per configuration, and CPU ms per paragraph vs its length in tokens.
    None when the run timed nothing per configuration (e.g. end to end only): no empty axes."""
    if not result.timings and not result.gemma:
        return None
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8), dpi=80)
    bars = [(f"{t.name}\nbatch {t.batching}", t.tokens_per_s, t.kind) for t in result.timings]
    if result.gemma:
        bars += [(f"Gemma-shaped int8\n{n} tokens, batch 1", float(g["tokens_per_s"]), "gemma")
                 for n, g in sorted(result.gemma.items())]
    colors = {"peer": "#999999", "ours": "#1f77b4", "gemma": "#2ca02c"}
    if bars:
        y = range(len(bars))
        left.barh(list(y), [b[1] for b in bars], color=[colors[b[2]] for b in bars])
        left.set_yticks(list(y), [b[0] for b in bars], fontsize=7)
        left.invert_yaxis()
        for i, b in enumerate(bars):
            left.text(b[1], i, f" {b[1]:,.0f}", va="center", fontsize=7)
    left.set_xlabel("tokens/s on one core (CPU time)")
    left.set_title("Throughput per configuration (grey: peers)")
    edges = [0, 16, 32, 48, 64, 96, 128, 192, 256, 10 ** 9]
    for t in result.timings:
        xs, ys = [], []
        for lo, hi in zip(edges, edges[1:], strict=False):
            vals = [ms for ms, n in zip(t.ms_per_paragraph, result.lengths, strict=True) if lo <= n < hi]
            ns = [n for n in result.lengths if lo <= n < hi]
            if vals:
                xs.append(median(ns))
                ys.append(median(vals))
        style = "-" if t.batching == "1" else "--"
        right.plot(xs, ys, style, marker="o", markersize=3, label=f"{t.name}, batch {t.batching}")
    if result.gemma:
        pts = sorted((float(g["tokens"]), g["summary"].median) for g in result.gemma.values())
        right.plot([p[0] for p in pts], [p[1] for p in pts], "-s", color="black", label="Gemma-shaped int8, batch 1")
    right.set_xlabel("paragraph length (tokens)")
    right.set_ylabel("CPU ms per paragraph (median per length bin)")
    right.set_yscale("log")
    right.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    right.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    right.set_title("Latency vs paragraph length (dashed: batched share)")
    right.legend(fontsize=6)
    right.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def write_report(result: BenchResult, out: Path, plot_path: Path | None) -> tuple[Path, Path | None]:
    """Write the PNG (when possible) and the Markdown that links it (relative path)."""
    written = plot(result, plot_path) if plot_path is not None else None
    name = None
    if written is not None:
        name = os.path.relpath(written, out.parent)
    out.write_text(render(result, name), encoding="utf-8")
    return out, written
