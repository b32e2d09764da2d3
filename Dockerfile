# syntax=docker/dockerfile:1
# One image for both roles: `image-syncer broadcaster` and `image-syncer syncer` (the manifests in
# deploy/syncer pick the role through the container's args). Build: `just image`.

# Pinned to a patch release; bump deliberately (and the runtime stage with it).
ARG PYTHON_IMAGE=python:3.11.13-slim-bookworm

# --- builder: resolves and installs the package and its dependencies into a venv ------------
FROM ${PYTHON_IMAGE} AS builder
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
RUN python -m venv /opt/venv
# Sources only: .dockerignore keeps out .git, tests, the local venv and anything secret.
COPY pyproject.toml README.md ./
COPY wire ./wire
COPY ops ./ops
COPY broadcaster ./broadcaster
COPY syncer ./syncer
COPY image_syncer ./image_syncer
# The broadcaster extra brings the Kubernetes client; the syncer simply never imports it.
RUN /opt/venv/bin/pip wheel --no-deps --wheel-dir /wheels . \
 && /opt/venv/bin/pip install "$(ls /wheels/image_syncer-*.whl)[broadcaster]" \
 && /opt/venv/bin/pip uninstall --yes pip setuptools wheel

# --- runtime: the interpreter and the venv, nothing to build or fetch with ------------------
FROM ${PYTHON_IMAGE} AS runtime
LABEL org.opencontainers.image.title="image-syncer" \
      org.opencontainers.image.description="Pre-pulls the images of Agones Fleets onto every node" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 image-syncer \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin image-syncer
COPY --from=builder /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
# Non-root by default. Only the syncer's manifest runs it as uid 0, to open the runtime's
# root-owned CRI socket (with every capability dropped); see README, "Security notes".
USER 10001:10001
EXPOSE 8080
ENTRYPOINT ["image-syncer"]
CMD ["--help"]
