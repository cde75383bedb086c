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

from dataclasses import dataclass
from pathlib import Path

import torch

from tcgraph.errors import TcgraphError, UsageError

# Keys of an embeddings file (safetensors), as diffusers' PixArt pipeline names its arguments.
EMBEDS, MASK = "prompt_embeds", "prompt_attention_mask"
NEG_EMBEDS, NEG_MASK = "negative_prompt_embeds", "negative_prompt_attention_mask"


@dataclass(frozen=True)
class Text:
    """Text conditioning of N images. `negative_*` are None without guidance; with guidance they
    are [N, L, D] and [N, L] (one negative prompt repeated, as pipelines do, or one per image)."""

    embeddings: torch.Tensor  # [N, L, D_text] float
    mask: torch.Tensor  # [N, L] float32, 1 = token, 0 = padding
    negative_embeddings: torch.Tensor | None = None
    negative_mask: torch.Tensor | None = None

    def __post_init__(self) -> None:
        e, m = self.embeddings, self.mask
        if e.dim() != 3 or m.shape != e.shape[:2]:
            raise UsageError(f"text embeddings must be [N, L, D] with a mask [N, L]; got embeddings {list(e.shape)} "
                             f"and mask {list(m.shape)}")
        if (self.negative_embeddings is None) != (self.negative_mask is None):
            raise UsageError("give both the negative embeddings and their mask, or neither")
        if self.negative_embeddings is not None and (self.negative_embeddings.shape != e.shape
                                                     or self.negative_mask.shape != m.shape):
            raise UsageError(f"negative text embeddings {list(self.negative_embeddings.shape)} and mask "
                             f"{list(self.negative_mask.shape)} must have the prompts' shapes {list(e.shape)}, "
                             f"{list(m.shape)}")
        object.__setattr__(self, "mask", m.float())
        if self.negative_mask is not None:
            object.__setattr__(self, "negative_mask", self.negative_mask.float())

    def __len__(self) -> int:
        return self.embeddings.shape[0]

    @property
    def length(self) -> int:
        return self.embeddings.shape[1]

    @property
    def width(self) -> int:
        return self.embeddings.shape[2]

    def take(self, rows) -> "Text":
        """The conditioning of images `rows`: a list or tensor of indices (repeats allowed: a padded
        batch) or a slice."""
        idx = rows if isinstance(rows, slice) else torch.as_tensor(rows, dtype=torch.long)
        pick = (lambda v: None if v is None else v[idx])
        return Text(self.embeddings[idx], self.mask[idx], pick(self.negative_embeddings), pick(self.negative_mask))

    def to(self, device) -> "Text":
        move = (lambda v: None if v is None else v.to(device))
        return Text(self.embeddings.to(device), self.mask.to(device), move(self.negative_embeddings),
                    move(self.negative_mask))

    def model_inputs(self, guided: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(encoder_hidden_states, encoder_attention_mask) of one step: [prompts; negatives] with guidance."""
        if not guided:
            return self.embeddings, self.mask
        if self.negative_embeddings is None:
            raise UsageError("guidance (scale > 1) needs the negative prompt's embeddings: give negative_embeddings "
                             "and negative_mask (an empty prompt's, as pipelines use), or sample with guidance 1")
        return (torch.cat([self.embeddings, self.negative_embeddings]),
                torch.cat([self.mask, self.negative_mask]))

    def check(self, length: int, width: int) -> None:
        """Refuse text of another length or width than the artifact's graphs read."""
        if self.length != length or self.width != width:
            raise UsageError(f"the text embeddings are [N, {self.length}, {self.width}], but this model's graphs read "
                             f"[N, {length}, {width}] (text length {length} is a plan setting): pad or cut the prompts "
                             f"to {length} tokens, or re-run `tcgraph transform --text-length {self.length}`")

    def repeat_to(self, n: int) -> "Text":
        """N copies cycled to n images (one prompt for many images)."""
        return self.take([i % len(self) for i in range(n)])


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
