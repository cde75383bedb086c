"""Respacing, the DDIM update and classifier-free guidance, checked against by-hand values."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tcgraph.errors import TcgraphError
from tcgraph.sampling import DDIMSampler, DDIMSchedule, guided_eps, linear_betas, make_noise, space_timesteps



def base_alphas_cumprod() -> np.ndarray:
    """DiT's training schedule, written out: 1000 linear betas from 1e-4 to 0.02."""
    betas = np.linspace(0.0001, 0.02, 1000, dtype=np.float64)
    return np.cumprod(1.0 - betas)


#################################################################################
#                                  Respacing                                    #
#################################################################################


def test_space_timesteps_ddim_stride():
    assert space_timesteps(1000, "ddim50") == list(range(0, 1000, 20))
    assert space_timesteps(1000, "ddim20") == list(range(0, 1000, 50))


def test_space_timesteps_one_section():
    # ADM: one section of 1000 timesteps, fractional stride (1000 - 1) / (50 - 1), rounded.
    want = [round(i * 999 / 49) for i in range(50)]
    assert want[0] == 0 and want[-1] == 999
    assert space_timesteps(1000, "50") == want
    assert space_timesteps(1000, 50) == want
    assert space_timesteps(1000, "2") == [0, 999]


def test_space_timesteps_sections():
    # 10 timesteps in two sections of 5: 2 steps from [0, 5), 3 steps from [5, 10).
    assert space_timesteps(10, "2,3") == [0, 4, 5, 7, 9]
    assert space_timesteps(10, [2, 3]) == [0, 4, 5, 7, 9]


@pytest.mark.parametrize("spec", ["abc", "ddim", "", "0", "ddim999", "2000", "10,x"])
def test_space_timesteps_bad_spec(spec):
    with pytest.raises(TcgraphError):
        space_timesteps(1000, spec)


def test_linear_betas_match_dit():
    np.testing.assert_array_equal(linear_betas(1000), np.linspace(0.0001, 0.02, 1000))


@pytest.mark.parametrize("spec", ["50", "ddim50", "25", "ddim20"])
def test_respaced_alphas_cumprod_are_the_base_values_at_kept_steps(spec):
    base = base_alphas_cumprod()
    sched = DDIMSchedule.make(spec)
    kept = space_timesteps(1000, spec)
    assert sched.timesteps.tolist() == kept
    np.testing.assert_array_equal(sched.alphas_cumprod, base[kept])
    # ADM builds the respaced process from betas 1 - abar[k_i] / abar[k_{i-1}]; chained,
    # they give back the kept alpha-bars.
    new_betas, last = [], 1.0
    for k in kept:
        new_betas.append(1 - base[k] / last)
        last = base[k]
    np.testing.assert_allclose(np.cumprod(1 - np.array(new_betas)), base[kept], rtol=1e-12)
    assert sched.alphas_cumprod_prev[0] == 1.0
    np.testing.assert_array_equal(sched.alphas_cumprod_prev[1:], base[kept][:-1])


#################################################################################
#                                  DDIM update                                  #
#################################################################################


def half_x(_step, x, _t, _y):
    return 0.5 * x


def test_eta0_two_steps_by_hand():
    base = base_alphas_cumprod()
    x = torch.tensor([[[[1.0, -2.0], [0.5, 3.0]]]], dtype=torch.float64)  # (1, 1, 2, 2)
    y = torch.tensor([0])
    sampler = DDIMSampler(num_steps=2, eta=0.0, in_channels=1)
    got = sampler.sample(half_x, x, y)

    # Two steps: t = 999 then t = 0; after t = 0 the "previous" alpha-bar is 1.
    ref = x.clone()
    for a, a_prev in [(base[999], base[0]), (base[0], 1.0)]:
        eps = 0.5 * ref
        x0 = (ref - math.sqrt(1 - a) * eps) / math.sqrt(a)
        ref = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * eps
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    assert got.dtype == torch.float64


def test_eta_positive_is_seeded_and_differs_from_eta0():
    noise = make_noise(2, 1, 4, seed=0)
    y = torch.tensor([0, 1])
    stoch = DDIMSampler(num_steps=5, eta=0.5, in_channels=1)
    a = stoch.sample(half_x, noise, y, generator=torch.Generator().manual_seed(7))
    b = stoch.sample(half_x, noise, y, generator=torch.Generator().manual_seed(7))
    c = stoch.sample(half_x, noise, y, generator=torch.Generator().manual_seed(8))
    det = DDIMSampler(num_steps=5, eta=0.0, in_channels=1).sample(half_x, noise, y)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    assert not torch.allclose(a, det)
    assert torch.isfinite(a).all() and a.dtype == noise.dtype


def test_eta1_stays_real():
    noise = make_noise(2, 1, 4, seed=0)
    got = DDIMSampler(num_steps=50, eta=1.0, in_channels=1).sample(
        half_x, noise, torch.tensor([0, 1]), generator=torch.Generator().manual_seed(0))
    assert got.dtype == torch.float32 and torch.isfinite(got).all()


def test_step_fn_sees_steps_in_order_and_original_timesteps_descending():
    calls = []

    def record(step, x, t, y):
        calls.append((step, t.tolist()))
        return torch.zeros_like(x)

    sampler = DDIMSampler(num_steps="ddim20", in_channels=1)
    sampler.sample(record, make_noise(3, 1, 4, seed=0), torch.tensor([0, 1, 2]))
    assert [s for s, _ in calls] == list(range(20))
    assert [t for _, t in calls] == [[k] * 3 for k in range(950, -1, -50)]


#################################################################################
#                          Classifier-free guidance                             #
#################################################################################


def test_cfg_batches_labels_then_null_class():
    seen = {}

    def record(step, x, t, y):
        seen.setdefault("x", x.clone())
        seen.setdefault("t", t.clone())
        seen.setdefault("y", y.clone())
        return torch.zeros_like(x)

    noise = make_noise(3, 1, 4, seed=0)
    sampler = DDIMSampler(num_steps=4, cfg_scale=4.0, in_channels=1, null_class=10)
    assert sampler.model_batch(3) == 6
    sampler.sample(record, noise, torch.tensor([1, 2, 3]))
    assert seen["x"].shape == (6, 1, 4, 4)
    assert torch.equal(seen["x"][:3], noise) and torch.equal(seen["x"][3:], noise)
    assert seen["y"].tolist() == [1, 2, 3, 10, 10, 10]
    assert seen["t"].tolist() == [999] * 6


def test_no_cfg_at_scale_one():
    sizes = []
    DDIMSampler(num_steps=3, cfg_scale=1.0, in_channels=1).sample(
        lambda s, x, t, y: sizes.append(x.shape[0]) or torch.zeros_like(x),
        make_noise(2, 1, 4, seed=0), torch.tensor([0, 1]))
    assert sizes == [2, 2, 2]


def test_guided_eps_scale_one_is_the_conditional_half():
    g = torch.Generator().manual_seed(0)
    out = torch.randn(6, 4, 8, 8, generator=g)
    assert (guided_eps(out, 4, 1.0) - out[:3]).abs().max() <= 1e-6


def test_guided_eps_by_hand():
    g = torch.Generator().manual_seed(0)
    out = torch.randn(4, 3, 2, 2, generator=g, dtype=torch.float64)
    s = 2.5
    want = torch.empty(2, 3, 2, 2, dtype=torch.float64)
    for n in range(2):
        cond, uncond = out[n], out[n + 2]
        want[n] = uncond + s * (cond - uncond)
    torch.testing.assert_close(guided_eps(out, 3, s), want, rtol=0, atol=1e-12)


def test_learn_sigma_channels_are_ignored():
    g = torch.Generator().manual_seed(0)
    out = torch.randn(4, 6, 2, 2, generator=g)  # C = 3 eps channels + 3 variance channels
    other = out.clone()
    other[:, 3:] = torch.randn(4, 3, 2, 2, generator=g)
    assert guided_eps(out, 3, 3.0).shape == (2, 3, 2, 2)
    assert torch.equal(guided_eps(out, 3, 3.0), guided_eps(other, 3, 3.0))

    def with_sigma(step, x, t, y):
        return torch.cat([0.5 * x, torch.full_like(x, 1e6)], dim=1)

    noise = make_noise(2, 3, 4, seed=1)
    y = torch.tensor([0, 1])
    for cfg in (1.0, 3.0):
        sampler = DDIMSampler(num_steps=3, cfg_scale=cfg, in_channels=3, null_class=2)
        assert torch.equal(sampler.sample(with_sigma, noise, y), sampler.sample(half_x, noise, y))


def test_guided_sampling_by_hand():
    # eps depends on the label so that guidance changes the result: eps = 0.5 x + 0.1 y.
    def label_eps(step, x, t, y):
        return 0.5 * x + 0.1 * y.to(x.dtype).view(-1, 1, 1, 1)

    base = base_alphas_cumprod()
    noise = make_noise(2, 1, 2, seed=3).double()
    y = torch.tensor([1, 4])
    null, s = 9, 3.0
    got = DDIMSampler(num_steps=2, cfg_scale=s, in_channels=1, null_class=null).sample(label_eps, noise, y)

    ref = noise.clone()
    for a, a_prev in [(base[999], base[0]), (base[0], 1.0)]:
        cond = 0.5 * ref + 0.1 * y.double().view(-1, 1, 1, 1)
        uncond = 0.5 * ref + 0.1 * null
        eps = uncond + s * (cond - uncond)
        x0 = (ref - math.sqrt(1 - a) * eps) / math.sqrt(a)
        ref = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * eps
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kwargs", [
    {"eta": -0.1}, {"eta": 1.5}, {"eta": float("nan")},
    {"cfg_scale": 0.5}, {"cfg_scale": -1.0}, {"cfg_scale": float("nan")},
])
def test_bad_eta_or_guidance(kwargs):
    with pytest.raises(TcgraphError):
        DDIMSampler(num_steps=10, **kwargs)


def test_make_noise_is_seeded():
    assert torch.equal(make_noise(2, 1, 4, seed=5), make_noise(2, 1, 4, seed=5))
    assert not torch.equal(make_noise(2, 1, 4, seed=5), make_noise(2, 1, 4, seed=6))


#################################################################################
#                              Clipping x0                                      #
#################################################################################


def test_clipped_two_steps_by_hand():
    """clip_denoised: x0 clamped to [-1, 1], eps re-derived from it, at every step."""
    base = base_alphas_cumprod()
    x = torch.tensor([[[[1.0, -2.0], [0.5, 3.0]]]], dtype=torch.float64)
    got = DDIMSampler(num_steps=2, eta=0.0, in_channels=1, clip_denoised=True).sample(half_x, x, torch.tensor([0]))
    ref = x.clone()
    for a, a_prev in [(base[999], base[0]), (base[0], 1.0)]:
        eps = 0.5 * ref
        x0 = ((ref - math.sqrt(1 - a) * eps) / math.sqrt(a)).clamp(-1, 1)
        eps = (ref - math.sqrt(a) * x0) / math.sqrt(1 - a)
        ref = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * eps
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    # the last step lands on x0 itself (a_prev = 1): clipped samples stay in [-1, 1], unclipped do not
    assert got.abs().max() <= 1.0
    plain = DDIMSampler(num_steps=2, eta=0.0, in_channels=1).sample(half_x, x, torch.tensor([0]))
    assert plain.abs().max() > 1.5


def test_clip_x0_default_follows_the_model_space():
    from tcgraph.models.official.dit import make_config
    from tcgraph.sampling import SamplerSettings, is_pixel_space, sampler_for

    digits, latent = make_config("digits"), make_config("DiT-S/2")
    assert is_pixel_space(digits) and not is_pixel_space(latent)
    assert not is_pixel_space(make_config("digits", in_channels=2))  # a random test model: latent unless told
    assert sampler_for(SamplerSettings(), digits).clip_denoised is True
    assert sampler_for(SamplerSettings(), latent).clip_denoised is False
    assert sampler_for(SamplerSettings(clip_x0=False), digits).clip_denoised is False
    assert sampler_for(SamplerSettings(clip_x0=True), latent).clip_denoised is True


def test_clip_x0_must_be_a_bool_or_none():
    from tcgraph.errors import UsageError
    from tcgraph.sampling import SamplerSettings

    with pytest.raises(UsageError, match=r"clip_x0 \(--clip-x0\) must be True, False or None.*got 'yes'"):
        SamplerSettings(clip_x0="yes")


def test_clip_x0_survives_the_plan_json():
    from tcgraph.models.official.dit import make_config
    from tcgraph.plan import Plan, make_plan
    from tcgraph.sampling import SamplerSettings

    cfg = make_config("digits")
    for clip in (None, True, False):
        plan = make_plan("fora:2", cfg, SamplerSettings(num_steps=6, clip_x0=clip))
        assert Plan.from_json(plan.to_json()).settings.clip_x0 is clip
    # a plan written before the setting existed takes the model's default
    d = make_plan("full", cfg, SamplerSettings(num_steps=6)).to_dict()
    del d["settings"]["clip_x0"]
    assert Plan.from_dict(d).settings.clip_x0 is None
