"""tcgraph.diffusers.use: a DiTPipeline assembled from local parts (a tiny random transformer,
a tiny random VAE, its scheduler) samples through a tcgraph artifact in place of its
transformer: `full` equals the pipeline's own result, a cached plan differs from it, and every
mismatch of steps, batch, guidance or model is one clear error. A pipeline saved inside `use`
loads back with its own transformer, and arguments of the wrong type are named."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

from diffusers import AutoencoderKL, DiTPipeline, DiTTransformer2DModel, DPMSolverMultistepScheduler  # noqa: E402

from tcgraph import api  # noqa: E402
from tcgraph import diffusers as tcd  # noqa: E402
from tcgraph.errors import UsageError  # noqa: E402
from tcgraph.export.artifact import load_artifact  # noqa: E402

STEPS, BATCH = 4, 2


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    torch.manual_seed(0)
    transformer = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8,
                                        num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=1000).eval()
    with torch.no_grad():
        for p in transformer.parameters():
            p.copy_(torch.randn_like(p) * 0.05)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8,),
                        down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
                        layers_per_block=1, norm_num_groups=4, sample_size=8).eval()
    scheduler = DPMSolverMultistepScheduler(beta_schedule="linear", algorithm_type="dpmsolver++")
    pipe = DiTPipeline(transformer=transformer, vae=vae, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    root = tmp_path_factory.mktemp("dit")
    pipe.save_pretrained(str(root / "pipe"), safe_serialization=True)
    return pipe, root


def run(pipe, labels=(1, 7), steps=STEPS, guidance=4.0):
    return pipe(class_labels=list(labels), num_inference_steps=steps, guidance_scale=guidance,
                generator=torch.Generator().manual_seed(3), output_type="np").images


def psnr(a, b) -> float:
    return float(10 * np.log10(1.0 / max(np.mean((a - b) ** 2), 1e-20)))


@pytest.fixture(scope="module")
def artifacts(pipeline):
    pipe, root = pipeline
    kw = dict(steps=STEPS, guidance=4.0, batch=BATCH, progress=False)
    return {plan: api.transform(str(root / "pipe"), plan, root / plan.replace(":", ""), **kw)
            for plan in ("full", "fora:2")}


def test_full_artifact_in_the_pipeline_equals_the_pipeline(pipeline, artifacts):
    pipe, _ = pipeline
    own = run(pipe)
    original = pipe.transformer
    with tcd.use(pipe, artifacts["full"]) as swapped:
        assert isinstance(swapped.transformer, tcd.ArtifactTransformer)
        got = run(pipe)
        again = run(pipe)  # a second run starts from step 0 with fresh caches
    assert pipe.transformer is original
    assert own.shape == got.shape == (BATCH, 8, 8, 3)
    assert np.abs(got - own).max() <= 1e-4
    assert np.array_equal(got, again)


def test_cached_artifact_runs_its_schedule(pipeline, artifacts):
    pipe, _ = pipeline
    own = run(pipe)
    swap = tcd.use(pipe, artifacts["fora:2"])
    try:
        got = run(pipe)
        assert swap.transformer.dispatch.calls == load_artifact(artifacts["fora:2"]).plan.schedule()
    finally:
        swap.restore()
    assert 0 < np.abs(got - own).max() and psnr(got, own) > 20


def test_mismatches_are_clear_errors(pipeline, artifacts, tmp_path):
    pipe, _ = pipeline
    with tcd.use(pipe, artifacts["full"]):
        with pytest.raises(UsageError, match=f"made for {STEPS} steps of the diffusers scheduler "
                                             "DPMSolverMultistepScheduler"):
            run(pipe, steps=STEPS + 2)
        with pytest.raises(UsageError, match=r"latents of shape \[6, 4, 8, 8\].*batch 2 \(guidance doubles it\)"):
            run(pipe, labels=(1, 2, 3))
        with pytest.raises(UsageError, match="latents of shape \\[2, 4, 8, 8\\]"):
            run(pipe, guidance=1.0)
        with pytest.raises(UsageError, match="already runs a tcgraph artifact"):
            tcd.use(pipe, artifacts["full"])
    other = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8,
                                  num_layers=3, sample_size=8, patch_size=2, num_embeds_ada_norm=1000)
    original = pipe.transformer
    object.__setattr__(pipe, "transformer", other)
    try:
        with pytest.raises(UsageError, match="another model than the pipeline's transformer .*depth 2 vs 3"):
            tcd.use(pipe, artifacts["full"])
    finally:
        object.__setattr__(pipe, "transformer", original)


def test_save_pretrained_inside_use_saves_the_pipelines_own_transformer(pipeline, artifacts, tmp_path):
    """diffusers skips a component that is no diffusers model (and marks it None in the pipeline's config):
    inside `use`, the pipeline saves its own transformer, and the folder loads back as it was."""
    pipe, _ = pipeline
    config = dict(pipe.config)
    with tcd.use(pipe, artifacts["full"]) as swapped:
        pipe.save_pretrained(str(tmp_path / "saved"), safe_serialization=True)
        swapped.transformer.save_pretrained(str(tmp_path / "alone"), safe_serialization=True)
        assert isinstance(pipe.transformer, tcd.ArtifactTransformer)  # still runs the artifact after saving
    assert dict(pipe.config) == config and "save_pretrained" not in vars(pipe)
    index = json.loads((tmp_path / "saved" / "model_index.json").read_text())
    assert index["transformer"] == ["diffusers", "DiTTransformer2DModel"]
    back = DiTPipeline.from_pretrained(str(tmp_path / "saved"))
    back.set_progress_bar_config(disable=True)
    alone = DiTTransformer2DModel.from_pretrained(str(tmp_path / "alone"))
    ours = pipe.transformer.state_dict()
    for theirs in (back.transformer.state_dict(), alone.state_dict()):
        assert theirs.keys() == ours.keys() and all(torch.equal(theirs[k], ours[k]) for k in ours)
    assert np.array_equal(run(back), run(pipe))


def test_use_names_the_expected_types(pipeline, artifacts):
    pipe, _ = pipeline
    art = artifacts["full"]
    for args, text in [((pipe, None), "takes the path of a tcgraph artifact folder as `artifact` .* got None$"),
                       ((pipe, 123), "as `artifact` \\(a str or os.PathLike, what tcgraph.transform returns\\), "
                                     "got int '123'"),
                       ((None, art), "takes a diffusers pipeline object as `pipe` \\(a DiTPipeline, "
                                     "PixArtAlphaPipeline, .*FluxPipeline.*, loaded with from_pretrained\\), "
                                     "got None$"),
                       ((str(art), art), "as `pipe` .* got str")]:
        with pytest.raises(UsageError, match=text):
            tcd.use(*args)
    with pytest.raises(UsageError, match="backend must be a backend name .* got list"):
        tcd.use(pipe, art, backend=["ort"])
    assert not isinstance(pipe.transformer, tcd.ArtifactTransformer)


def test_a_class_conditional_artifact_in_a_pixart_pipeline_names_both_kinds(artifacts):
    pytest.importorskip("transformers")
    from diffusers import PixArtAlphaPipeline

    from tests.test_pixart_pipeline import pipeline_parts

    pixart = PixArtAlphaPipeline(tokenizer=None, text_encoder=None, **pipeline_parts())
    with pytest.raises(UsageError, match=f"the artifact {artifacts['full']} is class-conditional \\(a DiT: its graphs "
                                         "read class labels\\), but PixArtAlphaPipeline's transformer is a "
                                         "text-conditioned PixArtTransformer2DModel: use the artifact with a "
                                         "DiTPipeline"):
        tcd.use(pixart, artifacts["full"])
