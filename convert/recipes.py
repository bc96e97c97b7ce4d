"""The quantization recipes by name: each one a small unit holding its settings and its build step.

Why a registry: :func:`deposium.convert.quantize.quantize` looks the recipe up and runs it, the CLI offers
its names, and the automatic order (:func:`candidates`) is a list of them; adding or dropping a recipe
is one entry here. Every recipe keeps a text's vector independent of its batch (the gate checks it). Why
each recipe exists, and which were tried and lost to them: docs/design.md, Recipes; their measured
fidelity and speed per CPU: docs/benchmarks.md.
"""

from __future__ import annotations

import fnmatch
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import onnx

from deposium.convert.fuse import fuse_gemms
from deposium.convert.graph import drop_unused_initializers
from deposium.convert.options import AUTO, QuantizeError, QuantizeOptions
from deposium.convert.tables import quantize_embedding_tables, table_label
from deposium.convert.token_gemm import per_token_graph
from deposium.worker import kernels

log = logging.getLogger(__name__)

#: Attention value projections (Gemma/Llama-style and BERT-style export names), whose weights get the
#: residual pass in ``int8-rot``, ``int8-fused`` and ``int8-wide``. Why there: values are averaged over
#: every position of a long input, so their weight rounding error does not average out the way per-token
#: activation error does.
VALUE_PROJECTIONS = ("*v_proj*", "*/value/*")


class Recipe(Protocol):
    """What :func:`deposium.convert.quantize.quantize` needs of a recipe."""

    name: str
    #: One line for ``deposium-convert --help``.
    summary: str
    #: Whether its graph multiplies int8 weights with integer GEMMs that can saturate u8 x s8 kernels
    #: (``deposium.worker.variant.INTEGER_GEMM_RECIPES`` must name it then).
    integer_gemm: bool

    def build(self, fp32_path: Path, opts: QuantizeOptions) -> tuple[onnx.ModelProto, dict[str, Any]]:
        """The quantized model (not yet saved) and the recipe's fields of the manifest."""
        ...


@dataclass(frozen=True)
class PerTokenRecipe:
    """A per-token-row integer GEMM recipe (:mod:`deposium.convert.token_gemm`): what it adds to the plain
    form, and its activation bits unless the caller chooses."""

    name: str
    summary: str
    #: Rotate every quantized activation (:mod:`deposium.convert.rotate`).
    rotate: bool = False
    #: A second int8 pass on every activation's rounding residual.
    wide_activations: bool = False
    #: A second int8 pass on the value projections' weight residual (:data:`VALUE_PROJECTIONS`).
    wide_value_weights: bool = False
    #: Why 7 for ``int8-wide``: its residual pass carries what a 7-bit first pass drops, and 7-bit
    #: activations cannot saturate the u8 x s8 kernel of CPUs without VNNI (the fast signed kernel on
    #: every CPU). The single-pass recipes keep 8: their first pass is all the precision they have.
    activation_bits: int = 8
    #: Rewrite each integer-GEMM chain into one op of worker/kernels (:mod:`deposium.convert.fuse`); its
    #: kernels quantize with zero point 128, so 8-bit activations only.
    fused: bool = False
    integer_gemm: bool = True

    def options(self, opts: QuantizeOptions) -> QuantizeOptions:
        """The caller's options with what this recipe always adds."""
        changes: dict[str, Any] = {}
        if self.wide_activations:
            changes["wide_activations"] = ["*"]
        if self.rotate:
            changes["rotate_activations"] = ["*"]
        if self.wide_value_weights:
            changes["wide_weights"] = [*opts.wide_weights, *VALUE_PROJECTIONS]
        return replace(opts, **changes)

    def build(self, fp32_path: Path, opts: QuantizeOptions) -> tuple[onnx.ModelProto, dict[str, Any]]:
        if self.fused and opts.activation_bits not in (None, 8):
            raise QuantizeError(f"{self.name} takes 8-bit activations only (its kernels quantize with zero point 128)")
        opts = self.options(opts)
        bits = opts.weight_bits
        if bits not in (7, 8):
            raise QuantizeError(f"weight_bits must be 7 or 8, not {bits!r}")
        a_bits = self.activation_bits if opts.activation_bits is None else opts.activation_bits
        if a_bits not in (7, 8):
            raise QuantizeError(f"activation_bits must be 7 or 8, not {a_bits!r}")
        settings: dict[str, Any] = dict(
            weight_bits=bits, activation_bits=a_bits,
            activations=f"{a_bits}-bit per token row (u8 with zero point)"
            + (", plus a second pass on the rounding residual where wide" if opts.wide_activations else ""),
            weights="int8 per output channel, symmetric",
            embedding_table=table_label(opts),
            wide_activations=list(opts.wide_activations), wide_weights=list(opts.wide_weights),
            batch_invariant=True)
        if opts.rotate_activations:
            settings.update(rotate_activations=list(opts.rotate_activations),
                            rotation=f"block Hadamard, block {opts.rotation_block} (smaller where a width needs it)")
        model, counts = per_token_graph(onnx.load(str(fp32_path)), opts, int(bits), int(a_bits))
        settings.update(counts)
        if self.fused:
            settings.update(fuse_gemms(model), kernel_library=kernels.LIBRARY,
                            kernels=f"{kernels.DOMAIN} ops: per-row quantization, int8 GEMM, scales, bias and GELU "
                                    "in one pass (AMX, AVX-512 VNNI or AVX2; the same bits on each)")
        return model, settings


@dataclass(frozen=True)
class BlockRecipe:
    """ONNX Runtime's block-wise ``MatMulNBits`` (8-bit weights, one scale per block of each column).
    Why kept: it needs no integer GEMM of ours and is as faithful, the last resort of the automatic
    order (slower where the CPU lacks fast 8-bit kernels)."""

    name: str
    summary: str
    integer_gemm: bool = False

    def build(self, fp32_path: Path, opts: QuantizeOptions) -> tuple[onnx.ModelProto, dict[str, Any]]:
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)
        quantizer = MatMulNBitsQuantizer(onnx.load(str(fp32_path)), bits=8, block_size=opts.block_size,
                                         is_symmetric=True, accuracy_level=4,
                                         nodes_to_exclude=_matching_nodes(fp32_path, opts.fp32_patterns()))
        quantizer.process()
        model = quantizer.model.model
        graph = model.graph
        if opts.quantize_embeddings:
            nodes = quantize_embedding_tables(graph, list(graph.node), opts.embedding_bits)
            del graph.node[:]
            graph.node.extend(nodes)
            drop_unused_initializers(graph)
        return model, {"weights": f"MatMulNBits 8-bit block {opts.block_size}, accuracy_level 4",
                       "embedding_table": table_label(opts), "batch_invariant": True}


@dataclass(frozen=True)
class Fp32Recipe:
    """The pipeline graph as exported: the reference the gate compares against, and an artifact for
    callers who want no quantization."""

    name: str
    summary: str
    integer_gemm: bool = False

    def build(self, fp32_path: Path, opts: QuantizeOptions) -> tuple[onnx.ModelProto, dict[str, Any]]:
        return onnx.load(str(fp32_path)), {}


def _matching_nodes(path: Path, patterns: list[str]) -> list[str]:
    if not patterns:
        return []
    graph = onnx.load(str(path), load_external_data=False).graph
    return [n.name for n in graph.node if any(fnmatch.fnmatch(n.name, p) for p in patterns)]


RECIPES: dict[str, Recipe] = {recipe.name: recipe for recipe in (
    PerTokenRecipe("int8-fused", "int8-rot computed by the deposium_rowq kernels, one op per integer GEMM",
                   rotate=True, wide_value_weights=True, fused=True),
    PerTokenRecipe("int8-token", "8-bit activations per token row x int8 weights per output channel"),
    PerTokenRecipe("int8-rot", "int8-token with every activation block-Hadamard rotated, value weights wide",
                   rotate=True, wide_value_weights=True),
    PerTokenRecipe("int8-wide", "int8-token with a second pass on every activation's residual, value weights wide",
                   wide_activations=True, wide_value_weights=True, activation_bits=7),
    BlockRecipe("int8-block", "ONNX Runtime MatMulNBits, 8-bit weights in blocks of 32"),
    Fp32Recipe("fp32", "no quantization"),
)}

#: What ``auto`` tries, fastest first, where the fused kernels are built; the first recipe to pass the
#: gate ships. ``int8-fused`` computes ``int8-rot``'s numbers faster, so where it fails the gate the
#: single-pass recipes would too, and the next step is the residual pass.
AUTO_RECIPES = ("int8-fused", "int8-wide", "int8-block")
#: The same order where they are not built.
AUTO_RECIPES_PORTABLE = ("int8-token", "int8-rot", "int8-wide", "int8-block")


def choices() -> tuple[str, ...]:
    """Every name a caller may give: ``auto`` and the recipes."""
    return (AUTO, *RECIPES)


def recipe_named(name: str) -> Recipe:
    try:
        return RECIPES[name]
    except KeyError:
        raise QuantizeError(f"unknown recipe {name!r}; choose one of {', '.join(choices())}") from None


def candidates(recipe: str, activation_bits: int | None = None) -> tuple[list[str], list[dict[str, str]]]:
    """The recipes to try, in order, and the ones left out with why: ``auto`` takes :data:`AUTO_RECIPES`
    where ``int8-fused`` can be built here, else :data:`AUTO_RECIPES_PORTABLE` (saying why); a named
    recipe is itself, and an ``int8-fused`` that cannot be built here fails."""
    if recipe != AUTO:
        recipe_named(recipe)
    wants_fused = recipe in (AUTO, "int8-fused")
    reason = None
    if wants_fused and kernels.library_path() is None:
        reason = ("the deposium_rowq kernel library is not built in this installation (x86-64 and a C compiler "
                  "at install time; reinstall with DEPOSIUM_REQUIRE_KERNELS=1 to see why)")
    elif wants_fused and activation_bits not in (None, 8):
        reason = "its kernels take 8-bit activations only"
    if recipe != AUTO:
        if recipe == "int8-fused" and reason is not None:
            raise QuantizeError(f"recipe int8-fused cannot be built here: {reason}")
        return [recipe], []
    if reason is None:
        return list(AUTO_RECIPES), []
    log.warning("auto: not trying int8-fused: %s", reason)
    return list(AUTO_RECIPES_PORTABLE), [{"recipe": "int8-fused", "reason": reason}]
