"""Timing on one core with CPU time, the int8 matmul roofline, and ORT per-op profiles.

Why CPU time (``time.process_time``) and not wall time: the bench must say something true
on a shared, throttled box. With every library pinned to one thread, the CPU time a process
consumed is the work done on one core, whatever else competes for that core; wall time is
recorded beside it so the report can show how loaded the machine was. Repeats are run
round-robin across configurations so a burst of load hits all of them, not one.

Only numpy and onnxruntime are imported here (no torch).
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from deposium.bench.stats import Summary, median, percentile, summarize

#: One configuration's work: embed these paragraphs (one call = one batch as the config sees it).
EmbedCall = Callable[[list[str]], object]


@dataclass
class Config:
    """A configuration to time: a name, how it groups paragraphs into calls, and the call."""

    name: str
    #: "peer" (what a user would pick instead) or "ours".
    kind: str
    #: How paragraphs are grouped into calls, for the report ("1", "32 (length-sorted)", ...).
    batching: str
    groups: list[list[int]]
    call: EmbedCall
    #: Warm up with one untimed pass over every group, not just a few: for runtimes that compile
    #: kernels per new input shape (OpenVINO), whose first sight of a length costs several times
    #: its steady state; a worker sees the same lengths again and again.
    warm_all: bool = False


@dataclass
class Timing:
    """What one configuration measured over ``repeats`` passes over the same paragraphs."""

    name: str
    kind: str
    batching: str
    paragraphs: int
    tokens: int
    #: CPU seconds of each full pass.
    cpu_s: list[float] = field(default_factory=list)
    #: Wall seconds of each full pass (load on the box shows up here, not in cpu_s).
    wall_s: list[float] = field(default_factory=list)
    #: Per paragraph (input order), the median over repeats of its share of its call's CPU ms.
    ms_per_paragraph: list[float] = field(default_factory=list)
    #: Vectors of the last pass (input order; None when the call returned none), kept only until
    #: :func:`deposium.bench.fidelity.apply_fidelity` has compared them with the reference's.
    vectors: object = field(default=None, repr=False)
    #: Cosine vs the reference configuration (torch fp32) on the same paragraphs: mean and min.
    cosine_mean: float | None = None
    cosine_min: float | None = None
    #: This configuration is the reference the cosines are measured against.
    is_reference: bool = False

    @property
    def pass_cpu(self) -> Summary:
        return summarize(self.cpu_s)

    @property
    def paragraphs_per_s(self) -> float:
        return self.paragraphs / median(self.cpu_s)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / median(self.cpu_s)

    @property
    def ms_median(self) -> float:
        return median(self.ms_per_paragraph)

    @property
    def ms_p95(self) -> float:
        return percentile(self.ms_per_paragraph, 95)

    @property
    def cpu_share(self) -> float:
        """CPU seconds / wall seconds over all passes: 1.0 = had the core to itself."""
        return sum(self.cpu_s) / sum(self.wall_s) if sum(self.wall_s) else 0.0


def batch_one(n: int) -> list[list[int]]:
    """Every paragraph alone, in input order."""
    return [[i] for i in range(n)]


def fixed_batches(lengths: Sequence[int], size: int) -> list[list[int]]:
    """Length-sorted groups of ``size`` (what sentence-transformers' ``encode`` does itself)."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    return [order[i:i + size] for i in range(0, len(order), size)]


def padded_ratio(groups: Sequence[Sequence[int]], lengths: Sequence[int]) -> float:
    """Tokens the model computes (each group padded to its longest row) per real token.

    Why report it: on one core every padded token costs as much as a real one, so a packing
    that looks efficient per call can lose to batch 1 on short, mixed-length paragraphs.
    """
    real = sum(lengths[i] for g in groups for i in g)
    padded = sum(len(g) * max(lengths[i] for i in g) for g in groups if g)
    return padded / real if real else 1.0


def time_configs(configs: Sequence[Config], paragraphs: Sequence[str], lengths: Sequence[int],
                 repeats: int, *, warmup: int = 4, log: Callable[[str], None] = print) -> list[Timing]:
    """Time every config over the same paragraphs, ``repeats`` passes each, round-robin.

    The vectors each call returns in the last pass are copied (outside the timed window) into
    ``Timing.vectors`` in input order, for the fidelity columns.
    """
    if repeats < 1:
        raise ValueError("repeats must be >= 1")
    import numpy as np

    tokens = int(sum(lengths))
    results = [Timing(c.name, c.kind, c.batching, len(paragraphs), tokens) for c in configs]
    shares: list[list[list[float]]] = [[[] for _ in paragraphs] for _ in configs]
    for c in configs:  # warm-up: first-call allocations and lazy initialisation are not the steady state
        if c.warm_all:
            for g in c.groups:
                c.call([paragraphs[i] for i in g])
        else:
            c.call([paragraphs[i] for g in c.groups[:warmup] for i in g][: max(1, warmup)])
    for r in range(repeats):
        for ci, c in enumerate(configs):
            cpu_total = 0.0
            wall0 = time.perf_counter()
            for group in c.groups:
                texts = [paragraphs[i] for i in group]
                t0 = time.process_time()
                out = c.call(texts)
                dt = time.process_time() - t0
                cpu_total += dt
                for i in group:
                    shares[ci][i].append(1000 * dt / len(group))
                if r == repeats - 1:
                    _keep_rows(results[ci], out, group, len(paragraphs))
            results[ci].cpu_s.append(cpu_total)
            results[ci].wall_s.append(time.perf_counter() - wall0)
            log(f"  pass {r + 1}/{repeats} {c.name:<32} {cpu_total:7.2f} s CPU, "
                f"{results[ci].wall_s[-1]:7.2f} s wall, {tokens / cpu_total:8,.0f} tokens/s")
    for ci, res in enumerate(results):
        res.ms_per_paragraph = [median(s) for s in shares[ci]]
        if res.vectors is not None and bool(np.isnan(res.vectors).all(axis=1).any()):  # type: ignore[arg-type]
            res.vectors = None  # some call returned no vectors: no fidelity rather than a partial one
    return results


def _keep_rows(timing: Timing, output: object, group: Sequence[int], n: int) -> None:
    """Store one call's vectors at their paragraphs' rows of ``timing.vectors`` (n x dim)."""
    import numpy as np

    from deposium.bench.fidelity import as_vectors

    rows = as_vectors(output)
    if rows is None or rows.shape[0] != len(group):
        return
    if timing.vectors is None:
        timing.vectors = np.full((n, rows.shape[1]), np.nan, dtype=np.float32)
    if timing.vectors.shape[1] == rows.shape[1]:  # type: ignore[attr-defined]
        timing.vectors[list(group)] = rows  # type: ignore[index]


# --- int8 roofline --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Roofline:
    """Measured peak of one core: int8 ``MatMulInteger`` and fp32 ``MatMul`` in ONNX Runtime."""

    #: (M, K, N) -> median ops/s (2*M*K*N per run) for each shape tried.
    int8_ops: dict[str, float]
    fp32_ops: dict[str, float]
    spread: float

    @property
    def int8_peak(self) -> float:
        return max(self.int8_ops.values())

    @property
    def fp32_peak(self) -> float:
        return max(self.fp32_ops.values())


ROOFLINE_SHAPES = ((128, 768, 3072), (256, 1152, 768), (512, 768, 768))


def _matmul_session(m: int, k: int, n: int, integer: bool) -> tuple[object, dict[str, object]]:
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from deposium.worker.config import load_settings
    from deposium.worker.cpu import cpu_features
    from deposium.worker.embedder import session_options
    from deposium.worker.variant import u8s8_saturates

    rng = np.random.default_rng(0)
    if integer:  # the kernel the worker runs here: u8 x u8 where u8 x s8 saturates (worker/variant.py)
        unsigned = u8s8_saturates(cpu_features())
        raw = rng.integers(-127, 128, (k, n), dtype=np.int16) + (128 if unsigned else 0)
        weight = numpy_helper.from_array(raw.astype(np.uint8 if unsigned else np.int8), "W")
        zp = numpy_helper.from_array(np.array(128, np.uint8), "zp")
        w_zp = numpy_helper.from_array(np.array(128, np.uint8), "w_zp")
        node = helper.make_node("MatMulInteger", ["A", "W", "zp"] + (["w_zp"] if unsigned else []), ["Y"])
        a_type, y_type, inits = TensorProto.UINT8, TensorProto.INT32, [weight, zp] + ([w_zp] if unsigned else [])
        feed = rng.integers(0, 256, (m, k), dtype=np.uint8)
    else:
        weight = numpy_helper.from_array(rng.standard_normal((k, n), dtype=np.float32), "W")
        node = helper.make_node("MatMul", ["A", "W"], ["Y"])
        a_type, y_type, inits = TensorProto.FLOAT, TensorProto.FLOAT, [weight]
        feed = rng.standard_normal((m, k), dtype=np.float32)
    graph = helper.make_graph([node], "roofline", [helper.make_tensor_value_info("A", a_type, [m, k])],
                              [helper.make_tensor_value_info("Y", y_type, [m, n])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    session = ort.InferenceSession(model.SerializeToString(), sess_options=session_options(load_settings()),
                                   providers=["CPUExecutionProvider"])
    return session, {"A": feed}


def measure_roofline(shapes: Sequence[tuple[int, int, int]] = ROOFLINE_SHAPES, repeats: int = 5,
                     min_cpu_s: float = 0.3) -> Roofline:
    """Peak int8 and fp32 matmul ops/s of this core, in the runtime the worker uses.

    Why measured and not from a datasheet: what limits us is ONNX Runtime's kernel on this CPU
    (with or without VNNI, under this hypervisor), and that is exactly what one big
    ``MatMulInteger`` with one thread shows. Each shape: median over ``repeats`` timed blocks
    of at least ``min_cpu_s`` CPU seconds each.
    """
    out: dict[bool, dict[str, float]] = {True: {}, False: {}}
    spreads = []
    for integer in (True, False):
        for m, k, n in shapes:
            session, feed = _matmul_session(m, k, n, integer)
            session.run(None, feed)  # type: ignore[attr-defined]
            rates = []
            for _ in range(repeats):
                runs, t0 = 0, time.process_time()
                while (elapsed := time.process_time() - t0) < min_cpu_s:
                    session.run(None, feed)  # type: ignore[attr-defined]
                    runs += 1
                rates.append(2 * m * k * n * runs / elapsed)
            s = summarize(rates)
            spreads.append(s.spread)
            out[integer][f"{m}x{k}x{n}"] = s.median
    return Roofline(int8_ops=out[True], fp32_ops=out[False], spread=max(spreads))


def int8_ops_per_token(model_path: Path) -> float:
    """Integer multiply-add ops per token in an artifact: 2*K*N summed over ``MatMulInteger``
    nodes with constant weights. Why count the graph: it is exact for whatever the recipe
    quantized (and excludes fp32 attention score matmuls, which are not int8 work). The
    pooled Dense head is counted too although it runs once per paragraph (<5 % of the total)."""
    import onnx
    from onnx import numpy_helper  # noqa: F401  (dims are read from the protos)

    model = onnx.load(str(model_path), load_external_data=False)
    dims = {i.name: list(i.dims) for i in model.graph.initializer}
    total = 0
    for node in model.graph.node:
        if node.op_type in {"MatMulInteger", "MatMulIntegerToFloat", "DynamicQuantizeMatMul"}:
            w = dims.get(node.input[1])
            if w is not None and len(w) == 2:
                total += 2 * w[0] * w[1]
    return float(total)


# --- ORT profile per op type ----------------------------------------------------------------------


def profile_kernel_events(embedder: object, work: Callable[[], object]) -> list[dict]:
    """ONNX Runtime's kernel events (one per node run, in time order) while ``work()`` runs.

    Why swap the session of a real Embedder: the profile must cover exactly the path the
    worker runs (same tokenization, same packing, same session options), only with
    ``enable_profiling`` on.
    """
    import onnxruntime as ort

    from deposium.worker.embedder import session_options

    with tempfile.TemporaryDirectory(prefix="deposium-profile-") as tmp:
        opts = session_options(embedder.settings, embedder.unsigned_kernel,  # type: ignore[attr-defined]
                               embedder.kernel_library)  # type: ignore[attr-defined]
        opts.enable_profiling = True
        opts.profile_file_prefix = str(Path(tmp) / "ort")
        original = embedder.session  # type: ignore[attr-defined]
        embedder.session = ort.InferenceSession(  # type: ignore[attr-defined]
            str(embedder.artifact_dir / embedder.model_file), sess_options=opts,  # type: ignore[attr-defined]
            providers=["CPUExecutionProvider"])
        try:
            work()
            trace = embedder.session.end_profiling()  # type: ignore[attr-defined]
        finally:
            embedder.session = original  # type: ignore[attr-defined]
        events = json.loads(Path(trace).read_text())
    kernels = [e for e in events if e.get("cat") == "Node" and str(e.get("name", "")).endswith("_kernel_time")]
    return sorted(kernels, key=lambda e: e.get("ts", 0))


def profile_op_types(embedder: object, paragraphs: Sequence[str], rounds: int = 1) -> list[tuple[str, float, float]]:
    """Where the time goes inside ONNX Runtime: (op type, total ms, % of kernel time)."""
    def work() -> None:
        for _ in range(rounds):
            embedder.embed(list(paragraphs))  # type: ignore[attr-defined]

    return summarize_profile(profile_kernel_events(embedder, work))


def summarize_profile(events: list[dict], key: Callable[[dict], str] | None = None) -> list[tuple[str, float, float]]:
    """Sum kernel durations per op type (or per ``key(event)``) from an ORT profile trace, largest first."""
    per_key: dict[str, float] = {}
    for event in events:
        if event.get("cat") != "Node" or not str(event.get("name", "")).endswith("_kernel_time"):
            continue
        name = key(event) if key else event.get("args", {}).get("op_name", "?")
        per_key[name] = per_key.get(name, 0.0) + float(event.get("dur", 0)) / 1000.0
    total = sum(per_key.values()) or 1.0
    return sorted(((name, ms, 100 * ms / total) for name, ms in per_key.items()), key=lambda t: -t[1])


def short_queries(corpus: Sequence[str], embedder: object, max_tokens: int = 16, count: int = 50,
                  task: str | None = "query") -> list[str]:
    """Up to ``count`` first sentences of corpus paragraphs that fit ``max_tokens`` with the ``task``
    prompt (the search-box case: a few words, one at a time)."""
    out: list[str] = []
    for text in corpus:
        sentence = text.split(". ")[0].strip()[:120]
        words = sentence.split()
        while words and embedder.tokenizer.count_tokens([" ".join(words)], task=task)[0] > max_tokens:  # type: ignore[attr-defined]
            words = words[:-1]
        if len(words) >= 3:
            out.append(" ".join(words))
        if len(out) == count:
            break
    return out


def query_latency(embedder: object, queries: Sequence[str], repeats: int) -> dict[str, object]:
    """CPU ms per query, one query per call with the ``query`` prompt (tokenization included)."""
    from deposium.bench.stats import summarize

    embedder.embed(list(queries[:3]), task="query")  # type: ignore[attr-defined]  # warm-up
    per_query: list[float] = []
    for _ in range(repeats):
        for q in queries:
            t = time.process_time()
            embedder.embed([q], task="query")  # type: ignore[attr-defined]
            per_query.append((time.process_time() - t) * 1000)
    tokens = embedder.tokenizer.count_tokens(list(queries), task="query")  # type: ignore[attr-defined]
    return {"summary": summarize(per_query), "queries": len(queries), "max_tokens": max(tokens),
            "mean_tokens": sum(tokens) / len(tokens)}
