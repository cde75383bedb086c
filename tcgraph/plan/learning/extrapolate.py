"""Forecast weights: how a skipped branch's output is predicted from its history.

docs/design.md ("Forecast actions"): at step s a forecast branch outputs Σ_j w_j · H_j over its
outputs H_1 … H_n at its last n computing steps s_1 > … > s_n (newest first; index j here
is 1-based, the graph's `.h<j-1>`). Two ways to choose w:

- **Taylor** (TaylorSeer, Liu et al. 2025, arXiv 2503.06923): the output is a smooth function
  of the step index; expand it to order n − 1 with finite differences at the last computed
  step and evaluate the expansion at s. tcgraph uses the exact polynomial through the n
  points, Lagrange extrapolation in the step index, which equals Newton's backward-difference
  expansion: `w_j = Π_{m≠j} (s − s_m) / (s_j − s_m)`. (TaylorSeer's own series divides the
  k-th difference by k! where Newton has x(x+1)…(x+k−1)/k!; they agree to order 1, which is
  TaylorSeer's default.) Order 0 is reuse (w = 1).
- **Learned**: per (step, block, branch), the w that minimises Σ ||Σ_j w_j H_j − Y||² over the
  calibration trajectories, Y being the branch's true output at s: an n × n linear system
  (`fit_weights`). It recovers exact coefficients where the history is exactly linear in
  them, and it is never worse than Taylor on the data it was fitted on.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from tcgraph.errors import TcgraphError

RIDGE = 1e-6  # relative ridge on the normal equations: keeps near-collinear histories solvable


def lagrange_weights(step: int, history: Sequence[int]) -> tuple[float, ...]:
    """Weights of the polynomial through (s_j, H_j) evaluated at `step`; `history` = s_1 > s_2 > … (distinct)."""
    if len(set(history)) != len(history) or not history:
        raise TcgraphError(f"forecast history steps must be distinct and non-empty, got {list(history)}")
    weights = []
    for j, sj in enumerate(history):
        w = 1.0
        for m, sm in enumerate(history):
            if m != j:
                w *= (step - sm) / (sj - sm)
        weights.append(float(w))
    return tuple(weights)


def taylor_weights(step: int, history: Sequence[int], order: int) -> tuple[float, ...]:
    """Order-`order` Taylor forecast at `step` from the newest `order + 1` entries of `history`."""
    if order < 0:
        raise TcgraphError(f"Taylor order must be >= 0, got {order}")
    return lagrange_weights(step, list(history)[: order + 1])


def normal_equations(history: Sequence[torch.Tensor], target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(G, b) with G[i, j] = <H_i, H_j> and b[i] = <H_i, Y> in float64: sums over every element,
    so that calibration batches can be accumulated before one solve."""
    flat = torch.stack([h.reshape(-1).double() for h in history])  # [n, M]
    return flat @ flat.T, flat @ target.reshape(-1).double()


def solve_weights(gram: torch.Tensor, rhs: torch.Tensor) -> tuple[float, ...]:
    """Least-squares weights from accumulated normal equations (a small relative ridge)."""
    n = gram.shape[0]
    scale = float(torch.diagonal(gram).mean()) or 1.0
    w = torch.linalg.solve(gram + RIDGE * scale * torch.eye(n, dtype=gram.dtype), rhs)
    out = tuple(float(v) for v in w)
    if not all(math.isfinite(v) for v in out):
        raise TcgraphError("forecast weight fit gave non-finite weights; the calibration history is degenerate")
    return out


def fit_weights(history: Sequence[torch.Tensor], target: torch.Tensor) -> tuple[float, ...]:
    """argmin_w ||Σ_j w_j · history[j] − target||² (history newest first, each shaped like target)."""
    return solve_weights(*normal_equations(history, target))
