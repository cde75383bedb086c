"""diffusers DiT and PixArt configs and parameter shapes, without importing diffusers.

`config_from_diffusers` turns a `DiTTransformer2DModel` config (its `config.json`) into
tcgraph's `DiTConfig` with `layout="diffusers"`, `pixart_config_from_diffusers` a
`PixArtTransformer2DModel` config into one with `layout="pixart"`; `diffusers_kwargs` and
`pixart_kwargs` go back; `state_dict_shapes` lists the parameters of
`tcgraph.models.diffusers.dit.DiffusersDiT` or `tcgraph.models.diffusers.pixart.DiffusersPixArt`,
which artifact loading checks without needing diffusers itself. What is read of a folder (its
class, weights, JSON; every path checked) is `tcgraph.models.diffusers.folder`.

A folder's files are not trusted: config.json's numbers are checked (type and range, `config_int`).
"""
from __future__ import annotations

import json
import math

from tcgraph.errors import TcgraphError, UsageError
from tcgraph.models.config import DiTConfig

CLASS_NAME = "DiTTransformer2DModel"
PIXART_CLASS_NAME = "PixArtTransformer2DModel"
ACTIVATIONS = ("gelu-approximate", "gelu")  # FeedForward's 4x MLP: what the FLOP count assumes
TIME_FEATURES = 256  # CombinedTimestepLabelEmbeddings' sinusoid width
# The integer config entries tcgraph reads, with the range it takes (far beyond any released model's: a
# value outside is a damaged or crafted config.json, which would build a model too big for any memory)
INT_RANGES = {"num_attention_heads": (1, 1024), "attention_head_dim": (1, 4096), "in_channels": (1, 4096),
              "out_channels": (1, 8192), "num_layers": (1, 1024), "sample_size": (1, 4096), "patch_size": (1, 256),
              "num_embeds_ada_norm": (1, 1_000_000), "caption_channels": (1, 65536),
              "cross_attention_dim": (1, 4_194_304)}


def config_int(raw: dict, key: str, default, where: str, nullable: bool = False):
    """`raw[key]` (or `default` where absent; None where null is allowed), refused unless an integer in
    `INT_RANGES[key]`: one TcgraphError naming `where`, the key, the value and the range."""
    value = raw.get(key, default)
    if value is None and (default is None or nullable):
        return None
    lo, hi = INT_RANGES[key]
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise TcgraphError(f"{where}: {key} = {show_value(value)}: expected an integer from {lo} to {hi}; the config "
                           "is damaged or was not written by diffusers: save the model again with save_pretrained")
    return value


def show_value(value) -> str:
    try:
        return json.dumps(value)[:80]
    except (TypeError, ValueError):
        return repr(value)[:80]


def config_eps(raw: dict, default: float, where: str) -> float:
    """`raw["norm_eps"]`, refused unless a finite number in (0, 1)."""
    value = raw.get("norm_eps", default)
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and 0 < value < 1
    if not ok:
        raise TcgraphError(f"{where}: norm_eps = {show_value(value)}: expected a finite number between 0 and 1 "
                           f"(diffusers' default {default:g}); save the model again with save_pretrained")
    return float(value)


def config_from_diffusers(raw: dict, where: str) -> DiTConfig:
    """The `DiTConfig` (layout "diffusers") of a DiTTransformer2DModel config dict; refuses settings
    tcgraph does not run, naming them."""
    if not isinstance(raw, dict):
        raise TcgraphError(f"{where}: a model config must be a JSON object, got a {type(raw).__name__}")
    get = raw.get
    num = lambda key, default: config_int(raw, key, default, where)  # noqa: E731
    heads, head_dim = num("num_attention_heads", 16), num("attention_head_dim", 72)
    in_ch = num("in_channels", 4)
    out_ch = num("out_channels", None)
    out_ch = in_ch if out_ch is None else out_ch
    classes = config_int(raw, "num_embeds_ada_norm", 1000, where, nullable=True)
    refusals = []
    if get("norm_type", "ada_norm_zero") != "ada_norm_zero":
        refusals.append(f"norm_type {get('norm_type')!r} (DiT blocks use 'ada_norm_zero')")
    if get("activation_fn", "gelu-approximate") not in ACTIVATIONS:
        refusals.append(f"activation_fn {get('activation_fn')!r} (supported: {', '.join(ACTIVATIONS)})")
    if get("norm_elementwise_affine", False):
        refusals.append("norm_elementwise_affine true (DiT's norms have no weights)")
    if not get("attention_bias", True):
        refusals.append("attention_bias false (DiT's q/k/v projections have biases)")
    if classes is None:
        refusals.append("num_embeds_ada_norm null (a class-conditional DiT needs its class count)")
    if out_ch not in (in_ch, 2 * in_ch):
        refusals.append(f"out_channels {out_ch} with in_channels {in_ch} (tcgraph reads epsilon from the first "
                        "in_channels outputs, with or without as many variance channels after them)")
    if refusals:
        raise TcgraphError(f"{where}: tcgraph cannot run this DiTTransformer2DModel: {'; '.join(refusals)}")
    return _config(where, input_size=num("sample_size", 32), patch_size=num("patch_size", 2), in_channels=in_ch,
                   hidden_size=heads * head_dim, depth=num("num_layers", 28), num_heads=heads, mlp_ratio=4.0,
                   class_dropout_prob=0.1,  # diffusers' CombinedTimestepLabelEmbeddings always has the null class
                   num_classes=classes or 0, learn_sigma=out_ch == 2 * in_ch, layout="diffusers",
                   norm_eps=config_eps(raw, 1e-5, where))


def _config(where: str, **fields) -> DiTConfig:
    try:
        return DiTConfig(**fields)
    except TcgraphError as e:  # sizes that do not fit together (patch size and sample size, heads and width)
        raise TcgraphError(f"{where}: {e}") from None


def diffusers_kwargs(config: DiTConfig) -> dict:
    """The DiTTransformer2DModel arguments of a `DiTConfig` with layout "diffusers"."""
    _require(config, CLASS_NAME)
    if config.mlp_ratio != 4.0 or config.class_dropout_prob <= 0:
        raise TcgraphError("a diffusers DiT has mlp_ratio 4 and a null class (class_dropout_prob > 0)")
    return dict(num_attention_heads=config.num_heads, attention_head_dim=config.hidden_size // config.num_heads,
                in_channels=config.in_channels, out_channels=config.out_channels, num_layers=config.depth,
                sample_size=config.input_size, patch_size=config.patch_size,
                num_embeds_ada_norm=config.num_classes, norm_eps=config.norm_eps)


def state_dict_shapes(config: DiTConfig) -> dict[str, tuple[int, ...]]:
    """{name: shape} of the state dict of the diffusers model `config` builds (its family's), without
    diffusers or memory."""
    if config.family.diffusers_class is None:
        raise TcgraphError(f"config is of the family {config.family.title}, not a diffusers one")
    return config.family.state_dict_shapes(config)


def dit_state_dict_shapes(config: DiTConfig) -> dict[str, tuple[int, ...]]:
    """{name: shape} of `DiffusersDiT(config)`'s state dict, without diffusers or memory."""
    _require(config, CLASS_NAME)
    d, n, p, c = config.hidden_size, config.num_tokens, config.patch_size, config.in_channels
    out = {"pos_embed.proj.weight": (d, c, p, p), "pos_embed.proj.bias": (d,), "pos_table": (1, n, d)}
    per_block = {
        "norm1.emb.timestep_embedder.linear_1.weight": (d, TIME_FEATURES),
        "norm1.emb.timestep_embedder.linear_1.bias": (d,),
        "norm1.emb.timestep_embedder.linear_2.weight": (d, d),
        "norm1.emb.timestep_embedder.linear_2.bias": (d,),
        "norm1.emb.class_embedder.embedding_table.weight": (config.num_classes + 1, d),
        "norm1.linear.weight": (6 * d, d), "norm1.linear.bias": (6 * d,),
        **{f"attn1.{proj}.{kind}": shape for proj in ("to_q", "to_k", "to_v", "to_out.0")
           for kind, shape in (("weight", (d, d)), ("bias", (d,)))},
        "ff.net.0.proj.weight": (4 * d, d), "ff.net.0.proj.bias": (4 * d,),
        "ff.net.2.weight": (d, 4 * d), "ff.net.2.bias": (d,),
    }
    for i in range(config.depth):
        out.update({f"transformer_blocks.{i}.{k}": v for k, v in per_block.items()})
    out.update({"proj_out_1.weight": (2 * d, d), "proj_out_1.bias": (2 * d,),
                "proj_out_2.weight": (p * p * config.out_channels, d), "proj_out_2.bias": (p * p * config.out_channels,)})
    return out


# ---- PixArtTransformer2DModel ----------------------------------------------------------------

PIXART_ACTIVATION = "gelu-approximate"  # FeedForward's activation in every PixArt checkpoint
# latent -> pixel side of PixArt's VAE (2 ** (len(block_out_channels) - 1)): what the micro-conditions name
VAE_SCALE = 8


def pixart_config_from_diffusers(raw: dict, where: str) -> DiTConfig:
    """The `DiTConfig` (layout "pixart") of a PixArtTransformer2DModel config dict; refuses, naming
    each, the settings whose forward `tcgraph.models.diffusers.pixart.DiffusersPixArt` does not run."""
    if not isinstance(raw, dict):
        raise TcgraphError(f"{where}: a model config must be a JSON object, got a {type(raw).__name__}")
    get = raw.get
    num = lambda key, default: config_int(raw, key, default, where)  # noqa: E731
    heads, head_dim = num("num_attention_heads", 16), num("attention_head_dim", 72)
    hidden = heads * head_dim
    in_ch = num("in_channels", 4)
    out_ch = config_int(raw, "out_channels", 8, where, nullable=True)  # PixArt's default: learned sigma for 4 latent channels
    out_ch = in_ch if out_ch is None else out_ch
    sample_size = num("sample_size", 128)
    extra = get("use_additional_conditions")
    if extra is None:  # diffusers' own rule: PixArt-alpha's 1024px models (sample_size 128) read them
        extra = sample_size == 128
    cross_dim = config_int(raw, "cross_attention_dim", 1152, where, nullable=True)
    caption = num("caption_channels", None)
    scale = get("interpolation_scale")
    refusals = []
    if get("norm_type", "ada_norm_single") != "ada_norm_single":
        refusals.append(f"norm_type {get('norm_type')!r} (PixArt blocks use 'ada_norm_single')")
    if config_int(raw, "num_embeds_ada_norm", 1000, where, nullable=True) is None:
        refusals.append("num_embeds_ada_norm null (diffusers needs it with 'ada_norm_single')")
    if extra and hidden % 3:
        refusals.append(f"use_additional_conditions with hidden size {hidden} (the micro-condition embeddings split "
                        "it in thirds)")
    if caption is None:
        refusals.append("caption_channels null (tcgraph runs PixArt with its caption projection of the text embeddings)")
    if get("activation_fn", PIXART_ACTIVATION) != PIXART_ACTIVATION:
        refusals.append(f"activation_fn {get('activation_fn')!r} (supported: {PIXART_ACTIVATION})")
    if get("norm_elementwise_affine", False):
        refusals.append("norm_elementwise_affine true (PixArt's norms have no weights)")
    if not get("attention_bias", True):
        refusals.append("attention_bias false (PixArt's q/k/v projections have biases)")
    if cross_dim != hidden:
        refusals.append(f"cross_attention_dim {cross_dim} with hidden size {hidden} (the projected captions the "
                        "cross-attention reads have the hidden size)")
    if get("attention_type", "default") != "default":
        refusals.append(f"attention_type {get('attention_type')!r} (supported: 'default')")
    if out_ch not in (in_ch, 2 * in_ch):
        refusals.append(f"out_channels {out_ch} with in_channels {in_ch} (tcgraph reads epsilon from the first "
                        "in_channels outputs, with or without as many variance channels after them)")
    if scale is not None and not (isinstance(scale, (int, float)) and not isinstance(scale, bool)
                                  and math.isfinite(scale) and 0 < scale <= 1024):
        refusals.append(f"interpolation_scale {scale!r} (a positive number up to 1024, or null)")
    if not isinstance(extra, bool):
        refusals.append(f"use_additional_conditions {show_value(extra)} (true, false or null)")
    if refusals:
        raise TcgraphError(f"{where}: tcgraph cannot run this {PIXART_CLASS_NAME}: {'; '.join(refusals)}")
    return _config(where, input_size=sample_size, patch_size=num("patch_size", 2), in_channels=in_ch,
                   hidden_size=hidden, depth=num("num_layers", 28), num_heads=heads, mlp_ratio=4.0,
                   class_dropout_prob=0.0, num_classes=0, learn_sigma=out_ch == 2 * in_ch, layout="pixart",
                   norm_eps=config_eps(raw, 1e-6, where), caption_channels=caption,
                   micro_size=sample_size * VAE_SCALE if extra else 0)


def pixart_kwargs(config: DiTConfig) -> dict:
    """The PixArtTransformer2DModel arguments of a `DiTConfig` with layout "pixart" (the position
    table at diffusers' default interpolation scale; micro-conditions where `micro_size` is set)."""
    _require(config, PIXART_CLASS_NAME)
    if config.mlp_ratio != 4.0 or config.num_classes != 0 or config.caption_channels <= 0:
        raise TcgraphError("a PixArt model has mlp_ratio 4, no classes (num_classes 0) and caption_channels > 0")
    return dict(num_attention_heads=config.num_heads, attention_head_dim=config.hidden_size // config.num_heads,
                in_channels=config.in_channels, out_channels=config.out_channels, num_layers=config.depth,
                cross_attention_dim=config.hidden_size, sample_size=config.input_size, patch_size=config.patch_size,
                norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=config.norm_eps,
                activation_fn=PIXART_ACTIVATION, attention_type="default",
                use_additional_conditions=config.micro_size > 0,
                caption_channels=config.caption_channels)


def pixart_state_dict_shapes(config: DiTConfig) -> dict[str, tuple[int, ...]]:
    """{name: shape} of `DiffusersPixArt(config)`'s state dict: diffusers' own plus `pos_table`."""
    d, n, p, c = config.hidden_size, config.num_tokens, config.patch_size, config.in_channels
    linear = lambda name, out, inp: {f"{name}.weight": (out, inp), f"{name}.bias": (out,)}  # noqa: E731
    out = {"pos_embed.proj.weight": (d, c, p, p), "pos_embed.proj.bias": (d,), "pos_table": (1, n, d)}
    per_block = {"scale_shift_table": (6, d)}
    for attn in ("attn1", "attn2"):
        for proj in ("to_q", "to_k", "to_v", "to_out.0"):
            per_block.update(linear(f"{attn}.{proj}", d, d))
    per_block.update({**linear("ff.net.0.proj", 4 * d, d), **linear("ff.net.2", d, 4 * d)})
    for i in range(config.depth):
        out.update({f"transformer_blocks.{i}.{k}": v for k, v in per_block.items()})
    out.update({**linear("adaln_single.emb.timestep_embedder.linear_1", d, TIME_FEATURES),
                **linear("adaln_single.emb.timestep_embedder.linear_2", d, d),
                **linear("adaln_single.linear", 6 * d, d),
                **({f"adaln_single.emb.{name}_embedder.{k}": v for name in ("resolution", "aspect_ratio")
                    for k, v in {**linear("linear_1", d // 3, TIME_FEATURES), **linear("linear_2", d // 3, d // 3)}.items()}
                   if config.micro_size else {}),
                **linear("caption_projection.linear_1", d, config.caption_channels),
                **linear("caption_projection.linear_2", d, d),
                **linear("proj_out", p * p * config.out_channels, d),
                "scale_shift_table": (2, d)})
    return out


def _require(config: DiTConfig, class_name: str) -> None:
    """Refuse a config of another family than the one whose diffusers folders are `class_name`."""
    if config.family.diffusers_class != class_name:
        raise TcgraphError(f"config is of the family {config.family.title}, not of {class_name}")


def check_pipeline_transformer(config, raw: dict, read, keys: tuple[str, ...], pipeline: str, where, **read_options) -> None:
    """An artifact of `config` may stand in for a pipeline's transformer whose config.json is `raw` only
    where `read(raw, where=..., **read_options)` reads it (the family's own reader) and every field in
    `keys` is the same; else one UsageError naming what differs, artifact vs pipeline."""
    try:
        other = read(raw, where=f"{pipeline}'s transformer", **read_options)
    except TcgraphError as e:
        raise UsageError(f"{e}; the artifact {where} cannot stand in for it") from None
    differ = [f"{k} {getattr(config, k)} vs {getattr(other, k)}" for k in keys if getattr(config, k) != getattr(other, k)]
    if differ:
        raise UsageError(f"the artifact {where} is for another model than the pipeline's transformer "
                         f"({'; '.join(differ)}, artifact vs pipeline); transform this pipeline's model")


def check_class(pipeline: str, theirs: str, config, class_name: str, family: str, where) -> None:
    """An artifact of family `family` stands in only for a `class_name`, and a `class_name` only takes one."""
    if theirs != class_name or config.family.name != family:
        ours = f"a {class_name}" if config.family.name == family else f"a {config.family.title}"
        raise UsageError(f"the artifact {where} is for {ours}, but {pipeline}'s transformer is a {theirs}: use the "
                         "artifact with its own model's pipeline, or transform this pipeline's model")
