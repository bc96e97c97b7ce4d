"""Build the fused int8 kernels (worker/kernels: the `int8-fused` recipe's ONNX Runtime custom ops).

Everything else about the package is in pyproject.toml; setuptools reads ext_modules only from here.
The library is an ONNX Runtime custom-op library, not a Python module: ONNX Runtime loads it
(worker/kernels/__init__.py finds it), Python never imports it. One set of flags for every file: each
kernel file names its own instruction set in a target pragma, so the glue stays baseline x86-64.

Why optional: a machine without a C compiler (or not x86-64) still gets a working worker, only without
the `int8-fused` recipe (convert then ships `int8-rot`; loading an `int8-fused` artifact says why it
cannot). DEPOSIUM_REQUIRE_KERNELS=1 (scripts/setup.sh, the Docker build) makes a failed build an error.
"""

import os
import platform

from setuptools import Extension, setup

KERNELS = "worker/kernels"
REQUIRED = os.environ.get("DEPOSIUM_REQUIRE_KERNELS", "") == "1"

rowq = Extension(
    "deposium.worker.kernels._rowq",
    sources=[f"{KERNELS}/rowq_op.c", f"{KERNELS}/rowq_avx512.c", f"{KERNELS}/rowq_avx2.c"],
    include_dirs=[KERNELS, f"{KERNELS}/include"],
    # -ffp-contract=off: no path may fuse the epilogue's multiply and add into an FMA another path
    # does not, or the same text would get other bits on another CPU.
    extra_compile_args=["-O3", "-std=gnu11", "-ffp-contract=off", "-fno-strict-aliasing"],
    optional=not REQUIRED,
)

x86 = platform.machine().lower() in {"x86_64", "amd64"}
setup(ext_modules=[rowq] if x86 or REQUIRED else [])
