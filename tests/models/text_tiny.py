"""Tiny random text encoders and word-level tokenizers for the pipeline tests (no download): CLIP text
models (with or without projection), T5 encoders, and tokenizers over a few words that pad with `pad`."""
from __future__ import annotations

import torch

WORDS = ("a", "red", "blue", "cat", "dog", "photo", "of")


def word_tokenizer(pad: str, length: int, words=WORDS):
    """A fast tokenizer of `words` (anything else reads as `pad`), splitting on whitespace, no special
    tokens added, `model_max_length` `length`."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({pad: 0, **{w: i + 1 for i, w in enumerate(words)}}, unk_token=pad))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=pad, model_max_length=length)


def tiny_clip(width: int, projection: bool = True, vocab: int = len(WORDS) + 1):
    """A random two-layer CLIP text model `width` wide (77 positions); with a projection as wide. Token 0
    (the tokenizers' padding) is its end token: the pooled output is the first padding row's, which has
    seen the whole prompt (as CLIP-L's, which pads with its end token)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    return cls(CLIPTextConfig(vocab_size=vocab, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
                              num_attention_heads=2, projection_dim=width, max_position_embeddings=77,
                              pad_token_id=0, bos_token_id=0, eos_token_id=0)).eval()


def tiny_t5(width: int, vocab: int = len(WORDS) + 1):
    """A random one-layer T5 encoder `width` wide."""
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=vocab, d_model=width, d_kv=4, d_ff=16, num_layers=1,
                                   num_heads=2)).eval()


def sd3_text_encoders(t5: bool, t5_width: int) -> dict:
    """StableDiffusion3Pipeline's text parts, tiny and random (seed 0): CLIP-L and CLIP-G with projection
    (4 and 6 wide: pooled 10) and, with `t5`, a T5 `t5_width` wide."""
    torch.manual_seed(0)
    parts = dict(text_encoder=tiny_clip(4), tokenizer=word_tokenizer("<|endoftext|>", 77), text_encoder_2=tiny_clip(6),
                 tokenizer_2=word_tokenizer("<|endoftext|>", 77))
    if t5:
        parts.update(text_encoder_3=tiny_t5(t5_width), tokenizer_3=word_tokenizer("<pad>", 512))
    return parts


def flux_text_encoders(pooled_width: int, t5_width: int) -> dict:
    """FluxPipeline's text parts, tiny and random (seed 0): a CLIP without projection `pooled_width` wide
    (its pooler output is the pooled embedding) and a T5 `t5_width` wide."""
    torch.manual_seed(0)
    return dict(text_encoder=tiny_clip(pooled_width, projection=False), tokenizer=word_tokenizer("<|endoftext|>", 77),
                text_encoder_2=tiny_t5(t5_width), tokenizer_2=word_tokenizer("<pad>", 512))
