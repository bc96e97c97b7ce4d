#!/bin/sh
# pip install into the virtualenv VENV (first argument), used only by the Dockerfile's build stages.
#
# Why a script: every build stage must make the same choice. If /wheelhouse holds wheels (made on
# the host by docker/make-wheelhouse.sh) pip never touches the network; otherwise it uses PyPI plus
# TORCH_INDEX_URL, because PyPI's torch is a multi-GB CUDA build and the worker never needs CUDA.
set -eu
venv=$1
shift
if ls /wheelhouse/*.whl >/dev/null 2>&1; then
  set -- --no-index --find-links /wheelhouse "$@"
elif [ -n "${TORCH_INDEX_URL:-}" ]; then
  set -- --extra-index-url "$TORCH_INDEX_URL" "$@"
fi
exec "$venv/bin/python" -m pip install --no-cache-dir --disable-pip-version-check "$@"
