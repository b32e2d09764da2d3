# syntax=docker/dockerfile:1
# One image for every role: `image-syncer broadcaster`, `syncer` and `auth` (the manifests in
# deploy/syncer pick the role through the container's args). Build: `just image`.
# `--target syncer` builds a smaller image without the Kubernetes client, for the DaemonSet only.
#
# Every Python dependency is pinned with its hashes in locks/ (`just lock` regenerates them from
# pyproject.toml) and installed with --require-hashes: a build resolves nothing and trusts no
# index for what it downloads.

# Pinned to a patch release; bump deliberately (and the runtime stages with it).
ARG PYTHON_IMAGE=python:3.11.13-slim-bookworm

# --- wheel: the project's own wheel, built offline with a hash-pinned backend ---------------
FROM ${PYTHON_IMAGE} AS wheel
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
COPY locks/build.txt ./locks/
RUN python -m venv /opt/build \
 && /opt/build/bin/pip install --require-hashes --no-deps -r locks/build.txt
# Sources only: .dockerignore keeps out .git, tests, the local venv and anything secret.
COPY pyproject.toml README.md ./
COPY wire ./wire
COPY ops ./ops
COPY kubeclient ./kubeclient
COPY broadcaster ./broadcaster
COPY syncer ./syncer
COPY authcallout ./authcallout
COPY image_syncer ./image_syncer
RUN /opt/build/bin/pip wheel --no-deps --no-build-isolation --wheel-dir /wheels .

# --- builder: every role; the broadcaster and auth extras bring the Kubernetes client, nkeys -
FROM ${PYTHON_IMAGE} AS builder
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
COPY locks/image.txt /tmp/lock.txt
COPY --from=wheel /wheels /wheels
RUN python -m venv /opt/venv \
 && /opt/venv/bin/pip install --require-hashes --no-deps -r /tmp/lock.txt \
 && /opt/venv/bin/pip install --no-deps /wheels/image_syncer-*.whl \
 && /opt/venv/bin/pip check \
 && /opt/venv/bin/pip uninstall --yes pip setuptools wheel

# --- builder-syncer: the syncer role only (no Kubernetes client, no aiohttp) ---------------
FROM ${PYTHON_IMAGE} AS builder-syncer
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
COPY locks/syncer.txt /tmp/lock.txt
COPY --from=wheel /wheels /wheels
RUN python -m venv /opt/venv \
 && /opt/venv/bin/pip install --require-hashes --no-deps -r /tmp/lock.txt \
 && /opt/venv/bin/pip install --no-deps /wheels/image_syncer-*.whl \
 && /opt/venv/bin/pip check \
 && /opt/venv/bin/pip uninstall --yes pip setuptools wheel

# --- runtime-base: what both images share; they add only their venv ------------------------
FROM ${PYTHON_IMAGE} AS runtime-base
LABEL org.opencontainers.image.title="image-syncer" \
      org.opencontainers.image.description="Pre-pulls the images of Agones Fleets onto every node" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 image-syncer \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin image-syncer
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
# Non-root by default. Only the syncer's manifest runs it as uid 0, to open the runtime's
# root-owned CRI socket (with every capability dropped); see docs/security.md.
USER 10001:10001
EXPOSE 8080
ENTRYPOINT ["image-syncer"]
CMD ["--help"]

# --- syncer: `docker build --target syncer`, for the DaemonSet --------------------------------
FROM runtime-base AS syncer
COPY --from=builder-syncer /opt/venv /opt/venv

# --- runtime (default target): both roles ---------------------------------------------------
FROM runtime-base AS runtime
COPY --from=builder /opt/venv /opt/venv
