"""The Dockerfile's promises, checked without a Docker engine (none runs on CI machines).

The file is parsed into its stages and instructions (line continuations joined, comments
dropped) and the properties the deploy manifests rely on are asserted: the entrypoint is the
project's CLI, the image runs as a non-root user by default, the base image is pinned and the
build context can carry no secret.
"""

from __future__ import annotations

import json
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Stage:
    base: str
    name: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]


def _logical_lines(text: str) -> list[str]:
    lines, current = [], ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue  # a comment inside a continued instruction
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        lines.append(current + stripped)
        current = ""
    return lines


def parse(text: str) -> tuple[dict[str, str], list[Stage]]:
    """Global ARG defaults and the stages, with ${ARG} substituted in FROM lines."""
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in _logical_lines(text):
        keyword, _, rest = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], rest.split()[0])
            name = rest.split()[2] if " as " in rest.lower() else str(len(stages))
            stages.append(Stage(image, name))
        elif not stages and keyword == "ARG":
            key, _, value = rest.partition("=")
            args[key] = value
        elif stages:
            stages[-1].instructions.append((keyword, rest.strip()))
    return args, stages


@pytest.fixture(scope="module")
def stages() -> list[Stage]:
    return parse((ROOT / "Dockerfile").read_text())[1]


def test_multi_stage_on_one_pinned_slim_python(stages: list[Stage]) -> None:
    assert len(stages) >= 2, "a builder stage and a runtime stage"
    names = {s.name for s in stages}
    bases = {s.base for s in stages if s.base not in names}
    assert len(bases) == 1, "the venv is copied across stages: same interpreter in both"
    base = bases.pop()
    match = re.fullmatch(r"python:(\d+)\.(\d+)\.(\d+)-slim(-\w+)?(@sha256:[0-9a-f]{64})?", base)
    assert match, f"base {base!r} must be python:<major.minor.patch>-slim, never a floating tag"
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    minimum = tuple(int(p) for p in re.findall(r"\d+", requires)[:2])
    assert (int(match.group(1)), int(match.group(2))) >= minimum


def test_runtime_stages_build_nothing(stages: list[Stage]) -> None:
    for final in _final_stages(stages):
        for stage in _lineage(stages, final):
            runs = " ".join(stage.all("RUN"))
            for tool in ("apt-get install", "gcc", "build-essential", "pip install", "pip wheel"):
                assert tool not in runs, f"the {stage.name} stage runs {tool!r}"
            copies = stage.all("COPY")
            assert all(c.startswith("--from=") for c in copies), "runtime copies the venv only"
        assert final.all("COPY"), f"{final.name} copies its venv"


def _lineage(stages: list[Stage], stage: Stage) -> list[Stage]:
    """The stage and the stages it is built FROM, nearest first."""
    by_name = {s.name: s for s in stages}
    chain = [stage]
    while chain[-1].base in by_name:
        chain.append(by_name[chain[-1].base])
    return chain


def _effective(stages: list[Stage], stage: Stage, keyword: str) -> list[str]:
    for ancestor in _lineage(stages, stage):
        if found := ancestor.all(keyword):
            return found
    return []


def _final_stages(stages: list[Stage]) -> list[Stage]:
    """The images one can build: the default (last) stage and the `syncer` target."""
    return [s for s in stages if s.name in ("syncer", stages[-1].name)]


def test_entrypoint_is_the_cli_for_both_roles(stages: list[Stage]) -> None:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert "image-syncer" in scripts
    assert [s.name for s in _final_stages(stages)] == ["syncer", "runtime"]
    for stage in _final_stages(stages):
        entrypoints = _effective(stages, stage, "ENTRYPOINT")
        assert len(entrypoints) == 1
        # Exec form, so SIGTERM reaches the process.
        assert json.loads(entrypoints[0]) == ["image-syncer"], stage.name


def test_default_image_carries_both_roles_and_the_syncer_target_only_one(
    stages: list[Stage],
) -> None:
    def lock_of(final: Stage) -> str:
        (source,) = [c for c in final.all("COPY") if "/opt/venv" in c]
        builder = next(s for s in stages if s.name == source.split()[0].removeprefix("--from="))
        (lock,) = [c.split()[0] for c in builder.all("COPY") if c.startswith("locks/")]
        return (ROOT / lock).read_text()

    assert re.search(r"^kubernetes==", lock_of(stages[-1]), re.M), "the broadcaster role"
    syncer = next(s for s in stages if s.name == "syncer")
    assert not re.search(r"^(kubernetes|aiohttp)==", lock_of(syncer), re.M)


def test_every_dependency_is_installed_by_hash(stages: list[Stage]) -> None:
    for stage in stages:
        for run in stage.all("RUN"):
            for command in re.split(r"&&|;", run):
                words = command.split()
                if "pip" not in " ".join(words[:1]) or "install" not in words:
                    continue
                if "uninstall" in words:
                    continue
                hashed = "--require-hashes" in words and "-r" in words
                own_wheel = "--no-deps" in words and any(w.startswith("/wheels/") for w in words)
                assert hashed or own_wheel, f"{stage.name}: {command.strip()!r}"
            if "pip wheel" in run:
                # No build isolation: the backend comes from the hash-pinned build lock.
                assert "--no-build-isolation" in run and "--no-deps" in run


def test_runs_as_a_numeric_non_root_user(stages: list[Stage]) -> None:
    for final in _final_stages(stages):
        users = _effective(stages, final, "USER")
        assert users, f"USER must be set for the {final.name} image"
        user = users[-1].split(":")[0]
        # Numeric, so the kubelet can check runAsNonRoot without reading /etc/passwd.
        assert user.isdigit() and int(user) != 0


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    # Docker's syntax: "**/" is any number of directories (zero included), "*" stays in one.
    out = ""
    for token in re.split(r"(\*\*/|\*\*|\*|\?)", pattern.strip("/")):
        out += {"**/": "(.*/)?", "**": ".*", "*": "[^/]*", "?": "[^/]"}.get(token, re.escape(token))
    return re.compile(out)


def _ignored(patterns: list[str], path: str) -> bool:
    """Docker's rule: the last matching pattern wins, ``!`` re-includes, a directory's
    pattern covers everything under it."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for pattern in patterns:
        regex = _pattern_regex(pattern.removeprefix("!"))
        if any(regex.fullmatch(p) for p in prefixes):
            ignored = not pattern.startswith("!")
    return ignored


def test_dockerignore_keeps_secrets_and_history_out_of_the_context() -> None:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    patterns = [p.strip() for p in lines if p.strip() and not p.startswith("#")]
    for path in (
        ".git/config",
        ".env",
        "wire/.env",
        "deploy/nats/base/auth.conf",
        ".venv/bin/python",
        "tests/conftest.py",
        "image_syncer/nats.creds",
        "syncer/tls.key",
        "wire/__pycache__/contract.cpython-311.pyc",
    ):
        assert _ignored(patterns, path), f"{path} would reach the build context"
    for path in (
        "pyproject.toml",
        "README.md",
        "locks/image.txt",
        "wire/contract.py",
        "syncer/cri_api/api_pb2.py",
    ):
        assert not _ignored(patterns, path), f"{path} is needed by the build"


def test_copies_only_sources(stages: list[Stage]) -> None:
    sources = []
    for stage in stages:
        for copy in stage.all("COPY") + stage.all("ADD"):
            words = [w for w in copy.split() if not w.startswith("--")]
            sources += words[:-1]
    for source in sources:
        assert not re.search(r"(^|/)(\.git|\.env|.*\.creds|.*\.key|secrets?)(/|$)", source)
        assert source not in (".", "./"), "COPY . would defeat the allow-list"
        assert "://" not in source, "no remote ADD: every input is pinned by the build context"
