"""Fuzz `fdsub` with thousands of hostile command lines (the generator of tests/cli/test_fuzz.py) and summarize.

    .venv/bin/python tools/fuzz.py --cases 3000 [--seed 0] [--json fuzz.json]

Each case runs in a capped worker process (tests/helpers/fuzzcases.py); every one must end in exit 0, or exit 2
with exactly one `error:` line, leave nothing behind when it fails, and warn about any NaN it writes. The summary
counts cases and outcomes per input class (command, model mutation, image kind, output folder, option); every
failing case is printed with its command line. Exit 1 when any case failed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "helpers"))

from fuzzcases import Worker, cases, classes, problems  # noqa: E402
from hypothesis import HealthCheck, Phase, given, seed, settings  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write every failing case and the summary here")
    args = parser.parse_args(argv)
    worker = Worker()
    table: dict[str, Counter] = defaultdict(Counter)
    errors: Counter = Counter()  # the refusals, by their first words
    failures, start = [], time.perf_counter()

    @seed(args.seed)
    @settings(max_examples=args.cases, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(case=cases())
    def one(case):
        outcome = worker.run(case)
        found = problems(case, outcome)
        result = "FAIL" if found else f"exit {outcome['exit']}"
        for name in classes(case):
            table[name][result] += 1
        table["all"][result] += 1
        if outcome.get("exit") == 2:
            errors[_gist(outcome["output"])] += 1
        if found:
            failures.append({"problems": found, "args": outcome.get("args"), "output": outcome.get("output"),
                             "case": case})
        done = sum(table["all"].values())
        if done % 100 == 0:
            print(f"{done} cases, {len(failures)} failing, {time.perf_counter() - start:.0f} s", file=sys.stderr)

    try:
        one()
    finally:
        worker.cleanup()
    seconds = time.perf_counter() - start
    _print(table, failures, seconds)
    print("\nmost frequent refusals:")
    for text, count in errors.most_common(25):
        print(f"{count:>6}  {text}")
    if args.json:
        args.json.write_text(json.dumps({"seconds": seconds, "classes": {k: dict(v) for k, v in table.items()},
                                         "failures": failures}, indent=1, ensure_ascii=False))
    return 1 if failures else 0


def _gist(output: str) -> str:
    """An error line without its paths and numbers: the kind of refusal."""
    line = (output.strip().splitlines() or [""])[-1]
    words = [w for w in line.split() if "/" not in w and not any(c.isdigit() for c in w)]
    return " ".join(words[:8])


def _print(table, failures, seconds) -> None:
    outcomes = ["exit 0", "exit 1", "exit 2", "FAIL"]
    total = table["all"]
    print(f"{sum(total.values())} cases in {seconds:.0f} s ({seconds / max(1, sum(total.values())):.2f} s each), "
          f"{len(table) - 1} input classes, {len(failures)} failing")
    print(f"{'class':<34}" + "".join(f"{o:>9}" for o in outcomes))
    for name in ["all", *sorted(k for k in table if k != "all")]:
        print(f"{name[:33]:<34}" + "".join(f"{table[name][o]:>9}" for o in outcomes))
    for failure in failures:
        print(f"\nFAIL {'; '.join(failure['problems'])}\n  fdsub {' '.join(map(repr, failure['args'] or []))}\n  "
              + "\n  ".join((failure["output"] or "").strip().splitlines()[-5:]))


if __name__ == "__main__":
    sys.exit(main())
