"""What StableDiffusion3Pipeline passes to its transformer, as a tcgraph SD3 artifact reads it
(`tcgraph.diffusers.use`: the stand-in transformer calls these).

StableDiffusion3Pipeline passes the latents [B, C, H, W], the timestep (sigma × 1000), the text
sequence (CLIP and T5 embeddings side by side) and the pooled CLIP embeddings
(`pooled_projections`), negative prompts first, with no mask and no position ids: the graphs read
them as they are. Skip-layer guidance (`skip_layers`) and attention keyword arguments (a LoRA
scale) change what the transformer computes, which the graphs do not: such a call is refused.
"""
from __future__ import annotations

import torch

from tcgraph.errors import UsageError
from tcgraph.models.diffusers.config import check_class, check_pipeline_transformer
from tcgraph.models.diffusers.sd3_config import SD3_CLASS_NAME, sd3_config_from_diffusers

# the config fields in which the pipeline's transformer must equal the artifact's model
SAME_FIELDS = ("in_channels", "patch_size", "hidden_size", "depth", "num_heads", "caption_channels", "pooled_channels",
               "dual_attention_layers", "qk_norm", "pos_embed_max_size")


def pooled_input(settings, cfg, given: dict) -> torch.Tensor:
    """The pooled text embeddings [model batch, P] of one call (`given`: the call's other keyword
    arguments), after refusing what the graphs do not compute."""
    extra = [k for k in ("skip_layers", "joint_attention_kwargs") if given.get(k)]
    if extra:
        raise UsageError(f"the pipeline passed {', '.join(extra)} to the transformer; the artifact's graphs compute "
                         "every layer, without attention options: call the pipeline without skip_guidance_layers and "
                         "joint_attention_kwargs")
    pooled = given.get("pooled_projections")
    want = (settings.model_batch, cfg.pooled_channels)
    if pooled is None or tuple(pooled.shape) != want:
        raise UsageError(f"the artifact's graphs read pooled text embeddings {list(want)}; the pipeline passed "
                         f"{'none' if pooled is None else list(pooled.shape)}: give pooled_prompt_embeds (and "
                         "negative_pooled_prompt_embeds with guidance) of the model's width")
    return pooled.detach().to("cpu", torch.float32)


def check_same_model(pipeline: str, theirs: str, raw: dict, config, where) -> None:
    """An SD3 artifact stands in for an SD3Transformer2DModel of the same sizes (its config read at the
    artifact's resolution), and only for one."""
    check_class(pipeline, theirs, config, SD3_CLASS_NAME, "sd3", where)
    check_pipeline_transformer(config, raw, sd3_config_from_diffusers, SAME_FIELDS, pipeline, where,
                               input_size=config.input_size)
