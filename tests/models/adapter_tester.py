"""The checks every registered model adapter must pass, as a mixin (as tests/plan/planner_tester.py
is for planners; diffusers' tester mixins are the model).

Subclass `AdapterTester` once per registered adapter (tests/models/test_every_adapter.py, which
also fails when an adapter of `tcgraph.models.adapter.ADAPTERS` or a family has no subclass) and
give it `adapter` (the registered `ModelAdapter`), `family` (its `tcgraph.models.families` name)
and `make_model()`: a tiny model (depth 2, 16 tokens, hidden 32) with random weights that leave
no gate or table at zero. `steps`, `batch`, `guidance`, `text_length` (text-conditioned models),
`conditioning(model, n)` (what `api.sample` is given for n images) and `mixed_recipes` have
defaults to override.

Each check compares numbers:
1. the adapter is the one registered for the model's class, agrees with its family (branches,
   text conditioning), the family builds the model and declares its state dict; the adapter's
   eager block loop (`run_blocks`, every branch `fn(u())`) is the model's own forward (<= 1e-5),
   and every branch of every block changes the output;
2. capture calls every block once, as one leaf node, in order; expanded, one node per branch;
   both graphs are the forward (<= 1e-5);
3. a plan whose recipes use every action on every branch (compute, reuse, partial, dynamic,
   forecast from a history of 2 with fixed weights; the run constants written at step 0 and read
   after, where the adapter declares them): every variant graph the passes make equals the eager
   reference (`reference_step`) of its recipe within 1e-5, on random caches of two seeds;
4. calibration's blended step (`mixed_step`): weights all one are the model, all zero the reuse of
   the given caches, a 0/1 token mask the partial action (floats and tensors, <= 1e-5);
5. export and load: `api.transform` then `load_artifact` gives back the plan and the config; the
   `full` plan samples (`api.sample`, ONNX Runtime and the torch backend) what `api.sample_eager`
   samples (1e-4), the mixed plan the same on both backends and as an eager `reference_step` loop
   (1e-5), and step by step every output and carried cache agrees (ORT-torch 1e-5, -eager 1e-4).
   Sampled tensors are compared relative to their size (see SAMPLE_TOL).

The mixed plan's graphs and the two artifacts are made once per subclass (class-scoped fixtures).
"""
from __future__ import annotations

import dataclasses
import importlib

import pytest
import torch
import torch.nn as nn

from tcgraph import api
from tcgraph.calibrate import mixed_step
from tcgraph.compile import build_variants, conditioning_of, example_inputs
from tcgraph.export.artifact import load_artifact
from tcgraph.models.adapter import ADAPTERS, ModelAdapter, adapter_for, run_blocks
from tcgraph.models.families import family as family_named
from tcgraph.names import FORECAST_WEIGHTS, IMAGE, OUT, cache_name, history_name, is_model_input
from tcgraph.passes import capture, expand_blocks, io_names, reference_step
from tcgraph.passes.meta import branch_nodes
from tcgraph.plan import COMPUTE, REUSE, Plan, Recipe
from tcgraph.plan.actions import ACTION_KINDS, dynamic, forecast, partial
from tcgraph.models.layout import Layout
from tcgraph.runtime.dispatch import ScheduleDispatcher
from tcgraph.sampling import SamplerSettings, make_noise, run_batches, sampler_for
from tcgraph.sampling.conditioning import Text, as_inputs, take

GRAPH_ATOL = 1e-5  # a rewritten graph against the eager reference on O(1) random inputs, float32 on CPU
# Sampled tensors are compared relative to their size (`scaled_diff`): random weights and 4 DDIM steps
# from t = 999 make samples of size ~500 (x0 = (x - eps) / sqrt(alpha_bar) with alpha_bar ~ 4e-5), and
# later steps' inputs and branch-input caches of size ~100, where float32's own spacing is 3e-5.
SAMPLE_TOL = 1e-4  # an exported artifact against eager sampling (the full plan), a step's outputs and caches
BACKEND_TOL = 1e-5  # ONNX Runtime against the torch backend (the same artifact), and against the eager plan loop
FORECAST_WEIGHTS_BY_BRANCH = ((1.5, -0.5), (2.0, -1.0), (1.25, -0.25))  # newest first, one pair per branch


def forward(model: nn.Module, x: torch.Tensor, t: torch.Tensor, y) -> torch.Tensor:
    """The model's own forward on one conditioning (class ids, or a tuple of text inputs)."""
    return model(x, t, *as_inputs(y))


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def token_mask(indices, n: int) -> torch.Tensor:
    """`mixed_step`'s per-token weight [N, 1]: 1 on the kept tokens, 0 elsewhere."""
    mask = torch.zeros(n, 1)
    mask[list(indices)] = 1.0
    return mask


def scale(value: torch.Tensor) -> float:
    """The size of a tensor, at least 1: what the tolerances of sampled tensors are relative to."""
    return max(1.0, value.abs().max().item())


def scaled_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| over the size of b (`scale`; see SAMPLE_TOL): absolute for tensors of size <= 1."""
    return max_diff(a, b) / scale(b)


class AdapterTester:
    adapter: ModelAdapter  # the registered adapter the tiny model must get
    family: str  # its family's name in tcgraph.models.families
    steps = 4
    batch = 2
    guidance = 2.0
    text_length = 0  # text tokens (text-conditioned models only)
    images = 3  # sampled per check: two runs of `batch`, the second padded

    # ---- what a subclass provides --------------------------------------------------------

    def make_model(self) -> nn.Module:
        """A tiny model of the adapter's class, random non-degenerate weights, in eval mode."""
        raise NotImplementedError

    def settings(self, model: nn.Module) -> SamplerSettings:
        return SamplerSettings(num_steps=self.steps, batch=self.batch, cfg_scale=self.guidance,
                               resolution=model.config.input_size, text_length=self.text_length,
                               pooled=bool(getattr(model.config, "pooled_channels", 0)))

    def conditioning(self, model: nn.Module, n: int, seed: int = 5):
        """What `api.sample` (and eager sampling) is given for n images: class ids, or a `Text` of n
        prompts padded after different lengths, with one negative prompt for guidance (a model with
        pooled text embeddings: unpadded, with pooled embeddings of each prompt and the negative one)."""
        cfg = model.config
        if not cfg.text_conditioned:
            return [(3 * i + 1) % cfg.num_classes for i in range(n)]
        g = torch.Generator().manual_seed(seed)
        length = self.text_length
        mask = torch.ones(n, length)
        for i in range(n):
            mask[i, 2 + i % (length - 2):] = 0
        neg_mask = torch.zeros(n, length)
        neg_mask[:, 0] = 1
        pooled = getattr(cfg, "pooled_channels", 0)  # a model with pooled text embeddings reads no mask
        if pooled:
            mask, neg_mask = torch.ones(n, length), torch.ones(n, length)
        text = Text(torch.randn(n, length, cfg.caption_channels, generator=g), mask,
                    torch.randn(1, length, cfg.caption_channels, generator=g).expand(n, -1, -1), neg_mask)
        if not pooled:
            return text
        return dataclasses.replace(text, pooled=torch.randn(n, pooled, generator=g),
                                   negative_pooled=torch.randn(1, pooled, generator=g).expand(n, -1))

    # ---- the plans -------------------------------------------------------------------------

    def layout(self, model: nn.Module) -> Layout:
        """The model's blocks: each one's branches and the streams each writes."""
        return Layout(adapter_for(model).layout(model))

    def full_recipe(self, layout: Layout) -> Recipe:
        return Recipe.uniform(layout.depth, COMPUTE, layout.branches())

    @staticmethod
    def branches(layout: Layout) -> list[tuple[int, str]]:
        """(block, branch) of every branch of every block."""
        return [(l, name) for l, names in enumerate(layout.branches()) for name in names]

    @staticmethod
    def tokens(layout: Layout, block: int, branch: str) -> bool:
        """Whether a token action may choose rows of the branch (it writes image rows)."""
        return IMAGE in layout.streams(block, branch)

    def mixed_recipes(self, layout: Layout, n: int) -> tuple[list[Recipe], dict]:
        """(recipes, forecast weights) of 4 steps that use every action on every branch (depth >= 2):

            step 0  compute everything (and write the run constants, where the adapter has them)
            step 1  A: block 0 partial (other tokens for each branch), block 1 dynamic (k = 3, 4, ...)
            step 2  C: block 0 reuse, block 1 forecast(2) from its outputs of steps 0 and 1
            step 3  A again (its caches now come from steps 1 and 2)

        Blocks past the second compute in A and reuse in C; a branch that writes no image row
        (a text-stream branch) computes where the others take a token action. Variants: full, A,
        C (and, with run constants, the first full step apart)."""
        names = layout.branches()

        def token(block, action):
            return tuple(action(i) if self.tokens(layout, block, br) else COMPUTE for i, br in enumerate(names[block]))

        a = Recipe(tuple([token(0, lambda i: partial(range(i, n, 2 + i))), token(1, lambda i: dynamic(3 + i))]
                         + [(COMPUTE,) * len(names[l]) for l in range(2, layout.depth)]), names)
        c = Recipe(tuple([(REUSE,) * len(names[0]), (forecast(2),) * len(names[1])]
                         + [(REUSE,) * len(names[l]) for l in range(2, layout.depth)]), names)
        weights = {2: {(1, br): FORECAST_WEIGHTS_BY_BRANCH[i % len(FORECAST_WEIGHTS_BY_BRANCH)]
                       for i, br in enumerate(names[1])}}
        return [self.full_recipe(layout), a, c, a], weights

    def alternating_recipes(self, layout: Layout, n: int) -> tuple[list[Recipe], dict]:
        """A `mixed_recipes` for models of several streams and kinds (the two-stream toy, FLUX): every other
        block partial (A) and reused (C), the others dynamic (A) and forecast (C), so that each kind gets
        every action, a parallel block is dynamic on both branches (which read one input), a text-only
        branch is forecast, and enough blocks cache that the samples differ from the full model's."""
        names = layout.branches()

        def each(block, action):
            return tuple(action(i) if self.tokens(layout, block, br) else COMPUTE for i, br in enumerate(names[block]))

        a = Recipe(tuple(each(l, (lambda i: partial(range(i, n, 2 + i))) if l % 2 == 0 else (lambda i: dynamic(3 + i)))
                         for l in range(layout.depth)), names)
        c = Recipe(tuple(((REUSE,) if l % 2 == 0 else (forecast(2),)) * len(names[l]) for l in range(layout.depth)), names)
        weights = {2: {(l, br): FORECAST_WEIGHTS_BY_BRANCH[i % len(FORECAST_WEIGHTS_BY_BRANCH)]
                       for l in range(1, layout.depth, 2) for i, br in enumerate(names[l])}}
        return [self.full_recipe(layout), a, c, a], weights

    def make_plans(self, model: nn.Module) -> dict[str, Plan]:
        cfg, layout = model.config, self.layout(model)
        s = self.settings(model)
        recipes, weights = self.mixed_recipes(layout, cfg.num_tokens)
        assert len(recipes) == s.num_steps, "mixed_recipes gives one recipe per step"
        return {
            "full": Plan("full", s, (self.full_recipe(layout),) * s.num_steps, cfg.num_tokens, layout=layout),
            "mixed": Plan("mixed", s, tuple(recipes), cfg.num_tokens, weights=weights, layout=layout),
        }

    # ---- made once per subclass ------------------------------------------------------------

    @pytest.fixture(scope="class")
    def model(self) -> nn.Module:
        torch.manual_seed(0)
        return self.make_model().eval()

    @pytest.fixture(scope="class")
    def plans(self, model) -> dict[str, Plan]:
        return self.make_plans(model)

    @pytest.fixture(scope="class")
    def variants(self, model, plans):
        """The mixed plan's variant graphs, unchecked: the test below compares them."""
        return build_variants(model, plans["mixed"], check=False)

    @pytest.fixture(scope="class")
    def full_artifact(self, model, plans, tmp_path_factory):
        return api.transform(model, plans["full"], tmp_path_factory.mktemp(f"{type(self).__name__}-full") / "art",
                             progress=False)

    @pytest.fixture(scope="class")
    def mixed_artifact(self, model, plans, tmp_path_factory):
        return api.transform(model, plans["mixed"], tmp_path_factory.mktemp(f"{type(self).__name__}-mixed") / "art",
                             progress=False)

    def inputs(self, model: nn.Module, plan: Plan, seed: int = 0) -> dict[str, torch.Tensor]:
        """x, t and the conditioning of the plan's model batch (null class / padded text included)."""
        return example_inputs(model, plan, list(plan.settings.model_inputs), seed=seed)

    # ---- 1. registration and the eager block loop ----------------------------------------------

    def test_adapter_is_the_registered_one(self, model):
        assert ADAPTERS[type(model)] is self.adapter and adapter_for(model) is self.adapter
        assert isinstance(model, self.adapter.model_type)
        cfg = model.config
        fam = family_named(self.family)
        layout = self.layout(model)
        assert cfg.family is fam and cfg.block_layout() == fam.block_layout(cfg) == layout
        assert cfg.branches == self.full_recipe(layout).branches
        if self.adapter.uniform:
            assert cfg.branches == fam.branches == self.adapter.branch_names
        assert cfg.text_conditioned == bool(self.text_length)
        dims = self.adapter.dims(model)
        assert (dims.depth, dims.num_tokens, dims.hidden_size, dims.num_heads) == (
            cfg.depth, cfg.num_tokens, cfg.hidden_size, cfg.num_heads)

    def test_family_builds_the_model_with_the_state_dict_it_declares(self, model):
        cfg = model.config
        fam = family_named(self.family)
        rebuilt = fam.build(cfg)
        assert type(rebuilt) is type(model) and rebuilt.config == cfg
        assert fam.state_dict_shapes(cfg) == {k: tuple(v.shape) for k, v in model.state_dict().items()}

    def test_run_blocks_is_the_models_forward(self, model, plans):
        feeds = self.inputs(model, plans["full"], seed=1)
        x, t, y = feeds["x"], feeds["t"], conditioning_of(feeds)
        with torch.no_grad():
            ref = forward(model, x, t, y)
            loop = run_blocks(model, x, t, y, lambda l, b, u, fn: fn(u()))
            assert max_diff(loop, ref) <= GRAPH_ATOL
            assert ref.abs().max().item() > 0.1  # not a degenerate model
            for block, name in self.branches(self.layout(model)):  # every branch of every block reaches the output
                dropped = run_blocks(model, x, t, y, lambda l, b, u, fn: 0 * fn(u()) if (l, b) == (block, name)
                                     else fn(u()))
                assert max_diff(dropped, ref) > 1e-4, (block, name)

    # ---- 2. capture ----------------------------------------------------------------------------

    def test_capture_gives_one_leaf_per_block(self, model, plans):
        cap = capture(model)
        paths = self.adapter.block_paths(model)
        assert len(paths) == model.config.depth and cap.adapter is self.adapter
        kinds = tuple(kind.block_type for kind in self.adapter.kinds)
        calls = [n for n in cap.gm.graph.nodes if n.op == "call_module"
                 and isinstance(cap.gm.get_submodule(n.target), kinds)]
        assert [n.target for n in calls] == paths == [b.path for b in cap.blocks]
        assert [b.kind for b in cap.blocks] == [kind.name for _, kind in self.adapter.block_table(model)]
        assert [b.index for b in cap.blocks] == list(range(len(paths)))
        expanded = expand_blocks(cap.gm)
        assert sorted(branch_nodes(expanded)) == sorted(self.branches(self.layout(model)))
        feeds = self.inputs(model, plans["full"], seed=2)
        inputs = [feeds[n] for n in plans["full"].settings.model_inputs]
        with torch.no_grad():
            ref = forward(model, feeds["x"], feeds["t"], conditioning_of(feeds))
            assert max_diff(cap.gm(*inputs), ref) <= GRAPH_ATOL
            assert max_diff(expanded(*inputs), ref) <= GRAPH_ATOL

    # ---- 3. every action through the passes -----------------------------------------------------

    def test_the_mixed_plan_uses_every_action_on_every_branch(self, plans):
        plan = plans["mixed"]
        layout = plan.block_layout()
        for name in {br for _, br in self.branches(layout)}:
            kinds = {a.kind for r in plan.recipes for _, br, a in r.items() if br == name}
            tokens = any(self.tokens(layout, l, br) for l, br in self.branches(layout) if br == name)
            assert kinds == set(ACTION_KINDS) - (set() if tokens else {"partial", "dynamic"}), (name, kinds)
        assert max(plan.history(k) for k in plan.cache_keys()) == 2  # a forecast from two history entries
        constants = any(b.prepare is not None for kind in self.adapter.kinds for b in kind.branches)
        roles = [r.constants for r in plan.recipes]
        assert roles == (["write"] + ["read"] * (len(roles) - 1) if constants else [""] * len(roles))
        assert bool(plan.constant_names()) == constants

    def test_every_variant_equals_the_eager_reference(self, model, plans, variants):
        plan = plans["mixed"]
        assert [v.id for v in variants] == [f"v{i}" for i in range(len(plan.variants()))]
        worst = {}
        for variant, recipe in zip(variants, plan.variants()):
            assert (variant.input_names, variant.output_names) == plan.variant_io(recipe)
            assert list(io_names(variant.gm)[0]) == variant.input_names
            for seed in (0, 1):  # random caches (and forecast weights, run constants) of two seeds
                feeds = example_inputs(model, plan, variant.input_names, seed=100 + seed, recipe=recipe)
                with torch.no_grad():
                    got = variant.gm(*[feeds[n] for n in variant.input_names])
                got = got if isinstance(got, tuple) else (got,)
                caches = {n: v for n, v in feeds.items() if not is_model_input(n)}
                ref, fresh = reference_step(model, feeds["x"], feeds["t"], conditioning_of(feeds), recipe, caches,
                                            keep_inputs=True)
                for name, value in zip(variant.output_names, got):
                    want = ref if name == OUT else fresh[name]
                    assert value.shape == want.shape, (variant.id, name)
                    worst[(variant.id, recipe.short(), name)] = max(worst.get((variant.id, recipe.short(), name), 0.0),
                                                                    max_diff(value, want))
        bad = {k: v for k, v in worst.items() if not v <= GRAPH_ATOL}
        assert not bad, bad

    # ---- 4. calibration's blended step ------------------------------------------------------------

    def test_mixed_step_is_the_model_at_one_and_the_caches_at_zero(self, model, plans):
        plan = plans["full"]
        cfg, layout = model.config, self.layout(model)
        feeds = self.inputs(model, plan, seed=3)
        x, t, y = feeds["x"], feeds["t"], conditioning_of(feeds)
        g = torch.Generator().manual_seed(4)
        names = [cache_name(l, br) for l, br in self.branches(layout)]
        caches = {n: torch.randn(plan.cache_shape(n, cfg.hidden_size), generator=g) for n in names}
        tokens = [cache_name(l, br) for l, br in self.branches(layout) if self.tokens(layout, l, br)]
        n = cfg.num_tokens
        with torch.no_grad():
            ref = forward(model, x, t, y)
            full_ref, computed = reference_step(model, x, t, y, self.full_recipe(layout), {})
            for ones in ({k: 1.0 for k in names}, {k: torch.ones(n, 1) for k in tokens}):
                out, used = mixed_step(model, x, t, y, ones, caches)
                assert max_diff(out, ref) <= GRAPH_ATOL
                assert max(max_diff(used[k], computed[k]) for k in names) <= GRAPH_ATOL
            reuse_recipe = Recipe.uniform(cfg.depth, REUSE, layout.branches())
            reused, _ = reference_step(model, x, t, y, reuse_recipe, caches)
            assert max_diff(reused, ref) > 1e-3  # the caches are not the model's values
            image_only = all(layout.streams(l, br) == (IMAGE,) for l, br in self.branches(layout))
            # (a zero token mask still computes the rows of other streams: the reuse only where there are none)
            for zeros in ({k: 0.0 for k in names},) + (({k: torch.zeros(n, 1) for k in names},) if image_only else ()):
                out, used = mixed_step(model, x, t, y, zeros, caches)
                assert max_diff(out, reused) <= GRAPH_ATOL
                assert all(torch.equal(used[k], caches[k]) for k in names)
            kept = [1, 4, 6, 11, 15]  # a 0/1 token mask is the partial action on those tokens
            part_recipe = Recipe(tuple(tuple(partial(kept) if self.tokens(layout, l, br) else REUSE for br in names_l)
                                       for l, names_l in enumerate(layout.branches())), layout.branches())
            part, fresh = reference_step(model, x, t, y, part_recipe, caches)
            out, used = mixed_step(model, x, t, y, {**{k: 0.0 for k in names}, **{k: token_mask(kept, n)
                                                                                   for k in tokens}}, caches)
            assert max_diff(out, part) <= GRAPH_ATOL
            assert max(max_diff(used[k], fresh[k]) for k in tokens) <= GRAPH_ATOL
            assert all(torch.equal(used[k], caches[k]) for k in names if k not in tokens)

    # ---- 5. export, load, sample -----------------------------------------------------------------

    def check_loads(self, model: nn.Module, plan: Plan, path) -> None:
        art = load_artifact(path)
        assert art.plan == plan and art.plan.schedule() == plan.schedule()
        assert art.model_config == model.config
        assert art.variant_ids() == [f"v{i}" for i in range(len(plan.variants()))]
        for spec, recipe in zip(art.variants, plan.variants()):
            assert (list(spec.input_names), list(spec.output_names)) == plan.variant_io(recipe)

    def sample(self, model: nn.Module, path, backend: str) -> torch.Tensor:
        cond = self.conditioning(model, self.images)
        kw = {"text": cond} if isinstance(cond, Text) else {"classes": cond}
        got, labels = api.sample(path, per_class=1, seed=3, backend=backend, progress=False, **kw)
        assert labels == (list(range(self.images)) if isinstance(cond, Text) else cond)
        return got

    def test_full_plan_samples_what_eager_sampling_samples(self, model, plans, full_artifact):
        plan = plans["full"]
        self.check_loads(model, plan, full_artifact)
        eager = api.sample_eager(model, plan.settings, self.conditioning(model, self.images), seed=3)
        diffs = {}
        for backend in ("ort", "torch"):
            got = self.sample(model, full_artifact, backend)
            assert got.shape == eager.shape
            diffs[backend] = scaled_diff(got, eager)
        assert max(diffs.values()) <= SAMPLE_TOL, (diffs, scale(eager))

    def test_mixed_plan_samples_the_same_on_both_backends_and_eagerly(self, model, plans, mixed_artifact):
        plan = plans["mixed"]
        self.check_loads(model, plan, mixed_artifact)
        ort_got = self.sample(model, mixed_artifact, "ort")
        torch_got = self.sample(model, mixed_artifact, "torch")
        cond = self.conditioning(model, self.images)
        eager = EagerPlan(model, plan).samples(cond, seed=3)
        full = api.sample_eager(model, plan.settings, cond, seed=3)
        diffs = {"ort-torch": scaled_diff(ort_got, torch_got), "ort-eager": scaled_diff(ort_got, eager),
                 "torch-eager": scaled_diff(torch_got, eager)}
        assert max(diffs.values()) <= BACKEND_TOL, (diffs, scale(eager))
        # the plan's samples are not the full model's, by more than the tolerance (the steps' outputs
        # differ by far more: test_mixed_plan_steps_and_caches_agree_on_both_backends)
        assert scaled_diff(full, eager) > 3 * BACKEND_TOL, scaled_diff(full, eager)

    def test_mixed_plan_steps_and_caches_agree_on_both_backends(self, model, plans, mixed_artifact):
        """Step by step along the eager trajectory: every step's output and every cache the two
        runners carry (history entries, branch inputs, run constants) equal each other (1e-5) and the
        eager plan loop's (1e-4), relative to their size; a caching step's output is not the model's."""
        plan = plans["mixed"]
        art = load_artifact(mixed_artifact)
        eager = EagerPlan(model, plan)
        worst: dict[str, float] = {}
        effects: list[float] = []  # how far each caching step's output is from the model's

        def note(what: str, value: float) -> None:
            worst[what] = max(worst.get(what, 0.0), value)

        with api.make_runner("ort", art) as ort_runner, api.make_runner("torch", art) as torch_runner:
            runners = {"ort": ort_runner, "torch": torch_runner}
            dispatch = {b: ScheduleDispatcher.for_plan(r, plan) for b, r in runners.items()}

            def step(i, x, t, y):
                ref = eager.step(i, x, t, y)
                outs = {b: d(i, x, t, y) for b, d in dispatch.items()}
                note("out ort-torch", scaled_diff(outs["ort"], outs["torch"]))
                note("out ort-eager", scaled_diff(outs["ort"], ref))
                if not plan.recipes[i].is_full:
                    with torch.no_grad():
                        effects.append(max_diff(ref, forward(model, x, t, y)))
                carried = {b: {**{n: r.to_torch(v) for n, v in dispatch[b].caches.items()},
                               **{history_name(*_key(n), j): r.to_torch(v) for n, entries in dispatch[b].history.items()
                                  for j, v in enumerate(entries)}} for b, r in runners.items()}
                assert sorted(carried["ort"]) == sorted(carried["torch"]) == sorted(eager.carried()), i
                for name, value in eager.carried().items():
                    note("caches ort-torch", scaled_diff(carried["ort"][name], carried["torch"][name]))
                    note("caches ort-eager", scaled_diff(carried["ort"][name], value))
                return ref

            s, cfg = plan.settings, model.config
            cond = self.conditioning(model, s.batch)
            sampler_for(s, cfg).sample(step, make_noise(s.batch, cfg.in_channels, s.resolution, 0),
                                       take(cond, list(range(s.batch))))
        assert dispatch["ort"].calls == dispatch["torch"].calls == plan.schedule()
        assert worst["out ort-torch"] <= BACKEND_TOL and worst["caches ort-torch"] <= BACKEND_TOL, worst
        assert worst["out ort-eager"] <= SAMPLE_TOL and worst["caches ort-eager"] <= SAMPLE_TOL, worst
        assert len(effects) == 3 and min(effects) > 10 * BACKEND_TOL, effects  # seen: 5e-4 .. 6e-3


def _key(name: str) -> tuple[int, str]:
    """(block, branch) of a cache name `cache.<l>.<branch>`."""
    _, block, branch = name.split(".")
    return int(block), branch


class EagerPlan:
    """A plan run eagerly, as the dispatcher runs its graphs: `reference_step` at each step, with the
    caches (outputs, branch inputs, run constants) and each forecast branch's history carried from
    step to step. `samples` samples like `api.sample` (same noise, runs and sampler)."""

    def __init__(self, model: nn.Module, plan: Plan):
        self.model, self.plan = model, plan
        self.caches: dict[str, torch.Tensor] = {}
        self.history: dict[str, list[torch.Tensor]] = {}  # computed outputs, newest first

    def reset(self) -> None:
        self.caches.clear()
        self.history.clear()

    def step(self, i: int, x: torch.Tensor, t: torch.Tensor, y) -> torch.Tensor:
        plan, recipe = self.plan, self.plan.recipes[i]
        feeds = dict(self.caches)
        for (block, branch), points in recipe.forecasts():
            entries = self.history[cache_name(block, branch)]
            for j in range(points):  # an entry that does not exist yet has weight 0: the oldest stands in
                feeds[history_name(block, branch, j)] = entries[min(j, len(entries) - 1)]
        weights = plan.step_weights(i)
        if weights is not None:
            feeds[FORECAST_WEIGHTS] = torch.from_numpy(weights)
        out, fresh = reference_step(self.model, x, t, y, recipe, feeds, keep_inputs=True)
        carried = set(plan.cache_names()) | set(plan.constant_names())
        self.caches.update((n, v) for n, v in fresh.items() if n in carried)
        for block, branch, action in recipe.items():
            name = cache_name(block, branch)
            if action.computes and name in carried:
                entries = self.history.setdefault(name, [])
                entries.insert(0, fresh[name])
                del entries[plan.history((block, branch)):]
        return out

    def carried(self) -> dict[str, torch.Tensor]:
        """Every tensor carried to the next step, by graph I/O name (history entries `….h<j>` included)."""
        out = dict(self.caches)
        out.update((history_name(*_key(n), j), v) for n, entries in self.history.items() for j, v in enumerate(entries))
        return out

    def samples(self, cond, seed: int) -> torch.Tensor:
        s, cfg = self.plan.settings, self.model.config
        noise = make_noise(len(cond), cfg.in_channels, s.resolution, seed)
        return run_batches(self.step, self.reset, sampler_for(s, cfg), cond, noise, s.batch, seed)


def import_every_family() -> None:
    """Import every registered family's module, so that each registers its adapter."""
    from tcgraph.models.families import FAMILIES

    for fam in FAMILIES.values():
        importlib.import_module(fam.module)
