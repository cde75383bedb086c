"""token_prune (partial actions) against the eager reference, and the reference against a
second, hand-written definition of a partial branch."""
import math
import random

import pytest
import torch
import torch.nn.functional as F
from torch.fx.passes.shape_prop import ShapeProp

from tcgraph.compile import build_variants, check_variant, example_inputs, rewrite_variant
from tcgraph.errors import TcgraphError
from tcgraph.models.official.dit import modulate
from tcgraph.passes import RewriteSpec, io_names, reference_step
from tcgraph.passes.meta import META_BLOCK, META_BRANCH
from tcgraph.plan import COMPUTE, REUSE, Action, Plan, Recipe, partial
from tcgraph.sampling import SamplerSettings
from tcgraph.names import BRANCHES

N = 16  # tokens of the tiny model (8x8 input, patch 2)
FULL = Recipe.uniform(3, COMPUTE, BRANCHES)


def settings(steps=2):
    return SamplerSettings(num_steps=steps, batch=2, cfg_scale=2.0, resolution=8)


def plan_for(recipe: Recipe) -> Plan:
    """A full step, then `recipe`: every cache `recipe` reads was filled."""
    return Plan("p", settings(2), (FULL, recipe), N)


def random_partial(rng: random.Random, k: int) -> Action:
    """k distinct token ids in random (unsorted) order: the pass must not rely on sorting."""
    return Action("partial", tuple(rng.sample(range(N), k)))


def _random_recipe(seed: int) -> Recipe:
    rng = random.Random(seed)
    choices = [COMPUTE, REUSE, "P", "P"]
    pairs = []
    for _ in range(3):
        pair = [rng.choice(choices) for _ in range(2)]
        pairs.append(tuple(random_partial(rng, rng.randint(1, N)) if a == "P" else a for a in pair))
    return Recipe(tuple(pairs), BRANCHES)


RECIPES = {
    "attn_partial": Recipe(((partial([0, 5, 9, 13]), COMPUTE), (COMPUTE, COMPUTE), (REUSE, COMPUTE)), BRANCHES),
    "mlp_partial_k1_and_n-1": Recipe(((COMPUTE, partial([7])), (REUSE, REUSE), (COMPUTE, partial(range(1, N)))), BRANCHES),
    "both_k1_n-1_all": Recipe(((partial([3]), partial(range(N - 1))), (partial(range(0, N, 2)), REUSE),
                               (COMPUTE, partial(range(N)))), BRANCHES),
    "every_branch_partial": Recipe(tuple((partial([l, l + 4]), partial([15 - l])) for l in range(3)), BRANCHES),
    **{f"random{s}": _random_recipe(s) for s in range(4)},
}


@pytest.mark.parametrize("name", list(RECIPES))
def test_partial_recipes_match_reference(tiny_model, name):
    """Every output, updated caches included, equals reference_step within 1e-4."""
    recipe = RECIPES[name]
    plan = plan_for(recipe)
    gm = rewrite_variant(tiny_model, plan, recipe)
    ins, outs = io_names(gm)
    assert (ins, outs) == plan.variant_io(recipe)
    assert all(f"cache.{l}.{b}" in outs for l, b, a in recipe.items() if a.kind == "partial")
    feeds = example_inputs(tiny_model, plan, ins, seed=len(name))
    worst = check_variant(tiny_model, gm, recipe, feeds, atol=1e-4)
    assert worst <= 1e-4
    # The updated caches really change where (and only where) tokens were recomputed.
    got = dict(zip(outs, gm(*[feeds[n] for n in ins])))
    for l, b, a in recipe.items():
        if a.kind == "partial":
            kept = torch.zeros(N, dtype=torch.bool)
            kept[list(a.indices)] = True
            old, new = feeds[f"cache.{l}.{b}"], got[f"cache.{l}.{b}"]
            assert torch.equal(new[:, ~kept], old[:, ~kept])
            assert (new[:, kept] - old[:, kept]).abs().amax(dim=-1).min() > 1e-3


def test_partial_graph_structure(tiny_model):
    """A partial attention no longer calls `attn` (only its `proj`); a partial MLP still calls
    `mlp`, on k rows; every new node carries its block and branch."""
    recipe = Recipe(((partial([1, 2]), partial([4])), (COMPUTE, COMPUTE), (REUSE, COMPUTE)), BRANCHES)
    gm = rewrite_variant(tiny_model, plan_for(recipe), recipe)
    called = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    assert "blocks.0.attn" not in called and "blocks.0.attn.proj" in called
    assert "blocks.0.mlp" in called and "blocks.1.attn" in called and "blocks.2.attn" not in called
    pruned = [n for n in gm.graph.nodes if "_prune_" in n.name]
    assert pruned and all(n.meta[META_BLOCK] == 0 and n.meta[META_BRANCH] in ("attn", "mlp") for n in pruned)
    assert {n.meta[META_BRANCH] for n in pruned} == {"attn", "mlp"}
    # The kept-token ids are constants of the module, not recomputed per call.
    assert torch.equal(gm._tcgraph_idx_0_attn, torch.tensor([1, 2]))
    # No weight was added or copied: the model's parameters minus the reused branch's.
    expected = {n for n, _ in tiny_model.named_parameters() if not n.startswith("blocks.2.attn.")}
    assert {n for n, _ in gm.named_parameters()} == expected
    assert gm.get_parameter("blocks.0.attn.qkv.weight").data_ptr() == tiny_model.blocks[0].attn.qkv.weight.data_ptr()


def test_partial_shapes_show_the_pruned_work(tiny_model):
    """fx shapes: the q projection, attention rows, proj and the MLP run on k rows;
    keys and values on all N."""
    k_attn, k_mlp = 3, 5
    recipe = Recipe(((partial(range(k_attn)), partial(range(5, 5 + k_mlp))), (COMPUTE, COMPUTE), (COMPUTE, COMPUTE)), BRANCHES)
    plan = plan_for(recipe)
    gm = rewrite_variant(tiny_model, plan, recipe)
    ins, _ = io_names(gm)
    feeds = example_inputs(tiny_model, plan, ins)
    ShapeProp(gm).propagate(*[feeds[n] for n in ins])
    shape = {n.name: tuple(n.meta["tensor_meta"].shape) for n in gm.graph.nodes if "tensor_meta" in n.meta
             and hasattr(n.meta["tensor_meta"], "shape")}
    b, d = 4, 32
    assert shape["blocks_0_attn_prune_q"] == (b, k_attn, d)  # q = u[idx] @ Wq
    assert shape["blocks_0_attn_prune_kv"] == (b, N, 2 * d)  # k, v from all tokens
    assert shape["blocks_0_attn_prune_sdpa"] == (b, 2, k_attn, d // 2)
    assert shape["blocks_0_attn_prune_proj"] == (b, k_attn, d)
    assert shape["blocks_0_mlp"] == (b, k_mlp, d)
    assert shape["blocks_0_attn_prune_scatter"] == shape["blocks_0_mlp_prune_scatter"] == (b, N, d)
    assert shape["blocks_1_mlp"] == (b, N, d)


# ---- the reference itself ---------------------------------------------------------------


def manual_attention_rows(attn, u, idx):
    """Attention for the query rows `idx`, written out: per head, softmax(q kᵀ / √d) v."""
    d, h = u.shape[-1], attn.num_heads
    w, bias = attn.qkv.weight, attn.qkv.bias
    q = u[:, idx] @ w[:d].T + bias[:d]
    k = u @ w[d:2 * d].T + bias[d:2 * d]
    v = u @ w[2 * d:].T + bias[2 * d:]
    heads = []
    for j in range(h):
        s = slice(j * d // h, (j + 1) * d // h)
        scores = q[..., s] @ k[..., s].transpose(1, 2) / math.sqrt(d // h)
        heads.append(torch.softmax(scores, dim=-1) @ v[..., s])
    return F.linear(torch.cat(heads, dim=-1), attn.proj.weight, attn.proj.bias)


@torch.no_grad()
def manual_step(model, x, t, y, recipe, caches):
    """A second definition of one step, partial branches by explicit kept-row math."""
    h = model.x_embedder(x) + model.pos_embed
    c = model.t_embedder(t) + model.y_embedder(y, False)
    new_caches = {}
    for l, block in enumerate(model.blocks):
        mod = block.adaLN_modulation(c).chunk(6, dim=1)
        for j, (name, norm) in enumerate((("attn", block.norm1), ("mlp", block.norm2))):
            shift, scale, gate = mod[3 * j:3 * j + 3]
            action, key = recipe.actions[l][j], f"cache.{l}.{name}"
            u = modulate(norm(h), shift, scale)
            if action.kind == "reuse":
                out = caches[key]
            else:
                idx = list(range(N)) if action.kind == "compute" else list(action.indices)
                rows = manual_attention_rows(block.attn, u, idx) if name == "attn" else block.mlp(u[:, idx])
                out = torch.empty_like(u) if action.kind == "compute" else caches[key].clone()
                out[:, idx] = rows
                new_caches[key] = out
            h = h + gate.unsqueeze(1) * out
    return model.unpatchify(model.final_layer(h, c)), new_caches


def _feeds(model, recipe, seed=0):
    plan = plan_for(recipe)
    return example_inputs(model, plan, plan.variant_io(recipe)[0], seed=seed)


@pytest.mark.parametrize("name", ["both_k1_n-1_all", "every_branch_partial", "random1", "random2"])
def test_reference_equals_manual_definition(tiny_model, name):
    recipe = RECIPES[name]
    feeds = _feeds(tiny_model, recipe)
    caches = {k: v for k, v in feeds.items() if k.startswith("cache.")}
    ref, ref_fresh = reference_step(tiny_model, feeds["x"], feeds["t"], feeds["y"], recipe, caches)
    man, man_fresh = manual_step(tiny_model, feeds["x"], feeds["t"], feeds["y"], recipe, caches)
    assert (ref - man).abs().max().item() <= 1e-5
    assert sorted(ref_fresh) == sorted(man_fresh)
    for key in ref_fresh:
        assert (ref_fresh[key] - man_fresh[key]).abs().max().item() <= 1e-5, key


def test_reference_partial_of_all_tokens_equals_compute(tiny_model):
    everything = partial(range(N))
    recipe = Recipe.uniform(3, everything, BRANCHES)
    feeds = _feeds(tiny_model, recipe, seed=3)
    caches = {k: v for k, v in feeds.items() if k.startswith("cache.")}
    out, fresh = reference_step(tiny_model, feeds["x"], feeds["t"], feeds["y"], recipe, caches)
    full_out, full_fresh = reference_step(tiny_model, feeds["x"], feeds["t"], feeds["y"], FULL, {})
    assert (out - full_out).abs().max().item() <= 1e-5
    assert sorted(fresh) == sorted(full_fresh)
    assert all((fresh[k] - full_fresh[k]).abs().max().item() <= 1e-5 for k in fresh)
    # ... and so does the rewritten graph.
    gm = rewrite_variant(tiny_model, plan_for(recipe), recipe)
    got = gm(*feeds.values())
    assert (got[0] - full_out).abs().max().item() <= 1e-4


def test_reference_keeps_rows_outside_idx_bit_for_bit(tiny_model):
    recipe = RECIPES["random3"]
    feeds = _feeds(tiny_model, recipe, seed=5)
    caches = {k: v for k, v in feeds.items() if k.startswith("cache.")}
    _, fresh = reference_step(tiny_model, feeds["x"], feeds["t"], feeds["y"], recipe, caches)
    checked = 0
    for l, b, a in recipe.items():
        if a.kind == "partial":
            key = f"cache.{l}.{b}"
            rest = [i for i in range(N) if i not in a.indices]
            assert torch.equal(fresh[key][:, rest], caches[key][:, rest])
            assert not torch.equal(fresh[key][:, list(a.indices)], caches[key][:, list(a.indices)])
            checked += 1
    assert checked and all(v.data_ptr() != fresh[k].data_ptr() for k, v in caches.items() if k in fresh)


# ---- along a trajectory, and errors -----------------------------------------------------


def partial_plan(steps=6) -> Plan:
    """full, then steps mixing reuse and partial; the round structure repeats one recipe."""
    a = Recipe(((partial([0, 3, 6, 9, 12]), REUSE), (REUSE, partial([1, 2, 3])), (COMPUTE, partial([15]))), BRANCHES)
    b = Recipe(((REUSE, partial(range(8))), (partial(range(N - 1)), REUSE), (partial([4, 5]), REUSE)), BRANCHES)
    recipes = (FULL, a, b, FULL, a, b)[:steps]
    return Plan("tokens", settings(steps), recipes, N)


def test_partial_plan_steps_equal_reference_along_a_trajectory(tiny_model):
    """The graphs through the dispatcher, caches carried step to step, equal the eager
    reference fed with its own caches, at every step."""
    from tcgraph.runtime.dispatch import ScheduleDispatcher, graph_runner
    from tcgraph.sampling import DDIMSampler

    plan = partial_plan()
    variants = build_variants(tiny_model, plan)
    io = {v.id: (v.input_names, v.output_names) for v in variants}
    dispatch = ScheduleDispatcher(plan.schedule(), io, graph_runner({v.id: v.gm for v in variants}, io))
    ref_caches: dict = {}
    worst = []

    def checked_step(step, x, t, y):
        got = dispatch(step, x, t, y)
        ref, fresh = reference_step(tiny_model, x, t, y, plan.recipes[step], ref_caches)
        ref_caches.update(fresh)
        worst.append((got - ref).abs().max().item())
        for name, value in dispatch.caches.items():
            assert (value - ref_caches[name]).abs().max().item() <= 1e-4, (step, name)
        return got

    sampler = DDIMSampler(6, cfg_scale=2.0, in_channels=2, null_class=5)
    torch.manual_seed(0)
    sampler.sample(checked_step, torch.randn(2, 2, 8, 8), torch.tensor([0, 3]))
    assert dispatch.calls == plan.schedule() and len(worst) == 6
    assert max(worst) <= 1e-4, worst


def test_empty_or_negative_partial_is_refused():
    with pytest.raises(TcgraphError, match="reuse"):
        RewriteSpec(Recipe(((Action("partial", ()), COMPUTE),) + ((COMPUTE, COMPUTE),) * 2, BRANCHES))
    with pytest.raises(TcgraphError, match=">= 0"):
        RewriteSpec(Recipe(((Action("partial", (-1, 2)), COMPUTE),) + ((COMPUTE, COMPUTE),) * 2, BRANCHES))


def test_token_prune_never_mutates_the_model(tiny_model):
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    build_variants(tiny_model, partial_plan(3))
    after = tiny_model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not any("_tcgraph_idx" in n for n, _ in tiny_model.named_buffers())
