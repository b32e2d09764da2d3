"""The real ``image-syncer broadcaster`` process: flags and env twins, probes, SIGTERM exits 0."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from nats.js import JetStreamContext
from support.fakekube import FakeKube
from support.fakekube.harness import fleet, wait_converged

from image_syncer.sandbox.nats_server import NatsServer
from image_syncer.sandbox.processes import free_port, stop_process, wait_until

pytestmark = pytest.mark.nats


def _ready(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=1) as response:
        result: bool = response.status == 200
        return result


async def test_sigterm_drains_and_exits_zero(
    kube: FakeKube, nats_server: NatsServer, js: JetStreamContext, prefix: str, tmp_path: Path
) -> None:
    port = free_port()
    log_file = tmp_path / "broadcaster.log"
    env = {
        **os.environ,
        "KUBECONFIG": str(kube.kubeconfig),
        "NATS_URL": nats_server.url,
        "SUBJECT_PREFIX": prefix,
        "NAMESPACES": "default,games",
        "METRICS_ADDR": f"127.0.0.1:{port}",
    }
    kube.create("fleets", fleet("cli", namespace="games"))
    kube.create("fleets", fleet("ignored", namespace="elsewhere"))
    process = _start(["broadcaster"], env, log_file)
    try:
        await asyncio.to_thread(
            wait_until,
            lambda: _ready(f"http://127.0.0.1:{port}/readyz"),
            timeout=30,
            what="broadcaster /readyz",
            process=process,
            log_file=log_file,
        )
        await wait_converged(js, prefix, _in(kube, "games"))
        kube.create("fleets", fleet("late", namespace="default"))
        await wait_converged(js, prefix, _in(kube, "games", "default"))
        process.send_signal(signal.SIGTERM)
        await asyncio.to_thread(process.wait, 30)
        assert process.returncode == 0, log_file.read_text()
    finally:
        stop_process(process, kill=True)
    assert "broadcaster stopped" in log_file.read_text()


def _start(args: list[str], env: dict[str, str], log_file: Path) -> subprocess.Popen[bytes]:
    with log_file.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "image_syncer", *args],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _in(kube: FakeKube, *namespaces: str) -> list[dict[str, Any]]:
    return [o for o in kube.objects() if o["metadata"]["namespace"] in namespaces]


def test_bad_kubeconfig_is_one_clear_line(tmp_path: Path) -> None:
    def broadcaster(kubeconfig: Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "image_syncer", "broadcaster"],
            env={**os.environ, "KUBECONFIG": str(kubeconfig), "METRICS_ADDR": "127.0.0.1:0"},
            capture_output=True,
            text=True,
            timeout=60,
        )

    # Missing: refused with the other flags, before anything starts.
    result = broadcaster(tmp_path / "missing")
    assert result.returncode == 2
    assert result.stderr.startswith("error: Invalid value for --kubeconfig: cannot read ")
    # Readable but not a kubeconfig: refused when the client loads it.
    malformed = tmp_path / "malformed"
    malformed.write_text("clusters: 7\n")
    result = broadcaster(malformed)
    assert result.returncode == 1
    assert "error: cannot load kubeconfig" in result.stderr
    assert "Traceback" not in result.stderr


# A port of its own: the default :8080 may be taken on a shared machine, and the flag checked
# first would then be --metrics-addr, not the one under test.
_NO_METRICS = ("--metrics-addr", "127.0.0.1:0")


def test_unknown_kind_is_refused(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "image_syncer", "broadcaster", "--kinds", "fleet,pod", *_NO_METRICS],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "kinds are fleet, gameserver" in result.stderr


def test_bad_label_selector_is_refused_at_start_with_its_position() -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "image_syncer",
            "broadcaster",
            "--label-selector",
            "team in (red",
            *_NO_METRICS,
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("error: ") and "--label-selector" in line and "character 13" in line
