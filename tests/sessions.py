"""ONNX Runtime sessions on raw quantized graphs, opened the way a worker opens them on this CPU."""

from __future__ import annotations

from pathlib import Path

import onnxruntime as ort

from worker.cpu import cpu_features
from worker.variant import UNSIGNED_KERNEL_KEY, u8s8_saturates


def worker_session(model_path: Path, unsigned_kernel: bool | None = None) -> ort.InferenceSession:
    """A session on ``model_path`` asking for the u8 x u8 int8 kernel where this CPU's u8 x s8 GEMM
    saturates (worker.variant), or as ``unsigned_kernel`` says. Why: a test that ran an 8-bit graph
    through a plain session passed on VNNI machines and failed on AVX2 ones."""
    opts = ort.SessionOptions()
    if u8s8_saturates(cpu_features()) if unsigned_kernel is None else unsigned_kernel:
        opts.add_session_config_entry(UNSIGNED_KERNEL_KEY, "1")
    return ort.InferenceSession(str(model_path), opts, providers=["CPUExecutionProvider"])
