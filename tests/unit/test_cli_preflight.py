"""Flags the processes refuse before they start anything: one ``error:`` line, exit code 2.

Run as an operator runs them, as subprocesses, with a NATS URL nothing listens on: a process
that got past its checks would retry the connection instead of exiting, so an exit proves the
check came first.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from image_syncer.sandbox.processes import free_port


def run(*args: str, prelude: str = "") -> subprocess.CompletedProcess[str]:
    code = f"{prelude}import sys; from image_syncer.cli import main; sys.argv[0] = 'image-syncer'; main()"
    env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1"}
    nats = f"nats://127.0.0.1:{free_port()}"
    return subprocess.run(
        [sys.executable, "-c", code, *args, "--nats-url", nats],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )


def one_error(result: subprocess.CompletedProcess[str], code: int, *parts: str) -> None:
    assert result.returncode == code, result.stderr
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    for part in parts:
        assert part in result.stderr, result.stderr


@pytest.mark.parametrize("command", ["syncer", "broadcaster"])
def test_a_bad_or_taken_metrics_address_is_refused_at_once(command: str) -> None:
    one_error(run(command, "--metrics-addr", "localhost"), 2, "--metrics-addr", "[host]:port")
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        one_error(
            run(command, "--metrics-addr", f":{port}"),
            2,
            "--metrics-addr",
            f"cannot listen on :{port}: Address already in use",
        )


def test_unreadable_files_are_refused_at_once(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.json")
    for flag in (
        "--registry-auth-file",
        "--kubelet-config-json",
        "--nats-creds",
        "--nats-token-file",
    ):
        one_error(
            run("syncer", "--metrics-addr", "", flag, missing),
            2,
            flag,
            f"cannot read {missing}: No such file or directory",
        )
    one_error(
        run("broadcaster", "--metrics-addr", "", "--kubeconfig", str(tmp_path)),
        2,
        "--kubeconfig",
        f"cannot read {tmp_path}: Is a directory",
    )


def test_the_auth_callout_refuses_an_unreadable_seed_and_a_missing_extra(tmp_path: Path) -> None:
    missing = str(tmp_path / "issuer.seed")
    one_error(
        run("auth", "--metrics-addr", "", "--issuer-seed-file", missing),
        2,
        "--issuer-seed-file",
        f"cannot read {missing}: No such file or directory",
    )
    seed = tmp_path / "seed"
    seed.write_text("SA")
    result = run(
        "auth",
        "--metrics-addr",
        "",
        "--issuer-seed-file",
        str(seed),
        prelude="import sys; sys.modules['nkeys'] = None; ",
    )
    one_error(result, 1, "pip install 'image-syncer[auth]'", "no module 'nkeys'")


def test_the_broadcaster_without_its_extra_says_which_to_install() -> None:
    # A syncer-only install: the Kubernetes client cannot be imported.
    result = run(
        "broadcaster",
        "--metrics-addr",
        "",
        prelude="import sys; sys.modules['kubernetes'] = None; ",
    )
    one_error(result, 1, "pip install 'image-syncer[broadcaster]'", "no module 'kubernetes'")


def test_the_syncer_command_loads_only_what_it_runs() -> None:
    # One syncer per node: the status tables, the publisher, the broadcaster are not its weight.
    result = run(
        "syncer",
        "--help",
        prelude="import atexit, sys; atexit.register(lambda: print(*sorted(sys.modules)))\n",
    )
    assert result.returncode == 0, result.stderr
    loaded = set(result.stdout.split())
    assert "image_syncer.commands.syncer" in loaded
    for heavy in ("image_syncer.commands.status", "broadcaster", "kubernetes", "aiohttp.web"):
        assert heavy not in loaded
