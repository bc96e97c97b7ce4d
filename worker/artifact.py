"""The artifact contract between ``convert`` (writer) and the ``Embedder`` (reader).

An artifact is a directory::

    model.onnx        whole sentence-embedding pipeline (transformer, pooling, Dense
                      layers, L2 normalize); inputs ``input_ids``/``attention_mask``
                      (+ ``token_type_ids`` when the model has them), all int64 [batch, seq];
                      output ``sentence_embedding`` float32 [batch, dim], unit norm
    model.onnx.data   its weights (ONNX external data). Why a separate file: ONNX Runtime
                      memory-maps external data, so weights it uses in place (the token-
                      embedding table: two thirds of EmbeddingGemma) are read-only page-cache
                      pages shared by every worker process instead of a private copy each.
                      Artifacts with the weights inside model.onnx load too.
    tokenizer.json    Hugging Face ``tokenizers`` file, padding and truncation switched off
    validation.json   what ``convert``'s gate measured (fidelity, STS-B, batch invariance)
    manifest.json     this module's :class:`Manifest`, with the sha256 of every other file

Earlier versions also wrote ``model.u8.onnx`` (+ ``.data``), the graph with unsigned GEMM weights
for CPUs whose u8 x s8 kernel saturates; ONNX Runtime now does that shift at load time
(deposium.worker.variant), so such a file is verified with the rest but not read.

Why the whole head lives in the ONNX graph (as llama.cpp does in GGUF): the runtime then
needs no knowledge of architectures, pooling modes or Dense layers, and a worker image
never needs torch or transformers. Only what the graph cannot carry is in the manifest:
the tokenizer's settings, task prompts, the Matryoshka dims and the max sequence length.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
MODEL_FILE = "model.onnx"
WEIGHTS_FILE = "model.onnx.data"
TOKENIZER_FILE = "tokenizer.json"
VALIDATION_FILE = "validation.json"
OUTPUT_NAME = "sentence_embedding"


class ArtifactError(RuntimeError):
    """The artifact directory is missing, corrupt, truncated or of another format."""


@dataclass(frozen=True)
class Manifest:
    format_version: int
    #: Where the model came from: a local path or a hub id, and its revision / content hash.
    source: str
    source_revision: str
    architecture: str
    dim: int
    #: Dims a vector may be truncated to (then re-normalized); the first is ``dim``.
    matryoshka_dims: list[int]
    pooling: str
    max_seq_length: int
    #: ONNX input names in the order the graph declares them.
    inputs: list[str]
    pad_token_id: int
    #: Task prompts by name (prepended to the text before tokenizing), from the model's config.
    prompts: dict[str, str]
    default_prompt_name: str | None
    #: Recipe name plus every setting that produced ``model.onnx``.
    quantization: dict[str, Any]
    #: sha256 of each file in the artifact (manifest.json excluded).
    files: dict[str, str]
    tools: dict[str, str] = field(default_factory=dict)
    created_at: str = ""

    @property
    def model_sha256(self) -> str:
        return self.files[MODEL_FILE]

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(directory: Path, manifest: Manifest) -> Path:
    """Write ``manifest.json`` atomically (a reader never sees half a manifest)."""
    directory = Path(directory)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".manifest.", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(manifest.to_json())
    os.chmod(tmp, 0o644)  # mkstemp creates 0600; non-root workers must read it
    os.replace(tmp, directory / MANIFEST)
    return directory / MANIFEST


def read_manifest(directory: Path) -> Manifest:
    """Parse ``manifest.json`` without verifying file hashes (cheap; for listings)."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not directory.is_dir():
        raise ArtifactError(f"artifact directory {directory} does not exist (run deposium-convert first)")
    if not path.is_file():
        raise ArtifactError(f"{path} is missing: {directory} is not a deposium artifact")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise ArtifactError(f"{path} does not hold a JSON object")
    version = raw.get("format_version")
    if version != FORMAT_VERSION:
        raise ArtifactError(
            f"{path} has format_version {version!r}; this worker reads format {FORMAT_VERSION}. "
            "Re-run deposium-convert with this version, or deploy the matching worker."
        )
    known = set(Manifest.__dataclass_fields__)
    missing = sorted(k for k in known if k not in raw and k not in {"tools", "created_at"})
    if missing:
        raise ArtifactError(f"{path} lacks fields: {', '.join(missing)}")
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ArtifactError(f"{path} has unknown fields: {', '.join(unknown)}")
    manifest = Manifest(**raw)
    if not manifest.matryoshka_dims or manifest.matryoshka_dims[0] != manifest.dim:
        raise ArtifactError(f"{path}: matryoshka_dims must start with dim {manifest.dim}")
    for required in (MODEL_FILE, TOKENIZER_FILE):
        if required not in manifest.files:
            raise ArtifactError(f"{path} lists no sha256 for {required}")
    return manifest


def load_manifest(directory: Path) -> Manifest:
    """Parse the manifest and verify every listed file's size and sha256.

    Why hash at load time: a truncated copy or a half-finished upload must stop a
    worker at start-up with the file's name, not produce wrong vectors for hours.
    Hashing ~350 MB takes about a second, small beside session creation.
    """
    directory = Path(directory)
    manifest = read_manifest(directory)
    verify_files(directory, manifest)
    return manifest


def verify_files(directory: Path, manifest: Manifest) -> None:
    """Check every file ``manifest`` lists against its size and sha256 (see :func:`load_manifest`);
    for a caller that already holds the parsed manifest and must not read it again."""
    directory = Path(directory)
    for name, expected in manifest.files.items():
        path = directory / name
        if not path.is_file():
            raise ArtifactError(f"artifact file {path} is missing")
        actual = sha256_file(path)
        if actual != expected:
            raise ArtifactError(
                f"artifact file {path} is corrupt or was modified: sha256 {actual[:12]}… "
                f"but the manifest says {expected[:12]}…"
            )
