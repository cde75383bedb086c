"""The text-conditioned demo model "digits-text": a small PixArt on scikit-learn's digits, with a
small text encoder that stands in for T5.

    transformer, encoder = load_digits_text()
    text = encoder.encode([prompt_for(7), "the digit 3"])     # Text, with the empty prompt as negative
    eps = transformer(x, t, *text.model_inputs(guided=False))

Both are trained together here by `scripts/train_text_demo.py` (nothing is downloaded); the
folder `tcgraph/models/weights/digits_text/` holds
- `transformer/`: diffusers' `PixArtTransformer2DModel` as `save_pretrained` writes it
  (config.json + diffusion_pytorch_model.safetensors), loaded as a `DiffusersPixArt`;
- `text_encoder/`: the `PromptEncoder`'s `config.json` (vocabulary, length, widths) and
  `prompt_encoder.safetensors`.

`PromptEncoder` plays T5's part for a 30-word vocabulary (`tcgraph.demos.vocabulary`, without
torch): a tokenizer that splits a prompt on whitespace and punctuation (lower-cased), maps each
word to its id ("<unk>" for any word not in the vocabulary; `encode` warns about those), always
appends the end token "</s>" (so the empty prompt, guidance's negative, is one token, as with T5)
and pads to the text length (8) with "<pad>" (mask 0);
then an embedding table and a small per-token residual MLP give [N, L, 32] embeddings.

diffusers is imported only where the transformer is built or loaded.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn

from tcgraph.demos.vocabulary import (END, PAD, PROMPTS, TEMPLATES, UNK, VOCABULARY, WORDS,  # noqa: F401
                                      UnknownWordsWarning, split_words, unknown_words, unknown_words_message)
from tcgraph.errors import TcgraphError, UsageError
from tcgraph.text.embeddings import Text

NAME = "digits-text"
MAKE_WEIGHTS = "python scripts/train_text_demo.py"
LENGTH = 8  # text tokens the model reads (the plan's text_length)
CAPTION = 32  # width of the text embeddings (the transformer's caption_channels)
MLP_HIDDEN = 64  # hidden width of the encoder's per-token MLP
TRANSFORMER_DIR, ENCODER_DIR = "transformer", "text_encoder"
ENCODER_CONFIG, ENCODER_WEIGHTS = "config.json", "prompt_encoder.safetensors"


def prompt_for(digit: int, template: int = 0) -> str:
    """Prompt number `template` (0 .. len(TEMPLATES) - 1) for `digit` (0..9): 0 gives "a handwritten seven"."""
    if isinstance(digit, bool) or not isinstance(digit, int) or not 0 <= digit <= 9:
        raise UsageError(f"digit must be an int in 0..9, got {digit!r}")
    if isinstance(template, bool) or not isinstance(template, int) or not 0 <= template < len(TEMPLATES):
        raise UsageError(f"template must be an int in 0..{len(TEMPLATES) - 1}, got {template!r}")
    return PROMPTS[digit][template]


class PromptEncoder(nn.Module):
    """Prompts -> (embeddings [N, L, width], mask [N, L]): a tokenizer over a fixed vocabulary,
    an embedding table and a per-token residual MLP. `encode` gives a `Text` for sampling."""

    def __init__(self, vocabulary: Sequence[str] = VOCABULARY, length: int = LENGTH, width: int = CAPTION,
                 hidden: int = MLP_HIDDEN):
        super().__init__()
        vocabulary = tuple(vocabulary)
        for token in (PAD, END, UNK):
            if token not in vocabulary:
                raise TcgraphError(f"the prompt encoder's vocabulary must hold {token!r}")
        if len(set(vocabulary)) != len(vocabulary):
            raise TcgraphError("the prompt encoder's vocabulary has repeated words")
        self.vocabulary, self.length, self.width, self.hidden = vocabulary, int(length), int(width), int(hidden)
        self.ids = {w: i for i, w in enumerate(vocabulary)}
        self.embedding = nn.Embedding(len(vocabulary), width)  # std 1 init
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))

    def tokenize(self, prompts: Sequence[str] | str, length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids [N, L] int64, mask [N, L] float32): each prompt's words, then "</s>", padded to `length`
        (the encoder's own, 8, when None); a prompt of more tokens than that is refused."""
        prompts = _as_prompts(prompts)
        length = self.length if length is None else length
        if isinstance(length, bool) or not isinstance(length, int) or length < 1:
            raise UsageError(f"length must be a positive int, got {length!r}")
        unk, end, pad = self.ids[UNK], self.ids[END], self.ids[PAD]
        ids = torch.full((len(prompts), length), pad, dtype=torch.int64)
        mask = torch.zeros(len(prompts), length, dtype=torch.float32)
        for row, prompt in enumerate(prompts):
            tokens = [self.ids.get(w, unk) for w in split_words(prompt)] + [end]
            if len(tokens) > length:
                raise UsageError(f"the prompt {prompt!r} is {len(tokens)} tokens long with the end token {END}; "
                                 f"the {NAME} text encoder reads at most {length} (text length {length}): "
                                 f"use at most {length - 1} words")
            ids[row, :len(tokens)] = torch.tensor(tokens)
            mask[row, :len(tokens)] = 1.0
        return ids, mask

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Embeddings [N, L, width] of token ids; padding rows are zero."""
        e = self.embedding(ids)
        return (e + self.mlp(e)) * mask[..., None].to(e.dtype)

    def unknown_words(self, prompts: Sequence[str] | str) -> list[str]:
        """The words of `prompts` outside this encoder's vocabulary (each reads as "<unk>"), each once."""
        return unknown_words(_as_prompts(prompts), self.vocabulary)

    @torch.no_grad()
    def encode(self, prompts: Sequence[str] | str, negative: str | None = "", length: int | None = None,
               warn: bool = True) -> Text:
        """The `Text` of `prompts` (one image each), with `negative` (default the empty prompt) repeated for
        every prompt as guidance's unconditional half; `negative=None` leaves it out (guidance 1 only).
        Words outside the vocabulary, in the prompts or the negative prompt, are warned about (one
        `UnknownWordsWarning` naming them and the vocabulary) unless `warn` is False."""
        prompts = _as_prompts(prompts)
        if not prompts:
            raise UsageError("no prompts: give at least one")
        unknown = self.unknown_words(prompts + ([negative] if isinstance(negative, str) else []))
        if warn and unknown:
            warnings.warn(UnknownWordsWarning(unknown_words_message(unknown, self.vocabulary), unknown),
                          stacklevel=3)  # the caller, past torch.no_grad's wrapper
        ids, mask = self.tokenize(prompts, length)
        emb = self(ids, mask)
        if negative is None:
            return Text(emb, mask)
        if not isinstance(negative, str):
            raise UsageError(f"the negative prompt must be a string or None, got {type(negative).__name__}")
        nid, nmask = self.tokenize([negative] * len(prompts), length)
        return Text(emb, mask, self(nid, nmask), nmask)

    def config_dict(self) -> dict:
        return {"_class_name": "PromptEncoder", "vocabulary": list(self.vocabulary), "length": self.length,
                "width": self.width, "hidden": self.hidden}

    def save(self, folder: str | Path) -> Path:
        """Write `config.json` and `prompt_encoder.safetensors` into `folder` (created)."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / ENCODER_CONFIG).write_text(json.dumps(self.config_dict(), indent=2) + "\n")
        state = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(folder / ENCODER_WEIGHTS))
        (folder / ENCODER_WEIGHTS).chmod(0o644)  # safetensors writes 0600; the file ships in the package
        return folder

    @classmethod
    def from_folder(cls, folder: str | Path) -> "PromptEncoder":
        """The encoder `save` wrote into `folder`, in eval mode."""
        from safetensors.torch import load_file

        folder = Path(folder)
        try:
            raw = json.loads((folder / ENCODER_CONFIG).read_text())
            enc = cls(raw["vocabulary"], raw["length"], raw["width"], raw["hidden"])
            enc.load_state_dict(load_file(str(folder / ENCODER_WEIGHTS)))
        except TcgraphError:
            raise
        except Exception as e:  # json, KeyError, safetensors' own errors, load_state_dict's RuntimeError
            raise TcgraphError(f"cannot read the prompt encoder in {folder}: {type(e).__name__}: {e}; train it again "
                               f"with `{MAKE_WEIGHTS}`") from None
        return enc.eval()


def _as_prompts(prompts) -> list[str]:
    if isinstance(prompts, str):
        return [prompts]
    prompts = list(prompts)
    bad = [p for p in prompts if not isinstance(p, str)]
    if bad:
        raise UsageError(f"prompts must be strings, got a {type(bad[0]).__name__}")
    return prompts


# ---- the shipped folder --------------------------------------------------------------------

def weights_dir() -> Path:
    """The digits-text folder (`tcgraph.models.PRETRAINED["digits-text"]`)."""
    from tcgraph.models import PRETRAINED

    return PRETRAINED[NAME][0]


def _check_folder(folder: Path) -> None:
    need = [folder / TRANSFORMER_DIR / "config.json", folder / ENCODER_DIR / ENCODER_CONFIG,
            folder / ENCODER_DIR / ENCODER_WEIGHTS]
    missing = [p for p in need if not p.is_file()]
    if missing:
        raise TcgraphError(f"the pretrained model {NAME!r} has no weights yet: {missing[0]} is missing; create them "
                           f"with `{MAKE_WEIGHTS}`")


def load_transformer(folder: str | Path | None = None):
    """The digits-text transformer, a `DiffusersPixArt` in eval mode (needs diffusers)."""
    from tcgraph.models.diffusers.folder import read_folder

    folder = weights_dir() if folder is None else Path(folder)
    _check_folder(folder)
    from tcgraph.models.diffusers.pixart import load_diffusers_pixart

    return load_diffusers_pixart(read_folder(folder / TRANSFORMER_DIR))


def load_prompt_encoder(folder: str | Path | None = None) -> PromptEncoder:
    """The digits-text `PromptEncoder`, in eval mode (no diffusers needed)."""
    folder = weights_dir() if folder is None else Path(folder)
    _check_folder(folder)
    return PromptEncoder.from_folder(folder / ENCODER_DIR)


def load_digits_text(folder: str | Path | None = None):
    """(transformer: DiffusersPixArt, encoder: PromptEncoder), both in eval mode."""
    return load_transformer(folder), load_prompt_encoder(folder)


def calibration_prompts(encoder: PromptEncoder) -> Text:
    """The prompts learned planners calibrate the demo on: every template of every digit, digits
    cycling fastest (so that any first n cover the digits evenly), the empty prompt as negative."""
    prompts = [PROMPTS[d][template] for template in range(len(TEMPLATES)) for d in range(10)]
    return encoder.encode(prompts, negative="", warn=False)  # "image" is unknown on purpose


__all__ = ["LENGTH", "CAPTION", "NAME", "PROMPTS", "TEMPLATES", "VOCABULARY", "PromptEncoder", "UnknownWordsWarning",
           "load_digits_text", "load_prompt_encoder", "load_transformer", "calibration_prompts",
           "prompt_for", "split_words", "unknown_words"]
