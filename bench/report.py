"""What every benchmark shares: its command line, medians and percentiles, its one JSON line.

Two noisy shared cores make any single timing meaningless, so each figure is the median of
several alternating runs of the measured path and its raw baseline, and the line carries both.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
from collections.abc import Sequence
from typing import Any

from ops.logs import configure

__all__ = ["Clock", "arguments", "emit", "median", "percentile", "production_logging"]


def arguments(description: str, argv: Sequence[str] | None, **defaults: int) -> argparse.Namespace:
    """``--quick`` (a tiny size, for smoke tests), ``--repeat`` and one ``--<size>`` per default."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="tiny sizes: proves it runs")
    parser.add_argument("--repeat", type=int, default=None, help="alternating runs per figure")
    for name, value in defaults.items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=None, help=f"{value}")
    args = parser.parse_args(argv)
    args.defaults = defaults
    return args


def size(args: argparse.Namespace, name: str, quick: int) -> int:
    """The ``--<name>`` given, else the quick or the default size."""
    given: int | None = getattr(args, name)
    if given is not None:
        return given
    default: int = args.defaults[name]
    return quick if args.quick else default


def repeats(args: argparse.Namespace, default: int = 5) -> int:
    given: int | None = args.repeat
    if given is not None:
        return max(1, given)
    return 1 if args.quick else default


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100): a value that was really observed."""
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def emit(
    bench: str,
    *,
    figure: float,
    unit: str,
    baseline: float,
    ratio: float,
    target: str,
    met: bool,
    **params: Any,
) -> dict[str, Any]:
    """Print the benchmark's one JSON line on stdout and return it."""
    line = {
        "bench": bench,
        "figure": round(figure, 3),
        "unit": unit,
        "baseline": round(baseline, 3),
        "ratio": round(ratio, 3),
        "target": target,
        "met": bool(met),
        **{k: round(v, 3) if isinstance(v, float) else v for k, v in params.items()},
    }
    print(json.dumps(line), flush=True)
    return line


def production_logging() -> None:
    """Log as the CLI does (logfmt, info) but into /dev/null: the cost is real, the noise is not.

    A syncer writes ``image already present`` per event in production; measuring with logging
    off would flatter it.
    """
    configure("info", "logfmt", stream=open(os.devnull, "w"))  # noqa: SIM115 - lives as long as us


class Clock:
    """``with Clock() as c: ...`` then ``c.seconds``."""

    def __enter__(self) -> Clock:
        self.started = time.perf_counter()
        self.seconds = 0.0
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.started
