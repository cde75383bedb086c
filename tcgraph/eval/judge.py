"""Which digit a sample was asked for, where a judge can tell: the digits classifier scores the demo
models' samples (16x16 grey digits), asked for by class id (`digits`) or by a prompt that names one
digit (`digits-text`: "a handwritten seven", "the digit 7").

`expected_digits` says what each sample should show, or None where no judge applies (another
image shape, another number of classes, a prompt naming no digit or two); `accuracy` is the share
of samples the classifier reads as the digit they were asked for.
"""
from __future__ import annotations

from typing import Sequence

import torch

from tcgraph.data import DIGITS_SIZE
from tcgraph.eval.classifier import NUM_CLASSES

JUDGE = "digits classifier"  # the judge's name in reports


def digit_of_prompt(prompt: str) -> int | None:
    """The one digit a prompt names, by word or numeral ("a handwritten seven", "the digit 7"); None for none or two."""
    from tcgraph.demos.digits_text import WORDS, split_words

    named = {WORDS.index(w) if w in WORDS else int(w) for w in split_words(prompt)
             if w in WORDS or (w.isdigit() and len(w) == 1)}
    return named.pop() if len(named) == 1 else None


def expected_digits(image_shape: Sequence[int], labels: Sequence[int], *, num_classes: int = 0,
                    prompts: Sequence[str] | None = None) -> list[int] | None:
    """The digit each sample should show, or None where the judge does not apply.

    `image_shape` is one sample's (C, H, W); `labels` are class ids, or prompt indices into
    `prompts` for a text-conditioned model (`num_classes` 0)."""
    if tuple(image_shape) != (1, DIGITS_SIZE, DIGITS_SIZE):
        return None
    if prompts is not None:
        digits = [digit_of_prompt(p) for p in prompts]
        if any(d is None for d in digits):
            return None
        return [digits[i] for i in labels]
    if num_classes != NUM_CLASSES:
        return None
    return [int(c) for c in labels]


def accuracy(samples: torch.Tensor, digits: Sequence[int]) -> float:
    """Share of `samples` (N, 1, 16, 16) in [-1, 1] that the classifier reads as `digits`."""
    from tcgraph.eval.quality import _as_images, _features_and_predictions

    _, predicted = _features_and_predictions(_as_images(samples, "samples"))
    return float((predicted == torch.as_tensor(list(digits), dtype=torch.int64)).float().mean())
