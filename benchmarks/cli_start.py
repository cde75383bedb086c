"""Start-up time of the CLI: `--help`, `--version`, `transform --help`, a usage error and `inspect`,
in a tree of an earlier commit (before) and in this one (after).

    python benchmarks/cli_start.py --before 6eaabaf            # the commit before the torch-free parser
    python benchmarks/cli_start.py --before 6eaabaf --runs 11

Each command is a fresh `python -m tcgraph …` process (what a user waits for), run `--runs` times
after one untimed run (disk cache; the after tree's CLI table cache, tcgraph/cli_table.py, which
the warm-up fills); before and after in turn, so that a busy machine slows both alike; the median
counts. The before tree is `git archive` of the commit, unpacked in a temporary folder; each tree
inspects an artifact it transformed itself (`--plan fora:2 --steps 4 --batch 2`, not timed).
`python -c "import torch"` is timed too: what any command that imports torch pays at least.
Writes benchmarks/results/cli-start.json and cli-start.md (`--out` without suffix).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's tcgraph writes the results
COMMANDS = {  # what -> argv after `python -m tcgraph` ({art}: the tree's artifact)
    "help": ["--help"],
    "version (before: a usage error)": ["--version"],
    "a command's help": ["transform", "--help"],
    "usage error: unknown plan": ["transform", "--plan", "fora2", "--out", "never-written"],
    "inspect": ["inspect", "{art}"],
}
IMPORT_TORCH = "python -c 'import torch'"

from tcgraph.files import atomic_write_text  # noqa: E402


def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, check=True, capture_output=True, text=True).stdout.strip()


def unpack(rev: str, into: Path) -> Path:
    """The package of commit `rev` (tcgraph/, with the demo weights) in `into`."""
    into.mkdir(parents=True)
    archive = subprocess.run(["git", "archive", "--format=tar", rev, "tcgraph"], cwd=ROOT, check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def run(tree: Path, argv: list[str], cwd: Path, cache: Path) -> tuple[float, int]:
    """Wall time of one `python -m tcgraph ARGV` with `tree` first on the path, and its exit code."""
    env = {**os.environ, "PYTHONPATH": str(tree), "TCGRAPH_CACHE_DIR": str(cache)}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "tcgraph", *argv], cwd=cwd, env=env, capture_output=True)
    return time.perf_counter() - start, done.returncode


# Runs `tcgraph.cli.main(ARGV)` in a fresh interpreter and prints whether it imported torch.
TORCH_PROBE = ("import sys, tcgraph.cli\ntry:\n    tcgraph.cli.main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
               "print('torch' in sys.modules, file=sys.stderr)")


def imports_torch(tree: Path, argv: list[str], cwd: Path, cache: Path) -> bool:
    env = {**os.environ, "PYTHONPATH": str(tree), "TCGRAPH_CACHE_DIR": str(cache)}
    done = subprocess.run([sys.executable, "-c", TORCH_PROBE, *argv], cwd=cwd, env=env, capture_output=True, text=True)
    return done.stderr.strip().splitlines()[-1] == "True"


def main(args: argparse.Namespace) -> dict:
    after_rev = git("rev-parse", "--short", "HEAD")
    dirty = bool(git("status", "--porcelain", "--", "tcgraph"))
    work = Path(tempfile.mkdtemp(prefix="cli-start-"))
    trees = {"before": unpack(args.before, work / "before"), "after": ROOT}
    cache = work / "cache"
    arts = {}
    for side, tree in trees.items():  # each tree inspects an artifact it wrote
        arts[side] = work / f"art-{side}"
        _, code = run(tree, ["transform", "--plan", "fora:2", "--steps", "4", "--batch", "2", "--no-check",
                             "--out", str(arts[side])], work, cache)
        if code != 0:
            raise SystemExit(f"the {side} tree could not transform the demo (exit {code})")
    rows = {}
    for name, argv in COMMANDS.items():
        times: dict[str, list[float]] = {"before": [], "after": []}
        codes: dict[str, int] = {}
        for r in range(args.runs + 1):
            for side, tree in trees.items():
                seconds, codes[side] = run(tree, [a.format(art=arts[side]) for a in argv], work, cache)
                if r:  # the first run of each warms the disk cache and the CLI table cache
                    times[side].append(seconds)
        torch_used = {side: imports_torch(tree, [a.format(art=arts[side]) for a in argv], work, cache)
                      for side, tree in trees.items()}
        rows[name] = {"command": "tcgraph " + " ".join(argv).replace("{art}", "ARTIFACT"),
                      **{side: {"median_s": statistics.median(t), "runs_s": t, "exit_code": codes[side],
                                "imports_torch": torch_used[side]} for side, t in times.items()}}
        print(f"{name:32s} before {rows[name]['before']['median_s']:.2f} s  after {rows[name]['after']['median_s']:.2f} s",
              flush=True)
    torch_runs = []
    for _ in range(args.runs):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import torch"], check=True)
        torch_runs.append(time.perf_counter() - start)
    result = {
        "config": {"before": git("rev-parse", "--short", args.before), "after": after_rev + (" + uncommitted changes"
                                                                                          if dirty else ""),
                   "runs": args.runs, "python": platform.python_version(), "machine": platform.machine(),
                   "cpus": os.cpu_count(), "load_average": os.getloadavg()},
        "commands": rows,
        "import_torch": {"median_s": statistics.median(torch_runs), "runs_s": torch_runs},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out.with_suffix(".json"), json.dumps(result, indent=1) + "\n")
    atomic_write_text(out.with_suffix(".md"), markdown(result))
    print(f"wrote {out.with_suffix('.json')}, {out.with_suffix('.md')}")
    return result


def markdown(result: dict) -> str:
    c = result["config"]
    lines = [
        "# CLI start time",
        "",
        f"`python benchmarks/cli_start.py --before {c['before']} --runs {c['runs']}`: median wall time of a fresh",
        f"`python -m tcgraph …` process over {c['runs']} runs (after one untimed run), before ({c['before']}) and",
        f"after ({c['after']}); Python {c['python']}, {c['cpus']} CPUs, load average "
        f"{', '.join(f'{x:.2f}' for x in c['load_average'])} at the end.",
        "",
        "| what | command | before | after | exit code before / after | imports torch before / after |",
        "|---|---|---:|---:|---|---|",
    ]
    for name, row in result["commands"].items():
        b, a = row["before"], row["after"]
        yes = {True: "yes", False: "no", None: "?"}
        lines.append(f"| {name} | `{row['command']}` | {b['median_s']:.2f} s | {a['median_s']:.2f} s | "
                     f"{b['exit_code']} / {a['exit_code']} | {yes[b.get('imports_torch')]} / "
                     f"{yes[a.get('imports_torch')]} |")
    lines += ["", f"For scale, `{IMPORT_TORCH}` alone: {result['import_torch']['median_s']:.2f} s (median).", ""]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--before", required=True, help="the commit to compare with (e.g. 6eaabaf)")
    p.add_argument("--runs", type=int, default=7, help="timed runs of each command and tree (default 7)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "cli-start"),
                   help="output path without suffix (default benchmarks/results/cli-start)")
    return p.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
