"""A diffusers pipeline folder's own text encoder, for `tcgraph sample ART --prompt "…"`.

PixArt's pipelines (PixArtAlphaPipeline, PixArtSigmaPipeline) embed a prompt with a T5
encoder: the tokenizer pads it to `max_sequence_length` tokens (the artifact's text length),
the encoder's last hidden state is the embedding, the tokenizer's attention mask the mask,
and guidance's unconditional half is the negative prompt ("" by default) embedded alike. That
is what `PipelineTextEncoder.encode` does, from the folder's `text_encoder/` and `tokenizer/`,
with the classes its `model_index.json` names (transformers'). Prompts are lowercased and
stripped, as the pipelines do with `clean_caption=False` (their caption cleaning needs bs4 and
ftfy, and without them they skip it too). Weights are read with safetensors only; nothing is
downloaded, and no path that the folder's files name may leave the folder (`check_paths`: the
text encoder's shard index, the tokenizer's file entries). `tests/test_pixart_prompts.py` checks the
embeddings against the pipeline's own `encode_prompt` on a tiny T5 and tokenizer made there.

`load_parts` and `check_paths` serve FLUX's and SD3's CLIP + T5 encoders too (`tcgraph.text.mmdit`);
`tcgraph.text.encoders.pipeline_text_encoder_for` picks the encoder by the folder's `model_index.json` `_class_name`.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from tcgraph.errors import TcgraphError, UsageError
from tcgraph.models.diffusers.folder import check_pipeline_index, inside, read_json
from tcgraph.text.cut import warn_if_cut
from tcgraph.text.embeddings import Text

INDEX = "model_index.json"
LONGER = " (transform with a larger --text-length to keep it)"
PARTS = ("text_encoder", "tokenizer")
PIXART_PIPELINES = ("PixArtAlphaPipeline", "PixArtSigmaPipeline")
# tokenizer_config.json entries that a tokenizer class opens as files (transformers before 4.57 took
# them over the folder's own files); special_tokens_map_file is not opened, and old configs hold stale
# absolute paths there
TOKENIZER_FILE_KEYS = ("vocab_file", "merges_file", "tokenizer_file", "spm_file", "added_tokens_file",
                       "chat_template_file", "fast_tokenizer_files")


class PipelineTextEncoder:
    """The tokenizer and text encoder of a pipeline folder; `encode` as PromptEncoder's."""

    def __init__(self, folder: str | Path):
        folder = Path(folder)
        index = read_json(folder / INDEX, "the pipeline index")
        check_paths(folder, index)
        loaded = load_parts(folder, index, {"text_encoder": "PreTrainedModel", "tokenizer": "PreTrainedTokenizerBase"},
                            " (such as T5EncoderModel, T5Tokenizer)")
        self.tokenizer, self.text_encoder = loaded["tokenizer"], loaded["text_encoder"]

    def embed(self, prompts: Sequence[str], length: int, negative: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(embeddings [N, length, width] float32, mask [N, length] float32) of `prompts`."""
        prompts = [p.lower().strip() for p in prompts]
        warn_if_cut(self.tokenizer, prompts, length, "T5", LONGER, negative)
        tokens = self.tokenizer(prompts, padding="max_length", max_length=length,
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
        neg, neg_mask = self.embed([negative] * len(prompts), length, negative=True)
        return Text(embeddings, mask, neg, neg_mask)


def load_parts(folder: Path, index: dict, wanted: dict[str, str], hint: str = "") -> dict:
    """The transformers parts `wanted` (folder name -> the transformers class, or base class, that its
    model_index.json entry must name) of the pipeline `folder`, every class checked before anything is
    read; models in eval mode, read with safetensors only and nothing downloaded. One TcgraphError names
    the part and what it should be (`hint` adds examples) or why it cannot be read."""
    try:
        import transformers
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise TcgraphError(f"the pipeline's text encoder needs the transformers package ({e}); install it with "
                           "`pip install transformers`, or pass the prompts as an embeddings file (--embeddings)"
                           ) from None
    classes, loaded = {}, {}
    for part, required in wanted.items():
        entry = index.get(part)
        name = entry[1] if isinstance(entry, list) and len(entry) == 2 else None
        cls = getattr(transformers, name, None) if isinstance(name, str) else None
        base = getattr(transformers, required)
        if not (isinstance(cls, type) and issubclass(cls, base)):
            raise TcgraphError(f"{folder / INDEX} names {part} {entry!r}, not a transformers {required} class{hint}; "
                               "pass the prompts as an embeddings file (--embeddings)")
        classes[part] = cls
    for part, cls in classes.items():
        model = issubclass(cls, transformers.PreTrainedModel)
        try:
            loaded[part] = cls.from_pretrained(str(folder / part), local_files_only=True,
                                               **({"use_safetensors": True} if model else {}))
        except Exception as e:  # noqa: BLE001 - transformers raises many types on damaged folders
            raise TcgraphError(f"cannot load the pipeline's {part} from {folder / part} ({type(e).__name__}: "
                               f"{str(e).splitlines()[0] if str(e) else ''}); tcgraph reads safetensors weights "
                               "only: save it with save_pretrained(..., safe_serialization=True), or pass the "
                               "prompts as an embeddings file (--embeddings)") from None
        if model:
            loaded[part].eval()
    return loaded


def check_paths(folder: Path, index: dict, encoders: tuple[str, ...] = ("text_encoder",),
                tokenizers: tuple[str, ...] = ("tokenizer",)) -> None:
    """Refuse (TcgraphError naming the file and entry) a pipeline whose model_index.json, text encoders'
    shard indexes or tokenizer configs (the folders `encoders`, `tokenizers`) name a path outside its
    folder (`..`, absolute, a symlink out)."""
    check_pipeline_index(folder, index)
    for part in (*encoders, *tokenizers):
        if (folder / part).exists():
            inside(folder, part, folder / INDEX, "the component")
    for encoder in (folder / part for part in encoders):
        for shards in sorted(encoder.glob("*.index.json")):
            weight_map = read_json(shards, "the text encoder's weights index").get("weight_map")
            for key, name in (weight_map.items() if isinstance(weight_map, dict) else ()):
                inside(encoder, name, shards, f"the weight_map entry of {key!r}")
    for tok in (folder / part for part in tokenizers):
        config = tok / "tokenizer_config.json"
        if config.is_file():
            entries = read_json(config, "the tokenizer config")
            for key in TOKENIZER_FILE_KEYS:
                value = entries.get(key)
                for name in (value if isinstance(value, list) else [] if value is None else [value]):
                    inside(tok, name, config, f"the entry {key}")
