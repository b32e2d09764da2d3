# Recipes assume the virtualenv made by ./dev (which then calls these); `just --list` shows them.
set shell := ["bash", "-euo", "pipefail", "-c"]

python := justfile_directory() / ".venv/bin/python"
uv := justfile_directory() / ".venv/bin/uv"
# The image's interpreter (Dockerfile); universal, so one lock serves amd64 and arm64 builds.
lock_flags := "--universal --python-version 3.11 --generate-hashes --quiet"

# The whole loop on this machine: embedded NATS, a local containerd and registry, the syncer.
demo *ARGS:
    {{python}} -m image_syncer demo {{ARGS}}

# The test suite, against real NATS, containerd and registry processes.
test *ARGS:
    {{python}} -m pytest -q {{ARGS}}

# Lint, format check, the import layering contract and the type checker (config: pyproject.toml).
lint:
    {{python}} -m ruff check .
    {{python}} -m ruff format --check .
    .venv/bin/lint-imports
    {{python}} -m mypy

# Regenerate the CRI and containerd stubs from proto/ (a test fails when they are stale).
proto:
    {{python}} -m syncer.cri_api.generate
    {{python}} -m syncer.containerd_api.generate

# Re-pin the image's dependencies with their hashes (locks/) after changing pyproject.toml.
lock:
    {{uv}} pip compile pyproject.toml --extra broadcaster --extra auth {{lock_flags}} -o locks/image.txt
    {{uv}} pip compile pyproject.toml {{lock_flags}} -o locks/syncer.txt
    {{uv}} pip compile locks/build.in {{lock_flags}} -o locks/build.txt

# Mutation testing of the pure modules, per module (mutmut; [tool.mutmut] in pyproject.toml).
# `./dev mutate syncer/folding/desired.py` for one; `./dev mutate --report --survivors` for the last results.
mutate *ARGS:
    {{python}} tests/mutation.py {{ARGS}}

# Chaos soak (root): faults at random over real network partitions, then exact convergence;
# prints one JSON line of figures. `./dev chaos --minutes 10`, `./dev chaos --seed S` replays.
chaos *ARGS:
    {{python}} -m chaos {{ARGS}}

# Benchmarks: each prints one JSON line with its figure and ratio to a raw baseline.
bench *ARGS:
    {{python}} -m bench {{ARGS}}

# The container image (needs a Docker engine, which CI machines do not have).
image TAG="image-syncer:dev":
    docker build -t {{TAG}} .
