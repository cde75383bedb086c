"""Text conditioning of a text-conditioned model (PixArt): prompt embeddings, their mask, and the
negative prompt's for guidance. Sampling batches it (`tcgraph.sampling.conditioning`); a model's own
prompt encoder (the digits-text demo's) makes it."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from tcgraph.errors import UsageError


@dataclass(frozen=True)
class Text:
    """Text conditioning of N images. `negative_*` are None without guidance; with guidance they
    are [N, L, D] and [N, L] (one negative prompt repeated, as pipelines do, or one per image).

    `pooled` [N, P] (and `negative_pooled`): the pooled text embeddings of a model that reads them in
    place of the mask (FLUX, SD3: `pooled_projections`); the model then reads (embeddings, pooled),
    and the mask, which such a model does not read, is all ones."""

    embeddings: torch.Tensor  # [N, L, D_text] float
    mask: torch.Tensor  # [N, L] float32, 1 = token, 0 = padding
    negative_embeddings: torch.Tensor | None = None
    negative_mask: torch.Tensor | None = None
    pooled: torch.Tensor | None = None  # [N, P] float
    negative_pooled: torch.Tensor | None = None

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
        if self.pooled is not None and (self.pooled.dim() != 2 or self.pooled.shape[0] != e.shape[0]
                                        or (self.negative_embeddings is None) != (self.negative_pooled is None)
                                        or (self.negative_pooled is not None
                                            and self.negative_pooled.shape != self.pooled.shape)):
            raise UsageError(f"pooled text embeddings must be [N, P] for the N = {e.shape[0]} prompts (and as many "
                             "negative ones where negative embeddings are given)")
        if self.pooled is None and self.negative_pooled is not None:
            raise UsageError("negative pooled embeddings were given without pooled embeddings of the prompts")
        object.__setattr__(self, "mask", m.float())
        if self.negative_mask is not None:
            object.__setattr__(self, "negative_mask", self.negative_mask.float())

    def __len__(self) -> int:
        return self.embeddings.shape[0]

    def checked(self) -> "Text":
        """This text, after checking its values where they enter tcgraph (an embeddings file, a caller's
        Text): at least one prompt, finite embeddings, a 0/1 mask. Once per call, not per batch: the
        sampling loop's `take` and `to` build Texts of values already checked."""
        _check_values(self.embeddings, self.mask, "")
        if self.negative_embeddings is not None:
            _check_values(self.negative_embeddings, self.negative_mask, "negative ")
        return self

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
        return Text(self.embeddings[idx], self.mask[idx], pick(self.negative_embeddings), pick(self.negative_mask),
                    pick(self.pooled), pick(self.negative_pooled))

    def to(self, device) -> "Text":
        move = (lambda v: None if v is None else v.to(device))
        return Text(self.embeddings.to(device), self.mask.to(device), move(self.negative_embeddings),
                    move(self.negative_mask), move(self.pooled), move(self.negative_pooled))

    def model_inputs(self, guided: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(encoder_hidden_states, encoder_attention_mask) of one step, or (encoder_hidden_states,
        pooled_projections) with pooled embeddings: [prompts; negatives] with guidance."""
        second, negative = (self.mask, self.negative_mask) if self.pooled is None else (self.pooled, self.negative_pooled)
        if not guided:
            return self.embeddings, second
        if self.negative_embeddings is None:
            raise UsageError("guidance (scale > 1) needs the negative prompt's embeddings: give negative_embeddings "
                             "and negative_mask (an empty prompt's, as pipelines use), or sample with guidance 1")
        return torch.cat([self.embeddings, self.negative_embeddings]), torch.cat([second, negative])

    def check(self, length: int, width: int, pooled: int = 0) -> None:
        """Refuse text of another width (another text encoder) or length than the artifact's graphs read,
        and pooled embeddings where the model reads none, or of another width (`pooled`: 0 for none)."""
        have = 0 if self.pooled is None else self.pooled.shape[1]
        if have != pooled:
            what = (f"the pooled text embeddings are [N, {have}], but" if have else "no pooled text embeddings were "
                    "given, but") if pooled else "pooled text embeddings were given, but"
            raise UsageError(f"{what} this model reads {f'[N, {pooled}] (pooled_projections)' if pooled else 'none'}: "
                             "embed the prompts with the encoders of the model's own pipeline")
        if self.width != width:
            raise UsageError(f"the text embeddings are [N, {self.length}, {self.width}]: {self.width} values per token, "
                             f"but this model reads text of width {width} (its text encoder's): embed the prompts "
                             "with the encoder of the model's own pipeline")
        if self.length != length:
            raise UsageError(f"the text embeddings are [N, {self.length}, {self.width}], but this model's graphs read "
                             f"[N, {length}, {width}] (text length {length} is a plan setting): pad or cut the prompts "
                             f"to {length} tokens, or re-run `tcgraph transform --text-length {self.length}`")

    def repeat_to(self, n: int) -> "Text":
        """N copies cycled to n images (one prompt for many images)."""
        return self.take([i % len(self) for i in range(n)])


def _check_values(embeddings: torch.Tensor, mask: torch.Tensor, which: str) -> None:
    """`Text.checked` of one pair of embeddings and mask."""
    if embeddings.shape[0] == 0:
        raise UsageError(f"the {which}text embeddings hold 0 prompts ([0, {embeddings.shape[1]}, {embeddings.shape[2]}]): "
                         "give at least one prompt")
    if not embeddings.is_floating_point():
        raise UsageError(f"the {which}text embeddings are {str(embeddings.dtype).removeprefix('torch.')}, not floats")
    bad = ~torch.isfinite(embeddings).flatten(1).all(dim=1)
    if bad.any():
        rows = bad.nonzero().flatten().tolist()
        raise UsageError(f"the {which}text embeddings of {len(rows)} of {len(bad)} prompts (rows {rows[:5]}) hold NaN "
                         "or infinite values; every sample from them would be NaN: embed those prompts again")
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise UsageError(f"the {which}text mask must hold 1 (a token) or 0 (padding) only; it holds other values "
                         f"(e.g. {mask[(mask != 0) & (mask != 1)].flatten()[0].item()!r})")
