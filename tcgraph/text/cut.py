"""A warning when a prompt is longer than the tokens an encoder reads: the rest is cut, as the
pipelines cut it (they log it; tcgraph warns, one line on the command line)."""
from __future__ import annotations

import warnings
from collections.abc import Sequence


class PromptCutWarning(UserWarning):
    """Prompts longer than the tokens an encoder reads; `prompts` holds their 1-based numbers."""

    def __init__(self, message: str, prompts: Sequence[int] = ()):
        super().__init__(message)
        self.prompts = tuple(prompts)


def warn_if_cut(tokenizer, prompts: Sequence[str], length: int, encoder: str, remedy: str = "",
                negative: bool = False) -> None:
    """Warn, once for all `prompts`, about those whose `tokenizer` ids (special tokens included, as
    the pipelines count them) are more than `length`; `encoder` names the tokens ("T5", "CLIP").
    `negative`: the prompts are the negative prompt repeated, said once as "the negative prompt"."""
    prompts = list(prompts)[:1] if negative else list(prompts)
    counts = [len(ids) for ids in tokenizer(prompts, add_special_tokens=True).input_ids]
    cut = [(i + 1, n) for i, n in enumerate(counts) if n > length]
    if not cut:
        return
    name = (lambda i: "the negative prompt") if negative else (lambda i: f"prompt {i}")
    which = ", ".join(f"{name(i)} ({n} tokens)" for i, n in cut[:5]) + (f" and {len(cut) - 5} more" if len(cut) > 5 else "")
    warnings.warn(PromptCutWarning(f"{which}: longer than the {length} {encoder} tokens the model reads; the rest "
                                   f"is cut{remedy}", [i for i, _ in cut]), stacklevel=3)
