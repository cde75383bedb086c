"""The CLI: the happy path on the demo model, and one clear error for each kind of bad input."""
import json
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tcgraph.cli import main

STEPS = ["--steps", "6", "--batch", "4"]


@pytest.fixture(scope="module")
def art(demo_fora2_artifact, tmp_path_factory):
    # `tcgraph transform --plan fora:2 --steps 6 --batch 4`, made once per session (tests/conftest.py);
    # this module's own copy of it, byte for byte
    out = tmp_path_factory.mktemp("cli") / "digits-fora2"
    shutil.copytree(demo_fora2_artifact, out, symlinks=True)
    return out


def test_transform_sample_inspect(art, tmp_path, capsys):
    png, npy = tmp_path / "s.png", tmp_path / "s.npy"
    assert main(["sample", str(art), "--classes", "0-2", "--per-class", "3", "--png", str(png), "--npy", str(npy)]) == 0
    arr = np.load(npy)
    assert arr.shape == (9, 1, 16, 16) and np.isfinite(arr).all()
    assert png.stat().st_size > 100
    capsys.readouterr()
    assert main(["inspect", str(art), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["planner"] == "fora:2" and info["schedule"] == ["v0", "v1"] * 3
    assert [v["reuse"] for v in info["variants"]] == [0, 12]
    assert main(["inspect", str(art)]) == 0
    assert "predicted speedup" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message, code", [
    # usage errors (exit 2): the command asks for something inconsistent
    (["sample", "{art}", "--classes", "10"], "out of range: the model has 10 classes, valid ids are 0..9", 2),
    (["sample", "{art}", "--batch", "5"], "built for batch 4", 2),
    (["sample", "{art}", "--resolution", "32"], "built for resolution 16", 2),
    (["transform", "--plan", "sometimes", "--out", "{tmp}/x", *STEPS], "unknown plan", 2),
    (["sample", "{art}", "--backend", "ort", "--precision", "bf16"], "--precision is an option of the torch backend", 2),
    # tcgraph errors (exit 1): a well-formed request that cannot be done with these files
    (["sample", "{tmp}"], "not a tcgraph artifact folder", 1),
    (["inspect", "{tmp}/nope"], "not a tcgraph artifact folder", 1),
    (["transform", "--plan", "fora:2", "--out", "{art}", *STEPS], "already exists", 1),
    (["transform", "--model", "{tmp}/missing.pt", "--out", "{tmp}/y"], "missing.pt", 1),
])
def test_bad_input_gets_one_clear_error(art, tmp_path, capsys, argv, message, code):
    argv = [a.format(art=art, tmp=tmp_path) for a in argv]
    assert main(argv) == code
    err = capsys.readouterr().err
    assert err.startswith("tcgraph: error: ") and message in err
    assert "Traceback" not in err


def test_damaged_artifact_is_refused_by_file_name(art, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(art, broken)
    onnx_file = sorted((broken / "variants").iterdir())[-1]
    onnx_file.write_bytes(onnx_file.read_bytes()[:-10])
    assert main(["sample", str(broken)]) == 1
    assert onnx_file.name in capsys.readouterr().err


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_killed_transform_leaves_no_partial_folder_and_keeps_the_old_one(art, tmp_path, sig):
    """A kill in the middle of a forced re-transform: the old folder is intact and verifies, no new
    folder appears; SIGTERM cleans its temporary at once, a SIGKILLed one is removed by the next write."""
    target = tmp_path / "target"
    shutil.copytree(art, target)
    before = sorted(p.name for p in tmp_path.iterdir())
    proc = subprocess.Popen([sys.executable, "-m", "tcgraph", "transform", "--plan", "fora:3", "--out", str(target),
                             "--force", "--steps", "30", "--batch", "4"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline and not any(p.name.startswith(".target") for p in tmp_path.iterdir()):
        time.sleep(0.05)  # wait until it has started writing its temporary folder
    assert any(p.name.startswith(".target.tmp-") for p in tmp_path.iterdir()), "transform never started writing"
    time.sleep(0.5)
    assert proc.poll() is None, "transform finished before it could be interrupted"
    proc.send_signal(sig)
    assert proc.wait() == (130 if sig == signal.SIGTERM else -signal.SIGKILL)
    assert main(["inspect", str(target), "--json"]) == 0  # old folder still verifies
    leftovers = sorted(p.name for p in tmp_path.iterdir() if p.name not in before)
    if sig == signal.SIGTERM:
        assert leftovers == []
    else:
        assert all(n.startswith(".target.tmp-") for n in leftovers)
        # the next writer (numerical checks skipped: this is about its leftovers, not numerics)
        assert main(["transform", "--plan", "full", "--out", str(target), "--force", *STEPS, "--no-check"]) == 0
        assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_inspect_focus_and_pictures(art, tmp_path, capsys):
    files_before = {p: p.stat().st_mtime_ns for p in art.rglob("*")}
    assert main(["inspect", str(art), "--step", "3", "--out", str(tmp_path / "pics")]) == 0
    out = capsys.readouterr().out
    assert "runs v1" in out and "cache reads" in out
    assert (tmp_path / "pics" / "schedule_heatmap.png").stat().st_size > 100
    assert {p: p.stat().st_mtime_ns for p in art.rglob("*")} == files_before  # never writes into the artifact
    assert main(["inspect", str(art), "--variant", "v9"]) == 2  # a usage error: the folder has v0, v1
    assert "v0" in capsys.readouterr().err
    assert main(["inspect", str(art), "--step", "99"]) == 2
    assert "0..5" in capsys.readouterr().err


def _router_file(path, logits):
    """A router file in the layout published with the L2C code (see tcgraph.plan.planners.l2c_import)."""
    import argparse

    import torch

    class Router(torch.nn.Module):
        def __init__(self, row):
            super().__init__()
            self.prob = torch.nn.Parameter(torch.tensor(row, dtype=torch.float32))

    routers = torch.nn.ModuleList([Router(row) for row in logits])
    torch.save({"routers": routers.state_dict(), "args": argparse.Namespace(num_sampling_steps=len(logits))}, path)


def test_transform_with_an_imported_router(tmp_path, capsys):
    import math

    S, depth = 6, 6
    # router i: logit +3 for block i's attention and block (5 - i)'s MLP, -3 elsewhere
    logits = [[3.0 if (j == 2 * i or j == 2 * (depth - 1 - i) + 1) else -3.0 for j in range(2 * depth)]
              for i in range(S)]
    router = tmp_path / "router.pt"
    _router_file(router, logits)
    out = tmp_path / "imported"
    # --no-check: this test is about the imported router's plan (the numerics of such variants are
    # checked by tests/plan's build_variants(check=True)); the folder and its plan are the same
    assert main(["transform", "--plan", "l2c", "--router", str(router), "--threshold", "0.1", "--out", str(out),
                 *STEPS, "--no-check"]) == 0
    capsys.readouterr()
    assert main(["inspect", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    plan = json.loads((out / "plan.json").read_text())
    for s, vid in enumerate(plan["schedule"]):
        i = S - 1 - s
        for l, (attn, mlp) in enumerate(plan["variants"][vid]):
            if i % 2 == 1:
                assert attn == mlp == "compute"
            else:
                p = [1 / (1 + math.exp(-logits[i][2 * l + b])) for b in (0, 1)]
                assert attn == ("compute" if p[0] > 0.1 else "reuse") and mlp == ("compute" if p[1] > 0.1 else "reuse")
    assert info["planner"] == "l2c" and len(info["variants"]) == 4  # full + 3 distinct cache steps
    assert main(["inspect", str(out)]) == 0
    assert f"imported L2C router {router}, threshold 0.1" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message, code", [
    (["--plan", "l2c", "--router", "{tmp}/r.pt", "--target-speedup", "2"], "apply to learning", 2),
    (["--plan", "fora:2", "--target-speedup", "2"], "not apply to plan 'fora'", 2),
    (["--plan", "l2c:9"], "out of reach", 1),
    (["--plan", "l2c", "--router", "{tmp}/missing.pt"], "missing.pt", 1),
    (["--plan", "l2c", "--target-speedup", "2", "--lambda", "0.1"], "not both", 2),
])
def test_l2c_bad_options(tmp_path, capsys, argv, message, code):
    argv = ["transform", *[a.format(tmp=tmp_path) for a in argv], "--out", str(tmp_path / "o"), *STEPS]
    assert main(argv) == code
    err = capsys.readouterr().err
    assert err.startswith("tcgraph: error: ") and message in err
    assert not (tmp_path / "o").exists()


def _no_tensorrt_here() -> bool:
    try:
        import tensorrt  # noqa: F401
    except Exception:
        return True
    return False


@pytest.mark.skipif(not _no_tensorrt_here(), reason="checks the error of machines without TensorRT")
def test_trt_without_tensorrt_is_one_clear_error_and_writes_nothing(art, tmp_path, capsys):
    out = tmp_path / "trt"
    start = time.perf_counter()
    assert main(["transform", "--plan", "l2c", "--backend", "trt", "--out", str(out), *STEPS]) == 1
    assert time.perf_counter() - start < 20  # refused before calibration and export
    err = capsys.readouterr().err
    assert err.count("tcgraph: error:") == 1 and "TensorRT" in err and "--backend torch" in err
    assert not out.exists() and not list(tmp_path.glob(".trt*"))
    assert main(["sample", str(art), "--backend", "trt", "--png", str(tmp_path / "s.png")]) == 1
    err = capsys.readouterr().err
    assert "TensorRT" in err and "pip install tensorrt" in err
    assert not (tmp_path / "s.png").exists()
    assert main(["transform", "--plan", "full", "--precision", "bf16", "--out", str(out), *STEPS]) == 2
    assert "add --backend trt" in capsys.readouterr().err


def test_progress_is_one_line_per_phase_when_asked_and_quiet_by_default(art, tmp_path, capsys):
    argv = ["sample", str(art), "--classes", "0-4", "--per-class", "1", "--png", str(tmp_path / "s.png")]
    assert main([*argv, "--progress", "lines"]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.fullmatch(r"tcgraph: sample: 12/12 in \d+\.\d s", err[0]), err  # 2 runs x 6 steps
    assert main(argv) == 0  # not a terminal: no bars, no lines
    assert capsys.readouterr().err == ""
