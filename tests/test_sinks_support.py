"""Helpers shared by the sink tests: a small corpus with held-back queries, the Parquet reference.

No tests here; the module name only follows the sink tests' naming so it stays theirs.
"""

from __future__ import annotations

import functools
import itertools
import os
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from deposium.producer import submit
from tests.test_producer_support import stdlib_docstrings

#: STS-B test pairs scored 5.0 (paraphrases). The first sentence is loaded as the first
#: paragraph of a document; the second is held back and used as a query.
PAIRS = [
    ("One woman is measuring another woman's ankle.", "A woman measures another woman's ankle."),
    ("A man is cutting an onion.", "A man cuts an onion."),
    ("The man is kissing and hugging the woman.", "A man is hugging and kissing a woman."),
    ("A man is doing trick with play cards.", "A man is performing a card trick."),
    ("Two men are fistfighting in a ring.", "Two men fistfight in a ring."),
    ("A woman is stabbing a potato with a fork.", "A woman is puncturing a potato with a fork."),
    ("A group of people are sweeping water out of a house.", "People are sweeping water out of a house."),
    ("A man plays a guitar.", "A man is playing a guitar."),
]


def documents(n_filler: int = 160) -> list[tuple[str, str]]:
    """Pair documents (two paragraphs each), filler documents, and two exact duplicates."""
    fill = list(itertools.islice(stdlib_docstrings(), n_filler + len(PAIRS)))
    docs = [(f"pair{k}", f"{a}\n\n{fill[n_filler + k]}") for k, (a, _) in enumerate(PAIRS)]
    docs += [(f"f{i:04d}", t) for i, t in enumerate(fill[:n_filler])]
    docs += [("dup-a", fill[3]), ("dup-b", fill[40])]
    return docs


def run_job(out: str, artifact: Path, docs: list[tuple[str, str]], **kw: object):
    """One library-API job in this process (the same runner the CLI uses); returns the summary."""
    cache = Path(tempfile.mkdtemp(prefix="deposium-sink-cache-"))
    os.environ.pop("REDIS_URL", None)
    from deposium.worker.config import load_settings

    settings = load_settings({"DEPOSIUM_CACHE_DIR": str(cache), "DEPOSIUM_ARTIFACT": str(artifact)})
    return submit(docs, out=out, local=True, artifact_dir=artifact, batch_tokens=400, min_chars=1,
                  settings=settings, background=False, **kw).wait()  # type: ignore[arg-type]


@functools.lru_cache(maxsize=2)
def parquet_reference(artifact: str, dtype: str = "float32") -> pa.Table:
    """The same documents through the default Parquet sink: what every other sink must equal."""
    out = Path(tempfile.mkdtemp(prefix="deposium-sink-ref-")) / "ref.parquet"
    summary = run_job(str(out), Path(artifact), documents(), dtype=dtype)
    assert summary.ok, summary
    return pq.read_table(out).sort_by("id")


def vectors_of(table: pa.Table) -> np.ndarray:
    col = table.column("embedding").combine_chunks()
    flat = np.asarray(col.flatten().to_numpy(zero_copy_only=False))
    return flat.reshape(table.num_rows, col.type.list_size)


def queries(artifact: Path) -> np.ndarray:
    """The held-back paragraphs embedded by the very Embedder local jobs use."""
    from deposium.worker.embedder import Embedder

    return Embedder(artifact).embed([b for _, b in PAIRS]).vectors
