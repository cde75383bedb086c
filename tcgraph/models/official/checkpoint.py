"""Reading and writing DiT weights: official checkpoints, safetensors, config inference.

Two file formats are read:

- `.safetensors` (what tcgraph writes by default; no code runs when it is read);
- `.pt` / `.pth` / `.bin`, read with `torch.load(weights_only=True)`. This covers the
  released `DiT-XL-2-256x256.pt` (a bare state dict) and the training checkpoints of the
  official `train.py`, `{"model", "ema", "opt", "args": argparse.Namespace}`, whose EMA
  weights are taken. Only `argparse.Namespace` is added to torch's allow-list, so a file
  that pickles anything else is refused instead of executed.

A state dict carries no `num_heads`, so a checkpoint cannot describe its own config
completely; `infer_config` matches it against the registered configs instead.
"""
from __future__ import annotations

import argparse
import math
import os
import pickle
import re
import tempfile
from pathlib import Path
from typing import Mapping

import torch
import torch.nn as nn

from tcgraph.models.official.shapes import official_state_dict_shapes  # noqa: F401  (re-exported)
from tcgraph.errors import TcgraphError
from tcgraph.models.official.dit import CONFIGS, DiTConfig, make_config

SAFETENSORS_SUFFIXES = (".safetensors",)
TORCH_SUFFIXES = (".pt", ".pth", ".bin")
# Keys of a training checkpoint that hold a state dict, best first (official train.py
# saves "model" and "ema"; the EMA weights are the ones the paper samples from; Lightning
# and most training loops save "state_dict", others "model_state_dict", "module", "net").
WRAPPER_KEYS = ("ema", "model", "state_dict", "model_state_dict", "module", "net")
# Prefixes that DistributedDataParallel and torch.compile put before every key, and that a
# Lightning module (`self.model = DiT(...)`) or an EMA wrapper put before the DiT's own keys.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.", "model.", "ema.", "net.")
# Keys every DiT state dict has: how an unwrapped dict is recognised as one.
DIT_KEYS = ("pos_embed", "x_embedder.proj.weight", "final_layer.linear.weight")
# Globals that official training checkpoints pickle besides tensors and plain containers.
_SAFE_GLOBALS = [argparse.Namespace]
# How many keys of each kind an error message names before it only counts them.
_MAX_LISTED = 10

StateDict = dict[str, torch.Tensor]


def _expected_suffixes() -> str:
    return ", ".join(SAFETENSORS_SUFFIXES + TORCH_SUFFIXES)


#################################################################################
#                                   Reading                                     #
#################################################################################


def load_state_dict_file(path: str | os.PathLike) -> StateDict:
    """The model weights stored in `path`, as a flat {name: CPU tensor} dict.

    Training checkpoints are unwrapped (the EMA weights first, then "model", then
    "state_dict"), and a `module.` / `_orig_mod.` prefix shared by every key is removed.
    """
    path = Path(path)
    if not path.exists():
        raise TcgraphError(
            f"checkpoint file not found: {path}; expected a DiT weights file ({_expected_suffixes()})"
        )
    if not path.is_file():
        raise TcgraphError(
            f"checkpoint path {path} is not a file; expected a DiT weights file ({_expected_suffixes()})"
        )
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        obj = _read_safetensors(path)
    elif suffix in TORCH_SUFFIXES:
        obj = _read_torch(path)
    else:
        raise TcgraphError(
            f"cannot read checkpoint {path}: unknown file type {path.suffix or '(no suffix)'!r}; "
            f"expected one of {_expected_suffixes()}"
        )
    return _strip_prefix(_unwrap(obj, path))


def _read_safetensors(path: Path) -> object:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise TcgraphError(
            f"cannot read {path} as a safetensors file ({e}); the file is damaged or not safetensors: "
            "download or save it again"
        ) from e


def restricted_torch_load(path: Path, kind: str, resave: str) -> object:
    """`torch.load(weights_only=True)` with only `argparse.Namespace` allowed beyond tensors and
    plain containers; every failure is one TcgraphError naming `kind` (what the file should be)
    and, for a file that pickles other objects, `resave` (how to write a plain one)."""
    trusted = (f"If you trust the file, convert it once: load it with torch.load(path, weights_only=False) and "
               f"save only the tensors, e.g. tcgraph.models.save_checkpoint(state_dict, 'model.safetensors'). {resave}")
    try:
        with torch.serialization.safe_globals(_SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch names the refused global in one of two forms, by whether its module is blocked outright.
        found = re.search(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) (\S+)", str(e))
        if found:
            raise TcgraphError(
                f"refusing to load {path} as unsafe to load (the file is not damaged): it is not a plain {kind}, "
                f"it pickles the Python object {found.group(1)}, and unpickling that could run arbitrary code; only "
                f"tensors, plain containers and argparse.Namespace are allowed. {trusted}"
            ) from e
        if "Weights only load failed" in str(e):
            detail = _unpickler_detail(str(e))
            raise TcgraphError(
                f"cannot read {path} as a {kind}: torch's safe (weights-only) loader refused it ({detail}): either the "
                "file is damaged, or it is a pickle of more than tensors and plain containers (pickle.dump, or "
                f"torch.save of a whole object), which is refused as unsafe to load. {trusted}"
            ) from e
        raise TcgraphError(
            f"cannot read {path} as a {kind}: the file is damaged or not a torch.save file; download or save it again"
        ) from e
    except Exception as e:  # torch's weights-only unpickler raises IndexError/KeyError/... on some random bytes
        detail = str(e).splitlines()[0] if str(e) else "empty or truncated file"
        raise TcgraphError(
            f"cannot read {path} as a {kind} ({type(e).__name__}: {detail}); "
            "the file is damaged or not a torch.save file: download or save it again"
        ) from e


def _unpickler_detail(message: str) -> str:
    """The one line of torch's weights-only error that says what it met ("Unsupported operand 149")."""
    _, marker, rest = message.partition("WeightsUnpickler error:")
    lines = [line.strip() for line in rest.splitlines() if line.strip()]
    return lines[0] if marker and lines else "no detail given"


def _read_torch(path: Path) -> object:
    return restricted_torch_load(path, "PyTorch checkpoint", "Re-save just the weights: "
                                 "torch.save(model.state_dict(), path) or tcgraph.models.official.checkpoint.save_checkpoint")


def _is_state_dict(obj: object) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    )


def _unwrap(obj: object, path: Path, depth: int = 0) -> StateDict:
    if _is_state_dict(obj):
        return dict(obj)
    if isinstance(obj, Mapping):
        for key in WRAPPER_KEYS:
            if key in obj and _is_state_dict(obj[key]):
                return dict(obj[key])
        for key in WRAPPER_KEYS:  # one more level: {"state_dict": {"model": {...}}}
            if key in obj and isinstance(obj[key], Mapping) and depth < 1:
                try:
                    return _unwrap(obj[key], path, depth + 1)
                except TcgraphError:
                    pass
        found = ", ".join(repr(k) for k in list(obj)[:_MAX_LISTED]) or "nothing"
        holding = [repr(k) for k, v in obj.items() if _is_state_dict(v)]
        hint = (f"; {', '.join(holding)} hold{'s' if len(holding) == 1 else ''} tensors: save that entry alone "
                "(torch.save(checkpoint[key], path))" if holding else "")
        raise TcgraphError(
            f"{path} holds a dict without model weights: top-level keys {found}; expected a state dict "
            f"of tensors or a training checkpoint with one of {', '.join(map(repr, WRAPPER_KEYS))}{hint}"
        )
    raise TcgraphError(
        f"{path} holds a {type(obj).__name__}, not model weights; expected a state dict of tensors "
        f"or a training checkpoint with one of {', '.join(map(repr, WRAPPER_KEYS))}"
    )


def _strip_prefix(sd: StateDict) -> StateDict:
    """Remove the wrapper prefixes every key shares (`module.model.pos_embed` -> `pos_embed`),
    as long as some are shared and the keys are not yet a DiT's own."""
    changed = True
    while changed and not any(k in sd for k in DIT_KEYS):
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if all(k.startswith(prefix) for k in sd):
                sd = {k[len(prefix):]: v for k, v in sd.items()}
                changed = True
    return sd


#################################################################################
#                               Config inference                                #
#################################################################################


def state_dict_shapes(config: DiTConfig) -> dict[str, tuple[int, ...]]:
    """{parameter name: shape} of the model `config` builds (its family's), without allocating it."""
    return config.family.state_dict_shapes(config)


def _shapes_of(sd: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in sd.items()}


def config_candidates(sd: Mapping[str, torch.Tensor]) -> list[tuple[str, DiTConfig]]:
    """(label, config) for every registered config, at any input size, that fits `sd`."""
    pos = sd.get("pos_embed")
    if pos is None or pos.dim() != 3:
        return []
    tokens, hidden = int(pos.shape[1]), int(pos.shape[2])
    grid = math.isqrt(tokens)
    if grid * grid != tokens:
        return []
    shapes = _shapes_of(sd)
    found = []
    for name, base in CONFIGS.items():
        if base.hidden_size != hidden:
            continue
        input_size = grid * base.patch_size
        config = base if input_size == base.input_size else make_config(name, input_size=input_size)
        if state_dict_shapes(config) == shapes:
            label = name if config is base else f"{name} with input_size={input_size}"
            found.append((label, config))
    return found


def infer_config(state_dict: Mapping[str, torch.Tensor]) -> list[str]:
    """Names of the registered configs whose keys and shapes all match `state_dict`.

    Input sizes other than the registered one are tried too (the token count of
    `pos_embed` fixes it): a 512x512 DiT-XL/2 checkpoint gives
    `["DiT-XL/2 with input_size=64"]`. An empty list means no registered config fits.
    """
    return [label for label, _ in config_candidates(state_dict)]


def describe_state_dict(sd: Mapping[str, torch.Tensor]) -> str:
    """What a DiT state dict says about its architecture, for error messages."""
    if not any(k in sd for k in DIT_KEYS):
        keys = list(sd)
        return (f"its keys are not a DiT's: {len(keys)} keys such as {_listed(keys[:3])}, none of "
                f"{', '.join(DIT_KEYS)}; a checkpoint wrapped in another model or trainer must be unwrapped to the "
                "DiT's own state dict (keys pos_embed, x_embedder.*, blocks.<i>.*, final_layer.*)")
    facts = []
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    facts.append(f"depth {depth}")
    patch = sd.get("x_embedder.proj.weight")
    if patch is not None and patch.dim() == 4:
        facts.append(f"hidden_size {patch.shape[0]}, in_channels {patch.shape[1]}, patch_size {patch.shape[2]}")
        pos = sd.get("pos_embed")
        if pos is not None and pos.dim() == 3 and math.isqrt(pos.shape[1]) ** 2 == pos.shape[1]:
            facts.append(f"input_size {math.isqrt(pos.shape[1]) * patch.shape[2]}")
        final = sd.get("final_layer.linear.weight")
        if final is not None:
            facts.append(f"learn_sigma {final.shape[0] == 2 * patch.shape[1] * patch.shape[2] ** 2}")
    fc1 = sd.get("blocks.0.mlp.fc1.weight")
    if fc1 is not None and fc1.dim() == 2:
        facts.append(f"mlp_ratio {fc1.shape[0] / fc1.shape[1]:g}")
    table = sd.get("y_embedder.embedding_table.weight")
    if table is not None:
        facts.append(f"{table.shape[0]} label embeddings (classes + 1 null class when trained with label dropout)")
    return ", ".join(facts)


#################################################################################
#                                   Loading                                     #
#################################################################################


def _listed(items: list[str]) -> str:
    shown = ", ".join(items[:_MAX_LISTED])
    return shown + (f", ... ({len(items) - _MAX_LISTED} more)" if len(items) > _MAX_LISTED else "")


def config_argument(label: str) -> str:
    """How to pass the config named by an `infer_config` label, as Python source."""
    name, _, size = label.partition(" with input_size=")
    return f"config=make_config({name!r}, input_size={size})" if size else f"config={name!r}"


def _fit_hint(sd: Mapping[str, torch.Tensor]) -> str:
    labels = infer_config(sd)
    if labels:
        return (
            f"the checkpoint fits registered config {' or '.join(map(repr, labels))}: "
            f"load it with {' or '.join(config_argument(label) for label in labels)}"
        )
    return (
        f"no registered config fits the checkpoint ({describe_state_dict(sd)}); "
        "pass a DiTConfig with these fields and the num_heads it was trained with (weights do not store it)"
    )


def load_checkpoint_into(
    model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str = "checkpoint"
) -> nn.Module:
    """Copy `state_dict` into `model`, strictly: every key present, no extra key, same shapes.

    On any mismatch, raises one TcgraphError that lists the missing, unexpected and
    mis-shaped keys and says which registered config the checkpoint fits, if any. A model
    built on the meta device takes the checkpoint tensors (cast to its dtypes) as its own.
    """
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    misshaped = [
        f"{k} {tuple(state_dict[k].shape)} in the checkpoint vs {tuple(own[k].shape)} in the model"
        for k in own
        if k in state_dict and tuple(state_dict[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or misshaped:
        what = getattr(model, "config", None)
        parts = [f"{source} does not fit the model" + (f" ({what})" if what is not None else "")]
        if missing:
            parts.append(f"{len(missing)} missing keys: {_listed(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys: {_listed(unexpected)}")
        if misshaped:
            parts.append(f"{len(misshaped)} keys with other shapes: {_listed(misshaped)}")
        parts.append(_fit_hint(state_dict))
        raise TcgraphError("; ".join(parts))
    check_finite(state_dict, source)
    on_meta = any(t.is_meta for t in own.values())
    cast = {k: v.to(dtype=own[k].dtype) for k, v in state_dict.items()}
    model.load_state_dict(cast, strict=True, assign=on_meta)
    left = [k for k, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise TcgraphError(
            f"after loading {source}, {_listed(left)} still have no data (not in the state dict); "
            "build the model on a real device before loading"
        )
    return model


def check_finite(state_dict: Mapping[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Refuse weights that hold NaN or inf: every output would be NaN, and nothing later could say why."""
    bad = [k for k, v in state_dict.items()
           if v.is_floating_point() and not v.is_meta and not bool(torch.isfinite(v).all())]
    if bad:
        raise TcgraphError(
            f"{source}: the checkpoint's weights are not finite: {len(bad)} of {len(state_dict)} tensors hold NaN or "
            f"inf ({_listed(bad)}); the training run diverged or the file was damaged: use another checkpoint"
        )


#################################################################################
#                                   Writing                                     #
#################################################################################


def save_checkpoint(model: nn.Module | Mapping[str, torch.Tensor], path: str | os.PathLike) -> Path:
    """Write the weights of `model` (or a state dict) to `path`, atomically.

    `.safetensors` is written with safetensors, `.pt` / `.pth` / `.bin` with `torch.save`
    of the bare state dict (the layout of the released DiT checkpoints). The file is
    written next to its destination under a temporary name and renamed into place, so a
    crash never leaves a half-written checkpoint.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in SAFETENSORS_SUFFIXES + TORCH_SUFFIXES:
        raise TcgraphError(
            f"cannot save a checkpoint as {path}: unknown file type {path.suffix or '(no suffix)'!r}; "
            f"use one of {_expected_suffixes()}"
        )
    sd = model.state_dict() if isinstance(model, nn.Module) else model
    state = {k: v.detach().cpu().contiguous() for k, v in sd.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        if suffix in SAFETENSORS_SUFFIXES:
            from safetensors.torch import save_file

            save_file(state, str(tmp), metadata={"format": "pt"})
        else:
            torch.save(state, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
