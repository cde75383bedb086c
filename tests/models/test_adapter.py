"""The model-adapter seam: a second architecture, known only through its adapter, runs through
capture, every rewrite pass, the eager reference and calibration's blended step.

`RenamedDiT` is a test-only copy of the DiT with every module renamed (`layers` for `blocks`,
`mod` for `adaLN_modulation`, `ln1`/`ln2`, `mixer` with `to_qkv`/`out`, `ff` …) and the same
math. Nothing in tcgraph names its modules: if a pass, the reference or mixed_step still
named a DiT module, it would fail here.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from tcgraph.calibrate import mixed_step
from tcgraph.compile import build_variants, check_variant, example_inputs, rewrite_variant
from tcgraph.errors import TcgraphError
from tcgraph.models import adapter_for
from tcgraph.models.adapter import (ADAPTERS, DIT, AttentionSpec, BlockKind, BranchSpec, ModelAdapter, ModelDims,
                                    run_blocks)
from tcgraph.models.official.dit import DiT, DiTConfig, FinalLayer, LabelEmbedder, PatchEmbed, TimestepEmbedder, modulate
from tcgraph.names import cache_name
from tcgraph.passes import capture, expand_blocks, io_names, reference_step
from tcgraph.plan import COMPUTE, REUSE, Plan, Recipe, partial
from tcgraph.plan.plan import dynamic
from tcgraph.sampling import SamplerSettings
from tcgraph.names import BRANCHES

N = 16  # tokens of the tiny model


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads, self.dim_head = heads, dim // heads
        self.to_qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        qkv = self.to_qkv(x).reshape(B, T, 3, self.heads, self.dim_head).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.out(x.transpose(1, 2).reshape(B, T, D))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc_in, self.act, self.fc_out = nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc_out(self.act(self.fc_in(x)))


class Layer(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int):
        super().__init__()
        self.ln1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mixer = SelfAttention(dim, heads)
        self.ln2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.ff = FeedForward(dim, hidden)
        self.mod = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        m = self.mod(c).chunk(6, dim=1)
        x = x + m[2].unsqueeze(1) * self.mixer(modulate(self.ln1(x), m[0], m[1]))
        return x + m[5].unsqueeze(1) * self.ff(modulate(self.ln2(x), m[3], m[4]))


class RenamedDiT(nn.Module):
    def __init__(self, config: DiTConfig):
        super().__init__()
        self.config = config
        d = config.hidden_size
        self.patch = PatchEmbed(config.patch_size, config.in_channels, d)
        self.time = TimestepEmbedder(d)
        self.label = LabelEmbedder(config.num_classes, d, config.class_dropout_prob)
        self.pos = nn.Parameter(torch.zeros(1, config.num_tokens, d), requires_grad=False)
        self.layers = nn.ModuleList([Layer(d, config.num_heads, config.mlp_hidden) for _ in range(config.depth)])
        self.head = FinalLayer(d, config.patch_size, config.out_channels)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h, c = self.patch(x) + self.pos, self.time(t) + self.label(y, False)
        for layer in self.layers:
            h = layer(h, c)
        return self.unpatchify(self.head(h, c))

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        c, p, g = cfg.out_channels, cfg.patch_size, cfg.input_size // cfg.patch_size
        x = x.reshape(x.shape[0], g, g, p, p, c).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(x.shape[0], c, g * p, g * p)


class LastLayer(nn.Module):
    """A second block kind: another class with other module names and the same math."""

    def __init__(self, dim: int, heads: int, hidden: int):
        super().__init__()
        self.pre_attn = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attention = SelfAttention(dim, heads)
        self.pre_ff = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp_net = FeedForward(dim, hidden)
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        m = self.ada(c).chunk(6, dim=1)
        x = x + m[2].unsqueeze(1) * self.attention(modulate(self.pre_attn(x), m[0], m[1]))
        return x + m[5].unsqueeze(1) * self.mlp_net(modulate(self.pre_ff(x), m[3], m[4]))


class SplitDiT(RenamedDiT):
    """Two block kinds in two containers: `layers` (all blocks but the last), then `last` (one LastLayer)."""

    def __init__(self, config: DiTConfig):
        super().__init__(config)
        d = config.hidden_size
        self.layers = nn.ModuleList(list(self.layers)[:-1])
        self.last = nn.ModuleList([LastLayer(d, config.num_heads, config.mlp_hidden)])

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h, c = self.patch(x) + self.pos, self.time(t) + self.label(y, False)
        for layer in [*self.layers, *self.last]:
            h = layer(h, c)
        return self.unpatchify(self.head(h, c))


LAYER = BlockKind("layer", Layer, "layers", "mod", 6, (
    BranchSpec("attn", "mixer", SelfAttention, "ln1", 0, 1, 2,
               AttentionSpec(in_proj="to_qkv", out_proj="out", num_heads="heads", head_dim="dim_head")),
    BranchSpec("mlp", "ff", FeedForward, "ln2", 3, 4, 5),
))
COMMON = dict(embed=lambda m, x, t, y: (m.patch(x) + m.pos, m.time(t) + m.label(y, False)),
              final=lambda m, h, c: m.unpatchify(m.head(h, c)),
              dims=lambda m: ModelDims(m.config.depth, m.config.num_tokens, m.config.hidden_size, m.config.num_heads))
RENAMED = ModelAdapter(name="RenamedDiT", model_type=RenamedDiT, kinds=(LAYER,), **COMMON)
SPLIT = ModelAdapter(name="SplitDiT", model_type=SplitDiT, kinds=(LAYER, BlockKind("last", LastLayer, "last", "ada", 6, (
    BranchSpec("attn", "attention", SelfAttention, "pre_attn", 0, 1, 2,
               AttentionSpec(in_proj="to_qkv", out_proj="out", num_heads="heads", head_dim="dim_head")),
    BranchSpec("mlp", "mlp_net", FeedForward, "pre_ff", 3, 4, 5),
))), **COMMON)

TOP = {"x_embedder": "patch", "t_embedder": "time", "y_embedder": "label", "pos_embed": "pos", "final_layer": "head"}
IN_BLOCK = {".adaLN_modulation.": ".mod.", ".attn.qkv.": ".mixer.to_qkv.", ".attn.proj.": ".mixer.out.",
            ".mlp.fc1.": ".ff.fc_in.", ".mlp.fc2.": ".ff.fc_out."}


def rename(key: str) -> str:
    """A DiT state-dict key as RenamedDiT spells it."""
    head, _, rest = key.partition(".")
    if head != "blocks":
        return ".".join([TOP[head]] + ([rest] if rest else []))
    key = "layers." + rest
    for old, new in IN_BLOCK.items():
        key = key.replace(old, new)
    return key


IN_LAST = {".adaLN_modulation.": ".ada.", ".attn.qkv.": ".attention.to_qkv.", ".attn.proj.": ".attention.out.",
           ".mlp.fc1.": ".mlp_net.fc_in.", ".mlp.fc2.": ".mlp_net.fc_out."}


def split_name(key: str, depth: int) -> str:
    """A DiT state-dict key as SplitDiT spells it: its last block is `last.0`, with LastLayer's names."""
    if not key.startswith(f"blocks.{depth - 1}."):
        return rename(key)
    rest = "." + key.removeprefix(f"blocks.{depth - 1}.")
    for old, new in IN_LAST.items():
        rest = rest.replace(old, new)
    return "last.0" + rest


def renamed_copy(model: DiT, cls: type = RenamedDiT) -> RenamedDiT:
    """A RenamedDiT (or SplitDiT) with `model`'s weights."""
    copy = cls(model.config)
    name = rename if cls is RenamedDiT else (lambda k: split_name(k, model.config.depth))
    copy.load_state_dict({name(k): v for k, v in model.state_dict().items()}, strict=True)
    return copy.eval()


@pytest.fixture
def renamed(tiny_model, monkeypatch):
    monkeypatch.setitem(ADAPTERS, RenamedDiT, RENAMED)
    return renamed_copy(tiny_model)


@pytest.fixture
def split(tiny_model, monkeypatch):
    monkeypatch.setitem(ADAPTERS, SplitDiT, SPLIT)
    return renamed_copy(tiny_model, SplitDiT)


def settings(steps=2):
    return SamplerSettings(num_steps=steps, batch=2, cfg_scale=2.0, resolution=8)


FULL = Recipe.uniform(3, COMPUTE, BRANCHES)
RECIPES = {
    "full": FULL,
    "reuse": Recipe(((REUSE, COMPUTE), (COMPUTE, REUSE), (REUSE, REUSE)), BRANCHES),
    "partial": Recipe(((partial([0, 5, 9, 13]), partial([7])), (REUSE, partial(range(1, N))), (COMPUTE, REUSE)), BRANCHES),
    "dynamic": Recipe(((dynamic(3), dynamic(5)), (REUSE, dynamic(1)), (COMPUTE, dynamic(N))), BRANCHES),
}


def test_registry_finds_the_adapter_and_refuses_unknown_models(tiny_model, renamed, monkeypatch):
    assert adapter_for(tiny_model) is DIT and adapter_for(renamed) is RENAMED
    monkeypatch.delitem(ADAPTERS, RenamedDiT)
    with pytest.raises(TcgraphError, match=r"no model adapter for RenamedDiT; supported architectures: DiT"):
        capture(renamed)
    with pytest.raises(TcgraphError, match="must be"):
        ModelAdapter(**{**RENAMED.__dict__, "kinds": (BlockKind(**{**LAYER.__dict__, "branches": LAYER.branches[::-1]}),)})
    differing = ModelAdapter(**{**SPLIT.__dict__, "kinds": (LAYER, BlockKind(**{**SPLIT.kinds[1].__dict__,
                                                                                 "branches": LAYER.branches[:1]}))})
    assert not differing.uniform and [k.branch_names for k in differing.kinds] == [("attn", "mlp"), ("attn",)]
    with pytest.raises(TcgraphError, match="different branches"):  # no one branch tuple: ask per block
        differing.branch_names


def test_the_copy_is_the_same_model(tiny_model, renamed):
    x, t, y = torch.randn(3, 2, 8, 8), torch.tensor([0, 500, 999]), torch.tensor([0, 4, 5])
    with torch.no_grad():
        ref = tiny_model(x, t, y)
        assert torch.equal(renamed(x, t, y), ref)
        assert torch.equal(run_blocks(renamed, x, t, y, lambda l, b, u, fn: fn(u())), ref)
    cap = capture(renamed)
    assert [b.path for b in cap.blocks] == ["layers.0", "layers.1", "layers.2"] and cap.adapter is RENAMED
    expanded = expand_blocks(cap.gm)
    branches = sorted((n.target, n.meta["tcgraph.branch"]) for n in expanded.graph.nodes if "tcgraph.branch" in n.meta)
    assert branches == sorted((f"layers.{l}.{m}", b) for l in range(3) for m, b in (("mixer", "attn"), ("ff", "mlp")))
    assert torch.allclose(expanded(x, t, y), ref, atol=1e-6)


def test_two_block_kinds_number_their_blocks_globally(tiny_model, split):
    """SplitDiT: blocks 0-1 of kind `layer`, block 2 of kind `last` in its own container; the eager loop,
    capture and the expanded graph follow the kinds, and the model is the DiT it was copied from."""
    x, t, y = torch.randn(3, 2, 8, 8), torch.tensor([0, 500, 999]), torch.tensor([0, 4, 5])
    with torch.no_grad():
        ref = tiny_model(x, t, y)
        assert torch.equal(split(x, t, y), ref)
        assert torch.equal(run_blocks(split, x, t, y, lambda l, b, u, fn: fn(u())), ref)
    cap = capture(split)
    assert [(b.index, b.path, b.kind) for b in cap.blocks] == [(0, "layers.0", "layer"), (1, "layers.1", "layer"),
                                                              (2, "last.0", "last")]
    expanded = expand_blocks(cap.gm)
    branches = sorted((n.meta["tcgraph.block"], n.target, n.meta["tcgraph.branch"]) for n in expanded.graph.nodes
                      if "tcgraph.branch" in n.meta)
    assert branches == [(0, "layers.0.ff", "mlp"), (0, "layers.0.mixer", "attn"), (1, "layers.1.ff", "mlp"),
                        (1, "layers.1.mixer", "attn"), (2, "last.0.attention", "attn"), (2, "last.0.mlp_net", "mlp")]
    assert torch.allclose(expanded(x, t, y), ref, atol=1e-6)


@pytest.mark.parametrize("model_name", ["renamed", "split"])
@pytest.mark.parametrize("name", list(RECIPES))
def test_rewrites_match_the_reference_and_the_original_dit(tiny_model, request, model_name, name):
    """Each recipe rewritten on the renamed model (one block kind, or two) equals its eager reference
    (<= 1e-5), and graph and reference equal the original DiT's on the same inputs."""
    renamed = request.getfixturevalue(model_name)
    recipe = RECIPES[name]
    plan = Plan("p", settings(), (FULL, recipe), N)
    gm = rewrite_variant(renamed, plan, recipe)
    ins, outs = io_names(gm)
    assert (ins, outs) == plan.variant_io(recipe)
    feeds = example_inputs(renamed, plan, ins, seed=3)
    assert check_variant(renamed, gm, recipe, feeds, atol=1e-5) <= 1e-5
    dit_gm = rewrite_variant(tiny_model, plan, recipe)
    with torch.no_grad():
        got, dit_got = gm(*feeds.values()), dit_gm(*feeds.values())
    got, dit_got = (got, dit_got) if isinstance(got, tuple) else ((got,), (dit_got,))
    assert max((a - b).abs().max().item() for a, b in zip(got, dit_got)) <= 1e-5
    caches = {k: v for k, v in feeds.items() if k.startswith("cache.")}
    ref, fresh = reference_step(renamed, feeds["x"], feeds["t"], feeds["y"], recipe, caches, keep_inputs=True)
    dit_ref, dit_fresh = reference_step(tiny_model, feeds["x"], feeds["t"], feeds["y"], recipe, caches, keep_inputs=True)
    assert torch.equal(ref, dit_ref) and sorted(fresh) == sorted(dit_fresh)
    assert all(torch.equal(fresh[k], dit_fresh[k]) for k in fresh)
    # The renamed graph calls the renamed modules: a pruned attention its `out` projection.
    called = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    assert all(c.startswith(("patch.", "time.", "label.", "layers.", "last.", "head.")) for c in called)
    if name in ("partial", "dynamic"):
        assert "layers.0.mixer" not in called and "layers.0.mixer.out" in called
        assert any(n.name.startswith("layers_0_attn_") for n in gm.graph.nodes)


def test_build_variants_on_the_renamed_model(renamed):
    plan = Plan("p", settings(3), (FULL, RECIPES["partial"], RECIPES["reuse"]), N)
    variants = build_variants(renamed, plan)
    assert [v.id for v in variants] == ["v0", "v1", "v2"]


def test_mixed_step_on_the_renamed_model(tiny_model, renamed):
    """Hard and soft weights: the renamed model's blended step equals the DiT's, gradients included."""
    g = torch.Generator().manual_seed(0)
    x, t, y = torch.randn(3, 2, 8, 8, generator=g), torch.tensor([10, 500, 900]), torch.tensor([0, 4, 5])
    caches = {cache_name(l, b): torch.randn(3, N, 32, generator=g) for l in range(3) for b in ("attn", "mlp")}
    out, used = mixed_step(renamed, x, t, y, {}, {})
    with torch.no_grad():
        assert torch.equal(out, renamed(x, t, y))
    hard = {cache_name(0, "attn"): 0.0, cache_name(1, "mlp"): 0.0}
    out, _ = mixed_step(renamed, x, t, y, hard, caches)
    ref, _ = reference_step(renamed, x, t, y, Recipe(((REUSE, COMPUTE), (COMPUTE, REUSE), (COMPUTE, COMPUTE)), BRANCHES), caches)
    assert (out - ref).abs().max().item() <= 1e-5
    results = []
    for model in (renamed, tiny_model):
        weights = {cache_name(l, "attn"): torch.tensor(0.3 + 0.2 * l, requires_grad=True) for l in range(3)}
        weights[cache_name(2, "mlp")] = torch.rand(N, 1, generator=torch.Generator().manual_seed(1)).requires_grad_()
        out, used = mixed_step(model, x, t, y, weights, caches)
        out.square().mean().backward()
        results.append((out.detach(), [w.grad for w in weights.values()]))
    assert torch.equal(results[0][0], results[1][0])
    assert all(torch.equal(a, b) for a, b in zip(results[0][1], results[1][1]))
    assert all(g.abs().sum() > 0 for g in results[0][1])


# Module attributes of tcgraph's DiT: only tcgraph/models/official/dit.py and its adapter may name them.
DIT_NAMES = {"adaLN_modulation", "norm1", "norm2", "qkv", "proj", "x_embedder", "t_embedder", "y_embedder",
             "pos_embed", "final_layer", "blocks", "unpatchify", "fc1", "fc2"}
SEAM = ["passes", "calibrate", "compile.py"]  # what must reach a model only through its adapter


def _code_names(path: Path) -> list[str]:
    """Attribute names and the dotted parts of string constants in `path`; docstrings and fx node
    names (`name=` arguments: `blocks_0_attn_prune_proj` names an op, not a module) left out."""
    tree = ast.parse(path.read_text())
    skip = {id(n.body[0].value) for n in ast.walk(tree)
            if isinstance(n, (ast.Module, ast.FunctionDef, ast.ClassDef)) and n.body
            and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    skip |= {id(k.value) for k in ast.walk(tree) if isinstance(k, ast.keyword) and k.arg == "name"}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            found.append(node.attr)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip:
            found.extend(node.value.split("."))
    return found


def test_no_dit_module_is_named_outside_the_models_layer():
    root = Path(__import__("tcgraph").__file__).parent
    files = [f for part in SEAM for f in ((root / part).rglob("*.py") if (root / part).is_dir() else [root / part])]
    named = {f"{f.relative_to(root)}: {name}" for f in files for name in _code_names(f) if name in DIT_NAMES}
    assert files and not named, sorted(named)


def test_a_plan_for_other_branches_is_refused_before_any_rewrite(tiny_model):
    from tcgraph.compile import build_variants
    from tcgraph.plan import COMPUTE, Plan, Recipe
    from tcgraph.sampling import SamplerSettings

    plan = Plan("p", SamplerSettings(num_steps=1, batch=1, cfg_scale=1.0, resolution=8),
                (Recipe.uniform(3, COMPUTE, ("attn", "cross", "mlp")),), tiny_model.config.num_tokens)
    with pytest.raises(TcgraphError, match=r"branches \['attn', 'cross', 'mlp'\] but DiT blocks have \['attn', 'mlp'\]"):
        build_variants(tiny_model, plan)
