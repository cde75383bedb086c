"""Which text encoders a diffusers pipeline folder has, by its `model_index.json`'s `_class_name`:
PixArt's T5 (`tcgraph.text.pipeline`) or FLUX's and SD3's CLIP + T5 (`tcgraph.text.mmdit`, which
builds on the first's folder checks). Kept apart from both so that neither imports the other.
"""
from __future__ import annotations

from pathlib import Path

from tcgraph.errors import TcgraphError
from tcgraph.models.diffusers.folder import read_json
from tcgraph.text.mmdit import MMDIT_ENCODERS
from tcgraph.text.pipeline import INDEX, PARTS, PIXART_PIPELINES, PipelineTextEncoder


def pipeline_text_encoder_for(source: str | Path | None):
    """The text encoders of the pipeline folder `source` (or of the pipeline whose `transformer/` it is),
    where that folder has a `model_index.json`, `text_encoder/` and `tokenizer/`, else None: PixArt's T5
    (`PipelineTextEncoder`), or FLUX's and SD3's CLIP + T5 (`tcgraph.text.mmdit`), by the index's
    `_class_name`; another pipeline class is refused by name (TcgraphError)."""
    if not isinstance(source, (str, Path)) or not str(source):
        return None
    path = Path(source)
    for folder in (path, path.parent):
        if (folder / INDEX).is_file() and all((folder / part).is_dir() for part in PARTS):
            name = read_json(folder / INDEX, "the pipeline index").get("_class_name")
            if name in MMDIT_ENCODERS:
                return MMDIT_ENCODERS[name](folder)
            if name in PIXART_PIPELINES:
                return PipelineTextEncoder(folder)
            raise TcgraphError(f"{folder / INDEX} is a {name!r} pipeline; tcgraph embeds prompts with the text "
                               f"encoders of {', '.join((*PIXART_PIPELINES, *MMDIT_ENCODERS))} folders: embed the "
                               "prompts with the pipeline's encode_prompt and pass them as an embeddings file "
                               "(--embeddings)")
    return None


__all__ = ["pipeline_text_encoder_for"]
