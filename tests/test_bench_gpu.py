"""benchmarks/bench_gpu.py on the CPU: the demo model at tiny settings, every CUDA part skipped.

The eager baseline runs in plain float32 here (the script's CPU default; `--dtype` would
put it under CPU autocast). Timings are only checked to be positive and to combine into
the speedup columns as defined; tests never assert on speed.
"""
from __future__ import annotations

import importlib.util
import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from tcgraph import api
from tcgraph.errors import TcgraphError
from tcgraph.plan import make_plan, plan_flops
from tcgraph.sampling import SamplerSettings
from tcgraph.plan.learning.evaluate import speedup_of

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_gpu.py"
STEPS, BATCH, GUIDANCE = 4, 2, 4.0


def _load():
    spec = importlib.util.spec_from_file_location("bench_gpu", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench():
    return _load()


@pytest.fixture(scope="module")
def smoke(bench, tmp_path_factory, request):
    tmp = tmp_path_factory.mktemp("bench_gpu")
    out, work = tmp / "gpu-smoke", tmp / "work"
    if any("gpu_check_smoke" in item.fixturenames for item in request.session.items):
        # tests/test_gpu_check.py runs `gpu_check.sh --cpu-smoke` in this session anyway (once,
        # tests/conftest.py): its prepare stage made the folders this run wants (bench_gpu.py
        # --prepare-only, digits, full and fora:2, these steps, batch, guidance and seed 0), so a
        # copy of its work folder is reused here (`reusing ...`, matched by plan and model config)
        # instead of transforming both again. Alone, this file transforms them itself.
        _, _, made = request.getfixturevalue("gpu_check_smoke")
        if made.is_dir():
            shutil.copytree(made, work, symlinks=True)
    argv = ["--model", "digits", "--device", "cpu", "--steps", str(STEPS), "--batch", str(BATCH),
            "--guidance", str(GUIDANCE), "--repeats", "1", "--plans", "full,fora:2",
            "--backends", "eager,torch,torch-nograph,ort,trt", "--out", str(out), "--work", str(work), "--quiet"]
    return bench.main(argv), out, work


@pytest.fixture(scope="module")
def plans():
    cfg = api.load_dit("digits").config
    settings = SamplerSettings(num_steps=STEPS, cfg_scale=GUIDANCE, batch=BATCH, resolution=cfg.input_size)
    return cfg, {name: make_plan(name, cfg, settings) for name in ("full", "fora:2")}


def _rows(result) -> dict:
    return {(r["backend"], r["plan"]): r for r in result["rows"]}


def test_one_row_per_backend_and_plan_that_ran(smoke):
    result, out, _ = smoke
    assert list(_rows(result)) == [("eager", "full"), ("torch", "full"), ("torch", "fora:2"),
                                   ("ort", "full"), ("ort", "fora:2")]
    assert result["failed"] == []
    assert json.loads(out.with_name(out.name + ".json").read_text()) == result


def test_times_are_positive_and_steps_follow_the_schedule(smoke, plans):
    result, _, _ = smoke
    _, named = plans
    for (backend, plan), r in _rows(result).items():
        assert len(r["times_ms"]) == 1 and r["median_ms"] > 0 and all(t > 0 for t in r["times_ms"])
        schedule = ["eager"] * STEPS if backend == "eager" else named[plan].schedule()
        assert {v: s["steps"] for v, s in r["step_ms"].items()} == {v: schedule.count(v) for v in set(schedule)}
        assert all(s["median_ms"] > 0 for s in r["step_ms"].values())


def test_speedup_columns(smoke, plans):
    result, _, _ = smoke
    cfg, named = plans
    rows = _rows(result)
    eager_ms = rows["eager", "full"]["median_ms"]
    for (backend, plan), r in rows.items():
        if plan == "full":
            assert r["realized_speedup"] == 1.0  # exactly: the backend's own full time over itself
        else:
            assert r["realized_speedup"] == rows[backend, "full"]["median_ms"] / r["median_ms"]
        predicted = plan_flops(cfg, named[plan])["predicted_speedup"]
        assert r["predicted_speedup"] == predicted
        assert math.isclose(predicted, speedup_of(cfg, named[plan].recipes), rel_tol=1e-12)
        assert r["realized_over_predicted"] == r["realized_speedup"] / predicted
        assert r["vs_eager"] == eager_ms / r["median_ms"]
    assert rows["torch", "fora:2"]["predicted_speedup"] > 1.9  # fora:2 at 4 steps: 2 full, 2 reuse steps
    assert rows["torch", "fora:2"]["variants"] == 2 and rows["torch", "full"]["variants"] == 1


def test_cuda_parts_are_recorded_as_skipped(smoke):
    result, _, _ = smoke
    skipped = {s["backend"]: s["reason"] for s in result["skipped"]}
    assert "NVIDIA" in skipped["trt"] and "--device cpu" in skipped["trt"]
    assert "CUDA graphs" in skipped["torch-nograph"]
    assert "no CUDA" in skipped[None]
    for r in result["rows"]:
        assert r["copies_in_loop"] == r["copies_whole_run"] == r["peak_torch_mib"] == "not measured (no CUDA)"


def test_markdown_names_every_row_and_every_skip(smoke):
    result, out, _ = smoke
    md = out.with_name(out.name + ".md").read_text()
    for r in result["rows"]:
        assert f"| {r['backend']} | {r['plan']} |" in md
    assert "- trt: skipped: TensorRT runs only on NVIDIA GPUs" in md
    assert "- torch-nograph: skipped:" in md


def test_full_samples_match_eager(smoke):
    # float32 everywhere: every backend's full plan reproduces the eager samples closely
    result, _, _ = smoke
    rows = _rows(result)
    for backend in ("torch", "ort"):
        assert rows[backend, "full"]["psnr_full_vs_eager_db"] > 60
        assert rows[backend, "fora:2"]["psnr_vs_full_db"] is not None


def test_merge_reuses_folders_and_keeps_other_rows(bench, smoke):
    first, out, work = smoke
    folders = sorted(p for p in work.rglob("manifest.json"))
    stamps = [p.stat().st_mtime_ns for p in folders]
    argv = ["--model", "digits", "--device", "cpu", "--steps", str(STEPS), "--batch", str(BATCH),
            "--guidance", str(GUIDANCE), "--repeats", "1", "--plans", "full", "--backends", "ort",
            "--out", str(out), "--work", str(work), "--quiet", "--merge"]
    merged = bench.main(argv)
    assert [p.stat().st_mtime_ns for p in folders] == stamps  # matching artifact folders were reused
    rows, before = _rows(merged), _rows(first)
    assert set(rows) == set(before)
    assert rows["ort", "full"].get("measured_by") is None  # measured again
    assert rows["ort", "fora:2"]["measured_by"] == first["config"]["command"]
    fora = rows["ort", "fora:2"]
    assert fora["realized_speedup"] == rows["ort", "full"]["median_ms"] / fora["median_ms"]  # against the new full
    assert merged["config"]["merged_commands"] == [first["config"]["command"]]
    with pytest.raises(TcgraphError, match="other settings"):  # 5 steps cannot merge with 4-step rows
        bench.main([("5" if prev == "--steps" else a) for prev, a in zip([None, *argv], argv)])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks what a machine without CUDA records")
def test_without_cuda_everything_is_skipped_with_its_reason(bench, tmp_path):
    result = bench.main(["--model", "digits", "--steps", "2", "--batch", "1", "--plans", "full",
                         "--out", str(tmp_path / "none"), "--work", str(tmp_path / "work"), "--quiet"])
    assert result["rows"] == [] and result["failed"] == []
    reasons = {s["backend"]: s["reason"] for s in result["skipped"]}
    assert set(reasons) == {"eager", "torch", "torch-nograph", "ort", "trt", None}
    assert all("sees no CUDA GPU" in reasons[b] for b in ("eager", "torch", "ort", "trt"))
    assert not (tmp_path / "work").exists()  # nothing was transformed for backends that cannot run


def test_family_defaults(bench):
    dit, flux = bench.parse_args([]), bench.parse_args(["--family", "flux"])
    assert (dit.model, dit.batch, dit.guidance, dit.steps) == ("DiT-XL/2", 8, 4.0, 50)
    assert "l2c:2" in dit.plans.split(",") and "trt" in dit.backends.split(",")
    # FLUX.1-dev as FluxPipeline runs it: 28 steps, guidance 3.5 (an input), T5 prompts of 512 tokens
    assert (flux.model, flux.batch, flux.guidance, flux.steps, flux.text_length) == ("FLUX.1-dev", 1, 3.5, 28, 512)
    assert flux.plans == "full,fora:3,taylor:4,tokens:2" and flux.backends == "eager,torch"


def test_flux_refuses_what_it_cannot_run(bench, tmp_path):
    # refused before any model is built: no artifact folder (so no ort or trt), nothing to prepare
    for argv, says in ((["--backends", "eager,ort"], "no artifact folder for ort or trt"),
                       (["--prepare-only"], "nothing to prepare")):
        with pytest.raises(TcgraphError, match=says):
            bench.main(["--family", "flux", "--model", "FLUX-tiny", "--device", "cpu", "--out", str(tmp_path / "f"),
                        *argv])
    assert not tmp_path.joinpath("f.json").exists()


def test_flux_in_memory_specs_are_what_the_programs_take_and_give(bench):
    # the specs come from the plan's shapes (no example run); the CUDA-graph path copies into buffers of
    # exactly these shapes, so they are held against what each program makes of inputs of its input specs
    from gpu import flux

    model = flux.cast_linear_inputs(flux.build_flux(flux.flux_config(flux.FLUX_TINY), torch.device("cpu"),
                                                    torch.float32, seed=0))
    settings = flux.flux_settings(model.config, 6, 1, 3.5, 8)
    for spec, (plan, _) in flux.flux_plans(model, settings, ["full", "fora:3", "taylor:4", "tokens:2"]).items():
        art, programs = flux.in_memory_artifact(model, plan, torch.device("cpu"))
        assert [v.id for v in art.variants] == sorted(set(plan.schedule()), key=plan.schedule().index), spec
        for v in art.variants:
            with torch.no_grad():
                got = programs[v.id](*(torch.randn(i.shape) for i in v.inputs))
            got = got if isinstance(got, tuple) else (got,)
            assert [tuple(g.shape) for g in got] == [o.shape for o in v.outputs], (spec, v.id)


def test_memcpy_names_of_the_profiler():
    _load()  # puts benchmarks/ on sys.path, where its parts live (benchmarks/gpu/)
    from gpu.measure import MEMCPY as pattern
    names = {"Memcpy HtoD (Pageable -> Device)": "HtoD", "Memcpy DtoH (Device -> Pinned)": "DtoH",
             "Memcpy DtoD (Device -> Device)": "DtoD"}
    for name, kind in names.items():
        assert pattern.match(name).group(1) == kind
    assert pattern.match("cudaMemcpyAsync") is None and pattern.match("Memset (Device)") is None
