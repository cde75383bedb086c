"""A FLUX model wrapped in bf16, and its token plan run in bf16 through the torch runner (CPU).

The single blocks' fused output projection is split in two when FLUX is wrapped
(tcgraph.models.diffusers.flux_blocks). The halves used to be new float32 Linears on the CPU,
whatever the model's dtype and device: a bf16 model became a mixed one, a `full` run silently
computed the single blocks' outputs in float32, and a token plan failed where the partial
attention scattered its float32 rows into a bf16 cache ("Index put requires the source and
destination dtypes match"). The halves now keep the fused weight's dtype and device.

The in-memory torch-backend path is benchmarks/gpu/flux.py's (bench_gpu.py --family flux): the
plan's variants rewritten in memory, run by `TorchRunner` with `programs=`. The bf16 run is held
against the float32 run of the same weights, with eager bf16's own distance from eager float32
as the yardstick of what bf16 costs.
"""
from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch

from tcgraph.models.diffusers.flux import wrap
from tcgraph.sampling import make_noise, run_batches, sampler_for
from tests.models.flux_tiny import tiny_config, tiny_diffusers

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from gpu import flux as bench_flux  # noqa: E402

STEPS, TEXT_LENGTH, SEED = 4, 8, 0


def _wrapped(dtype: torch.dtype):
    """The tiny FLUX of tests/models/flux_tiny.py (the same weights for every dtype), in `dtype`, wrapped,
    every Linear casting its input to its weight's dtype."""
    config = tiny_config()
    return bench_flux.cast_linear_inputs(wrap(tiny_diffusers(config, SEED).to(dtype), config))


def test_wrapping_keeps_the_dtype_of_the_split_projections():
    config = tiny_config()
    fused = tiny_diffusers(config, SEED).to(torch.bfloat16)
    weights = [b.proj_out.weight.detach().clone() for b in fused.single_transformer_blocks]
    model = wrap(fused, config)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    d = config.hidden_size
    for block, weight in zip(model.single_transformer_blocks, weights):
        assert torch.equal(block.attn.proj_out.weight, weight[:, :d])  # the halves are the fused columns, exactly
        assert torch.equal(block.mlp.proj_out.weight, weight[:, d:])


@pytest.fixture(scope="module")
def runs():
    """Samples of eager and of the token plan, in float32 and in bf16: {(what, dtype): samples}."""
    torch.manual_seed(0)
    out = {}
    for dtype in ("float32", "bfloat16"):
        model = _wrapped(getattr(torch, dtype))
        cfg = model.config
        settings = bench_flux.flux_settings(cfg, STEPS, 1, 3.5, TEXT_LENGTH)
        plan = bench_flux.token_plan(model, settings, 2)
        sampler = sampler_for(settings, cfg)
        text = bench_flux.flux_text(cfg, 1, TEXT_LENGTH, SEED)
        noise = make_noise(1, cfg.in_channels, cfg.input_size, SEED)
        cpu = torch.device("cpu")
        sessions = {"eager": bench_flux.eager_session(model, cpu, getattr(torch, dtype)),
                    "tokens": bench_flux.runner_session("torch", model, copy.deepcopy(plan), cpu, dtype)}
        for what, session in sessions.items():
            with session as (step_fn, reset, device):
                out[what, dtype] = run_batches(step_fn, reset, sampler, text, noise, 1, SEED, device=device)
        out["plan"] = plan
    return out


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def test_token_plan_in_bf16_is_a_token_plan(runs):
    plan = runs["plan"]
    assert plan.schedule() == ["v0", "v1", "v0", "v1"]
    actions = {a.kind for _, _, a in plan.recipes[1].items()}
    assert actions == {"partial", "reuse"}  # image-writing branches keep half their rows, text MLPs reuse
    assert _relative(runs["tokens", "float32"], runs["eager", "float32"]) > 0  # it caches: not eager's samples


def test_token_plan_in_bf16_matches_float32(runs):
    for key, samples in runs.items():
        if key != "plan":
            assert samples.dtype == torch.float32 and torch.isfinite(samples).all(), key
    tokens, eager = (_relative(runs[what, "bfloat16"], runs[what, "float32"]) for what in ("tokens", "eager"))
    assert 0 < eager < 0.05  # bf16 changes the samples, by a few of its epsilons (2**-8) over a few steps
    assert tokens < 2 * eager  # caching in bf16 adds no error of its own beyond bf16's
