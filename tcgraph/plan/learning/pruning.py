"""Which branches of a pruned block TokenCache prunes, and what the block then costs: the rule the
TokenCache planners (`tcgraph.plan.learning.tprr`, `tcgraph.plan.learning.predictor`,
`tcgraph.plan.planners.tokencache`) share, for any model's layout (`ModelConfig.block_layout()`).

A block is pruned as a whole, by the streams each of its branches writes:

- a branch that writes image rows takes the block's action, `partial(kept)` with `kept` image
  tokens among 0 … N−1 (N = `ModelConfig.num_tokens`). DiT: attn, mlp; PixArt: attn, cross, mlp
  (the project's choice for cross-attention, which the paper's DiT lacks: it is row-wise in the
  image tokens, its keys and values being the text, so `partial(kept)` recomputes its kept rows
  exactly as for the MLP). A branch that writes text rows too (FLUX's and SD3's joint attention,
  FLUX's single-block MLP) recomputes every text row with the kept image rows: only image rows
  are pruned. SD3's last attention writes image rows and reads the text for keys and values
  only: it is partial like the others;
- a branch that writes text rows only (`mlp_text`) computes at every cache step: it has no image
  token to keep, and it is the cheap part of the block (L text rows against N image rows);
- a block kept at k = 0 (`min_keep = 0`) reuses every branch, its text-only ones included.

The block's one token set (one Cache Predictor score per image token) is shared by its
image-writing branches. FLOPs count each branch's own rows (`flops.branch_rows`), as
`flops.plan_flops` and the measured cost tables (`tcgraph.plan.costs`) do.
"""
from __future__ import annotations

from typing import Sequence

from tcgraph.models.families import ModelConfig
from tcgraph.models.layout import Layout
from tcgraph.names import IMAGE
from tcgraph.plan.flops import branch_flops, branch_rows
from tcgraph.plan.plan import COMPUTE, REUSE, Action, partial


def image_branches(layout: Layout) -> tuple[tuple[str, ...], ...]:
    """Each block's branches that write image rows: the ones a pruned block makes `partial(kept)`
    and whose image rows the Cache Predictor scores."""
    return tuple(tuple(name for name, streams in block if IMAGE in streams) for block in layout.blocks)


def block_actions(names: Sequence[str], image: Sequence[str], kept: tuple[int, ...] | None) -> tuple[Action, ...]:
    """The actions of one block's branches `names` at a cache step: every branch computes (`kept`
    None) or reuses (`kept` empty); else the branches of `image` (the block's image-writing ones)
    take `partial(kept)` and the others, which write text rows only, compute."""
    if kept is None:
        return tuple(COMPUTE for _ in names)
    if not kept:
        return tuple(REUSE for _ in names)
    a = partial(kept)
    return tuple(a if br in image else COMPUTE for br in names)


def block_flops(cfg: ModelConfig, block: int, names: Sequence[str], image: Sequence[str], k: int,
                text_length: int = 0, constants_read: bool = False) -> int:
    """FLOPs of block `block` for one sample (its branches `names`, of which `image` write image
    rows) kept at k image tokens: N computes every branch, 0 reuses every branch, else
    `block_actions` on k tokens; each branch's rows from the layout (`flops.branch_rows`)."""
    kept = None if k >= cfg.num_tokens else tuple(range(k))
    return sum(branch_flops(cfg, br, a, text_length, constants_read, **branch_rows(cfg, block, br))
               for br, a in zip(names, block_actions(names, image, kept)))
