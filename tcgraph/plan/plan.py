"""The plan: what every branch of every block does at every denoising step.

Vocabulary (docs/design.md): an *action* per (step, block, branch) — `compute`,
`reuse`, `partial(k, indices)` (TokenCache: k constant token ids recomputed) or
`dynamic(k)` (ToCa-style: k tokens recomputed, chosen per sample inside the graph); a
*recipe* is the actions of one step; a *variant* is one distinct recipe (one static
graph); the *schedule* maps steps to variant ids.

Cache writes follow docs/design.md: a recipe that computes a branch whose cache *any* step of
the plan reads also outputs that cache. The write set is therefore a function of the
recipe and the plan, and one recipe is always one graph.

Input caches (dynamic actions). A `dynamic(k)` branch scores every token by how much its
branch input changed since its cache row was written, so besides the pre-gate output
cache `cache.<l>.<branch>` ([B, N, D]) it needs a second cache, the *branch input*
`cache.<l>.<branch>.in` ([B, N, D]): the modulated, normed hidden state u that fed the
branch, row by row as it was when that row of `cache.<l>.<branch>` was last written.
A dynamic step reads both and writes both (the k recomputed rows of each are replaced);
by the same rule as above, every recipe that computes a branch on which *any* step of the
plan is dynamic also outputs that branch's `.in` (its u). A partial action keeps no `.in`,
so a plan may not mix partial and dynamic actions on one (block, branch) (`validate`).

Forecast actions (docs/design.md, "Forecast actions"). `forecast(n)` predicts a branch's
pre-gate output from its *history*, the outputs of its last n computing steps (compute,
partial or dynamic), newest first: `ŷ = Σ_j w_j · H_j`. The newest history entry is the
branch's cache `cache.<l>.<branch>` itself; older ones are `cache.<l>.<branch>.h<j>`
(j = 1 … r−1, r = the most points any step forecasts that branch from, at most
`MAX_HISTORY`). The weights are per (step, block, branch) and live in `Plan.weights`, not in
the recipe: a variant is one recipe *structure*, and the dispatcher feeds each step's
weights as one small graph input, `forecast.w` (float32, the recipe's forecast branches in
block order, n weights each, newest first), so learned weights that differ at every step
need no extra variants. A forecast step computes nothing and writes no history. Early in a
run a branch may have fewer computed outputs than its forecast reads: the weights of the
entries that do not exist yet are 0 (the dispatcher feeds the oldest entry there), so one
recipe serves the first rounds too.

Run constants (docs/design.md: conditioning that does not change within a run is computed once).
A branch named in `tcgraph.names.RUN_CONSTANTS` (`cross`: the keys and values of the text)
reads tensors that depend on the conditioning alone. With `carry_constants` (the default),
a plan's first step computes them and outputs them as caches `cache.<l>.cross.k`/`.v`, and
every later step that runs the branch reads them instead of projecting the text again.
`Recipe.constants` says which role a step plays ("write" at step 0, "read" after, "" for a
model without such branches or a plan that does not carry them); the plan sets it, so the
first step is a variant of its own even when a later step has the same actions (a `fora`
plan's full steps after the first read the constants: they are another graph).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace

from tcgraph.errors import TcgraphError
from tcgraph.names import (FORECAST_WEIGHTS, GATE_PARAMS, GATE_STATE, IMAGE, OUT, RUN_CONSTANTS, TEXT_STREAM, CacheKey,
                           branch_key, cache_key, cache_name, constant_name, history_name, input_cache_name,
                           is_constant)
from tcgraph.models.layout import Layout
from tcgraph.plan.gate import gate_shape, uniform_work, validate_gated
from tcgraph.plan.plan_json import PLAN_SCHEMA_VERSION, plan_from_dict, plan_to_dict  # noqa: F401  (re-exported)
from tcgraph.plan.actions import (  # noqa: F401  (re-exported: the plan's vocabulary)
    ACTION_KINDS, COMPUTE, MAX_HISTORY, REUSE, Action, dynamic, forecast, partial)
from tcgraph.plan.recipe import (  # noqa: F401  (re-exported)
    CONSTANT_ROLES, Recipe, cache_step_variants, constant_roles)
from tcgraph.sampling.settings import SamplerSettings



@dataclass(frozen=True)
class Plan:
    planner: str  # e.g. "full", "fora:3"
    settings: SamplerSettings
    recipes: tuple[Recipe, ...]  # one per step, generation order (0 = noisiest)
    num_tokens: int
    params: dict = field(default_factory=dict, compare=False)  # planner inputs, for the record
    # forecast weights: step -> {(block, branch): (w_1, ..., w_n)}, newest history entry first
    weights: dict = field(default_factory=dict, hash=False)
    carry_constants: bool = True  # run constants computed at step 0 and read after (module docstring)
    # each block's branches and the streams each writes (tcgraph.models.layout); None: the default,
    # every branch of the recipes' branches writes the image rows
    layout: Layout | None = None
    # gated steps (tcgraph.plan.gate): the threshold of each step, fed as `gate.params`; below 0 the
    # step computes (warm-up and final steps); None for a plan without gated steps
    gate_thresholds: tuple | None = field(default=None, hash=False)

    def __post_init__(self) -> None:
        if len(self.recipes) != self.settings.num_steps:
            raise TcgraphError(
                f"plan has {len(self.recipes)} recipes but its sampler settings say {self.settings.num_steps} steps"
            )
        if isinstance(self.weights, dict):  # one form: int steps, float tuples, no empty steps
            extra = sorted(s for s in self.weights if not (isinstance(s, int) and 0 <= s < len(self.recipes)))
            if extra:
                raise TcgraphError(f"forecast weights for steps {extra}, which the plan does not have")
            try:
                object.__setattr__(self, "weights", {
                    int(step): {tuple(k): tuple(float(v) if isinstance(v, int) and not isinstance(v, bool) else v
                                                for v in w) for k, w in per.items()}
                    for step, per in self.weights.items() if per})
            except (TypeError, ValueError, AttributeError) as e:
                raise TcgraphError(f"plan weights must map step -> {{(block, branch): weights}}: {e}") from None
        depths = {r.depth for r in self.recipes}
        if len(depths) != 1:
            raise TcgraphError(f"recipes disagree on the number of blocks: {sorted(depths)}")
        if len({r.branches for r in self.recipes}) != 1:
            raise TcgraphError(f"recipes disagree on the branches: {sorted({r.branches for r in self.recipes})}")
        self._set_layout()
        roles = self._constant_roles()
        object.__setattr__(self, "recipes", tuple(r if r.constants == role else replace(r, constants=role)
                                                  for r, role in zip(self.recipes, roles)))
        self.validate()

    def _set_layout(self) -> None:
        """Check the layout against the recipes' branches; store None for the default layout."""
        recipe = self.recipes[0]
        names = tuple(recipe.block_branches(l) for l in range(recipe.depth))
        layout = self.layout if self.layout is not None else Layout.image(names)
        if not isinstance(layout, Layout) or layout.branches() != names:
            raise TcgraphError(f"plan layout gives blocks the branches "
                               f"{[list(b) for b in layout.branches()] if isinstance(layout, Layout) else layout} "
                               f"but its recipes have {[list(b) for b in names]}")
        if TEXT_STREAM in {s for block in layout.blocks for _, streams in block for s in streams} \
                and self.settings.text_length < 1:
            raise TcgraphError("plan layout has text-stream branches but its settings have no text length; "
                                   "give text_length >= 1")
        object.__setattr__(self, "layout", None if layout.is_default else layout)

    def block_layout(self) -> Layout:
        """The plan's layout, the default one spelled out where it is not stored."""
        if self.layout is not None:
            return self.layout
        recipe = self.recipes[0]
        return Layout.image(tuple(recipe.block_branches(l) for l in range(recipe.depth)))

    @property
    def stream_rows(self) -> dict[str, int]:
        """Rows of each stream: the image tokens N, the text tokens L."""
        return {IMAGE: self.num_tokens, TEXT_STREAM: self.settings.text_length}

    def _constant_roles(self) -> list[str]:
        return constant_roles(self.recipes[0].branches, len(self.recipes), self.carry_constants)

    @property
    def depth(self) -> int:
        return self.recipes[0].depth

    @property
    def branches(self) -> tuple[str, ...]:
        """The model's branches, in the order each recipe lists them."""
        return self.recipes[0].branches

    def validate(self) -> None:
        """Every cache read must follow a step that computed that branch; token indices and
        dynamic token counts lie in 0..N-1 and 1..N; no branch mixes partial and dynamic."""
        filled: set[CacheKey] = set()
        computed: dict[CacheKey, int] = {}
        kinds: dict[CacheKey, set[str]] = {}
        self._validate_weights()
        self._validate_gate()
        layout = self.block_layout()
        for step, recipe in enumerate(self.recipes):
            for block, branch, action in recipe.items():
                if action.kind in ("partial", "dynamic") and IMAGE not in layout.streams(block, branch):
                    raise TcgraphError(
                        f"step {step} block {block} {branch}: a {action.kind} action chooses image tokens, but this "
                        f"branch writes the {' and '.join(layout.streams(block, branch))} rows only; compute, reuse "
                        "or forecast it")
                kinds.setdefault((block, branch), set()).add(action.kind)
                have = computed.get((block, branch), 0)
                if action.kind == "forecast" and recipe.gate is None and (have == 0 or any(
                        w != 0.0 for w in self.weights[step][(block, branch)][have:])):
                    raise TcgraphError(
                        f"step {step} forecasts {cache_name(block, branch)} from {action.points} history points but "
                        f"only {have} earlier steps computed it; a forecast needs one computed output, and the "
                        "weights of entries that do not exist yet must be 0"
                    )
                if action.kind == "dynamic" and not 1 <= action.size <= self.num_tokens:
                    raise TcgraphError(
                        f"step {step} block {block} {branch}: dynamic token count k={action.size} out of range "
                        f"1..{self.num_tokens}; use `reuse` to recompute no token"
                    )
                if action.reads_cache and (block, branch) not in filled:
                    raise TcgraphError(
                        f"step {step} reuses {cache_name(block, branch)} but no earlier step computed it; "
                        "the first step must compute every branch a later step reuses"
                    )
                if action.indices is not None and max(action.indices, default=-1) >= self.num_tokens:
                    raise TcgraphError(
                        f"step {step} block {block} {branch}: token index {max(action.indices)} out of range "
                        f"0..{self.num_tokens - 1}"
                    )
            filled.update((b, br) for b, br, a in recipe.items() if a.computes)
            for b, br, a in recipe.items():
                if a.computes:
                    computed[(b, br)] = computed.get((b, br), 0) + 1
        for (block, branch), seen in kinds.items():
            if {"partial", "dynamic"} <= seen:
                raise TcgraphError(
                    f"block {block} {branch} is partial at some steps and dynamic at others; a partial step "
                    f"does not keep the branch-input cache {input_cache_name(block, branch)} that dynamic "
                    "steps score against: use one token mode per branch"
                )

    def _validate_gate(self) -> None:
        validate_gated(self)

    @property
    def gate(self):
        """The plan's gate (every step has the same one), or None."""
        return self.recipes[0].gate

    def gate_shape(self, name: str, hidden_size: int) -> tuple[int, ...]:
        """Shape of a gated step's state tensor or its `gate.params` input (`tcgraph.plan.gate`)."""
        return gate_shape(self, name, hidden_size)

    def _validate_weights(self) -> None:
        """`weights` holds exactly one finite weight per history point of every forecast."""
        if not isinstance(self.weights, dict):
            raise TcgraphError(f"plan weights must be a dict of step -> {{(block, branch): weights}}, "
                               f"got {type(self.weights).__name__}")
        for step, recipe in enumerate(self.recipes):
            want = dict(recipe.forecasts())
            got = self.weights.get(step, {})
            if set(got) != set(want):
                raise TcgraphError(
                    f"step {step}: forecast weights are given for {sorted(map(_key_name, got))} but the step "
                    f"forecasts {sorted(map(_key_name, want))}; give weights for exactly the forecast branches"
                )
            for key, w in got.items():
                if len(w) != want[key] or not all(isinstance(v, float) and math.isfinite(v) for v in w):
                    raise TcgraphError(f"step {step} {_key_name(key)}: expected {want[key]} finite float weights "
                                       f"(one per history point), got {list(w)}")
        extra = sorted(s for s in self.weights if not (isinstance(s, int) and 0 <= s < len(self.recipes)))
        if extra:
            raise TcgraphError(f"forecast weights for steps {extra}, which the plan does not have")

    # ---- derived: variants, schedule, cache traffic -------------------------------

    def history(self, key: CacheKey) -> int:
        """History entries kept for a branch: the most points any step forecasts it from (1 = its cache only)."""
        return max([a.points for r in self.recipes for (b, br, a) in r.items()
                    if (b, br) == key and a.kind == "forecast"]
                   + [r.gate.points for r in self.recipes if key in r.gated_keys()], default=1)

    def history_steps(self, step: int, key: CacheKey) -> list[int]:
        """The steps before `step` that computed `key` (its history entries), newest first."""
        return [s for s in range(step - 1, -1, -1) if self.recipes[s].action(*key).computes]

    def step_weights(self, step: int):
        """The `forecast.w` input of `step` (float32 numpy array), or None when the step forecasts nothing."""
        import numpy as np

        layout = self.recipes[step].forecasts()
        if not layout:
            return None
        return np.array([w for key, _ in layout for w in self.weights[step][key]], dtype=np.float32)

    def step_feeds(self) -> list[dict]:
        """Per step, the graph inputs that come from the plan rather than from caches (`forecast.w`)."""
        import numpy as np

        feeds = []
        if self.gate is not None:  # each step's work shares: the planner's (`step_work`), else every block alike
            work = self.params.get("step_work") or uniform_work(self.gate, self.depth, len(self.recipes))
        for step, recipe in enumerate(self.recipes):
            w = self.step_weights(step)
            feeds.append({} if w is None else {FORECAST_WEIGHTS: w})
            if recipe.gate is not None:
                feeds[-1][GATE_PARAMS] = np.array([step, self.gate_thresholds[step], recipe.gate.max_skips,
                                                   *work[step]], dtype=np.float32)
        return feeds

    def cache_keys(self) -> list[CacheKey]:
        """Every (block, branch) that some step reads, in block order."""
        keys = {k for r in self.recipes for k in r.reads()}
        return sorted(keys, key=branch_key)

    def writes(self, recipe: Recipe) -> list[CacheKey]:
        """Caches a recipe outputs: the branches it computes that any step reads."""
        read = set(self.cache_keys())
        return [(b, br) for b, br, a in recipe.items() if a.computes and (b, br) in read]

    def input_cache_keys(self) -> list[CacheKey]:
        """Every (block, branch) some step is dynamic on: they carry `cache.<l>.<branch>.in` too."""
        keys = {k for r in self.recipes for k in r.input_reads()}
        return sorted(keys, key=branch_key)

    def input_writes(self, recipe: Recipe) -> list[CacheKey]:
        """Input caches a recipe outputs: the branches it computes that any step is dynamic on.
        Each is also in `writes(recipe)` (a dynamic branch reads its output cache)."""
        dyn = set(self.input_cache_keys())
        return [(b, br) for b, br, a in recipe.items() if a.computes and (b, br) in dyn]

    def cache_names(self) -> list[str]:
        """Every cache tensor name the plan carries between steps, in block order: each
        output cache, then its older history entries (forecast branches), then its input
        cache where it has one. Each is one [B, N, D] tensor."""
        dyn = set(self.input_cache_keys())
        return [n for b, br in self.cache_keys()
                for n in [history_name(b, br, j) for j in range(self.history((b, br)))]
                + ([input_cache_name(b, br)] if (b, br) in dyn else [])]

    def constant_keys(self) -> list[CacheKey]:
        """Every (block, branch) whose run constants some step reads, in block order."""
        keys = {k for r in self.recipes for k in r.constant_reads()}
        return sorted(keys, key=branch_key)

    def constant_writes(self, recipe: Recipe) -> list[CacheKey]:
        """Branches whose run constants `recipe` outputs: every one a later step reads, if it is the first step."""
        return self.constant_keys() if recipe.constants == "write" else []

    def constant_names(self) -> list[str]:
        """The run constants the plan carries (`cache.<l>.cross.k`, …), each one [B, L, D] tensor."""
        return [constant_name(b, br, what) for b, br in self.constant_keys() for what in RUN_CONSTANTS[br]]

    def cache_rows(self, name: str) -> int:
        """Rows of the cache tensor `name`: a branch cache (its input cache, history) has the rows of
        what its branch writes (the image tokens N for a DiT; the text rows L then the image rows for
        a branch of both streams, as the layout says); a run constant the text tokens L."""
        if is_constant(name):
            return self.settings.text_length
        block, branch = cache_key(name)
        return self.block_layout().rows(block, branch, self.stream_rows)

    def cache_shape(self, name: str, hidden_size: int) -> tuple[int, int, int]:
        """[B, rows, D] of the cache tensor `name` for the plan's model batch."""
        return self.settings.model_batch, self.cache_rows(name), hidden_size

    def cache_bytes(self, hidden_size: int, itemsize: int = 4) -> int:
        """Memory of every cache tensor the plan carries, for its model batch (float32 by default):
        the branch caches and the run constants, each `cache_shape`."""
        return sum(math.prod(self.cache_shape(n, hidden_size)) * itemsize
                   for n in self.cache_names() + self.constant_names())

    def variants(self) -> list[Recipe]:
        """Distinct recipes in order of first use; variant id `v<i>` is the i-th."""
        seen: dict[Recipe, None] = {}
        for r in self.recipes:
            seen.setdefault(r, None)
        return list(seen)

    def schedule(self) -> list[str]:
        index = {r: f"v{i}" for i, r in enumerate(self.variants())}
        return [index[r] for r in self.recipes]

    def variant_io(self, recipe: Recipe) -> tuple[list[str], list[str]]:
        """(input names, output names) of the variant graph for `recipe`: each cache name is
        followed by its input cache `….in` where the recipe reads (dynamic) or writes it; the run
        constants it reads or writes come after the branch caches, in block order."""
        if recipe.gate is not None:  # every history entry in and out (shifted in the graph), then the state
            history = [history_name(b, br, j) for b, br in recipe.gated_keys() for j in range(recipe.gate.points)]
            return (list(self.settings.model_inputs) + history + list(GATE_STATE) + [GATE_PARAMS],
                    [OUT] + history + list(GATE_STATE))
        in_reads, in_writes = set(recipe.input_reads()), set(self.input_writes(recipe))
        points = dict(recipe.forecasts())
        inputs = list(self.settings.model_inputs) + [n for b, br in recipe.reads()
                                    for n in [history_name(b, br, j) for j in range(points.get((b, br), 1))]
                                    + ([input_cache_name(b, br)] if (b, br) in in_reads else [])]
        inputs += [constant_name(b, br, what) for b, br in recipe.constant_reads() for what in RUN_CONSTANTS[br]]
        if points:
            inputs.append(FORECAST_WEIGHTS)
        outputs = [OUT] + [n for b, br in self.writes(recipe)
                             for n in (cache_name(b, br),) + ((input_cache_name(b, br),)
                                                             if (b, br) in in_writes else ())]
        outputs += [constant_name(b, br, what) for b, br in self.constant_writes(recipe) for what in RUN_CONSTANTS[br]]
        return inputs, outputs

    # ---- JSON (tcgraph.plan.plan_json) ----------------------------------------------

    def to_dict(self) -> dict:
        return plan_to_dict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_dict(cls, d: dict) -> "Plan":
        return plan_from_dict(cls, d)

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as e:
            raise TcgraphError(f"plan is not valid JSON: {e}") from None


def _key_name(key: CacheKey) -> str:
    return cache_name(*key)
