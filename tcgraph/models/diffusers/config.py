"""diffusers DiT and PixArt configs and parameter shapes, without importing diffusers.

`config_from_diffusers` turns a `DiTTransformer2DModel` config (its `config.json`) into
tcgraph's `DiTConfig` with `layout="diffusers"`, `pixart_config_from_diffusers` a
`PixArtTransformer2DModel` config into one with `layout="pixart"`; `diffusers_kwargs` and
`pixart_kwargs` go back; `state_dict_shapes` lists the parameters of
`tcgraph.models.diffusers.dit.DiffusersDiT` or `tcgraph.models.diffusers.pixart.DiffusersPixArt`,
which artifact loading checks without needing diffusers itself. `load_weights_into` reads a
model folder's safetensors weights into the diffusers class both loaders build.

A folder's files are not trusted: config.json's numbers are checked (type and range, `config_int`),
and no path a file names (a weights index's shards, model_index.json's components) may leave its
folder (`inside`: no `..`, no absolute path, no symlink out, except into the Hugging Face cache's blobs).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from tcgraph.errors import TcgraphError
from tcgraph.models.official.dit import DiTConfig
from tcgraph.models.families import diffusers_classes, family_of_diffusers_class

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
        raise TcgraphError(f"{where}: {key} = {_show(value)}: expected an integer from {lo} to {hi}; the config "
                           "is damaged or was not written by diffusers: save the model again with save_pretrained")
    return value


def _show(value) -> str:
    try:
        return json.dumps(value)[:80]
    except (TypeError, ValueError):
        return repr(value)[:80]


def config_eps(raw: dict, default: float, where: str) -> float:
    """`raw["norm_eps"]`, refused unless a finite number in (0, 1)."""
    value = raw.get("norm_eps", default)
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and 0 < value < 1
    if not ok:
        raise TcgraphError(f"{where}: norm_eps = {_show(value)}: expected a finite number between 0 and 1 "
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
        refusals.append(f"use_additional_conditions {_show(extra)} (true, false or null)")
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


# ---- folders that diffusers' save_pretrained writes ----------------------------------------

# diffusers model classes tcgraph transforms -> the tcgraph module that wraps them
WEIGHTS_NAME = "diffusion_pytorch_model"


@dataclass(frozen=True)
class DiffusersFolder:
    """A diffusers model folder, found from a model or a pipeline folder."""

    model_dir: Path  # holds config.json and the weights
    config: dict  # config.json
    pipeline_dir: Path | None  # the pipeline folder (model_index.json), when given one

    @property
    def class_name(self) -> str:
        return self.config["_class_name"]


def is_diffusers_folder(path: Path) -> bool:
    """Whether `path` looks like a diffusers model or pipeline folder (it need not be a valid one)."""
    return path.is_dir() and ((path / "config.json").is_file() or (path / "model_index.json").is_file())


def inside(folder: Path, entry, source: Path, what: str) -> Path:
    """`folder / entry`, for the path `entry` that the file `source` names as `what`, refused unless it
    stays inside `folder`: a relative path without `..` that, symlinks resolved, still lies below `folder`
    (or is a blob of the Hugging Face cache that holds `folder`: every file of a cached snapshot is a
    symlink to one). One TcgraphError names the file, the entry and why."""
    why = None
    if not isinstance(entry, str) or not entry.strip() or "\x00" in entry:
        why = "is not a file name"
    elif Path(entry).is_absolute() or Path(entry).anchor:
        why = "is an absolute path"
    elif ".." in Path(entry).parts:
        why = "climbs out of the folder with '..'"
    else:
        real, root = (folder / entry).resolve(), folder.resolve()
        if real != root and root not in real.parents and not _hub_blob(root, real):
            why = f"is a symlink to {real}, outside the folder"
    if why:
        raise TcgraphError(f"{source}: {what} {_show(entry)} {why}; a path read from a file must stay inside "
                           f"{folder}, so tcgraph reads nothing else: the folder is damaged or was made to read "
                           "other files; save the model again with save_pretrained")
    return folder / entry


def _hub_blob(root: Path, real: Path) -> bool:
    """Whether `real` is a file of `<repo>/blobs/` for a `root` below `<repo>/snapshots/<revision>/`."""
    snapshot = next((a for a in (root, *root.parents) if a.parent.name == "snapshots"), None)
    return snapshot is not None and real.parent == snapshot.parent.parent / "blobs"


def check_pipeline_index(pipeline: Path, index: dict) -> None:
    """A pipeline's model_index.json names its components, each a subfolder (diffusers' loader reads
    `pipeline/<name>/`): every name must be a plain folder name, and tcgraph's components must stay inside."""
    where = pipeline / "model_index.json"
    for name, entry in index.items():
        if name.startswith("_"):
            continue  # _class_name, _diffusers_version, _name_or_path: metadata, no folder
        if not name or Path(name).name != name or name in (".", ".."):
            inside(pipeline, name, where, "the component")  # names why: absolute, '..' or not a name
            raise TcgraphError(f"{where}: the component {_show(name)} is not a plain folder name; a component's "
                               "folder lies directly in the pipeline folder: save the pipeline again")
        if not (entry is None or isinstance(entry, list) and len(entry) == 2):
            raise TcgraphError(f"{where}: the component {name!r} is {_show(entry)}, expected [library, class]; "
                               "save the pipeline again with save_pretrained")
    for name in ("transformer", "scheduler", "text_encoder", "tokenizer"):
        if (pipeline / name).exists():
            inside(pipeline, name, where, "the component")


def read_folder(path: str | Path) -> DiffusersFolder:
    """The model folder of `path`: a model folder (`config.json` + weights), or a pipeline folder
    (`model_index.json`, whose `transformer/` holds the model). Refuses an unsupported class by name,
    and a pipeline whose model_index.json names folders outside it (`check_pipeline_index`)."""
    path = Path(path)
    pipeline = None
    if (path / "model_index.json").is_file():
        index = read_json(path / "model_index.json", "the pipeline index")
        check_pipeline_index(path, index)
        pipeline, path = path, path / "transformer"
        if not (path / "config.json").is_file():
            raise TcgraphError(
                f"{pipeline} is a diffusers pipeline folder (it has model_index.json, a "
                f"{index.get('_class_name', 'pipeline')}) but has no transformer/config.json; tcgraph transforms "
                "the pipeline's transformer: pass a pipeline whose transformer/ folder holds config.json and its weights")
    elif not (path / "config.json").is_file():
        raise TcgraphError(f"{path} is not a diffusers folder: it has neither config.json (a model folder) nor "
                           "model_index.json (a pipeline folder); pass what diffusers' save_pretrained wrote")
    config = read_json(path / "config.json", "the model config")
    name = config.get("_class_name")
    if not isinstance(name, str):
        raise TcgraphError(f"{path / 'config.json'} has no _class_name; it is not a diffusers model config "
                           "(save_pretrained writes one)")
    if family_of_diffusers_class(name) is None:  # the families registry says which classes tcgraph takes
        raise TcgraphError(f"{path}: tcgraph does not transform diffusers' {name}; supported classes: "
                           f"{', '.join(diffusers_classes())}")
    return DiffusersFolder(path, config, pipeline)


def weight_files(model_dir: Path) -> list[Path]:
    """The weight files of a model folder: one safetensors file, or the shards its index names."""
    single = model_dir / f"{WEIGHTS_NAME}.safetensors"
    if single.is_file():
        return [single]
    index = model_dir / f"{WEIGHTS_NAME}.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index, "the weights index").get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise TcgraphError(f"{index} has no weight_map; it is damaged: save the model again")
        files = list(dict.fromkeys(inside(model_dir, f, index, f"the weight_map entry of {_show(k)}")
                                   for k, f in weight_map.items()))
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise TcgraphError(f"{model_dir}: the weights index names shards that are missing: {', '.join(missing[:3])}")
        return files
    found = sorted(model_dir.glob("*.safetensors"))
    if len(found) == 1:
        return found
    others = sorted(p.name for p in model_dir.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
    hint = (f"; it has {', '.join(others)}: tcgraph reads diffusers weights from safetensors only, so save them "
            "with safe_serialization=True" if others else "")
    what = f"{len(found)} safetensors files and no index" if found else "no safetensors weights"
    raise TcgraphError(f"{model_dir} has {what} ({WEIGHTS_NAME}.safetensors expected){hint}")


def load_weights_into(folder: DiffusersFolder, model_cls: type, class_name: str, config: DiTConfig):
    """A `model_cls` (a diffusers model class) built from `folder`'s config.json with its safetensors
    weights, in float32; refuses damaged files, and weights that do not fit `config` (what config.json
    says, read by the caller) before the model is built. The caller checks the weights' values after
    (`tcgraph.models.official.checkpoint.check_finite`)."""
    from safetensors.torch import load_file  # only with diffusers installed, as its callers are

    where = folder.model_dir / "config.json"
    state: dict = {}
    for path in weight_files(folder.model_dir):
        try:
            state.update(load_file(str(path)))
        except Exception as e:  # safetensors raises its own error types for damaged files
            raise TcgraphError(f"cannot read the weights {path}: {type(e).__name__}: {e}; the file is damaged or "
                               "not safetensors: save the model again") from None
    want = {k: v for k, v in state_dict_shapes(config).items() if k != "pos_table"}  # pos_table: not saved
    missing = [k for k in want if k not in state]
    extra = [k for k in state if k not in want]
    shapes = [f"{k} {list(state[k].shape)} vs {list(want[k])}" for k in want
              if k in state and tuple(state[k].shape) != want[k]]
    if missing or extra or shapes:
        parts = [f"{len(missing)} missing (e.g. {', '.join(missing[:3])})" if missing else "",
                 f"{len(extra)} unexpected (e.g. {', '.join(extra[:3])})" if extra else "",
                 f"{len(shapes)} with other shapes (e.g. {', '.join(shapes[:2])})" if shapes else ""]
        raise TcgraphError(f"the weights in {folder.model_dir} do not fit its config.json: "
                           f"{'; '.join(p for p in parts if p)}; save the model again with save_pretrained")
    try:  # the sizes fit the weights (checked above), so building allocates no more than they hold
        model = model_cls.from_config(folder.config)
        model.load_state_dict({k: v.float() for k, v in state.items()})
    except Exception as e:  # diffusers validates its own config
        raise TcgraphError(f"diffusers cannot build a {class_name} from {where} with its weights: "
                           f"{type(e).__name__}: {str(e)[:300]}") from None
    return model.float()


def read_json(path: Path, what: str) -> dict:
    """The JSON object in `path`; one TcgraphError naming `what` for anything else."""
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TcgraphError(f"cannot read {what} {path}: {e}; save the model again with diffusers' save_pretrained") from None
    if not isinstance(value, dict):
        raise TcgraphError(f"{path}: {what} must be a JSON object, got a {type(value).__name__}; save the model "
                           "again with diffusers' save_pretrained")
    return value


def _require(config: DiTConfig, class_name: str) -> None:
    """Refuse a config of another family than the one whose diffusers folders are `class_name`."""
    if config.family.diffusers_class != class_name:
        raise TcgraphError(f"config is of the family {config.family.title}, not of {class_name}")
