"""Which of an int8 artifact's two graphs this process runs: signed or unsigned GEMM weights.

Why two graphs (written by ``convert.unsigned``): ONNX Runtime's x86 u8 x s8 GEMM on a CPU
without VNNI or AMX multiplies with ``vpmaddubsw``, which adds pairs of products in int16 and
saturates, so 8-bit weights give wrong vectors there (measured on an AMD EPYC Zen 3: results of
~400,000 off by up to 140,000). The u8 x u8 kernel on those CPUs is exact; on VNNI/AMX CPUs the
signed one is exact and the faster. Both compute the same integers, so a text gets the same
vector on every worker, whatever CPU the platform hands it.
"""

from __future__ import annotations

import platform
from collections.abc import Mapping, Set
from typing import Any

from worker.artifact import MODEL_FILE, UNSIGNED_MODEL_FILE, ArtifactError, Manifest

#: Values of ``DEPOSIUM_INT8_WEIGHTS``.
CHOICES = ("auto", "signed", "unsigned")

#: Instruction sets whose u8 x s8 dot products accumulate in int32 (no saturation).
EXACT_U8S8 = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})

#: Recipes whose graph multiplies int8 weights with integer GEMMs that can saturate.
INTEGER_GEMM_RECIPES = frozenset({"int8-token", "int8-rot", "int8-attn", "int8-wide", "int8-dynamic"})


def u8s8_saturates(features: Set[str], machine: str | None = None) -> bool:
    """True where ONNX Runtime's u8 x s8 GEMM uses ``vpmaddubsw``: x86 with AVX2 (or AVX-512)
    but neither VNNI nor AMX. Without AVX2 it falls back to exact 16-bit code; ARM is exact."""
    machine = (machine or platform.machine()).lower()
    x86 = machine in {"x86_64", "amd64", "i386", "i686"}
    return x86 and "avx2" in features and not (features & EXACT_U8S8)


def needs_unsigned_graph(quantization: Mapping[str, Any]) -> bool:
    """Whether an artifact's int8 GEMMs can saturate u8 x s8 kernels: integer-GEMM recipes with full
    8-bit weights and 8-bit (zero point 128) activations. With 7-bit weights or 7-bit activations
    (|a| <= 63, zero point 64) no pair of products can exceed 127 x 127 x 2 = 32,258 < 32,767."""
    if str(quantization.get("recipe", "")) not in INTEGER_GEMM_RECIPES:
        return False
    seven_bit = quantization.get("weight_bits") == 7 or quantization.get("activation_bits") == 7
    return not (seven_bit or quantization.get("reduce_range", False))


def choose_model_file(manifest: Manifest, choice: str, features: Set[str]) -> str:
    """The graph file to load: ``model.onnx`` unless its int8 weights would saturate here (or
    ``choice`` forces the unsigned graph). Refuses an artifact that would give wrong vectors."""
    if choice not in CHOICES:
        raise ValueError(f"int8 weights {choice!r}: choose one of {', '.join(CHOICES)}")
    has_unsigned = UNSIGNED_MODEL_FILE in manifest.files
    if choice == "unsigned":
        if not has_unsigned:
            raise ArtifactError(f"DEPOSIUM_INT8_WEIGHTS=unsigned but the artifact has no {UNSIGNED_MODEL_FILE}")
        return UNSIGNED_MODEL_FILE
    if choice == "signed" or not u8s8_saturates(features):
        return MODEL_FILE
    if has_unsigned:
        return UNSIGNED_MODEL_FILE
    if needs_unsigned_graph(manifest.quantization):
        recipe = manifest.quantization.get("recipe")
        raise ArtifactError(
            f"the artifact's {recipe} int8 GEMMs saturate on this CPU (AVX2 without VNNI) and it has no "
            f"{UNSIGNED_MODEL_FILE}: re-run deposium-convert with this version"
        )
    return MODEL_FILE
