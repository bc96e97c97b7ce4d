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
from pathlib import Path

import numpy as np
import pytest

from worker.bench import corpus as bc
from worker.bench.e2e import ModeResult, overhead, write_jsonl
from worker.bench.report import SECTIONS, BenchResult, goal_rows, render, write_report
from worker.bench.stats import format_token_stats, median, percentile, summarize, token_stats
from worker.bench.timing import (
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
    code = ("import sys, worker.bench, worker.bench.cli, worker.bench.report, worker.bench.timing, "
            "worker.bench.peers, worker.bench.gemma, worker.bench.e2e\n"
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
    from worker.bench.stats import summarize as s

    timings = [_timing("ST torch fp32", "peer", "1", 4.0), _timing("ours int8", "ours", "1", 1.0)]
    gemma = {128: {"tokens": 128.0, "samples_ms": [500.0], "summary": s([500.0]), "tokens_per_s": 256.0}}
    e2e = [ModeResult("local", 100, 5000, 10.0, 9.0, 2 ** 27),
           ModeResult("queue1", 100, 5000, 11.0, 9.9, 2 ** 27, [2 ** 26], [2 ** 27])]
    result = _result(timings=timings, gemma=gemma, gemma_ops_per_token=2e8, e2e=e2e, e2e_overhead=overhead(e2e),
                     roofline=Roofline({"1x1x1": 1e11}, {"1x1x1": 5e10}, 0.02),
                     profiles=[("ours", [("MatMulInteger", 9.0, 90.0), ("Add", 1.0, 10.0)])])
    md, png = write_report(result, tmp_path / "BENCHMARKS.md", tmp_path / "docs" / "bench.png")
    text = md.read_text()
    assert png is not None and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "](docs/bench.png)" in text
    assert "| ours int8 | 1 |" in text and "4.00×" in text  # 4x the torch row at the same batching
    assert "| 128 | 500 |" in text and "51%" in text  # 256 tok/s * 2e8 ops / 1e11
    assert "| queue1 | 100 |" in text and "64 → 128" in text
    assert "| MatMulInteger | 9.0 | 90.0 |" in text and "Skipped" not in text


def test_overhead_from_modes():
    rs = [ModeResult("local", 100, 0, 10.0, 10.0, 0), ModeResult("queue1", 100, 0, 20.0, 12.0, 0),
          ModeResult("queue2", 100, 0, 12.5, 12.0, 0)]
    ov = overhead(rs)
    assert ov["queue_overhead_wall"] == pytest.approx(0.5)
    assert ov["queue_overhead_cpu"] == pytest.approx(0.2)
    assert ov["scaling"] == pytest.approx(1.6)
    assert overhead(rs[:1]) == {}


def test_write_jsonl_round_trips(tmp_path):
    path = write_jsonl(["a \"quoted\" text", "ü"], tmp_path / "c.jsonl")
    assert [json.loads(line)["text"] for line in path.read_text().splitlines()] == ["a \"quoted\" text", "ü"]


# --- smoke: the real command on a tiny model and corpus ------------------------------------------


def _tiny_bert(out: Path, tokenizer_dir: Path) -> Path:
    import torch
    from sentence_transformers import SentenceTransformer, models
    from transformers import AutoTokenizer, BertConfig, BertModel

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    model = BertModel(BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                                 num_attention_heads=2, intermediate_size=64, max_position_embeddings=128))
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
    out = tmp_path / "BENCHMARKS.md"
    args = ["--model", str(model), "--corpus", str(corpus), "--paragraphs", "12", "--repeats", "1",
            "--no-validate", "--cache", str(cache), "--gemma-artifact", str(cache / "tiny-int8-token"),
            "--gemma-texts", "2", "--roofline-seconds", "0.01", "--e2e-paragraphs", "60", "--out", str(out)]
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
                "| queue1 | 60 |", "| queue2 | 60 |", "int8 peak used below", "| MatMulInteger |"):
        assert row in text, row
    assert "Skipped" not in text and "**Reduced run.**" in text
    assert (tmp_path / "docs" / "bench.png").read_bytes()[:4] == b"\x89PNG"
