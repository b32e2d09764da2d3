# Recipes assume the virtualenv made by ./dev (which then calls these); `just --list` shows them.
set shell := ["bash", "-euo", "pipefail", "-c"]

python := justfile_directory() / ".venv/bin/python"

# The whole loop on this machine: embedded NATS, a local containerd and registry, the syncer.
demo *ARGS:
    {{python}} -m image_syncer demo {{ARGS}}

# The test suite, against real NATS, containerd and registry processes.
test *ARGS:
    {{python}} -m pytest -q {{ARGS}}

# Lint, format check and the import layering contract.
lint:
    {{python}} -m ruff check .
    {{python}} -m ruff format --check .
    .venv/bin/lint-imports

# Regenerate the CRI and containerd stubs from proto/ (a test fails when they are stale).
proto:
    {{python}} -m syncer.cri_api.generate
    {{python}} -m syncer.containerd_api.generate

# Benchmarks: each prints one JSON line with its figure and ratio to a raw baseline.
bench *ARGS:
    {{python}} -m bench {{ARGS}}

# The container image (needs a Docker engine, which CI machines do not have).
image TAG="image-syncer:dev":
    docker build -t {{TAG}} .
