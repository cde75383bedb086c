"""Which demo prompt encoder a model name or folder has: digits-text's or digits-flux's.

The demos' encoders live with their demos (`tcgraph.demos.digits_text`, `tcgraph.demos.digits_flux`,
which builds on the first); this module asks both, so that neither imports the other's loader.
"""
from __future__ import annotations

from pathlib import Path

from tcgraph.demos import digits_flux
from tcgraph.demos.digits_text import (ENCODER_DIR, ENCODER_WEIGHTS, NAME, TRANSFORMER_DIR, PromptEncoder,
                                       load_prompt_encoder)


def prompt_encoder_for(model) -> PromptEncoder | None:
    """The prompt encoder of a model name or folder: "digits-text", its folder, or the folder's
    `transformer/` (and the same of "digits-flux": its `PooledPromptEncoder`); None for any other
    model (whose prompts must come as embeddings)."""
    flux = digits_flux.demo_folder_of(model)
    if flux is not None:
        return digits_flux.load_prompt_encoder(flux)
    if isinstance(model, str) and model == NAME:
        return load_prompt_encoder()
    if not isinstance(model, (str, Path)):
        return None
    path = Path(model)
    for folder in (path, path.parent):
        if (folder / ENCODER_DIR / ENCODER_WEIGHTS).is_file() and (folder / TRANSFORMER_DIR).is_dir() \
                and (path == folder or path.name == TRANSFORMER_DIR):  # a pipeline's T5 has other files
            return load_prompt_encoder(folder)
    return None



__all__ = ["prompt_encoder_for"]
