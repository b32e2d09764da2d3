"""The README's first command: the demo runs the whole loop and cleans up after itself."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path


def test_demo_runs_the_whole_loop_and_leaves_nothing_behind() -> None:
    before = set(Path(tempfile.gettempdir()).glob("image-syncer-demo-*"))
    result = subprocess.run(
        [sys.executable, "-m", "image_syncer", "demo", "--nodes", "1", "--sync-period", "1s"],
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ, "COLUMNS": "200"},
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
    assert set(Path(tempfile.gettempdir()).glob("image-syncer-demo-*")) == before
