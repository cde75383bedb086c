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

from pathlib import Path

import torch

from tcgraph.errors import TcgraphError, UsageError
from tcgraph.models.text import Text  # noqa: F401  (re-exported: the sampler's conditioning)

# Keys of an embeddings file (safetensors), as diffusers' PixArt pipeline names its arguments.
EMBEDS, MASK = "prompt_embeds", "prompt_attention_mask"
NEG_EMBEDS, NEG_MASK = "negative_prompt_embeds", "negative_prompt_attention_mask"


def load_text(path: str | Path) -> Text:
    """Prompt embeddings from a safetensors file with `prompt_embeds` [N, L, D] and `prompt_attention_mask`
    [N, L] (and optionally `negative_prompt_embeds`, `negative_prompt_attention_mask`; a single negative row
    is repeated for every prompt)."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise UsageError(f"no embeddings file at {path}; write one with safetensors.torch.save_file holding "
                         f"{EMBEDS} [N, L, D] and {MASK} [N, L] (and {NEG_EMBEDS}, {NEG_MASK} for guidance)")
    try:
        d = load_file(str(path))
    except Exception as e:  # safetensors raises its own error types
        raise TcgraphError(f"cannot read the embeddings file {path}: {type(e).__name__}: {e}; write it with "
                           "safetensors.torch.save_file") from None
    missing = [k for k in (EMBEDS, MASK) if k not in d]
    if missing:
        raise UsageError(f"the embeddings file {path} lacks {', '.join(missing)}; it holds {sorted(d)}: it needs "
                         f"{EMBEDS} [N, L, D] and {MASK} [N, L]")
    e, m = d[EMBEDS].float(), d[MASK]
    ne, nm = d.get(NEG_EMBEDS), d.get(NEG_MASK)
    if ne is not None and nm is not None and ne.shape[0] == 1 and e.shape[0] > 1:
        ne, nm = ne.expand(e.shape[0], *ne.shape[1:]), nm.expand(e.shape[0], *nm.shape[1:])
    return Text(e, m, None if ne is None else ne.float(), nm)


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
