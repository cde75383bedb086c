"""Parity across a refactor: the same plans, transformed by two versions of tcgraph, give the same plan
files and sample the same images, on ONNX Runtime and on the torch backend.

    python benchmarks/structure_parity.py --before 65ac0ea     # a git revision to compare with
    python benchmarks/structure_parity.py --make DIR           # only: write DIR/<run>.{npy,plan.json} with this tree
    python benchmarks/structure_parity.py --compare A B        # only: compare two such folders

`--before REV` checks REV out into a temporary git worktree, runs `--make` there (that
tree's tcgraph on PYTHONPATH, this file's code, which uses only the public API that both
versions have: `tcgraph.transform` and `tcgraph.sample`), runs `--make` on this tree, and
compares. Models: the demo (`digits`), the demo as a diffusers DiTTransformer2DModel pipeline
folder with its own DDIM scheduler (made once by `scripts/digits_to_diffusers.py` and shared by
both trees) and the text demo (`digits-text`, prompted with its own encoder). DDIM 50 (the
pipeline's scheduler for the diffusers folder), guidance 2, batch 8, 10 images, seed 0; learned
plans calibrate on 12 images for 2 epochs (fast: the parity, not the plan's quality, is
measured). Writes `benchmarks/results/structure-parity.json` and prints a table: per run and
backend, whether plan.json is byte-identical and the samples' max abs difference.
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

LEARNED = {"calib_images": 12, "epochs": 2}
# (model, plan spec, plan options): the model "digits-diffusers" is the pipeline folder made in --make's folder
RUNS = [
    ("digits", "full", {}),
    ("digits", "fora:3", {}),
    ("digits", "taylor:3", {}),
    ("digits", "l2c:2", {**LEARNED, "interval": 3}),
    ("digits", "tokencache:2", LEARNED),
    ("digits", "dynamic:2", LEARNED),
    ("digits-diffusers", "fora:2", {}),
    ("digits-diffusers", "l2c:2", {**LEARNED, "interval": 3}),
    ("digits-text", "fora:2", {}),
    ("digits-text", "l2c:2", {**LEARNED, "interval": 3}),
]
BACKENDS = ("ort", "torch")
PROMPTS = [f"a handwritten digit {d}" for d in range(10)]
TOLERANCE = 1e-6


def run_name(model: str, spec: str) -> str:
    return f"{model}-{spec.replace(':', '')}"


def make(out: Path, diffusers_folder: Path | None = None) -> None:
    import tcgraph

    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for model, spec, options in RUNS:
            source = str(diffusers_folder) if model == "digits-diffusers" else model
            if model == "digits-diffusers" and diffusers_folder is None:
                continue
            name = run_name(model, spec)
            path = tcgraph.transform(source, spec, Path(tmp) / name, steps=50, guidance=2.0, batch=8,
                                     progress=False, plan_options=dict(options))
            (out / f"{name}.plan.json").write_bytes((Path(path) / "plan.json").read_bytes())
            for backend in BACKENDS:
                if model == "digits-text":
                    samples, _ = tcgraph.sample(path, prompts=PROMPTS, seed=0, progress=False, backend=backend)
                else:
                    samples, _ = tcgraph.sample(path, classes="0-9", per_class=1, seed=0, progress=False,
                                                backend=backend)
                np.save(out / f"{name}.{backend}.npy", samples.numpy())
            print(f"{name}: {tuple(samples.shape)}", flush=True)


def compare(before: Path, after: Path) -> list[dict]:
    rows = []
    for model, spec, _ in RUNS:
        name = run_name(model, spec)
        plan_same = (before / f"{name}.plan.json").read_bytes() == (after / f"{name}.plan.json").read_bytes()
        for backend in BACKENDS:
            a, b = np.load(before / f"{name}.{backend}.npy"), np.load(after / f"{name}.{backend}.npy")
            diff = float(np.abs(a.astype(np.float64) - b).max()) if a.shape == b.shape else float("inf")
            rows.append({"model": model, "plan": spec, "backend": backend, "plan_json_identical": plan_same,
                         "shape": list(a.shape), "max_abs_diff": diff,
                         "bit_identical": a.shape == b.shape and a.tobytes() == b.tobytes()})
    print("| model | plan | backend | plan.json identical | max abs diff | bit-identical |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['plan']} | {r['backend']} | {'yes' if r['plan_json_identical'] else 'no'} | "
              f"{r['max_abs_diff']:.3g} | {'yes' if r['bit_identical'] else 'no'} |")
    return rows


def make_diffusers_folder(tree: Path, folder: Path) -> None:
    """The demo as a diffusers pipeline folder, written once with `tree`'s converter (input to both trees)."""
    env = dict(os.environ, PYTHONPATH=str(tree))
    subprocess.run([sys.executable, str(tree / "scripts" / "digits_to_diffusers.py"), str(folder)], cwd=tree,
                   env=env, check=True, stdout=subprocess.DEVNULL)


def run_make(tree: Path, out: Path, diffusers_folder: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(tree))
    subprocess.run([sys.executable, str(Path(__file__).resolve()), "--make", str(out), "--diffusers-folder",
                    str(diffusers_folder)], cwd=tree, env=env, check=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--before", metavar="REV", help="git revision to compare this tree with")
    g.add_argument("--make", metavar="DIR", type=Path, help="write the samples of this tree's tcgraph to DIR")
    g.add_argument("--compare", nargs=2, metavar=("BEFORE", "AFTER"), type=Path)
    p.add_argument("--diffusers-folder", type=Path, help="with --make: the demo's diffusers pipeline folder")
    args = p.parse_args(argv)
    if args.make:
        make(args.make, args.diffusers_folder)
        return 0
    if args.compare:
        rows = compare(*args.compare)
    else:
        repo = Path(__file__).resolve().parents[1]
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            worktree = tmp / "before"
            folder = tmp / "digits-diffusers"
            make_diffusers_folder(repo, folder)
            subprocess.run(["git", "worktree", "add", "--detach", str(worktree), args.before], cwd=repo, check=True)
            try:
                run_make(worktree, tmp / "samples-before", folder)
            finally:
                subprocess.run(["git", "worktree", "remove", "--force", str(worktree)], cwd=repo, check=True)
            run_make(repo, tmp / "samples-after", folder)
            rows = compare(tmp / "samples-before", tmp / "samples-after")
        out = Path(__file__).parent / "results" / "structure-parity.json"
        out.write_text(json.dumps({"before": args.before, "tolerance": TOLERANCE, "rows": rows}, indent=1))
    return 0 if all(r["max_abs_diff"] <= TOLERANCE and r["plan_json_identical"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
