"""The same text gets the same stored vector on every worker CPU and after every upgrade.

The suite's MiniLM int8 artifact is compared with vectors recorded by
``scripts/record_reference_vectors.py`` on another machine or by an earlier commit. A worker on a
CPU whose int8 kernel computes other integers (the u8 x s8 saturation that ``worker/variant.py``
avoids gave cosine 0.9965 on an AMD EPYC Zen 3), or a convert change that moves vectors without
saying so, fails here.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from deposium.worker.config import Settings
from deposium.worker.cpu import cpu_features
from deposium.worker.embedder import Embedder
from deposium.worker.variant import kernel_label, u8s8_saturates

REFERENCE = Path(__file__).parent / "data" / "reference-vectors-minilm.json"
#: The project's batch-invariance bar (issue 10): a vector that moves less than this is the same vector.
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


@pytest.mark.skipif(not u8s8_saturates(cpu_features()), reason="the signed kernel is exact on this CPU")
def test_a_saturating_kernel_would_fail_the_comparison(minilm_artifact, reference):
    """The comparison has teeth: on this CPU the u8 x s8 kernel saturates, and its vectors fall below the
    bar (the worker never runs it here; worker/variant.py)."""
    settings = dataclasses.replace(Settings(), int8_weights="signed")
    assert _cosines(Embedder(minilm_artifact, settings=settings), reference).min() < SAME_VECTOR
