"""A diffusers pipeline folder's own text encoder, for `tcgraph sample ART --prompt "…"`.

PixArt's pipelines (PixArtAlphaPipeline, PixArtSigmaPipeline) embed a prompt with a T5
encoder: the tokenizer pads it to `max_sequence_length` tokens (the artifact's text length),
the encoder's last hidden state is the embedding, the tokenizer's attention mask the mask,
and guidance's unconditional half is the negative prompt ("" by default) embedded alike. That
is what `PipelineTextEncoder.encode` does, from the folder's `text_encoder/` and `tokenizer/`,
with the classes its `model_index.json` names (transformers'). Prompts are lowercased and
stripped, as the pipelines do with `clean_caption=False` (their caption cleaning needs bs4 and
ftfy, and without them they skip it too). Weights are read with safetensors only; nothing is
downloaded. `tests/test_pixart_pipeline.py` checks the embeddings against the pipeline's own
`encode_prompt` on a tiny T5 and tokenizer made there.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch

from tcgraph.errors import TcgraphError, UsageError
from tcgraph.models.text import Text

INDEX = "model_index.json"
PARTS = ("text_encoder", "tokenizer")


class PipelineTextEncoder:
    """The tokenizer and text encoder of a pipeline folder; `encode` as PromptEncoder's."""

    def __init__(self, folder: str | Path):
        folder = Path(folder)
        index = json.loads((folder / INDEX).read_text())
        try:
            import transformers
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise TcgraphError(f"the pipeline's text encoder needs the transformers package ({e}); install it with "
                               "`pip install transformers`, or pass the prompts as an embeddings file (--embeddings)"
                               ) from None
        loaded = {}
        for part in PARTS:
            entry = index.get(part)
            name = entry[1] if isinstance(entry, list) and len(entry) == 2 else None
            cls = getattr(transformers, name, None) if isinstance(name, str) else None
            if cls is None:
                raise TcgraphError(f"{folder / INDEX} names {part} {entry!r}, not a transformers class; pass the "
                                   "prompts as an embeddings file (--embeddings)")
            kwargs = {"use_safetensors": True} if part == "text_encoder" else {}
            try:
                loaded[part] = cls.from_pretrained(str(folder / part), local_files_only=True, **kwargs)
            except (OSError, ValueError, EnvironmentError) as e:
                raise TcgraphError(f"cannot load the pipeline's {part} from {folder / part} ({type(e).__name__}: "
                                   f"{str(e).splitlines()[0] if str(e) else ''}); tcgraph reads safetensors weights "
                                   "only: save it with save_pretrained(..., safe_serialization=True), or pass the "
                                   "prompts as an embeddings file (--embeddings)") from None
        self.tokenizer, self.text_encoder = loaded["tokenizer"], loaded["text_encoder"].eval()

    def embed(self, prompts: Sequence[str], length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(embeddings [N, length, width] float32, mask [N, length] float32) of `prompts`."""
        tokens = self.tokenizer([p.lower().strip() for p in prompts], padding="max_length", max_length=length,
                                truncation=True, add_special_tokens=True, return_tensors="pt")
        with torch.no_grad():
            out = self.text_encoder(tokens.input_ids, attention_mask=tokens.attention_mask)[0]
        return out.float(), tokens.attention_mask.float()

    def encode(self, prompts: Sequence[str], negative: str | None = "", length: int | None = None) -> Text:
        """The `Text` of `prompts` (one image each) at `length` tokens, with `negative` embedded for each
        as guidance's unconditional half (None: no negative, guidance 1 only)."""
        if not length or length < 1:
            raise UsageError("the pipeline's text encoder needs the artifact's text length")
        prompts = list(prompts)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise UsageError("prompts (--prompt) must be a non-empty list of strings")
        embeddings, mask = self.embed(prompts, length)
        if negative is None:
            return Text(embeddings, mask)
        neg, neg_mask = self.embed([negative] * len(prompts), length)
        return Text(embeddings, mask, neg, neg_mask)


def pipeline_text_encoder_for(source: str | Path | None) -> PipelineTextEncoder | None:
    """The text encoder of the pipeline folder `source` (or of the pipeline whose `transformer/` it is),
    where that folder has a `model_index.json`, `text_encoder/` and `tokenizer/`; else None."""
    if not isinstance(source, (str, Path)) or not str(source):
        return None
    path = Path(source)
    for folder in (path, path.parent):
        if (folder / INDEX).is_file() and all((folder / part).is_dir() for part in PARTS):
            return PipelineTextEncoder(folder)
    return None
