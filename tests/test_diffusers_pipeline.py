"""tcgraph.diffusers.use: a DiTPipeline assembled from local parts (a tiny random transformer,
a tiny random VAE, its scheduler) samples through a tcgraph artifact in place of its
transformer: `full` equals the pipeline's own result, a cached plan differs from it, and every
mismatch of steps, batch, guidance or model is one clear error."""
from __future__ import annotations

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
