"""FLUX's blocks and branch modules, holding diffusers' modules under their names, with forwards
written for tracing (`tcgraph.models.diffusers.flux` wraps the model).

`FluxJointAttention` is the attention of both block kinds: queries, keys and values of the text
rows and of the image rows (each stream with its own projections in a double block, one set in a
single block), row-wise RMS norms of q and k, RoPE on the image rows, one attention over all
rows, and the output projection(s). Its `rows(u, image_idx, cos, sin)` computes the output of the
text rows and of the image rows `image_idx` only: queries of those rows, keys and values of all
rows, RoPE rows gathered with the queries. Token pruning calls it for a partial or dynamic
attention (`AttentionSpec.rows`, `tcgraph.passes.emit.attention_rows`): per-stream projections,
qk-norm and RoPE live here, not in the pass.

The single block's fused output projection `proj_out` ([D, D + M] over [attention; MLP]) is split
when the block is wrapped into two parameter tensors, the attention's `attn.proj_out` [D, D]
(with the bias) and the MLP's `mlp.proj_out` [D, M], so that its attention and MLP are separate
parallel branches, each with its own output projection, whose sum is the fused projection. A
slice of the fused weight in the graph would do the same arithmetic, but ONNX Runtime folds a
sliced initializer into a private copy per session: every session of a plan would hold its own
copy of every pruned block's projection instead of sharing one.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from tcgraph.errors import TcgraphError
from tcgraph.models.official.dit import modulate

try:
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor
except ImportError as e:  # pragma: no cover - depends on the environment
    raise TcgraphError(f"FLUX models need the diffusers package ({e}); install it with `pip install diffusers`") from None


def take_rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Rows `idx` of x [B, N, ...] along dim 1: idx [k] (every sample's) or [B, k] (each sample's own)."""
    if idx.dim() == 1:
        return torch.index_select(x, 1, idx)
    index = idx.reshape(*idx.shape, *([1] * (x.dim() - 2))).expand(*idx.shape, *x.shape[2:])
    return torch.gather(x, 1, index)


def query_rows(image: torch.Tensor, image_idx: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """The image rows `image_idx` that a pruned attention queries, and their RoPE rows: (u rows, cos, sin)."""
    return take_rows(image, image_idx), cos[image_idx], sin[image_idx]


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """diffusers' `apply_rotary_emb` (real form, pairs interleaved) of x [B, S, heads, d] with cos, sin
    [S, d] (the same rows for every sample) or [B, S, d]."""
    cos, sin = (c[None] if c.dim() == 2 else c for c in (cos, sin))
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    real, imag = x.reshape(*x.shape[:-1], -1, 2).unbind(-1)
    rotated = torch.stack([-imag, real], dim=-1).flatten(3)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


class FluxJointAttention(nn.Module):
    """A FluxAttention over [text; image] rows: `forward(u, cos, sin)` -> [B, L + N, D], text rows first.

    A double block's (`added`: the text rows through add_q/k/v_proj, norm_added_q/k and to_add_out,
    the image rows through to_q/k/v, norm_q/k and to_out) or a single block's (one set of
    projections for all rows, the output projection `proj_out`: the attention's part of the
    block's fused one)."""

    def __init__(self, attn: nn.Module, proj_out: nn.Linear | None = None):
        super().__init__()
        self.added = attn.added_kv_proj_dim is not None
        self.heads, self.head_dim = int(attn.heads), int(attn.head_dim)
        self.to_q, self.to_k, self.to_v, self.norm_q, self.norm_k = attn.to_q, attn.to_k, attn.to_v, attn.norm_q, attn.norm_k
        if self.added:
            self.add_q_proj, self.add_k_proj, self.add_v_proj = attn.add_q_proj, attn.add_k_proj, attn.add_v_proj
            self.norm_added_q, self.norm_added_k = attn.norm_added_q, attn.norm_added_k
            self.to_out, self.to_add_out = attn.to_out, attn.to_add_out
        else:
            self.proj_out = proj_out

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (-1, self.head_dim))  # [B, S, heads, d]

    def _text_qkv(self, text: torch.Tensor):
        if self.added:
            return (self.norm_added_q(self._heads(self.add_q_proj(text))),
                    self.norm_added_k(self._heads(self.add_k_proj(text))), self._heads(self.add_v_proj(text)))
        return self.norm_q(self._heads(self.to_q(text))), self.norm_k(self._heads(self.to_k(text))), self._heads(self.to_v(text))

    def rows(self, u: torch.Tensor, image_idx: torch.Tensor | None, cos: torch.Tensor,
             sin: torch.Tensor) -> torch.Tensor:
        """The output rows of every text row, then of the image rows `image_idx` ([k] or [B, k] indices
        among the N image rows; None: all of them), from u [B, L + N, D]: [B, L + k, D]."""
        length = u.shape[1] - cos.shape[0]
        text, image = u[:, :length], u[:, length:]
        tq, tk, tv = self._text_qkv(text)
        ik = rotate(self.norm_k(self._heads(self.to_k(image))), cos, sin)
        iv = self._heads(self.to_v(image))
        if image_idx is not None:  # queries of the chosen rows, rotated by their own positions
            image, cos, sin = query_rows(image, image_idx, cos, sin)
        iq = rotate(self.norm_q(self._heads(self.to_q(image))), cos, sin)
        q, k, v = (torch.cat(p, dim=1).transpose(1, 2) for p in ((tq, iq), (tk, ik), (tv, iv)))  # [B, h, S, d]
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)  # [B, L + k, D]
        if not self.added:
            return self.proj_out(out)
        return torch.cat([self.to_add_out(out[:, :length]), self.to_out[1](self.to_out[0](out[:, length:]))], dim=1)

    def forward(self, u: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return self.rows(u, None, cos, sin)


class FluxSingleMLP(nn.Module):
    """A single block's MLP branch: diffusers' proj_mlp and act_mlp, then the MLP's part of the fused
    output projection (`proj_out`, no bias: the attention's part carries it)."""

    def __init__(self, proj_mlp: nn.Linear, act_mlp: nn.Module, proj_out: nn.Linear):
        super().__init__()
        self.proj_mlp, self.act_mlp, self.proj_out = proj_mlp, act_mlp, proj_out

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        return self.proj_out(self.act_mlp(self.proj_mlp(u)))


class FluxDoubleBlock(nn.Module):
    """A FluxTransformerBlock: `forward(img, txt, temb, cos, sin)` -> (img, txt)."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.norm1, self.norm1_context = block.norm1, block.norm1_context  # AdaLayerNormZero: 6 chunks each
        self.attn = FluxJointAttention(block.attn)
        self.norm2, self.ff = block.norm2, block.ff
        self.norm2_context, self.ff_context = block.norm2_context, block.ff_context

    def modulation_image(self, temb: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """[B, 6D]: shift, scale, gate of the attention, then of the MLP, of the image rows."""
        return self.norm1.linear(self.norm1.silu(temb))

    def modulation_text(self, temb: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return self.norm1_context.linear(self.norm1_context.silu(temb))

    def forward(self, img, txt, temb, cos, sin):
        mi = self.modulation_image(temb, cos, sin).chunk(6, dim=1)
        mt = self.modulation_text(temb, cos, sin).chunk(6, dim=1)
        joint = self.attn(torch.cat([modulate(self.norm1_context.norm(txt), mt[0], mt[1]),
                                     modulate(self.norm1.norm(img), mi[0], mi[1])], dim=1), cos, sin)
        length = txt.shape[1]
        txt = txt + mt[2].unsqueeze(1) * joint[:, :length]
        img = img + mi[2].unsqueeze(1) * joint[:, length:]
        img = img + mi[5].unsqueeze(1) * self.ff(modulate(self.norm2(img), mi[3], mi[4]))
        txt = txt + mt[5].unsqueeze(1) * self.ff_context(modulate(self.norm2_context(txt), mt[3], mt[4]))
        return img, txt


class FluxSingleBlock(nn.Module):
    """A FluxSingleTransformerBlock, its output projection split (see the module docstring):
    `forward(img, txt, temb, cos, sin)` -> (img, txt)."""

    def __init__(self, block: nn.Module):
        super().__init__()
        d = block.proj_out.out_features
        fused = block.proj_out
        # the halves in the fused weight's dtype and device (a bf16 model on the GPU stays one), uninitialised:
        # both are overwritten at once
        like = dict(device=fused.weight.device, dtype=fused.weight.dtype)
        attn_out = nn.utils.skip_init(nn.Linear, d, d, **like)
        mlp_out = nn.utils.skip_init(nn.Linear, fused.in_features - d, d, bias=False, **like)
        with torch.no_grad():
            attn_out.weight.copy_(fused.weight[:, :d])
            attn_out.bias.copy_(fused.bias)
            mlp_out.weight.copy_(fused.weight[:, d:])
        self.norm = block.norm  # AdaLayerNormZeroSingle: shift, scale, gate
        self.attn = FluxJointAttention(block.attn, attn_out)
        self.mlp = FluxSingleMLP(block.proj_mlp, block.act_mlp, mlp_out)

    def modulation(self, temb: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return self.norm.linear(self.norm.silu(temb))

    def forward(self, img, txt, temb, cos, sin):
        m = self.modulation(temb, cos, sin).chunk(3, dim=1)
        x = torch.cat([txt, img], dim=1)
        u = modulate(self.norm.norm(x), m[0], m[1])
        x = x + m[2].unsqueeze(1) * self.attn(u, cos, sin) + m[2].unsqueeze(1) * self.mlp(u)
        length = txt.shape[1]
        return x[:, length:], x[:, :length]


def check_flux_model(model: nn.Module, config) -> None:
    """The model is what the traceable forward assumes: diffusers' default attention processor, and the
    sizes `config` says; refuses, naming it, anything else."""
    blocks = list(model.transformer_blocks) + list(model.single_transformer_blocks)
    odd = sorted({type(b.attn.processor).__name__ for b in blocks if type(b.attn.processor) is not FluxAttnProcessor})
    if odd:
        raise TcgraphError(f"FluxTransformer2DModel with the attention processor(s) {', '.join(odd)}: tcgraph runs "
                           "diffusers' default FluxAttnProcessor (no IP-adapter, no fused projections)")
    if getattr(model, "encoder_hid_proj", None) is not None:
        raise TcgraphError("FluxTransformer2DModel with an IP-adapter projection: tcgraph does not run it")
    sizes = (len(model.transformer_blocks), len(model.single_transformer_blocks), int(model.inner_dim))
    if sizes != (config.double_depth, config.single_depth, config.hidden_size):
        raise TcgraphError(f"FluxTransformer2DModel has {sizes[0]} double and {sizes[1]} single blocks of width "
                           f"{sizes[2]}, its config says {config.double_depth}, {config.single_depth}, {config.hidden_size}")
