"""diffusers' `PixArtTransformer2DModel`, as tcgraph traces, rewrites and exports it.

As with `tcgraph.models.diffusers.dit`, diffusers' own forward cannot be traced by torch.fx
(shape reads into Python ints, grad-mode checks, optional arguments), so `DiffusersPixArt`
wraps the diffusers model's own modules, unchanged, with a forward written for tracing: the
same operations in the same order, with the patch grid and the timestep features' constants
fixed when it is built. `tests/models/test_diffusers_pixart.py` checks it against diffusers'
forward.

The model is conditioned on text embeddings, not class ids:
`forward(x, t, encoder_hidden_states, encoder_attention_mask)` with the text embeddings
[B, L, caption_channels] and their mask [B, L] (1 keep, 0 drop; float, int or bool). The
conditioning the blocks read is the tuple `(t6, emb_t, text, bias)`:
- `emb_t` [B, D]: the timestep embedding (adaLN-single's `emb`), which the output layer reads;
- `t6` [B, 6D]: adaLN-single's linear of it, shared by every block, each adding its own
  `scale_shift_table` (6, D) to get shift, scale, gate of the attention and of the MLP;
- `text` [B, L, D]: the caption projection of the text embeddings;
- `bias` [B, 1, L]: the cross-attention bias of the mask, (1 - mask) * -10000.
None of them changes within a sampling run except `t6` and `emb_t` (per step).

Each block has three branches: `attn` (gated self-attention of the modulated norm1 of h),
`cross` (ungated cross-attention to the text, whose input is h itself: PixArt applies no
norm before it), and `mlp` (gated FeedForward of the modulated norm2 of h).

The cross branch is `TextCrossAttention`, diffusers' attn2 modules with the keys and values
of the text projected outside its forward (`prepare`), in the block body: they depend on the
text alone, so a plan carries them as run constants (`cache.<l>.cross.k`/`.v`, see
`tcgraph.plan.plan`) and a sampling run projects the text once, not at every step.

Parameter names are diffusers' own (`transformer_blocks.3.attn2.to_k.weight`), plus
`pos_table`, the fixed sin-cos position table that diffusers keeps as a non-persistent
buffer. The config is a `DiTConfig` with `layout="pixart"` (num_classes 0, caption_channels
the text width).

PixArt-alpha 1024's resolution and aspect-ratio micro-conditions (`use_additional_conditions`)
are constants of a static resolution: the pipeline passes the image's pixel height and width
and their ratio, the same at every step of every run. The wrapper fixes them when it is built
(`DiTConfig.micro_size`, the latent side times PixArt's VAE factor 8, aspect ratio 1: tcgraph's
resolutions are square) and adds their embedding to the timestep's, as diffusers does;
`tcgraph.diffusers.use` refuses a pipeline call with other values.

Not run (refused when the model has them): a self-attention mask, q/k norms and the other
`Attention` options that PixArt checkpoints do not use.

diffusers is imported when this module is: it is an optional dependency (`.[diffusers]`).
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from tcgraph.errors import TcgraphError
from tcgraph.models.adapter import AttentionSpec, BlockKind, BranchSpec, ModelAdapter, config_dims, register_adapter
from tcgraph.models.official.checkpoint import check_finite
from tcgraph.models.diffusers.config import PIXART_CLASS_NAME, pixart_config_from_diffusers, pixart_kwargs
from tcgraph.models.diffusers.folder import DiffusersFolder, diffusers_missing, load_weights_into
from tcgraph.models.official.dit import DiTConfig, modulate

try:
    from diffusers import PixArtTransformer2DModel
    from diffusers.models.attention import FeedForward
    from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0

    from tcgraph.models.diffusers.dit import timestep_features
except ImportError as e:  # pragma: no cover - depends on the environment
    raise diffusers_missing(e) from None

MASK_BIAS = -10000.0  # what diffusers adds to the attention scores of a dropped text token


class TextCrossAttention(nn.Module):
    """diffusers' cross-attention (a block's attn2, an `Attention` with AttnProcessor2_0), its
    modules under their diffusers names: `prepare(text, bias)` -> (keys, values, bias), then
    `forward(u, k, v, bias)`: queries from u [B, N, D], keys/values [B, L, D] of the text, the
    mask bias [B, 1, L] added to every head's scores, as the processor computes it."""

    def __init__(self, attn: nn.Module):
        super().__init__()
        self.to_q, self.to_k, self.to_v, self.to_out = attn.to_q, attn.to_k, attn.to_v, attn.to_out
        self.heads = int(attn.heads)

    def prepare(self, text: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.to_k(text), self.to_v(text), bias

    def forward(self, u: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        b, heads = u.shape[0], self.heads
        head_dim = k.shape[-1] // heads
        q = self.to_q(u).view(b, -1, heads, head_dim).transpose(1, 2)  # [B, h, N, d]
        k = k.view(b, -1, heads, head_dim).transpose(1, 2)  # [B, h, L, d]
        v = v.view(b, -1, heads, head_dim).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.unsqueeze(1))  # bias [B, 1, 1, L]
        out = out.transpose(1, 2).reshape(b, -1, heads * head_dim)
        return self.to_out[1](self.to_out[0](out))  # projection, dropout


class DiffusersPixArtBlock(nn.Module):
    """One diffusers `BasicTransformerBlock` (norm_type "ada_norm_single", with cross-attention),
    holding its modules under their diffusers names, with a traceable forward."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.norm1 = block.norm1  # LayerNorm (eps norm_eps, no weights) before the self-attention
        self.attn1 = block.attn1
        self.attn2 = TextCrossAttention(block.attn2)  # queries h itself, keys/values the projected text
        self.norm2 = block.norm2  # LayerNorm before the MLP (PixArt has no norm before attn2)
        self.ff = block.ff
        self.scale_shift_table = block.scale_shift_table  # (6, D), added to adaLN-single's shared t6
        self.dim = int(block.scale_shift_table.shape[1])

    def modulation(self, t6: torch.Tensor, emb_t: torch.Tensor, text: torch.Tensor,
                   bias: torch.Tensor) -> torch.Tensor:
        """[B, 6D]: shift, scale, gate of the self-attention, then of the MLP (only t6 is read)."""
        d = self.dim
        return (self.scale_shift_table[None] + t6.reshape(-1, 6, d)).reshape(-1, 6 * d)

    def forward(self, h: torch.Tensor, t6: torch.Tensor, emb_t: torch.Tensor, text: torch.Tensor,
                bias: torch.Tensor) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(t6, emb_t, text, bias).chunk(6, dim=1)
        h = h + gate1.unsqueeze(1) * self.attn1(modulate(self.norm1(h), shift1, scale1))
        k, v, bias = self.attn2.prepare(text, bias)  # run constants: the text's keys and values
        h = h + self.attn2(h, k, v, bias)
        return h + gate2.unsqueeze(1) * self.ff(modulate(self.norm2(h), shift2, scale2))


class DiffusersPixArt(nn.Module):
    """A diffusers `PixArtTransformer2DModel`;
    `forward(x, t, encoder_hidden_states, encoder_attention_mask)` -> its output `sample`."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.config = pixart_config_from_diffusers(dict(model.config), where=PIXART_CLASS_NAME)
        cfg = self.config
        _check_model(model, cfg)
        self.patch_size, self.out_channels = cfg.patch_size, cfg.out_channels
        self.grid = cfg.input_size // cfg.patch_size
        proj = model.adaln_single.emb.time_proj  # diffusers' Timesteps: PixArt's has shift 0, cos first
        self.time_features = _features_of(proj)
        if cfg.micro_size:  # [[height, width]] in pixels and [[height / width]]: constants of the resolution
            self.size_features = _features_of(model.adaln_single.emb.additional_condition_proj)
            self.register_buffer("micro_resolution", torch.tensor([float(cfg.micro_size)] * 2), persistent=False)
            self.register_buffer("micro_aspect", torch.tensor([1.0]), persistent=False)
        self.pos_embed = model.pos_embed  # PatchEmbed: only its conv `proj` runs here
        self.register_buffer("pos_table", model.pos_embed.pos_embed.detach().clone().float())  # [1, N, D]
        self.transformer_blocks = nn.ModuleList(DiffusersPixArtBlock(b) for b in model.transformer_blocks)
        self.adaln_single = model.adaln_single
        self.caption_projection = model.caption_projection
        self.norm_out = model.norm_out
        self.proj_out = model.proj_out
        self.scale_shift_table = model.scale_shift_table  # (2, D): the output layer's shift, scale

    def embed(self, x: torch.Tensor, t: torch.Tensor, encoder_hidden_states: torch.Tensor,
              encoder_attention_mask: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """(hidden state [B, N, D], (t6 [B, 6D], emb_t [B, D], text [B, L, D], bias [B, 1, L]))."""
        h = self.pos_embed.proj(x).flatten(2).transpose(1, 2) + self.pos_table
        emb_t = self.adaln_single.emb.timestep_embedder(timestep_features(t, **self.time_features))
        if self.config.micro_size:
            emb_t = emb_t + self.micro_embedding()
        t6 = self.adaln_single.linear(self.adaln_single.silu(emb_t))
        text = self.caption_projection(encoder_hidden_states)
        bias = ((1 - encoder_attention_mask.to(torch.float32)) * MASK_BIAS).unsqueeze(1)
        return h, (t6, emb_t, text, bias)

    def micro_embedding(self) -> torch.Tensor:
        """[1, D]: the embedding of the resolution and aspect-ratio micro-conditions (a constant)."""
        emb = self.adaln_single.emb
        size = emb.resolution_embedder(timestep_features(self.micro_resolution, **self.size_features))  # [2, D/3]
        ratio = emb.aspect_ratio_embedder(timestep_features(self.micro_aspect, **self.size_features))  # [1, D/3]
        return torch.cat([size.reshape(1, -1), ratio.reshape(1, -1)], dim=1)

    def final(self, h: torch.Tensor, t6: torch.Tensor, emb_t: torch.Tensor, text: torch.Tensor,
              bias: torch.Tensor) -> torch.Tensor:
        shift, scale = (self.scale_shift_table[None] + emb_t[:, None]).chunk(2, dim=1)  # [B, 1, D] each
        h = self.proj_out(self.norm_out(h) * (1 + scale) + shift)  # [B, N, p*p*C_out]
        c_out, p, g = self.out_channels, self.patch_size, self.grid
        h = h.reshape(-1, g, g, p, p, c_out).permute(0, 5, 1, 3, 2, 4)  # einsum nhwpqc->nchpwq
        return h.reshape(-1, c_out, g * p, g * p)

    def forward(self, x: torch.Tensor, t: torch.Tensor, encoder_hidden_states: torch.Tensor,
                encoder_attention_mask: torch.Tensor) -> torch.Tensor:
        h, cond = self.embed(x, t, encoder_hidden_states, encoder_attention_mask)
        for block in self.transformer_blocks:
            h = block(h, *cond)
        return self.final(h, *cond)


def build_diffusers_pixart(config: DiTConfig, seed: int | None = None) -> DiffusersPixArt:
    """A PixArtTransformer2DModel with diffusers' random initialisation (seeded when `seed` is given)."""
    if seed is not None:
        torch.manual_seed(seed)
    return DiffusersPixArt(PixArtTransformer2DModel(**pixart_kwargs(config))).eval()


def load_diffusers_pixart(folder: DiffusersFolder) -> DiffusersPixArt:
    """The PixArtTransformer2DModel saved in `folder`, its weights read with safetensors, in float32."""
    config = pixart_config_from_diffusers(folder.config, where=str(folder.model_dir / "config.json"))  # before weights
    model = load_weights_into(folder, PixArtTransformer2DModel, PIXART_CLASS_NAME, config)
    check_finite(model.state_dict(), str(folder.model_dir))
    return DiffusersPixArt(model).eval()


def save_pixart(model: nn.Module, path: str | Path) -> Path:
    """Save a PixArtTransformer2DModel, or a `DiffusersPixArt`, as the folder `save_pretrained` writes
    (config.json + safetensors). A wrapper is saved as diffusers' model of its config; its position
    table must be the one diffusers builds for it (the default interpolation scale)."""
    if not isinstance(model, DiffusersPixArt):
        if not isinstance(model, PixArtTransformer2DModel):
            raise TcgraphError(f"save_pixart saves a PixArtTransformer2DModel or a DiffusersPixArt, "
                               f"not a {type(model).__name__}")
        model.save_pretrained(str(path), safe_serialization=True)
        return Path(path)
    target = PixArtTransformer2DModel(**pixart_kwargs(model.config))
    state = {k: v for k, v in model.state_dict().items() if k != "pos_table"}
    target.load_state_dict(state)
    if not torch.equal(target.pos_embed.pos_embed.float(), model.pos_table):
        raise TcgraphError("save_pixart: the model's position table is not the one diffusers builds from its config "
                           "(another interpolation_scale): save the diffusers model itself with save_pretrained")
    target.save_pretrained(str(path), safe_serialization=True)
    return Path(path)


def _features_of(proj: nn.Module) -> dict:
    """The arguments of `timestep_features` that make diffusers' `Timesteps` module `proj`'s features."""
    return dict(dim=int(proj.num_channels), shift=float(proj.downscale_freq_shift), scale=float(proj.scale),
                flip_sin_to_cos=bool(proj.flip_sin_to_cos))


def _check_model(model: nn.Module, cfg: DiTConfig) -> None:
    """The model is what the traceable forward assumes; refuses, naming them, the parts it does not run."""
    uses = bool(getattr(model.adaln_single.emb, "use_additional_conditions", False))
    if uses != bool(getattr(model, "use_additional_conditions", uses)) or uses != (cfg.micro_size > 0):
        raise TcgraphError(f"{PIXART_CLASS_NAME}: its config and its modules disagree on use_additional_conditions "
                           "(resolution/aspect-ratio micro-conditions); save and load the model with diffusers")
    if model.caption_projection is None:
        raise TcgraphError(f"{PIXART_CLASS_NAME} has no caption projection (caption_channels null): tcgraph's "
                           "PixArt adapter projects the text embeddings")
    for i, block in enumerate(model.transformer_blocks):
        odd = [what for what, bad in (
            ("a norm type other than 'ada_norm_single'", getattr(block, "norm_type", None) != "ada_norm_single"),
            ("no cross-attention (attn2)", getattr(block, "attn2", None) is None),
            ("only cross-attention", bool(getattr(block, "only_cross_attention", False))),
            ("two self-attentions (double_self_attention)", bool(getattr(block, "double_self_attention", False))),
            ("positional embeddings inside the block", getattr(block, "pos_embed", None) is not None),
            ("a GLIGEN fuser (attention_type gated)", getattr(block, "fuser", None) is not None),
        ) if bad]
        for name in ("attn1", "attn2"):
            attn = getattr(block, name, None)
            if attn is None:
                continue
            odd += [f"{name} with {what}" for what, bad in (
                ("q/k norms", getattr(attn, "norm_q", None) is not None or getattr(attn, "norm_k", None) is not None),
                ("a residual connection", bool(getattr(attn, "residual_connection", False))),
                ("an output rescale factor", float(getattr(attn, "rescale_output_factor", 1.0)) != 1.0),
                ("a spatial or group norm", getattr(attn, "spatial_norm", None) is not None
                 or getattr(attn, "group_norm", None) is not None),
                ("a norm of the text (cross_attention_norm)", getattr(attn, "norm_cross", None) is not None),
                ("added key/value projections", getattr(attn, "add_k_proj", None) is not None),
                (f"the attention processor {type(getattr(attn, 'processor', None)).__name__} (tcgraph runs "
                 "diffusers' default AttnProcessor2_0 / AttnProcessor)",
                 not isinstance(getattr(attn, "processor", None), (AttnProcessor2_0, AttnProcessor))),
                ("fused projections", getattr(attn, "fused_projections", False)),
                ("unscaled scores (scale_qk false)", not getattr(attn, "scale_qk", True)),
            ) if bad]
        if bool(getattr(block.attn1, "is_cross_attention", False)):
            odd.append("attn1 as a cross-attention")
        if odd:
            raise TcgraphError(f"{PIXART_CLASS_NAME} block {i} has {', '.join(odd)}: tcgraph's PixArt adapter "
                               "does not run it")
    pe = model.pos_embed
    if (getattr(pe, "pos_embed", None) is None or getattr(pe, "layer_norm", False)
            or getattr(pe, "pos_embed_max_size", None) or not getattr(pe, "flatten", True)
            or tuple(pe.pos_embed.shape) != (1, cfg.num_tokens, cfg.hidden_size)):
        raise TcgraphError(f"{PIXART_CLASS_NAME}: tcgraph runs the fixed sin-cos position table of PatchEmbed only, "
                           f"one row per token of a {cfg.input_size}x{cfg.input_size} input")


def _embed(model: DiffusersPixArt, x: torch.Tensor, t: torch.Tensor,
           y: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    encoder_hidden_states, encoder_attention_mask = y
    return model.embed(x, t, encoder_hidden_states, encoder_attention_mask)


PIXART = register_adapter(ModelAdapter(
    name=PIXART_CLASS_NAME,
    model_type=DiffusersPixArt,
    kinds=(BlockKind(
        name="block",
        block_type=DiffusersPixArtBlock,
        blocks="transformer_blocks",
        modulation="modulation",  # (t6, emb_t, text, bias) -> shift, scale, gate of attn, then of mlp
        chunks=6,
        branches=(
            BranchSpec("attn", "attn1", Attention, "norm1", 0, 1, 2,
                       AttentionSpec(out_proj="to_out.0", num_heads="heads", q_proj="to_q", k_proj="to_k", v_proj="to_v")),
            BranchSpec("cross", "attn2", TextCrossAttention, None, None, None, None, context=(2, 3),
                       prepare="prepare", constants=("k", "v")),  # attn2(h, *attn2.prepare(text, bias))
            BranchSpec("mlp", "ff", FeedForward, "norm2", 3, 4, 5),
        ),
    ),),
    embed=_embed,  # y is the tuple (encoder_hidden_states, encoder_attention_mask)
    final=lambda model, h, *cond: model.final(h, *cond),
    dims=config_dims,
))

load = load_diffusers_pixart  # what `tcgraph.models.load_diffusers` calls for this class
