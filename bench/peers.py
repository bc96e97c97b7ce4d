"""The configurations of the single-core comparison: the peers a user would pick, and ours.

Why these peers: (1) sentence-transformers on torch fp32 is where every user starts;
(2) sentence-transformers' own ONNX backend with its dynamic int8 export is what a user
would switch to for speed without us; (3, optional) its OpenVINO backend with static int8
(NNCF post-training quantization, calibrated on held-out paragraphs of the bench corpus) is
the fastest int8 it offers on Intel CPUs. All are pinned to one thread, like our workers, and
all embed with the same task prompt. torch, sentence-transformers and OpenVINO are imported
only inside these functions.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections.abc import Sequence
from pathlib import Path

from deposium.bench.timing import Config, batch_one, fixed_batches

log = logging.getLogger(__name__)

#: sentence-transformers' default ``encode`` batch size.
ST_BATCH = 32
#: Paragraphs NNCF calibrates the OpenVINO static int8 model on (its default sample size).
OV_CALIBRATION = 300
OV_FILE_SUFFIX = "qint8_quantized"
#: ``export_static_quantized_openvino_model`` pads every calibration input to this many tokens.
OV_CALIBRATION_LENGTH = 384


class PeerUnavailable(RuntimeError):
    """An optional peer cannot run here; the message says why (it goes into the report)."""


def st_quantization_config() -> str:
    """The ST int8 export a user would pick for this CPU (its ``avx512_vnni`` one needs VNNI)."""
    from deposium.convert.quantize import cpu_has_vnni

    return "avx512_vnni" if cpu_has_vnni() else "avx2"


def ensure_st_onnx_int8(source_dir: Path, cache: Path) -> tuple[Path, str]:
    """Export ``source_dir`` to ONNX and sentence-transformers' dynamic int8 once, under ``cache``.

    Returns (model directory, file_name relative to it). Why export first with optimum's
    ``main_export``: the backend's own re-export fails with this transformers (NOTES.md), while
    pointing ``file_name`` at an existing export works.
    """
    config = st_quantization_config()
    name = source_dir.parent.name if source_dir.name == "model" else source_dir.name
    directory = cache / f"st-onnx-{name}"

    def exported() -> str | None:  # avx2 writes quint8 weights, avx512_vnni qint8
        found = sorted((directory / "onnx").glob(f"model_*int8_{config}.onnx"))
        return f"onnx/{found[0].name}" if found else None

    if (file_name := exported()) is not None:
        return directory, file_name
    if directory.exists():
        shutil.rmtree(directory)
    shutil.copytree(source_dir, directory)
    from optimum.exporters.onnx import main_export
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.backend import export_dynamic_quantized_onnx_model

    main_export(str(directory), output=str(directory / "onnx"), task="feature-extraction",
                library_name="transformers")
    model = SentenceTransformer(str(directory), backend="onnx", device="cpu",
                                model_kwargs={"file_name": "onnx/model.onnx"})
    export_dynamic_quantized_onnx_model(model, config, str(directory))
    if (file_name := exported()) is None:
        raise RuntimeError(f"sentence-transformers wrote no {config} int8 model under {directory / 'onnx'}")
    return directory, file_name


def _single_thread_ort_options() -> object:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return opts


def _single_thread_torch() -> None:
    import torch

    torch.set_num_threads(1)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set once in this process
        pass


def _st_encoder(model: object, batch: int, task: str | None) -> object:
    """``model.encode`` at ``batch`` with the task prompt, returning the (normalized) vectors."""
    import torch

    def call(texts: list[str]) -> object:
        with torch.inference_mode():
            return model.encode(texts, batch_size=batch, show_progress_bar=False,  # type: ignore[attr-defined]
                                prompt_name=task)
    return call


def _st_rows(name: str, model: object, lengths: Sequence[int], task: str | None, batch1: bool,
             warm_all: bool = False) -> list[Config]:
    """One sentence-transformers model at batch 32 (length-sorted, as ``encode`` does) and 1."""
    configs = [Config(name, "peer", f"{ST_BATCH} (length-sorted)", fixed_batches(lengths, ST_BATCH),
                      _st_encoder(model, ST_BATCH, task), warm_all)]  # type: ignore[arg-type]
    if batch1:
        configs.append(Config(name, "peer", "1", batch_one(len(lengths)), _st_encoder(model, 1, task),  # type: ignore[arg-type]
                              warm_all))
    return configs


def torch_configs(source_dir: Path, lengths: Sequence[int], *, task: str | None = None,
                  batch1: bool = True) -> list[Config]:
    """(1) sentence-transformers on torch fp32: the reference of the fidelity columns."""
    from sentence_transformers import SentenceTransformer

    _single_thread_torch()
    return _st_rows("ST torch fp32", SentenceTransformer(str(source_dir), device="cpu"), lengths, task, batch1)


def st_onnx_configs(source_dir: Path, cache: Path, lengths: Sequence[int], *, task: str | None = None,
                    batch1: bool = True) -> list[Config]:
    """(2) sentence-transformers' ONNX backend with its dynamic int8 export, one ORT thread."""
    from sentence_transformers import SentenceTransformer

    onnx_dir, file_name = ensure_st_onnx_int8(source_dir, cache)
    int8 = SentenceTransformer(str(onnx_dir), backend="onnx", device="cpu",
                               model_kwargs={"file_name": file_name, "provider": "CPUExecutionProvider",
                                             "session_options": _single_thread_ort_options()})
    return _st_rows(f"ST ONNX int8 ({st_quantization_config()})", int8, lengths, task, batch1)


def peer_configs(source_dir: Path, cache: Path, lengths: Sequence[int], *, task: str | None = None,
                 batch1: bool = True) -> list[Config]:
    """(1) sentence-transformers torch fp32 and (2) its ONNX int8 backend, batch 32 and batch 1."""
    configs = torch_configs(source_dir, lengths, task=task, batch1=batch1)
    onnx = st_onnx_configs(source_dir, cache, lengths, task=task, batch1=batch1)
    # batched rows first, then batch 1 (the order the report has always had)
    return [c for c in configs + onnx if c.batching != "1"] + [c for c in configs + onnx if c.batching == "1"]


# --- (3) OpenVINO static int8 (optional: the `openvino` extra) ------------------------------------


def _max_positions(source_dir: Path) -> int | None:
    """The transformer's ``max_position_embeddings`` (None when its config does not say)."""
    try:
        value = json.loads((Path(source_dir) / "config.json").read_text()).get("max_position_embeddings")
    except (OSError, ValueError):
        return None
    return value if isinstance(value, int) else None


def importable(module: str) -> bool:
    """Whether an optional peer's package is installed, without importing it (some take seconds)."""
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package missing, or a half-installed module
        return False


def openvino_missing() -> str | None:
    """Why the OpenVINO peer cannot run here (a missing package), or None when it can."""
    for module, package in (("openvino", "openvino"), ("optimum.intel", "optimum-intel"), ("nncf", "nncf"),
                            ("datasets", "datasets")):
        if not importable(module):
            return f"`{package}` is not importable (`pip install -e '.[openvino]'`)"
    return None


def write_calibration_dataset(paragraphs: Sequence[str], directory: Path) -> dict[str, str]:
    """A local ``datasets`` folder of ``paragraphs`` (one JSONL split), and the arguments that
    make ``export_static_quantized_openvino_model`` read it instead of its default hub dataset."""
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / "train.jsonl", "w", encoding="utf-8") as fh:
        for text in paragraphs:
            fh.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
    return {"dataset_name": str(directory), "dataset_config_name": "default", "dataset_split": "train",
            "column_name": "text"}


def calibration_paragraphs(corpus: Sequence[str], timed: Sequence[str], n: int = OV_CALIBRATION,
                           seed: int = 1) -> list[str]:
    """``n`` corpus paragraphs that are not among the timed ones (held out: the fidelity columns
    must not be measured on the paragraphs the quantizer saw), reproducible for a given corpus."""
    import random

    seen = set(timed)
    rest = [p for p in corpus if p not in seen]
    return random.Random(seed).sample(rest, min(n, len(rest)))


def ensure_ov_static_int8(source_dir: Path, cache: Path, calibration: Sequence[str]) -> tuple[Path, str]:
    """Export ``source_dir`` to OpenVINO and its NNCF static int8 model once, under ``cache``.

    Returns (model directory, file_name relative to it). The directory's name carries a hash of
    the calibration paragraphs, so another corpus gets its own calibration. The export is staged
    and renamed, so an interrupted one is redone rather than half used.
    """
    name = source_dir.parent.name if source_dir.name == "model" else source_dir.name
    digest = hashlib.sha256("\n\0".join(calibration).encode()).hexdigest()[:10]
    directory = cache / f"st-openvino-{name}-{digest}"
    file_name = f"openvino/openvino_model_{OV_FILE_SUFFIX}.xml"
    if (directory / file_name).is_file():
        return directory, file_name
    staging = directory.with_name(directory.name + ".staging")
    if staging.exists():
        shutil.rmtree(staging)
    shutil.copytree(source_dir, staging)
    from optimum.intel import OVQuantizationConfig
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.backend import export_static_quantized_openvino_model

    dataset = write_calibration_dataset(calibration, cache / f"ov-calibration-{digest}")
    model = SentenceTransformer(str(staging), backend="openvino", device="cpu",
                                model_kwargs={"ov_config": ov_single_thread_config()})
    export_static_quantized_openvino_model(model, OVQuantizationConfig(num_samples=len(calibration)), str(staging),
                                           file_suffix=OV_FILE_SUFFIX, **dataset)
    if not (staging / file_name).is_file():
        raise PeerUnavailable(f"sentence-transformers wrote no {file_name} under {staging}")
    if directory.exists():
        shutil.rmtree(directory)
    staging.rename(directory)
    return directory, file_name


def ov_single_thread_config() -> dict[str, str]:
    """One inference thread, one stream, and fp32 (not bf16) for the ops NNCF left unquantized.

    Why the precision hint: on a CPU with avx512_bf16, OpenVINO's default runs every
    non-quantized op in bf16; with f32 the peer is exactly "int8 matmuls, fp32 elsewhere",
    like our int8 artifact, and its speed is the int8 kernels' (NOTES.md measured both)."""
    return {"INFERENCE_NUM_THREADS": "1", "NUM_STREAMS": "1", "INFERENCE_PRECISION_HINT": "f32",
            "PERFORMANCE_HINT": "LATENCY"}


def ov_runtime_precisions(compiled: object) -> dict[str, int]:
    """How many matmul-like ops the compiled model runs in each precision (``layerType:precision``)."""
    counts: dict[str, int] = {}
    for op in compiled.get_runtime_model().get_ordered_ops():  # type: ignore[attr-defined]
        info = op.get_rt_info()
        kind = info["layerType"].astype(str) if "layerType" in info else ""
        if kind in {"FullyConnected", "MatMul", "Convolution"}:
            prec = info["runtimePrecision"].astype(str) if "runtimePrecision" in info else "?"
            counts[f"{kind}:{prec}"] = counts.get(f"{kind}:{prec}", 0) + 1
    return counts


def int8_share(precisions: dict[str, int]) -> tuple[int, int]:
    """(matmul-like ops running in i8/u8, all matmul-like ops) from :func:`ov_runtime_precisions`."""
    int8 = sum(n for k, n in precisions.items() if k.rsplit(":", 1)[-1] in {"i8", "u8"})
    return int8, sum(precisions.values())


def openvino_configs(source_dir: Path, cache: Path, lengths: Sequence[int], calibration: Sequence[str], *,
                     task: str | None = None, batch1: bool = True) -> tuple[list[Config], str]:
    """(3) sentence-transformers' OpenVINO backend, NNCF static int8, one thread; and a sentence
    for the report saying what ran (how many matmuls run in int8). Raises :class:`PeerUnavailable`
    when OpenVINO is not installed or the compiled model runs no int8 matmul."""
    if (missing := openvino_missing()) is not None:
        raise PeerUnavailable(missing)
    positions = _max_positions(source_dir)
    if positions is not None and positions < OV_CALIBRATION_LENGTH:
        raise PeerUnavailable(f"sentence-transformers pads its calibration inputs to {OV_CALIBRATION_LENGTH} tokens "
                              f"and this model has {positions} positions")
    from sentence_transformers import SentenceTransformer

    directory, file_name = ensure_ov_static_int8(source_dir, cache, calibration)
    model = SentenceTransformer(str(directory), backend="openvino", device="cpu",
                                model_kwargs={"file_name": file_name, "ov_config": ov_single_thread_config()})
    compiled = model.transformers_model.request  # type: ignore[attr-defined]
    int8, total = int8_share(ov_runtime_precisions(compiled))
    if int8 == 0:
        raise PeerUnavailable(f"the compiled {file_name} runs no matmul in int8 ({total} matmul-like ops)")
    threads = compiled.get_property("INFERENCE_NUM_THREADS")
    hint = compiled.get_property("INFERENCE_PRECISION_HINT")
    precision = hint.to_string() if hasattr(hint, "to_string") else str(hint)
    note = (f"OpenVINO static int8: `{directory.name}/{file_name}` (NNCF, calibrated on {len(calibration)} "
            f"held-out corpus paragraphs); compiled with {threads} thread(s), {int8} of {total} matmul-like ops "
            f"run in int8, the rest in {precision}; warmed up with one untimed pass over every input shape "
            "(it compiles kernels per new shape).")
    return _st_rows("ST OpenVINO static int8", model, lengths, task, batch1, warm_all=True), note


def our_configs(artifacts: dict[str, Path], lengths: Sequence[int], token_budget: int, *,
                task: str | None = None) -> list[Config]:
    """Our :class:`~deposium.worker.embedder.Embedder` per artifact, at batch 1 and with token-budget packing.

    The packed groups are the Embedder's own ``pack_batches`` over the whole set, so each call
    is exactly one ORT run, as inside one worker task.
    """
    from deposium.worker.embedder import Embedder, pack_batches

    configs = []
    for label, path in artifacts.items():
        embedder = Embedder(path, token_budget=token_budget)

        def call(texts: list[str], e: Embedder = embedder) -> object:
            return e.embed(texts, task=task)

        configs.append(Config(f"ours {label}", "ours", "1", batch_one(len(lengths)), call))
        configs.append(Config(f"ours {label}", "ours", f"budget {token_budget} tokens",
                              pack_batches(lengths, token_budget), call))
    return configs
