"""StableDiffusion3Pipeline with a tcgraph artifact in place of its transformer (`tcgraph.diffusers.use`): a
pipeline built from local parts (a tiny random SD3.5-like transformer, SD3's flow-matching scheduler, no
text encoders and no VAE: prompt and pooled embeddings, and their negatives, passed directly, latents
out). The `full` artifact gives the pipeline's own latents within 1e-4; a cached plan runs its schedule;
each mismatch (steps, resolution, text length, batch, guidance on or off, another model) is one clear error.
The same with the pipeline's own (tiny, random, built here) CLIP and T5 encoders, and with the CLIPs alone."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")
pytestmark = pytest.mark.slow  # ~40-60 s on 2 shared cores: the module's two transforms take ~20-35 s

from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline  # noqa: E402

import tcgraph.diffusers  # noqa: E402
from tcgraph import api  # noqa: E402
from tcgraph.errors import UsageError  # noqa: E402
from tcgraph.models.diffusers.sd3 import DiffusersSD3  # noqa: E402
from tcgraph.plan import COMPUTE, REUSE, Plan, Recipe  # noqa: E402
from tcgraph.sampling import SamplerSettings  # noqa: E402
from tests.models.test_diffusers_sd3 import POOLED_WIDTH, SD35, TEXT_WIDTH, tiny_sd3  # noqa: E402
from tests.models.text_tiny import sd3_text_encoders  # noqa: E402

SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}  # SD3's
T5_LENGTH = 4  # max_sequence_length: the text is 77 CLIP tokens and these
STEPS, BATCH, L, GUIDANCE = 3, 2, 77 + T5_LENGTH, 4.0
SIDE = 64  # pixels: an 8 x 8 latent (the pipeline's VAE factor 8 without a VAE), 16 tokens


def pipeline(transformer, **encoders) -> StableDiffusion3Pipeline:
    parts = dict(text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None, text_encoder_3=None,
                 tokenizer_3=None)
    return StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler.from_config(SCHEDULER),
                                    vae=None, **{**parts, **encoders})


def text_encoders(t5: bool) -> dict:
    """Tiny random CLIP-L, CLIP-G (and T5) encoders with word-level tokenizers, built here: the two CLIPs'
    hidden states (4 + 6 wide, padded to the text width 12) and pooled projections (4 + 6 = 10)."""
    return sd3_text_encoders(t5, TEXT_WIDTH)


def run(pipe, batch: int = BATCH, length: int = L, steps: int = STEPS, side: int = SIDE, guidance: float = GUIDANCE):
    g = torch.Generator().manual_seed(7)
    embeds = [torch.randn(batch, length, TEXT_WIDTH, generator=g) for _ in range(2)]
    pooled = [torch.randn(batch, POOLED_WIDTH, generator=g) for _ in range(2)]
    return pipe(prompt_embeds=embeds[0], negative_prompt_embeds=embeds[1], pooled_prompt_embeds=pooled[0],
                negative_pooled_prompt_embeds=pooled[1], height=side, width=side, num_inference_steps=steps,
                guidance_scale=guidance, output_type="latent", generator=torch.Generator().manual_seed(3)).images


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    transformer = tiny_sd3(seed=11, **SD35)  # a dual block, a joint block, the last block
    model = DiffusersSD3(transformer)
    config = model.config
    s = SamplerSettings(sampler="diffusers", scheduler=SCHEDULER, num_steps=STEPS, batch=BATCH, cfg_scale=GUIDANCE,
                        resolution=config.input_size, text_length=L, pooled=True)
    layout = config.block_layout()
    full, reuse = (Recipe.uniform(layout.depth, a, layout.branches()) for a in (COMPUTE, REUSE))
    out = tmp_path_factory.mktemp("sd3-pipeline")
    arts = {name: api.transform(model, Plan(name, s, recipes, config.num_tokens, layout=layout), out / name,
                                progress=False, check=False)  # (checked by the adapter tester)
            for name, recipes in (("full", (full,) * STEPS), ("cached", (full, reuse, full)))}
    return transformer, arts


def test_full_artifact_gives_the_pipelines_own_latents(setup):
    transformer, arts = setup
    pipe = pipeline(transformer)
    with torch.no_grad():
        own = run(pipe)
        with tcgraph.diffusers.use(pipe, arts["full"]):
            got = run(pipe)
    assert pipe.transformer is transformer and own.shape == (BATCH, 4, 8, 8) and own.abs().max().item() > 0.1
    assert (got - own).abs().max().item() <= 1e-4, (got - own).abs().max().item()


def test_a_cached_plan_follows_its_schedule(setup):
    transformer, arts = setup
    pipe = pipeline(transformer)
    with torch.no_grad():
        own = run(pipe)
        with tcgraph.diffusers.use(pipe, arts["cached"]) as p:
            got = run(p)
            calls = list(p.transformer.dispatch.calls)
    assert calls == ["v0", "v1", "v0"]
    assert 1e-4 < (got - own).abs().max().item() < 10  # the reused step changes the latents, not wildly


@pytest.mark.parametrize("change, match", [
    ({"steps": 4}, "made for 3 steps"),
    ({"side": 32}, "a 4x4 latent, the artifact's graphs take 8x8 .* height and width 64"),
    ({"length": L - 1}, f"text length {L} is a plan setting"),
    ({"batch": 3}, "with 2 prompts per call"),
    ({"guidance": 1.0}, r"latents of shape \[2, 4, 8, 8\].*guidance on"),
])
def test_each_mismatch_is_one_clear_error(setup, change, match):
    transformer, arts = setup
    pipe = pipeline(transformer)
    with tcgraph.diffusers.use(pipe, arts["full"]), pytest.raises(UsageError, match=match):
        run(pipe, **change)


def test_the_pooled_embeddings_are_checked_and_skipped_layers_refused(setup):
    transformer, arts = setup
    pipe = pipeline(transformer)
    x, text, pooled = torch.randn(2 * BATCH, 4, 8, 8), torch.randn(2 * BATCH, L, TEXT_WIDTH), torch.randn(2 * BATCH, 10)
    with tcgraph.diffusers.use(pipe, arts["full"]):
        t = torch.full((2 * BATCH,), float(pipe.transformer.timesteps[0]))
        for kwargs, match in (({"pooled_projections": None}, "pooled text embeddings .*passed none"),
                              ({"pooled_projections": torch.randn(2 * BATCH, 11)}, r"pooled text embeddings .*\[4, 11\]"),
                              ({"pooled_projections": pooled, "skip_layers": [1]}, "passed skip_layers to the transformer"),
                              ({"pooled_projections": pooled, "joint_attention_kwargs": {"scale": 0.5}},
                               "passed joint_attention_kwargs")):
            with pytest.raises(UsageError, match=match):
                pipe.transformer(hidden_states=x, encoder_hidden_states=text, timestep=t, **kwargs)
        assert pipe.transformer(hidden_states=x, encoder_hidden_states=text, timestep=t, pooled_projections=pooled,
                                skip_layers=None, joint_attention_kwargs=None).sample.shape == x.shape
    assert pipe.transformer is transformer


@pytest.mark.parametrize("other, match", [
    ({"qk_norm": ""}, "qk_norm rms_norm vs "),
    ({"dual_attention_layers": ()}, r"dual_attention_layers \(0,\) vs \(\)"),
    ({"pooled_channels": POOLED_WIDTH + 2}, "pooled_channels 10 vs 12"),
])
def test_another_model_is_refused(setup, other, match):
    _, arts = setup
    with pytest.raises(UsageError, match=f"another model than the pipeline's transformer .*{match}"):
        tcgraph.diffusers.use(pipeline(tiny_sd3(seed=12, **{**SD35, **other})), arts["full"])


def test_another_class_is_refused(setup):
    from types import SimpleNamespace

    from diffusers import DiTTransformer2DModel

    _, arts = setup
    dit = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8,
                                num_layers=1, sample_size=8, patch_size=2, num_embeds_ada_norm=10)
    with pytest.raises(UsageError, match="is for a SD3Transformer2DModel, but SimpleNamespace's transformer is a "
                                         "DiTTransformer2DModel"):
        tcgraph.diffusers.use(SimpleNamespace(transformer=dit), arts["full"])


@pytest.mark.parametrize("t5", [True, False], ids=["clip-and-t5", "clip-only"])
def test_a_pipeline_with_its_text_encoders(setup, t5):
    """Prompts through the pipeline's own encoders (without T5 it pads with zeros as wide as the
    transformer's joint_attention_dim, which the stand-in declares): the pipeline's own latents."""
    transformer, arts = setup
    pipe = pipeline(transformer, **text_encoders(t5))

    def run_prompts():
        return pipe(prompt=["a photo of a red cat", "a blue dog"], negative_prompt="a dog", height=SIDE, width=SIDE,
                    num_inference_steps=STEPS, guidance_scale=GUIDANCE, output_type="latent", max_sequence_length=T5_LENGTH,
                    generator=torch.Generator().manual_seed(3)).images

    with torch.no_grad():
        own = run_prompts()
        with tcgraph.diffusers.use(pipe, arts["full"]):
            got = run_prompts()
    assert own.abs().max().item() > 0.1 and (got - own).abs().max().item() <= 1e-4, (got - own).abs().max().item()
