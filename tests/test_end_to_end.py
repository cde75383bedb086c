"""model -> plan -> rewritten graphs -> ONNX -> ONNX Runtime dispatcher, against eager PyTorch."""
import pytest
import torch

from tcgraph import api
from tcgraph.export.artifact import load_artifact
from tcgraph.models.official.dit import DiT, make_config, randomize_weights
from tcgraph.plan import make_plan
from tcgraph.sampling import SamplerSettings, sampler_for
from tcgraph.passes import reference_step
from tcgraph.runtime.dispatch import ScheduleDispatcher


def settings_for(model, steps, batch=2, cfg=2.0):
    return SamplerSettings(num_steps=steps, cfg_scale=cfg, batch=batch, resolution=model.config.input_size)


def ort_samples(path, labels, seed=0):
    samples, got_labels = api.sample(path, classes=labels, per_class=1, seed=seed, progress=False)
    assert got_labels == labels
    return samples


def test_full_plan_ort_equals_eager_on_tiny_model(tiny_model, tmp_path):
    s = settings_for(tiny_model, steps=8, batch=3)
    path = api.transform(tiny_model, make_plan("full", tiny_model.config, s), tmp_path / "a", progress=False)
    labels = [0, 1, 2, 3, 4]  # two runs of 3, the second padded
    eager = api.sample_eager(tiny_model, s, labels, seed=0)
    got = ort_samples(path, labels)
    assert got.shape == eager.shape == (5, 2, 8, 8)
    assert (got - eager).abs().max().item() <= 1e-3


@pytest.mark.slow
def test_full_plan_ort_equals_eager_dit_s2_shapes(tmp_path):
    """DiT-S/2 shapes (256 tokens, hidden 384, 12 blocks), random weights, few steps."""
    torch.manual_seed(0)
    model = randomize_weights(DiT(make_config("DiT-S/2", class_dropout_prob=0.1)))
    s = settings_for(model, steps=3, batch=1)
    path = api.transform(model, make_plan("full", model.config, s), tmp_path / "s2", progress=False)
    eager = api.sample_eager(model, s, [7], seed=1)
    got = ort_samples(path, [7], seed=1)
    assert (got - eager).abs().max().item() <= 1e-3


@pytest.mark.parametrize("spec", ["fora:2", "fora:3"])
def test_fora_each_ort_step_equals_eager_reference(tiny_model, tmp_path, spec):
    """Every step of the ORT dispatcher equals the eager reference of the same recipe (<= 1e-4)."""
    s = settings_for(tiny_model, steps=7)
    plan = make_plan(spec, tiny_model.config, s)
    path = api.transform(tiny_model, plan, tmp_path / "f", progress=False)
    art = load_artifact(path)
    assert len(art.variants) == 2
    runner = api.make_runner("ort", art)
    ref_caches: dict = {}
    worst = []
    with runner:
        dispatch = ScheduleDispatcher.for_plan(runner, plan)

        def step(i, x, t, y):
            got = dispatch(i, x, t, y)
            ref, fresh = reference_step(tiny_model, x, t, y, plan.recipes[i], ref_caches)
            ref_caches.update(fresh)
            worst.append((got - ref).abs().max().item())
            return ref  # follow the reference trajectory so each step is compared on equal inputs

        sampler = sampler_for(s, tiny_model.config)
        sampler.sample(step, torch.randn(2, 2, 8, 8), torch.tensor([1, 4]))
    assert dispatch.calls == plan.schedule()
    assert len(worst) == 7 and max(worst) <= 1e-4, worst


def test_fora_samples_differ_from_full_but_stay_close(tiny_model, tmp_path):
    s = settings_for(tiny_model, steps=6)
    full = api.transform(tiny_model, make_plan("full", tiny_model.config, s), tmp_path / "full", progress=False)
    fora = api.transform(tiny_model, make_plan("fora:2", tiny_model.config, s), tmp_path / "fora", progress=False)
    a, b = ort_samples(full, [0, 1]), ort_samples(fora, [0, 1])
    diff = (a - b).abs().max().item()
    assert 1e-4 < diff < 10 * a.abs().max().item()


def test_one_weights_file_whatever_the_variant_count(tiny_model, tmp_path):
    s = settings_for(tiny_model, steps=6)
    params = sum(p.numel() * 4 for p in tiny_model.parameters())
    sizes = {}
    for spec in ("full", "fora:2"):
        path = api.transform(tiny_model, make_plan(spec, tiny_model.config, s), tmp_path / spec.replace(":", ""),
                             progress=False)
        assert [p.relative_to(path).as_posix() for p in path.rglob("*.bin")] == ["variants/weights.bin"]
        sizes[spec] = (path / "variants" / "weights.bin").stat().st_size
    assert sizes["fora:2"] <= 1.05 * sizes["full"] and sizes["full"] <= 1.05 * params


def test_full_plan_ort_equals_eager_on_demo_model(tmp_path):
    """The committed demo model, DDIM 10 with guidance 2: final samples agree to <= 1e-3."""
    model = api.load_dit("digits")
    s = settings_for(model, steps=10, batch=4)
    path = api.transform(model, make_plan("full", model.config, s), tmp_path / "digits", progress=False)
    labels = [3, 1, 4, 1, 5, 9]
    eager = api.sample_eager(model, s, labels, seed=2)
    got = ort_samples(path, labels, seed=2)
    assert (got - eager).abs().max().item() <= 1e-3


def test_api_reports_every_phase_through_one_progress_interface(tiny_model, tmp_path):
    """transform and sample take a Progress (or a bool for bars): planning, rewriting, export and
    sampling each open one phase and tick once per item of it."""
    from tcgraph.progress import Recorder

    rec = Recorder()
    path = api.transform(tiny_model, "fora:2", tmp_path / "a", steps=4, batch=2, progress=rec)
    phases = {desc: (total, len(ticks)) for desc, total, ticks in rec.phases}
    assert phases["rewrite"] == (2, 2)  # one tick per variant
    assert phases["export"][0] == phases["export"][1] >= 2
    rec = Recorder()
    api.sample(path, classes=[0, 1, 2], per_class=1, progress=rec)
    assert [(d, t, len(k)) for d, t, k in rec.phases] == [("sample", 2 * 4, 2 * 4)]  # 2 runs of 4 steps
