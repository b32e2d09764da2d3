"""Every benchmark runs at a tiny size and prints one valid JSON line with the expected keys.

No timing is asserted (two shared cores make figures noise at this size); this proves the
benchmarks still work against the real components after the code they measure changes.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.nats, pytest.mark.cri]

ROOT = Path(__file__).resolve().parents[2]
# bench/ is run from the repository root (``python -m bench``), not installed, so the test names
# the modules itself rather than importing bench.__main__.BENCHMARKS.
BENCHMARKS = {
    "replay": "bench.replay",
    "live": "bench.live",
    "end-to-end": "bench.end_to_end",
    "fanout": "bench.fanout",
    "memory": "bench.memory",
    "idle": "bench.idle",
    "broadcaster": "bench.broadcast",
    "scale": "bench.scale",
    "seeding": "bench.seeding",
}
KEYS = {"bench", "figure", "unit", "baseline", "ratio", "target", "met"}


def run_quick(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *args, "--quick"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.parametrize("name", sorted(BENCHMARKS))
def test_benchmark_prints_one_json_line(name: str) -> None:
    result = run_quick(BENCHMARKS[name])
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    assert len(lines) == 1, result.stdout
    line = json.loads(lines[0])
    assert set(line) >= KEYS, f"missing {KEYS - set(line)}"
    assert line["bench"] == name
    assert isinstance(line["met"], bool)
    for key in ("figure", "baseline", "ratio"):
        assert isinstance(line[key], int | float), (key, line)
        # An idle node may send nothing at all in scale's few quick seconds: 0 is a figure there.
        assert line[key] > 0 or (name == "scale" and key != "baseline"), (key, line)


def test_runner_refuses_an_unknown_name() -> None:
    result = run_quick("bench", "no-such-bench")
    assert result.returncode == 2
    assert "unknown benchmark no-such-bench" in result.stderr
