"""gpu_check.sh's summary of bench JSONs: their skips, failures and rows, one table each.

    python benchmarks/gpu/check_summary.py OUT/gpu-bench.json [OUT/gpu-flux.json]

No torch import (fast, and it works where torch is broken): only json. Each JSON's skip and
failure lines are named by its stage word (`bench` for gpu-bench.json, `flux` for gpu-flux.json).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

WORDS = {"gpu-bench.json": "bench", "gpu-flux.json": "flux"}


def num(v, spec: str) -> str:
    return format(v, spec) if isinstance(v, (int, float)) else "-"


def summarize(path: Path) -> None:
    word = WORDS.get(path.name, path.stem)
    result = json.loads(path.read_text()) if path.is_file() else None
    if result is None:
        print(f"skipped {word} rows: all ({path.name} was not written)")
        return
    for s in result["skipped"]:
        print(f"skipped {word} {s['backend'] or 'all rows'}{' x ' + s['plan'] if s['plan'] else ''}: {s['reason']}")
    for f in result["failed"]:
        print(f"FAILED {word} {f['backend']} x {f['plan']}: {f['error']}")
    print(f"\n== {path.name}: {len(result['rows'])} rows")
    print(f"{'backend':<14}{'plan':<14}{'variants':>8}{'median ms':>11}{'realized x':>11}{'predicted x':>12}"
          f"{'vs eager x':>11}{'peak MiB':>10}  copies in loop")
    for r in result["rows"]:
        print(f"{r['backend']:<14}{r['plan']:<14}{r['variants']:>8}{num(r['median_ms'], '.1f'):>11}"
              f"{num(r['realized_speedup'], '.2f'):>11}{num(r['predicted_speedup'], '.2f'):>12}"
              f"{num(r['vs_eager'], '.2f'):>11}{num(r['peak_torch_mib'], '.0f'):>10}  {r['copies_in_loop']}")


if __name__ == "__main__":
    for i, arg in enumerate(sys.argv[1:]):
        if i:
            print()
        summarize(Path(arg))
