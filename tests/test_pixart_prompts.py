"""`tcgraph sample ART --prompt "…"` for an artifact transformed from a PixArt pipeline folder
with a text encoder: a tiny random T5 encoder and a word-level tokenizer made here (no download),
saved by PixArtAlphaPipeline.save_pretrained. tcgraph's embeddings equal the pipeline's own
`encode_prompt`, and the CLI samples what the API samples from those embeddings."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from diffusers import PixArtAlphaPipeline  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers, processors  # noqa: E402
from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel  # noqa: E402

from tcgraph import api, cli  # noqa: E402
from tcgraph.errors import UsageError  # noqa: E402
from tcgraph.export.artifact import load_artifact  # noqa: E402
from tcgraph.text.encoders import pipeline_text_encoder_for  # noqa: E402
from tcgraph.text.pipeline import PipelineTextEncoder  # noqa: E402
from tcgraph.sampling.conditioning import encode_prompts  # noqa: E402
from tests.test_pixart_pipeline import pipeline_parts  # noqa: E402

LENGTH, WIDTH = 6, 16
WORDS = ["a", "red", "blue", "cube", "ball", "on", "the", "table"]
PROMPTS = ["A red cube", "a blue ball on the table today"]  # the second is cut to LENGTH tokens


def tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    torch.manual_seed(0)
    encoder = T5EncoderModel(T5Config(vocab_size=len(WORDS) + 3, d_model=WIDTH, d_kv=8, d_ff=32, num_layers=1,
                                      num_heads=2)).eval()
    pipe = PixArtAlphaPipeline(tokenizer=tokenizer(), text_encoder=encoder, **pipeline_parts(WIDTH))
    root = tmp_path_factory.mktemp("pixart-t5")
    pipe.save_pretrained(str(root / "pipe"), safe_serialization=True)
    return pipe, root


def test_embeddings_equal_the_pipelines_encode_prompt(pipeline):
    pipe, root = pipeline
    text = PipelineTextEncoder(root / "pipe").encode(PROMPTS, negative="", length=LENGTH)
    with torch.no_grad():
        emb, mask, neg, neg_mask = pipe.encode_prompt(PROMPTS, do_classifier_free_guidance=True, negative_prompt="",
                                                      max_sequence_length=LENGTH, clean_caption=False)
    assert text.embeddings.shape == (2, LENGTH, WIDTH) and text.mask.tolist()[0] == [1, 1, 1, 1, 0, 0]
    assert torch.equal(text.mask, mask.float()) and torch.equal(text.negative_mask, neg_mask.float())
    assert torch.allclose(text.embeddings, emb, atol=1e-6) and torch.allclose(text.negative_embeddings, neg, atol=1e-6)
    assert (text.embeddings[0] - text.embeddings[1]).abs().max() > 1e-3  # the prompts differ
    assert pipeline_text_encoder_for(root / "pipe" / "transformer") is not None  # the pipeline of its transformer
    assert pipeline_text_encoder_for(root / "pipe" / "vae") is not None and pipeline_text_encoder_for(root) is None


def test_cli_prompts_sample_what_the_api_samples_from_their_embeddings(pipeline, tmp_path, capsys):
    _, root = pipeline
    art = api.transform(str(root / "pipe"), "fora:2", tmp_path / "art", steps=4, guidance=3.0, batch=2,
                        text_length=LENGTH, progress=False, check=False)
    with pytest.raises(UsageError, match=r"came from .*pipe.*tcgraph reads no path from an artifact.*--text-encoder"):
        encode_prompts(load_artifact(art), PROMPTS, "")  # the recorded source is never read
    text = encode_prompts(load_artifact(art), PROMPTS, "", root / "pipe")
    want, _ = api.sample(art, text=text, per_class=1, seed=2, progress=False)
    out = tmp_path / "x.npy"
    cli.main(["sample", str(art), "--prompt", PROMPTS[0], "--prompt", PROMPTS[1], "--text-encoder", str(root / "pipe"),
              "--per-class", "1", "--seed", "2",
              "--npy", str(out), "--png", str(tmp_path / "x.png")])
    import numpy as np

    got = torch.from_numpy(np.load(out))
    assert got.shape == want.shape and torch.allclose(got, want, atol=1e-6)
    moved = load_artifact(art)
    moved.extra.pop("source")
    moved.extra["model"] = "somewhere/else"
    with pytest.raises(UsageError, match="came from somewhere/else.*--text-encoder FOLDER.*--embeddings"):
        encode_prompts(moved, PROMPTS, "")
    with pytest.raises(UsageError, match="has no text encoder tcgraph can run.*--embeddings"):
        encode_prompts(moved, PROMPTS, "", tmp_path)
