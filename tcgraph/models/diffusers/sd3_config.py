"""diffusers' `SD3Transformer2DModel` config, without importing diffusers.

`SD3Config` is a `DiTConfig` (every size the planner, export and the samplers read) with what an
SD3 model adds:

- `caption_channels` is `joint_attention_dim` (the width of the text sequence, CLIP and T5
  embeddings side by side), `pooled_channels` is `pooled_projection_dim` (the pooled CLIP
  embeddings); diffusers' `caption_projection_dim` is the width (`hidden_size`);
- `dual_attention_layers`: the blocks with SD3.5's extra image-only attention (`attn2`); tcgraph
  takes them as the first blocks, 0 .. k-1, before the last one (SD3.5-Medium: 0 .. 12 of 24);
- `qk_norm`: "" for none (SD3-Medium) or "rms_norm" (SD3.5);
- `pos_embed_max_size`: the side of the sin-cos position table diffusers crops to the
  resolution (0: a table of the sample size itself);
- `input_size` is the latent side, a constant of the static graphs (diffusers' `sample_size`).

The last block is `context_pre_only`: its text stream gives keys and values only.
"""
from __future__ import annotations

from dataclasses import dataclass

from tcgraph.errors import TcgraphError
from tcgraph.models.config import DiTConfig
from tcgraph.models.diffusers.config import config_int, show_value

SD3_CLASS_NAME = "SD3Transformer2DModel"
SD3_LAYOUT = "sd3"
QK_NORMS = ("", "rms_norm")
SD3_INT_RANGES = {"joint_attention_dim": (1, 65536), "pooled_projection_dim": (1, 65536),
                  "caption_projection_dim": (1, 65536), "pos_embed_max_size": (1, 4096)}


@dataclass(frozen=True)
class SD3Config(DiTConfig):
    """An SD3Transformer2DModel's sizes (see the module docstring)."""

    mlp_ratio: float = 4.0
    class_dropout_prob: float = 0.0
    num_classes: int = 0
    learn_sigma: bool = False
    layout: str = SD3_LAYOUT
    pooled_channels: int = 0  # pooled_projection_dim
    dual_attention_layers: tuple[int, ...] = ()
    qk_norm: str = ""
    pos_embed_max_size: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "dual_attention_layers", tuple(int(i) for i in self.dual_attention_layers))
        problems = []
        dual = self.dual_attention_layers
        if dual != tuple(range(len(dual))) or len(dual) >= self.depth:
            problems.append(f"dual_attention_layers {list(dual)} (tcgraph takes the first blocks 0 .. k-1, "
                            f"not the last of {self.depth})")
        if self.qk_norm not in QK_NORMS:
            problems.append(f"qk_norm {self.qk_norm!r} (none or 'rms_norm')")
        if self.caption_channels <= 0 or self.pooled_channels <= 0:
            problems.append("no text or pooled width (caption_channels, pooled_channels > 0)")
        if self.mlp_ratio != 4.0 or self.learn_sigma or self.num_classes:
            problems.append("mlp_ratio other than 4, learn_sigma or classes")
        if self.pos_embed_max_size and self.input_size // self.patch_size > self.pos_embed_max_size:
            problems.append(f"a {self.input_size}x{self.input_size} latent beyond the position table "
                            f"({self.pos_embed_max_size} patches a side)")
        if problems:
            raise TcgraphError(f"not an SD3 config: {'; '.join(problems)}")

    def step_fixed_flops(self, text_length: int) -> int:
        """FLOPs per sample that every step spends whatever its recipe (`tcgraph.plan.flops.fixed_flops`):
        the embeddings, each block's adaLN linears (6D image + 6D text; 9D image in a dual-attention block;
        2D text in the last block), the final adaLN and projection."""
        from tcgraph.models.diffusers.flux_config import mmdit_embed_flops, mmdit_final_flops

        d, dual = self.hidden_size, len(self.dual_attention_layers)
        widths = dual * (9 + 6) + (self.depth - 1 - dual) * 12 + 6 + 2
        return mmdit_embed_flops(self, text_length) + 2 * d * widths * d + mmdit_final_flops(self)


def sd3_config_from_diffusers(raw: dict, where: str, input_size: int | None = None) -> SD3Config:
    """The `SD3Config` of a diffusers config.json (`raw`); `input_size` the latent side (default: its
    sample_size). Refuses, naming the key, what tcgraph does not run."""
    heads = config_int(raw, "num_attention_heads", 18, where)
    head_dim = config_int(raw, "attention_head_dim", 64, where)
    channels = config_int(raw, "in_channels", 16, where)
    out = config_int(raw, "out_channels", channels, where, nullable=True)
    ints = {}
    for key, default in (("joint_attention_dim", 4096), ("pooled_projection_dim", 2048),
                         ("caption_projection_dim", 1152)):
        value = raw.get(key, default)
        lo, hi = SD3_INT_RANGES[key]
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise TcgraphError(f"{where}: {key} = {show_value(value)}: expected an integer from {lo} to {hi}; save "
                               "the model again with save_pretrained")
        ints[key] = value
    if ints["caption_projection_dim"] != heads * head_dim:
        raise TcgraphError(f"{where}: caption_projection_dim {ints['caption_projection_dim']} is not the width "
                           f"{heads * head_dim} (heads x head dim): the joint attention needs them equal")
    if out not in (None, channels):
        raise TcgraphError(f"{where}: out_channels {out} differs from in_channels {channels}: tcgraph's SD3 models "
                           "predict the velocity of their own latent")
    max_size = raw.get("pos_embed_max_size", 96)
    if max_size is not None and (isinstance(max_size, bool) or not isinstance(max_size, int) or not 1 <= max_size <= 4096):
        raise TcgraphError(f"{where}: pos_embed_max_size = {show_value(max_size)}: expected null or an integer "
                           "from 1 to 4096")
    dual = raw.get("dual_attention_layers", ()) or ()
    if not isinstance(dual, (list, tuple)) or not all(isinstance(i, int) and not isinstance(i, bool) for i in dual):
        raise TcgraphError(f"{where}: dual_attention_layers = {show_value(dual)}: expected a list of block indices")
    qk_norm = raw.get("qk_norm") or ""
    try:
        return SD3Config(input_size=input_size or config_int(raw, "sample_size", 128, where),
                         patch_size=config_int(raw, "patch_size", 2, where), in_channels=channels,
                         hidden_size=heads * head_dim, depth=config_int(raw, "num_layers", 18, where), num_heads=heads,
                         caption_channels=ints["joint_attention_dim"], pooled_channels=ints["pooled_projection_dim"],
                         dual_attention_layers=tuple(dual), qk_norm=qk_norm, pos_embed_max_size=max_size or 0)
    except TcgraphError as e:
        raise TcgraphError(f"{where}: {e}") from None


def sd3_kwargs(config: SD3Config) -> dict:
    """The `SD3Transformer2DModel(**kwargs)` of `config`."""
    return dict(sample_size=config.input_size, patch_size=config.patch_size, in_channels=config.in_channels,
                num_layers=config.depth, attention_head_dim=config.hidden_size // config.num_heads,
                num_attention_heads=config.num_heads, joint_attention_dim=config.caption_channels,
                caption_projection_dim=config.hidden_size, pooled_projection_dim=config.pooled_channels,
                out_channels=config.in_channels, pos_embed_max_size=config.pos_embed_max_size or None,
                dual_attention_layers=config.dual_attention_layers, qk_norm=config.qk_norm or None)
