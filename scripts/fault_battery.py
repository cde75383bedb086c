"""A battery of bad inputs and faults against tcgraph's CLI and Python API, with a verdict per case.

    python scripts/fault_battery.py            # every case (a few minutes on 2 cores)
    python scripts/fault_battery.py --quick    # the fast cases only (what tests/test_fault_battery.py runs)
    python scripts/fault_battery.py --json out.json

Verdicts:
- `clear error`: the call failed with one `tcgraph: error: ...` line (CLI: exit 1 or 2, no
  traceback; API: a TcgraphError), and the case's invariants hold;
- `handled`: an edge input that must work did, and the invariants hold;
- `traceback`: an exception other than tcgraph's escaped (CLI: "Traceback" on stderr or an
  uncaught exception; API: any other exception type);
- `wrong`: it succeeded where it must fail, failed where it must work, gave a misleading
  message (the expected words are missing), or broke an invariant: files it must not touch
  changed, an output that must not exist exists, a temporary file was left behind.

Every case runs in a fresh folder under one temporary root; a demo-model artifact
(fora:2, 6 steps, batch 4) is made once and copied where a case edits it. Exit status 0
only when no case is `traceback` or `wrong`.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the faults/ package beside this file

from faults.artifacts import api_cases, inspect_cases, process_cases, sample_cases  # noqa: E402
from faults.harness import Case, Ctx, Outcome, make_artifact, verdict  # noqa: E402,F401
from faults.inputs import checkpoint_cases, force_cases, settings_cases  # noqa: E402
from faults.diffusers_cases import diffusers_cases  # noqa: E402
from faults.serving import serving_cases  # noqa: E402
from faults.tampered import new_surface_cases  # noqa: E402


def all_cases() -> list[Case]:
    return settings_cases() + checkpoint_cases() + force_cases() + sample_cases() + inspect_cases() + api_cases() \
        + process_cases() + new_surface_cases() + serving_cases() + diffusers_cases()


def run_battery(quick: bool = False, only: str | None = None, artifact: Path | None = None) -> list[dict]:
    """`artifact`: an artifact folder made as `make_artifact` makes it (`tcgraph transform --plan
    fora:2 --steps 6 --batch 4`), copied in as the shared artifact instead of transforming one
    (tests/test_fault_battery.py passes the one its session already made); by default made here."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        if artifact is None:
            art = make_artifact(root)
        else:
            art = root / "shared-art"
            shutil.copytree(artifact, art, symlinks=True)
        for i, case in enumerate(c for c in all_cases() if (c.quick or not quick) and (only is None or only in c.name)):
            folder = root / f"case{i:03d}"
            folder.mkdir()
            start = time.perf_counter()
            try:
                out = case.run(Ctx(folder, art))
            except BaseException:  # noqa: BLE001 - the harness itself must not stop the battery
                out = Outcome(False, traceback.format_exc(), traceback=True)
            v, why = verdict(case, out)
            rows.append({"group": case.group, "case": case.name, "verdict": v, "detail": why,
                         "seconds": round(time.perf_counter() - start, 2)})
            print(f"{v:12s} {case.group:20s} {case.name:48s} {why[:90]}", flush=True)
            shutil.rmtree(folder, ignore_errors=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="only the fast cases")
    p.add_argument("--only", help="only the cases whose name contains this text")
    p.add_argument("--json", type=Path, help="write the rows here")
    args = p.parse_args(argv)
    rows = run_battery(args.quick, args.only)
    counts = {v: sum(r["verdict"] == v for r in rows) for v in ("clear error", "handled", "traceback", "wrong")}
    print("\n| verdict | cases |\n|---|---|")
    for v, n in counts.items():
        print(f"| {v} | {n} |")
    print(f"\n{len(rows)} cases: {counts['clear error']} clear error, {counts['handled']} handled, "
          f"{counts['traceback']} traceback, {counts['wrong']} wrong")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0 if counts["traceback"] == counts["wrong"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
