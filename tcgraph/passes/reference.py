"""Eager reference of a recipe: a plain Python loop over the blocks of a model.

This is the definition the rewritten graphs are checked against, written without fx and
without the passes' code: if a pass is wrong, the two disagree.

A partial branch is defined by what it means, not by how token_prune computes it: run
the whole branch on all tokens and keep the rows of the kept tokens. Each output row of
attention depends only on its own query (keys and values come from all tokens) and the
MLP is row-wise, so those rows are exactly "queries from the kept tokens, keys and values
from all tokens" and "the MLP of the kept tokens"; they replace the same rows of the
cached pre-gate output, and the fresh gate multiplies the result.

A branch that writes other streams' rows too (a joint attention over text and image rows)
recomputes every one of those at a partial or dynamic step, and the image rows its action
chooses (`BranchInput.token_rows`; dynamic: scored among the image rows only).

A dynamic(k) branch likewise, with the rows chosen per sample: u is the branch input
(modulated norm of h), u_old = `cache.<l>.<branch>.in`; score[b, i] = sum_D (u - u_old)²;
the rows of sample b are the k of topk(score[b]); in clones of both caches those rows
take the fresh branch output and u. Both updated caches are returned in `fresh`. Ties
in the score are broken as torch.topk breaks them (the graph's TopK may differ there).

A forecast(n) branch is Σ_j w_j · H_j over its history `cache.<l>.<branch>` (H_0),
`cache.<l>.<branch>.h<j>`, with the weights read from `caches["forecast.w"]` (the recipe's
forecast branches in block order, n each); it computes nothing and returns nothing fresh.

Run constants (a cross branch's keys and values of the text): a recipe that reads them
(`Recipe.constant_reads`) takes them from `caches["cache.<l>.cross.k"]` and `….v`; one that
writes them (a plan's first step) returns what it computed in `fresh` under those names.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

from tcgraph.errors import TcgraphError
from tcgraph.models.adapter import BranchInput, run_blocks
from tcgraph.plan.plan import Recipe
from tcgraph.names import FORECAST_WEIGHTS, RUN_CONSTANTS, cache_name, constant_name, history_name, input_cache_name


@torch.no_grad()
def reference_step(
    model: nn.Module,
    x: torch.Tensor,
    t: torch.Tensor,
    y: torch.Tensor,
    recipe: Recipe,
    caches: dict[str, torch.Tensor],
    *,
    keep_inputs: bool = False,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One model evaluation under `recipe`; returns (output, pre-gate branch outputs computed).

    `caches` maps `cache.<l>.<branch>` to the tensors reused and partial branches read (and
    `cache.<l>.<branch>.in` to the branch inputs dynamic branches read). For a partial or
    dynamic branch the returned `fresh[key]` is the updated cache (old rows elsewhere); a
    dynamic branch also returns its updated input cache `fresh[key + ".in"]`. With
    `keep_inputs`, every computed branch also returns its input u as `fresh[key + ".in"]`
    (what a plan with dynamic steps carries; extra entries are harmless). The block loop is
    the model adapter's (`tcgraph.models.adapter.run_blocks`); this function only says what
    each branch contributes.
    """
    fresh: dict[str, torch.Tensor] = {}
    offsets, at = {}, 0
    for (block, name), points in recipe.forecasts():
        offsets[(block, name)] = at
        at += points

    def branch(block: int, name: str, u: Callable[[], torch.Tensor], fn: nn.Module) -> torch.Tensor:
        action, key = recipe.action(block, name), cache_name(block, name)
        if action.kind == "reuse":
            return caches[key]
        if action.kind == "forecast":
            w = caches[FORECAST_WEIGHTS][offsets[(block, name)]:][:action.points]
            return sum(w[j] * caches[history_name(block, name, j)] for j in range(action.points))
        inputs = u()
        if action.kind == "compute":
            fresh[key] = fn(inputs)
            if keep_inputs:
                fresh[input_cache_name(block, name)] = inputs
        elif action.kind == "partial":
            fresh[key] = _partial(fn(inputs), caches[key], u.token_rows(action.indices))
        else:
            in_key = input_cache_name(block, name)
            value, fresh[in_key] = _dynamic(fn(inputs), inputs, caches[key], caches[in_key], action.size, u)
            fresh[key] = value
        return fresh[key]

    reads = set(recipe.constant_reads())

    def constants(block: int, name: str, prepare: Callable[[], tuple[torch.Tensor, ...]]) -> tuple[torch.Tensor, ...]:
        whats = RUN_CONSTANTS[name]
        args = prepare()
        if (block, name) in reads:
            return tuple(caches[constant_name(block, name, what)] for what in whats) + tuple(args[len(whats):])
        if recipe.constants == "write":
            fresh.update((constant_name(block, name, what), value) for what, value in zip(whats, args))
        return args

    out = run_blocks(model, x, t, y, branch, constants)
    return out, fresh


def _partial(full: torch.Tensor, cache: torch.Tensor, indices: tuple[int, ...]) -> torch.Tensor:
    """The cache with the rows of the kept tokens replaced by the fresh branch output's."""
    idx = torch.tensor(indices, dtype=torch.long, device=cache.device)
    new = cache.clone()
    new[:, idx] = full[:, idx]
    return new


def _dynamic(full: torch.Tensor, u: torch.Tensor, cache: torch.Tensor, cache_in: torch.Tensor,
             k: int, rows: BranchInput) -> tuple[torch.Tensor, torch.Tensor]:
    """(cache, input cache) with, per sample, the rows of the k tokens whose input changed most
    (and every row of other streams, for a branch of several) replaced by the fresh branch output
    and the fresh input."""
    if not rows.same_rows:
        raise TcgraphError("a dynamic action needs a branch whose input and output have the same rows; this one "
                           "reads a stream for keys and values only (SD3's last joint attention): compute, reuse, "
                           "forecast or prune it (partial) instead")
    image = rows.image
    score = (u - cache_in)[:, image].pow(2).sum(dim=-1)  # [B, N]
    idx = torch.topk(score, k, dim=1).indices + image.start  # [B, k]
    if image.stop - image.start != u.shape[1]:
        others = torch.tensor(rows.token_rows([]), dtype=torch.long, device=u.device)
        idx = torch.cat([others.expand(u.shape[0], -1), idx], dim=1)
    rows = torch.arange(cache.shape[0], device=cache.device).unsqueeze(1)  # [B, 1]
    new, new_in = cache.clone(), cache_in.clone()
    new[rows, idx] = full[rows, idx]
    new_in[rows, idx] = u[rows, idx]
    return new, new_in
