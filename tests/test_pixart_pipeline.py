"""tcgraph.diffusers.use with a PixArtAlphaPipeline assembled from local parts (a tiny random
transformer and VAE, DPM-Solver++, precomputed prompt embeddings: no tokenizer or text encoder
can be had here): the `full` artifact gives the pipeline's own images, a cached plan follows its
schedule, and text of another length or a missing text is one clear error."""
from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")  # PixArtAlphaPipeline imports it, even without a text encoder

from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, PixArtAlphaPipeline  # noqa: E402
from diffusers import PixArtTransformer2DModel  # noqa: E402

from tcgraph import api  # noqa: E402
from tcgraph import diffusers as tcd  # noqa: E402
from tcgraph.errors import UsageError  # noqa: E402
from tcgraph.export.artifact import load_artifact  # noqa: E402

STEPS, BATCH, LENGTH, WIDTH = 4, 2, 6, 16


def pipeline_parts(width: int = WIDTH) -> dict:
    """A PixArt pipeline's transformer (tiny, std-0.05 random weights, text of `width`), VAE (tiny,
    random) and scheduler (DPM-Solver++), as PixArtAlphaPipeline's keyword arguments."""
    transformer = PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4,
                                           out_channels=8, num_layers=2, sample_size=8, patch_size=2,
                                           caption_channels=width, cross_attention_dim=32,
                                           use_additional_conditions=False).eval()
    with torch.no_grad():
        for p in transformer.parameters():
            p.copy_(torch.randn_like(p) * 0.05)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8,),
                        down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
                        layers_per_block=1, norm_num_groups=4, sample_size=8).eval()
    scheduler = DPMSolverMultistepScheduler(beta_schedule="linear", algorithm_type="dpmsolver++")
    return dict(transformer=transformer, vae=vae, scheduler=scheduler)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    torch.manual_seed(0)
    pipe = PixArtAlphaPipeline(tokenizer=None, text_encoder=None, **pipeline_parts())
    pipe.set_progress_bar_config(disable=True)
    root = tmp_path_factory.mktemp("pixart")
    pipe.save_pretrained(str(root / "pipe"), safe_serialization=True)
    return pipe, root


def embeddings(length: int = LENGTH):
    g = torch.Generator().manual_seed(4)
    mask = torch.ones(BATCH, length, dtype=torch.long)
    mask[1, 3:] = 0
    neg_mask = torch.zeros(BATCH, length, dtype=torch.long)
    neg_mask[:, 0] = 1
    return dict(prompt_embeds=torch.randn(BATCH, length, WIDTH, generator=g), prompt_attention_mask=mask,
                negative_prompt_embeds=torch.randn(1, length, WIDTH, generator=g).expand(BATCH, -1, -1).clone(),
                negative_prompt_attention_mask=neg_mask)


def run(pipe, **kw):
    args = dict(embeddings(), num_inference_steps=STEPS, guidance_scale=4.0, height=8, width=8,
                use_resolution_binning=False, generator=torch.Generator().manual_seed(3), output_type="latent")
    args.update(kw)
    return pipe(prompt=None, negative_prompt=None, **args).images.numpy()  # latents: the VAE would blur differences


@pytest.fixture(scope="module")
def artifacts(pipeline):
    _, root = pipeline
    kw = dict(steps=STEPS, guidance=4.0, batch=BATCH, text_length=LENGTH, check=False, progress=False)  # compared with the pipeline below
    return {plan: api.transform(str(root / "pipe"), plan, root / plan.replace(":", ""), **kw)
            for plan in ("full", "fora:2")}


def test_full_artifact_in_the_pixart_pipeline_equals_the_pipeline(pipeline, artifacts):
    pipe, _ = pipeline
    own = run(pipe)
    original = pipe.transformer
    assert load_artifact(artifacts["full"]).plan.settings.scheduler["_class_name"] == "DPMSolverMultistepScheduler"
    with tcd.use(pipe, artifacts["full"]):
        got = run(pipe)
        again = run(pipe)
        other = run(pipe, prompt_embeds=embeddings()["prompt_embeds"] + 1.0)
    assert pipe.transformer is original
    assert own.shape == got.shape == (BATCH, 4, 8, 8)
    assert np.abs(got - own).max() <= 1e-5 * np.abs(own).max() + 1e-5  # latents ~ 200: float32 rounding
    assert np.array_equal(got, again)
    assert np.abs(other - got).max() > 1e-2  # the text reaches the graphs


def test_cached_artifact_runs_its_schedule_in_the_pixart_pipeline(pipeline, artifacts):
    pipe, _ = pipeline
    own = run(pipe)
    with tcd.use(pipe, artifacts["fora:2"]) as swapped:
        got = run(pipe)
        assert swapped.transformer.dispatch.calls == load_artifact(artifacts["fora:2"]).plan.schedule()
    assert np.abs(got - own).max() > 1e-2  # reuse changed the computation


def test_pixart_pipeline_mismatches_are_clear(pipeline, artifacts):
    pipe, _ = pipeline
    with tcd.use(pipe, artifacts["full"]):
        with pytest.raises(UsageError, match="max_sequence_length=6"):
            run(pipe, **embeddings(length=5))
        with pytest.raises(UsageError, match="num_inference_steps=4"):
            run(pipe, num_inference_steps=3)
        with pytest.raises(UsageError, match="batch 2"):
            run(pipe, guidance_scale=1.0)


def test_a_text_artifact_in_a_dit_pipeline_names_both_kinds(artifacts):
    from diffusers import DiTPipeline, DiTTransformer2DModel

    parts = pipeline_parts()
    dit = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8,
                                num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=1000)
    pipe = DiTPipeline(transformer=dit, vae=parts["vae"], scheduler=parts["scheduler"])
    with pytest.raises(UsageError) as e:
        tcd.use(pipe, artifacts["full"])
    assert str(e.value) == (
        f"the artifact {artifacts['full']} is text-conditioned (a PixArtTransformer2DModel: its graphs read text "
        "embeddings), but DiTPipeline's transformer is a class-conditional DiTTransformer2DModel: use the artifact "
        "with a PixArtAlphaPipeline or PixArtSigmaPipeline, or transform this pipeline's own model (tcgraph "
        "transform --model <its pipeline folder>)")
    assert pipe.transformer is dit
