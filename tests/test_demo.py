"""The README's first command: the demo runs the whole loop and cleans up after itself."""

from __future__ import annotations

import os
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
    assert 'msg="fleet deleted" fleet=games/lobby' in out
    # A cold node joins tainted and is untainted with every image present (demo's fake Node).
    assert "node-b: untainted" in out and "with all 6 images present" in out
    assert 'msg="startup taint removed, node open for game servers"' in out
    assert "node-a: exited 0" in out and "node-b: exited 0" in out
    assert "Demo complete." in out
    assert set(Path(tempfile.gettempdir()).glob("image-syncer-demo-*")) == before
