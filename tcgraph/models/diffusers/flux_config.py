"""diffusers' `FluxTransformer2DModel` config and parameter shapes, without importing diffusers.

`FluxConfig` is a `DiTConfig` (every size the planner, export and the samplers read) with what a
FLUX model adds: the single-stream blocks' count, the pooled text width, whether the guidance
scale is an input (FLUX.1-dev's guidance embedding; FLUX.1-schnell has none) and the RoPE axes.
Its sizes are tcgraph's view of the model:

- `in_channels` are the latent's channels C (16 for FLUX.1): the model reads the latent image
  [B, C, H, W] and packs 2x2 patches itself, as FluxPipeline's `_pack_latents` does, so
  `patch_size` is 2 and diffusers' `in_channels` is 4C;
- `input_size` is the latent side H = W, a constant of the static graphs. A FLUX config.json has
  no resolution: `flux_config_from_diffusers` takes it as an argument (default 128: 1024 pixels);
- `depth` counts every block, the `depth - single_depth` double-stream blocks first;
- `caption_channels` is `joint_attention_dim` (the T5 embeddings' width), `pooled_channels`
  `pooled_projection_dim` (the CLIP pooled embedding's width).

`flux_state_dict_shapes` lists the wrapper's parameters (`tcgraph.models.diffusers.flux`), whose
names are diffusers' except in the single blocks, where the fused output projection `proj_out`
is split in two (`attn.proj_out`, `mlp.proj_out`) and the MLP's input projection sits in the MLP
branch (`mlp.proj_mlp`); `flux_diffusers_shapes` lists diffusers' own, which a folder must hold.
"""
from __future__ import annotations

from dataclasses import dataclass

from tcgraph.errors import TcgraphError
from tcgraph.models.config import DiTConfig
from tcgraph.models.diffusers.config import TIME_FEATURES, config_int, show_value

FLUX_CLASS_NAME = "FluxTransformer2DModel"
FLUX_LAYOUT = "flux"
DEFAULT_LATENT_SIDE = 128  # 1024 x 1024 pixels through FLUX's VAE (factor 8)
AXES_DIMS = (16, 56, 56)  # diffusers' default RoPE axes: (text/index, row, column)
FLUX_INT_RANGES = {"num_single_layers": (0, 1024), "joint_attention_dim": (1, 65536),
                   "pooled_projection_dim": (1, 65536)}


@dataclass(frozen=True)
class FluxConfig(DiTConfig):
    """A FluxTransformer2DModel's sizes (see the module docstring)."""

    patch_size: int = 2
    mlp_ratio: float = 4.0
    class_dropout_prob: float = 0.0
    num_classes: int = 0
    learn_sigma: bool = False
    layout: str = FLUX_LAYOUT
    single_depth: int = 0  # the single-stream blocks, after the depth - single_depth double ones
    pooled_channels: int = 0  # pooled_projection_dim
    guidance_embeds: bool = False  # FLUX.1-dev: the guidance scale is an input
    axes_dims_rope: tuple[int, ...] = AXES_DIMS

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "axes_dims_rope", tuple(int(a) for a in self.axes_dims_rope))
        problems = []
        if self.patch_size != 2:
            problems.append(f"patch_size {self.patch_size} (FLUX packs 2x2 latent patches)")
        if not 0 <= self.single_depth <= self.depth or self.depth - self.single_depth < 1:
            problems.append(f"single_depth {self.single_depth} of depth {self.depth} (one double block at least)")
        if sum(self.axes_dims_rope) != self.hidden_size // self.num_heads or any(a % 2 for a in self.axes_dims_rope):
            problems.append(f"RoPE axes {list(self.axes_dims_rope)} (even sizes summing to the head width "
                            f"{self.hidden_size // self.num_heads})")
        if self.caption_channels <= 0 or self.pooled_channels <= 0:
            problems.append("no text or pooled width (caption_channels, pooled_channels > 0)")
        if self.mlp_ratio != 4.0 or self.learn_sigma or self.num_classes:
            problems.append("mlp_ratio other than 4, learn_sigma or classes")
        if problems:
            raise TcgraphError(f"not a FLUX config: {'; '.join(problems)}")

    @property
    def double_depth(self) -> int:
        return self.depth - self.single_depth

    def pipeline_sigmas(self, num_steps: int) -> list[float]:
        """The sigmas FluxPipeline sets its scheduler's timesteps with (then shifted by mu): 1 down to 1/S."""
        import numpy as np

        return np.linspace(1.0, 1.0 / num_steps, num_steps).tolist()  # as FluxPipeline computes them

    @property
    def guidance(self) -> str:
        """How guidance reaches this model (`tcgraph.names.GUIDANCE_MODES`): an input with a guidance
        embedding (FLUX.1-dev), none without (FLUX.1-schnell)."""
        return "input" if self.guidance_embeds else "none"

    def step_fixed_flops(self, text_length: int) -> int:
        """FLOPs per sample that every step spends whatever its recipe (`tcgraph.plan.flops.fixed_flops`):
        the embeddings (`mmdit_embed_flops`, FLUX.1-dev's guidance embedding too), each block's adaLN
        linears (6D image + 6D text per double block, 3D per single block), the final adaLN and projection."""
        d = self.hidden_size
        guidance = 2 * 256 * d + 2 * d * d if self.guidance_embeds else 0
        widths = self.double_depth * 12 + self.single_depth * 3
        return mmdit_embed_flops(self, text_length) + guidance + 2 * d * widths * d + mmdit_final_flops(self)


def mmdit_embed_flops(cfg, text_length: int) -> int:
    """FLOPs per sample of an MMDiT's embeddings (FLUX, SD3): patches, timestep, pooled text (P -> D -> D)
    and the text's projection to D at every step (these models carry no run constants)."""
    n, d, p = cfg.num_tokens, cfg.hidden_size, cfg.patch_size
    return (2 * n * p * p * cfg.in_channels * d + 2 * 256 * d + 2 * d * d + 2 * cfg.pooled_channels * d + 2 * d * d
            + 2 * text_length * cfg.caption_channels * d)


def mmdit_final_flops(cfg) -> int:
    """FLOPs per sample of an MMDiT's final adaLN (2D) and output projection."""
    d, p = cfg.hidden_size, cfg.patch_size
    return 2 * d * 2 * d + 2 * cfg.num_tokens * d * p * p * cfg.out_channels


def flux_config_from_diffusers(raw: dict, where: str, input_size: int = DEFAULT_LATENT_SIDE) -> FluxConfig:
    """The `FluxConfig` of a FluxTransformer2DModel config dict at the latent side `input_size`;
    refuses settings the wrapper does not run, naming them."""
    if not isinstance(raw, dict):
        raise TcgraphError(f"{where}: a model config must be a JSON object, got a {type(raw).__name__}")
    num = lambda key, default: config_int(raw, key, default, where)  # noqa: E731

    def wide(key, default):
        value = raw.get(key, default)
        lo, hi = FLUX_INT_RANGES[key]
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise TcgraphError(f"{where}: {key} = {show_value(value)}: expected an integer from {lo} to {hi}; save the "
                               "model again with save_pretrained")
        return value

    heads, head_dim = num("num_attention_heads", 24), num("attention_head_dim", 128)
    packed = num("in_channels", 64)
    out = num("out_channels", None)
    axes = raw.get("axes_dims_rope", list(AXES_DIMS))
    refusals = []
    if num("patch_size", 1) != 1:
        refusals.append(f"patch_size {raw.get('patch_size')} (FLUX's transformer reads packed tokens: patch_size 1)")
    if packed % 4:
        refusals.append(f"in_channels {packed} (4 x the latent channels: 2x2 packed patches)")
    if out is not None and out != packed:
        refusals.append(f"out_channels {out} with in_channels {packed} (the velocity has the latent's channels)")
    if not isinstance(raw.get("guidance_embeds", False), bool):
        refusals.append(f"guidance_embeds {show_value(raw.get('guidance_embeds'))} (true or false)")
    if not (isinstance(axes, (list, tuple)) and len(axes) == 3 and all(isinstance(a, int) and not isinstance(a, bool)
                                                                      and 0 < a <= 4096 for a in axes)):
        refusals.append(f"axes_dims_rope {show_value(axes)} (three positive integers)")
        axes = AXES_DIMS
    if refusals:
        raise TcgraphError(f"{where}: tcgraph cannot run this {FLUX_CLASS_NAME}: {'; '.join(refusals)}")
    doubles, singles = num("num_layers", 19), wide("num_single_layers", 38)
    try:
        return FluxConfig(input_size=input_size, in_channels=packed // 4, hidden_size=heads * head_dim,
                          depth=doubles + singles, num_heads=heads, single_depth=singles,
                          caption_channels=wide("joint_attention_dim", 4096),
                          pooled_channels=wide("pooled_projection_dim", 768),
                          guidance_embeds=bool(raw.get("guidance_embeds", False)), axes_dims_rope=tuple(axes))
    except TcgraphError as e:
        raise TcgraphError(f"{where}: {e}") from None


def flux_kwargs(config: FluxConfig) -> dict:
    """The FluxTransformer2DModel arguments of a `FluxConfig`."""
    if not isinstance(config, FluxConfig):
        raise TcgraphError(f"a FLUX model is built from a FluxConfig, not a {type(config).__name__}")
    return dict(patch_size=1, in_channels=4 * config.in_channels, out_channels=None,
                num_layers=config.double_depth, num_single_layers=config.single_depth,
                attention_head_dim=config.hidden_size // config.num_heads, num_attention_heads=config.num_heads,
                joint_attention_dim=config.caption_channels, pooled_projection_dim=config.pooled_channels,
                guidance_embeds=config.guidance_embeds, axes_dims_rope=tuple(config.axes_dims_rope))


def _linear(name: str, out: int, inp: int, bias: bool = True) -> dict:
    return {f"{name}.weight": (out, inp), **({f"{name}.bias": (out,)} if bias else {})}


def _shapes(config: FluxConfig, split: bool) -> dict[str, tuple[int, ...]]:
    d, hd, m = config.hidden_size, config.hidden_size // config.num_heads, config.mlp_hidden
    qkv = {k: v for p in ("to_q", "to_k", "to_v") for k, v in _linear(f"attn.{p}", d, d).items()}
    norms = {"attn.norm_q.weight": (hd,), "attn.norm_k.weight": (hd,)}
    double = {**_linear("norm1.linear", 6 * d, d), **_linear("norm1_context.linear", 6 * d, d), **norms, **qkv,
              **_linear("attn.to_out.0", d, d), "attn.norm_added_q.weight": (hd,), "attn.norm_added_k.weight": (hd,),
              **{k: v for p in ("add_q_proj", "add_k_proj", "add_v_proj") for k, v in _linear(f"attn.{p}", d, d).items()},
              **_linear("attn.to_add_out", d, d),
              **{k: v for ff in ("ff", "ff_context") for k, v in
                 {**_linear(f"{ff}.net.0.proj", m, d), **_linear(f"{ff}.net.2", d, m)}.items()}}
    single = {**_linear("norm.linear", 3 * d, d), **norms, **qkv}
    if split:  # the wrapper's: the output projection in two, the MLP's input projection in the MLP branch
        single.update({**_linear("mlp.proj_mlp", m, d), **_linear("attn.proj_out", d, d),
                       **_linear("mlp.proj_out", d, m, bias=False)})
    else:
        single.update({**_linear("proj_mlp", m, d), **_linear("proj_out", d, d + m)})
    out = {**_linear("time_text_embed.timestep_embedder.linear_1", d, TIME_FEATURES),
           **_linear("time_text_embed.timestep_embedder.linear_2", d, d),
           **({**_linear("time_text_embed.guidance_embedder.linear_1", d, TIME_FEATURES),
               **_linear("time_text_embed.guidance_embedder.linear_2", d, d)} if config.guidance_embeds else {}),
           **_linear("time_text_embed.text_embedder.linear_1", d, config.pooled_channels),
           **_linear("time_text_embed.text_embedder.linear_2", d, d),
           **_linear("context_embedder", d, config.caption_channels),
           **_linear("x_embedder", d, 4 * config.in_channels)}
    for i in range(config.double_depth):
        out.update({f"transformer_blocks.{i}.{k}": v for k, v in double.items()})
    for i in range(config.single_depth):
        out.update({f"single_transformer_blocks.{i}.{k}": v for k, v in single.items()})
    out.update({**_linear("norm_out.linear", 2 * d, d), **_linear("proj_out", 4 * config.out_channels, d)})
    return out


def flux_state_dict_shapes(config: FluxConfig) -> dict[str, tuple[int, ...]]:
    """{name: shape} of the wrapper's state dict (`DiffusersFlux`), without diffusers or memory."""
    return _shapes(config, split=True)


def flux_diffusers_shapes(config: FluxConfig) -> dict[str, tuple[int, ...]]:
    """{name: shape} of diffusers' FluxTransformer2DModel state dict: what a folder's weights hold."""
    return _shapes(config, split=False)


def flux_layout(config: FluxConfig):
    """Per block (`tcgraph.models.layout`): the double blocks' joint `attn` writes the text and image rows,
    `mlp` the image rows, `mlp_text` the text rows; the single blocks' `attn` and `mlp` both write all
    rows (text, then image)."""
    from tcgraph.names import IMAGE, TEXT_STREAM

    both = (TEXT_STREAM, IMAGE)
    double = (("attn", both), ("mlp", (IMAGE,)), ("mlp_text", (TEXT_STREAM,)))
    return (double,) * config.double_depth + ((("attn", both), ("mlp", both)),) * config.single_depth
