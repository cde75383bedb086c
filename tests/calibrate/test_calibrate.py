"""Calibration trajectories and the blended forward, against the sampler and the model."""
from __future__ import annotations

import pytest
import torch

from tcgraph.calibrate import Trajectories, branch_bytes, calibrate, calibration_bytes, mixed_step
from tcgraph.errors import TcgraphError
from tcgraph.passes import reference_step
from tcgraph.plan import COMPUTE, REUSE, Recipe
from tcgraph.names import cache_name
from tcgraph.sampling import SamplerSettings
from tcgraph.names import BRANCHES


def settings(cfg_scale=2.0, steps=5):
    return SamplerSettings(num_steps=steps, cfg_scale=cfg_scale, batch=2, resolution=8)


@pytest.mark.parametrize("cfg_scale", [1.0, 2.0])
def test_trajectory_replays_the_sampler(tiny_model, cfg_scale):
    traj = calibrate(tiny_model, settings(cfg_scale), num_images=5, seed=3, chunk=2)
    sampler = traj.sampler()
    order = sampler.schedule.generation_order()
    assert traj.x.shape == (5, 5, 2, 8, 8) and traj.eps.shape == traj.x.shape
    assert traj.y.min() >= 0 and traj.y.max() < tiny_model.config.num_classes
    for s in range(traj.num_steps):
        with torch.no_grad():
            out = tiny_model(*traj.model_inputs(s))
        torch.testing.assert_close(traj.eps_of(out), traj.eps[s], atol=1e-5, rtol=0)
        if s + 1 < traj.num_steps:
            nxt = sampler.ddim_update(traj.x[s], traj.eps[s], order[s], None)
            torch.testing.assert_close(nxt, traj.x[s + 1], atol=1e-5, rtol=0)
    # guidance doubles the batch with the null class as the second half
    x, t, y = traj.model_inputs(0, torch.tensor([1, 3]))
    if cfg_scale > 1:
        assert x.shape[0] == 4 and (y[2:] == tiny_model.config.num_classes).all() and (y[:2] == traj.y[[1, 3]]).all()
    else:
        assert x.shape[0] == 2


def test_memory_accounting(tiny_model):
    s = settings()
    traj = calibrate(tiny_model, s, num_images=3)
    assert traj.nbytes == calibration_bytes(tiny_model.config, s, 3)
    cfg = tiny_model.config
    assert branch_bytes(cfg, s, 3) == 5 * 6 * 2 * cfg.depth * cfg.num_tokens * cfg.hidden_size * 4


def test_split_and_bad_counts(tiny_model):
    traj = calibrate(tiny_model, settings(), num_images=4)
    train, held = traj.split(1)
    assert train.num_images == 3 and held.num_images == 1
    assert torch.equal(held.x[:, 0], traj.x[:, 3]) and torch.equal(held.y, traj.y[3:])
    with pytest.raises(TcgraphError):
        traj.split(4)
    with pytest.raises(TcgraphError, match="at least 2"):
        calibrate(tiny_model, settings(), num_images=1)


def _inputs(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    x = torch.randn(3, cfg.in_channels, 8, 8, generator=g)
    return x, torch.tensor([10, 500, 900]), torch.tensor([0, 4, cfg.num_classes])


def test_mixed_step_hard_weights_match_the_reference(tiny_model):
    x, t, y = _inputs(tiny_model)
    full_out, used = mixed_step(tiny_model, x, t, y, {}, {})
    with torch.no_grad():
        torch.testing.assert_close(full_out, tiny_model(x, t, y), atol=1e-5, rtol=0)
    caches = {k: torch.randn_like(v) for k, v in used.items()}
    recipe = Recipe(((REUSE, COMPUTE), (COMPUTE, REUSE), (REUSE, REUSE)), BRANCHES)
    weights = {cache_name(l, b): (1.0 if a.computes else 0.0) for l, b, a in recipe.items()}
    out, used = mixed_step(tiny_model, x, t, y, weights, caches)
    ref, fresh = reference_step(tiny_model, x, t, y, recipe, caches)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    for key, value in used.items():  # computed -> fresh, reused -> the cache itself
        torch.testing.assert_close(value, fresh.get(key, caches[key]), atol=1e-6, rtol=0)


def test_mixed_step_blends_and_differentiates(tiny_model):
    x, t, y = _inputs(tiny_model, 1)
    _, used = mixed_step(tiny_model, x, t, y, {}, {})
    caches = {k: torch.randn_like(v) for k, v in used.items()}
    key = cache_name(2, "mlp")  # the last branch: its fresh value does not depend on the blend
    w = torch.tensor(0.3, requires_grad=True)
    out, blended = mixed_step(tiny_model, x, t, y, {key: w}, caches)
    expected = 0.3 * used[key] + 0.7 * caches[key]
    torch.testing.assert_close(blended[key], expected, atol=1e-5, rtol=0)
    out.square().sum().backward()
    assert w.grad is not None and w.grad.abs().item() > 0
    # per-token weights (TokenCache's superposition): token rows blend independently
    wt = torch.zeros(tiny_model.config.num_tokens, 1)
    wt[:5] = 1.0
    _, tok = mixed_step(tiny_model, x, t, y, {key: wt}, caches)
    torch.testing.assert_close(tok[key][:, :5], used[key][:, :5], atol=1e-5, rtol=0)
    torch.testing.assert_close(tok[key][:, 5:], caches[key][:, 5:], atol=0, rtol=0)


def test_calibration_keeps_samples_and_the_grams_of_its_split(tiny_model):
    """With grams_at, the same pass gives the output Grams of both parts (as a second pass over
    each part would), and the trajectories do not change; the final samples are the full model's."""
    from tcgraph.plan.learning.evaluate import free_running_samples
    from tcgraph.plan.learning.forecast import output_grams
    from tcgraph.plan import make_plan

    s = settings(steps=4)
    plain = calibrate(tiny_model, s, num_images=5, seed=1)
    traj = calibrate(tiny_model, s, num_images=5, seed=1, grams_at=3)
    torch.testing.assert_close(traj.x, plain.x, atol=1e-5, rtol=0)
    torch.testing.assert_close(traj.eps, plain.eps, atol=1e-5, rtol=0)
    assert plain.grams == {} and set(traj.grams) == {(0, 3), (3, 5)}
    train, held = traj.split(2)
    assert train.output_grams() is traj.grams[(0, 3)] and held.output_grams() is traj.grams[(3, 5)]
    assert traj.output_grams() is None and traj.part(1, 3).output_grams() is None  # no Grams of other ranges
    for part in (train, held):
        kept = part.output_grams()
        again = output_grams(tiny_model, Trajectories(part.settings, part.config, part.x, part.y, part.eps))
        assert set(kept) == set(again) == {(l, b) for l in range(3) for b in ("attn", "mlp")}
        for key in kept:
            torch.testing.assert_close(kept[key], again[key], rtol=1e-4, atol=1e-6)
    full = make_plan("full", tiny_model.config, s)
    torch.testing.assert_close(held.samples, free_running_samples(tiny_model, full, held.x[0], held.y),
                               atol=1e-5, rtol=0)
    with pytest.raises(TcgraphError, match="outside"):
        calibrate(tiny_model, s, num_images=5, grams_at=6)


def test_rows_are_the_hard_token_mask(tiny_model):
    """A partial action as `Rows` gives what its 0/1 token mask gives; the MLP then runs on the kept
    rows only (the attention needs every token's keys and values, so it runs on all)."""
    from tcgraph.calibrate import Rows

    x, t, y = _inputs(tiny_model, 2)
    _, used = mixed_step(tiny_model, x, t, y, {}, {})
    caches = {k: torch.randn_like(v) for k, v in used.items()}
    kept = [0, 3, 7, 12]
    mask = torch.zeros(tiny_model.config.num_tokens, 1)
    mask[kept] = 1.0
    names = [cache_name(1, "attn"), cache_name(1, "mlp"), cache_name(2, "mlp")]
    out_mask, used_mask = mixed_step(tiny_model, x, t, y, {k: mask for k in names}, caches)
    rows_seen = []
    hook = tiny_model.blocks[1].mlp.register_forward_hook(lambda m, i, o: rows_seen.append(i[0].shape[1]))
    try:
        out_rows, used_rows = mixed_step(tiny_model, x, t, y, {k: Rows(kept) for k in names}, caches)
    finally:
        hook.remove()
    assert rows_seen == [len(kept)]
    torch.testing.assert_close(out_rows, out_mask, atol=1e-5, rtol=0)
    for k in names:
        torch.testing.assert_close(used_rows[k], used_mask[k], atol=1e-5, rtol=0)
        assert torch.equal(used_rows[k][:, [i for i in range(16) if i not in kept]],
                           caches[k][:, [i for i in range(16) if i not in kept]])
