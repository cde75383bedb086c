"""Samplers that run diffusers' scheduler classes: against tcgraph's DDIM and against loops
written out with diffusers' own classes, state reset between runs, timestep dtypes, the
refusals, and the scheduler config's round trip through plan.json."""
from __future__ import annotations

import json
import re
from dataclasses import asdict

import numpy as np
import pytest
import torch

from tcgraph.errors import TcgraphError, UsageError
from tcgraph.sampling import (
    DDIMSampler,
    DiffusersSampler,
    SamplerSettings,
    linear_betas,
    make_noise,
    sampler_for,
    scheduler_config_from_folder,
)

diffusers = pytest.importorskip("diffusers")

# DiT's training schedule as a diffusers DDIM config: "leading" spacing with no offset keeps
# the timesteps 0, 1000/N, ..., which is tcgraph's "ddimN" respacing; set_alpha_to_one makes
# the last step land on alpha-bar 1, as ADM's respaced process does.
DIT_DDIM = {
    "_class_name": "DDIMScheduler", "num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02,
    "beta_schedule": "linear", "clip_sample": False, "set_alpha_to_one": True, "steps_offset": 0,
    "timestep_spacing": "leading", "prediction_type": "epsilon",
}
# PixArt-alpha's scheduler, as its pipeline folder has it (lambda_min_clipped -inf dropped).
PIXART_DPM = {
    "_class_name": "DPMSolverMultistepScheduler", "algorithm_type": "dpmsolver++", "beta_end": 0.02,
    "beta_schedule": "linear", "beta_start": 0.0001, "lower_order_final": True, "num_train_timesteps": 1000,
    "prediction_type": "epsilon", "solver_order": 2, "solver_type": "midpoint", "steps_offset": 0,
    "thresholding": False, "timestep_spacing": "linspace", "use_karras_sigmas": False, "variance_type": None,
}
SD3_FLOW = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}

C, NULL = 2, 5  # eps channels of the fake model (it also outputs C variance channels), null class
ABAR = torch.from_numpy(np.cumprod(1 - linear_betas()))
CLASS_MEAN = torch.linspace(-1.0, 1.0, NULL + 1)


def gaussian_eps(step, x, t, y):
    """The exact epsilon of data N(mean_y, 0.25) under DiT's schedule: bounded samples that
    depend on t and y (so guidance matters), plus learn_sigma channels that must be dropped."""
    a = ABAR[t.long()].to(x.dtype)[:, None, None, None]
    mean = CLASS_MEAN[y].to(x.dtype)[:, None, None, None]
    eps = (1 - a).sqrt() * (x - a.sqrt() * mean) / (0.25 * a + 1 - a)
    return torch.cat([eps, torch.full_like(eps, 1e3)], dim=1)


def velocity(step, x, t, y):
    """A flow model's velocity that depends on x, the float t and y."""
    mean = CLASS_MEAN[y].to(x.dtype)[:, None, None, None]
    v = torch.tanh(x) - mean * (t.to(x.dtype) / 1000)[:, None, None, None]
    return torch.cat([v, torch.zeros_like(v)], dim=1)


def reference_loop(config, num_steps, step_fn, noise, y, cfg_scale, **set_timesteps):
    """What a diffusers pipeline does, written out with the scheduler class itself."""
    scheduler = getattr(diffusers, config["_class_name"]).from_config(config)
    scheduler.set_timesteps(num_steps, **set_timesteps)
    x = noise
    for t in scheduler.timesteps:
        xin = torch.cat([x, x])
        tin = t.expand(2 * x.shape[0])
        yin = torch.cat([y, torch.full_like(y, NULL)])
        out = step_fn(0, xin, tin, yin)[:, :C]
        cond, uncond = out.chunk(2)
        x = scheduler.step(uncond + cfg_scale * (cond - uncond), t, x).prev_sample
    return x


@pytest.fixture
def noise():
    return make_noise(3, C, 4, seed=0)


Y = torch.tensor([0, 2, 4])


#################################################################################
#                                    DDIM                                       #
#################################################################################


@pytest.mark.parametrize("steps", [20, 50])
@pytest.mark.parametrize("cfg_scale", [1.0, 4.0])
def test_diffusers_ddim_matches_tcgraph_ddim_on_stride_respacing(noise, steps, cfg_scale):
    ours = DDIMSampler(f"ddim{steps}", cfg_scale=cfg_scale, in_channels=C, null_class=NULL)
    theirs = DiffusersSampler(DIT_DDIM, steps, cfg_scale=cfg_scale, in_channels=C, null_class=NULL)
    np.testing.assert_array_equal(theirs.schedule.timesteps, ours.schedule.timesteps)
    a, b = ours.sample(gaussian_eps, noise, Y), theirs.sample(gaussian_eps, noise, Y)
    # diffusers keeps its alpha-bars in float32, tcgraph in float64: ~1e-6 on values ~1..8.
    assert a.abs().max() > 0.5
    torch.testing.assert_close(b, a, rtol=0, atol=2e-5)


def test_diffusers_ddim_linspace_differs_from_adm_respacing(noise):
    # Same timesteps as tcgraph's default (ADM) respacing of 50 steps, but diffusers' DDIM
    # steps to t - 1000 // 50, not to the next kept timestep: about 1 % apart.
    ours = DDIMSampler(50, in_channels=C, null_class=NULL)
    theirs = DiffusersSampler({**DIT_DDIM, "timestep_spacing": "linspace"}, 50, in_channels=C, null_class=NULL)
    np.testing.assert_array_equal(theirs.schedule.timesteps, ours.schedule.timesteps)
    a, b = ours.sample(gaussian_eps, noise, Y), theirs.sample(gaussian_eps, noise, Y)
    rel = ((a - b).norm() / a.norm()).item()
    assert 1e-3 < rel < 5e-2
    torch.testing.assert_close(b, reference_loop({**DIT_DDIM, "timestep_spacing": "linspace"}, 50, gaussian_eps,
                                                 noise, Y, 1.0), rtol=0, atol=1e-5)


def test_step_fn_sees_steps_timesteps_and_guidance_batch(noise):
    calls = []

    def record(step, x, t, y):
        calls.append((step, t.dtype, t.tolist(), y.tolist(), x.shape[0]))
        return gaussian_eps(step, x, t, y)

    sampler = DiffusersSampler(DIT_DDIM, 4, cfg_scale=2.0, in_channels=C, null_class=NULL)
    assert sampler.num_steps == 4 and sampler.use_cfg and sampler.model_batch(3) == 6
    sampler.sample(record, noise, Y)
    assert [c[0] for c in calls] == [0, 1, 2, 3]
    assert [c[2] for c in calls] == [[t] * 6 for t in (750, 500, 250, 0)]
    assert all(c[1] == torch.int64 and c[3] == [0, 2, 4, 5, 5, 5] and c[4] == 6 for c in calls)
    order = sampler.schedule.generation_order()
    assert [int(sampler.schedule.timesteps[i]) for i in order] == [750, 500, 250, 0]


#################################################################################
#                             DPM-Solver multistep                              #
#################################################################################


def test_dpm_runs_again_from_a_fresh_state_and_matches_diffusers(noise):
    sampler = DiffusersSampler(PIXART_DPM, 10, cfg_scale=3.0, in_channels=C, null_class=NULL)
    first = sampler.sample(gaussian_eps, noise, Y)
    sampler.sample(gaussian_eps, make_noise(3, C, 4, seed=1), Y)  # leaves history behind, were it kept
    again = sampler.sample(gaussian_eps, noise, Y)
    assert torch.equal(first, again)
    torch.testing.assert_close(first, reference_loop(PIXART_DPM, 10, gaussian_eps, noise, Y, 3.0),
                               rtol=0, atol=1e-6)
    # The second-order solver is not DDIM: same model, visibly different samples.
    ddim = DiffusersSampler({**DIT_DDIM, "timestep_spacing": "linspace"}, 10, cfg_scale=3.0, in_channels=C,
                            null_class=NULL).sample(gaussian_eps, noise, Y)
    assert (first - ddim).abs().max() > 1e-3


def test_calibration_along_a_diffusers_sampler_is_consistent(tiny_model):
    from tcgraph.calibrate.trajectories import calibrate

    cfg = tiny_model.config
    s = SamplerSettings(sampler="diffusers", scheduler=PIXART_DPM, num_steps=4, cfg_scale=2.0, batch=2,
                        resolution=cfg.input_size)
    assert isinstance(sampler_for(s, cfg), DiffusersSampler)
    traj = calibrate(tiny_model, s, num_images=2)
    with torch.no_grad():
        for step in range(4):
            x, t, y = traj.model_inputs(step)
            assert t.dtype == torch.int64 and y.tolist()[2:] == [cfg.num_classes] * 2
            torch.testing.assert_close(traj.eps_of(tiny_model(x, t, y)), traj.eps[step], rtol=0, atol=1e-5)


#################################################################################
#                                 Flow matching                                 #
#################################################################################


def test_flow_match_feeds_float_timesteps_and_matches_diffusers(noise):
    seen = []

    def record(step, x, t, y):
        seen.append(t)
        return velocity(step, x, t, y)

    sampler = DiffusersSampler(SD3_FLOW, 6, cfg_scale=2.0, in_channels=C, null_class=NULL)
    got = sampler.sample(record, noise, Y)
    assert all(t.dtype == torch.float32 and t.shape == (6,) for t in seen)
    assert any(t[0] != t[0].round() for t in seen)  # fractional: nothing truncated
    want = reference_loop(SD3_FLOW, 6, velocity, noise, Y, 2.0)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert SamplerSettings(sampler="diffusers", scheduler=SD3_FLOW).timestep_dtype == torch.float32
    assert SamplerSettings().timestep_dtype == torch.int64


def test_flow_match_dynamic_shift_comes_from_the_token_count(noise):
    flux = {"_class_name": "FlowMatchEulerDiscreteScheduler", "use_dynamic_shifting": True, "base_shift": 0.5,
            "max_shift": 1.15, "base_image_seq_len": 256, "max_image_seq_len": 4096, "shift": 3.0}
    got = DiffusersSampler(flux, 5, in_channels=C, num_tokens=1024).sample(velocity, noise, Y)
    mu = 0.5 + (1.15 - 0.5) * (1024 - 256) / (4096 - 256)
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler.from_config(flux)
    scheduler.set_timesteps(5, mu=mu)
    x = noise
    for t in scheduler.timesteps:
        x = scheduler.step(velocity(0, x, t.expand(3), Y)[:, :C], t, x).prev_sample
    torch.testing.assert_close(got, x, rtol=0, atol=1e-6)
    with pytest.raises(TcgraphError, match="number of image tokens"):
        DiffusersSampler(flux, 5)


#################################################################################
#                                   Refusals                                    #
#################################################################################


@pytest.mark.parametrize("config, needle", [
    ({"_class_name": "DDPMScheduler"}, "draws fresh noise at every step"),
    ({"_class_name": "EulerAncestralDiscreteScheduler"}, "ancestral"),
    ({"_class_name": "DPMSolverSDEScheduler"}, "Brownian"),
    ({**PIXART_DPM, "algorithm_type": "sde-dpmsolver++"}, "'dpmsolver\\+\\+'"),
    ({**SD3_FLOW, "stochastic_sampling": True}, "stochastic_sampling to false"),
])
def test_stochastic_schedulers_are_refused_with_the_reason(config, needle):
    with pytest.raises(UsageError, match=needle) as e:
        SamplerSettings(sampler="diffusers", scheduler=config)
    assert "deterministic" in str(e.value)


@pytest.mark.parametrize("config, needle", [
    ({"_class_name": "UniPCMultistepScheduler"}, "UniPCMultistepScheduler is not supported; supported: DDIMScheduler"),
    ({"beta_start": 0.0001}, "no '_class_name'"),
    ({"_class_name": 3}, "no '_class_name'"),
    ("DDIMScheduler", "must be a dict"),
    ({**PIXART_DPM, "variance_type": "learned_range"}, "set variance_type to null"),
    ({**PIXART_DPM, "lambda_min_clipped": float("-inf")}, "not plain JSON"),
])
def test_unsupported_or_malformed_configs_are_refused(config, needle):
    with pytest.raises(UsageError, match=needle):
        SamplerSettings(sampler="diffusers", scheduler=config)


@pytest.mark.parametrize("config, key, value, expected", [
    (DIT_DDIM, "beta_start", -0.5, "a finite number between 0 and 1, at most beta_end"),
    (DIT_DDIM, "beta_end", 1.5, "a finite number between 0 and 1, at least beta_start"),
    (DIT_DDIM, "beta_start", 0.03, r"at most beta_end \(0.02\)"),
    (PIXART_DPM, "num_train_timesteps", 0, "an integer from 1 to 100000"),
    (PIXART_DPM, "num_train_timesteps", 10 ** 9, "an integer from 1 to 100000"),
    (PIXART_DPM, "beta_schedule", "cubic", "'linear', 'scaled_linear' or 'squaredcos_cap_v2'"),
    (PIXART_DPM, "solver_order", 7, "1, 2 or 3"),
    (PIXART_DPM, "trained_betas", [0.1, -0.2], "null or a list of num_train_timesteps numbers between 0 and 1"),
    (PIXART_DPM, "trained_betas", [0.1, 0.2], r"1000 values \(num_train_timesteps\), got 2"),
    (DIT_DDIM, "steps_offset", 1000, r"below num_train_timesteps \(1000\)"),
    (DIT_DDIM, "clip_sample", "no", "true or false"),
    (SD3_FLOW, "shift", 0, "a finite number > 0"),
    (SD3_FLOW, "shift", -1.0, "a finite number > 0"),
    ({**SD3_FLOW, "use_dynamic_shifting": True}, "base_image_seq_len", 4096, r"below max_image_seq_len \(4096\)"),
])
def test_scheduler_values_out_of_range_are_refused(config, key, value, expected):
    """Each of these made diffusers sample NaN (negative or > 1 betas) or timesteps off the training
    range (shift <= 0) without a word; a file's values name the file."""
    shown = json.dumps(value)
    with pytest.raises(UsageError, match=f"^scheduler: {key} = {re.escape(shown)}: expected {expected}"):
        SamplerSettings(sampler="diffusers", scheduler={**config, key: value})


def test_scheduler_values_are_checked_where_a_file_is_read(tmp_path, noise):
    path = tmp_path / "scheduler_config.json"
    path.write_text(json.dumps({**DIT_DDIM, "beta_start": -0.5}))
    with pytest.raises(UsageError, match=f"^{re.escape(str(path))}: beta_start = -0.5: expected a finite number"):
        scheduler_config_from_folder(tmp_path)
    path.write_text(json.dumps({**DIT_DDIM, "beta_end": float("nan")}))
    with pytest.raises(TcgraphError, match=f"^{re.escape(str(path))}: beta_end = nan is not a finite number"):
        scheduler_config_from_folder(tmp_path)
    # What the refusal prevents: diffusers' own DDIM turns negative betas into NaN samples.
    scheduler = diffusers.DDIMScheduler.from_config({**DIT_DDIM, "beta_start": -0.5})
    assert torch.isnan((1 - scheduler.alphas_cumprod).sqrt()).any()


def test_sampler_and_scheduler_must_go_together():
    with pytest.raises(UsageError, match='sampler="diffusers"'):
        SamplerSettings(scheduler=DIT_DDIM)
    with pytest.raises(UsageError, match="scheduler_config_from_folder"):
        SamplerSettings(sampler="diffusers")
    with pytest.raises(UsageError, match="eta .* must be 0"):
        SamplerSettings(sampler="diffusers", scheduler=DIT_DDIM, eta=0.5)
    with pytest.raises(UsageError, match="clip_x0 .* must be None"):
        SamplerSettings(sampler="diffusers", scheduler=DIT_DDIM, clip_x0=True)


def test_missing_diffusers_is_a_clear_error(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "diffusers", None)  # import diffusers -> ImportError
    with pytest.raises(TcgraphError, match="pip install diffusers"):
        DiffusersSampler(DIT_DDIM, 4)


#################################################################################
#                        Pipeline folders and plan.json                         #
#################################################################################


def test_scheduler_config_from_a_pipeline_folder(tmp_path):
    folder = tmp_path / "pixart" / "scheduler"
    folder.mkdir(parents=True)
    raw = {**PIXART_DPM, "_diffusers_version": "0.22.0", "lambda_min_clipped": float("-inf")}
    (folder / "scheduler_config.json").write_text(json.dumps(raw))  # -Infinity, as PixArt's file has it
    for path in (tmp_path / "pixart", folder, folder / "scheduler_config.json"):
        got = scheduler_config_from_folder(path)
        assert "lambda_min_clipped" not in got and got["_class_name"] == "DPMSolverMultistepScheduler"
    # Dropping the infinite default changes nothing: from_config restores it.
    a = DiffusersSampler(got, 8, in_channels=C, null_class=NULL).sample(gaussian_eps, make_noise(3, C, 4, 0), Y)
    b = reference_loop(raw, 8, gaussian_eps, make_noise(3, C, 4, 0), Y, 1.0)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_scheduler_config_errors(tmp_path):
    with pytest.raises(TcgraphError, match="expected a pipeline folder holding scheduler/scheduler_config.json"):
        scheduler_config_from_folder(tmp_path)
    (tmp_path / "scheduler_config.json").write_text('{"_class_name": "DDIMScheduler",')
    with pytest.raises(TcgraphError, match="cannot read .* as JSON"):
        scheduler_config_from_folder(tmp_path)
    (tmp_path / "scheduler_config.json").write_text('[1, 2]')
    with pytest.raises(TcgraphError, match="not a diffusers scheduler config"):
        scheduler_config_from_folder(tmp_path)
    (tmp_path / "scheduler_config.json").write_text(json.dumps({**PIXART_DPM, "solver_order": float("inf")}))
    with pytest.raises(TcgraphError, match="solver_order = inf is not a finite number"):
        scheduler_config_from_folder(tmp_path)
    (tmp_path / "scheduler_config.json").write_text('{"_class_name": "DDPMScheduler"}')
    with pytest.raises(UsageError, match="DDPMScheduler draws fresh noise"):
        scheduler_config_from_folder(tmp_path)


def test_settings_round_trip_through_plan_json(tiny_config, tmp_path):
    from tcgraph.export.folder import write_json
    from tcgraph.plan import make_plan
    from tcgraph.plan.plan import Plan

    given = dict(PIXART_DPM)
    s = SamplerSettings(sampler="diffusers", scheduler=given, num_steps=5, batch=2, resolution=tiny_config.input_size)
    given["solver_order"] = 3  # the settings hold their own copy
    assert s.scheduler["solver_order"] == 2
    assert SamplerSettings(**json.loads(json.dumps(asdict(s), allow_nan=False))) == s
    plan = make_plan("fora:2", tiny_config, s)
    write_json(tmp_path / "plan.json", plan.to_dict())  # as an artifact folder writes it: plain JSON only
    back = Plan.from_json((tmp_path / "plan.json").read_text())
    assert back.settings == s and back.recipes == plan.recipes
    assert hash(s) == hash(back.settings)  # the dict is left out of the hash
    # An old plan (no scheduler key) still loads, as tcgraph's DDIM.
    old = plan.to_dict()
    old["settings"] = {k: v for k, v in old["settings"].items() if k != "scheduler"}
    old["settings"]["sampler"] = "ddim"
    assert Plan.from_dict(old).settings.scheduler is None


def test_graphs_of_a_flow_match_plan_take_a_float_t(tiny_model):
    # The graphs' t is exported with the sampler's timestep dtype, so that a runner, which
    # refuses a feed of another dtype, takes the fractional flow-matching timesteps as they are.
    from tcgraph.compile import example_inputs
    from tcgraph.names import MODEL_INPUTS
    from tcgraph.plan import make_plan

    cfg = tiny_model.config
    for scheduler, dtype in ((SD3_FLOW, torch.float32), (PIXART_DPM, torch.int64)):
        s = SamplerSettings(sampler="diffusers", scheduler=scheduler, num_steps=3, batch=1, resolution=cfg.input_size)
        feeds = example_inputs(tiny_model, make_plan("full", cfg, s), list(MODEL_INPUTS))
        assert feeds["t"].dtype == dtype == sampler_for(s, cfg).timestep_dtype
