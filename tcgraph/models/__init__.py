"""DiT models: the architecture, its config registry, and loading weights.

    load_model()                                   # the demo model, trained here
    load_model("DiT-XL-2-256x256.pt")              # an official checkpoint, config inferred
    load_model("ckpt/0400000.pt", config="DiT-XL/2")

Importing this package imports no torch: the family registry and the pretrained names are
data, and everything that builds or loads a model (`tcgraph.models.loading`) is imported on
first use (PEP 562), so `inspect`, `--help` and the CLI's checks start without torch.
"""
from __future__ import annotations

from pathlib import Path

from tcgraph.models.families import FAMILIES, Family, family
from tcgraph.lazy import lazy_names

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"

# Pretrained models that ship with tcgraph: name -> (weights file, registered config).
# "digits-text" and "digits-flux" are folders (transformer/ + text_encoder/, `tcgraph.demos.digits_text`,
# `tcgraph.demos.digits_flux`) whose config is their transformer/config.json, hence no registered config.
# Official DiT weights cannot be downloaded here; pass their path to `load_model`.
PRETRAINED: dict[str, tuple[Path, str | None]] = {
    "digits": (WEIGHTS_DIR / "digits.safetensors", "digits"),
    "digits-text": (WEIGHTS_DIR / "digits_text", None),
    "digits-flux": (WEIGHTS_DIR / "digits_flux", None),
}
# What makes each pretrained weights file, told to the user when it is missing.
_MAKE_WEIGHTS = {"digits": "python scripts/train_demo.py", "digits-text": "python scripts/train_text_demo.py",
                 "digits-flux": "python scripts/train_flux_demo.py"}

# name -> the module that defines it, imported when the name is first asked for
_LAZY = {name: "tcgraph.models.loading" for name in (
    "CONFIGS",
    "DiT",
    "DiTConfig",
    "ModelAdapter",
    "adapter_for",
    "build_model",
    "check_class_ids",
    "infer_config",
    "load_checkpoint_into",
    "is_model",
    "load_diffusers",
    "load_model",
    "load_state_dict_file",
    "make_config",
    "register_adapter",
    "run_blocks",
    "save_checkpoint",
)}


__getattr__ = lazy_names('tcgraph.models', _LAZY, globals())


__all__ = sorted(["PRETRAINED", "FAMILIES", "Family", "family", *_LAZY])
