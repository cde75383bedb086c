"""benchmarks/bench_steps.py on the shared demo fora:2 artifact (read only): one row per variant,
the reusing variant's FLOP share near 0 and the computing one's 1 (no timing asserted)."""
from __future__ import annotations

import json

from tests.benchmarks import load_script


def test_one_row_per_variant_with_its_flop_share(demo_fora2_artifact, tmp_path, capsys):
    out = tmp_path / "steps.json"
    result = load_script("bench_steps").main([str(demo_fora2_artifact), "--calls", "2", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    rows = {r["variant"]: r for r in result["rows"]}
    assert set(rows) == {"v0", "v1"} and all(len(r["times_s"]) == 2 and r["median_ms"] > 0 for r in rows.values())
    assert rows["v0"]["flop_fraction"] == 1.0 and rows["v1"]["flop_fraction"] < 0.05
    assert max(r["time_fraction"] for r in rows.values()) == 1.0
    assert "| v1 |" in capsys.readouterr().out
