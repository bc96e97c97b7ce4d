#!/usr/bin/env bash
# Create .venv and install the project with every extra (convert, producer, documents, monitor, bench, sinks, dev,
# openvino: the bench's OpenVINO peer, so the suite tests it instead of skipping it).
# Touches nothing outside this checkout's .venv (no system packages, no root): scripts/demo.sh runs
# it on any machine. The test suite's system dependency (pgvector) is scripts/test.sh's business.
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
# DEPOSIUM_REQUIRE_KERNELS=1: if the fused kernels (worker/kernels, built by setup.py) fail to build,
# the setup fails, loudly, instead of leaving a worker without the int8-fused recipe.
DEPOSIUM_REQUIRE_KERNELS=1 .venv/bin/python -m pip install -q -e '.[producer,documents,convert,monitor,bench,sinks,dev,openvino]'
