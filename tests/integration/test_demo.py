"""The README's first command: the demo runs the whole loop and cleans up after itself."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path


def test_demo_runs_the_whole_loop_and_leaves_nothing_behind(tmp_path: Path) -> None:
    # Its own TMPDIR: another demo running on the machine meanwhile has its directory in /tmp.
    result = subprocess.run(
        [sys.executable, "-m", "image_syncer", "demo", "--nodes", "1", "--sync-period", "1s"],
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ, "COLUMNS": "200", "TMPDIR": str(tmp_path)},
        check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    assert "node-a: all 4 images present" in out
    assert "back after" in out  # the image deleted with ctr came back
    assert 'msg="fleet synced"' in out
    # The staged rollout: the next version is on the node before the Fleet moves, and the time
    # from the Fleet change to all images present is measured next to the unstaged one's.
    assert "arena-server:1.2 staged" in out and "the Fleet still runs" in out
    assert "default/arena: next images present on 1 live nodes" in out
    times = re.search(
        r"all images present on every node: staged ([\d.]+)s, unstaged ([\d.]+)s", out
    )
    assert times is not None, out
    assert 'msg="fleet deleted" fleet=games/lobby' in out
    # A cold node joins tainted and is untainted with every image present (demo's fake Node).
    assert "node-b: untainted" in out and "with all 6 images present" in out
    assert 'msg="startup taint removed, node open for game servers"' in out
    assert "node-a: exited 0" in out and "node-b: exited 0" in out
    assert "Demo complete." in out
    assert list(tmp_path.glob("image-syncer-demo-*")) == []
    assert demo_processes(tmp_path) == []


def demo_processes(directory: Path) -> list[str]:
    """Processes whose command line or environment names ``directory`` (the demo's TMPDIR): its
    servers, which are configured in it, and its syncers, which inherit it."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or proc.name == str(os.getpid()):
            continue
        try:
            cmdline = proc.joinpath("cmdline").read_bytes().replace(b"\0", b" ").decode()
            environ = proc.joinpath("environ").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if str(directory) in cmdline or f"TMPDIR={directory}\0" in environ:
            found.append(f"{proc.name}: {cmdline}")
    return found


def test_sigterm_stops_the_demo_and_everything_it_started(tmp_path: Path) -> None:
    # The demo's directory goes under tmp_path, so its processes can be told from others'.
    env = {**os.environ, "COLUMNS": "200", "TMPDIR": str(tmp_path)}
    process = subprocess.Popen(
        [sys.executable, "-m", "image_syncer", "demo", "--nodes", "1", "--sync-period", "1s"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    assert process.stdout is not None
    seen = []
    for line in process.stdout:
        seen.append(line)
        if "all 4 images present" in line:  # NATS, registry, containerd and a syncer all run
            break
    assert demo_processes(tmp_path), "".join(seen)
    process.send_signal(signal.SIGTERM)
    rest, _ = process.communicate(timeout=120)
    assert process.returncode != 0, "".join(seen) + rest
    assert demo_processes(tmp_path) == []
    assert list(tmp_path.glob("image-syncer-demo-*")) == []


def test_a_syncer_that_exits_stops_the_demo_with_its_last_log_lines(tmp_path: Path) -> None:
    # Every syncer of the demo inherits this, and refuses to start.
    env = {**os.environ, "COLUMNS": "200", "TMPDIR": str(tmp_path), "MAX_PARALLEL_PULLS": "0"}
    result = subprocess.run(
        [sys.executable, "-m", "image_syncer", "demo", "--nodes", "1", "--sync-period", "1s"],
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
        check=False,
    )
    assert result.returncode == 1, result.stdout[-3000:]
    assert "demo failed: the syncer of node-a exited with code 2" in result.stderr
    assert "'0' is not a whole number from 1 to 64" in result.stderr  # its own last words
    assert "timed out" not in result.stderr
    assert demo_processes(tmp_path) == []


def test_the_demo_refuses_a_malformed_duration_at_once() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "image_syncer", "demo", "--sync-period", "5x"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert "--sync-period" in result.stderr and "invalid duration '5x'" in result.stderr
