"""A short chaos soak with a fixed seed: faults at random over real partitions, then exact convergence.

The long soak is ``./dev chaos --minutes 10``; this keeps the machinery (network namespaces,
the fault schedule, the invariant) and the system's convergence under mixed faults honest in
every run of the suite. It runs the real command, as root; it fails, never skips, when the
network cannot be built (``./dev`` installs iproute2 and iptables).
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from chaos.faults import schedule

pytestmark = [pytest.mark.nats, pytest.mark.cri]

ROOT = Path(__file__).resolve().parents[2]


def test_a_seed_gives_the_same_schedule_and_another_seed_another() -> None:
    nodes = ["node-0", "node-1", "node-2"]
    first, again = schedule(42, 600, nodes), schedule(42, 600, nodes)
    assert first == again and len(first) > 50
    assert schedule(43, 600, nodes) != first
    kinds = {fault.kind for fault in first}
    assert {"node_partition", "nats_partition", "slow_link", "nats_kill"} <= kinds
    # Never two NATS servers down or cut off at once: the soak is not about losing a quorum.
    nats = [f for f in first if f.kind in ("nats_kill", "nats_partition")]
    for one, two in itertools.pairwise(nats):
        assert two.at >= one.at + one.duration
    assert all(f.at + f.duration <= 600 for f in first)


@pytest.mark.timeout(1800)
def test_short_soak_converges_exactly() -> None:
    assert os.geteuid() == 0, "the chaos soak needs root (network namespaces): run as root"
    command = [sys.executable, "-m", "chaos", "--minutes", "1.5", "--seed", "7"]
    # No --dir: a passing soak removes its directory, a failing one keeps it and says where
    # (pytest's own temporary directories are rotated away by later runs).
    command += ["--settle", "300"]
    soak = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        stdout, stderr = soak.communicate(timeout=1700)
    finally:
        # SIGTERM: the soak stops its processes and removes its namespaces before exiting.
        if soak.poll() is None:
            soak.terminate()
            soak.communicate(timeout=120)
    report = f"stdout:\n{stdout.decode()}\nstderr:\n{stderr.decode()}"
    assert soak.returncode == 0, report
    figures = json.loads(stdout.decode().strip().splitlines()[-1])
    assert figures["violations"] == 0, report
    assert figures["faults_total"] == figures["faults_scheduled"] > 0, report
    assert figures["fleet_events"] > 0, report
    assert figures["converge_after_last_fault_s"]["converged_nodes"] == 3, report
