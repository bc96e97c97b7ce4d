"""Which int8 GEMM kernel this process's session runs: ONNX Runtime's u8 x s8 or its u8 x u8.

Why it matters: ONNX Runtime's x86 u8 x s8 GEMM on a CPU without VNNI or AMX multiplies with
``vpmaddubsw``, which adds pairs of products in int16 and saturates, so 8-bit weights give wrong
vectors there (measured on an AMD EPYC Zen 3: results of ~400,000 off by up to 140,000; the MiniLM
artifact's vectors at cosine 0.9965). The u8 x u8 kernel on those CPUs is exact; on VNNI/AMX CPUs
the signed one is exact and the faster. Both compute the same integers, so a text gets the same
vector on every worker, whatever CPU the platform hands it.

Why a session option and not a second graph: with ``session.x64quantprecision`` set, ONNX Runtime
shifts the int8 GEMM weights to u8 itself when it loads the graph (on x86 CPUs whose u8 x s8 kernel
saturates). Measured on that Zen 3 against the ``model.u8.onnx`` graph earlier versions wrote:
identical vectors (max difference 0.0), the same speed (EmbeddingGemma 6.13 vs 6.06 s, MiniLM 5.57 vs
5.59 s for the same paragraphs, interleaved) and the same RSS, without the 106 MB second weight file.
Artifacts that still carry ``model.u8.onnx`` load as before; that file is simply not read.
"""

from __future__ import annotations

import platform
from collections.abc import Mapping, Set
from typing import Any

#: Values of ``DEPOSIUM_INT8_WEIGHTS``: ``unsigned`` forces the u8 x u8 kernel, ``signed`` never asks for it.
CHOICES = ("auto", "signed", "unsigned")

#: ONNX Runtime's session config key (kOrtSessionOptionsAvx2PrecisionMode) that makes it run int8
#: GEMMs with u8 weights on x86 CPUs whose u8 x s8 kernel saturates.
UNSIGNED_KERNEL_KEY = "session.x64quantprecision"

#: Instruction sets whose u8 x s8 dot products accumulate in int32 (no saturation).
EXACT_U8S8 = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})

#: Recipes whose graph multiplies int8 weights with integer GEMMs that can saturate: those the converter
#: builds (``int8-fused`` keeps a ``MatMulIntegerToFloat`` wherever a GEMM's shape does not suit its kernels)
#: and those earlier converters built, ``int8-attn`` and ``int8-dynamic``. Why keep the latter: an artifact
#: carries its whole graph, so one that names them still loads and runs; it must keep its kernel choice
#: and its log label, and re-converting it must not be the price of upgrading the worker.
CONVERTER_INTEGER_GEMM_RECIPES = frozenset({"int8-fused", "int8-token", "int8-rot", "int8-wide"})
INTEGER_GEMM_RECIPES = CONVERTER_INTEGER_GEMM_RECIPES | {"int8-attn", "int8-dynamic"}


def u8s8_saturates(features: Set[str], machine: str | None = None) -> bool:
    """True where ONNX Runtime's u8 x s8 GEMM uses ``vpmaddubsw``: x86 with AVX2 (or AVX-512)
    but neither VNNI nor AMX. Without AVX2 it falls back to exact 16-bit code; ARM is exact."""
    machine = (machine or platform.machine()).lower()
    x86 = machine in {"x86_64", "amd64", "i386", "i686"}
    return x86 and "avx2" in features and not (features & EXACT_U8S8)


def seven_bit_operands(quantization: Mapping[str, Any]) -> bool:
    """Whether the manifest declares 7-bit weights or 7-bit activations (|a| <= 63, zero point 64):
    then no pair of products can exceed 127 x 127 x 2 = 32,258 < 32,767 and the faster signed
    kernel is exact everywhere."""
    seven_bit = quantization.get("weight_bits") == 7 or quantization.get("activation_bits") == 7
    return seven_bit or bool(quantization.get("reduce_range", False))


def can_saturate(quantization: Mapping[str, Any]) -> bool:
    """Whether an artifact's int8 GEMMs can saturate u8 x s8 kernels: integer-GEMM recipes with full
    8-bit weights and 8-bit (zero point 128) activations."""
    return str(quantization.get("recipe", "")) in INTEGER_GEMM_RECIPES and not seven_bit_operands(quantization)


def wants_unsigned_kernel(quantization: Mapping[str, Any], choice: str, features: Set[str]) -> bool:
    """Whether the session must ask for the u8 x u8 kernel (:data:`UNSIGNED_KERNEL_KEY`): on a CPU whose
    u8 x s8 kernel saturates, unless the manifest declares 7-bit operands; or where ``choice`` forces it.
    Why not only for integer-GEMM recipes: the option costs nothing in a graph without int8 GEMMs, and
    a manifest that understates its graph must not buy wrong vectors."""
    if choice not in CHOICES:
        raise ValueError(f"int8 weights {choice!r}: choose one of {', '.join(CHOICES)}")
    if choice != "auto":
        return choice == "unsigned"
    return u8s8_saturates(features) and not seven_bit_operands(quantization)


def kernel_label(unsigned: bool, quantization: Mapping[str, Any] | None = None) -> str:
    """How logs and reports name the int8 GEMM kernel a session runs (none for a graph without int8 GEMMs)."""
    if quantization is not None and str(quantization.get("recipe", "")) not in INTEGER_GEMM_RECIPES:
        return f"none ({quantization.get('recipe', 'unknown')} recipe)"
    return f"u8 x u8 ({UNSIGNED_KERNEL_KEY})" if unsigned else "u8 x s8"
