"""``quantize``: the fp32 pipeline graph -> the int8 artifact's graph, by the recipe the options name.

The recipes themselves are :mod:`deposium.convert.recipes` (``auto`` resolves to the first one of the
automatic order buildable here, as ``convert --no-validate`` ships it). Every recipe's graph then gets
its self-attention rewritten into ONNX Runtime's fused kernels where it matches
(:mod:`deposium.convert.attention`), and is saved in the artifact layout. The head's Dense layers stay
fp32 in every recipe unless asked: they run once per paragraph (after pooling), so int8 there saves no
time, only size, at a real cost in fidelity (docs/design.md, Recipes).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import onnx

from deposium.convert.attention import fuse_attention
from deposium.convert.options import AUTO, HEAD_PATTERN, QuantizeError, QuantizeOptions
from deposium.convert.recipes import RECIPES, candidates, recipe_named
from deposium.worker.cpu import cpu_features
from deposium.worker.variant import EXACT_U8S8

__all__ = ["AUTO", "HEAD_PATTERN", "RECIPES", "QuantizeError", "QuantizeOptions", "cpu_has_vnni", "quantize",
           "save_model"]


def cpu_has_vnni() -> bool:
    return bool(cpu_features() & EXACT_U8S8)


def quantize(fp32_path: Path, out_path: Path, opts: QuantizeOptions) -> dict[str, Any]:
    """Write the quantized model to ``out_path``; return the settings for the manifest."""
    name = candidates(AUTO, opts.activation_bits)[0][0] if opts.recipe == AUTO else opts.recipe
    recipe = recipe_named(name)
    opts = replace(opts, recipe=name)
    settings: dict[str, Any] = {"recipe": name, "keep_fp32": opts.fp32_patterns(), "build_cpu_vnni": cpu_has_vnni()}
    model, details = recipe.build(fp32_path, opts)
    settings.update(details)
    settings.update(fuse_attention(model))
    onnx.checker.check_model(model)
    save_model(model, out_path)
    return settings


def save_model(model: onnx.ModelProto, path: Path) -> None:
    """Save with every weight in ``<name>.data`` beside it (the artifact layout; see deposium.worker.artifact)."""
    data = path.with_name(path.name + ".data")
    if data.exists():
        data.unlink()  # onnx appends to an existing external-data file
    onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=data.name,
              size_threshold=1024)
    if data.exists():  # absent when every tensor is under the threshold (tiny test graphs)
        data.chmod(0o644)  # onnx creates it 0600: a non-root worker (the Docker image's) must read it
