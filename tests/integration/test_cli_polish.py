"""The CLI as a newcomer meets it: --version, help that fits 80 columns, refusals that teach.

Every command runs as the real ``image-syncer`` subprocess. None of the refusals here reaches a
network: a malformed NATS URL, an out-of-range count or duration, an invalid node name are
refused from the flags alone (exit 2, one line naming the flag and the rule).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from wire.nodestatus import SCHEMA

COMMANDS = [
    [],
    ["syncer"],
    ["broadcaster"],
    ["status"],
    ["wait"],
    ["rollout"],
    ["publish"],
    ["events"],
    ["replay"],
    ["demo"],
    ["stream"],
    ["stream", "init"],
    ["stream", "info"],
    ["auth"],
    ["auth-keygen"],
    ["crio-pinned-config"],
]


def run(*args: str, columns: int = 80) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": str(columns), "NO_COLOR": "1", "TERM": "dumb"}
    env.pop("NATS_URL", None)
    return subprocess.run(
        [sys.executable, "-m", "image_syncer", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )


def test_version_names_the_status_schema_it_reads() -> None:
    result = run("--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("image-syncer ")
    assert result.stdout.strip().endswith(f"(node status schema {SCHEMA})")


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "root")
def test_help_fits_80_columns_and_shows_no_python_types(command: list[str]) -> None:
    result = run(*command, "--help")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert [line for line in lines if len(line) > 80] == []
    assert "…" not in result.stdout
    for python_type in ("<int", "<str", "<list", "<bool", "<float", "INTEGER", "TEXT"):
        assert python_type not in result.stdout, python_type


def test_syncer_help_groups_its_flags_in_panels() -> None:
    out = run("syncer", "--help").stdout
    titles = [line[:-1] for line in out.splitlines() if line.endswith(":") and line[0] != " "]
    assert titles[:2] == ["Node and runtime", "Pulls"]
    assert {"Which Fleets", "Keeping images", "Event log", "Node status", "NATS"} <= set(titles)
    # Every name and env var whole, even the longest.
    assert "--consumer-inactive-threshold DURATION" in out
    assert "CONSUMER_INACTIVE_THRESHOLD" in " ".join(out.split())
    assert "--max-parallel-pulls N" in out
    # A new flag lands in a panel too: the catch-all section holds --help alone.
    catch_all = out.split("\nOptions:\n", 1)[1].split("\n\n", 1)[0]
    assert [line.split()[0] for line in catch_all.splitlines() if line.startswith("  -")] == [
        "--help"
    ]


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("nats://not a url", "a URL holds no space"),
        ("htp://nats.example:4222", "is not a NATS URL: expected SCHEME://HOST[:PORT]"),
        ("nats://nats.example:99999", "the port must be a number from 1 to 65535"),
        ("nats://:4222", "has no valid host"),
        ("nats://nats.example:4222/path", "no path, query or fragment"),
    ],
)
def test_a_malformed_nats_url_is_refused_before_connecting(url: str, problem: str) -> None:
    result = run("status", "--nats-url", url)
    assert result.returncode == 2, result.stderr
    assert "--nats-url" in result.stderr and problem in result.stderr, result.stderr
    assert len(result.stderr.splitlines()) == 1


def test_a_password_in_a_bad_url_is_not_echoed() -> None:
    result = run("status", "--nats-url", "nats://user:s3cret@nats.example:port")
    assert result.returncode == 2 and "s3cret" not in result.stderr, result.stderr


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--sync-period", "0s"], "--sync-period must be positive"),
        (["--pull-backoff-min", "10m"], "--pull-backoff-min must be positive and at most --pull"),
        (["--sync-period", "9000h"], "is longer than a year"),
        (["--max-parallel-pulls", "1000"], "'1000' is not a whole number from 1 to 64"),
        (["--max-ack-pending", "x"], "'x' is not a whole number from 1 to 10000"),
        (["--node-name", "Node_1"], "starting and ending with a letter or digit"),
        (["--subject-prefix", "a b"], "must be dot-separated"),
        (["--fetch-heartbeat", "20s"], "--fetch-heartbeat must be positive and below half"),
    ],
)
def test_syncer_refusals_name_the_flag_and_the_rule(args: list[str], says: str) -> None:
    result = run("syncer", "--metrics-addr", "", *args)
    assert result.returncode == 2, result.stderr
    assert says in " ".join(result.stderr.split()), result.stderr
    # Flags, never the settings' field names, nor the validator's own prefix.
    assert "Value error" not in result.stderr
    assert not any(field in result.stderr for field in ("sync_period", "backoff_min", "fetch_"))
