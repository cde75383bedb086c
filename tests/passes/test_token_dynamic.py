"""dynamic(k) branches (ToCa-style per-sample TopK) against the eager reference, and the
reference against a second, hand-written definition; the selection checked on inputs
where the changed tokens are known."""
import operator

import pytest
import torch
from torch.fx.passes.shape_prop import ShapeProp

from tcgraph.compile import (
    build_variants,
    check_variant,
    example_inputs,
    rewrite_variant,
)
from tcgraph.errors import TcgraphError
from tcgraph.models.official.dit import modulate
from tcgraph.passes import RewriteSpec, io_names, reference_step
from tcgraph.passes.meta import META_BLOCK, META_BRANCH
from tcgraph.plan.plan import COMPUTE, REUSE, Plan, Recipe, dynamic
from tcgraph.sampling import SamplerSettings
from tcgraph.names import BRANCHES
from tests.passes.test_token_prune import manual_attention_rows

N = 16  # tokens of the tiny model (8x8 input, patch 2)
B = 4  # model batch: 2 images x guidance
FULL = Recipe.uniform(3, COMPUTE, BRANCHES)


def settings(steps=2):
    return SamplerSettings(num_steps=steps, batch=2, cfg_scale=2.0, resolution=8)


def plan_for(recipe: Recipe) -> Plan:
    """A full step, then `recipe`: every cache (and input cache) `recipe` reads was filled."""
    return Plan("p", settings(2), (FULL, recipe), N)


RECIPES = {
    f"{where}_k{k}": Recipe(tuple(
        ((dynamic(k) if where in ("attn", "both") else COMPUTE), (dynamic(k) if where in ("mlp", "both") else COMPUTE))
        if l == 1 else (COMPUTE, REUSE) if l == 2 else (COMPUTE, COMPUTE) for l in range(3)), BRANCHES)
    for where in ("attn", "mlp", "both") for k in (1, N - 1, N)
}
RECIPES["every_branch_mixed_k"] = Recipe(((dynamic(3), dynamic(7)), (dynamic(1), dynamic(N)), (dynamic(N - 1), dynamic(2))), BRANCHES)
RECIPES["with_reuse"] = Recipe(((REUSE, dynamic(5)), (dynamic(9), REUSE), (COMPUTE, dynamic(4))), BRANCHES)


def _rows_changed(old, new):
    """[B, N] bool: which rows of a [B, N, D] cache differ."""
    return (old != new).any(dim=-1)


@pytest.mark.parametrize("name", list(RECIPES))
def test_dynamic_recipes_match_reference(tiny_model, name):
    """Every output, both updated caches of every dynamic branch included, equals reference_step
    within 1e-4; the graph changes exactly k rows per sample of each (k < N)."""
    recipe = RECIPES[name]
    plan = plan_for(recipe)
    gm = rewrite_variant(tiny_model, plan, recipe)
    ins, outs = io_names(gm)
    assert (ins, outs) == plan.variant_io(recipe)
    dyn = [(l, b, a.size) for l, b, a in recipe.items() if a.kind == "dynamic"]
    for l, b, _ in dyn:
        assert {f"cache.{l}.{b}", f"cache.{l}.{b}.in"} <= set(ins) & set(outs)
    feeds = example_inputs(tiny_model, plan, ins, seed=len(name))
    worst = check_variant(tiny_model, gm, recipe, feeds, atol=1e-4)
    assert worst <= 1e-4
    got = dict(zip(outs, gm(*[feeds[n] for n in ins])))
    _, ref = reference_step(tiny_model, feeds["x"], feeds["t"], feeds["y"], recipe,
                            {n: v for n, v in feeds.items() if n.startswith("cache.")}, keep_inputs=True)
    for name_ in outs[1:]:
        assert (got[name_] - ref[name_]).abs().max().item() <= 1e-4, name_
    for l, b, k in dyn:
        key = f"cache.{l}.{b}"
        changed = _rows_changed(feeds[key], got[key])
        changed_in = _rows_changed(feeds[key + ".in"], got[key + ".in"])
        assert changed.sum(dim=1).tolist() == [k] * B, (key, changed.sum(dim=1))
        assert torch.equal(changed, changed_in)  # the same rows of both caches


def test_dynamic_graph_structure_and_shapes(tiny_model):
    """Queries, the attention rows, proj and the MLP run on k rows; keys and values on all N;
    new nodes carry block and branch; no parameter is added or copied."""
    k_attn, k_mlp = 3, 5
    recipe = Recipe(((dynamic(k_attn), dynamic(k_mlp)), (COMPUTE, COMPUTE), (REUSE, COMPUTE)), BRANCHES)
    plan = plan_for(recipe)
    gm = rewrite_variant(tiny_model, plan, recipe)
    called = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    assert "blocks.0.attn" not in called and "blocks.0.attn.proj" in called and "blocks.0.mlp" in called
    new = [n for n in gm.graph.nodes if "_dynamic_" in n.name]
    assert new and all(n.meta[META_BLOCK] == 0 and n.meta[META_BRANCH] in ("attn", "mlp") for n in new)
    assert {n.meta[META_BRANCH] for n in new} == {"attn", "mlp"}
    # rows move whole: u[b, idx] (getitem with (sample, row) ids) and index_put, never per-element gather/scatter
    targets = {n.target for n in new if n.op == "call_function"}
    assert targets >= {torch.topk, operator.getitem, torch.index_put}
    assert not targets & {torch.gather, torch.scatter}
    expected = {n for n, _ in tiny_model.named_parameters() if not n.startswith("blocks.2.attn.")}
    assert {n for n, _ in gm.named_parameters()} == expected
    assert not any("_tcgraph_idx" in n for n, _ in gm.named_buffers())  # no constant indices
    ins, _ = io_names(gm)
    feeds = example_inputs(tiny_model, plan, ins)
    ShapeProp(gm).propagate(*[feeds[n] for n in ins])
    shape = {n.name: tuple(n.meta["tensor_meta"].shape) for n in gm.graph.nodes
             if "tensor_meta" in n.meta and hasattr(n.meta["tensor_meta"], "shape")}
    d = 32
    assert shape["blocks_0_attn_dynamic_score"] == (B, N)
    assert shape["blocks_0_attn_dynamic_gather"] == (B, k_attn, d)
    assert shape["blocks_0_attn_dynamic_q"] == (B, k_attn, d)
    assert shape["blocks_0_attn_dynamic_kv"] == (B, N, 2 * d)
    assert shape["blocks_0_attn_dynamic_proj"] == (B, k_attn, d)
    assert shape["blocks_0_mlp"] == (B, k_mlp, d)
    for br in ("attn", "mlp"):
        assert shape[f"blocks_0_{br}_dynamic_scatter"] == shape[f"blocks_0_{br}_dynamic_scatter_in"] == (B, N, d)


# ---- the reference itself ---------------------------------------------------------------


@torch.no_grad()
def manual_step(model, x, t, y, recipe, caches):
    """A second definition of one step: dynamic rows chosen sample by sample with a stable
    descending sort of the score, rows computed by explicit per-row math."""
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
            elif action.kind == "compute":
                out = manual_attention_rows(block.attn, u, list(range(N))) if name == "attn" else block.mlp(u)
                new_caches[key] = out
            else:
                out, u_in = caches[key].clone(), caches[key + ".in"].clone()
                for b in range(u.shape[0]):
                    score = ((u[b] - caches[key + ".in"][b]) ** 2).sum(dim=-1)
                    sel = torch.sort(score, descending=True, stable=True).indices[:action.size].tolist()
                    rows = (manual_attention_rows(block.attn, u[b:b + 1], sel) if name == "attn"
                            else block.mlp(u[b:b + 1, sel]))
                    out[b, sel] = rows[0]
                    u_in[b, sel] = u[b, sel]
                new_caches[key], new_caches[key + ".in"] = out, u_in
            h = h + gate.unsqueeze(1) * out
    return model.unpatchify(model.final_layer(h, c)), new_caches


def _feeds(model, recipe, seed=0):
    plan = plan_for(recipe)
    return example_inputs(model, plan, plan.variant_io(recipe)[0], seed=seed)


def _caches(feeds):
    return {k: v for k, v in feeds.items() if k.startswith("cache.")}


@pytest.mark.parametrize("name", ["both_k1", "both_k15", "every_branch_mixed_k", "with_reuse"])
def test_reference_equals_manual_definition(tiny_model, name):
    recipe = RECIPES[name]
    feeds = _feeds(tiny_model, recipe, seed=11)
    ref, ref_fresh = reference_step(tiny_model, feeds["x"], feeds["t"], feeds["y"], recipe, _caches(feeds))
    man, man_fresh = manual_step(tiny_model, feeds["x"], feeds["t"], feeds["y"], recipe, _caches(feeds))
    assert (ref - man).abs().max().item() <= 1e-5
    assert sorted(ref_fresh) == sorted(man_fresh)
    assert any(k.endswith(".in") for k in ref_fresh)
    for key in ref_fresh:
        assert (ref_fresh[key] - man_fresh[key]).abs().max().item() <= 1e-5, key


def test_dynamic_of_all_tokens_equals_compute(tiny_model):
    recipe = Recipe.uniform(3, dynamic(N), BRANCHES)
    feeds = _feeds(tiny_model, recipe, seed=3)
    out, fresh = reference_step(tiny_model, feeds["x"], feeds["t"], feeds["y"], recipe, _caches(feeds))
    full_out, full_fresh = reference_step(tiny_model, feeds["x"], feeds["t"], feeds["y"], FULL, {}, keep_inputs=True)
    assert (out - full_out).abs().max().item() <= 1e-5
    assert sorted(fresh) == sorted(full_fresh) and len(fresh) == 12
    assert all((fresh[k] - full_fresh[k]).abs().max().item() <= 1e-5 for k in fresh)
    gm = rewrite_variant(tiny_model, plan_for(recipe), recipe)
    got = gm(*feeds.values())
    assert (got[0] - full_out).abs().max().item() <= 1e-4
    _, outs = io_names(gm)
    assert max((g - full_fresh[n]).abs().max().item() for n, g in zip(outs[1:], got[1:])) <= 1e-4


def test_reference_keeps_unselected_rows_bit_for_bit(tiny_model):
    recipe = RECIPES["every_branch_mixed_k"]
    feeds = _feeds(tiny_model, recipe, seed=5)
    caches = _caches(feeds)
    _, fresh = reference_step(tiny_model, feeds["x"], feeds["t"], feeds["y"], recipe, caches)
    for l, b, a in recipe.items():
        for key in (f"cache.{l}.{b}", f"cache.{l}.{b}.in"):
            changed = _rows_changed(caches[key], fresh[key])
            assert changed.sum(dim=1).tolist() == [a.size] * B, key
            assert torch.equal(fresh[key][~changed], caches[key][~changed])
    assert all(v.data_ptr() != fresh[k].data_ptr() for k, v in caches.items())  # clones, inputs untouched


# ---- selection on inputs where the changed tokens are known ------------------------------


CHANGED = [[0, 5, 9], [2, 3, 15], [5, 9, 1], [14, 1, 7]]  # per sample: its tokens whose input changed
GROWTH = [1.0, 2.0, 3.0]  # perturbation sizes: CHANGED[b][i] changes by GROWTH[i] per element


def known_change_feeds(model, l, branch, k, seed=0):
    """Feeds for a step dynamic on (l, branch) alone, every other branch computed: the branch
    input equals the full step's, so `.in` = full u except CHANGED rows (perturbed by growing
    amounts), and the output cache = full output + 1 (so a recomputed row is visible)."""
    recipe = Recipe(tuple(tuple(dynamic(k) if (ll, br) == (l, branch) else COMPUTE for br in ("attn", "mlp"))
                          for ll in range(3)), BRANCHES)
    feeds = _feeds(model, recipe, seed=seed)
    _, full = reference_step(model, feeds["x"], feeds["t"], feeds["y"], FULL, {}, keep_inputs=True)
    key = f"cache.{l}.{branch}"
    u, out = full[key + ".in"], full[key]
    u_old = u.clone()
    for b, tokens in enumerate(CHANGED):
        for tok, g in zip(tokens, GROWTH):
            u_old[b, tok] += g
    feeds[key], feeds[key + ".in"] = out + 1.0, u_old
    return recipe, feeds, u, out




@pytest.mark.parametrize("branch", ["attn", "mlp"])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_selection_is_the_topk_changed_tokens_per_sample(tiny_model, branch, k):
    """Exactly the k tokens of each sample whose input changed most are recomputed (output
    cache rows = the fresh branch output, `.in` rows = the fresh input); every other row keeps
    its cached value bit for bit; the selection differs across the batch — in the reference
    and in the rewritten graph."""
    recipe, feeds, u, out = known_change_feeds(tiny_model, 1, branch, k)
    key = f"cache.{1}.{branch}"
    expected = torch.zeros(B, N, dtype=torch.bool)
    for b, tokens in enumerate(CHANGED):
        expected[b, tokens[-k:]] = True  # the k largest perturbations
    gm = rewrite_variant(tiny_model, plan_for(recipe), recipe)
    ins, outs = io_names(gm)
    graph = dict(zip(outs, gm(*[feeds[n] for n in ins])))
    _, ref = reference_step(tiny_model, feeds["x"], feeds["t"], feeds["y"], recipe, _caches(feeds))
    for got in (ref, graph):
        new, new_in = got[key], got[key + ".in"]
        assert torch.equal(_rows_changed(feeds[key], new), expected)
        assert torch.equal(_rows_changed(feeds[key + ".in"], new_in), expected)
        assert torch.equal(new[~expected], feeds[key][~expected])
        assert torch.equal(new_in[~expected], feeds[key + ".in"][~expected])
        assert (new[expected] - out[expected]).abs().max().item() <= 1e-5
        assert (new_in[expected] - u[expected]).abs().max().item() <= 1e-5
    assert len({tuple(expected[b].nonzero().flatten().tolist()) for b in range(B)}) == B  # differs per sample


# ---- along a trajectory, and errors -----------------------------------------------------


def dynamic_plan(steps=6) -> Plan:
    """full, dynamic steps (with reuse), full, dynamic …"""
    a = Recipe(((dynamic(5), REUSE), (REUSE, dynamic(3)), (COMPUTE, dynamic(1))), BRANCHES)
    b = Recipe(((REUSE, dynamic(8)), (dynamic(N - 1), REUSE), (dynamic(2), dynamic(N))), BRANCHES)
    return Plan("dyn", settings(steps), (FULL, a, b, FULL, a, b)[:steps], N)


def test_dynamic_plan_steps_equal_reference_along_a_trajectory(tiny_model):
    """The graphs through the dispatcher, caches and input caches carried step to step, equal
    the eager reference fed with its own caches, at every step."""
    from tcgraph.runtime.dispatch import ScheduleDispatcher, graph_runner
    from tcgraph.sampling import DDIMSampler

    plan = dynamic_plan()
    variants = build_variants(tiny_model, plan)
    io = {v.id: (v.input_names, v.output_names) for v in variants}
    assert "cache.0.attn.in" in io["v0"][1] and "cache.1.attn.in" in io["v0"][1]  # the full step fills .in
    dispatch = ScheduleDispatcher(plan.schedule(), io, graph_runner({v.id: v.gm for v in variants}, io))
    ref_caches: dict = {}
    worst = []

    def checked_step(step, x, t, y):
        got = dispatch(step, x, t, y)
        ref, fresh = reference_step(tiny_model, x, t, y, plan.recipes[step], ref_caches, keep_inputs=True)
        ref_caches.update(fresh)
        worst.append((got - ref).abs().max().item())
        for name, value in dispatch.caches.items():
            worst.append((value - ref_caches[name]).abs().max().item())
        return got

    sampler = DDIMSampler(6, cfg_scale=2.0, in_channels=2, null_class=5)
    torch.manual_seed(0)
    sampler.sample(checked_step, torch.randn(2, 2, 8, 8), torch.tensor([0, 3]))
    assert dispatch.calls == plan.schedule()
    assert sorted(dispatch.caches) == sorted(plan.cache_names())
    assert max(worst) <= 1e-4, max(worst)


def test_dynamic_k_out_of_range_is_refused_by_the_spec():
    recipe = Recipe(((dynamic(0), COMPUTE),) + ((COMPUTE, COMPUTE),) * 2, BRANCHES)
    with pytest.raises(TcgraphError, match="k >= 1"):
        RewriteSpec(recipe)


def test_input_cache_written_without_its_cache_is_refused():
    with pytest.raises(TcgraphError, match=r"cache\.0\.mlp\.in"):
        RewriteSpec(FULL, ((0, "attn"),), ((0, "mlp"),))
