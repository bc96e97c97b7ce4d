#!/usr/bin/env bash
# Download every wheel the Docker build stages need into docker/wheelhouse/ (host side).
#
# Why: the image's build stages must install torch as a CPU wheel and, on hosts behind a TLS
# proxy the container does not trust (or with no index at all), cannot reach PyPI from inside
# `docker build`. The host's pip already trusts its own CA bundle and sees its local wheel
# directories, so it downloads here and the build installs from the files.
# Usage: docker/make-wheelhouse.sh [PYTHON]   (PYTHON must be a CPython 3.11 like the image's)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-${PYTHON:-python3}}
"$PY" - <<'PYEOF' > docker/wheelhouse/requirements.txt
import tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
extras = project["optional-dependencies"]
reqs = project["dependencies"] + extras["convert"] + extras["monitor"] + extras["producer"] + extras["documents"]
# setuptools/wheel: the project's build backend (pip builds /src offline). async-timeout: redis needs
# it on Python < 3.11.3 (Debian bookworm ships 3.11.2) but the host's newer Python skips it.
print("\n".join(reqs + ["setuptools>=68", "wheel", "async-timeout>=4.0.3"]))
PYEOF
"$PY" -m pip download --only-binary=:all: --dest docker/wheelhouse -r docker/wheelhouse/requirements.txt
rm -f docker/wheelhouse/requirements.txt
ls docker/wheelhouse/*.whl | wc -l | xargs echo "wheels in docker/wheelhouse:"
