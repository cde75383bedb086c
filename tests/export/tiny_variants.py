"""Tiny variant graphs for the export tests, independent of tcgraph.passes.

`dit_variants()` gives three variants of one 2-block digits DiT with random weights:
  full   x, t, y -> out                               (plain fx trace of the model)
  fill   x, t, y -> out, cache.0.attn                 (also returns block 0's attention branch)
  reuse  x, t, y, cache.0.attn -> out, cache.0.attn   (reads block 0's attention from the cache,
                                                        writes a fresh value under the same name)
"""
from __future__ import annotations

import torch
import torch.nn as nn

from tcgraph.compile import VariantGraph
from tcgraph.models.official.dit import DiT, build_model, modulate

BATCH = 2
DEPTH = 2  # 2 blocks keep each export at ~2 s on a busy 2-core machine


def tiny_dit(seed: int = 0) -> DiT:
    """The digits config with 2 blocks and random (not adaLN-Zero) weights, so outputs are not 0."""
    torch.manual_seed(seed)
    model = build_model("digits", depth=DEPTH)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.05)
    return model


def example_inputs(model: DiT, with_cache: bool = False, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    ex = {
        "x": torch.randn(BATCH, cfg.in_channels, cfg.input_size, cfg.input_size, generator=g),
        "t": torch.tensor([7, 900])[:BATCH],
        "y": torch.tensor([3, cfg.num_classes])[:BATCH],  # a class and the null class
    }
    if with_cache:
        ex["cache.0.attn"] = torch.randn(BATCH, cfg.num_tokens, cfg.hidden_size, generator=g)
    return ex


def _block(block: nn.Module, h: torch.Tensor, c: torch.Tensor, attn: torch.Tensor | None = None):
    """One DiT block; `attn` replaces the attention branch (pre-gate) when given."""
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = block.adaLN_modulation(c).chunk(6, dim=1)
    fresh = block.attn(modulate(block.norm1(h), shift_msa, scale_msa)) if attn is None else None
    h = h + gate_msa.unsqueeze(1) * (fresh if attn is None else attn)
    h = h + gate_mlp.unsqueeze(1) * block.mlp(modulate(block.norm2(h), shift_mlp, scale_mlp))
    return h, fresh


class FillStep(nn.Module):
    """Full step that also returns block 0's attention branch output (the cache)."""

    def __init__(self, dit: DiT):
        super().__init__()
        self.dit = dit

    def forward(self, x, t, y):
        d = self.dit
        c = d.t_embedder(t) + d.y_embedder(y, False)
        h = d.x_embedder(x) + d.pos_embed
        h, cache = _block(d.blocks[0], h, c)
        for block in d.blocks[1:]:
            h, _ = _block(block, h, c)
        return d.unpatchify(d.final_layer(h, c)), cache


class ReuseStep(nn.Module):
    """Block 0 reuses its attention branch from `cache`; returns a refreshed cache value."""

    def __init__(self, dit: DiT):
        super().__init__()
        self.dit = dit

    def forward(self, x, t, y, cache):
        d = self.dit
        c = d.t_embedder(t) + d.y_embedder(y, False)
        h = d.x_embedder(x) + d.pos_embed
        h, _ = _block(d.blocks[0], h, c, attn=cache)
        for block in d.blocks[1:]:
            h, _ = _block(block, h, c)
        return d.unpatchify(d.final_layer(h, c)), 0.5 * cache + 0.5 * h


def dit_variants(model: DiT, ids=("full", "fill", "reuse")) -> list[VariantGraph]:
    makers = {
        "full": lambda: VariantGraph(
            "full", torch.fx.symbolic_trace(model), ["x", "t", "y"], ["out"], example_inputs(model)
        ),
        "fill": lambda: VariantGraph(
            "fill", torch.fx.symbolic_trace(FillStep(model)), ["x", "t", "y"], ["out", "cache.0.attn"],
            example_inputs(model),
        ),
        "reuse": lambda: VariantGraph(
            "reuse", torch.fx.symbolic_trace(ReuseStep(model)), ["x", "t", "y", "cache.0.attn"],
            ["out", "cache.0.attn"], example_inputs(model, with_cache=True),
        ),
    }
    return [makers[i]() for i in ids]


def param_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())
