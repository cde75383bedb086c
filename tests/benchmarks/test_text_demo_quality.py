"""benchmarks/text_demo_quality.py at tiny settings: the JSON it writes and its table (no timing asserted)."""
from __future__ import annotations

import json

from tests.benchmarks import load_script


def test_text_demo_quality_tiny(tmp_path, capsys):
    out = tmp_path / "q.json"
    argv = ["--steps", "2", "--per-class", "1", "--digits", "3,7", "--guidance", "2", "--batch", "2",
            "--out", str(out)]
    result = load_script("text_demo_quality").main(argv)
    written = json.loads(out.read_text())
    assert written == json.loads(json.dumps(result))
    assert written["command"] == "python benchmarks/text_demo_quality.py " + " ".join(argv)
    p = written["protocol"]
    assert (p["steps"], p["per_class"], p["digits"], p["images"], p["clip_x0"], p["seed"]) == (2, 1, [3, 7], 2, True, 0)
    assert p["example_prompt"] == "a handwritten three" and p["negative"] == ""
    rows = written["rows"]
    assert [(r["model"], r["guidance"]) for r in rows] == [("digits-text", 2.0), ("digits", 2.0)]
    for r in rows:
        assert 0.0 <= r["accuracy"] <= 1.0 and r["images"] == 2
        assert set(r["per_digit_accuracy"]) == {"3", "7"}
        assert all(0.0 <= v <= 1.0 for v in r["per_digit_accuracy"].values())
        assert r["digits_fd"] == r["digits_fd"]  # a number, not NaN
    table = capsys.readouterr().out
    assert "| digits-text |" in table and "| digits |" in table
