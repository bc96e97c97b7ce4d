"""One run's figures as a table in the user docs, filed by model x CPU class.

Why a marked region replaced in place: the docs page keeps one table per model x CPU class, and a
new run on a class must replace that class's figures, never add a second table beside the old one
(readers would not know which is current). The table sits between
``<!-- bench:table model=<model> cpu=<class> -->`` and ``<!-- /bench:table -->``; everything else in
the page is left as it is. The full report and its plot are copied beside the page
(``bench/<model>-<class>.md`` / ``.png``) and the table links them.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path

from deposium.bench.timing import Timing

END_MARKER = "<!-- /bench:table -->"
HEADER = ("| configuration | tokens/s per core | × peer | cosine vs torch mean / min | STS-B ×100 | command | date "
          "| CPU |")


def start_marker(model: str, cpu: str) -> str:
    return f"<!-- bench:table model={model} cpu={cpu} -->"


def model_label(source: Path) -> str:
    """``embeddinggemma`` for Gemma3 sources, ``minilm`` for MiniLM ones, else the directory's name
    (lower case, characters other than letters, digits, ``.`` and ``-`` replaced by ``-``)."""
    from deposium.bench.llama import is_gemma3

    if is_gemma3(source):
        return "embeddinggemma"
    name = source.name if source.name != "model" else source.parent.name
    if "minilm" in str(source).lower():
        return "minilm"
    return re.sub(r"[^a-z0-9.-]+", "-", name.lower()).strip("-") or "model"


def report_stem(model: str, cpu: str) -> str:
    """The file name (without suffix) of a report: ``<model>-<cpu class>``."""
    return f"{model}-{cpu}"


def stsb_by_configuration(validation: Mapping[str, object]) -> dict[str, float]:
    """STS-B Spearman x100 at the full dimension from an artifact's validation record, keyed by the
    configuration-name prefix it belongs to (empty when the gate did not run STS-B)."""
    stsb = validation.get("stsb_spearman_x100")
    if not isinstance(stsb, Mapping):
        return {}
    names = {"torch_fp32": "ST torch fp32", "onnx_fp32": "ours fp32", "onnx_int8": "ours int8"}
    out = {}
    for key, prefix in names.items():
        by_dim = stsb.get(key)
        if isinstance(by_dim, Mapping) and by_dim:
            full = max(by_dim, key=lambda d: int(d))
            out[prefix] = float(by_dim[full])
    return out


def read_stsb(artifact: Path) -> dict[str, float]:
    """:func:`stsb_by_configuration` of ``artifact``'s validation.json (empty when it has none)."""
    from deposium.worker.artifact import VALIDATION_FILE

    try:
        return stsb_by_configuration(json.loads((artifact / VALIDATION_FILE).read_text()))
    except (OSError, ValueError):
        return {}


def _torch_rate(timings: Sequence[Timing], batched: bool) -> float | None:
    for t in timings:
        if t.name.startswith("ST torch") and (t.batching != "1") == batched:
            return t.tokens_per_s
    return None


def table(timings: Sequence[Timing], *, command: str, cpu: str, date: str,
          stsb: Mapping[str, float] | None = None, report_link: str | None = None) -> list[str]:
    """The table's lines: one row per timed configuration. "× peer" is tokens/s over torch fp32's at the
    same kind of batching (batch 1 against batch 1, batched against batched)."""
    stsb = stsb or {}
    cell = "`" + command.replace("|", "\\|") + "`"  # a pipe would end the cell
    lines = [HEADER, "|---|---:|---:|---:|---:|---|---|---|"]
    for t in timings:
        torch_rate = _torch_rate(timings, t.batching != "1")
        ratio = f"{t.tokens_per_s / torch_rate:.2f}×" if torch_rate else "—"
        if t.is_reference:
            cosine = "reference"
        elif t.cosine_mean is None or t.cosine_min is None:
            cosine = "—"
        else:
            cosine = f"{t.cosine_mean:.4f} / {t.cosine_min:.4f}"
        score = next((f"{v:.2f}" for prefix, v in stsb.items() if t.name.startswith(prefix)), "—")
        lines.append(f"| {t.name}, batch {t.batching} | {t.tokens_per_s:,.0f} | {ratio} | {cosine} | {score} "
                     f"| {cell} | {date} | {cpu} |")
    if not timings:
        lines.append(f"| no configuration timed (single-core part skipped) | — | — | — | — | {cell} | {date} | {cpu} |")
    if report_link:
        lines += ["", f"Full report: [{report_link}]({report_link})."]
    return lines


def splice(text: str, model: str, cpu: str, lines: Sequence[str]) -> str:
    """``text`` with the region for ``model`` x ``cpu`` replaced by ``lines`` (markers kept), or a new
    marked region appended at the end when the page has none for that pair."""
    start = start_marker(model, cpu)
    block = "\n".join([start, *lines, END_MARKER])
    at = text.find(start)
    if at >= 0:
        end = text.find(END_MARKER, at + len(start))
        if end < 0:
            raise ValueError(f"{start} has no closing {END_MARKER}")
        return text[:at] + block + text[end + len(END_MARKER):]
    heading = f"### {model} on {cpu}"
    return text.rstrip("\n") + ("\n\n" if text.strip() else "") + f"{heading}\n\n{block}\n"


def update_docs(page: Path, model: str, cpu: str, timings: Sequence[Timing], *, command: str, cpu_name: str,
                report: Path, plot: Path | None, stsb: Mapping[str, float] | None = None,
                date: str | None = None) -> tuple[Path, Path | None]:
    """Replace ``page``'s table for ``model`` x ``cpu`` and copy the report (and plot) to
    ``<page's directory>/bench/<model>-<cpu>.md`` (``.png``). Returns the copies' paths."""
    folder = page.parent / "bench"
    folder.mkdir(parents=True, exist_ok=True)
    stem = report_stem(model, cpu)
    md_copy = folder / f"{stem}.md"
    png_copy = None
    if plot is not None and plot.is_file():
        png_copy = folder / f"{stem}.png"
        if plot.resolve() != png_copy.resolve():
            shutil.copyfile(plot, png_copy)
    text = report.read_text(encoding="utf-8")
    if png_copy is not None:  # the report links its plot relative to itself; the copy sits beside the copy
        text = text.replace(f"]({os.path.relpath(plot, report.parent)})", f"]({png_copy.name})")
    md_copy.write_text(text, encoding="utf-8")
    day = date or dt.datetime.now(dt.UTC).strftime("%Y-%m-%d")
    lines = table(timings, command=command, cpu=f"{cpu_name} ({cpu})", date=day, stsb=stsb,
                  report_link=f"bench/{md_copy.name}")
    old = page.read_text(encoding="utf-8") if page.is_file() else ""
    page.write_text(splice(old, model, cpu, lines), encoding="utf-8")
    return md_copy, png_copy
