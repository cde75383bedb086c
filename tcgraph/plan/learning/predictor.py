"""TokenCache's Cache Predictor (Lou et al. 2024, arXiv 2409.18523) and the block probes.

**Cache Predictor.** Input-invariant, timestep-variant importance logits `g[s, l, i]`, one
per (step, block, image token), shape `[S, depth, N]`. One score per token is *shared by the
branches of a block that write image rows* (`pruning.image_branches`: attention and MLP of a DiT
block keep the same tokens; in PixArt's blocks the cross-attention too: it is row-wise in the image
tokens, its keys and values being the text, so it is pruned like the MLP; FLUX's and SD3's joint
attention and FLUX's single-block MLP by their image rows, their text rows always recomputed), so
a pruned block is one token set per step. A branch that writes text rows only (`mlp_text`)
computes at cache steps, as it does in the plans (`tcgraph.plan.learning.pruning`): it takes no
weight. Training reuses Learning-to-Cache's machinery (`learning.fit_logits` and
`learning.round_loss`, teacher-forced calibration trajectories, `calibrate.mixed_step`): a training
round is one full step `s0` (fills every cache, no grad) followed by the next `train_window − 1`
steps, for every `s0` in 0 … S−2, so every step s >= 1 is trained as a cache step. At a cache step every image-writing branch of every block blends per token (the
superposition objective), `used = w ⊙ fresh + (1 − w) ⊙ cache` with
`w = sigmoid(g[s, l])` of shape `(N, 1)` (the same for every such branch of block l; a branch's
text rows take weight 1, `calibrate.mixed_step`), and

    loss = Σ_s MSE(guided eps, traj.eps[s]) / n + μ · Σ_{s, l} (mean_i w[s, l, i] − r)² / n

with r the target keep ratio (`keep_ratio`) and μ = `mu` × the eps MSE of reusing every
branch (of every block, text-only ones included) at a cache step (the data's own scale, from
`learning.lambda_unit`). Model weights are frozen; only g moves. The kept tokens of a (step, block)
at keep count k are the top-k by score (ties: lower token index first).

The planner starts training from a closed form (`staleness_init`): the token's z-scored log change
of its image-writing branches' outputs (their image rows) from the step before, read from the
output Grams calibration keeps. That ranking alone plans nearly as well as a trained predictor; a
short training from it plans as well as a long one from random logits (benchmarks/planning_time.py).


The block sensitivities that adaptive block selection (`tcgraph.plan.learning.tprr`) ranks blocks
by are measured here too (`block_sensitivity`), with the predictor's scores.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from tcgraph.calibrate import Trajectories, mixed_step
from tcgraph.calibrate.mixed import Rows
from tcgraph.models.official.dit import DiT
from tcgraph.errors import TcgraphError
from tcgraph.names import CacheKey, cache_name
from tcgraph.plan.learning.common import block_branches, fit_logits, lambda_unit, rounds
from tcgraph.plan.learning.pruning import image_branches
from tcgraph.plan.learning.tprr import token_order
from tcgraph.progress import SILENT, Phase


@dataclass
class PredictorResult:
    keep_ratio: float
    mu: float
    logits: torch.Tensor  # (S, depth, N); the rows of step 0 are unused
    history: list[float] = field(default_factory=list)  # mean training loss per epoch

    def weights(self) -> torch.Tensor:
        return torch.sigmoid(self.logits)


def init_predictor(num_steps: int, depth: int, num_tokens: int, keep_ratio: float, seed: int = 0) -> torch.Tensor:
    """Untrained logits: sigmoid = keep_ratio plus a tiny seeded jitter (a random token ranking)."""
    g = torch.Generator().manual_seed(seed)
    base = math.log(keep_ratio / (1 - keep_ratio))
    return base + 0.01 * torch.randn(num_steps, depth, num_tokens, generator=g)


def staleness_init(grams: dict, num_steps: int, depth: int, branches: tuple, keep_ratio: float, *,
                   image_rows: Callable[[CacheKey], slice | None] | None = None) -> torch.Tensor:
    """Logits to start training from, in closed form from the output Grams (`calibrate.grams`): at
    step s, block l, image token i, the z-score over tokens of log Σ_branches ||O_s,i − O_{s−1},i||² (how
    much the token's branch outputs change from the step before: what reusing it loses), plus logit(r).
    Step 0's row (never a cache step) is logit(r).

    `branches`: the branches summed, one tuple for every block or one per block (the image-writing
    ones, `pruning.image_branches`); `image_rows(key)`: where the image rows lie among the Gram's rows
    of that (block, branch) (a joint branch's text rows come first); None: every row is an image token."""
    base = math.log(keep_ratio / (1 - keep_ratio))
    steps = torch.arange(1, num_steps)
    rows = []
    for l, names in enumerate(block_branches(branches, depth)):
        if not names:
            raise TcgraphError(f"block {l} has no branch that writes image rows: no token of it can be scored")
        g = sum(grams[(l, br)][..., image_rows((l, br)) if image_rows else slice(None)] for br in names)  # [S, S, N]
        change = g[steps - 1, steps - 1] - 2 * g[steps - 1, steps] + g[steps, steps]  # [S-1, N]
        rows.append(torch.log(change.clamp_min(1e-30)).float())
    z = torch.stack(rows, 1)  # [S-1, depth, N]
    z = (z - z.mean(-1, keepdim=True)) / (z.std(-1, keepdim=True) + 1e-6)
    return torch.cat([torch.zeros(1, depth, z.shape[-1]), z]) + base


def training_rounds(num_steps: int, window: int) -> list[tuple[int, list[int]]]:
    """A full step at every s0 < S − 1, then its next `window − 1` steps as cache steps."""
    return [(s0, list(range(s0 + 1, min(s0 + window, num_steps)))) for s0 in range(num_steps - 1)]


def _token_weights(w: torch.Tensor, pruned: tuple[tuple[str, ...], ...]) -> dict[str, torch.Tensor]:
    """(depth, N) weights -> `(N, 1)` weights of each block's image-writing branches `pruned[l]`, one
    set per block; the other branches are not named (they compute)."""
    return {cache_name(l, br): w[l].unsqueeze(-1) for l in range(w.shape[0]) for br in pruned[l]}


def mu_unit(model: DiT, traj: Trajectories) -> float:
    """The eps MSE of reusing every branch at a cache step (L2C's λ unit summed over the (block,
    branch) pairs)."""
    cfg = model.config
    sizes = [len(names) for names in block_branches(cfg.branches, cfg.depth)]
    if len(set(sizes)) == 1:  # as it always was (the same float for DiT and PixArt plans)
        return lambda_unit(model, traj, 2) * sizes[0] * cfg.depth
    return lambda_unit(model, traj, 2) * sum(sizes)


def train_predictor(model: DiT, traj: Trajectories, keep_ratio: float, mu: float, *, window: int = 3, epochs: int = 8,
                    batch_images: int = 8, lr: float = 0.1, seed: int = 0, init: torch.Tensor | None = None,
                    phase: Phase = SILENT) -> PredictorResult:
    """Learn the predictor's logits on `traj` with the superposition objective (eps MSE +
    μ·Σ (mean w − r)²); only the logits move."""
    S, depth, n = traj.num_steps, model.config.depth, model.config.num_tokens
    pruned = image_branches(model.config.block_layout())
    init = init if init is not None else init_predictor(S, depth, n, keep_ratio, seed)
    logits, history = fit_logits(model, traj, init, training_rounds(S, window),
                                 lambda w, s: _token_weights(w[s], pruned),
                                 lambda w, cs: mu * ((w[cs].mean(-1) - keep_ratio) ** 2).sum(), epochs=epochs,
                                 batch_images=batch_images, lr=lr, seed=seed, phase=phase)
    return PredictorResult(keep_ratio, mu, logits, history)



#################################################################################
#                       Errors: hard plans and block probes                     #
#################################################################################


@torch.no_grad()
def block_sensitivity(model: DiT, traj: Trajectories, scores: torch.Tensor, keep_ratio: float,
                      phase: Phase = SILENT) -> list[float]:
    """Per block: eps MSE per cache step when only that block keeps its top round(keep_ratio·N)
    tokens (every image-writing branch of it; its text-only ones compute, `tcgraph.plan.learning.pruning`)
    at the cache steps of `learning.rounds(S, 2)`, everything else computed.

    The blocks before the probed one are the full model's at that step: one full forward per cache
    step gives their outputs, and each probe reuses them (exact) and runs from the probed block on.
    `phase` ticks once per cache step."""
    depth, n = model.config.depth, model.config.num_tokens
    per_block = block_branches(model.config.branches, depth)
    pruned = image_branches(model.config.block_layout())
    k = min(max(round(keep_ratio * n), 1), n - 1)
    rows = torch.arange(traj.num_images)
    err, count = [0.0] * depth, 0
    for s0, cs in rounds(traj.num_steps, 2):
        if not cs:
            continue
        _, caches = mixed_step(model, *traj.model_inputs(s0, rows), {}, {})
        for s in cs:
            count += 1
            inputs = traj.model_inputs(s, rows)
            _, exact = mixed_step(model, *inputs, {}, {})
            for l in range(depth):
                m = Rows(token_order(scores[s, l])[:k])
                weights = {cache_name(b, br): 0.0 for b in range(l) for br in per_block[b]}  # the full model's own
                weights.update({cache_name(l, br): m for br in pruned[l]})
                probe = {**exact, **{cache_name(l, br): caches[cache_name(l, br)] for br in pruned[l]}}
                out, _ = mixed_step(model, *inputs, weights, probe)
                err[l] += torch.mean((traj.eps_of(out) - traj.eps[s]) ** 2).item()
            phase.tick()
    return [e / max(count, 1) for e in err]
