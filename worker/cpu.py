"""What the CPU under this container really offers: usable cores and int8 instruction sets.

Why not ``os.cpu_count()``: in a container it reports the host's cores, not the cgroup
quota. Starting one worker process per host core on a 2-core quota is exactly the
oversubscription that made paragraphs take 40 s on Railway. Why the feature flags:
int8 kernels are fast only with VNNI (``avx512_vnni`` / ``avx_vnni``); an operator must
see at start-up when the artifact's quantization does not suit the machine.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from deposium.worker.variant import INTEGER_GEMM_RECIPES, can_saturate, u8s8_saturates

#: Instruction sets that decide int8 speed, best first.
INT8_FEATURES = ("amx_int8", "avx512_vnni", "avx_vnni", "avx512bw", "avx2")


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _own_cgroups(proc_self_cgroup: Path) -> tuple[str, str]:
    """This process's cgroup paths: (v2 path from ``0::/path``, v1 path of the ``cpu`` controller)."""
    v2 = v1 = ""
    for line in (_read(proc_self_cgroup) or "").splitlines():
        _, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        if line.startswith("0::"):
            v2 = path.strip().lstrip("/")
        elif "cpu" in controllers.split(","):
            v1 = path.strip().lstrip("/")
    return v2, v1


def _with_ancestors(base: Path, relative: str) -> list[Path]:
    """``base/relative`` and every directory up to ``base`` (a parent's quota also binds us)."""
    directory = base / relative if relative else base
    return [directory, *(p for p in directory.parents if p.is_relative_to(base))]


def _quota(quota: str | None, period: str | None) -> float | None:
    try:
        q, p = int(quota or ""), int(period or "100000")
    except ValueError:
        return None
    return q / p if q > 0 and p > 0 else None


def cgroup_cpu_limit(
    root: Path = Path("/sys/fs/cgroup"), proc_self_cgroup: Path = Path("/proc/self/cgroup")
) -> float | None:
    """CPU quota in cores from cgroup v2 ``cpu.max`` or v1 ``cpu.cfs_quota_us``/``cpu.cfs_period_us``,
    for this process's cgroup and its ancestors (the tightest wins); None when unlimited."""
    v2, v1 = _own_cgroups(proc_self_cgroup)
    limits: list[float] = []
    for directory in _with_ancestors(root, v2):
        quota, _, period = (_read(directory / "cpu.max") or "max").partition(" ")
        if (value := _quota(quota, period)) is not None:
            limits.append(value)
    for mount in ("cpu", "cpu,cpuacct", "cpuacct,cpu"):
        if not (root / mount).is_dir():
            continue
        for directory in _with_ancestors(root / mount, v1):
            value = _quota(_read(directory / "cpu.cfs_quota_us"), _read(directory / "cpu.cfs_period_us"))
            if value is not None:
                limits.append(value)
    return min(limits) if limits else None


def available_cpus(
    root: Path = Path("/sys/fs/cgroup"),
    proc_self_cgroup: Path = Path("/proc/self/cgroup"),
    affinity: set[int] | None = None,
) -> int:
    """Cores this process may actually use: min(affinity mask, cgroup quota rounded up), >= 1.

    Rounded up because a 1.5-core quota still lets two single-threaded processes make
    progress; rounding down would leave half a core idle.
    """
    if affinity is None:
        try:
            affinity = os.sched_getaffinity(0)
        except (AttributeError, OSError):
            affinity = set(range(os.cpu_count() or 1))
    count = max(1, len(affinity))
    quota = cgroup_cpu_limit(root, proc_self_cgroup)
    if quota is not None:
        count = min(count, max(1, math.ceil(quota - 1e-9)))
    return count


def cpu_features(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    """The int8-relevant flags (:data:`INT8_FEATURES`) of the first CPU in ``/proc/cpuinfo``."""
    text = _read(cpuinfo) or ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in {"flags", "Features"}:
            flags = set(value.split())
            return frozenset(f for f in INT8_FEATURES if f in flags)
    return frozenset()


def _doubles_gemm_rows(quantization: Mapping[str, Any]) -> bool:
    """Whether the recipe runs a second int8 pass over activations (``int8-wide``, ``--wide-activations``):
    twice the GEMM rows, which a CPU without VNNI cannot afford."""
    return quantization.get("recipe") == "int8-wide" or bool(quantization.get("wide_activations"))


def quantization_warning(quantization: Mapping[str, Any], features: frozenset[str]) -> str | None:
    """A warning when the artifact's quantization recipe does not suit these CPU features, else None.

    * any int8 recipe needs at least AVX2 for usable int8 kernels;
    * integer-GEMM recipes on x86 without VNNI/AMX run exact (worker/variant.py asks for the u8 x u8
      kernel there unless the artifact has 7-bit operands) through ONNX Runtime's u8 x u8 or 16-bit
      u8 x s8 kernels, at about a third of a VNNI core's int8 rate. One pass per activation still
      beats fp32 there (AMD EPYC Zen 3, ``int8-rot``: EmbeddingGemma 1.23x fp32's tokens/s and
      queries in 0.63x the time; MiniLM 1.11x and 0.70x), so no warning; a second pass over the
      activations (``int8-wide``) doubles the GEMM rows and measured slower than fp32 (210 vs 290
      tokens/s), so the operator hears about it (docs/benchmarks.md);
    * 7-bit weights (an explicit convert option) give away precision no CPU needs to lose now;
    * ``int8-block`` (``MatMulNBits``) without VNNI runs correctly, at lower int8 throughput.
    """
    recipe = str(quantization.get("recipe", "")).lower()
    if "int8" not in recipe:
        return None
    vnni = bool(features & {"avx512_vnni", "avx_vnni"})
    if not vnni and "avx2" not in features:
        return (
            f"artifact is quantized ({recipe}) but this CPU has neither AVX2 nor VNNI: int8 kernels fall "
            "back to slow generic code; an fp32 artifact will likely be faster here"
        )
    bits = quantization.get("weight_bits", 8)
    integer_matmul = recipe in INTEGER_GEMM_RECIPES
    if integer_matmul and u8s8_saturates(features) and _doubles_gemm_rows(quantization):
        kernel = ("the u8 x u8 int8 kernel" if can_saturate(quantization)
                  else "the 16-bit u8 x s8 kernel (7-bit operands cannot saturate it)")
        return (
            f"this CPU has AVX2 but no VNNI/AMX: the {recipe} artifact runs exact through {kernel}, but its "
            "second int8 pass over activations doubles the GEMM rows it covers, which measured slower than fp32 on "
            "such a CPU (AMD EPYC Zen 3, docs/benchmarks.md); an int8-rot artifact (deposium-convert --recipe "
            "int8-rot, or auto where it passes the gate) or an fp32 one (--recipe fp32) serves it better"
        )
    if integer_matmul and bits == 7:
        return (
            f"artifact recipe {recipe} uses 7-bit weights: rebuilding with 8-bit weights (the default, exact "
            "on every CPU through ONNX Runtime's u8 x u8 kernel where u8 x s8 saturates) gives more accurate vectors"
        )
    if recipe == "int8-block" and not vnni:
        return (
            "this CPU has AVX2 but no VNNI (avx512_vnni / avx_vnni): the int8-block artifact runs "
            "correctly but at lower int8 throughput than on VNNI hardware"
        )
    return None
