"""The CLIP + T5 text encoders of a FLUX or SD3 pipeline folder, for `tcgraph sample ART --prompt "…"`.

The MMDiT models read a text sequence and a pooled embedding (`pooled_projections`) and no mask, so
`encode` returns a `Text` with `pooled` (and a mask of ones). Each encoder does what its pipeline's
`encode_prompt` does (diffusers 0.42), from the folders its `model_index.json` names:

- FluxPipeline: the CLIP `text_encoder`'s `pooler_output` of the prompt padded to the CLIP tokenizer's
  `model_max_length` is the pooled embedding; the T5 `text_encoder_2`'s last hidden state of the prompt
  padded to the artifact's text length is the sequence. No negative prompt: FLUX.1-dev takes guidance
  as an input, FLUX.1-schnell none.
- StableDiffusion3Pipeline: CLIP-L `text_encoder` and CLIP-G `text_encoder_2` (with projection) each give
  their penultimate hidden state and their projected pooled output; the hidden states, concatenated on
  the width and zero-padded to T5's width, come first in the sequence, then the T5 `text_encoder_3`'s
  tokens (text length − the CLIP length of them). The pooled embedding is both CLIPs' concatenated. A
  pipeline saved without T5 has zeros in its place, as wide as the model's text (`width`). The
  negative prompt ("" by default) is embedded alike for guidance.

Prompts are not lowercased or cleaned (neither pipeline does). Weights are read with safetensors only,
nothing is downloaded, and no path a folder's files name may leave the folder (`check_paths`).
`tests/test_mmdit_prompts.py` checks the embeddings against the pipelines' own `encode_prompt`.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from tcgraph.errors import TcgraphError, UsageError
from tcgraph.models.diffusers.folder import read_json
from tcgraph.text.embeddings import Text
from tcgraph.text.cut import warn_if_cut
from tcgraph.text.pipeline import INDEX, LONGER, check_paths, load_parts

TOKENIZER = "PreTrainedTokenizerBase"


class MMDiTTextEncoder:
    """A pipeline folder's CLIP and T5 encoders (`PARTS`: folder -> transformers class; `OPTIONAL`: parts a
    pipeline may save as null). `encode` as PromptEncoder's, with the model's text `width` for a
    pipeline whose T5 is missing; `embed` is the pipeline's own."""

    PIPELINE = ""
    PARTS: dict[str, str] = {}
    OPTIONAL: tuple[str, ...] = ()

    def __init__(self, folder: str | Path):
        folder = Path(folder)
        index = read_json(folder / INDEX, "the pipeline index")
        if index.get("_class_name") != self.PIPELINE:
            raise TcgraphError(f"{folder / INDEX} is a {index.get('_class_name')!r} pipeline, not a {self.PIPELINE}")
        parts = {part: cls for part, cls in self.PARTS.items()
                 if part not in self.OPTIONAL or index.get(part) not in (None, [None, None])}
        check_paths(folder, index, tuple(p for p in parts if p.startswith("text_encoder")),
                    tuple(p for p in parts if p.startswith("tokenizer")))
        self.folder = folder
        self.parts = load_parts(folder, index, parts, f" ({self.PIPELINE}'s)")

    def embed(self, prompts: list[str], length: int, width: int | None,
              negative: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(sequence [N, length, D], pooled [N, P]) of `prompts`, as the pipeline's encode_prompt
        (`negative`: they are the negative prompt, for the warning of a prompt cut short)."""
        raise NotImplementedError

    def clip_tokens(self, tokenizer, prompts: list[str], negative: bool = False) -> torch.Tensor:
        """The CLIP token ids of `prompts`, padded and cut to the first CLIP tokenizer's length (the
        pipelines' `tokenizer_max_length`, which both SD3 CLIPs use)."""
        length = self.parts["tokenizer"].model_max_length
        warn_if_cut(tokenizer, prompts, length, "CLIP", negative=negative)
        return tokenizer(prompts, padding="max_length", max_length=length, truncation=True, return_tensors="pt").input_ids

    def encode(self, prompts: Sequence[str], negative: str | None = "", length: int | None = None,
               width: int | None = None) -> Text:
        """The `Text` of `prompts` (one image each) at `length` tokens with their pooled embeddings, and
        `negative` embedded alike for each as guidance's unconditional half (None: no negative)."""
        if not length or length < 1:
            raise UsageError("the pipeline's text encoders need the artifact's text length")
        prompts = list(prompts)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise UsageError("prompts (--prompt) must be a non-empty list of strings")
        with torch.no_grad():
            sequence, pooled = self.embed(prompts, length, width)
            if negative is None:
                return Text(sequence, torch.ones(sequence.shape[:2]), pooled=pooled)
            neg, neg_pooled = self.embed([negative] * len(prompts), length, width, negative=True)
        ones = torch.ones(sequence.shape[:2])
        return Text(sequence, ones, neg, ones, pooled, neg_pooled)


class FluxTextEncoder(MMDiTTextEncoder):
    """FluxPipeline's CLIP (pooled) and T5 (sequence) encoders."""

    PIPELINE = "FluxPipeline"
    PARTS = {"text_encoder": "CLIPTextModel", "tokenizer": TOKENIZER, "text_encoder_2": "T5EncoderModel",
             "tokenizer_2": TOKENIZER}

    def embed(self, prompts: list[str], length: int, width: int | None,
              negative: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        p = self.parts
        pooled = p["text_encoder"](self.clip_tokens(p["tokenizer"], prompts, negative), output_hidden_states=False).pooler_output
        warn_if_cut(p["tokenizer_2"], prompts, length, "T5", LONGER, negative)
        ids = p["tokenizer_2"](prompts, padding="max_length", max_length=length, truncation=True,
                               return_tensors="pt").input_ids
        return p["text_encoder_2"](ids, output_hidden_states=False)[0].float(), pooled.float()


class SD3TextEncoder(MMDiTTextEncoder):
    """StableDiffusion3Pipeline's CLIP-L, CLIP-G and (optional) T5 encoders."""

    PIPELINE = "StableDiffusion3Pipeline"
    PARTS = {"text_encoder": "CLIPTextModelWithProjection", "tokenizer": TOKENIZER,
             "text_encoder_2": "CLIPTextModelWithProjection", "tokenizer_2": TOKENIZER,
             "text_encoder_3": "T5EncoderModel", "tokenizer_3": TOKENIZER}
    OPTIONAL = ("text_encoder_3", "tokenizer_3")

    def embed(self, prompts: list[str], length: int, width: int | None,
              negative: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        p = self.parts
        clip_length = p["tokenizer"].model_max_length
        if length <= clip_length:
            raise UsageError(f"SD3's text is {clip_length} CLIP tokens, then T5's: the artifact's text length {length} "
                             f"leaves no T5 tokens; transform with --text-length {clip_length} + the T5 length "
                             f"(e.g. {clip_length + 256})")
        hidden, pooled = [], []
        for n in ("", "_2"):
            out = p["text_encoder" + n](self.clip_tokens(p["tokenizer" + n], prompts, negative), output_hidden_states=True)
            pooled.append(out[0].float())
            hidden.append(out.hidden_states[-2].float())
        if "text_encoder_3" in p:
            warn_if_cut(p["tokenizer_3"], prompts, length - clip_length, "T5", LONGER, negative)
            ids = p["tokenizer_3"](prompts, padding="max_length", max_length=length - clip_length, truncation=True,
                                   add_special_tokens=True, return_tensors="pt").input_ids
            t5 = p["text_encoder_3"](ids)[0].float()
        elif width:
            t5 = torch.zeros(len(prompts), length - clip_length, width)
        else:
            raise UsageError("an SD3 pipeline without T5 pads the text with zeros as wide as the model's text: "
                             "give the width")
        clip = torch.cat(hidden, dim=-1)
        clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))  # as the pipeline (width 4096)
        return torch.cat([clip, t5], dim=-2), torch.cat(pooled, dim=-1)


MMDIT_ENCODERS = {cls.PIPELINE: cls for cls in (FluxTextEncoder, SD3TextEncoder)}
