"""The inputs of a text-conditioned model's Triton model, and one request of them, checked.

A text-conditioned artifact (the digits-text demo, PixArt, FLUX, SD3) is served from prompt
embeddings, as `tcgraph sample ART --embeddings FILE` samples it: the client embeds its prompts
with the model's own text encoders (a diffusers pipeline's `encode_prompt`) and sends, Triton's
batch dimension first, one row per image:

    PROMPT_EMBEDS    FP32 [n, L, D]  the prompt's embeddings at the artifact's text length L
    PROMPT_MASK      FP32 [n, L]     1 = token, 0 = padding (a model that reads a mask: PixArt)
    POOLED_EMBEDS    FP32 [n, P]     the pooled embeddings (a model that reads them: FLUX, SD3)
    NEGATIVE_EMBEDS, NEGATIVE_MASK or NEGATIVE_POOLED
                     the negative prompt's, alike, where guidance doubles the batch (CFG, scale > 1)
    SEED             INT64 [n, 1]    the request's seed, the same on every row

Only the inputs the artifact's graphs read are declared (`serve_inputs`), so a client that
sends another model's learns it from Triton at once. A request's images equal those of
`tcgraph sample ART --embeddings FILE --seed s` for the same embeddings (one image per row):
`check_text_request` returns a `TextRequest` or raises `BadRequest` with one line.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from tcgraph.serve.config import CLASS_INPUTS, Input
from tcgraph.serve.requests import SEED, BadRequest, check_seed, int_column
from tcgraph.text.embeddings import Text

PROMPT_EMBEDS, PROMPT_MASK, POOLED_EMBEDS = "PROMPT_EMBEDS", "PROMPT_MASK", "POOLED_EMBEDS"
NEGATIVE_EMBEDS, NEGATIVE_MASK, NEGATIVE_POOLED = "NEGATIVE_EMBEDS", "NEGATIVE_MASK", "NEGATIVE_POOLED"


@dataclass(frozen=True)
class TextRequest:
    text: Text
    seed: int

    @property
    def count(self) -> int:
        return len(self.text)


def serve_inputs(model_config, settings) -> tuple[Input, ...]:
    """The inputs of the Triton model of an artifact with this model config and these sampler settings."""
    if not model_config.text_conditioned:
        return CLASS_INPUTS
    length, width = settings.text_length, model_config.caption_channels
    pooled = getattr(model_config, "pooled_channels", 0)
    second = Input(POOLED_EMBEDS, "TYPE_FP32", (pooled,)) if pooled else Input(PROMPT_MASK, "TYPE_FP32", (length,))
    inputs = [Input(PROMPT_EMBEDS, "TYPE_FP32", (length, width)), second]
    if settings.doubles_batch:
        negative = NEGATIVE_POOLED if pooled else NEGATIVE_MASK
        inputs += [Input(NEGATIVE_EMBEDS, "TYPE_FP32", (length, width)), Input(negative, "TYPE_FP32", second.dims)]
    return (*inputs, Input(SEED, "TYPE_INT64", (1,)))


def check_text_request(arrays, inputs: tuple[Input, ...], *, max_images: int) -> TextRequest:
    """Check one request's arrays (numpy, in the order of `inputs`; None = missing) against `inputs`."""
    given = dict(zip((i.name for i in inputs), arrays))
    names = [i.name for i in inputs]
    missing = [n for n, a in given.items() if a is None]
    if missing:
        raise BadRequest(f"input {missing[0]} is missing: this model reads {', '.join(names)}")
    seeds = int_column(given[SEED], SEED)
    values = {}
    n = None
    for spec in inputs[:-1]:
        array = np.asarray(given[spec.name])
        if array.dtype != np.float32:
            raise BadRequest(f"input {spec.name} must be FP32, got {array.dtype}")
        if array.ndim == 0 or array.shape[1:] != spec.dims:
            raise BadRequest(f"input {spec.name} must have shape [n, {', '.join(map(str, spec.dims))}] (one row per "
                             f"image; the artifact's text length and widths), got {list(array.shape)}")
        if n is None:
            n = array.shape[0]
        elif array.shape[0] != n:
            raise BadRequest(f"input {spec.name} has {array.shape[0]} rows and {inputs[0].name} {n}: one row per image")
        if not np.isfinite(array).all():
            raise BadRequest(f"input {spec.name} holds NaN or infinite values")
        if spec.name in (PROMPT_MASK, NEGATIVE_MASK) and not np.isin(array, (0.0, 1.0)).all():
            raise BadRequest(f"input {spec.name} must hold 0 (padding) and 1 (token) only")
        values[spec.name] = torch.from_numpy(np.array(array))
    if n == 0:
        raise BadRequest(f"input {inputs[0].name} is empty: ask for at least one image (one row per image)")
    if n > max_images:
        raise BadRequest(f"the request asks for {n} images, more than the {max_images} one request may hold (the "
                         "model's max_batch_size); split it into several requests")
    if seeds.shape[0] != n:
        raise BadRequest(f"{SEED} has {seeds.shape[0]} rows and {inputs[0].name} {n}: give the seed on every row")
    distinct = np.unique(seeds)
    if distinct.size != 1:
        raise BadRequest(f"{SEED} must be the same on every row of a request (one request = one seed), got "
                         f"{distinct.size} different values; send one request per seed")
    embeds = values[PROMPT_EMBEDS]
    ones = torch.ones(embeds.shape[:2])
    mask = values.get(PROMPT_MASK, ones)
    negative = values.get(NEGATIVE_EMBEDS)
    negative_mask = None if negative is None else values.get(NEGATIVE_MASK, ones)
    text = Text(embeds, mask, negative, negative_mask, values.get(POOLED_EMBEDS), values.get(NEGATIVE_POOLED))
    return TextRequest(text, check_seed(int(distinct[0])))


def join(texts: list[Text]) -> Text:
    """The texts of several requests, one after another (a packed batch)."""
    cat = (lambda field: None if getattr(texts[0], field) is None else torch.cat([getattr(t, field) for t in texts]))
    return Text(cat("embeddings"), cat("mask"), cat("negative_embeddings"), cat("negative_mask"), cat("pooled"),
                cat("negative_pooled"))
