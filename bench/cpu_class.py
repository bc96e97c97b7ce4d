"""The CPU class a benchmark report is filed under: zen3, zen4, zen5, xeon-amx, xeon-avx512 or avx2.

Why classes and not model names: int8 speed is decided by the instruction sets a core offers (VNNI
or not, AMX or not, AVX-512 or only AVX2), and cloud machines report one marketing name for several
generations. One report per model x class keeps figures from similar machines together and lets a
new run replace the old figures for its class instead of piling up beside them.

AMD's family and model numbers tell the Zen generations apart (family 25 is both Zen 3 and Zen 4,
told apart by model ranges, or by AVX-512, which only Zen 4 has, when the model is unknown); Intel
server cores are told apart by their flags. A CPU without AVX2 (or not x86) is ``other``: none of
the classes describes it.
"""

from __future__ import annotations

from collections.abc import Set
from dataclasses import dataclass
from pathlib import Path

#: Family 25 (0x19) model ranges that are Zen 4 (Genoa, Bergamo/Siena, Raphael, Phoenix, Storm Peak);
#: the rest of family 25 is Zen 3 / Zen 3+.
ZEN4_MODELS = (range(0x10, 0x20), range(0x60, 0x80), range(0xA0, 0xB0))

#: Every class a report can be filed under.
CPU_CLASSES = ("zen3", "zen4", "zen5", "xeon-amx", "xeon-avx512", "avx2", "other")


@dataclass(frozen=True)
class CpuIdentity:
    """What /proc/cpuinfo says about the first CPU."""

    vendor: str
    family: int | None
    model: int | None
    flags: frozenset[str]


def read_cpu_identity(cpuinfo: Path = Path("/proc/cpuinfo")) -> CpuIdentity:
    """Vendor, family, model and flags of the first CPU listed (empty when the file is unreadable)."""
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:
        text = ""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            if fields:  # a blank line ends the first CPU's block
                break
            continue
        fields.setdefault(key.strip(), value.strip())

    def number(key: str) -> int | None:
        value = fields.get(key, "")
        return int(value) if value.isdigit() else None

    return CpuIdentity(vendor=fields.get("vendor_id", ""), family=number("cpu family"), model=number("model"),
                       flags=frozenset(fields.get("flags", "").split()))


def cpu_class(vendor: str, family: int | None, model: int | None, flags: Set[str]) -> str:
    """The report class of a CPU (one of :data:`CPU_CLASSES`)."""
    if vendor == "AuthenticAMD" and family is not None:
        if family >= 26:
            return "zen5"
        if family == 25:
            zen4 = any(model in r for r in ZEN4_MODELS) if model is not None else "avx512f" in flags
            return "zen4" if zen4 else "zen3"
    if vendor == "GenuineIntel":
        if "amx_int8" in flags:
            return "xeon-amx"
        if "avx512f" in flags:
            return "xeon-avx512"
    return "avx2" if "avx2" in flags else "other"


def this_cpu_class(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The class of the CPU this process runs on."""
    cpu = read_cpu_identity(cpuinfo)
    return cpu_class(cpu.vendor, cpu.family, cpu.model, cpu.flags)
