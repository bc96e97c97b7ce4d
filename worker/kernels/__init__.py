"""The fused int8 kernels: ONNX Runtime custom ops that the ``int8-fused`` recipe's graphs call.

Why our own ops: the ``int8-rot`` graph quantizes every activation row with five ONNX Runtime nodes,
multiplies with ``MatMulIntegerToFloat`` and scales with a sixth, each pass over the whole activation;
on EmbeddingGemma-300m that chain was most of a short query's time and on all-MiniLM-L6-v2 it kept
the worker behind OpenVINO (docs/benchmarks.md). One op (``rowq_op.c``) does the chain in one pass, on AMX
tiles, AVX-512 VNNI or AVX2, with the same output bits on every path.

The library is built by ``setup.py`` at install time (a C compiler, x86-64) beside this file. An
artifact's manifest names it (``quantization.kernel_library``); the :class:`~deposium.worker.embedder.Embedder`
registers it in its session. Where it is missing, loading such an artifact fails with
:class:`KernelLibraryError`, saying how to get it or which recipe to convert with instead.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

from deposium.worker.artifact import ArtifactError

if TYPE_CHECKING:
    import onnxruntime as ort

#: How a manifest names this library (``quantization.kernel_library``).
LIBRARY = "deposium_rowq"
#: The ONNX domain of the ops (convert/fuse.py writes it into the graph's opset imports).
DOMAIN = "deposium.rowq"
#: The kernel paths the library can run, fastest first (``DEPOSIUM_KERNEL_ISA`` forces one).
ISAS = ("amx", "vnni", "avx2")
_MODULE = "deposium.worker.kernels._rowq"


class KernelLibraryError(ArtifactError):
    """An artifact needs a kernel library this installation does not have."""


@cache
def library_path() -> Path | None:
    """The built library, or None (no compiler at install time, or not x86-64)."""
    spec = importlib.util.find_spec(_MODULE)
    return Path(spec.origin) if spec is not None and spec.origin else None


def require_library(name: str) -> Path:
    """The file of the kernel library a manifest names; a clear error where it is unknown or not built."""
    if name != LIBRARY:
        raise KernelLibraryError(f"the artifact needs kernel library {name!r}, but this worker knows only {LIBRARY!r}")
    path = library_path()
    if path is None:
        raise KernelLibraryError(
            f"the artifact needs the {LIBRARY} kernel library (its graph uses {DOMAIN} ops), which this installation "
            "does not have: it is built when the package is installed on x86-64 with a C compiler (reinstall with "
            "DEPOSIUM_REQUIRE_KERNELS=1 to see why it was not), or convert the model with --recipe int8-rot")
    return path


def active_isa() -> str:
    """The kernel path the last session registration chose in this process ("" before any)."""
    path = library_path()
    if path is None:
        return ""
    function = ctypes.CDLL(str(path)).deposium_rowq_isa
    function.restype = ctypes.c_char_p
    return function().decode()


def register_kernels(opts: ort.SessionOptions, library: Path, isa: str = "auto") -> None:
    """Load the fused kernels into ``opts`` on path ``isa``. The library reads its path from the
    environment when it registers (a C library has no other channel from here), so the variable is set
    for that call only: the process's environment is left as it was."""
    previous = os.environ.get("DEPOSIUM_KERNEL_ISA")
    os.environ["DEPOSIUM_KERNEL_ISA"] = isa
    try:
        opts.register_custom_ops_library(str(library))
    except Exception as exc:  # onnxruntime raises its own Fail type with the library's message
        raise KernelLibraryError(f"{library.name}: {exc}") from None
    finally:
        if previous is None:
            del os.environ["DEPOSIUM_KERNEL_ISA"]
        else:
            os.environ["DEPOSIUM_KERNEL_ISA"] = previous


def probe_isa(isa: str = "auto") -> str:
    """The path a session on this machine would run (for logs and reports); "" without the library. ONNX
    Runtime unloads the library with the last options that hold it, hence the question inside."""
    import onnxruntime as ort

    path = library_path()
    if path is None:
        return ""
    opts = ort.SessionOptions()
    register_kernels(opts, path, isa)
    return active_isa()
