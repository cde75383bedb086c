"""The fault battery's fast cases (scripts/fault_battery.py --quick): no traceback, nothing wrong.

The whole battery (332 cases, with the process cases: signals, closed pipes, concurrent
writers, and the cases that start a Triton server or build a text artifact) runs as `python scripts/fault_battery.py`; its slow cases are also covered by
tests/test_files.py and tests/test_cli.py.
"""
import importlib
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


@pytest.fixture(scope="module")
def battery():
    sys.path.insert(0, str(SCRIPTS))
    try:
        yield importlib.import_module("fault_battery")
    finally:
        sys.path.remove(str(SCRIPTS))


def test_the_battery_is_broad(battery):
    cases = battery.all_cases()
    assert len(cases) >= 300 and len({c.name for c in cases}) == len(cases)
    assert {c.group for c in cases} >= {"transform settings", "checkpoints", "--force and --out", "sample", "inspect",
                                        "API types", "process", "tampered artifacts", "links", "values",
                                        "export-triton", "serve", "requests", "requests over HTTP", "diffusers"}


def test_fast_cases_are_clear_errors_or_handled(battery, demo_fora2_artifact):
    # the shared artifact is the session's (tests/conftest.py), made by the same command as the
    # battery's make_artifact (fora:2, --steps 6 --batch 4); the battery works on its own copy
    assert sys.modules["faults.harness"].STEPS == ["--steps", "6", "--batch", "4"]
    rows = battery.run_battery(quick=True, artifact=demo_fora2_artifact)
    bad = [f"{r['verdict']}: {r['case']}: {r['detail']}" for r in rows if r["verdict"] in ("traceback", "wrong")]
    assert not bad, "\n".join(bad)
    assert len(rows) >= 290


def test_a_traceback_and_a_wrong_success_are_caught(battery):
    """The verdicts themselves: an escaping exception is a traceback, a success where an error is due is wrong."""
    case = battery.Case("x", "g", lambda c: None, "error", ("word",))
    assert battery.verdict(case, battery.Outcome(False, "Traceback ...\nValueError: x", traceback=True))[0] == "traceback"
    assert battery.verdict(case, battery.Outcome(True))[0] == "wrong"
    assert battery.verdict(case, battery.Outcome(False, "tcgraph: error: no such thing"))[0] == "wrong"  # lacks "word"
    assert battery.verdict(case, battery.Outcome(False, "tcgraph: error: the word"))[0] == "clear error"
    assert battery.verdict(case, battery.Outcome(False, "tcgraph: error: the word", broken=["x changed"]))[0] == "wrong"
