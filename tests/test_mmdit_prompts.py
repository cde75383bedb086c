"""`tcgraph sample ART --prompt "…" --text-encoder FOLDER` for FLUX and SD3 pipeline folders: tiny random CLIP
and T5 encoders with word-level tokenizers made here (no download), saved by FluxPipeline and
StableDiffusion3Pipeline.save_pretrained with safetensors. tcgraph's embeddings (sequence and pooled) equal
the pipelines' own `encode_prompt`; a pickle-only, escaping or foreign folder is refused with one error; the
CLI samples from prompts what the API samples from the pipeline's own embeddings."""
from __future__ import annotations

import json
import pickle
import shutil

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, StableDiffusion3Pipeline  # noqa: E402

from tcgraph import api, cli  # noqa: E402
from tcgraph.errors import TcgraphError, UsageError  # noqa: E402
from tcgraph.export.artifact import load_artifact  # noqa: E402
from tcgraph.sampling.conditioning import encode_prompts  # noqa: E402
from tcgraph.text.embeddings import Text  # noqa: E402
from tcgraph.text.mmdit import FluxTextEncoder, SD3TextEncoder  # noqa: E402
from tcgraph.text.encoders import pipeline_text_encoder_for  # noqa: E402
from tests.models.flux_tiny import tiny_config, tiny_diffusers  # noqa: E402
from tests.models.test_diffusers_sd3 import PLAIN, POOLED_WIDTH, TEXT_WIDTH, tiny_sd3  # noqa: E402
from tests.models.text_tiny import flux_text_encoders, sd3_text_encoders  # noqa: E402

SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0,
             "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15, "base_image_seq_len": 256,
             "max_image_seq_len": 4096}  # FluxPipeline's
FLUX_L, T5_LENGTH = 5, 4  # FLUX's T5 tokens; SD3's text is 77 CLIP tokens and T5_LENGTH T5 tokens
# uppercase words are unknown to the tokenizers (neither pipeline lowercases); the last prompt is cut
PROMPTS = ["a photo of a red cat", "a blue dog", "A Red cat", "a photo of a blue dog of a cat"]
ATOL = 1e-6


def gap(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b.float()).abs().max().item()


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    config = tiny_config(guidance_embeds=True, depth=2, single_depth=1)  # pooled 10, text 12 wide
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler.from_config(SCHEDULER), vae=None,
                        transformer=tiny_diffusers(config, seed=11), **flux_text_encoders(10, 12))
    folder = tmp_path_factory.mktemp("flux") / "pipe"
    pipe.save_pretrained(str(folder), safe_serialization=True)
    return pipe, folder, config


@pytest.fixture(scope="module", params=[True, False], ids=["clip-and-t5", "clip-only"])
def sd3(request, tmp_path_factory):
    pipe = StableDiffusion3Pipeline(transformer=tiny_sd3(seed=11, **PLAIN), vae=None,
                                    scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                                    **{"text_encoder_3": None, "tokenizer_3": None,
                                       **sd3_text_encoders(request.param, TEXT_WIDTH)})
    folder = tmp_path_factory.mktemp("sd3") / "pipe"
    pipe.save_pretrained(str(folder), safe_serialization=True)
    return pipe, folder, request.param


def test_flux_embeddings_equal_the_pipelines_encode_prompt(flux):
    pipe, folder, _ = flux
    encoder = pipeline_text_encoder_for(folder / "transformer")  # the pipeline of its transformer
    assert isinstance(encoder, FluxTextEncoder)
    text = encoder.encode(PROMPTS, negative=None, length=FLUX_L)
    with torch.no_grad():
        embeds, pooled, _ = pipe.encode_prompt(PROMPTS, max_sequence_length=FLUX_L)
    assert text.embeddings.shape == (4, FLUX_L, 12) and text.pooled.shape == (4, 10)
    assert text.negative_embeddings is None and text.negative_pooled is None and bool((text.mask == 1).all())
    assert gap(text.embeddings, embeds) <= ATOL and gap(text.pooled, pooled) <= ATOL, (gap(text.embeddings, embeds),
                                                                                      gap(text.pooled, pooled))
    assert (text.embeddings[0] - text.embeddings[1]).abs().max() > 1e-3  # the prompts differ
    assert (text.pooled[0] - text.pooled[1]).abs().max() > 1e-3



def test_a_prompt_longer_than_the_text_is_warned_about_once(flux):
    """T5 cuts a prompt to the artifact's text length, CLIP to its 77 tokens; each cut is one warning naming the
    prompts (1-based) and their token counts, the negative prompt once; prompts that fit warn nothing."""
    import warnings

    from tcgraph.text.cut import PromptCutWarning

    _, folder, _ = flux
    encoder = FluxTextEncoder(folder)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        encoder.encode(["a red cat", "a blue dog"], negative="", length=FLUX_L)  # 3 words each (no special tokens)
        assert caught == []
        encoder.encode(["a red cat", "a photo of a blue dog of a cat"], negative="a photo of a red dog",
                       length=FLUX_L)
    cut = [w.message for w in caught if isinstance(w.message, PromptCutWarning)]
    assert [str(w) for w in cut] == [
        "prompt 2 (9 tokens): longer than the 5 T5 tokens the model reads; the rest is cut (transform with a "
        "larger --text-length to keep it)",
        "the negative prompt (6 tokens): longer than the 5 T5 tokens the model reads; the rest is cut (transform "
        "with a larger --text-length to keep it)"]
    assert cut[0].prompts == (2,) and len(caught) == 2
    with pytest.warns(PromptCutWarning, match=r"^prompt 1 \(81 tokens\): longer than the 77 CLIP tokens the model "
                                              r"reads; the rest is cut$"):
        encoder.encode(["a " * 80 + "cat"], negative=None, length=100)

def test_sd3_embeddings_equal_the_pipelines_encode_prompt(sd3):
    pipe, folder, t5 = sd3
    encoder = pipeline_text_encoder_for(folder)
    assert isinstance(encoder, SD3TextEncoder)
    for negative in ("a dog", ""):
        text = encoder.encode(PROMPTS, negative=negative, length=77 + T5_LENGTH, width=TEXT_WIDTH)
        with torch.no_grad():
            want = pipe.encode_prompt(PROMPTS, None, None, negative_prompt=negative or None,
                                      max_sequence_length=T5_LENGTH)
        got = (text.embeddings, text.negative_embeddings, text.pooled, text.negative_pooled)
        gaps = [gap(a, b) for a, b in zip(got, want)]
        assert max(gaps) <= ATOL, gaps
    assert text.embeddings.shape == (4, 77 + T5_LENGTH, TEXT_WIDTH) and text.pooled.shape == (4, POOLED_WIDTH)
    assert bool((text.embeddings[:, :77, 10:] == 0).all())  # the CLIPs' 4 + 6 wide, zero-padded to T5's 12
    assert (text.embeddings[:, 77:].abs().max() > 1e-3) == t5  # T5's tokens, or zeros without it
    assert (text.embeddings - text.negative_embeddings).abs().max() > 1e-3


def sd3_artifact(cfg_scale: float):
    """What encode_prompts reads of an SD3 artifact (text 77 + T5_LENGTH tokens, 12 wide)."""
    from types import SimpleNamespace as NS

    settings = NS(cfg_scale=cfg_scale, guidance="cfg", text_length=77 + T5_LENGTH)
    return NS(model_config=NS(text_conditioned=True, caption_channels=TEXT_WIDTH, pooled_channels=POOLED_WIDTH),
              plan=NS(settings=settings), extra={"model": "in-memory"})


def test_encode_prompts_embeds_the_negative_prompt_for_guidance_only(sd3):
    pipe, folder, _ = sd3
    text = encode_prompts(sd3_artifact(4.0), PROMPTS, "a dog", folder)  # without T5: zeros as wide as the model's text
    with torch.no_grad():
        want = pipe.encode_prompt(PROMPTS, None, None, negative_prompt="a dog", max_sequence_length=T5_LENGTH)
    got = (text.embeddings, text.negative_embeddings, text.pooled, text.negative_pooled)
    assert max(gap(a, b) for a, b in zip(got, want)) <= ATOL
    unguided = encode_prompts(sd3_artifact(1.0), PROMPTS, "a dog", folder)
    assert unguided.negative_embeddings is None and unguided.negative_pooled is None
    assert torch.equal(unguided.embeddings, text.embeddings) and torch.equal(unguided.pooled, text.pooled)


def bin_only(folder, tmp_path):
    """A copy of `folder` whose T5 has a pickle weight file only, which would write `marker` if unpickled."""
    class Trap:
        def __reduce__(self):
            return open, (str(tmp_path / "unpickled"), "w")

    bad = tmp_path / "bin"
    shutil.copytree(folder, bad)
    (bad / "text_encoder_2" / "model.safetensors").unlink()
    (bad / "text_encoder_2" / "pytorch_model.bin").write_bytes(pickle.dumps({"shared.weight": Trap()}))
    return bad


def test_a_pickle_only_folder_is_refused_unread(flux, tmp_path):
    bad = bin_only(flux[1], tmp_path)
    with pytest.raises(TcgraphError, match=r"cannot load the pipeline's text_encoder_2 .*reads safetensors weights only"):
        FluxTextEncoder(bad)
    assert not (tmp_path / "unpickled").exists()


@pytest.mark.parametrize("rel, entry, match", [
    ("tokenizer_2/tokenizer_config.json", {"vocab_file": "../../secret"}, 'the entry vocab_file "../../secret" climbs out'),
    ("text_encoder_2/model.safetensors.index.json", {"weight_map": {"w": "/etc/passwd"}},
     "the weight_map entry of 'w' \"/etc/passwd\" is an absolute path"),
    ("model_index.json", {"_class_name": "StableDiffusionXLPipeline"},
     "is a 'StableDiffusionXLPipeline' pipeline; tcgraph embeds prompts with the text encoders of PixArtAlphaPipeline"),
    ("model_index.json", {"text_encoder": ["transformers", "CLIPTextModelWithProjection"]},
     r"names text_encoder \['transformers', 'CLIPTextModelWithProjection'\], not a transformers CLIPTextModel class"),
])
def test_a_folder_that_escapes_or_is_another_pipeline_is_refused(flux, tmp_path, rel, entry, match):
    bad = tmp_path / "pipe"
    shutil.copytree(flux[1], bad)
    old = json.loads((bad / rel).read_text()) if (bad / rel).is_file() else {}
    (bad / rel).write_text(json.dumps({**old, **entry}))
    with pytest.raises(TcgraphError, match=match):
        pipeline_text_encoder_for(bad)


def test_a_component_linked_out_of_the_folder_is_refused(flux, tmp_path):
    bad = tmp_path / "pipe"
    shutil.copytree(flux[1], bad)
    shutil.move(bad / "tokenizer_2", tmp_path / "elsewhere")
    (bad / "tokenizer_2").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(TcgraphError, match='the component "tokenizer_2" is a symlink to .*elsewhere, outside the folder'):
        FluxTextEncoder(bad)


@pytest.mark.slow  # ~10-20 s on 2 shared cores: one artifact exported and sampled twice
def test_cli_prompts_sample_what_the_api_samples_from_the_pipelines_embeddings(flux, tmp_path):
    import numpy as np

    from tcgraph.models.diffusers.flux import wrap

    pipe, folder, config = flux
    art = api.transform(wrap(pipe.transformer, config), "fora:2", tmp_path / "art", steps=3, guidance=3.5, batch=2,
                        scheduler=SCHEDULER, text_length=FLUX_L, progress=False, check=False)
    with pytest.raises(UsageError, match="--text-encoder FOLDER.*pooled_prompt_embeds.*negative_pooled_prompt_embeds"):
        encode_prompts(load_artifact(art), PROMPTS[:2], "")
    assert encode_prompts(load_artifact(art), PROMPTS[:2], "", folder).negative_embeddings is None  # guidance input
    with torch.no_grad():
        embeds, pooled, _ = pipe.encode_prompt(PROMPTS[:2], max_sequence_length=FLUX_L)
    want, _ = api.sample(art, text=Text(embeds, torch.ones(2, FLUX_L), pooled=pooled), per_class=1, seed=2,
                         progress=False)
    out = tmp_path / "x.npy"
    assert cli.main(["sample", str(art), "--prompt", PROMPTS[0], "--prompt", PROMPTS[1], "--text-encoder", str(folder),
                     "--per-class", "1", "--seed", "2", "--npy", str(out)]) in (0, None)
    got = torch.from_numpy(np.load(out))
    assert got.shape == want.shape == (2, 4, 8, 8) and want.abs().max() > 0.1
    assert (got - want).abs().max().item() <= 1e-6, (got - want).abs().max().item()
