"""The same text gets the same stored vector on every worker CPU and after every upgrade.

The suite's MiniLM int8 artifact is compared with vectors recorded by
``tests/record_reference_vectors.py`` on another machine or by an earlier commit. A worker on a
CPU whose int8 kernel computes other integers (the u8 x s8 saturation that ``worker/variant.py``
avoids gave cosine 0.9965 on an AMD EPYC Zen 3), or a convert change that moves vectors without
saying so, fails here.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import platform
from pathlib import Path

import numpy as np
import pytest

from deposium.worker.config import Settings
from deposium.worker.cpu import cpu_features
from deposium.worker.embedder import Embedder
from deposium.worker.variant import EXACT_U8S8, kernel_label, u8s8_saturates

REFERENCE = Path(__file__).parent / "data" / "reference-vectors-minilm.json"
#: The project's batch-invariance bar (the gate's --min-batch-invariance): a vector moving less is the same.
SAME_VECTOR = 0.9999


@pytest.fixture(scope="module")
def reference() -> dict:
    return json.loads(REFERENCE.read_text())


def _cosines(embedder: Embedder, reference: dict) -> np.ndarray:
    vectors = embedder.embed(reference["texts"]).vectors
    return (vectors * np.asarray(reference["vectors"], dtype=np.float32)).sum(axis=1)


def test_artifact_weights_are_the_recorded_ones(minilm_artifact, reference):
    """Convert is deterministic: the weights the suite builds are byte for byte the recorded build's. If
    this fails after a deliberate recipe change, re-record (the script's docstring says how and why)."""
    digest = hashlib.sha256((minilm_artifact / "model.onnx.data").read_bytes()).hexdigest()
    assert digest == reference["weights_sha256"], "convert now writes other weights: stored vectors would change"


def test_vectors_match_the_recording_on_this_cpu(minilm_artifact, reference):
    embedder = Embedder(minilm_artifact)
    cosines = _cosines(embedder, reference)
    recorded = reference["recorded_on"]
    assert cosines.min() >= SAME_VECTOR, (
        f"vectors differ from the recording ({recorded}) here ({sorted(cpu_features())}, "
        f"{kernel_label(embedder.unsigned_kernel)}): "
        f"cosine per text {np.round(cosines, 6).tolist()}"
    )


#: How the skip reason names the CPU features that make ONNX Runtime's u8 x s8 kernel exact.
FEATURE_NAMES = {"avx512_vnni": "AVX-512 VNNI", "avx_vnni": "AVX-VNNI", "amx_int8": "AMX-INT8"}


def why_the_signed_kernel_is_exact(features: frozenset[str], machine: str | None = None) -> str:
    """The skip reason below: which CPU feature (or its absence) keeps u8 x s8 from saturating here, so
    worker/variant.py never picks the unsigned-kernel variant (the rules of ``u8s8_saturates``)."""
    exact = sorted(FEATURE_NAMES[f] for f in features & EXACT_U8S8)
    if exact:
        return (f"this CPU has {' / '.join(exact)}, where u8 x s8 dot products accumulate in int32 and do "
                "not saturate: the unsigned-kernel variant is never chosen")
    machine = (machine or platform.machine()).lower()
    if machine not in {"x86_64", "amd64", "i386", "i686"}:
        return (f"this CPU is {machine}, not x86: ONNX Runtime's u8 x s8 GEMM has no vpmaddubsw path here and "
                "does not saturate, so the unsigned-kernel variant is never chosen")
    if "avx2" not in features:
        return ("this x86 CPU has no AVX2: ONNX Runtime's u8 x s8 GEMM runs its exact 16-bit code, so the "
                "unsigned-kernel variant is never chosen")
    return "u8 x s8 saturates on this CPU (AVX2 without VNNI or AMX): the test runs"


def test_the_skip_reason_names_the_feature_that_makes_the_signed_kernel_exact():
    assert why_the_signed_kernel_is_exact(frozenset({"avx2", "avx512_vnni"}), "x86_64").startswith(
        "this CPU has AVX-512 VNNI, where")
    assert "AMX-INT8 / AVX-512 VNNI" in why_the_signed_kernel_is_exact(
        frozenset({"avx2", "avx512_vnni", "amx_int8"}), "x86_64")
    assert "aarch64, not x86" in why_the_signed_kernel_is_exact(frozenset(), "aarch64")
    assert "no AVX2" in why_the_signed_kernel_is_exact(frozenset(), "x86_64")
    assert "the test runs" in why_the_signed_kernel_is_exact(frozenset({"avx2"}), "x86_64")


@pytest.mark.skipif(not u8s8_saturates(cpu_features()), reason=why_the_signed_kernel_is_exact(cpu_features()))
def test_a_saturating_kernel_would_fail_the_comparison(minilm_artifact, reference):
    """The comparison has teeth: on this CPU the u8 x s8 kernel saturates, and its vectors fall below the
    bar (the worker never runs it here; worker/variant.py)."""
    settings = dataclasses.replace(Settings(), int8_weights="signed")
    assert _cosines(Embedder(minilm_artifact, settings=settings), reference).min() < SAME_VECTOR
