"""Shared fixtures: a tiny DiT whose weights are random (not adaLN-Zero), so that every
block and branch changes the output and a wrong rewrite cannot hide behind zeros.

Also the expensive outputs that several test files need, made once per session:
- `demo_fora2_artifact`: `tcgraph transform --plan fora:2 --steps 6 --batch 4` of the demo
  model (what tests/test_cli.py, tests/test_files.py and the fault battery each used to make
  for themselves); each of them works on its own copy;
- `gpu_check_smoke`: `benchmarks/gpu_check.sh --cpu-smoke`, whose work folder holds the same
  two artifact folders (digits, full and fora:2, 4 steps, batch 2, guidance 4, seed 0) that
  tests/test_bench_gpu.py's smoke run would otherwise transform again.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tcgraph.models.official.dit import DiT, make_config, randomize_weights

ROOT = Path(__file__).resolve().parents[1]
GPU_CHECK = ROOT / "benchmarks" / "gpu_check.sh"
DEMO_FORA2_ARGV = ["transform", "--plan", "fora:2", "--steps", "6", "--batch", "4"]


@pytest.fixture(autouse=True, scope="session")
def _few_threads():
    torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture
def tiny_config():
    # 3 blocks, 16 tokens, hidden 32; learn_sigma so the sampler's channel split is exercised.
    return make_config("DiT-S/2", input_size=8, depth=3, hidden_size=32, num_heads=2, in_channels=2,
                       num_classes=5, learn_sigma=True)


@pytest.fixture
def tiny_model(tiny_config):
    return randomize_weights(DiT(tiny_config), std=0.05)


#################################################################################
#                   The demo model's fora:2 artifact, made once                 #
#################################################################################


@pytest.fixture(scope="session")
def demo_fora2_artifact(tmp_path_factory) -> Path:
    """`tcgraph transform --plan fora:2 --steps 6 --batch 4` of the demo model, made once.
    Read-only: the files that use it take a copy (shutil.copytree: the manifest names files
    relative to the folder, so a copy verifies and loads as the original), so that no module
    sees another's edits."""
    from tcgraph.cli import main

    out = tmp_path_factory.mktemp("demo-fora2") / "digits-fora2"
    assert main([*DEMO_FORA2_ARGV, "--out", str(out)]) == 0
    return out


#################################################################################
#                  benchmarks/gpu_check.sh --cpu-smoke, run once                #
#################################################################################


def run_gpu_check(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """benchmarks/gpu_check.sh ARGS, with this interpreter and none of the caller's settings
    that the script reads (OUT, GPU_CHECK_CPU_SMOKE, OMP_NUM_THREADS)."""
    env = {k: v for k, v in os.environ.items() if k not in ("OUT", "GPU_CHECK_CPU_SMOKE", "OMP_NUM_THREADS")}
    env["PYTHON"] = sys.executable
    return subprocess.run(["bash", str(GPU_CHECK), *args], capture_output=True, text=True, timeout=timeout, env=env,
                          cwd=ROOT)


@pytest.fixture(scope="session")
def gpu_check_smoke(tmp_path_factory):
    """(process, out folder, work folder) of `gpu_check.sh --cpu-smoke`, run once per session.
    Read-only: tests/test_gpu_check.py checks these files; others copy the work folder."""
    tmp = tmp_path_factory.mktemp("gpu_check")
    out, work = tmp / "out", tmp / "work"
    proc = run_gpu_check("--cpu-smoke", "--out", str(out), "--work", str(work))
    return proc, out, work
