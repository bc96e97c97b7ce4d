# Flower for the deposium worker fleet (docker compose service `flower`, Railway service "flower").
#
# Why its own image: the worker image carries only the worker's runtime; Flower (tornado & co.)
# has no business there. This one has the same torch-free dependencies (Flower imports our Celery
# app to read its configuration) plus the `monitor` extra, and no model artifact.
# Build from the repository root:  docker build -f docker/flower.Dockerfile -t deposium-flower .
ARG BASE_IMAGE=python:3.11-slim

FROM ${BASE_IMAGE} AS build
ENV PYTHONDONTWRITEBYTECODE=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
COPY docker/pip-install.sh docker/requirements.py /usr/local/lib/deposium-build/
COPY docker/wheelhouse/ /wheelhouse/
COPY pyproject.toml README.md /src/
RUN python3 -m venv /opt/venv \
 && python3 /usr/local/lib/deposium-build/requirements.py /src/pyproject.toml monitor > /tmp/requirements.txt \
 && TORCH_INDEX_URL= sh /usr/local/lib/deposium-build/pip-install.sh /opt/venv -r /tmp/requirements.txt
COPY deposium/ /src/deposium/
COPY worker/ /src/worker/
COPY producer/ /src/producer/
COPY convert/ /src/convert/
COPY bench/ /src/bench/
# No compiler in this stage, and no setup.py copied: Flower never loads the fused kernels.
RUN TORCH_INDEX_URL= sh /usr/local/lib/deposium-build/pip-install.sh /opt/venv --no-deps /src \
 && rm -rf /opt/venv/lib/python3.11/site-packages/deposium/convert /opt/venv/lib/python3.11/site-packages/deposium/bench \
    /opt/venv/bin/deposium-convert /opt/venv/bin/deposium-bench \
 && /opt/venv/bin/python -m pip uninstall -y -q pip setuptools wheel

FROM ${BASE_IMAGE}
RUN groupadd --system --gid 10001 deposium \
 && useradd --system --uid 10001 --gid 10001 --create-home --home-dir /home/deposium deposium
COPY --from=build /opt/venv /opt/venv
COPY docker/flower-entrypoint.sh /usr/local/bin/deposium-flower
ENV PATH=/opt/venv/bin:${PATH} PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
USER deposium
WORKDIR /home/deposium
EXPOSE 5555
# /healthcheck is one of the two paths Flower serves without credentials.
HEALTHCHECK --interval=30s --timeout=10s --start-period=30s --retries=3 \
  CMD python3 -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthcheck' % os.environ.get('PORT', '5555'), timeout=5)" || exit 1
ENTRYPOINT ["deposium-flower"]
