"""Building and loading models (imports torch; `tcgraph.models` names these on first use)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from tcgraph.errors import TcgraphError, UsageError
from tcgraph.models import _MAKE_WEIGHTS, PRETRAINED
from tcgraph.models.diffusers.folder import is_diffusers_folder
from tcgraph.models.families import FAMILIES, Family, family, family_of_diffusers_class
from tcgraph.models.adapter import ModelAdapter, adapter_for, register_adapter, run_blocks
from tcgraph.models.official.checkpoint import (
    config_candidates,
    config_argument,
    describe_state_dict,
    infer_config,
    load_checkpoint_into,
    load_state_dict_file,
    save_checkpoint,
)
from tcgraph.models.official.dit import CONFIGS, DiT, DiTConfig, make_config
from tcgraph.models.official.dit import build_model as build_official

# Pretrained demos that are folders with a diffusers transformer/: a DiffusersPixArt, a DiffusersFluxGuided
FOLDER_DEMOS = ("digits-text", "digits-flux")


def _resolve_config(config: DiTConfig | str | None, sd: dict[str, torch.Tensor], source: Path) -> DiTConfig:
    if isinstance(config, DiTConfig):
        return config
    if isinstance(config, str):
        return make_config(config)
    if config is not None:
        raise TcgraphError(
            f"config must be a registered name ({', '.join(CONFIGS)}), a DiTConfig or None, "
            f"got a {type(config).__name__}"
        )
    found = config_candidates(sd)
    if len(found) == 1:
        return found[0][1]
    if not found:
        raise TcgraphError(
            f"cannot tell which config {source} was trained with: no registered config "
            f"({', '.join(CONFIGS)}) fits its weights ({describe_state_dict(sd)}); pass config= a "
            "DiTConfig with these fields and the num_heads it was trained with"
        )
    labels = [label for label, _ in found]
    raise TcgraphError(
        f"cannot tell which config {source} was trained with: {len(labels)} registered configs fit "
        f"({', '.join(labels)}); choose one with {' or '.join(config_argument(l) for l in labels)}"
    )


def load_model(name_or_path: str | os.PathLike = "digits", config: DiTConfig | str | None = None,
               resolution: int | None = None) -> DiT:
    """A DiT with loaded weights, in eval mode.

    `name_or_path` is a pretrained model shipped with tcgraph (see `PRETRAINED`; "digits-text" and
    "digits-flux" are text-conditioned, a `DiffusersPixArt` and a FLUX model, needing diffusers) or the
    path of a checkpoint (`.safetensors`, `.pt`, `.pth`, `.bin`; official DiT release
    and training checkpoints included). `config` is a registered config name or a
    `DiTConfig`; when None it is the pretrained model's own, or is inferred from the
    checkpoint's shapes and must then match exactly one registered config. `resolution`: the latent side
    of a diffusers folder whose family takes any (FLUX, SD3; None: its config's or the family's default).
    """
    if not isinstance(name_or_path, (str, os.PathLike)) or name_or_path == "":
        raise TcgraphError(f"the model must be the name of a pretrained model ({', '.join(PRETRAINED)}) or the path of "
                           f"a checkpoint or diffusers folder, got {type(name_or_path).__name__} {name_or_path!r:.60}")
    if name_or_path in FOLDER_DEMOS:  # diffusers folders; their prompt encoders: tcgraph.demos.prompts.prompt_encoder_for
        folder = PRETRAINED[name_or_path][0] / "transformer"
        if not (folder / "config.json").is_file():
            raise TcgraphError(f"the pretrained model {name_or_path!r} has no weights yet: {folder / 'config.json'} is "
                               f"missing; create them with `{_MAKE_WEIGHTS[name_or_path]}`")
        return load_diffusers(folder, config, resolution)
    if not (isinstance(name_or_path, str) and name_or_path in PRETRAINED) and is_diffusers_folder(Path(name_or_path)):
        return load_diffusers(name_or_path, config, resolution)
    if resolution is not None:
        raise UsageError(f"{name_or_path}: only FLUX and SD3 diffusers folders take a resolution (--resolution); a "
                         "DiT's is its config's")
    if isinstance(name_or_path, str) and name_or_path in PRETRAINED:
        path, own_config = PRETRAINED[name_or_path]
        if not path.exists():
            raise TcgraphError(
                f"the pretrained model {name_or_path!r} has no weights yet: {path} is missing; "
                f"create it with `{_MAKE_WEIGHTS[name_or_path]}`"
            )
        config = own_config if config is None else config
    else:
        path = Path(name_or_path)
        if not path.exists():
            hint = ""
            if str(name_or_path) in CONFIGS:
                hint = (
                    f"; {str(name_or_path)!r} is a model config, not pretrained weights: pass a checkpoint "
                    f"path with config={str(name_or_path)!r}, or use build_model({str(name_or_path)!r}) "
                    "for random weights"
                )
            raise TcgraphError(
                f"no pretrained model named {str(name_or_path)!r} and no checkpoint file at {path}; "
                f"pretrained models: {', '.join(PRETRAINED)}; or pass the path of a checkpoint "
                f"(.safetensors, .pt, .pth, .bin){hint}"
            )
    sd = load_state_dict_file(path)
    cfg = _resolve_config(config, sd, path)
    with torch.device("meta"):  # the checkpoint provides every tensor: skip allocation and init
        model = DiT(cfg)
    load_checkpoint_into(model, sd, source=str(path))
    return model.eval()


def is_model(obj) -> bool:
    """Whether `obj` is a model tcgraph transforms: a module with a `DiTConfig` (tcgraph's DiT, or
    diffusers' DiTTransformer2DModel / PixArtTransformer2DModel as `tcgraph.models.diffusers.dit.DiffusersDiT`
    / `tcgraph.models.diffusers.pixart.DiffusersPixArt` wrap them)."""
    return isinstance(obj, torch.nn.Module) and isinstance(getattr(obj, "config", None), DiTConfig)


def build_model(config: DiTConfig | str, **overrides):
    """A freshly initialised model in eval mode from a config or a registered name, built by the
    config's family (`tcgraph.models.families`): tcgraph's DiT, or diffusers' DiTTransformer2DModel /
    PixArtTransformer2DModel (these need diffusers). `overrides` change fields of a registered
    config (official DiT only)."""
    if isinstance(config, DiTConfig) and not overrides:
        return config.family.build(config)
    return build_official(config, **overrides)


def load_diffusers(path: str | os.PathLike, config=None, resolution: int | None = None):
    """The diffusers model in a model folder (config.json + safetensors) or a pipeline folder
    (its transformer/), wrapped for tcgraph; needs diffusers. The config comes from config.json;
    `resolution` sets the latent side of a family that takes any (`Family.resizable`)."""
    from tcgraph.models.diffusers.folder import read_folder

    if config is not None:
        raise UsageError(f"{path} is a diffusers folder: its config.json says what the model is; drop the config "
                         "(--config) argument")
    folder = read_folder(path)
    return family_of_diffusers_class(folder.class_name).load_folder(folder, resolution)


def check_class_ids(y: torch.Tensor | np.ndarray | Sequence[int] | int, num_classes: int) -> torch.Tensor:
    """Class ids `y` as a 1-D int64 tensor, after checking they lie in 0..num_classes-1.

    The null class (id `num_classes`) is the guidance sampler's business, not a label
    a user may ask for.
    """
    ids = torch.as_tensor(y)
    if ids.dtype == torch.bool or ids.is_floating_point() or ids.is_complex():
        raise UsageError(f"class ids must be integers in 0..{num_classes - 1}, got a {ids.dtype} tensor")
    ids = ids.reshape(-1).to(torch.long)
    bad = ids[(ids < 0) | (ids >= num_classes)]
    if bad.numel():
        shown = ", ".join(str(int(v)) for v in bad[:10])
        raise UsageError(
            f"class ids {shown}{', ...' if bad.numel() > 10 else ''} are out of range: the model has "
            f"{num_classes} classes, valid ids are 0..{num_classes - 1}"
        )
    return ids
