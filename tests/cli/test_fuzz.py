"""Fuzzing every command with hostile input (tests/helpers/fuzzcases.py): every run ends in exit 0, or exit 2 with
exactly one `error:` line; no traceback, internal error or hang; nothing left in or beside --out on failure; no NaN
in a result without a warning. FDSUB_FUZZ_CASES sets the number of cases (default 300, about a minute and a half
on 2 cores); tools/fuzz.py runs thousands with a summary by class."""

from __future__ import annotations

import json
import os

import pytest
from fuzzcases import Worker, cases, problems
from hypothesis import HealthCheck, Phase, given, settings

CASES = int(os.environ.get("FDSUB_FUZZ_CASES", "300"))


@pytest.fixture(scope="module")
def worker():
    worker = Worker()
    yield worker
    worker.cleanup()


@settings(max_examples=CASES, deadline=None, database=None, derandomize=True,
          phases=[Phase.explicit, Phase.generate, Phase.shrink],
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large])
@given(case=cases())
def test_every_hostile_command_line_fails_cleanly_or_succeeds(worker, case):
    outcome = worker.run(case)
    found = problems(case, outcome)
    assert not found, json.dumps({"problems": found, "args": outcome.get("args"), "output": outcome.get("output"),
                                  "case": case}, indent=1, ensure_ascii=False)
