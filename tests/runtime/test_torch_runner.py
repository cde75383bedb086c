"""TorchRunner: the variants' torch programs and the model's weights read from the artifact
alone (no pass runs), the same samples as ORT and the eager reference, stated low-precision
tolerances, clear errors; CUDA parts where a GPU exists."""
from __future__ import annotations

import json

import pytest
import torch

from tcgraph import api
from tcgraph.errors import TcgraphError
from tcgraph.eval.metrics import psnr
from tcgraph.export.artifact import load_artifact
from tcgraph.export.onnx import WEIGHTS_PATH
from tcgraph.models import load_model
from tcgraph.models.official.dit import DiT, build_model, make_config, randomize_weights
from tcgraph.passes import reference_step
from tcgraph.plan import COMPUTE, REUSE, Plan, Recipe, dynamic, partial
from tcgraph.sampling import SamplerSettings, make_noise, run_batches, sampler_for
from tcgraph.runtime import make_runner
from tcgraph.runtime.dispatch import ScheduleDispatcher
from tcgraph.runtime.torch import ProgramsFromArtifact, TorchRunner, load_weights
from tcgraph.names import BRANCHES

CUDA = torch.cuda.is_available()


def needs_cuda(test):
    """Mark a test `gpu` (select with `-m gpu`) and skip it, with the reason, without a CUDA GPU."""
    return pytest.mark.gpu(pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (PyTorch sees none here)")(test))

# Stated tolerances of the low-precision paths: PSNR of the demo model's samples (10 DDIM
# steps, guidance 2) against float32 eager from the same noise. Measured on CPU by
# `python benchmarks/precision.py`: bf16 43.1 dB, fp16 61.0 dB (eager bf16 autocast 47.0 dB).
MIN_PSNR = {"bf16": 35.0, "fp16": 50.0}


def _mixed_recipes(n: int) -> list[Recipe]:
    """Full, reuse, partial (block 1) and dynamic (blocks 0, 2) steps of a 3-block model."""
    full = Recipe.uniform(3, COMPUTE, BRANCHES)
    reuse = Recipe(((REUSE, REUSE), (COMPUTE, REUSE), (REUSE, COMPUTE)), BRANCHES)
    part = Recipe(((REUSE, REUSE), (partial([0, 3, 6, 9, 12]), partial(range(8))), (COMPUTE, REUSE)), BRANCHES)
    dyn = Recipe(((dynamic(5), dynamic(3)), (REUSE, REUSE), (COMPUTE, dynamic(n - 1))), BRANCHES)
    return [full, reuse, part, full, dyn, dyn]


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    from tcgraph.models.official.dit import make_config, randomize_weights

    cfg = make_config("DiT-S/2", input_size=8, depth=3, hidden_size=32, num_heads=2, in_channels=2,
                      num_classes=5, learn_sigma=True)
    model = randomize_weights(DiT(cfg), std=0.05)
    s = SamplerSettings(num_steps=6, batch=2, cfg_scale=2.0, resolution=8)
    plan = Plan("mixed", s, tuple(_mixed_recipes(cfg.num_tokens)), cfg.num_tokens)
    path = api.transform(model, plan, tmp_path_factory.mktemp("torch") / "mixed", progress=False)
    return model, plan, path


def test_weights_read_from_the_artifact_are_the_models(mixed):
    model, _, path = mixed
    got, want = load_weights(load_artifact(path)), model.state_dict()
    assert list(got) == list(want)
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_programs_hold_no_weights(mixed):
    """Weights once: the program files are graphs; the weights live in variants/weights.bin only."""
    model, _, path = mixed
    load_artifact(path)  # hashes checked, program files included
    files = [path / f for f in json.loads((path / "manifest.json").read_text())["programs"].values()]
    assert len(files) == 4 and all(f.name.endswith(".program.safetensors") for f in files)
    from safetensors import safe_open

    for f in files:
        with safe_open(str(f), framework="pt") as st:
            stored = sum(st.get_tensor(k).numel() for k in st.keys())
        assert stored < 1024, (f.name, stored)  # the token indices of partial actions at most


def test_sampling_needs_no_pass(mixed, monkeypatch):
    """The folder alone: activating the runner rebuilds no model and runs no pass."""
    import sys

    _, _, path = mixed
    layers = ("tcgraph.passes", "tcgraph.compile", "tcgraph.calibrate")
    for name in [*layers, *(m for m in sys.modules if m.startswith(layers))]:
        monkeypatch.setitem(sys.modules, name, None)  # importing them now raises
    with make_runner("torch", load_artifact(path)) as runner:
        assert sorted(runner._programs) == ["v0", "v1", "v2", "v3"]


def test_untrained_model_equal_tensors_are_stored_once(tmp_path):
    """adaLN-Zero init: many tensors are equal (zeros); they are found by content, and only
    the small tensors that live inside the ONNX files are appended to weights.bin."""
    model = DiT(load_model("digits").config)  # fresh init, not the trained weights
    path = api.transform(model, "fora:2", tmp_path / "a", steps=4, progress=False)
    art = load_artifact(path)
    entries = json.loads((path / "manifest.json").read_text())["parameters"]
    zeros = [k for k, v in model.state_dict().items() if v.numel() > 256 and not v.any()]
    assert len(zeros) >= 6
    assert len({(entries[k]["offset"], entries[k]["transposed"]) for k in zeros}) < len(zeros)
    rebuilt = load_weights(art)
    assert all(torch.equal(rebuilt[k], v) for k, v in model.state_dict().items())
    param_bytes = sum(v.numel() * v.element_size() for v in model.state_dict().values())
    assert (path / WEIGHTS_PATH).stat().st_size <= param_bytes + 4096


def test_torch_samples_equal_ort_and_the_eager_reference_loop(mixed):
    model, plan, path = mixed
    labels = [1, 4, 0]
    got, _ = api.sample(path, classes=labels, per_class=1, seed=3, backend="torch", progress=False)
    ort, _ = api.sample(path, classes=labels, per_class=1, seed=3, backend="ort", progress=False)
    caches: dict = {}

    def eager_step(step, x, t, y):
        out, fresh = reference_step(model, x, t, y, plan.recipes[step], caches, keep_inputs=True)
        caches.update(fresh)
        return out

    s, cfg = plan.settings, model.config
    eager = run_batches(eager_step, caches.clear, sampler_for(s, cfg), labels,
                            make_noise(len(labels), cfg.in_channels, s.resolution, 3), s.batch, 3)
    assert torch.allclose(got, eager, rtol=1e-5, atol=1e-4), (got - eager).abs().max()
    assert torch.allclose(got, ort, rtol=1e-5, atol=1e-4), (got - ort).abs().max()
    assert (api.sample_eager(model, s, labels, seed=3) - eager).abs().max() > 1e-3  # not the full model


def test_caches_pass_from_step_to_step_as_the_returned_tensors(mixed):
    _, plan, path = mixed
    art = load_artifact(path)
    with make_runner("torch", art) as runner:
        dispatch = ScheduleDispatcher.for_plan(runner, plan)
        seen = []
        real_run = dispatch.run

        def run(vid, feeds):
            seen.append({n: v for n, v in feeds.items() if n.startswith("cache.")})
            result = real_run(vid, feeds)
            seen.append(result)
            return result

        dispatch.run = run
        sampler_for(plan.settings, _cfg(art)).sample(dispatch, make_noise(2, _cfg(art).in_channels, 8, 0),
                                                         torch.tensor([1, 2]))
    # every cache fed at step i is the very tensor an earlier step returned
    returned = {id(v) for d in seen[1::2] for v in d.values()}
    fed = [v for d in seen[0::2] for v in d.values()]
    assert fed and all(id(v) in returned for v in fed)


def _cfg(art):
    return art.model_config


@pytest.fixture(scope="module")
def demo_full(tmp_path_factory):
    return api.transform("digits", "full", tmp_path_factory.mktemp("demo") / "full", steps=10, batch=4,
                         progress=False)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_low_precision_within_stated_psnr_of_float32_eager(demo_full, precision):
    model = load_model("digits")
    art = load_artifact(demo_full)
    labels = [0, 3, 5, 8]
    ref = api.sample_eager(model, art.plan.settings, labels)
    got, _ = api.sample(demo_full, classes=labels, per_class=1, backend="torch",
                        runner_options={"precision": precision}, progress=False)
    fp32, _ = api.sample(demo_full, classes=labels, per_class=1, backend="torch", progress=False)
    assert (fp32 - ref).abs().max() <= 1e-4
    value = psnr(got, ref)
    assert MIN_PSNR[precision] <= value < 100, value  # close, and really in low precision
    with make_runner("torch", art, precision=precision) as runner:
        result = runner.run("v0", {"x": torch.randn(8, 1, 16, 16), "t": torch.arange(8), "y": torch.arange(8)})
        assert result["out"].dtype == torch.float32  # the sampler's update stays in float32


def test_sample_cli_with_torch_backend(demo_full, tmp_path, capsys):
    from tcgraph.cli import main

    png = tmp_path / "s.png"
    assert main(["sample", str(demo_full), "--backend", "torch", "--device", "cpu", "--classes", "1,2",
                 "--per-class", "1", "--png", str(png), "--npy", str(tmp_path / "s.npy")]) == 0
    assert png.is_file()
    import numpy as np

    got = torch.from_numpy(np.load(tmp_path / "s.npy"))
    ort, _ = api.sample(demo_full, classes=[1, 2], per_class=1, progress=False)
    assert (got - ort).abs().max() <= 2e-4
    assert main(["sample", str(demo_full), "--backend", "ort", "--precision", "bf16"]) == 2
    assert "--precision is an option of the torch backend" in capsys.readouterr().err


def test_bad_options_and_old_folders_get_clear_errors(demo_full, tmp_path):
    art = load_artifact(demo_full)
    with pytest.raises(TcgraphError, match=r"unknown precision 'int8' for the torch backend; use one of fp32, bf16, "
                                           r"fp16 \(the same words as the TensorRT engine precision\)"):
        TorchRunner(art, precision="int8")
    with pytest.raises(TcgraphError, match=r"unknown options \['dtype'\]; valid options: device, precision"):
        TorchRunner(art, dtype="bfloat16")  # the old word
    with pytest.raises(TcgraphError, match="CUDA graphs need device 'cuda'"):
        TorchRunner(art, device="cpu", cuda_graphs=True)
    with pytest.raises(TcgraphError, match="runs on 'cpu' or 'cuda'"):
        TorchRunner(art, device="mps")
    if not CUDA:
        with pytest.raises(TcgraphError, match="sees no CUDA GPU"):
            TorchRunner(art, device="cuda").activate()
    # A folder written before torch programs existed: say so and what to do; ort still runs it.
    import shutil

    old = tmp_path / "old"
    shutil.copytree(demo_full, old)
    manifest = json.loads((old / "manifest.json").read_text())
    programs = manifest.pop("programs")
    (old / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(TcgraphError, match=r"has no torch programs .*re-run `tcgraph transform` with this tcgraph "
                                           r"to write a folder the torch backend can read, or use --backend ort"):
        TorchRunner(load_artifact(old, verify_hashes=False)).activate()
    with make_runner("ort", load_artifact(old, verify_hashes=False)) as runner:
        assert runner.variant_ids() == ["v0"]
    # ... or before the parameter map existed
    manifest["programs"] = programs
    del manifest["parameters"]
    (old / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(TcgraphError, match="does not map the model's parameters.*re-run `tcgraph transform`"):
        TorchRunner(load_artifact(old, verify_hashes=False)).activate()
    # A parameter map that points past the end of weights.bin (hashes not checked): damaged folder.
    manifest["parameters"] = json.loads((demo_full / "manifest.json").read_text())["parameters"]
    first = next(iter(manifest["parameters"]))
    manifest["parameters"][first] = dict(manifest["parameters"][first], offset=10**12)
    (old / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(TcgraphError, match="the folder is damaged"):
        TorchRunner(load_artifact(old, verify_hashes=False)).activate()


# ---------------------------------------------------------------- CUDA (skipped without a GPU)


def _eager_autocast_bf16(model, settings, labels):
    @torch.no_grad()
    def step(_i, x, t, y):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return model(x, t, y).float()

    noise = make_noise(len(labels), model.config.in_channels, settings.resolution, 0)
    return run_batches(step, lambda: None, sampler_for(settings, model.config), labels, noise,
                           settings.batch, 0, device="cuda")


@needs_cuda
@pytest.mark.parametrize("graphs", [True, False], ids=["cuda-graphs", "eager"])
def test_cuda_bf16_matches_eager_pytorch_on_the_gpu(demo_full, graphs):
    model = load_model("digits").cuda()
    art = load_artifact(demo_full)
    labels = [0, 3, 5, 8]
    ref = _eager_autocast_bf16(model, art.plan.settings, labels)
    got, _ = api.sample(demo_full, classes=labels, per_class=1, backend="torch", device="cuda",
                        runner_options={"cuda_graphs": graphs}, progress=False)
    assert psnr(got, ref) >= MIN_PSNR["bf16"]


@needs_cuda
def test_cuda_graph_caches_stay_in_the_bank(mixed):
    _, plan, path = mixed
    with make_runner("torch", load_artifact(path), device="cuda", precision="fp32") as runner:
        dispatch = ScheduleDispatcher.for_plan(runner, plan)
        cfg = _cfg(runner.artifact)
        out = sampler_for(plan.settings, cfg).sample(dispatch, make_noise(2, cfg.in_channels, 8, 0).cuda(),
                                                         torch.tensor([1, 2], device="cuda"))
        assert out.is_cuda
        assert all(v.data_ptr() == runner._bank[n].data_ptr() for n, v in dispatch.caches.items())
    eager, _ = api.sample(path, classes=[1, 2], per_class=1, backend="torch", progress=False)
    graphed, _ = api.sample(path, classes=[1, 2], per_class=1, backend="torch", device="cuda",
                            runner_options={"precision": "fp32"}, progress=False)
    assert torch.allclose(graphed, eager, rtol=1e-3, atol=1e-2)  # TF32 matmuls may differ slightly


@needs_cuda
def test_no_host_copies_inside_the_sampling_loop(demo_full):
    """Profiled sampling loop (runner already active): one host->device copy of the noise and
    one of the labels per run, one device->host copy of the final sample, nothing per step."""
    from torch.profiler import ProfilerActivity, profile

    art = load_artifact(demo_full)
    plan = art.plan
    cfg = _cfg(art)
    labels = [0, 1, 2, 3, 4, 5, 6, 7]  # two runs of batch 4
    with make_runner("torch", art, device="cuda") as runner:
        dispatch = ScheduleDispatcher.for_plan(runner, plan)
        noise = make_noise(len(labels), cfg.in_channels, plan.settings.resolution, 0)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            run_batches(dispatch, dispatch.reset, sampler_for(plan.settings, cfg), labels, noise,
                            plan.settings.batch, 0, device=runner.device)
            torch.cuda.synchronize()
    names = [e.name for e in prof.events()]
    dtoh = [n for n in names if "Memcpy DtoH" in n]
    htod = [n for n in names if "Memcpy HtoD" in n]
    assert len(dtoh) == 2, dtoh  # the final samples of the two runs
    assert len(htod) <= 4, htod  # noise and labels of each run, never per step (10 steps)


def test_variants_share_one_copy_of_the_weights(mixed):
    """Weights once: every variant program reads the same (cast) model tensors."""
    model, _, path = mixed
    with TorchRunner(load_artifact(path), precision="bf16") as runner:
        programs = list(runner._programs.values())
        where: dict[str, set[int]] = {}
        for program in programs:
            for name, p in program.weights.items():
                where.setdefault(name, set()).add(p.data_ptr())
                if p.is_floating_point():
                    assert p.dtype == torch.bfloat16
        assert len(programs) == 4
        assert set(model.state_dict()) <= set(where)  # every model tensor is read by some variant
        assert all(len(where[name]) == 1 for name in model.state_dict())


def test_injected_programs_run_as_given(mixed):
    """Polygraphy-style loaders: the runner runs whatever programs it is handed."""
    _, plan, path = mixed
    art = load_artifact(path)
    real = ProgramsFromArtifact(art)()
    calls = []

    def spy(vid):
        def program(*inputs):
            calls.append(vid)
            return real[vid](*inputs)
        return program

    with make_runner("torch", art, programs={vid: spy(vid) for vid in real}) as runner:
        dispatch = ScheduleDispatcher.for_plan(runner, plan)
        sampler_for(plan.settings, _cfg(art)).sample(dispatch, make_noise(2, _cfg(art).in_channels, 8, 0),
                                                     torch.tensor([1, 2]))
    assert calls == plan.schedule()
    with pytest.raises(TcgraphError, match=r"got no program for variants \['v3'\]"):
        make_runner("torch", art, programs={vid: real[vid] for vid in ("v0", "v1", "v2")}).activate()


@pytest.mark.slow
def test_torch_compile_gives_the_same_samples(mixed):
    """`compile=True` (inductor; on the CPU it builds C++ kernels): same samples as eager."""
    _, _, path = mixed
    eager, _ = api.sample(path, classes=[1, 4], per_class=1, seed=3, backend="torch", progress=False)
    compiled, _ = api.sample(path, classes=[1, 4], per_class=1, seed=3, backend="torch",
                             runner_options={"compile": True}, progress=False)
    assert torch.allclose(compiled, eager, rtol=1e-4, atol=1e-3), (compiled - eager).abs().max()


def test_low_precision_keeps_a_float_timestep_in_float32(tmp_path):
    """Under a flow-matching scheduler t is a float32 graph input (e.g. 999.6); the bf16 runner casts
    x, weights and caches to bf16 but not t, which bf16 would round (999.0 and 999.6 both to 1000)."""
    settings = SamplerSettings(sampler="diffusers", scheduler={"_class_name": "FlowMatchEulerDiscreteScheduler"},
                               num_steps=2, cfg_scale=1.0, batch=2, resolution=8)
    model = randomize_weights(build_model(make_config("DiT-S/2", input_size=8, depth=1, hidden_size=32, num_heads=2,
                                                      in_channels=2, num_classes=5, learn_sigma=False)), std=0.05)
    plan = Plan("full", settings, (Recipe.uniform(1, COMPUTE, BRANCHES),) * 2, model.config.num_tokens)
    art = load_artifact(api.transform(model, plan, tmp_path / "art", progress=False))
    x, y = torch.randn(2, 2, 8, 8), torch.tensor([1, 2])
    with make_runner("torch", art, precision="bf16") as runner:
        a, b = (runner.run("v0", {"x": x, "t": torch.full((2,), v), "y": y})["out"] for v in (999.0, 999.6))
    assert not torch.equal(a, b)
