"""Extraction speed per core: PDF pages/s, HTML and DOCX MB/s, and extraction's share of a job's CPU.

Why CPU time of this process (``time.process_time``): extraction runs one document per reader
process, so the CPU seconds one extraction takes is what one core delivers, whatever else
shares the machine. Each figure is the median of ``--repeats`` measurements; a measurement
repeats the extraction until it has run at least ``--min-seconds`` of CPU, so small documents
are not lost in timer noise. The share of a job compares, on the same PDF, extraction,
splitting (token counting) and embedding with the worker's own :class:`Embedder`.

Usage::

    python -m deposium.bench.extract_speed [--pdf FILE] [--html FILE] [--artifact DIR] [--trafilatura] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from deposium.bench.stats import median

DATA = Path(__file__).resolve().parents[1] / "tests" / "data"


def cpu_per_call(call: Callable[[], object], *, repeats: int, min_seconds: float) -> float:
    """Median CPU seconds of one ``call`` over ``repeats`` measurements."""
    call()  # warm: imports, page cache
    samples = []
    for _ in range(repeats):
        n = 0
        started = time.process_time()
        while True:
            call()
            n += 1
            spent = time.process_time() - started
            if spent >= min_seconds:
                break
        samples.append(spent / n)
    return median(samples)


def make_docx(path: Path, sections: int = 40) -> Path:
    """A Word document of ordinary shape: headings, paragraphs and a small table per section."""
    import docx

    document = docx.Document()
    for s in range(sections):
        document.add_heading(f"Section {s}", level=1)
        for p in range(5):
            document.add_paragraph(f"Paragraph {p} of section {s} explains one more step of the procedure in "
                                   "plain words, long enough to be a real paragraph of a manual or a report.")
        table = document.add_table(rows=3, cols=3)
        for r in range(3):
            for c in range(3):
                table.cell(r, c).text = f"cell {r}.{c}"
    document.save(path)
    return path


def run(args: argparse.Namespace) -> dict[str, object]:
    from deposium.producer.documents.docx import extract_docx
    from deposium.producer.documents.html import extract_html
    from deposium.producer.documents.pdf import extract_pdf

    kw = {"repeats": args.repeats, "min_seconds": args.min_seconds}
    result: dict[str, object] = {"cpu": _cpu_name(), "repeats": args.repeats}
    pdf = extract_pdf(args.pdf)
    pages = max(b.page or 0 for b in pdf.blocks)
    pdf_s = cpu_per_call(lambda: extract_pdf(args.pdf), **kw)
    result["pdf"] = {"file": args.pdf.name, "pages": pages, "cpu_s": pdf_s, "pages_per_s": pages / pdf_s}
    html_mb = args.html.stat().st_size / 1e6
    html_s = cpu_per_call(lambda: extract_html(args.html), **kw)
    result["html"] = {"file": args.html.name, "mb": html_mb, "cpu_s": html_s, "mb_per_s": html_mb / html_s}
    with tempfile.TemporaryDirectory() as tmp:
        docx_path = make_docx(Path(tmp) / "bench.docx")
        docx_mb = docx_path.stat().st_size / 1e6
        docx_s = cpu_per_call(lambda: extract_docx(docx_path), **kw)
    result["docx"] = {"mb": docx_mb, "cpu_s": docx_s, "mb_per_s": docx_mb / docx_s}
    if args.artifact is not None:
        result["job_share"] = _job_share(args, pdf.blocks, pdf_s, kw)
    if args.trafilatura:
        result["html_trafilatura"] = _trafilatura(args.html, kw)
    return result


def _trafilatura(path: Path, kw: dict) -> dict[str, object]:
    """The readability peer on the same page: speed and whether its output keeps the headings.

    Why measured: it was the alternative to the lxml walker (producer/documents/html.py); the
    walker was chosen on these figures. Needs ``pip install trafilatura lxml_html_clean``.
    """
    import trafilatura

    html = path.read_text(encoding="utf-8", errors="replace")

    def call() -> str:
        return trafilatura.extract(html, output_format="markdown", include_formatting=True,
                                   include_tables=True) or ""

    text = call()
    mb = len(html.encode()) / 1e6
    cpu = cpu_per_call(call, **kw)
    return {"version": trafilatura.__version__, "mb_per_s": mb / cpu, "cpu_s": cpu,
            "headings_kept": sum(1 for line in text.splitlines() if line.startswith("#"))}


def _job_share(args: argparse.Namespace, blocks: list, pdf_s: float, kw: dict) -> dict[str, float]:
    """CPU of extraction vs splitting vs MiniLM embedding for the same PDF's paragraphs."""
    from deposium.producer.split import split_blocks
    from deposium.producer.tokens import TokenCounter
    from deposium.worker.embedder import Embedder

    counter = TokenCounter.from_artifact(args.artifact)
    paragraphs = list(split_blocks("bench", blocks, counter))
    split_s = cpu_per_call(lambda: list(split_blocks("bench", blocks, counter)), **kw)
    embedder = Embedder(args.artifact)
    texts = [p.text for p in paragraphs]
    embed_s = cpu_per_call(lambda: embedder.embed(texts), repeats=args.repeats, min_seconds=0.0)
    total = pdf_s + split_s + embed_s
    return {"paragraphs": len(texts), "extract_cpu_s": pdf_s, "split_cpu_s": split_s, "embed_cpu_s": embed_s,
            "extract_share": pdf_s / total, "split_share": split_s / total}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} vCPUs"
    except OSError:
        pass
    return "unknown"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m deposium.bench.extract_speed", description=__doc__.split("\n")[0])
    p.add_argument("--pdf", type=Path, default=DATA / "shared-mime-info-spec.pdf")
    p.add_argument("--html", type=Path, default=DATA / "libffi-closure-api.html")
    p.add_argument("--artifact", type=Path, default=None,
                   help="artifact directory: also measure the share of extraction in a job's CPU")
    p.add_argument("--trafilatura", action="store_true",
                   help="also measure trafilatura on the HTML page (must be installed)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--min-seconds", type=float, default=0.5, help="CPU seconds per measurement at least")
    return p


def main(argv: list[str] | None = None) -> int:
    print(json.dumps(run(parser().parse_args(argv)), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
