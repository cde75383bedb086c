"""Gated steps (`adaptive`) on models of two streams: FLUX (double- and single-stream blocks, guidance an
input, pooled text) and SD3.5 (CFG doubling the batch). The indicator is the image stream out of block F - 1
(the graph picks that node by its stream tag); both paths of the decision equal the eager reference at 1e-5
with the gate after a double-stream and after a single-stream block; the planner calibrates on prompts; a
whole sampling run of the artifact, on ONNX Runtime and torch, equals the planner's own eager gate."""
from __future__ import annotations

import dataclasses

import pytest
import torch

pytest.importorskip("diffusers")

from tcgraph import api  # noqa: E402
from tcgraph.compile import check_gated, example_inputs, rewrite_gated  # noqa: E402
from tcgraph.errors import TcgraphError  # noqa: E402
from tcgraph.plan import COMPUTE, Plan, Recipe, make_plan  # noqa: E402
from tcgraph.plan.gate import FORCE_COMPUTE, Gate  # noqa: E402
from tcgraph.plan.planners.adaptive import AdaptiveConfig, EagerGate, thresholds_for  # noqa: E402
from tcgraph.sampling import SamplerSettings, make_noise, run_batches, sampler_for  # noqa: E402
from tcgraph.text.embeddings import Text  # noqa: E402
from tests.models.flux_tiny import tiny_config, tiny_diffusers  # noqa: E402

L, STEPS = 5, 8
SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}


@pytest.fixture(scope="module")
def flux():
    from tcgraph.models.diffusers.flux import wrap

    config = tiny_config(guidance_embeds=True)  # blocks 0, 1 double-stream; 2, 3 single-stream
    return wrap(tiny_diffusers(config, seed=7), config)


@pytest.fixture(scope="module")
def sd35():
    from tcgraph.models.diffusers.sd3 import DiffusersSD3
    from tests.models.test_diffusers_sd3 import SD35, tiny_sd3

    return DiffusersSD3(tiny_sd3(seed=3, **SD35))


def settings_of(model, **extra) -> SamplerSettings:
    cfg = model.config
    guidance = cfg.family.guidance_of(cfg)
    return SamplerSettings(sampler="diffusers", scheduler=SCHEDULER, num_steps=STEPS, batch=2,
                           cfg_scale=3.5 if guidance == "input" else 2.0, resolution=cfg.input_size, text_length=L,
                           pooled=True, guidance=guidance, **extra)


def gated_plan(model, gate: Gate, threshold: float) -> Plan:
    cfg = model.config
    full = Recipe.uniform(cfg.depth, COMPUTE, cfg.branches)
    recipe = dataclasses.replace(full, gate=gate)
    warmup = max(2, gate.points)  # a skip reads gate.points computed values
    thresholds = tuple(FORCE_COMPUTE if s < warmup or s == STEPS - 1 else threshold for s in range(STEPS))
    return Plan("adaptive", settings_of(model), (recipe,) * STEPS, cfg.num_tokens, gate_thresholds=thresholds,
                layout=cfg.block_layout(), carry_constants=False)


@pytest.mark.parametrize("which, gate", [("flux", Gate(1, 2, "step", 1)), ("flux", Gate(3, 2, "anchor", 0)),
                                         ("sd35", Gate(1, 3, "step", 2))])
def test_both_paths_equal_the_eager_reference(which, gate, flux, sd35):
    model = flux if which == "flux" else sd35
    plan = gated_plan(model, gate, 0.1)
    recipe = plan.recipes[0]
    step, inputs, outputs = rewrite_gated(model, recipe)
    assert (inputs, outputs) == plan.variant_io(recipe)
    feeds = example_inputs(model, plan, inputs, seed=3, recipe=recipe)
    assert check_gated(model, step, recipe, (inputs, outputs), feeds, atol=1e-5) <= 1e-5
    # the check can fail: the indicator read off the text stream instead of the image stream disagrees
    from tcgraph import compile as compile_module

    image_only = compile_module._block_output
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(compile_module, "_block_output", lambda *a: image_only(*a)[:, :1] * 0 + 1.0)
        with pytest.raises(TcgraphError, match="disagrees"):
            check_gated(model, step, recipe, (inputs, outputs), feeds, atol=1e-5)


def prompts(model, n: int, seed: int) -> Text:
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    e = lambda: torch.randn(n, L, cfg.caption_channels, generator=g)  # noqa: E731
    p = lambda: torch.randn(n, cfg.pooled_channels, generator=g)  # noqa: E731
    guided = settings_of(model).doubles_batch
    return Text(e(), torch.ones(n, L), e() if guided else None, torch.ones(n, L) if guided else None, p(),
                p() if guided else None)


def test_the_planner_calibrates_on_prompts_and_runs_equal_its_eager_gate(flux, tmp_path):
    opts = dict(first=2, max_skips=2, warmup=2, final=1, calib_images=2, order=1)
    with pytest.raises(TcgraphError, match="learning an adaptive threshold for a text-conditioned model needs calibration prompts"):
        make_plan("adaptive:0.85", flux.config, settings_of(flux), weights=flux, **opts)
    plan = make_plan("adaptive:0.85", flux.config, settings_of(flux), weights=flux, calibration_text=prompts(flux, 2, 0),
                     **opts)
    assert plan.layout == flux.config.block_layout() and len(plan.variants()) == 1 and plan.gate.first == 2
    least, most = plan.params["fraction_range"]
    assert least <= plan.params["calibrated_fraction"] <= most
    art = api.transform(flux, plan, tmp_path / "art", progress=False, check=False)  # (checked: the test above)
    text = prompts(flux, 3, 1)
    cfg, s = flux.config, plan.settings
    eager = EagerGate(flux, plan.gate, thresholds_for(s, AdaptiveConfig(fraction=0.85, **opts), plan.params["threshold"]),
                      cfg.depth)
    want = run_batches(eager, eager.reset, sampler_for(s, cfg), text, make_noise(3, cfg.in_channels, s.resolution, 4),
                       s.batch, 4)
    assert 0 < eager.skipped_total  # some steps skipped, so both paths ran
    for backend in ("ort", "torch"):
        measured = {}
        got, _ = api.sample(art, text=text, per_class=1, seed=4, backend=backend, progress=False, measured=measured)
        assert (got - want).abs().max().item() <= 1e-4, backend
        assert measured["computed_steps"] == eager.computed_total, backend


def test_the_demos_gated_step_exports(tmp_path):
    """The digits-flux demo's gated step exports to ONNX and samples (torch.export traced its paths with symbolic
    sizes, where torch.cond could not prove the output's strides equal until the paths returned flat tensors)."""
    art = api.transform("digits-flux", "adaptive:0.7", tmp_path / "art", steps=8, batch=2, progress=False,
                        plan_options=dict(calib_images=2, warmup=2, final=1, max_skips=2))
    measured = {}
    samples, _ = api.sample(art, prompts=["a handwritten seven"], per_class=2, progress=False, measured=measured)
    assert samples.shape == (2, 1, 16, 16) and bool(torch.isfinite(samples).all())
    assert 0 < measured["computed_steps"] <= measured["steps"] == 8
