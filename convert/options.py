"""What a caller can ask of a quantization recipe (:class:`QuantizeOptions`), and how a recipe says no.

Why apart from the recipes: the recipes, the embedding-table step and :func:`deposium.convert.quantize.quantize`
all read the same options; here none of them has to import another to get them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from deposium.convert.rotate import DEFAULT_BLOCK

#: The recipe ``convert`` uses unless told otherwise: the first recipe of the automatic order that can be
#: built here; ``build_artifact`` goes on down that order while the gate rejects a recipe
#: (:func:`deposium.convert.recipes.candidates`).
AUTO = "auto"
#: MatMuls of the sentence-transformers head (see deposium.convert.head): never quantized by default.
HEAD_PATTERN = "head/*"


class QuantizeError(RuntimeError):
    """A recipe could not be applied to this graph (or the options name no recipe)."""


@dataclass
class QuantizeOptions:
    #: A recipe name of :data:`deposium.convert.recipes.RECIPES`, or ``auto``.
    recipe: str = AUTO
    #: 8, or 7 (an explicit option); integer-GEMM recipes only.
    weight_bits: int = 8
    quantize_embeddings: bool = True
    #: fnmatch patterns of MatMul node names left in fp32 (e.g. outlier-heavy projections).
    keep_fp32: list[str] = field(default_factory=list)
    block_size: int = 32  # int8-block only
    #: Activation bits of the integer-GEMM recipes: 8, or 7 (|a| <= 63 with zero point 64, so no pair
    #: of u8 x s8 products can saturate: exact with the fast signed kernel on every CPU, less faithful);
    #: None = the recipe's own default.
    activation_bits: int | None = None
    #: int8-token: fnmatch patterns of MatMul node names whose activations get a second int8 pass
    #: on the rounding residual (~15-bit activations at twice that MatMul's integer cost).
    #: ``int8-wide`` means every MatMul.
    wide_activations: list[str] = field(default_factory=list)
    #: int8-token: fnmatch patterns of MatMul node names whose weights get a second int8 pass on
    #: their rounding residual (~15-bit weights; the GEMM gets twice the columns).
    #: ``int8-rot``, ``int8-fused`` and ``int8-wide`` add the value projections.
    wide_weights: list[str] = field(default_factory=list)
    #: int8-token: fnmatch patterns of MatMul node names whose activation is rotated by a block-Hadamard
    #: matrix before quantization (:mod:`deposium.convert.rotate`); ``int8-rot`` means every MatMul.
    rotate_activations: list[str] = field(default_factory=list)
    #: Rotation block (a power of two; a smaller one where an activation's width needs it).
    rotation_block: int = DEFAULT_BLOCK
    #: Quantize the head's Dense MatMuls too (they run once per paragraph: size only, no speed).
    quantize_head: bool = False
    #: int8-rot: skip an activation's rotation where an upstream GEMM's weight columns can carry it
    #: (deposium.convert.fold); False keeps every rotation node.
    fold: bool = True
    #: One integer GEMM per quantized activation (q/k/v, gate/up side by side) instead of one per MatMul.
    merge_gemms: bool = True
    #: Token-embedding table bits: 8 (one scale per row) or 4 (one fp16 scale per 32 values: a much
    #: smaller table; the gate reports the fidelity).
    embedding_bits: int = 8

    def fp32_patterns(self) -> list[str]:
        return list(self.keep_fp32) + ([] if self.quantize_head else [HEAD_PATTERN])
