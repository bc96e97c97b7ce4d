"""(4, optional) llama.cpp's Q8_0 GGUF through ``llama-cpp-python``: the CPU peer for Gemma embeddings.

Why this peer: for EmbeddingGemma, llama.cpp is what a user would run on a CPU without us.
It is included when ``llama_cpp`` is importable and the model is a Gemma3 (EmbeddingGemma)
sentence-transformers directory. The GGUF is converted once into the bench cache with the
``convert_hf_to_gguf.py`` + gguf-py that ship inside the installed version's sdist (the
llama.cpp it was built from), with ``--sentence-transformers-dense-modules`` (otherwise the
Dense 768->3072->768 head is silently dropped) and ``--outtype q8_0``.

What the timed call does, and why (NOTES.md, "llama.cpp"): one thread for both the prompt and
the batch path; ``n_ctx = n_batch = n_ubatch`` at least the longest input (the defaults truncate
at 512 tokens and drop EOS); one sequence per ``embed()`` call (packing several sequences into
one decode was 2.5x slower per paragraph); the document prompt our Embedder and torch use is
prepended; ``embed()`` returns unnormalized vectors, so they are normalized here.
``llama_cpp`` is imported only inside the functions that run it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from deposium.bench.peers import importable
from deposium.bench.timing import Config, batch_one

log = logging.getLogger(__name__)

#: The llama-cpp-python release whose vendored converter the GGUF is built with by default.
LLAMA_CPP_PYTHON = "llama-cpp-python"
#: What the converter needs from the vendored llama.cpp (the script, its model classes, gguf-py).
CONVERTER_PARTS = ("convert_hf_to_gguf.py", "conversion", "gguf-py")
GEMMA_MODEL_TYPES = {"gemma3_text", "gemma3"}


def llama_missing() -> str | None:
    """Why the llama.cpp peer cannot run here, or None when it can.

    Why sentencepiece too: the GGUF conversion reads Gemma3's vocabulary with it, and without it
    the peer failed only after minutes of the bench, as a converter traceback in the report.
    """
    if not importable("llama_cpp"):
        return ("`llama_cpp` is not importable (install llama-cpp-python, e.g. the wheel "
                "in ~/.cache/deposium/wheels)")
    if not importable("sentencepiece"):
        return "`sentencepiece` is not importable (the GGUF conversion needs it; the `bench` extra installs it)"
    return None


def is_gemma3(model_dir: Path) -> bool:
    """Whether ``model_dir`` (a sentence-transformers directory) holds a Gemma3 text model."""
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return False
    archs = config.get("architectures") or []
    return config.get("model_type") in GEMMA_MODEL_TYPES or any(str(a).startswith("Gemma3") for a in archs)


def gguf_command(converter: Path, model_dir: Path, outfile: Path, outtype: str = "q8_0",
                 python: str | None = None) -> list[str]:
    """The ``convert_hf_to_gguf.py`` command line that writes ``outfile`` from ``model_dir``."""
    return [python or sys.executable, str(converter), str(model_dir), "--outfile", str(outfile),
            "--outtype", outtype, "--sentence-transformers-dense-modules"]


def gguf_path(cache: Path, model_dir: Path, outtype: str = "q8_0") -> Path:
    """Where the GGUF of ``model_dir`` is kept in the bench cache."""
    return cache / f"{Path(model_dir).name}-{outtype}.gguf"


def installed_version() -> str:
    from importlib.metadata import version

    return version(LLAMA_CPP_PYTHON)


def extract_converter(sdist: Path, out: Path) -> Path:
    """Unpack the converter parts of the sdist's ``vendor/llama.cpp`` into ``out``."""
    staging = Path(tempfile.mkdtemp(prefix=".llama-src-", dir=out.parent))
    try:
        with tarfile.open(sdist) as tar:
            members = []
            for m in tar.getmembers():
                parts = m.name.split("/")
                if len(parts) > 3 and parts[1:3] == ["vendor", "llama.cpp"] and parts[3] in CONVERTER_PARTS:
                    m.name = "/".join(parts[3:])
                    members.append(m)
            if not any(m.name == CONVERTER_PARTS[0] for m in members):
                raise RuntimeError(f"{sdist} has no vendor/llama.cpp/{CONVERTER_PARTS[0]}")
            tar.extractall(staging, members=members, filter="data")
        staging.chmod(0o755)  # mkdtemp made it private; the cache is shared like the artifacts beside it
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def ensure_converter(cache: Path, given: Path | None = None, run: Callable[..., object] = subprocess.run) -> Path:
    """The vendored llama.cpp directory holding ``convert_hf_to_gguf.py``: ``given``, or the
    installed llama-cpp-python version's sdist, downloaded once with pip and unpacked under
    ``cache`` (the converter must match the llama.cpp the wheel was built from)."""
    if given is not None:
        if not (Path(given) / CONVERTER_PARTS[0]).is_file():
            raise RuntimeError(f"{given} holds no {CONVERTER_PARTS[0]}")
        return Path(given)
    version = installed_version()
    out = cache / f"llama.cpp-{version}"
    if (out / CONVERTER_PARTS[0]).is_file():
        return out
    with tempfile.TemporaryDirectory(prefix="llama-sdist-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", f"{LLAMA_CPP_PYTHON}=={version}", "--no-deps",
               "--no-binary", ":all:", "-d", tmp]
        log.info("downloading the %s %s sdist for its GGUF converter", LLAMA_CPP_PYTHON, version)
        run(cmd, check=True, capture_output=True, text=True)
        found = sorted(Path(tmp).glob("*.tar.gz"))
        if not found:
            raise RuntimeError(f"pip download wrote no {LLAMA_CPP_PYTHON} sdist")
        return extract_converter(found[0], out)


def ensure_gguf(model_dir: Path, cache: Path, converter_dir: Path, outtype: str = "q8_0",
                run: Callable[..., object] = subprocess.run) -> Path:
    """Convert ``model_dir`` to a ``outtype`` GGUF once (written beside, then renamed)."""
    out = gguf_path(cache, model_dir, outtype)
    if out.is_file():
        return out
    tmp = out.with_name(out.name + ".partial")
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    env.pop("NO_LOCAL_GGUF", None)  # the vendored gguf-py, matching the converter
    cmd = gguf_command(converter_dir / CONVERTER_PARTS[0], model_dir, tmp, outtype)
    log.info("converting %s to GGUF %s (once; cached)", model_dir, outtype)
    try:
        run(cmd, check=True, capture_output=True, text=True, env=env, cwd=str(converter_dir))
    except subprocess.CalledProcessError as exc:
        tmp.unlink(missing_ok=True)
        tail = (exc.stderr or "").strip().splitlines()[-3:]
        raise RuntimeError(f"convert_hf_to_gguf.py failed: {' / '.join(tail)}") from None
    os.replace(tmp, out)
    return out


def context_size(longest: int, limit: int = 2048, margin: int = 16, step: int = 64) -> int:
    """``n_ctx`` (= ``n_batch`` = ``n_ubatch``): the longest input plus a margin (llama.cpp's
    tokenizer may split a little differently from ours), rounded up to ``step``, at most ``limit``."""
    want = max(step, longest + margin)
    return min(limit, -(-want // step) * step)


def load_llama(gguf: Path, n_ctx: int, *, extra_bufts: bool = False) -> object:
    """A one-thread llama.cpp embedding context that takes ``n_ctx`` tokens in one decode.

    Why ``extra_bufts=False`` (llama.cpp's ``--no-extra-bufts``): on a CPU that reports AMX, ggml
    moves the Q8_0 weights into its AMX buffer type, and ``ggml_backend_amx_mul_mat`` segfaults
    on the first embedding on this machine (ggml-org/llama.cpp#20824, machine-dependent, no fix).
    Without extra buffer types the weights stay in the plain CPU buffer (AVX-512 VNNI kernels);
    no repacked layout was used for Q8_0 here either way. ``Llama()`` has no argument for it, so
    its default model parameters are patched for the duration of the load.
    """
    import llama_cpp.llama_cpp as capi
    from llama_cpp import Llama

    defaults = capi.llama_model_default_params

    def params() -> object:
        p = defaults()
        p.use_extra_bufts = extra_bufts
        return p

    capi.llama_model_default_params = params
    try:
        return Llama(model_path=str(gguf), embedding=True, n_threads=1, n_threads_batch=1, n_ctx=n_ctx,
                     n_batch=n_ctx, n_ubatch=n_ctx, verbose=False)
    finally:
        capi.llama_model_default_params = defaults


def llama_embedder(llm: object, prompt: str) -> Callable[[list[str]], object]:
    """The timed call: one ``embed()`` per paragraph (prompt prepended), rows L2-normalized."""
    import numpy as np

    def call(texts: list[str]) -> object:
        rows = np.asarray([llm.embed(prompt + t) for t in texts], dtype=np.float32)  # type: ignore[attr-defined]
        norms = np.linalg.norm(rows, axis=1, keepdims=True)
        return rows / np.where(norms > 0, norms, 1.0)
    return call


def llama_configs(model_dir: Path, cache: Path, lengths: Sequence[int], *, prompt: str = "",
                  converter: Path | None = None, outtype: str = "q8_0") -> tuple[list[Config], str]:
    """The llama.cpp row (batch 1) and a sentence for the report saying what ran."""
    from deposium.bench.peers import PeerUnavailable

    if (missing := llama_missing()) is not None:
        raise PeerUnavailable(missing)
    if not is_gemma3(model_dir):
        raise PeerUnavailable(f"{Path(model_dir).name} is not a Gemma3 (EmbeddingGemma) model")
    gguf = gguf_path(cache, model_dir, outtype)
    if not gguf.is_file():  # the converter (an sdist download) is needed only to build it
        gguf = ensure_gguf(model_dir, cache, ensure_converter(cache, converter), outtype)
    n_ctx = context_size(max(lengths))
    llm = load_llama(gguf, n_ctx)
    note = (f"llama.cpp: `{gguf.name}` ({gguf.stat().st_size / 2 ** 20:,.0f} MiB, converted with "
            f"`--sentence-transformers-dense-modules --outtype {outtype}`), llama-cpp-python {installed_version()}, "
            f"n_threads = n_threads_batch = 1, n_ctx = n_batch = n_ubatch = {n_ctx}, no extra buffer types "
            f"(ggml's AMX path segfaults here), one paragraph per `embed()`, prompt {prompt!r} prepended, "
            "vectors L2-normalized.")
    name = f"llama.cpp {outtype.upper()}"
    return [Config(name, "peer", "1", batch_one(len(lengths)), llama_embedder(llm, prompt))], note
