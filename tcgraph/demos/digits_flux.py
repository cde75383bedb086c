"""The FLUX-architecture demo model "digits-flux": a small diffusers `FluxTransformer2DModel` (double
and single blocks, RoPE, joint attention, a guidance input) on scikit-learn's digits, prompted
through the text demo's vocabulary.

    transformer, encoder = load_digits_flux()
    text = encoder.encode(["a handwritten seven"], negative=None)   # Text with pooled embeddings
    v = transformer(x, t, *text.model_inputs(guided=False), torch.full((1,), 2.0))

Both are trained together here by `scripts/train_flux_demo.py` (nothing is downloaded); the folder
`tcgraph/models/weights/digits_flux/` holds
- `transformer/`: diffusers' `FluxTransformer2DModel` as `save_pretrained` writes it (config.json,
  with the latent side `sample_size` added, + diffusion_pytorch_model.safetensors), loaded as the
  flux family's `DiffusersFluxGuided`;
- `text_encoder/`: the `PooledPromptEncoder`'s `config.json` and `prompt_encoder.safetensors`;
- `scheduler/scheduler_config.json`: the `FlowMatchEulerDiscreteScheduler` it samples with
  (`tcgraph transform`'s default scheduler "auto" takes it).

`PooledPromptEncoder` is the text demo's T5 stand-in (`tcgraph.demos.digits_text.PromptEncoder`:
the same vocabulary, tokenizer and text length 8) that also plays CLIP's part: FLUX reads a
sequence (`encoder_hidden_states` [N, 8, 32]) and a pooled vector (`pooled_projections` [N, 32]).
The pooled vector is the mean of the sequence's embeddings over the prompt's tokens (its words and
"</s>", padding left out): one vector per prompt, of the same width, that the model adds to its
timestep embedding and so reads in the modulation of every block, as a class label is read. FLUX
reads no text mask (it attends to all 8 tokens, padding included, whose embeddings are zero), so
the `Text` it gives holds an all-ones mask.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from tcgraph.demos.digits_text import (CAPTION, ENCODER_CONFIG, ENCODER_DIR, ENCODER_WEIGHTS, LENGTH,
                                        TRANSFORMER_DIR, PromptEncoder)
from tcgraph.errors import TcgraphError
from tcgraph.text.embeddings import Text

NAME = "digits-flux"
MAKE_WEIGHTS = "python scripts/train_flux_demo.py"
ENCODER_CLASS = "PooledPromptEncoder"  # the text encoder config's _class_name
SCHEDULER_DIR, SCHEDULER_FILE = "scheduler", "scheduler_config.json"
SIDE = 16  # the image side (pixels: the model denoises the digits themselves, as the other demos)
# The sampler: diffusers' FLUX scheduler without a resolution shift (64 image tokens), as trained.
SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 1.0,
             "use_dynamic_shifting": False}
# FluxTransformer2DModel sizes of the demo (scripts/train_flux_demo.py): 2 double + 4 single blocks,
# hidden 128 (4 heads of 32, RoPE axes 8 + 12 + 12), 1 channel packed 2x2 -> 64 image tokens.
SIZES = dict(input_size=SIDE, in_channels=1, hidden_size=128, depth=6, num_heads=4, single_depth=4,
             caption_channels=CAPTION, pooled_channels=CAPTION, guidance_embeds=True, axes_dims_rope=(8, 12, 12))


def demo_config(**overrides):
    """The demo's `FluxConfig`; `overrides` change sizes (a smaller model for tests)."""
    from tcgraph.models.diffusers.flux_config import FluxConfig

    return FluxConfig(**{**SIZES, **overrides})


class PooledPromptEncoder(PromptEncoder):
    """The text demo's prompt encoder with a pooled embedding: `encode` gives a `Text` whose `pooled`
    [N, width] is the mean of each prompt's token embeddings (see the module docstring)."""

    @staticmethod
    def pool(embeddings: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """[N, width]: the mean of `embeddings` [N, L, width] over the tokens where `mask` [N, L] is 1."""
        m = mask.to(embeddings.dtype)
        return (embeddings * m[..., None]).sum(1) / m.sum(1, keepdim=True).clamp(min=1.0)

    def embed(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(sequence [N, L, width], pooled [N, width]) of token ids: what the model reads, with gradients."""
        e = self(ids, mask)
        return e, self.pool(e, mask)

    @torch.no_grad()
    def encode(self, prompts, negative: str | None = "", length: int | None = None, warn: bool = True) -> Text:
        """The `Text` of `prompts` with pooled embeddings (and the negative prompt's, default the empty
        prompt; None leaves it out); words outside the vocabulary are warned about as by `PromptEncoder`."""
        text = super().encode(prompts, negative=negative, length=length, warn=warn)
        ids, mask = self.tokenize(prompts, length)  # the real mask: which rows the pooled mean takes
        ones = torch.ones_like(mask)
        if negative is None:
            return Text(text.embeddings, ones, pooled=self.pool(text.embeddings, mask))
        nids, nmask = self.tokenize([negative] * len(text), length)
        return Text(text.embeddings, ones, text.negative_embeddings, ones, self.pool(text.embeddings, mask),
                    self.pool(text.negative_embeddings, nmask))

    def config_dict(self) -> dict:
        return {**super().config_dict(), "_class_name": ENCODER_CLASS, "pooled": "mean of the prompt's tokens"}


# ---- the folder ------------------------------------------------------------------------------

def weights_dir() -> Path:
    """The digits-flux folder (`tcgraph.models.PRETRAINED["digits-flux"]`)."""
    from tcgraph.models import PRETRAINED

    return PRETRAINED[NAME][0]


def check_folder(folder: Path) -> None:
    """Refuse a demo folder without its transformer, prompt encoder or scheduler, naming the training command."""
    need = [folder / TRANSFORMER_DIR / "config.json", folder / ENCODER_DIR / ENCODER_CONFIG,
            folder / ENCODER_DIR / ENCODER_WEIGHTS, folder / SCHEDULER_DIR / SCHEDULER_FILE]
    missing = [p for p in need if not p.is_file()]
    if missing:
        raise TcgraphError(f"the pretrained model {NAME!r} has no weights yet: {missing[0]} is missing; train it "
                           f"with `{MAKE_WEIGHTS}` (about 90 minutes on 2 cores; --minutes sets the budget)")


def load_transformer(folder: str | Path | None = None):
    """The digits-flux transformer, a flux-family `DiffusersFluxGuided` in eval mode (needs diffusers)."""
    from tcgraph.models.diffusers.flux import load_diffusers_flux
    from tcgraph.models.diffusers.folder import read_folder

    folder = weights_dir() if folder is None else Path(folder)
    check_folder(folder)
    return load_diffusers_flux(read_folder(folder / TRANSFORMER_DIR))


def load_prompt_encoder(folder: str | Path | None = None) -> PooledPromptEncoder:
    """The digits-flux `PooledPromptEncoder`, in eval mode (no diffusers needed)."""
    folder = weights_dir() if folder is None else Path(folder)
    check_folder(folder)
    return PooledPromptEncoder.from_folder(folder / ENCODER_DIR)


def load_digits_flux(folder: str | Path | None = None):
    """(transformer: DiffusersFluxGuided, encoder: PooledPromptEncoder), both in eval mode."""
    return load_transformer(folder), load_prompt_encoder(folder)


def is_flux_demo_folder(folder: Path) -> bool:
    """Whether `folder` holds a digits-flux prompt encoder (its text encoder config names `PooledPromptEncoder`)."""
    config = folder / ENCODER_DIR / ENCODER_CONFIG
    if not config.is_file() or not (folder / ENCODER_DIR / ENCODER_WEIGHTS).is_file():
        return False
    try:
        return json.loads(config.read_text()).get("_class_name") == ENCODER_CLASS
    except (OSError, ValueError, AttributeError):
        return False


def demo_folder_of(model) -> Path | None:
    """The digits-flux folder of a model: the name "digits-flux", a demo folder or its `transformer/`; else None."""
    if isinstance(model, str) and model == NAME:
        return weights_dir()
    if not isinstance(model, (str, Path)) or not str(model):
        return None
    path = Path(model)
    for folder in (path, path.parent):
        if (path == folder or path.name == TRANSFORMER_DIR) and is_flux_demo_folder(folder):
            return folder
    return None


def scheduler_folder_for(model) -> Path | None:
    """The scheduler folder `transform`'s "auto" scheduler takes for a digits-flux model; None for other models."""
    folder = demo_folder_of(model)
    if folder is None:
        return None
    check_folder(folder)
    return folder / SCHEDULER_DIR


__all__ = ["LENGTH", "NAME", "MAKE_WEIGHTS", "SCHEDULER", "SIZES", "PooledPromptEncoder", "demo_config",
           "demo_folder_of", "is_flux_demo_folder", "load_digits_flux", "load_prompt_encoder", "load_transformer",
           "scheduler_folder_for"]
