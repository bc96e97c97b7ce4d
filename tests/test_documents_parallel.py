"""``--readers N``: documents read and split in N processes give the very same job as one reader."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pyarrow.parquet as pq

from tests.test_documents_sinks import _folder
from tests.test_producer_support import submit_cmd


def test_one_and_two_readers_give_identical_batches_ids_and_vectors(tmp_path: Path, minilm_artifact: Path):
    docs = _folder(tmp_path)
    # a record file between the documents: read in the calling process, in its place in the order
    (docs / "m-records.jsonl").write_text(json.dumps({"id": "r1", "text": "A record among documents."}) + "\n")
    (docs / "z-second.md").write_text("# Z\n\nA last Markdown file after the records.\n")
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    env.update(DEPOSIUM_ARTIFACT=str(minilm_artifact), DEPOSIUM_CACHE_DIR=str(tmp_path / "cache"))
    tables = {}
    for n in (1, 2):
        out = tmp_path / f"r{n}.parquet"
        r = subprocess.run(submit_cmd("docs", "--local", "--out", str(out), "--no-progress", "--readers", str(n),
                                      "--chunk-tokens", "64", "--chunk-overlap", "16"),
                           env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
        assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr  # 1: the unsupported file
        assert "skipped files: 1 unsupported format: .xyz" in r.stdout
        tables[n] = pq.read_table(out)
    one, two = tables[1], tables[2]
    assert one.num_rows > 150 and "r1#0" in one.column("id").to_pylist()
    assert one.column("id").to_pylist() == two.column("id").to_pylist()  # same order, not only the same set
    assert one.equals(two)  # texts, provenance, token counts and vectors, bit for bit
    meta = [json.loads(t.schema.metadata[b"deposium"]) for t in (one, two)]
    assert meta[0]["batches"] == meta[1]["batches"] and len(meta[0]["batches"]) > 1  # batch ids and digests
    assert max(one.column("token_count").to_pylist()) <= 64
