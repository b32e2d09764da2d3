"""`./dev mutate [MODULE.py ...]`: mutation testing of the pure modules, one module at a time.

mutmut (configured in pyproject.toml's [tool.mutmut]) changes one thing at a time in a module (an
operator, a constant, a condition) and runs the fast unit tests that cover it; a change no test
notices "survives" and points at state no test checks. Running per module keeps each run to a
minute or two on a shared machine and gives the per-module figure docs/development.md records.

Score: killed (a test failed, or the mutant hung and hit mutmut's timeout) over all mutants;
survivors and mutants no test reaches count against it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tomllib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MUTANTS = ROOT / "mutants"
# mutmut's exit codes (mutmut.stats.status_by_exit_code): 1 and 3 a test failed, 24/36/152/255
# and -24 a timeout; 0 the tests passed with the change in place; 5 and 33 no test ran it.
_KILLED = {1, 3, 24, 36, 152, 255, -24}
_SURVIVED = {0}
_NO_TESTS = {5, 33}


@dataclass(frozen=True)
class Score:
    module: str
    killed: int
    survived: int
    no_tests: int
    other: int
    survivors: tuple[str, ...]

    @property
    def total(self) -> int:
        return self.killed + self.survived + self.no_tests + self.other

    @property
    def rate(self) -> float:
        return self.killed / self.total if self.total else 0.0


def configured_modules() -> list[str]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    modules: list[str] = config["tool"]["mutmut"]["only_mutate"]
    return modules


def run(module: str) -> None:
    """Mutate ``module`` (``syncer/folding/desired.py``) and run its tests; mutmut's output to a log."""
    pattern = module.removesuffix(".py").replace("/", ".") + ".*"
    MUTANTS.mkdir(exist_ok=True)
    log = MUTANTS / f"{module.replace('/', '.')}.log"
    with log.open("w") as out:
        done = subprocess.run(
            [sys.executable, "-m", "mutmut", "run", pattern], cwd=ROOT, stdout=out, stderr=out
        )
    if done.returncode != 0:
        raise SystemExit(f"mutmut failed on {module} (exit {done.returncode}); see {log}")


def score(module: str) -> Score:
    meta = MUTANTS / f"{module}.meta"
    if not meta.exists():
        raise SystemExit(f"no results for {module}: run `./dev mutate {module}` first")
    codes: dict[str, int | None] = json.loads(meta.read_text())["exit_code_by_key"]
    kinds: Counter[str] = Counter()
    survivors = []
    for name, code in codes.items():
        if code in _KILLED:
            kinds["killed"] += 1
        elif code in _SURVIVED:
            kinds["survived"] += 1
            survivors.append(name)
        elif code in _NO_TESTS:
            kinds["no_tests"] += 1
            survivors.append(name)
        else:
            kinds["other"] += 1
    return Score(
        module,
        kinds["killed"],
        kinds["survived"],
        kinds["no_tests"],
        kinds["other"],
        tuple(sorted(survivors)),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("modules", nargs="*", help="default: every module in [tool.mutmut]")
    parser.add_argument("--report", action="store_true", help="only print the last results")
    parser.add_argument("--survivors", action="store_true", help="list the surviving mutants")
    args = parser.parse_args(argv)
    modules = args.modules or configured_modules()
    scores = []
    for module in modules:
        if not args.report:
            run(module)
        result = score(module)
        scores.append(result)
        print(
            f"{module:28} {result.rate:6.1%} killed {result.killed:4}/{result.total:<4} "
            f"survived {result.survived:3}  no tests {result.no_tests:2}  other {result.other}",
            flush=True,
        )
        if args.survivors:
            for name in result.survivors:
                print(f"    {name}")
    killed = sum(s.killed for s in scores)
    total = sum(s.total for s in scores)
    print(f"{'all':28} {killed / total if total else 0:6.1%} killed {killed:4}/{total}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
