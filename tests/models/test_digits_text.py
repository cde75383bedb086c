"""The text-conditioned demo model "digits-text": its prompt encoder (tokenizer, encode), the
shipped folder as load_model and load_digits_text read it, and the error when it is missing."""
from __future__ import annotations

import pytest
import torch

from tcgraph import models
from tcgraph.errors import TcgraphError, UsageError
from tcgraph.demos import digits_text
from tcgraph.demos.digits_text import (CAPTION, END, LENGTH, PAD, PROMPTS, TEMPLATES, UNK, PromptEncoder,
                                        prompt_for)
from tcgraph.demos.prompts import prompt_encoder_for
from tcgraph.sampling.conditioning import Text

HAVE_WEIGHTS = (models.PRETRAINED["digits-text"][0] / "transformer" / "config.json").is_file()
needs_weights = pytest.mark.skipif(not HAVE_WEIGHTS, reason="digits-text weights not trained yet "
                                   "(python scripts/train_text_demo.py)")


@pytest.fixture(scope="module")
def encoder() -> PromptEncoder:
    torch.manual_seed(0)
    return PromptEncoder().eval()


def words(enc: PromptEncoder, ids: torch.Tensor) -> list[str]:
    return [enc.vocabulary[i] for i in ids.tolist()]


def test_tokenize_appends_end_and_pads(encoder):
    ids, mask = encoder.tokenize(["a handwritten seven", "The digit 7."])
    assert ids.dtype == torch.int64 and mask.dtype == torch.float32
    assert ids.shape == mask.shape == (2, LENGTH)
    assert words(encoder, ids[0]) == ["a", "handwritten", "seven", END] + [PAD] * (LENGTH - 4)
    assert words(encoder, ids[1])[:4] == ["the", "digit", "7", END]  # lower-cased, punctuation split off
    assert mask[0].tolist() == [1.0] * 4 + [0.0] * (LENGTH - 4)


def test_empty_prompt_is_one_token(encoder):
    ids, mask = encoder.tokenize(["", "  ,. "])
    assert mask.sum(1).tolist() == [1.0, 1.0]
    assert words(encoder, ids[0])[0] == END and torch.equal(ids[0], ids[1])


def test_unknown_words_are_unk(encoder):
    ids, mask = encoder.tokenize(["a photo of Seven-ish"], length=12)
    assert words(encoder, ids[0])[:6] == ["a", UNK, "of", "seven", UNK, END]
    assert mask[0].sum() == 6


def test_too_long_prompt_is_refused_naming_the_limit(encoder):
    ok = " ".join(["seven"] * (LENGTH - 1))  # 7 words + </s> fit
    assert encoder.tokenize([ok])[1].sum() == LENGTH
    with pytest.raises(UsageError, match=f"at most {LENGTH}"):
        encoder.tokenize([ok + " seven"])
    with pytest.raises(UsageError, match="at most 3"):
        encoder.tokenize(["a handwritten seven"], length=3)


def test_prompts_fit_the_length_and_name_their_digit(encoder):
    for d in range(10):
        assert len(PROMPTS[d]) == len(TEMPLATES)
        _, mask = encoder.tokenize(list(PROMPTS[d]))
        assert (mask.sum(1) <= LENGTH).all()
    assert prompt_for(7) == "a handwritten seven" and prompt_for(7, 1) == "the digit 7"
    with pytest.raises(UsageError):
        prompt_for(10)
    with pytest.raises(UsageError):
        prompt_for(3, len(TEMPLATES))


def test_encode_shapes_and_negative_rows(encoder):
    text = encoder.encode(["a handwritten seven", "the digit 3", "nine"])
    assert isinstance(text, Text) and len(text) == 3 and text.length == LENGTH and text.width == CAPTION
    empty = encoder.encode([""], negative=None)
    assert empty.negative_embeddings is None
    for row in range(3):  # the empty prompt, repeated
        assert torch.equal(text.negative_embeddings[row], empty.embeddings[0])
        assert torch.equal(text.negative_mask[row], empty.mask[0])
    assert (text.embeddings[text.mask == 0] == 0).all()  # padding rows are zero
    assert not torch.equal(text.embeddings[0], text.embeddings[1])
    other = encoder.encode(["seven"], negative="the digit 3")
    assert torch.equal(other.negative_embeddings[0], text.embeddings[1])
    assert encoder.encode(["seven"], length=12).length == 12
    enc, _ = text.model_inputs(guided=True)
    assert enc.shape == (6, LENGTH, CAPTION)


def test_encoder_round_trip(tmp_path, encoder):
    encoder.save(tmp_path / "text_encoder")
    back = PromptEncoder.from_folder(tmp_path / "text_encoder")
    assert back.vocabulary == encoder.vocabulary and back.length == encoder.length
    a, b = encoder.encode(["the digit 5"]), back.encode(["the digit 5"])
    assert torch.equal(a.embeddings, b.embeddings)
    (tmp_path / "text_encoder" / "prompt_encoder.safetensors").write_bytes(b"junk")
    with pytest.raises(TcgraphError, match="train_text_demo.py"):
        PromptEncoder.from_folder(tmp_path / "text_encoder")


def test_missing_weights_name_the_training_script(tmp_path, monkeypatch):
    monkeypatch.setitem(models.PRETRAINED, "digits-text", (tmp_path / "digits_text", None))
    for load in (lambda: models.load_model("digits-text"), digits_text.load_digits_text,
                 lambda: prompt_encoder_for("digits-text")):
        with pytest.raises(TcgraphError, match=r"python scripts/train_text_demo\.py"):
            load()


def test_prompt_encoder_for_other_models_is_none():
    assert prompt_encoder_for("digits") is None
    assert prompt_encoder_for("no/such/folder") is None
    assert prompt_encoder_for(None) is None


@needs_weights
def test_load_model_is_a_text_conditioned_pixart():
    pytest.importorskip("diffusers")
    from tcgraph.models.diffusers.pixart import DiffusersPixArt

    model = models.load_model("digits-text")
    assert isinstance(model, DiffusersPixArt) and not model.training
    cfg = model.config
    assert (cfg.caption_channels, cfg.input_size, cfg.patch_size, cfg.in_channels, cfg.hidden_size, cfg.depth,
            cfg.num_heads) == (CAPTION, 16, 2, 1, 128, 6, 4)
    with pytest.raises(UsageError, match="config"):
        models.load_model("digits-text", config="digits")


@needs_weights
def test_forward_on_prompts_is_finite_and_follows_the_text():
    pytest.importorskip("diffusers")
    model, encoder = digits_text.load_digits_text()
    folder = models.PRETRAINED["digits-text"][0]
    assert isinstance(prompt_encoder_for("digits-text"), PromptEncoder)
    assert isinstance(prompt_encoder_for(folder), PromptEncoder)
    assert isinstance(prompt_encoder_for(folder / "transformer"), PromptEncoder)
    text = encoder.encode([prompt_for(1), prompt_for(8), ""], negative=None)
    x = torch.randn(1, 1, 16, 16, generator=torch.Generator().manual_seed(0)).expand(3, -1, -1, -1)
    t = torch.full((3,), 500)
    with torch.no_grad():
        eps = model(x, t, text.embeddings, text.mask)
    assert eps.shape == (3, 1, 16, 16) and torch.isfinite(eps).all()
    assert (eps[0] - eps[1]).abs().mean() > 1e-3  # different digits
    assert (eps[0] - eps[2]).abs().mean() > 1e-3  # a prompt against the empty prompt


def test_folder_size_is_small():
    folder = models.PRETRAINED["digits-text"][0]
    if not folder.is_dir():
        pytest.skip("digits-text weights not trained yet (python scripts/train_text_demo.py)")
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    assert size < 10 * 2**20
