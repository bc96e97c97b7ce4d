"""The one place that turns text into vectors (Celery worker and the producer's local mode).

Why one class with plain helper functions: every consumer (worker task, local mode,
``convert``'s gate) must get bit-for-bit the same vectors for the same artifact, so the
pipeline — validate → prompt → tokenize → sort → pack by token budget → one ONNX Runtime
run per packed batch → restore order → Matryoshka → dtype — exists exactly once.

Each process owns one single-threaded session: on a throttled container CPU, extra
threads only contend for the same quota (see :mod:`deposium.worker.threads`), and Celery's
prefork pool gives us one process per available core instead.
"""

from __future__ import annotations

from deposium.worker.threads import pin_single_thread

pin_single_thread()  # must precede the onnxruntime import below

from collections.abc import Sequence  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402

from deposium.worker.artifact import (  # noqa: E402
    MODEL_FILE,
    OUTPUT_NAME,
    ArtifactError,
    Manifest,
    read_manifest,
    verify_files,
)
from deposium.worker.config import Settings, load_settings  # noqa: E402
from deposium.worker.cpu import cpu_features  # noqa: E402
from deposium.worker.errors import EmbedRequestError  # noqa: E402
from deposium.worker.kernels import active_isa, register_kernels, require_library  # noqa: E402
from deposium.worker.memory import fix_mmap_threshold, fix_trim_threshold, release_free_heap  # noqa: E402
from deposium.worker.tokenize import ParagraphTokenizer  # noqa: E402
from deposium.worker.variant import UNSIGNED_KERNEL_KEY, wants_unsigned_kernel  # noqa: E402
from deposium.worker.wire import WIRE_DTYPES  # noqa: E402

__all__ = [
    "DISABLED_OPTIMIZERS",
    "DTYPES",
    "EmbedRequestError",
    "EmbedResult",
    "Embedder",
    "pack_batches",
    "session_options",
]

#: Output dtypes a request may ask for (the wire's list, :data:`deposium.worker.wire.WIRE_DTYPES`).
DTYPES: dict[str, type[np.floating]] = {name: np.dtype(name).type for name in WIRE_DTYPES}


@dataclass
class EmbedResult:
    """Vectors in input order plus what happened to each paragraph."""

    #: (n, dim) float32 or float16; rows of failed paragraphs are zeros.
    vectors: np.ndarray
    #: Tokens fed to the model (prompt and special tokens included, after truncation); 0 on error.
    token_counts: list[int]
    truncated: list[bool]
    #: Per paragraph; None = embedded.
    errors: list[str | None]


#: ONNX Runtime graph fusions the session leaves out. ``SkipLayerNormFusion`` folds each residual
#: (and bias) Add into the following LayerNormalization, but the CPU SkipLayerNormalization kernel
#: is slower than the Add + LayerNormalization it replaces (measured in docs/benchmarks.md). It only
#: fires on graphs whose hidden-state shapes are known (value_info), and it also changes int8-token
#: vectors slightly (other float rounding before per-row quantization).
DISABLED_OPTIMIZERS = ("SkipLayerNormFusion",)


def session_options(settings: Settings, unsigned_kernel: bool = False,
                    kernel_library: Path | None = None) -> ort.SessionOptions:
    """Options for the one session a process owns: one intra-op and one inter-op thread,
    sequential execution, every graph optimisation but :data:`DISABLED_OPTIMIZERS`. Arena and
    memory pattern come from settings: both cache buffers per shape, so with length-packed
    batches (a new shape nearly every call) they make RSS ratchet upwards; measurements in
    docs/benchmarks.md (worker memory). Without the arena every buffer a call needs is allocated afresh, which is
    why ``token_budget`` must stay small (see :func:`pack_batches`). ``unsigned_kernel``: run int8
    GEMMs through the u8 x u8 kernel where u8 x s8 would saturate (worker/variant.py).
    ``kernel_library``: the custom-op library an ``int8-fused`` graph calls (worker/kernels), on the
    path ``settings.kernel_isa`` names (the library reads DEPOSIUM_KERNEL_ISA when it registers)."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.add_session_config_entry("optimization.disable_specified_optimizers", ",".join(DISABLED_OPTIMIZERS))
    opts.enable_cpu_mem_arena = settings.ort_arena
    opts.enable_mem_pattern = settings.ort_mem_pattern
    # With one thread there is no pool to keep spinning; say so explicitly so a future
    # thread-count change does not silently burn the core between runs.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
    if unsigned_kernel:
        opts.add_session_config_entry(UNSIGNED_KERNEL_KEY, "1")
    if kernel_library is not None:
        register_kernels(opts, kernel_library, settings.kernel_isa)
    return opts



#: A batch's longest row may exceed its shortest by this factor (or by PAD_SLACK tokens).
PAD_RATIO = 1.1
PAD_SLACK = 8


def pack_batches(lengths: Sequence[int], token_budget: int) -> list[list[int]]:
    """Group indices (sorted by length) so each group's rows x longest row <= ``token_budget``
    and no row is padded by more than ~10 % (``PAD_RATIO``, ``PAD_SLACK``).

    Why sort then pack, and why cap padding: on one core every padded token is computed
    like a real one (attention even grows with the padded length), so budget-only packing of
    real paragraphs computes far more tokens than it embeds. A paragraph longer than the
    budget alone still runs, as a batch of one.

    Why the budget must stay small (``DEPOSIUM_TOKEN_BUDGET``, worker/config.py): one call's
    activations are [rows x longest row, width] float tensors, and with the ORT arena off every
    one of them is allocated afresh for every op. Past glibc's mmap threshold (worker/memory.py)
    each is a new mapping the kernel must zero page by page, and page faults then dominate the
    CPU time; a small budget keeps the widest activation below that threshold and in L2.
    The measurements behind both choices are in docs/benchmarks.md.
    """
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    batches: list[list[int]] = []
    current: list[int] = []
    for index in order:
        # ascending order: this row is the longest so far in ``current``
        if current:
            shortest = lengths[current[0]]
            too_much_padding = lengths[index] > max(shortest * PAD_RATIO, shortest + PAD_SLACK)
            if too_much_padding or (len(current) + 1) * lengths[index] > token_budget:
                batches.append(current)
                current = []
        current.append(index)
    if current:
        batches.append(current)
    return batches


def truncate_dims(vectors: np.ndarray, dim: int) -> np.ndarray:
    """Matryoshka: keep the first ``dim`` components and re-normalize (zero rows stay zero)."""
    if dim == vectors.shape[1]:
        return vectors
    cut = np.ascontiguousarray(vectors[:, :dim])
    norms = np.linalg.norm(cut, axis=1, keepdims=True)
    norms[norms == 0] = 1.0
    cut /= norms
    return cut


def check_paragraphs(
    paragraphs: Sequence[object], max_paragraph_bytes: int
) -> tuple[list[int], list[str], list[str | None], int]:
    """Split a batch into embeddable paragraphs and per-paragraph errors.

    Returns (indices of valid paragraphs, their texts, errors per paragraph, total UTF-8
    bytes of all string paragraphs). Why per paragraph: one bad paragraph in a batch of
    500 must not cost the other 499 a retry.
    """
    ok_index: list[int] = []
    ok_text: list[str] = []
    errors: list[str | None] = [None] * len(paragraphs)
    total = 0
    for i, text in enumerate(paragraphs):
        if type(text) is not str:
            errors[i] = f"paragraph is not a string (got {type(text).__name__})"
            continue
        if text.isascii():
            size = len(text)
        else:
            try:
                size = len(text.encode("utf-8"))
            except UnicodeEncodeError as exc:
                errors[i] = f"paragraph is not valid Unicode (lone surrogate at character {exc.start})"
                continue
        total += size
        if size > max_paragraph_bytes:
            errors[i] = f"paragraph has {size} bytes, more than the limit of {max_paragraph_bytes}"
        elif not text or text.isspace():
            errors[i] = "paragraph is empty or whitespace only"
        else:
            ok_index.append(i)
            ok_text.append(text)
    return ok_index, ok_text, errors, total


class Embedder:
    """One artifact, one single-threaded ONNX Runtime session, one tokenizer."""

    def __init__(
        self,
        artifact_dir: Path,
        *,
        settings: Settings | None = None,
        token_budget: int | None = None,
        verify: bool = True,
        manifest: Manifest | None = None,
        tokenizer: ParagraphTokenizer | None = None,
    ) -> None:
        """``manifest`` / ``tokenizer``: already read from ``artifact_dir`` by the caller (the
        producer's local mode counts tokens with the same tokenizer), so neither is read twice;
        ``verify`` still hashes every file the manifest lists."""
        self.artifact_dir = Path(artifact_dir)
        self.settings = settings or load_settings()
        self.token_budget = token_budget if token_budget is not None else self.settings.token_budget
        fix_mmap_threshold(self.settings.malloc_mmap_threshold)
        fix_trim_threshold(self.settings.malloc_trim_threshold)
        if self.token_budget < 1:
            raise ValueError(f"token_budget must be >= 1, got {self.token_budget}")
        # verify=True hashes every file: a truncated copy must fail here, naming the file.
        self.manifest: Manifest = manifest or read_manifest(self.artifact_dir)
        if verify:
            verify_files(self.artifact_dir, self.manifest)
        self.tokenizer = tokenizer or ParagraphTokenizer.from_artifact(self.artifact_dir, self.manifest)
        self.model_file = MODEL_FILE
        #: u8 x u8 int8 GEMMs where this CPU's u8 x s8 kernel would saturate (worker/variant.py).
        self.unsigned_kernel = wants_unsigned_kernel(self.manifest.quantization, self.settings.int8_weights,
                                                     cpu_features())
        model_path = self.artifact_dir / self.model_file
        library = self.manifest.quantization.get("kernel_library")
        #: The fused kernels' library an int8-fused graph calls (worker/kernels), else None.
        self.kernel_library = require_library(library) if library else None
        options = session_options(self.settings, self.unsigned_kernel, self.kernel_library)
        #: The fused kernels' path in this process ("amx", "vnni", "avx2"), or "" for graphs without them.
        self.kernel_isa = active_isa() if library else ""
        try:
            self.session = ort.InferenceSession(
                str(model_path),
                sess_options=options,
                providers=["CPUExecutionProvider"],
            )
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidProtobuf types
            raise ArtifactError(f"{model_path} cannot be loaded by onnxruntime: {exc}") from None
        self._wants_type_ids = "token_type_ids" in self.manifest.inputs
        self._pad = self.manifest.pad_token_id
        self._check_graph(model_path)
        release_free_heap()  # what parsing the tokenizer and model freed (worker/memory.py)

    def _check_graph(self, model_path: Path) -> None:
        """Refuse an artifact whose graph disagrees with its manifest (wrong inputs or dim)."""
        graph_inputs = [i.name for i in self.session.get_inputs()]
        if sorted(graph_inputs) != sorted(self.manifest.inputs):
            raise ArtifactError(
                f"{model_path} takes inputs {graph_inputs} but the manifest says {self.manifest.inputs}"
            )
        outputs = [o.name for o in self.session.get_outputs()]
        if OUTPUT_NAME not in outputs:
            raise ArtifactError(f"{model_path} has no output {OUTPUT_NAME!r} (outputs: {outputs})")
        probe_tokens = self.tokenizer.encode(["probe"])
        probe = self._run(probe_tokens.ids, probe_tokens.type_ids)
        if probe.shape != (1, self.manifest.dim):
            raise ArtifactError(
                f"{model_path} returns vectors of shape {probe.shape[1:]} but the manifest says dim "
                f"{self.manifest.dim}"
            )

    def _run(self, rows: list[list[int]], type_rows: list[list[int]]) -> np.ndarray:
        """One session run over ``rows`` right-padded to the longest one."""
        width = max(len(r) for r in rows)
        ids = np.full((len(rows), width), self._pad, dtype=np.int64)
        mask = np.zeros((len(rows), width), dtype=np.int64)
        for r, row in enumerate(rows):
            ids[r, : len(row)] = row
            mask[r, : len(row)] = 1
        feeds = {"input_ids": ids, "attention_mask": mask}
        if self._wants_type_ids:
            types = np.zeros((len(rows), width), dtype=np.int64)
            for r, row in enumerate(type_rows):
                types[r, : len(row)] = row
            feeds["token_type_ids"] = types
        return self.session.run([OUTPUT_NAME], feeds)[0]

    def _check_request(
        self, paragraphs: Sequence[object], task: str | None, dim: int | None, dtype: str
    ) -> int:
        """Reject a malformed request as a whole; returns the output dim."""
        if isinstance(paragraphs, str | bytes) or not isinstance(paragraphs, Sequence):
            raise EmbedRequestError(f"paragraphs must be a list of strings, got {type(paragraphs).__name__}")
        limit = self.settings.max_batch_paragraphs
        if len(paragraphs) > limit:
            raise EmbedRequestError(f"batch has {len(paragraphs)} paragraphs, more than the limit of {limit}")
        if dtype not in DTYPES:
            raise EmbedRequestError(f"dtype {dtype!r} is not supported; use one of {', '.join(DTYPES)}")
        dims = self.manifest.matryoshka_dims
        if dim is None:
            dim = self.manifest.dim
        elif type(dim) is not int or dim not in dims:
            raise EmbedRequestError(f"dim {dim!r} is not offered by this model; choose one of {dims}")
        if task is not None and not isinstance(task, str):
            raise EmbedRequestError(f"task must be a string or None, got {type(task).__name__}")
        self.tokenizer.prompt(task)  # unknown task -> EmbedRequestError listing the known ones
        return dim

    def embed(
        self,
        paragraphs: Sequence[object],
        *,
        task: str | None = None,
        dim: int | None = None,
        dtype: str = "float32",
    ) -> EmbedResult:
        """Embed ``paragraphs`` in order. Bad paragraphs get an error and a zero row; a malformed
        request as a whole raises :class:`EmbedRequestError` before any work is done."""
        dim = self._check_request(paragraphs, task, dim, dtype)
        n = len(paragraphs)
        settings = self.settings
        ok_index, ok_text, errors, total_bytes = check_paragraphs(paragraphs, settings.max_paragraph_bytes)
        if total_bytes > settings.max_batch_bytes:
            raise EmbedRequestError(
                f"batch has {total_bytes} bytes of text, more than the limit of {settings.max_batch_bytes}"
            )
        vectors = np.zeros((n, self.manifest.dim), dtype=np.float32)
        token_counts = [0] * n
        truncated = [False] * n
        if ok_text:
            tokens = self.tokenizer.encode(ok_text, task)
            lengths = tokens.lengths
            for batch in pack_batches(lengths, self.token_budget):
                rows = [tokens.ids[j] for j in batch]
                types = [tokens.type_ids[j] for j in batch]
                vectors[[ok_index[j] for j in batch]] = self._run(rows, types)
            for j, i in enumerate(ok_index):
                token_counts[i] = lengths[j]
                truncated[i] = tokens.truncated[j]
        vectors = truncate_dims(vectors, dim)
        if dtype != "float32":
            vectors = vectors.astype(DTYPES[dtype])
        return EmbedResult(vectors=vectors, token_counts=token_counts, truncated=truncated, errors=errors)
