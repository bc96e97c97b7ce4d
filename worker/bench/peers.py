"""The configurations of the single-core comparison: the peers a user would pick, and ours.

Why these peers: (1) sentence-transformers on torch fp32 is where every user starts;
(2) sentence-transformers' own ONNX backend with its dynamic int8 export is what a user
would switch to for speed without us. Both are pinned to one thread, like our workers.
torch and sentence-transformers are imported only inside these functions.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Sequence
from pathlib import Path

from worker.bench.timing import Config, batch_one, fixed_batches

log = logging.getLogger(__name__)

#: sentence-transformers' default ``encode`` batch size.
ST_BATCH = 32


def st_quantization_config() -> str:
    """The ST int8 export a user would pick for this CPU (its ``avx512_vnni`` one needs VNNI)."""
    from convert.quantize import cpu_has_vnni

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


def peer_configs(source_dir: Path, cache: Path, lengths: Sequence[int], *, batch1: bool = True) -> list[Config]:
    """(1) sentence-transformers torch fp32 and (2) its ONNX int8 backend, batch 32 and batch 1."""
    import torch
    from sentence_transformers import SentenceTransformer

    torch.set_num_threads(1)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set once in this process
        pass
    fp32 = SentenceTransformer(str(source_dir), device="cpu")
    onnx_dir, file_name = ensure_st_onnx_int8(source_dir, cache)
    int8 = SentenceTransformer(str(onnx_dir), backend="onnx", device="cpu",
                               model_kwargs={"file_name": file_name, "provider": "CPUExecutionProvider",
                                             "session_options": _single_thread_ort_options()})

    def encode(model: SentenceTransformer, batch: int) -> object:
        def call(texts: list[str]) -> object:
            with torch.inference_mode():
                return model.encode(texts, batch_size=batch, show_progress_bar=False)
        return call

    n = len(lengths)
    quant = st_quantization_config()
    configs = [
        Config("ST torch fp32", "peer", f"{ST_BATCH} (length-sorted)", fixed_batches(lengths, ST_BATCH),
               encode(fp32, ST_BATCH)),
        Config(f"ST ONNX int8 ({quant})", "peer", f"{ST_BATCH} (length-sorted)", fixed_batches(lengths, ST_BATCH),
               encode(int8, ST_BATCH)),
    ]
    if batch1:
        configs += [
            Config("ST torch fp32", "peer", "1", batch_one(n), encode(fp32, 1)),
            Config(f"ST ONNX int8 ({quant})", "peer", "1", batch_one(n), encode(int8, 1)),
        ]
    return configs


def our_configs(artifacts: dict[str, Path], lengths: Sequence[int], token_budget: int) -> list[Config]:
    """Our :class:`~worker.embedder.Embedder` per artifact, at batch 1 and with token-budget packing.

    The packed groups are the Embedder's own ``pack_batches`` over the whole set, so each call
    is exactly one ORT run, as inside one worker task.
    """
    from worker.embedder import Embedder, pack_batches

    configs = []
    for label, path in artifacts.items():
        embedder = Embedder(path, token_budget=token_budget)

        def call(texts: list[str], e: Embedder = embedder) -> object:
            return e.embed(texts)

        configs.append(Config(f"ours {label}", "ours", "1", batch_one(len(lengths)), call))
        configs.append(Config(f"ours {label}", "ours", f"budget {token_budget} tokens",
                              pack_batches(lengths, token_budget), call))
    return configs
