"""``python -m bench [--quick] [NAME ...]``: run every benchmark, or the named ones, each alone.

Each runs as ``python -m bench.<module>`` so its memory, threads and event loop start clean; its
JSON line goes to stdout, its diagnostics to stderr. The exit code is non-zero if any benchmark
crashed (a missed target is a figure, not a crash).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from collections.abc import Sequence

# name -> module, in the order they run.
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


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("names", nargs="*", metavar="NAME", help=", ".join(BENCHMARKS))
    parser.add_argument("--quick", action="store_true", help="tiny sizes: proves each runs")
    args = parser.parse_args(argv)
    unknown = [n for n in args.names if n not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark {', '.join(unknown)}; known: {', '.join(BENCHMARKS)}")
    failed = []
    for name in args.names or BENCHMARKS:
        command = [sys.executable, "-m", BENCHMARKS[name], *(["--quick"] if args.quick else [])]
        if subprocess.run(command, check=False).returncode != 0:
            failed.append(name)
    if failed:
        print(f"bench: failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
