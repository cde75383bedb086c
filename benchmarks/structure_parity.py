"""Parity across a refactor: the same plans, transformed by two versions of tcgraph, sample the same images.

    python benchmarks/structure_parity.py --before 78fc895     # a git revision to compare with
    python benchmarks/structure_parity.py --make DIR           # only: write DIR/<plan>.npy with this tree
    python benchmarks/structure_parity.py --compare A B        # only: compare two such folders

`--before REV` checks REV out into a temporary git worktree, runs `--make` there (that
tree's tcgraph on PYTHONPATH, this file's code, which uses only the public API that both
versions have: `tcgraph.transform` and `tcgraph.sample`), runs `--make` on this tree, and
compares. Demo model, DDIM 50, guidance 2, batch 8, 10 images (one per class), seed 0;
learned plans calibrate on 12 images for 2 epochs (fast; the parity, not the plan's
quality, is measured). Writes `benchmarks/results/structure-parity.json` and prints a
table: max abs difference of the samples per plan, and whether they are bit-identical.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

PLANS = {
    "full": {},
    "fora:3": {},
    "l2c:2": {"calib_images": 12, "epochs": 2, "interval": 3},
    "tokencache:2": {"calib_images": 12, "epochs": 2},
    "dynamic:2": {"calib_images": 12, "epochs": 2},
}
TOLERANCE = 1e-6


def make(out: Path) -> None:
    import tcgraph

    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for spec, options in PLANS.items():
            path = tcgraph.transform("digits", spec, Path(tmp) / spec.replace(":", ""), steps=50, guidance=2.0,
                                     batch=8, progress=False, plan_options=dict(options))
            samples, _ = tcgraph.sample(path, classes="0-9", per_class=1, seed=0, progress=False)
            np.save(out / f"{spec.replace(':', '')}.npy", samples.numpy())
            print(f"{spec}: {tuple(samples.shape)}", flush=True)


def compare(before: Path, after: Path) -> list[dict]:
    rows = []
    for spec in PLANS:
        name = f"{spec.replace(':', '')}.npy"
        a, b = np.load(before / name), np.load(after / name)
        diff = float(np.abs(a.astype(np.float64) - b).max()) if a.shape == b.shape else float("inf")
        rows.append({"plan": spec, "shape": list(a.shape), "max_abs_diff": diff,
                     "bit_identical": a.shape == b.shape and a.tobytes() == b.tobytes()})
    print("| plan | max abs diff | bit-identical |\n|---|---|---|")
    for r in rows:
        print(f"| {r['plan']} | {r['max_abs_diff']:.3g} | {'yes' if r['bit_identical'] else 'no'} |")
    return rows


def run_make(tree: Path, out: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(tree))
    subprocess.run([sys.executable, str(Path(__file__).resolve()), "--make", str(out)], cwd=tree, env=env,
                   check=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--before", metavar="REV", help="git revision to compare this tree with")
    g.add_argument("--make", metavar="DIR", type=Path, help="write the samples of this tree's tcgraph to DIR")
    g.add_argument("--compare", nargs=2, metavar=("BEFORE", "AFTER"), type=Path)
    args = p.parse_args(argv)
    if args.make:
        make(args.make)
        return 0
    if args.compare:
        rows = compare(*args.compare)
    else:
        repo = Path(__file__).resolve().parents[1]
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            worktree = tmp / "before"
            subprocess.run(["git", "worktree", "add", "--detach", str(worktree), args.before], cwd=repo, check=True)
            try:
                run_make(worktree, tmp / "samples-before")
            finally:
                subprocess.run(["git", "worktree", "remove", "--force", str(worktree)], cwd=repo, check=True)
            run_make(repo, tmp / "samples-after")
            rows = compare(tmp / "samples-before", tmp / "samples-after")
        out = Path(__file__).parent / "results" / "structure-parity.json"
        out.write_text(json.dumps({"before": args.before, "tolerance": TOLERANCE, "rows": rows}, indent=1))
    return 0 if all(r["max_abs_diff"] <= TOLERANCE for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
