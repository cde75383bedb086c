"""diffusers' `SD3Transformer2DModel` (SD3-Medium, SD3.5), as tcgraph traces, rewrites and exports it.

As for PixArt (`tcgraph.models.diffusers.pixart`), `DiffusersSD3` wraps the diffusers model's own
modules, unchanged and under their diffusers names (`transformer_blocks.3.attn.add_k_proj.weight`),
with a forward written for torch.fx: the same operations, with the position table cropped to the
static resolution once, when it is built (`pos_table`, not saved). `tests/models/test_diffusers_sd3.py`
checks it against diffusers' forward.

`forward(x, t, encoder_hidden_states, pooled_projections)`: the latent [B, C, H, W], the timestep
(a float: flow matching, `sigma * 1000` as the pipeline passes it), the text sequence
[B, L, joint_attention_dim] and the pooled text embedding [B, pooled_projection_dim]. SD3 reads no
text mask. The blocks read two streams, the image rows and the text rows, and one conditioning
vector `temb` (the timestep's embedding plus the pooled text's).

Blocks and their branches (kinds, in the order the forward runs them; all in the one list
`transformer_blocks`, each block of the kind whose class is its own):
- "dual" (`SD3DualBlock`, SD3.5's first blocks): `attn`, the joint attention over [text; image]
  rows, one branch writing both streams through each stream's gate; `attn_image`, the extra
  image-only attention (diffusers' `attn2`), whose input is the block's input normed and modulated
  with its own shift and scale (it does not see the joint attention's update), then `mlp` (image)
  and `mlp_text` (text);
- "joint" (`SD3Block`): `attn`, `mlp`, `mlp_text`;
- "last" (`SD3LastBlock`, `context_pre_only`): `attn` reads the text rows for keys and values only
  and writes the image rows; `mlp`. Its text stream leaves unchanged (diffusers drops it).

The joint attention (`JointAttention`) projects each stream with its own layers (`to_q/k/v` for the
image rows, `add_q_proj/add_k_proj/add_v_proj` for the text rows), norms queries and keys per head
where the model has qk-norm, attends over all rows, and projects the image rows with `to_out` and the
text rows with `to_add_out`. Because its rows are not all projected alike, it (and `ImageAttention`, the
dual blocks' `attn2`, with q/k norms) gives a token action its rows itself: `rows(u, image_idx)`, queries
of the text rows (none in the last block) and of the kept image rows, keys and values of all rows
(`AttentionSpec(rows="rows")`).

diffusers is imported when this module is: it is an optional dependency (`.[diffusers]`).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from tcgraph.errors import TcgraphError
from tcgraph.models.adapter import AttentionSpec, BlockKind, BranchSpec, ModelAdapter, StreamRead, config_dims
from tcgraph.models.adapter import register_adapter
from tcgraph.models.diffusers.folder import DiffusersFolder, diffusers_missing, load_weights_into
from tcgraph.models.diffusers.sd3_config import SD3_CLASS_NAME, SD3Config, sd3_config_from_diffusers, sd3_kwargs
from tcgraph.models.official.checkpoint import check_finite
from tcgraph.models.official.dit import modulate
from tcgraph.names import IMAGE, TEXT_STREAM

try:
    from diffusers import SD3Transformer2DModel
    from diffusers.models.attention import FeedForward
    from diffusers.models.attention_processor import JointAttnProcessor2_0

    from tcgraph.models.diffusers.dit import timestep_features
except ImportError as e:  # pragma: no cover - depends on the environment
    raise diffusers_missing(e) from None


def _heads(q: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, rows, D] -> [B, heads, rows, D / heads]."""
    return q.reshape(q.shape[0], q.shape[1], heads, -1).transpose(1, 2)


def _normed(norm: nn.Module | None, x: torch.Tensor) -> torch.Tensor:
    return x if norm is None else norm(x)


def take_rows(x: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:
    """Rows `idx` of x [B, N, D] along dim 1: idx [k] (every sample's), [B, k] (each sample's own), or
    None (all of them)."""
    if idx is None:
        return x
    if idx.dim() == 1:
        return torch.index_select(x, 1, idx)
    return torch.gather(x, 1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Attention of [B, heads, rows, d] queries over keys and values -> [B, rows, heads * d]."""
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)


class JointAttention(nn.Module):
    """SD3's joint attention (a block's `attn`, diffusers' modules under their names):
    `forward(u)` with u = [text rows; image rows] [B, L + N, D] -> the same rows, projected per
    stream; with `context_pre_only` (the last block) the image rows only, [B, N, D].

    Its rows are not all projected alike (per-stream projections, per-stream q/k norms), so a token
    action computes them with `rows` (the adapter's `AttentionSpec(rows="rows")`), not with the
    generic attention ops of the token passes."""

    def __init__(self, attn: nn.Module, image_rows: int):
        super().__init__()
        for name in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "norm_q", "norm_k",
                     "norm_added_q", "norm_added_k", "to_out", "to_add_out"):
            setattr(self, name, getattr(attn, name, None))
        self.heads = int(attn.heads)
        self.image_rows = image_rows  # N: the static resolution's tokens, the last rows of u

    def rows(self, u: torch.Tensor, image_idx: torch.Tensor | None) -> torch.Tensor:
        """The output rows of every text row (none for the last block, whose text gives keys and values
        only), then of the image rows `image_idx` ([k] or [B, k] indices among the N image rows; None:
        all of them), from u [B, L + N, D]: queries of those rows, keys and values of all rows."""
        n, h = self.image_rows, self.heads
        txt, img = u[:, :-n], u[:, -n:]
        k = torch.cat([_normed(self.norm_added_k, _heads(self.add_k_proj(txt), h)),
                       _normed(self.norm_k, _heads(self.to_k(img), h))], dim=2)  # [B, h, L + N, d]
        v = torch.cat([_heads(self.add_v_proj(txt), h), _heads(self.to_v(img), h)], dim=2)
        q = _normed(self.norm_q, _heads(self.to_q(take_rows(img, image_idx)), h))  # [B, h, k, d]
        if self.to_add_out is None:  # context_pre_only: no text row is written, none is queried
            return self.to_out[1](self.to_out[0](_attend(q, k, v)))  # projection, dropout
        q = torch.cat([_normed(self.norm_added_q, _heads(self.add_q_proj(txt), h)), q], dim=2)
        out = _attend(q, k, v)  # [B, L + k, D]
        length = txt.shape[1]
        return torch.cat([self.to_add_out(out[:, :length]), self.to_out[1](self.to_out[0](out[:, length:]))], dim=1)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        return self.rows(u, None)


class ImageAttention(nn.Module):
    """SD3.5's extra image-only attention (a dual block's `attn2`, branch `attn_image`; diffusers'
    modules under their names, q/k norms per head where the model has them): `forward(u)` [B, N, D]
    -> [B, N, D]. The generic attention ops of the token passes know no q/k norm, so a token action
    computes its rows with `rows`."""

    def __init__(self, attn: nn.Module):
        super().__init__()
        for name in ("to_q", "to_k", "to_v", "norm_q", "norm_k", "to_out"):
            setattr(self, name, getattr(attn, name, None))
        self.heads = int(attn.heads)

    def rows(self, u: torch.Tensor, image_idx: torch.Tensor | None) -> torch.Tensor:
        """The output rows of the image rows `image_idx` ([k] or [B, k]; None: all): [B, k, D]."""
        h = self.heads
        q = _normed(self.norm_q, _heads(self.to_q(take_rows(u, image_idx)), h))
        k, v = _normed(self.norm_k, _heads(self.to_k(u), h)), _heads(self.to_v(u), h)
        return self.to_out[1](self.to_out[0](_attend(q, k, v)))

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        return self.rows(u, None)


class SD3Block(nn.Module):
    """One `JointTransformerBlock` (not the last), its modules under their diffusers names, with a
    traceable forward: `forward(image, text, temb) -> (image, text)`."""

    def __init__(self, block: nn.Module, image_rows: int):
        super().__init__()
        self.norm1, self.norm1_context = block.norm1, block.norm1_context  # adaLN-zero: linear -> chunks, norm
        self.attn = JointAttention(block.attn, image_rows)
        self.norm2, self.ff = block.norm2, block.ff
        self.norm2_context, self.ff_context = block.norm2_context, block.ff_context

    def mod_image(self, temb: torch.Tensor) -> torch.Tensor:
        """[B, 6D] (dual blocks: 9D): shift, scale, gate of the joint attention, of the MLP (, of attn2)."""
        return self.norm1.linear(self.norm1.silu(temb))

    def mod_text(self, temb: torch.Tensor) -> torch.Tensor:
        """[B, 6D]: shift, scale, gate of the text rows' attention, of the text MLP."""
        return self.norm1_context.linear(self.norm1_context.silu(temb))

    def forward(self, img: torch.Tensor, txt: torch.Tensor, temb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mi, mt = self.mod_image(temb).chunk(6, dim=1), self.mod_text(temb).chunk(6, dim=1)
        joint = self.attn(torch.cat([modulate(self.norm1_context.norm(txt), mt[0], mt[1]),
                                     modulate(self.norm1.norm(img), mi[0], mi[1])], dim=1))
        length = txt.shape[1]
        out = img + mi[2].unsqueeze(1) * joint[:, length:]
        out = out + mi[5].unsqueeze(1) * self.ff(modulate(self.norm2(out), mi[3], mi[4]))
        txt = txt + mt[2].unsqueeze(1) * joint[:, :length]
        txt = txt + mt[5].unsqueeze(1) * self.ff_context(modulate(self.norm2_context(txt), mt[3], mt[4]))
        return out, txt


class SD3DualBlock(SD3Block):
    """A block with SD3.5's extra image-only attention `attn2` (`ImageAttention`), read from
    the block's input normed once with the joint attention's, modulated with its own shift and scale."""

    def __init__(self, block: nn.Module, image_rows: int):
        super().__init__(block, image_rows)
        self.attn2 = ImageAttention(block.attn2)

    def forward(self, img: torch.Tensor, txt: torch.Tensor, temb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mi, mt = self.mod_image(temb).chunk(9, dim=1), self.mod_text(temb).chunk(6, dim=1)
        normed = self.norm1.norm(img)
        joint = self.attn(torch.cat([modulate(self.norm1_context.norm(txt), mt[0], mt[1]),
                                     modulate(normed, mi[0], mi[1])], dim=1))
        length = txt.shape[1]
        out = img + mi[2].unsqueeze(1) * joint[:, length:]
        out = out + mi[8].unsqueeze(1) * self.attn2(modulate(normed, mi[6], mi[7]))
        out = out + mi[5].unsqueeze(1) * self.ff(modulate(self.norm2(out), mi[3], mi[4]))
        txt = txt + mt[2].unsqueeze(1) * joint[:, :length]
        txt = txt + mt[5].unsqueeze(1) * self.ff_context(modulate(self.norm2_context(txt), mt[3], mt[4]))
        return out, txt


class SD3LastBlock(nn.Module):
    """The last block (`context_pre_only`): its text rows are keys and values of the joint attention
    only, normed by an `AdaLayerNormContinuous` (scale, then shift); the text leaves unchanged."""

    def __init__(self, block: nn.Module, image_rows: int):
        super().__init__()
        self.norm1, self.norm1_context = block.norm1, block.norm1_context
        self.attn = JointAttention(block.attn, image_rows)
        self.norm2, self.ff = block.norm2, block.ff

    mod_image = SD3Block.mod_image

    def mod_text(self, temb: torch.Tensor) -> torch.Tensor:
        """[B, 2D]: scale, shift of the text rows (diffusers' AdaLayerNormContinuous order)."""
        return self.norm1_context.linear(self.norm1_context.silu(temb))

    def forward(self, img: torch.Tensor, txt: torch.Tensor, temb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mi, mt = self.mod_image(temb).chunk(6, dim=1), self.mod_text(temb).chunk(2, dim=1)
        image = self.attn(torch.cat([modulate(self.norm1_context.norm(txt), mt[1], mt[0]),
                                     modulate(self.norm1.norm(img), mi[0], mi[1])], dim=1))
        out = img + mi[2].unsqueeze(1) * image
        out = out + mi[5].unsqueeze(1) * self.ff(modulate(self.norm2(out), mi[3], mi[4]))
        return out, txt


class DiffusersSD3(nn.Module):
    """A diffusers `SD3Transformer2DModel`;
    `forward(x, t, encoder_hidden_states, pooled_projections)` -> its output `sample`."""

    def __init__(self, model: nn.Module, input_size: int | None = None):
        super().__init__()
        self.config = sd3_config_from_diffusers(dict(model.config), where=SD3_CLASS_NAME, input_size=input_size)
        cfg = self.config
        _check_model(model, cfg)
        self.patch_size, self.grid = cfg.patch_size, cfg.input_size // cfg.patch_size
        self.out_channels = cfg.in_channels
        self.time_features = _features_of(model.time_text_embed.time_proj)
        self.pos_embed = model.pos_embed  # PatchEmbed: its conv `proj`, and its table (cropped here)
        side = cfg.input_size
        table = (model.pos_embed.cropped_pos_embed(side, side) if cfg.pos_embed_max_size
                 else model.pos_embed.pos_embed)
        self.register_buffer("pos_table", table.detach().clone().float(), persistent=False)  # [1, N, D]
        self.time_text_embed = model.time_text_embed
        self.context_embedder = model.context_embedder
        n = cfg.num_tokens
        blocks = list(model.transformer_blocks)
        self.transformer_blocks = nn.ModuleList(
            (SD3LastBlock if b.context_pre_only else SD3DualBlock if b.use_dual_attention else SD3Block)(b, n)
            for b in blocks)
        self.norm_out, self.proj_out = model.norm_out, model.proj_out

    def embed(self, x: torch.Tensor, t: torch.Tensor, encoder_hidden_states: torch.Tensor,
              pooled_projections: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(image rows [B, N, D], text rows [B, L, D], temb [B, D])."""
        img = self.pos_embed.proj(x).flatten(2).transpose(1, 2) + self.pos_table
        emb = self.time_text_embed
        temb = emb.timestep_embedder(timestep_features(t, **self.time_features)) + emb.text_embedder(pooled_projections)
        return img, self.context_embedder(encoder_hidden_states), temb

    def final(self, img: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        scale, shift = self.norm_out.linear(self.norm_out.silu(temb)).chunk(2, dim=1)
        h = self.proj_out(self.norm_out.norm(img) * (1 + scale[:, None]) + shift[:, None])  # [B, N, p*p*C]
        c, p, g = self.out_channels, self.patch_size, self.grid
        h = h.reshape(-1, g, g, p, p, c).permute(0, 5, 1, 3, 2, 4)  # einsum nhwpqc->nchpwq
        return h.reshape(-1, c, g * p, g * p)

    def forward(self, x: torch.Tensor, t: torch.Tensor, encoder_hidden_states: torch.Tensor,
                pooled_projections: torch.Tensor) -> torch.Tensor:
        img, txt, temb = self.embed(x, t, encoder_hidden_states, pooled_projections)
        for block in self.transformer_blocks:
            img, txt = block(img, txt, temb)
        return self.final(img, temb)


def build_diffusers_sd3(config: SD3Config, seed: int | None = None) -> DiffusersSD3:
    """An SD3Transformer2DModel with diffusers' random initialisation (seeded when `seed` is given)."""
    if seed is not None:
        torch.manual_seed(seed)
    return DiffusersSD3(SD3Transformer2DModel(**sd3_kwargs(config))).eval()


def sd3_state_dict_shapes(config: SD3Config) -> dict[str, tuple[int, ...]]:
    """{name: shape} of the wrapper's (and diffusers' own) state dict, built on the meta device."""
    with torch.device("meta"):
        model = SD3Transformer2DModel(**sd3_kwargs(config))
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def load_diffusers_sd3(folder: DiffusersFolder, input_size: int | None = None) -> DiffusersSD3:
    """The SD3Transformer2DModel saved in `folder`, its weights read with safetensors, in float32, at the
    latent side `input_size` (default: the config's `sample_size`)."""
    config = sd3_config_from_diffusers(folder.config, where=str(folder.model_dir / "config.json"),
                                       input_size=input_size)  # before weights
    model = load_weights_into(folder, SD3Transformer2DModel, SD3_CLASS_NAME, config)
    check_finite(model.state_dict(), str(folder.model_dir))
    return DiffusersSD3(model, input_size=input_size).eval()


def _features_of(proj: nn.Module) -> dict:
    return dict(dim=int(proj.num_channels), shift=float(proj.downscale_freq_shift), scale=float(proj.scale),
                flip_sin_to_cos=bool(proj.flip_sin_to_cos))


def _check_model(model: nn.Module, cfg: SD3Config) -> None:
    """The model is what the traceable forward assumes; refuses, naming them, the parts it does not run."""
    blocks = list(model.transformer_blocks)
    odd = [f"block {i} context_pre_only" for i, b in enumerate(blocks[:-1]) if b.context_pre_only]
    if not blocks[-1].context_pre_only or blocks[-1].use_dual_attention:
        odd.append("a last block that is not context_pre_only, or one with attn2")
    for i, b in enumerate(blocks):
        for name in ("attn", "attn2"):
            attn = getattr(b, name, None)
            if attn is not None and not isinstance(attn.processor, JointAttnProcessor2_0):
                odd.append(f"block {i} {name} with the processor {type(attn.processor).__name__} (tcgraph runs "
                           "JointAttnProcessor2_0)")
        if getattr(b, "_chunk_size", None) is not None:
            odd.append(f"block {i} with chunked feed-forward")
    if getattr(model.pos_embed, "layer_norm", False) or model.pos_embed.pos_embed is None:
        odd.append("a patch embedding with a layer norm or without its sin-cos table")
    if odd:
        raise TcgraphError(f"{SD3_CLASS_NAME} has {', '.join(odd)}: tcgraph's SD3 adapter does not run it")


def _embed(model: DiffusersSD3, x: torch.Tensor, t: torch.Tensor, y: tuple[torch.Tensor, torch.Tensor]):
    img, txt, temb = model.embed(x, t, *y)
    return (img, txt), temb


# A token action computes an attention's rows with the branch module's own `rows` (per-stream
# projections and q/k norms: not the generic attention ops of the token passes).
ROWS = AttentionSpec(rows="rows")
_JOINT = BranchSpec("attn", "attn", JointAttention, None, None, None, None, ROWS,
                    reads=(StreamRead(TEXT_STREAM, "norm1_context.norm", 0, 1, 2, modulation=1),
                           StreamRead(IMAGE, "norm1.norm", 0, 1, 2)))
_MLP = BranchSpec("mlp", "ff", FeedForward, "norm2", 3, 4, 5)
_MLP_TEXT = BranchSpec("mlp_text", "ff_context", FeedForward, None, None, None, None,
                       reads=(StreamRead(TEXT_STREAM, "norm2_context", 3, 4, 5, modulation=1),))
_STREAMS = (IMAGE, TEXT_STREAM)

SD3 = register_adapter(ModelAdapter(
    name=SD3_CLASS_NAME,
    model_type=DiffusersSD3,
    streams=_STREAMS,
    kinds=(
        BlockKind("dual", SD3DualBlock, "transformer_blocks", ("mod_image", "mod_text"), (9, 6), (
            _JOINT,
            BranchSpec("attn_image", "attn2", ImageAttention, None, None, None, None, ROWS,
                       reads=(StreamRead(IMAGE, "norm1.norm", 6, 7, 8, block_input=True),)),
            _MLP, _MLP_TEXT), streams=_STREAMS),
        BlockKind("joint", SD3Block, "transformer_blocks", ("mod_image", "mod_text"), (6, 6),
                  (_JOINT, _MLP, _MLP_TEXT), streams=_STREAMS),
        BlockKind("last", SD3LastBlock, "transformer_blocks", ("mod_image", "mod_text"), (6, 2), (
            BranchSpec("attn", "attn", JointAttention, None, None, None, None, ROWS,
                       reads=(StreamRead(TEXT_STREAM, "norm1_context.norm", 1, 0, None, modulation=1, writes=False),
                              StreamRead(IMAGE, "norm1.norm", 0, 1, 2))),
            _MLP), streams=_STREAMS),
    ),
    embed=_embed,  # y is the tuple (encoder_hidden_states, pooled_projections)
    final=lambda model, h, temb: model.final(h[0], temb),
    dims=config_dims,
))


def layout(config: SD3Config):
    """Per block (branch, the streams it writes): the dual blocks' attn (text, image rows), attn_image,
    mlp (image), mlp_text (text); the joint blocks' the same without attn_image; the last block's attn
    and mlp (image rows: its text gives keys and values only)."""
    both = (TEXT_STREAM, IMAGE)
    joint = (("attn", both), ("mlp", (IMAGE,)), ("mlp_text", (TEXT_STREAM,)))
    dual = (joint[0], ("attn_image", (IMAGE,))) + joint[1:]
    k = len(config.dual_attention_layers)
    return (dual,) * k + (joint,) * (config.depth - 1 - k) + ((("attn", (IMAGE,)), ("mlp", (IMAGE,))),)


load = load_diffusers_sd3  # what `tcgraph.models.load_diffusers` calls for this class
