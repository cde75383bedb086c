"""What FluxPipeline passes to its transformer, as a tcgraph FLUX artifact reads it
(`tcgraph.diffusers.use`: the stand-in transformer calls these).

FluxPipeline passes packed latents [B, N, 4C], sigma (t / 1000, float32), the T5 sequence, the
pooled CLIP embedding, the guidance scale (FLUX.1-dev only) and the position ids. The graphs
read the latent image, the scheduler's timestep, the text, the pooled embedding and the guidance
scale: the latents are unpacked here and the output packed back; the position ids, the guidance
scale and the shapes must be what the artifact's graphs fix, or the call is refused by name.
"""
from __future__ import annotations

from types import SimpleNamespace

import torch

from tcgraph.errors import UsageError
from tcgraph.models.diffusers.config import check_class, check_pipeline_transformer
from tcgraph.models.diffusers.flux import image_ids, pack, unpack
from tcgraph.models.diffusers.flux_config import FLUX_CLASS_NAME, flux_config_from_diffusers

SAME_FIELDS = ("in_channels", "hidden_size", "depth", "single_depth", "num_heads", "caption_channels",
               "pooled_channels", "guidance_embeds", "axes_dims_rope")


def stand_in(cfg, timesteps: list[float]) -> tuple[SimpleNamespace, list[float]]:
    """(the config FluxPipeline reads of its transformer, the timestep value of each step's call: the
    scheduler's timestep in float32, divided by 1000 as the pipeline does)."""
    config = SimpleNamespace(in_channels=4 * cfg.in_channels, out_channels=4 * cfg.in_channels,
                             guidance_embeds=cfg.guidance_embeds, patch_size=1)
    return config, [(torch.tensor(t, dtype=torch.float32) / 1000).item() for t in timesteps]


def call_inputs(settings, cfg, hidden_states: torch.Tensor, text_of, given: dict, timestep: float):
    """(x, t, (text, pooled[, guidance])) of one FluxPipeline call, after checking the latents, the text
    (`text_of()`: the checked text embeddings), the pooled embedding, the position ids and the guidance."""
    s, grid = settings, cfg.input_size // 2
    latents = hidden_states.detach().to("cpu", torch.float32)
    want = (s.model_batch, grid * grid, 4 * cfg.in_channels)
    if tuple(latents.shape) != want:
        raise UsageError(f"the pipeline gave the transformer packed latents of shape {list(latents.shape)}, the "
                         f"artifact's graphs take {list(want)}: batch {s.batch}, a {cfg.input_size * 8}x"
                         f"{cfg.input_size * 8} image; call the pipeline with {s.batch} prompts and height=width="
                         f"{cfg.input_size * 8}, or transform again for yours")
    text = text_of()
    pooled = given.get("pooled_projections")
    if pooled is None or tuple(pooled.shape) != (s.model_batch, cfg.pooled_channels):
        raise UsageError(f"the artifact's graphs read pooled text embeddings [{s.model_batch}, {cfg.pooled_channels}]; "
                         f"the pipeline passed {None if pooled is None else list(pooled.shape)}")
    ids = [None if given.get(k) is None else torch.as_tensor(given[k]).detach().to("cpu", torch.float32)
           for k in ("img_ids", "txt_ids")]
    ids = [i[0] if i is not None and i.dim() == 3 else i for i in ids]
    if ids[0] is None or not torch.equal(ids[0], image_ids(grid)) or ids[1] is None \
            or tuple(ids[1].shape) != (s.text_length, 3) or bool(ids[1].any()):
        raise UsageError("the artifact's graphs fix FLUX's position ids (RoPE) to FluxPipeline's own for a "
                         f"{grid}x{grid} token grid and {s.text_length} text tokens at position 0; the pipeline "
                         "passed others: call FluxPipeline at the artifact's resolution without custom ids")
    cond = (text, pooled.detach().to("cpu", torch.float32))
    guidance = given.get("guidance")
    if cfg.guidance_embeds:
        g = None if guidance is None else torch.as_tensor(guidance).detach().to("cpu", torch.float32).reshape(-1)
        if g is None or g.numel() != s.model_batch or not bool(((g - s.cfg_scale).abs() <= 1e-6).all()):
            raise UsageError(f"the artifact's plan was made for guidance {s.cfg_scale:g} (an input of FLUX.1-dev); "
                             f"the pipeline passed {None if g is None else g[:4].tolist()}: call it with "
                             f"guidance_scale={s.cfg_scale:g}, or transform again with --guidance for yours")
        cond = (*cond, g)
    elif guidance is not None:
        raise UsageError("the artifact's model has no guidance embedding (FLUX.1-schnell), but the pipeline passed a "
                         "guidance scale: use the artifact with its own model's pipeline")
    t = torch.full((s.model_batch,), timestep, dtype=s.timestep_dtype)
    return unpack(latents, grid), t, cond


def output(out: torch.Tensor, cfg) -> torch.Tensor:
    """The graphs' output image, packed as FluxPipeline's scheduler steps its latents."""
    return pack(out, cfg.input_size // 2)


def check_same_model(pipeline: str, theirs: str, raw: dict, config, where) -> None:
    """A FLUX artifact stands in for a FluxTransformer2DModel of the same sizes, guidance embedding included."""
    check_class(pipeline, theirs, config, FLUX_CLASS_NAME, "flux", where)
    check_pipeline_transformer(config, raw, flux_config_from_diffusers, SAME_FIELDS, pipeline, where,
                               input_size=config.input_size)
