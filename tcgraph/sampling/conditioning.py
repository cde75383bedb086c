"""What a sampling run is conditioned on: class ids, or text embeddings with their mask.

A class-conditional model (DiT) is conditioned on class ids `y` [N], and guidance's
unconditional half is the null class. A text-conditioned model (PixArt) is conditioned on
`Text`: the prompt embeddings [N, L, D_text] and their mask [N, L] (1 = a token, 0 =
padding), with the negative (or empty) prompt's embeddings and mask as guidance's
unconditional half. The graphs read the text as `encoder_hidden_states` and
`encoder_attention_mask` (float32), in place of `y`; `L` is the plan's `text_length`.

The names of the fields follow diffusers' pipelines (`prompt_embeds`,
`prompt_attention_mask`, `negative_prompt_embeds`, `negative_prompt_attention_mask`), and so
do the keys of an embeddings file (`load_text`).
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from tcgraph.errors import TcgraphError, UsageError
from tcgraph.text.embeddings import Text  # noqa: F401  (re-exported: the sampler's conditioning)

if TYPE_CHECKING:
    from tcgraph.models.families import ModelConfig

# Keys of an embeddings file (safetensors), as diffusers' PixArt pipeline names its arguments.
EMBEDS, MASK = "prompt_embeds", "prompt_attention_mask"
NEG_EMBEDS, NEG_MASK = "negative_prompt_embeds", "negative_prompt_attention_mask"
# FLUX's and SD3's pooled embeddings (their pipelines' names); such a file needs no mask
POOLED, NEG_POOLED = "pooled_prompt_embeds", "negative_pooled_prompt_embeds"


def load_text(path: str | Path) -> Text:
    """Prompt embeddings from a safetensors file with `prompt_embeds` [N, L, D] and `prompt_attention_mask`
    [N, L] (and optionally `negative_prompt_embeds`, `negative_prompt_attention_mask`; a single negative row
    is repeated for every prompt). For a model that reads pooled embeddings (FLUX), `pooled_prompt_embeds`
    [N, P] (and `negative_pooled_prompt_embeds`) in place of the masks."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise UsageError(f"no embeddings file at {path}; write one with safetensors.torch.save_file holding "
                         f"{EMBEDS} [N, L, D] and {MASK} [N, L] (and {NEG_EMBEDS}, {NEG_MASK} for guidance; FLUX and "
                         f"SD3: {POOLED} [N, P] in place of the mask, and {NEG_POOLED})")
    try:
        d = load_file(str(path))
    except Exception as e:  # safetensors raises its own error types
        raise TcgraphError(f"cannot read the embeddings file {path}: {type(e).__name__}: {e}; write it with "
                           "safetensors.torch.save_file") from None
    if POOLED in d and MASK not in d:  # a model with pooled embeddings reads no mask: every token counts
        d[MASK] = torch.ones(d[EMBEDS].shape[:2]) if EMBEDS in d else None
        if NEG_EMBEDS in d:
            d[NEG_MASK] = torch.ones(d[NEG_EMBEDS].shape[:2])
    missing = [k for k in (EMBEDS, MASK) if k not in d]
    if missing:
        raise UsageError(f"the embeddings file {path} lacks {', '.join(missing)}; it holds {sorted(d)}: it needs "
                         f"{EMBEDS} [N, L, D] and {MASK} [N, L] (FLUX and SD3: {POOLED} [N, P] in place of the mask)")
    e, m = d[EMBEDS].float(), d[MASK]
    ne, nm = d.get(NEG_EMBEDS), d.get(NEG_MASK)
    if ne is not None and nm is not None and ne.shape[0] == 1 and e.shape[0] > 1:
        ne, nm = ne.expand(e.shape[0], *ne.shape[1:]), nm.expand(e.shape[0], *nm.shape[1:])
    pooled, neg_pooled = d.get(POOLED), d.get(NEG_POOLED)
    if neg_pooled is not None and neg_pooled.shape[0] == 1 and e.shape[0] > 1:
        neg_pooled = neg_pooled.expand(e.shape[0], -1)
    return Text(e, m, None if ne is None else ne.float(), nm, None if pooled is None else pooled.float(),
                None if neg_pooled is None else neg_pooled.float()).checked()


def model_conditioning(y, guided: bool, null_class: int):
    """What the model reads besides x and t at one step: class ids [y; null] (a tensor), or the text
    inputs (a tuple: embeddings, mask)."""
    if isinstance(y, Text):
        return y.model_inputs(guided)
    if guided:
        return torch.cat([y, torch.full_like(y, null_class)])
    return y


def take(y, rows):
    """The conditioning of images `rows` (indices or a slice): class ids (a list or tensor) or `Text`."""
    if isinstance(y, Text):
        return y.take(rows)
    if isinstance(y, torch.Tensor):
        return y[rows if isinstance(rows, slice) else torch.as_tensor(rows, dtype=torch.long)]
    return torch.tensor([int(y[i]) for i in (range(len(y))[rows] if isinstance(rows, slice) else rows)])


def nbytes(y) -> int:
    if isinstance(y, Text):
        return sum(v.numel() * v.element_size() for v in (y.embeddings, y.mask, y.negative_embeddings,
                                                          y.negative_mask) if v is not None)
    return y.numel() * y.element_size()


def as_inputs(y) -> tuple[torch.Tensor, ...]:
    """The conditioning of one model call as a tuple of graph inputs: (y,) or (embeddings, mask)."""
    return tuple(y) if isinstance(y, tuple) else (y,)


# ---- what the API checks and fills in about a model's conditioning ----


def text_argument(text, name: str, option: str):
    """A `Text`, an embeddings file read into one, or None."""
    if text is None:
        return None
    if isinstance(text, Text):
        return text.checked()
    if isinstance(text, (str, os.PathLike)):
        return load_text(text)
    raise UsageError(f"{name} ({option}) must be a tcgraph Text or the path of an embeddings file, got "
                     f"{type(text).__name__}")


def encoder_defaults(model, settings, calibration_text):
    """A model with a tcgraph prompt encoder (the digits-text and digits-flux demos): its text length, and
    its prompts (every template of every digit) for calibration unless some were given."""
    from tcgraph.demos.digits_text import calibration_prompts
    from tcgraph.demos.prompts import prompt_encoder_for

    encoder = prompt_encoder_for(model) if isinstance(model, (str, os.PathLike)) else None
    if encoder is None:
        return settings, calibration_text
    if calibration_text is None:
        calibration_text = calibration_prompts(encoder)
    return dataclasses.replace(settings, text_length=encoder.length), calibration_text


def check_conditioning(settings, cfg: ModelConfig, text) -> None:
    """A text-conditioned model needs a text length (and text of its width); a class-conditional one none."""
    if cfg.text_conditioned and not settings.text_length:
        raise UsageError(f"this model is text-conditioned (text embeddings of width {cfg.caption_channels}): give the "
                         "text length its graphs read, text_length= (--text-length; PixArt-alpha's prompts have 120 "
                         "tokens, PixArt-Sigma's 300, SD3's 333: 77 CLIP + 256 T5), or calibration embeddings, whose length "
                         "is taken")
    if not cfg.text_conditioned and settings.text_length:
        raise UsageError(f"this model is conditioned on class ids, not text: drop text_length (--text-length "
                         f"{settings.text_length}) and the text embeddings")
    pooled = getattr(cfg, "pooled_channels", 0)
    if settings.pooled != bool(pooled):
        raise UsageError(f"{cfg.family.title} models read {'pooled text embeddings' if pooled else 'a text mask'}, the "
                         f"plan's settings say pooled={settings.pooled}: make the plan for this model")
    if settings.guidance != cfg.family.guidance_of(cfg):
        raise UsageError(f"{cfg.family.title} models take guidance {cfg.family.guidance_of(cfg)!r}, the plan's settings say "
                         f"{settings.guidance!r}: make the plan for this model")
    if text is not None:
        text.check(settings.text_length, cfg.caption_channels, pooled)


def encode_prompts(art, prompts, negative_prompt: str, text_encoder=None):
    """The prompts as the artifact's model's own text encoder embeds them: the digits-text or
    digits-flux demo's (shipped with tcgraph), or those of the diffusers pipeline folder
    `text_encoder` (`--text-encoder`: PixArt's T5, FLUX's and SD3's CLIP + T5, `tcgraph.text`).
    FLUX and SD3 get a negative prompt only where the artifact guides with CFG (SD3's; FLUX takes its
    guidance as an input).
    An artifact's manifest records where it was transformed from, but tcgraph reads no path
    from an artifact: the folder is the user's to name."""
    from tcgraph.demos.digits_flux import NAME as FLUX_NAME
    from tcgraph.demos.digits_text import NAME
    from tcgraph.demos.prompts import prompt_encoder_for
    from tcgraph.text.mmdit import MMDiTTextEncoder
    from tcgraph.text.encoders import pipeline_text_encoder_for

    if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts) or not prompts:
        raise UsageError("prompts (--prompt) must be a non-empty list of strings")
    if not art.model_config.text_conditioned:
        raise UsageError("this artifact's model is conditioned on class ids, not text: give classes (--classes)")
    embed_with = ("embed the prompts with the model's pipeline (e.g. PixArtAlphaPipeline.encode_prompt) and pass them "
                  f"as an embeddings file (--embeddings FILE.safetensors: {EMBEDS}, {MASK}, {NEG_EMBEDS}, {NEG_MASK})"
                  if not getattr(art.model_config, "pooled_channels", 0) else
                  "embed the prompts with the model's pipeline (e.g. FluxPipeline.encode_prompt, "
                  "StableDiffusion3Pipeline.encode_prompt) and pass them as an embeddings file (--embeddings "
                  f"FILE.safetensors: {EMBEDS}, {POOLED} and, for guidance, {NEG_EMBEDS}, {NEG_POOLED})")
    source = art.extra.get("model", "in-memory")
    if text_encoder is not None:
        if not isinstance(text_encoder, (str, os.PathLike)) or not str(text_encoder):
            raise UsageError(f"text_encoder (--text-encoder) must be the path of a pipeline folder, got "
                             f"{type(text_encoder).__name__}")
        encoder = prompt_encoder_for(Path(text_encoder)) or pipeline_text_encoder_for(Path(text_encoder))
        if encoder is None:
            raise UsageError(f"{text_encoder} has no text encoder tcgraph can run (a diffusers pipeline folder with "
                             f"model_index.json, text_encoder/ and tokenizer/, or the digits-text demo's folder); "
                             f"{embed_with}")
    elif source in (NAME, FLUX_NAME):  # the demos' encoders ship with tcgraph: no path is read from the artifact
        encoder = prompt_encoder_for(source)
    else:
        recorded = art.extra.get("source") or (source if source != "in-memory" else None)
        where = f" (its manifest says it came from {recorded})" if recorded else ""
        raise UsageError(f"prompts need the text encoder of the pipeline this artifact was transformed from{where}; "
                         "tcgraph reads no path from an artifact, so name the folder: --text-encoder FOLDER "
                         f"(text_encoder= in the API), or {embed_with}")
    s = art.plan.settings
    if isinstance(encoder, MMDiTTextEncoder):  # no mask; the text's width where the pipeline has no T5
        negative = negative_prompt if s.cfg_scale > 1 and s.guidance == "cfg" else None  # FLUX: guidance as an input
        return encoder.encode(list(prompts), negative=negative, length=s.text_length,
                              width=art.model_config.caption_channels)
    return encoder.encode(list(prompts), negative=negative_prompt, length=s.text_length)
