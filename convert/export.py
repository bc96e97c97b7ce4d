"""Export the source's transformer to ONNX with optimum, in the shape workers need.

Why we load the model ourselves and hand it to optimum: Gemma3 must be exported with eager
attention (SDPA's mask is traced through data-dependent branches) and with the KV cache off;
``main_export`` offers no clean way to set either. The bidirectional, sliding-window mask is
then checked by the tests on sequences longer than the window, not assumed.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import onnx

from deposium.convert.source import SentenceTransformerSource

log = logging.getLogger(__name__)

OPSET = 18


class ExportError(RuntimeError):
    """optimum could not export the transformer."""


def export_transformer(source: SentenceTransformerSource, out_dir: Path) -> Path:
    """Write ``out_dir/model.onnx`` with output ``last_hidden_state`` and return its path."""
    import torch
    from optimum.exporters.onnx import onnx_export_from_model
    from transformers import AutoModel

    out_dir.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            model = AutoModel.from_pretrained(
                str(source.transformer_dir), attn_implementation="eager", dtype=torch.float32
            )
        except (OSError, ValueError, KeyError) as exc:
            raise ExportError(f"cannot load {source.transformer_dir} with transformers: {exc}") from None
        model.eval()
        if hasattr(model.config, "use_cache"):
            model.config.use_cache = False
        try:
            onnx_export_from_model(
                model,
                output=str(out_dir),
                task="feature-extraction",
                opset=OPSET,
                do_validation=False,
                library_name="transformers",
            )
        except Exception as exc:  # optimum raises many types; the message is what matters
            raise ExportError(f"optimum failed to export {source.architecture}: {type(exc).__name__}: {exc}") from exc
    path = out_dir / "model.onnx"
    if not path.is_file():
        raise ExportError(f"optimum wrote no model.onnx in {out_dir}")
    outputs = [o.name for o in onnx.load(str(path), load_external_data=False).graph.output]
    if "last_hidden_state" not in outputs:
        raise ExportError(f"exported graph has outputs {outputs}, expected last_hidden_state")
    return path
