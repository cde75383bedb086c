"""FluxPipeline with a tcgraph artifact in place of its transformer (`tcgraph.diffusers.use`): a pipeline
built from local parts (a tiny random FLUX.1-dev transformer, FLUX's flow-matching scheduler with its
dynamic shift, no text encoders and no VAE: prompt embeddings passed directly, latents out). The `full`
artifact gives the pipeline's own latents within 1e-4; a cached plan runs its schedule; each mismatch
(steps, resolution, text length, guidance, batch, another model) is one clear error."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")

from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline  # noqa: E402

import tcgraph.diffusers  # noqa: E402
from tcgraph import api  # noqa: E402
from tcgraph.errors import UsageError  # noqa: E402
from tcgraph.models.diffusers.flux import wrap  # noqa: E402
from tcgraph.plan import COMPUTE, REUSE, Plan, Recipe  # noqa: E402
from tcgraph.sampling import SamplerSettings  # noqa: E402
from tests.models.flux_tiny import tiny_config, tiny_diffusers  # noqa: E402

pytestmark = pytest.mark.slow  # ~25 s on 2 shared cores: two artifacts exported

SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0,
             "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15, "base_image_seq_len": 256,
             "max_image_seq_len": 4096}
STEPS, BATCH, L, GUIDANCE = 3, 2, 5, 3.5
SIDE = 64  # pixels: an 8 x 8 latent, 16 packed tokens


def pipeline(transformer) -> FluxPipeline:
    return FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler.from_config(SCHEDULER), vae=None, text_encoder=None,
                        tokenizer=None, text_encoder_2=None, tokenizer_2=None, transformer=transformer)


def run(pipe, batch: int = BATCH, length: int = L, steps: int = STEPS, side: int = SIDE, guidance: float = GUIDANCE):
    g = torch.Generator().manual_seed(7)
    embeds, pooled = torch.randn(batch, length, 12, generator=g), torch.randn(batch, 10, generator=g)
    return pipe(prompt_embeds=embeds, pooled_prompt_embeds=pooled, height=side, width=side, num_inference_steps=steps,
                guidance_scale=guidance, output_type="latent", generator=torch.Generator().manual_seed(3),
                max_sequence_length=length).images


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    config = tiny_config(guidance_embeds=True, depth=2, single_depth=1)  # one block of each kind
    transformer = tiny_diffusers(config, seed=11)
    model = wrap(transformer, config)
    s = SamplerSettings(sampler="diffusers", scheduler=SCHEDULER, num_steps=STEPS, batch=BATCH, cfg_scale=GUIDANCE,
                        resolution=8, text_length=L, pooled=True, guidance="input")
    layout = config.block_layout()
    full, reuse = (Recipe.uniform(layout.depth, a, layout.branches()) for a in (COMPUTE, REUSE))
    out = tmp_path_factory.mktemp("flux-pipeline")
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
    assert pipe.transformer is transformer and own.shape == (BATCH, 16, 16)
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
    ({"side": 32}, "height=width=64"),
    ({"length": 4}, "text length 5 is a plan setting"),
    ({"guidance": 2.0}, "made for guidance 3.5"),
    ({"batch": 3}, "with 2 prompts"),
])
def test_each_mismatch_is_one_clear_error(setup, change, match):
    transformer, arts = setup
    pipe = pipeline(transformer)
    with tcgraph.diffusers.use(pipe, arts["full"]), pytest.raises(UsageError, match=match):
        run(pipe, **change)


def test_two_passes_per_step_are_refused(setup):
    """FluxPipeline's true CFG (a negative prompt, true_cfg_scale > 1) calls the transformer twice per step."""
    transformer, arts = setup
    pipe = pipeline(transformer)
    g = torch.Generator().manual_seed(7)
    embeds, pooled = torch.randn(BATCH, L, 12, generator=g), torch.randn(BATCH, 10, generator=g)
    with tcgraph.diffusers.use(pipe, arts["full"]), pytest.raises(UsageError, match="a second time at step"):
        pipe(prompt_embeds=embeds, pooled_prompt_embeds=pooled, negative_prompt_embeds=embeds,
             negative_pooled_prompt_embeds=pooled, true_cfg_scale=2.0, height=SIDE, width=SIDE,
             num_inference_steps=STEPS, guidance_scale=GUIDANCE, output_type="latent", max_sequence_length=L)


def test_another_model_is_refused(setup):
    _, arts = setup
    schnell = pipeline(tiny_diffusers(tiny_config(guidance_embeds=False, depth=2, single_depth=1), seed=12))
    with pytest.raises(UsageError, match="guidance_embeds True vs False"):
        tcgraph.diffusers.use(schnell, arts["full"])
