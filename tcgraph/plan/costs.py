"""Measured FLOPs: a model's cost table, counted from its operations rather than named by formula.

`measure_costs(model, batch, text_length)` runs the parts of one denoising step on FakeTensors
(no real compute, no real memory: weights stay where they are, a meta-device model works too)
under `torch.utils.flop_counter.FlopCounterMode`, with the shapes a plan fixes (the model batch,
guidance doubling included; the model's tokens; the text length of a text-conditioned model):

- per block kind and branch (blocks of one module class and parameter shapes are one kind; every
  registered model has one kind), one evaluation of the branch as the graphs run it: `full`, the
  branch module's own forward on all N rows (compute); and the branch on r kept rows (partial and
  dynamic, as `tcgraph.passes.token_prune`/`token_dynamic` emit it: a row-wise branch on the r rows;
  an attention branch with queries from the r rows and keys/values from all N, as
  `tcgraph.passes.emit.attention_rows`), at two row counts, giving `fixed + per_row · r`; the
  line is checked against a third count (N). A branch with run constants (PixArt's `cross`) is
  measured with its constants given, and its `prepare` (the text's keys and values) apart, as
  `constants`. `score` is a dynamic branch's token score, sum_D (u - u_cached)²: element-wise
  work FlopCounterMode does not count, so it is counted from u's shape, one multiply-add per
  element (2 · B · N · D), as `tcgraph.plan.flops` counts it;
- `step`: the rest of a step (embeddings, every block's adaLN modulation, the final layer), the
  model's own ops with every branch skipped; `run_constants`: the part of that which depends on
  the conditioning alone (a PixArt's caption projection of the text), which a plan that carries
  the run constants spends at its first step only. Ops are told apart by what they read: one
  depending on x or t is per step, one on the conditioning y alone a run constant.

Conventions. FlopCounterMode counts matrix products, convolutions and attention only: 2 FLOPs per
multiply-add (mm, addmm, bmm: 2·m·n·k; a convolution 2 · output elements · C_in·kh·kw; SDPA
4·B·h·S_q·S_k·d for its scores and mix, CPU's fused kernel counted by the same rule here since
torch's table lacks it); biases, softmax, norms, activations, modulation and gates count 0.
`tcgraph.plan.flops` uses the same convention (multiply-add = 2 FLOPs, matrix products and
attention scores/mix, element-wise work left out, a dynamic score as 2·N·D), so measured and formula
agree exactly where the formula's structure matches the model; where they differ, the model runs
products the formula does not name (diffusers' DiT embeds the timestep in every block and again
for its final layer, the formula once; PixArt-alpha 1024's micro-condition embeddings).
`benchmarks/flop_table.py` tabulates both.

`predict_flops(table, plan)` is `tcgraph.plan.flops.plan_flops` from the table: the same keys,
for the same plans (compute, reuse, partial(k), dynamic(k), forecast; run constants carried or not).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from tcgraph.errors import TcgraphError

if TYPE_CHECKING:
    import torch.nn as nn

    from tcgraph.models.adapter import BlockKind, BranchSpec, ModelAdapter
    from tcgraph.plan.plan import Action, Plan, Recipe

SCHEMA = 1
CONVENTION = "FlopCounterMode: 2 FLOPs per multiply-add; matmul, conv and attention (scores, mix) only"
_BRANCH_FIELDS = ("fixed", "per_row", "full", "score", "constants")


@dataclass(frozen=True)
class BranchCost:
    """FLOPs of one evaluation of one branch for the whole model batch (see the module docstring)."""

    fixed: int  # what r kept rows cost whatever r: an attention's keys and values of all N rows
    per_row: int  # each kept row (per sample, summed over the batch)
    full: int  # the branch module's own forward on all N rows
    score: int  # a dynamic(k) branch's token score over all N rows
    constants: int = 0  # its run constants (the text's keys and values), where the step projects them

    def flops(self, action: "Action", constants_read: bool = False) -> int:
        """FLOPs of `action` on this branch; `constants_read`: the step reads its run constants."""
        if action.kind in ("reuse", "forecast"):
            return 0
        extra = 0 if constants_read else self.constants
        if action.kind == "compute":
            return self.full + extra
        rows = self.fixed + self.per_row * action.k + extra
        return rows + (self.score if action.kind == "dynamic" else 0)


@dataclass(frozen=True)
class CostTable:
    """Measured FLOPs of a model's step for one model batch, token count and text length."""

    model: str  # the adapter's name
    batch: int  # model batch (guidance doubling included)
    tokens: int
    text_length: int
    rows: tuple[int, int]  # the kept-row counts the lines were measured at
    branches: tuple[str, ...]  # every block kind's branches, in recipe order
    blocks: tuple[int, ...]  # each block's kind (an index into `kinds`)
    kinds: tuple[tuple[BranchCost | None, ...], ...]  # per kind, per branch in `branches` order (None: it has none)
    step: int  # outside the branches, every step
    run_constants: int  # outside the branches, depending on the conditioning alone
    convention: str = CONVENTION

    def cost(self, block: int, branch: str) -> BranchCost:
        cost = (self.kinds[self.blocks[block]][self.branches.index(branch)]
                if 0 <= block < len(self.blocks) and branch in self.branches else None)
        if cost is None:
            raise TcgraphError(f"cost table of {self.model} has blocks 0..{len(self.blocks) - 1} and branches "
                               f"{list(self.branches)}; asked for block {block} {branch!r}")
        return cost

    def recipe_flops(self, recipe: "Recipe") -> int:
        """FLOPs of one step of `recipe` (its `constants` role says whether it projects the run constants)."""
        read = recipe.constants == "read"
        return (self.step + (0 if read else self.run_constants)
                + sum(self.cost(b, br).flops(a, read) for b, br, a in recipe.items()))

    def run_constant_total(self) -> int:
        """FLOPs a run spends once on its constants: the caption projection and every block's K/V."""
        return self.run_constants + sum(c.constants for b in self.blocks for c in self.kinds[b] if c is not None)

    def to_dict(self) -> dict:
        return {"schema": SCHEMA, "convention": self.convention, "model": self.model, "batch": self.batch,
                "tokens": self.tokens, "text_length": self.text_length, "rows": list(self.rows),
                "branches": list(self.branches), "blocks": list(self.blocks),
                "kinds": [{br: {f: getattr(c, f) for f in _BRANCH_FIELDS} for br, c in zip(self.branches, kind)
                           if c is not None} for kind in self.kinds],
                "step": self.step, "run_constants": self.run_constants}

    @classmethod
    def from_dict(cls, d: Any) -> "CostTable":
        """The table `to_dict` wrote; refuses another schema or a malformed one, naming what is wrong."""
        if not isinstance(d, dict) or d.get("schema") != SCHEMA:
            got = d.get("schema") if isinstance(d, dict) else type(d).__name__
            raise TcgraphError(f"cost table: expected a dict with schema {SCHEMA}, got {got!r}")
        try:
            branches = tuple(str(b) for b in d["branches"])
            kinds = tuple(tuple(BranchCost(**{f: _count(kind[br][f], f"{br}.{f}") for f in _BRANCH_FIELDS})
                                if br in kind else None for br in branches) for kind in d["kinds"])
            blocks = tuple(_count(b, "blocks") for b in d["blocks"])
            table = cls(str(d["model"]), _count(d["batch"], "batch"), _count(d["tokens"], "tokens"),
                        _count(d["text_length"], "text_length"), tuple(_count(r, "rows") for r in d["rows"]),
                        branches, blocks, kinds, _count(d["step"], "step"),
                        _count(d["run_constants"], "run_constants"), str(d.get("convention", CONVENTION)))
        except (KeyError, TypeError, AttributeError) as e:
            raise TcgraphError(f"cost table: missing or malformed field {e}") from None
        if any(not 0 <= b < len(kinds) for b in blocks) or len(table.rows) != 2:
            raise TcgraphError(f"cost table: block kinds {sorted(set(blocks))} for {len(kinds)} kinds, rows "
                               f"{list(table.rows)} (two counts expected)")
        return table


def _count(v: Any, name: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise TcgraphError(f"cost table: {name} must be a non-negative int, got {v!r}")
    return v


# ---- measuring ----------------------------------------------------------------------------


def measure_costs(model: "nn.Module", batch: int, text_length: int = 0,
                  rows: tuple[int, int] | None = None) -> CostTable:
    """The cost table of `model` (its adapter: `tcgraph.models.adapter.adapter_for`) for a model
    batch of `batch` rows (2 × images with guidance), `text_length` text tokens (a text-conditioned
    model; 0 otherwise), kept rows measured at `rows` (default N/4, N/2; 1 ≤ r1 < r2 ≤ N)."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    from tcgraph.models.adapter import adapter_for

    from tcgraph.names import BRANCH_ORDER, IMAGE

    adapter = adapter_for(model)
    cfg, dims = model.config, adapter.dims(model)
    n = dims.num_tokens
    text = bool(getattr(cfg, "text_conditioned", False))
    for name, v, lo in (("batch", batch, 1), ("text_length", text_length, 0)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise TcgraphError(f"measure_costs: {name} must be an int >= {lo}, got {v!r}")
    if text != (text_length > 0):
        need = "reads text: give its text_length" if text else "reads class ids: text_length must be 0"
        raise TcgraphError(f"measure_costs: {adapter.name} {need} (got {text_length})")
    rows = rows or (max(1, n // 4), max(2, n // 2))
    if not 1 <= rows[0] < rows[1] <= n:
        raise TcgraphError(f"measure_costs: kept-row counts {rows} must satisfy 1 <= r1 < r2 <= N = {n}")
    params = [p for p in model.parameters()]
    device = params[0].device if params else torch.device("cpu")
    with torch.no_grad(), FakeTensorMode(allow_non_fake_inputs=True):
        side = cfg.input_size
        x = torch.empty(batch, cfg.in_channels, side, side, device=device)
        t = torch.zeros(batch, dtype=torch.int64, device=device)
        pooled = getattr(cfg, "pooled_channels", 0)  # pooled text embeddings in place of the mask
        y = ((torch.empty(batch, text_length, cfg.caption_channels, device=device),
              torch.empty(batch, pooled, device=device) if pooled else torch.ones(batch, text_length, device=device))
             if text
             else torch.zeros(batch, dtype=torch.int64, device=device))
        if cfg.family.guidance_of(cfg) == "input":  # the guidance scale, after the conditioning (as the graphs read it)
            y = (*(y if isinstance(y, tuple) else (y,)), torch.ones(batch, device=device))
        step, run_constants = _fixed_flops(adapter, model, x, t, y)
        h, cond = adapter.embed(model, x, t, y)
        cond = cond if isinstance(cond, tuple) else (cond,)
        hs = dict(zip(adapter.streams, (h,) if len(adapter.streams) == 1 else h))
        table = adapter.block_table(model)
        blocks = [model.get_submodule(path) for path, _ in table]
        kinds, first = _kinds(blocks)
        names = tuple(b for b in BRANCH_ORDER if any(b in kind.branch_names for kind in adapter.kinds))
        costs = tuple(tuple(_branch_cost(adapter, table[l][1], blocks[l], table[l][1].branch(br), hs, cond, rows)
                            if br in table[l][1].branch_names else None for br in names) for l in first)
    assert hs[IMAGE].shape[1] == n
    return CostTable(adapter.name, batch, n, text_length, tuple(rows), names, kinds, costs, step, run_constants)


def plan_costs(model: "nn.Module", plan: "Plan") -> CostTable:
    """`measure_costs` with the shapes `plan`'s settings fix (model batch, text length)."""
    return measure_costs(model, plan.settings.model_batch, plan.settings.text_length)


def _counter():
    """A FlopCounterMode that also counts CPU's fused attention kernel (torch's table lacks it)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

    def cpu_sdpa(query, key, value, *args, out_shape=None, **kwargs) -> int:
        return sdpa_flop_count(query, key, value)

    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    return FlopCounterMode(display=False, custom_mapping={op: cpu_sdpa} if op is not None else {})


def _count_flops(fn: Callable[[], Any]) -> int:
    with _counter() as counter:
        fn()
    return int(counter.get_total_flops())


def _kinds(blocks: list) -> tuple[tuple[int, ...], list[int]]:
    """Each block's kind (class and parameter shapes) and the first block of each kind."""
    signatures: list = []
    first: list[int] = []
    kinds = []
    for l, block in enumerate(blocks):
        sig = (type(block), tuple((k, tuple(v.shape)) for k, v in block.state_dict(keep_vars=True).items()))
        if sig not in signatures:
            signatures.append(sig)
            first.append(l)
        kinds.append(signatures.index(sig))
    return tuple(kinds), first


def _fixed_flops(adapter: "ModelAdapter", model: "nn.Module", x, t, y) -> tuple[int, int]:
    """(per-step FLOPs, run-constant FLOPs) of the model's step with every branch skipped."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten
    from torch.utils.weak import WeakIdKeyDictionary

    STEP, COND = 1, 2
    tags = WeakIdKeyDictionary()
    for v in (x, t):
        tags[v] = STEP
    for v in tree_flatten(y)[0]:
        tags[v] = COND
    split = {"step": 0, "constant": 0}

    class Split(TorchDispatchMode):
        """Tags each result with what it depends on (x/t, the conditioning) and books the FLOPs the
        counter below it counted for the op: per step, or run constant (conditioning alone)."""

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            tag = 0
            for a in tree_flatten((args, kwargs))[0]:
                if isinstance(a, torch.Tensor):
                    tag |= tags.get(a, 0)
            before = counter.get_total_flops()
            out = func(*args, **kwargs)
            split["constant" if tag == COND else "step"] += counter.get_total_flops() - before
            if tag:
                for o in tree_flatten(out)[0]:
                    if isinstance(o, torch.Tensor):
                        tags[o] = tags.get(o, 0) | tag
            return out

    zero = torch.zeros((), device=x.device)
    with _counter() as counter, Split():
        adapter.run_blocks(model, x, t, y, lambda l, b, u, fn: zero)
    if split["step"] + split["constant"] != counter.get_total_flops():  # pragma: no cover - a torch change
        raise TcgraphError("measure_costs: the per-step / run-constant split lost FLOPs; the counter and the "
                           "splitting mode disagree")
    return int(split["step"]), int(split["constant"])


def _branch_cost(adapter: "ModelAdapter", kind: "BlockKind", block: "nn.Module", spec: "BranchSpec",
                 hs: dict, cond: tuple, rows: tuple[int, int]) -> BranchCost:
    """One branch's costs. Kept rows are image rows: a branch that writes other streams' rows too
    computes all of those at any r (they are in `fixed`); one without image rows has no token cost."""
    import torch

    from tcgraph.models.official.dit import modulate
    from tcgraph.names import IMAGE

    mods = [getattr(block, m)(*cond).chunk(c, dim=1) for m, c in zip(kind.modulations, kind.chunk_counts)]
    module = block.get_submodule(spec.module)
    context = [cond[i] for i in spec.context]
    constants, args = 0, context
    if spec.prepare is not None:  # measured apart; the branch itself reads them
        prepare = getattr(module, spec.prepare)
        constants = _count_flops(lambda: prepare(*context))
        args = list(prepare(*context))

    def u_of(r: int | None = None):
        """u with the first r image rows (all with None) and every row of the other streams."""
        parts = []
        for read in spec.inputs:
            hidden = hs[read.stream] if read.stream != IMAGE or r is None else hs[IMAGE][:, :r]
            v = block.get_submodule(read.norm)(hidden) if read.norm is not None else hidden
            mod = mods[read.modulation]
            parts.append(modulate(v, mod[read.shift], mod[read.scale]) if read.shift is not None else v)
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    full = _count_flops(lambda: module(u_of(), *args))
    if IMAGE not in spec.streams:  # no token action on it: every action costs its full forward or nothing
        return BranchCost(full, 0, full, 0, constants)
    n = hs[IMAGE].shape[1]
    others = sum(hs[s].shape[1] for s in spec.streams if s != IMAGE)

    def kept(r: int) -> int:
        if spec.attention is None:  # row-wise: norm, modulation and the branch on the kept rows
            return _count_flops(lambda: module(u_of(r), *args))
        if spec.attention.rows is not None:  # the branch's own rows method: other streams' rows, image rows 0..r-1
            image_idx = torch.arange(r, device=hs[IMAGE].device)
            return _count_flops(lambda: getattr(module, spec.attention.rows)(u_of(), image_idx, *args))
        return _count_flops(lambda: _attention_rows(module, spec, u_of(), others + r))

    (r1, r2), (c1, c2) = rows, (kept(rows[0]), kept(rows[1]))
    per_row, rest = divmod(c2 - c1, r2 - r1)
    fixed = c1 - per_row * r1
    at_n = kept(n)
    if rest or fixed < 0 or at_n != fixed + per_row * n:
        raise TcgraphError(f"{adapter.name} branch {spec.name}: its FLOPs are not affine in the kept rows "
                           f"({c1} at {r1}, {c2} at {r2}, {at_n} at {n}); partial and dynamic costs cannot be "
                           "told from two row counts")
    return BranchCost(fixed, per_row, full, 2 * hs[IMAGE].numel(), constants)


def _attention_rows(module: "nn.Module", spec: "BranchSpec", u, r: int):
    """Queries of r of u's rows, keys and values of all rows, as `emit.attention_rows` emits them."""
    import torch.nn.functional as F

    att = spec.attention
    out_proj = module.get_submodule(att.out_proj)
    b, d = u.shape[0], out_proj.in_features
    heads = int(getattr(module, att.num_heads))
    hd = int(getattr(module, att.head_dim)) if att.head_dim is not None else d // heads
    kept = u[:, :r]
    if att.fused:
        proj = module.get_submodule(att.in_proj)
        bias = proj.bias if proj.bias is not None else None
        q = F.linear(kept, proj.weight[:d], None if bias is None else bias[:d])
        kv = F.linear(u, proj.weight[d:], None if bias is None else bias[d:])
        kv = kv.reshape(b, -1, 2, heads, hd).permute(2, 0, 3, 1, 4)
        key, value = kv[0], kv[1]
    else:
        q = module.get_submodule(att.q_proj)(kept)
        key, value = (module.get_submodule(p)(u).reshape(b, -1, heads, hd).transpose(1, 2)
                      for p in (att.k_proj, att.v_proj))
    q = q.reshape(b, r, heads, hd).transpose(1, 2)
    out = F.scaled_dot_product_attention(q, key, value).transpose(1, 2).reshape(b, r, d)
    return out_proj(out)


# ---- predicting a plan's FLOPs ------------------------------------------------------------------


def predict_flops(table: CostTable, plan: "Plan") -> dict:
    """`tcgraph.plan.flops.plan_flops` from a measured table: per-variant and whole-run FLOPs and the
    predicted speedup, the same keys (`full_step`, `per_variant`, `fraction`, `total`, `full_total`,
    `recomputed_total`, `constants_speedup`, `predicted_speedup`)."""
    from tcgraph.names import BRANCH_ORDER
    from tcgraph.plan.recipe import branch_set

    s = plan.settings
    want = {"model batch": (table.batch, s.model_batch), "tokens": (table.tokens, plan.num_tokens),
            "text length": (table.text_length, s.text_length), "blocks": (len(table.blocks), plan.depth),
            "branches": (table.branches, tuple(b for b in BRANCH_ORDER if b in branch_set(plan.branches)))}
    bad = [f"{k} {got!r} (table) vs {need!r} (plan)" for k, (got, need) in want.items() if got != need]
    if bad:
        raise TcgraphError(f"cost table of {table.model} does not fit the plan {plan.planner}: {'; '.join(bad)}; "
                           "measure it with the plan's settings (tcgraph.plan.costs.plan_costs)")
    from tcgraph.plan.flops import run_flops

    return run_flops(plan, table.recipe_flops)
