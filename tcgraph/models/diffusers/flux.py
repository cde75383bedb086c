"""diffusers' `FluxTransformer2DModel` (FLUX.1-dev and FLUX.1-schnell), as tcgraph traces, rewrites
and exports it.

As for DiT and PixArt, diffusers' forward cannot be traced by torch.fx (shape reads, optional
arguments, processors chosen at run time), so `DiffusersFlux` wraps the diffusers model's own
modules, under their names, in a forward written for tracing; `tests/models/test_diffusers_flux.py`
checks it against diffusers' forward. Sizes and names: `tcgraph.models.diffusers.flux_config`.

`forward(x, t, encoder_hidden_states, pooled_projections[, guidance])`:
- `x` [B, C, H, W], the latent image: the wrapper packs 2x2 patches into tokens as FluxPipeline's
  `_pack_latents` does, and unpacks the output (`_unpack_latents`), so the graphs read and write
  images like every other model's;
- `t` [B], float: the flow-matching timestep as tcgraph's samplers pass it to every model, the
  scheduler's `timesteps` (sigma x 1000). diffusers' forward takes sigma (FluxPipeline passes
  t / 1000) and multiplies it by 1000 again: the wrapper skips both, so
  `wrapper(x, 1000 s, ...) == diffusers(pack(x), timestep=s, ...)`;
- `encoder_hidden_states` [B, L, joint_attention_dim], the T5 sequence (L static, a plan setting),
  and `pooled_projections` [B, pooled_projection_dim], the CLIP pooled embedding. FLUX reads no
  text mask: its pipeline attends to every one of the L tokens, padding included;
- `guidance` [B], the guidance scale as FluxPipeline passes it (diffusers multiplies it by 1000):
  only for a model with a guidance embedding (FLUX.1-dev), one pass per step, no doubled batch.

Position ids are constants of the static resolution: the image tokens' RoPE tables (cos, sin
[N, head_dim], from FluxPipeline's ids: row and column of each packed token) are computed when
the wrapper is built (non-persistent buffers). The text tokens' ids are all zero, so their rotation
is the identity (cos 1, sin 0): the attention rotates the image rows only, and the tables do not
depend on L. `tcgraph.diffusers.use` refuses a pipeline call with other ids.

Blocks (`tcgraph.models.diffusers.flux_blocks`): the double blocks' joint attention over
[text; image] rows is one branch `attn` (its halves share keys and values), the image MLP `mlp`
and the text MLP `mlp_text` are branches of their own; a single block's attention and MLP are
parallel branches `attn` and `mlp` over all its rows. The conditioning the blocks read is
`(temb, cos, sin)`: the timestep (+ guidance) + pooled text embedding, and the RoPE tables.

diffusers is imported when this module is: it is an optional dependency (`.[diffusers]`).
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn

from tcgraph.models.adapter import ADAPTERS, AttentionSpec, BlockKind, BranchSpec, ModelAdapter, StreamRead, config_dims, register_adapter
from tcgraph.models.diffusers.flux_config import (FLUX_CLASS_NAME, FluxConfig, flux_config_from_diffusers,
                                                  flux_diffusers_shapes, flux_kwargs)
from tcgraph.models.diffusers.folder import DiffusersFolder, diffusers_missing, load_weights_into
from tcgraph.models.official.checkpoint import check_finite
from tcgraph.names import IMAGE, TEXT_STREAM

try:
    from diffusers import FluxTransformer2DModel
    from diffusers.models.attention import FeedForward
    from diffusers.models.transformers.transformer_flux import FluxPosEmbed

    from tcgraph.models.diffusers.dit import timestep_features
    from tcgraph.models.diffusers.flux_blocks import (FluxDoubleBlock, FluxJointAttention, FluxSingleBlock,
                                                      FluxSingleMLP, check_flux_model)
except ImportError as e:  # pragma: no cover - depends on the environment
    raise diffusers_missing(e) from None

TIME_SCALE = 1000.0  # diffusers' FLUX forward multiplies timestep and guidance by it


def image_ids(grid: int) -> torch.Tensor:
    """[grid * grid, 3] position ids of the packed image tokens, as FluxPipeline makes them: 0, row, column."""
    ids = torch.zeros(grid, grid, 3)
    ids[..., 1] = torch.arange(grid)[:, None]
    ids[..., 2] = torch.arange(grid)[None, :]
    return ids.reshape(grid * grid, 3)


def pack(x: torch.Tensor, grid: int) -> torch.Tensor:
    """[B, C, 2g, 2g] -> [B, g*g, 4C]: FluxPipeline's `_pack_latents` (2x2 patches, channel first)."""
    c = x.shape[1]
    x = x.reshape(-1, c, grid, 2, grid, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(-1, grid * grid, c * 4)


def unpack(h: torch.Tensor, grid: int) -> torch.Tensor:
    """[B, g*g, 4C] -> [B, C, 2g, 2g]: FluxPipeline's `_unpack_latents`."""
    c = h.shape[-1] // 4
    h = h.reshape(-1, grid, grid, c, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return h.reshape(-1, c, grid * 2, grid * 2)


class DiffusersFlux(nn.Module):
    """A diffusers `FluxTransformer2DModel` at a static resolution (`config.input_size`, the latent side)."""

    def __init__(self, model: nn.Module, config: FluxConfig):
        super().__init__()
        check_flux_model(model, config)
        self.config = config
        self.grid = config.input_size // 2
        self.time_text_embed = model.time_text_embed
        self.context_embedder = model.context_embedder
        self.x_embedder = model.x_embedder
        self.transformer_blocks = nn.ModuleList(FluxDoubleBlock(b) for b in model.transformer_blocks)
        self.single_transformer_blocks = nn.ModuleList(FluxSingleBlock(b) for b in model.single_transformer_blocks)
        self.norm_out = model.norm_out
        self.proj_out = model.proj_out
        with torch.no_grad():
            cos, sin = FluxPosEmbed(theta=10000, axes_dim=list(config.axes_dims_rope))(image_ids(self.grid))
        self.register_buffer("rope_cos", cos.float(), persistent=False)  # [N, head_dim]
        self.register_buffer("rope_sin", sin.float(), persistent=False)

    def embed(self, x: torch.Tensor, t: torch.Tensor, encoder_hidden_states: torch.Tensor,
              pooled_projections: torch.Tensor, guidance: torch.Tensor | None = None):
        """((image [B, N, D], text [B, L, D]), (temb [B, D], cos [N, hd], sin [N, hd]))."""
        emb = self.time_text_embed
        temb = emb.timestep_embedder(timestep_features(t.float(), 256, shift=0.0))
        if self.config.guidance_embeds:
            temb = temb + emb.guidance_embedder(timestep_features(guidance.float() * TIME_SCALE, 256, shift=0.0))
        temb = temb + emb.text_embedder(pooled_projections)
        img = self.x_embedder(pack(x, self.grid))
        txt = self.context_embedder(encoder_hidden_states)
        return (img, txt), (temb, self.rope_cos, self.rope_sin)

    def final(self, img: torch.Tensor, temb: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        norm = self.norm_out
        scale, shift = norm.linear(norm.silu(temb)).chunk(2, dim=1)  # AdaLayerNormContinuous: scale first
        h = norm.norm(img) * (1 + scale)[:, None, :] + shift[:, None, :]
        return unpack(self.proj_out(h), self.grid)

    def run(self, x: torch.Tensor, t: torch.Tensor, encoder_hidden_states: torch.Tensor,
            pooled_projections: torch.Tensor, guidance: torch.Tensor | None) -> torch.Tensor:
        (img, txt), cond = self.embed(x, t, encoder_hidden_states, pooled_projections, guidance)
        for block in self.transformer_blocks:
            img, txt = block(img, txt, *cond)
        for block in self.single_transformer_blocks:
            img, txt = block(img, txt, *cond)
        return self.final(img, *cond)

    def forward(self, x: torch.Tensor, t: torch.Tensor, encoder_hidden_states: torch.Tensor,
                pooled_projections: torch.Tensor) -> torch.Tensor:
        return self.run(x, t, encoder_hidden_states, pooled_projections, None)


class DiffusersFluxGuided(DiffusersFlux):
    """A FLUX model with a guidance embedding (FLUX.1-dev): the guidance scale is its last input (a traced
    forward has no optional argument, so the two forms are two classes)."""

    def forward(self, x: torch.Tensor, t: torch.Tensor, encoder_hidden_states: torch.Tensor,
                pooled_projections: torch.Tensor, guidance: torch.Tensor) -> torch.Tensor:
        return self.run(x, t, encoder_hidden_states, pooled_projections, guidance)


def wrap(model: nn.Module, config: FluxConfig) -> DiffusersFlux:
    """The wrapper of a FluxTransformer2DModel: with or without the guidance input, as its config says."""
    return (DiffusersFluxGuided if config.guidance_embeds else DiffusersFlux)(model, config).eval()


def build_diffusers_flux(config: FluxConfig, seed: int | None = None) -> DiffusersFlux:
    """A FluxTransformer2DModel with diffusers' random initialisation (seeded when `seed` is given)."""
    if seed is not None:
        torch.manual_seed(seed)
    return wrap(FluxTransformer2DModel(**flux_kwargs(config)), config)


def load_diffusers_flux(folder: DiffusersFolder, input_size: int | None = None) -> DiffusersFlux:
    """The FluxTransformer2DModel saved in `folder` (safetensors), in float32, at the latent side
    `input_size` (default: the config's `sample_size` where it has one, else 128: 1024 pixels)."""
    where = str(folder.model_dir / "config.json")
    side = input_size if input_size is not None else folder.config.get("sample_size", None)
    config = flux_config_from_diffusers(folder.config, where, **({} if side is None else {"input_size": side}))
    # sample_size is tcgraph's (the digits-flux demo writes it): diffusers' class has none and warns of it
    folder = dataclasses.replace(folder, config={k: v for k, v in folder.config.items() if k != "sample_size"})
    model = load_weights_into(folder, FluxTransformer2DModel, FLUX_CLASS_NAME, config,
                              want=flux_diffusers_shapes(config))
    check_finite(model.state_dict(), str(folder.model_dir))
    return wrap(model, config)


def _embed(model: DiffusersFlux, x, t, y):
    return model.embed(x, t, *y)


DOUBLE_ATTN_READS = (StreamRead(TEXT_STREAM, "norm1_context.norm", 0, 1, 2, modulation=1),
                     StreamRead(IMAGE, "norm1.norm", 0, 1, 2))
SINGLE_READS = (StreamRead(TEXT_STREAM, "norm.norm", 0, 1, 2), StreamRead(IMAGE, "norm.norm", 0, 1, 2))
JOINT_ROWS = AttentionSpec(rows="rows")  # FluxJointAttention.rows: text rows and chosen image rows

FLUX = register_adapter(ModelAdapter(
    name=FLUX_CLASS_NAME,
    model_type=DiffusersFlux,
    streams=(IMAGE, TEXT_STREAM),
    kinds=(
        BlockKind(
            name="double", block_type=FluxDoubleBlock, blocks="transformer_blocks",
            modulation=("modulation_image", "modulation_text"), chunks=(6, 6), streams=(IMAGE, TEXT_STREAM),
            branches=(
                BranchSpec("attn", "attn", FluxJointAttention, None, None, None, None, JOINT_ROWS, context=(1, 2),
                           reads=DOUBLE_ATTN_READS),
                BranchSpec("mlp", "ff", FeedForward, "norm2", 3, 4, 5),
                BranchSpec("mlp_text", "ff_context", FeedForward, None, None, None, None,
                           reads=(StreamRead(TEXT_STREAM, "norm2_context", 3, 4, 5, modulation=1),)),
            )),
        BlockKind(
            name="single", block_type=FluxSingleBlock, blocks="single_transformer_blocks", modulation="modulation",
            chunks=3, streams=(IMAGE, TEXT_STREAM), parallel=True,
            branches=(
                BranchSpec("attn", "attn", FluxJointAttention, None, None, None, None, JOINT_ROWS, context=(1, 2),
                           reads=SINGLE_READS),
                BranchSpec("mlp", "mlp", FluxSingleMLP, None, None, None, None, reads=SINGLE_READS),
            )),
    ),
    embed=_embed,  # y: (encoder_hidden_states, pooled_projections[, guidance])
    final=lambda model, h, *cond: model.final(h[0], *cond),
    dims=config_dims,
))

ADAPTERS[DiffusersFluxGuided] = FLUX  # the same blocks (the registry keys exact classes for the testers)
load = load_diffusers_flux  # what `tcgraph.models.load_diffusers` calls for this class
