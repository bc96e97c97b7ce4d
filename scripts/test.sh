#!/usr/bin/env bash
# Set up (idempotent) and run the default test suite. This is the command README and CI use.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
# The pgvector sink tests need the pgvector extension in this machine's PostgreSQL: a system-wide
# install (apt sources, a build, make install as root). Said before it is done, skipped when present.
if ! scripts/install-pgvector.sh --check 2>/dev/null; then
  echo "scripts/test.sh: installing pgvector into the system's PostgreSQL (root, apt, build) for the pgvector sink tests" >&2
  scripts/install-pgvector.sh || echo "WARNING: pgvector could not be installed; tests/test_sinks_pgvector.py will fail" >&2
fi
.venv/bin/python -m ruff check .
set +e
.venv/bin/python -m pytest "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests: treating as failure" >&2
  exit 1
fi
exit "$rc"
