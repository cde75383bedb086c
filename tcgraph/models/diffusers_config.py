"""diffusers DiT configs and parameter shapes, without importing diffusers.

`config_from_diffusers` turns a `DiTTransformer2DModel` config (its `config.json`) into
tcgraph's `DiTConfig` with `layout="diffusers"`; `diffusers_kwargs` goes back;
`state_dict_shapes` lists the parameters of `tcgraph.models.diffusers_dit.DiffusersDiT`,
which artifact loading checks without needing diffusers itself.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from tcgraph.errors import TcgraphError
from tcgraph.models.dit import DiTConfig

CLASS_NAME = "DiTTransformer2DModel"
ACTIVATIONS = ("gelu-approximate", "gelu")  # FeedForward's 4x MLP: what the FLOP count assumes
TIME_FEATURES = 256  # CombinedTimestepLabelEmbeddings' sinusoid width


def config_from_diffusers(raw: dict, where: str) -> DiTConfig:
    """The `DiTConfig` (layout "diffusers") of a DiTTransformer2DModel config dict; refuses settings
    tcgraph does not run, naming them."""
    get = raw.get
    heads, head_dim = int(get("num_attention_heads", 16)), int(get("attention_head_dim", 72))
    in_ch = int(get("in_channels", 4))
    out_ch = get("out_channels")
    out_ch = in_ch if out_ch is None else int(out_ch)
    refusals = []
    if get("norm_type", "ada_norm_zero") != "ada_norm_zero":
        refusals.append(f"norm_type {get('norm_type')!r} (DiT blocks use 'ada_norm_zero')")
    if get("activation_fn", "gelu-approximate") not in ACTIVATIONS:
        refusals.append(f"activation_fn {get('activation_fn')!r} (supported: {', '.join(ACTIVATIONS)})")
    if get("norm_elementwise_affine", False):
        refusals.append("norm_elementwise_affine true (DiT's norms have no weights)")
    if not get("attention_bias", True):
        refusals.append("attention_bias false (DiT's q/k/v projections have biases)")
    if get("num_embeds_ada_norm", 1000) is None:
        refusals.append("num_embeds_ada_norm null (a class-conditional DiT needs its class count)")
    if out_ch not in (in_ch, 2 * in_ch):
        refusals.append(f"out_channels {out_ch} with in_channels {in_ch} (tcgraph reads epsilon from the first "
                        "in_channels outputs, with or without as many variance channels after them)")
    if refusals:
        raise TcgraphError(f"{where}: tcgraph cannot run this DiTTransformer2DModel: {'; '.join(refusals)}")
    return DiTConfig(
        input_size=int(get("sample_size", 32)), patch_size=int(get("patch_size", 2)), in_channels=in_ch,
        hidden_size=heads * head_dim, depth=int(get("num_layers", 28)), num_heads=heads, mlp_ratio=4.0,
        class_dropout_prob=0.1,  # diffusers' CombinedTimestepLabelEmbeddings always has the null class
        num_classes=int(get("num_embeds_ada_norm", 1000)), learn_sigma=out_ch == 2 * in_ch,
        layout="diffusers", norm_eps=float(get("norm_eps", 1e-5)),
    )


def diffusers_kwargs(config: DiTConfig) -> dict:
    """The DiTTransformer2DModel arguments of a `DiTConfig` with layout "diffusers"."""
    if config.layout != "diffusers":
        raise TcgraphError(f"config has layout {config.layout!r}, not 'diffusers'")
    if config.mlp_ratio != 4.0 or config.class_dropout_prob <= 0:
        raise TcgraphError("a diffusers DiT has mlp_ratio 4 and a null class (class_dropout_prob > 0)")
    return dict(num_attention_heads=config.num_heads, attention_head_dim=config.hidden_size // config.num_heads,
                in_channels=config.in_channels, out_channels=config.out_channels, num_layers=config.depth,
                sample_size=config.input_size, patch_size=config.patch_size,
                num_embeds_ada_norm=config.num_classes, norm_eps=config.norm_eps)


def state_dict_shapes(config: DiTConfig) -> dict[str, tuple[int, ...]]:
    """{name: shape} of `DiffusersDiT(config)`'s state dict, without diffusers or memory."""
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


# ---- folders that diffusers' save_pretrained writes ----------------------------------------

# diffusers model classes tcgraph transforms -> the tcgraph module that wraps them
SUPPORTED = {CLASS_NAME: "tcgraph.models.diffusers_dit"}
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


def read_folder(path: str | Path) -> DiffusersFolder:
    """The model folder of `path`: a model folder (`config.json` + weights), or a pipeline folder
    (`model_index.json`, whose `transformer/` holds the model). Refuses an unsupported class by name."""
    path = Path(path)
    pipeline = None
    if (path / "model_index.json").is_file():
        index = _read_json(path / "model_index.json", "the pipeline index")
        pipeline, path = path, path / "transformer"
        if not (path / "config.json").is_file():
            raise TcgraphError(
                f"{pipeline} is a diffusers pipeline folder (it has model_index.json, a "
                f"{index.get('_class_name', 'pipeline')}) but has no transformer/config.json; tcgraph transforms "
                "the pipeline's transformer: pass a pipeline whose transformer/ folder holds config.json and its weights")
    elif not (path / "config.json").is_file():
        raise TcgraphError(f"{path} is not a diffusers folder: it has neither config.json (a model folder) nor "
                           "model_index.json (a pipeline folder); pass what diffusers' save_pretrained wrote")
    config = _read_json(path / "config.json", "the model config")
    name = config.get("_class_name")
    if not isinstance(name, str):
        raise TcgraphError(f"{path / 'config.json'} has no _class_name; it is not a diffusers model config "
                           "(save_pretrained writes one)")
    if name not in SUPPORTED:
        raise TcgraphError(f"{path}: tcgraph does not transform diffusers' {name}; supported classes: "
                           f"{', '.join(SUPPORTED)}")
    return DiffusersFolder(path, config, pipeline)


def weight_files(model_dir: Path) -> list[Path]:
    """The weight files of a model folder: one safetensors file, or the shards its index names."""
    single = model_dir / f"{WEIGHTS_NAME}.safetensors"
    if single.is_file():
        return [single]
    index = model_dir / f"{WEIGHTS_NAME}.safetensors.index.json"
    if index.is_file():
        weight_map = _read_json(index, "the weights index").get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise TcgraphError(f"{index} has no weight_map; it is damaged: save the model again")
        files = [model_dir / f for f in dict.fromkeys(weight_map.values())]
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


def _read_json(path: Path, what: str) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TcgraphError(f"cannot read {what} {path}: {e}; save the model again with diffusers' save_pretrained") from None
    if not isinstance(value, dict):
        raise TcgraphError(f"{path}: {what} must be a JSON object, got a {type(value).__name__}")
    return value


# ---- the official layout in diffusers' names -----------------------------------------------


def diffusers_layout_of(config: DiTConfig, norm_eps: float = 1e-5) -> DiTConfig:
    """The diffusers-layout config of an official-layout one (what diffusers' DiT conversion makes:
    the same sizes, its default `norm_eps`)."""
    fields = {**config.__dict__, "layout": "diffusers", "norm_eps": norm_eps}
    return DiTConfig(**fields)


def official_to_diffusers(state: dict, config: DiTConfig) -> dict:
    """An official-layout DiT state dict (`tcgraph.models.dit.DiT`) in diffusers' names and split
    (q/k/v apart, the timestep and label embedders copied into every block): the weights of the
    DiTTransformer2DModel that diffusers' own conversion of the same checkpoint gives."""
    d = config.hidden_size
    out = {"pos_embed.proj.weight": state["x_embedder.proj.weight"], "pos_embed.proj.bias": state["x_embedder.proj.bias"]}
    embed = {"norm1.emb.timestep_embedder.linear_1": "t_embedder.mlp.0", "norm1.emb.timestep_embedder.linear_2": "t_embedder.mlp.2"}
    for i in range(config.depth):
        to, of = f"transformer_blocks.{i}.", f"blocks.{i}."
        for new, old in {**embed, "norm1.linear": of + "adaLN_modulation.1", "attn1.to_out.0": of + "attn.proj",
                         "ff.net.0.proj": of + "mlp.fc1", "ff.net.2": of + "mlp.fc2"}.items():
            out[to + new + ".weight"], out[to + new + ".bias"] = state[old + ".weight"], state[old + ".bias"]
        out[to + "norm1.emb.class_embedder.embedding_table.weight"] = state["y_embedder.embedding_table.weight"]
        for j, name in enumerate(("to_q", "to_k", "to_v")):
            out[f"{to}attn1.{name}.weight"] = state[of + "attn.qkv.weight"][j * d:(j + 1) * d]
            out[f"{to}attn1.{name}.bias"] = state[of + "attn.qkv.bias"][j * d:(j + 1) * d]
    for new, old in (("proj_out_1", "final_layer.adaLN_modulation.1"), ("proj_out_2", "final_layer.linear")):
        out[new + ".weight"], out[new + ".bias"] = state[old + ".weight"], state[old + ".bias"]
    return {k: v.clone().contiguous() for k, v in out.items()}
