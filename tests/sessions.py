"""ONNX Runtime sessions on raw quantized graphs, opened the way a worker opens them on this CPU."""

from __future__ import annotations

from pathlib import Path

import onnxruntime as ort

from deposium.worker.config import Settings
from deposium.worker.cpu import cpu_features
from deposium.worker.embedder import session_options
from deposium.worker.variant import wants_unsigned_kernel


def worker_session(model_path: Path, unsigned_kernel: bool | None = None) -> ort.InferenceSession:
    """A session on ``model_path`` with the worker's own options, asking for the u8 x u8 int8 kernel
    where this CPU's u8 x s8 GEMM saturates (deposium.worker.variant; a raw graph has no manifest, so nothing
    declares 7-bit operands), or as ``unsigned_kernel`` says. Why: a test that ran an 8-bit graph
    through a plain session passed on VNNI machines and failed on AVX2 ones."""
    if unsigned_kernel is None:
        unsigned_kernel = wants_unsigned_kernel({}, "auto", cpu_features())
    return ort.InferenceSession(str(model_path), session_options(Settings(), unsigned_kernel),
                                providers=["CPUExecutionProvider"])
