#!/usr/bin/env bash
# Create .venv and install the project with every extra (convert, producer, monitor, bench, dev).
# torch is pinned to 2.13.0: on these machines that is a CPU wheel from local disk; an unpinned
# torch would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -e '.[producer,convert,monitor,bench,sinks,dev]'
