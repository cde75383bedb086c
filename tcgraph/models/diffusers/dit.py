"""diffusers' `DiTTransformer2DModel`, as tcgraph traces, rewrites and exports it.

diffusers' own forward cannot be traced by torch.fx (it reads tensor shapes into Python
ints and checks `torch.is_grad_enabled()`), so `DiffusersDiT` wraps the diffusers model's
own modules, unchanged, with a forward written for tracing: the same operations in the
same order, with the patch grid and the timestep features' constants fixed when it is
built. `tests/models/test_diffusers_dit.py` checks it against diffusers' forward.

Where it differs from the official DiT (and so from `tcgraph.models.official.dit.DiT`), by design:
- every block has its own timestep and label embedders (`norm1.emb`), and the final
  layer's conditioning is block 0's; checkpoints converted from the official DiT hold the
  same weights in every block;
- its sinusoidal timestep features divide the frequency exponent by `half - 1`, not
  `half` (diffusers' `downscale_freq_shift=1`);
- the norm before the MLP (`norm3`) has eps `norm_eps` (1e-5 by default), not 1e-6.

Parameter names are diffusers' own (`transformer_blocks.3.attn1.to_q.weight`), plus
`pos_table`, the fixed sin-cos position table that diffusers keeps as a non-persistent
buffer. The config is a `DiTConfig` with `layout="diffusers"`, so plans, samplers,
manifests and the FLOP count treat both layouts alike.

diffusers is imported when this module is: it is an optional dependency (`.[diffusers]`).
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from tcgraph.errors import TcgraphError
from tcgraph.models.adapter import AttentionSpec, BlockKind, BranchSpec, ModelAdapter, config_dims, register_adapter
from tcgraph.models.official.checkpoint import check_finite
from tcgraph.models.diffusers.config import CLASS_NAME, TIME_FEATURES, config_from_diffusers, diffusers_kwargs
from tcgraph.models.diffusers.folder import DiffusersFolder, diffusers_missing, load_weights_into
from tcgraph.models.official.dit import DiTConfig, modulate

try:
    from diffusers import DiTTransformer2DModel
    from diffusers.models.attention import FeedForward
    from diffusers.models.attention_processor import Attention
except ImportError as e:  # pragma: no cover - depends on the environment
    raise diffusers_missing(e) from None



TIME_SHIFT = 1.0  # diffusers' downscale_freq_shift of DiT's timestep features (the official DiT's is 0)


def timestep_features(t: torch.Tensor, dim: int = TIME_FEATURES, shift: float = 1.0, max_period: float = 10000.0,
                      scale: float = 1.0, flip_sin_to_cos: bool = True) -> torch.Tensor:
    """Sinusoidal features of timesteps `t` [B] -> [B, dim], as diffusers' `Timesteps` makes them:
    frequencies exp(-ln(max_period) * i / (half - shift)), cos first when `flip_sin_to_cos`."""
    half = dim // 2
    exponent = torch.arange(half, dtype=torch.float32, device=t.device) * (-math.log(max_period) / (half - shift))
    args = scale * (t[:, None].float() * torch.exp(exponent)[None, :])
    parts = (torch.cos(args), torch.sin(args)) if flip_sin_to_cos else (torch.sin(args), torch.cos(args))
    emb = torch.cat(parts, dim=-1)
    return F.pad(emb, (0, 1, 0, 0)) if dim % 2 else emb


class DiffusersDiTBlock(nn.Module):
    """One diffusers `BasicTransformerBlock` (norm_type "ada_norm_zero", no cross-attention),
    holding its modules under their diffusers names, with a traceable forward."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.norm1 = block.norm1  # AdaLayerNormZero: emb (timestep + label), linear -> 6 chunks, norm
        self.attn1 = block.attn1
        self.norm3 = block.norm3  # the norm before the MLP (eps norm_eps)
        self.ff = block.ff

    def embedding(self, t_features: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """This block's conditioning vector: its timestep MLP of the features plus its label's row."""
        emb = self.norm1.emb
        return emb.timestep_embedder(t_features) + emb.class_embedder.embedding_table(y)

    def modulation(self, t_features: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """[B, 6D]: shift, scale, gate of the attention, then of the MLP."""
        return self.norm1.linear(self.norm1.silu(self.embedding(t_features, y)))

    def forward(self, h: torch.Tensor, t_features: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(t_features, y).chunk(6, dim=1)
        h = h + gate1.unsqueeze(1) * self.attn1(modulate(self.norm1.norm(h), shift1, scale1))
        return h + gate2.unsqueeze(1) * self.ff(modulate(self.norm3(h), shift2, scale2))


class DiffusersDiT(nn.Module):
    """A diffusers `DiTTransformer2DModel`; `forward(x, t, y)` -> its output `sample`."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.config = config_from_diffusers(dict(model.config), where=CLASS_NAME)
        cfg = self.config
        _check_blocks(model, cfg)
        self.patch_size, self.out_channels = cfg.patch_size, cfg.out_channels
        self.grid = cfg.input_size // cfg.patch_size
        self.pos_embed = model.pos_embed  # PatchEmbed: only its conv `proj` runs here
        self.register_buffer("pos_table", model.pos_embed.pos_embed.detach().clone().float())  # [1, N, D]
        self.transformer_blocks = nn.ModuleList(DiffusersDiTBlock(b) for b in model.transformer_blocks)
        self.norm_out = model.norm_out
        self.proj_out_1 = model.proj_out_1
        self.proj_out_2 = model.proj_out_2

    @property
    def null_class(self) -> int:
        return self.config.num_classes

    def embed(self, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(hidden state [B, N, D], timestep features [B, 256])."""
        h = self.pos_embed.proj(x).flatten(2).transpose(1, 2) + self.pos_table
        return h, timestep_features(t, shift=TIME_SHIFT)

    def final(self, h: torch.Tensor, t_features: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        c = self.transformer_blocks[0].embedding(t_features, y)  # diffusers conditions its output on block 0's
        shift, scale = self.proj_out_1(F.silu(c)).chunk(2, dim=1)
        h = self.proj_out_2(modulate(self.norm_out(h), shift, scale))  # [B, N, p*p*C_out]
        c_out, p, g = self.out_channels, self.patch_size, self.grid
        h = h.reshape(h.shape[0], g, g, p, p, c_out).permute(0, 5, 1, 3, 2, 4)  # (N, C, H/p, p, W/p, p)
        return h.reshape(h.shape[0], c_out, g * p, g * p)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h, tf = self.embed(x, t)
        for block in self.transformer_blocks:
            h = block(h, tf, y)
        return self.final(h, tf, y)


def build_diffusers_dit(config: DiTConfig, seed: int | None = None) -> DiffusersDiT:
    """A DiTTransformer2DModel with diffusers' random initialisation (seeded when `seed` is given)."""
    if seed is not None:
        torch.manual_seed(seed)
    return DiffusersDiT(DiTTransformer2DModel(**diffusers_kwargs(config))).eval()


def save_as_diffusers(model: nn.Module, path: str | Path, norm_eps: float = 1e-5) -> Path:
    """Save an official-layout tcgraph DiT as a diffusers DiTTransformer2DModel folder
    (`save_pretrained`: config.json + safetensors), converted as diffusers' DiT conversion does."""
    cfg = diffusers_layout_of(model.config, norm_eps)
    target = DiTTransformer2DModel(**diffusers_kwargs(cfg))
    state = official_to_diffusers(model.state_dict(), model.config)
    target.load_state_dict(state)
    target.save_pretrained(str(path), safe_serialization=True)
    return Path(path)


def load_diffusers_dit(folder: DiffusersFolder) -> DiffusersDiT:
    """The DiTTransformer2DModel saved in `folder`, its weights read with safetensors, in float32."""
    config = config_from_diffusers(folder.config, where=str(folder.model_dir / "config.json"))  # before the weights
    model = load_weights_into(folder, DiTTransformer2DModel, CLASS_NAME, config)
    check_finite(model.state_dict(), str(folder.model_dir))
    return DiffusersDiT(model).eval()


def _check_blocks(model: nn.Module, cfg: DiTConfig) -> None:
    """The blocks are what the traceable forward assumes: plain self-attention, no cross-attention."""
    for i, block in enumerate(model.transformer_blocks):
        attn = block.attn1
        odd = [what for what, bad in (
            ("cross-attention (attn2)", getattr(block, "attn2", None) is not None),
            ("q/k norms", getattr(attn, "norm_q", None) is not None or getattr(attn, "norm_k", None) is not None),
            ("a residual connection inside attention", bool(getattr(attn, "residual_connection", False))),
            ("an output rescale factor", float(getattr(attn, "rescale_output_factor", 1.0)) != 1.0),
            ("a spatial or group norm in attention", getattr(attn, "spatial_norm", None) is not None
             or getattr(attn, "group_norm", None) is not None),
            ("positional embeddings inside the block", getattr(block, "pos_embed", None) is not None),
        ) if bad]
        if odd:
            raise TcgraphError(f"{CLASS_NAME} block {i} has {', '.join(odd)}: tcgraph's DiT adapter does not run it")
    pe = model.pos_embed
    if getattr(pe, "pos_embed", None) is None or getattr(pe, "layer_norm", False) or getattr(pe, "pos_embed_max_size", None):
        raise TcgraphError(f"{CLASS_NAME}: tcgraph runs the fixed sin-cos position table of DiT's PatchEmbed only")


def _embed(model: DiffusersDiT, x: torch.Tensor, t: torch.Tensor,
           y: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    h, tf = model.embed(x, t)
    return h, (tf, y)  # every block embeds (t, y) itself


DIFFUSERS_DIT = register_adapter(ModelAdapter(
    name=CLASS_NAME,
    model_type=DiffusersDiT,
    kinds=(BlockKind(
        name="block",
        block_type=DiffusersDiTBlock,
        blocks="transformer_blocks",
        modulation="modulation",  # (t features, y) -> shift, scale, gate of attn, then of mlp
        chunks=6,
        branches=(
            BranchSpec("attn", "attn1", Attention, "norm1.norm", 0, 1, 2,
                       AttentionSpec(out_proj="to_out.0", num_heads="heads", q_proj="to_q", k_proj="to_k", v_proj="to_v")),
            BranchSpec("mlp", "ff", FeedForward, "norm3", 3, 4, 5),
        ),
    ),),
    embed=_embed,
    final=lambda model, h, tf, y: model.final(h, tf, y),
    dims=config_dims,
))

load = load_diffusers_dit  # what `tcgraph.models.load_diffusers` calls for this class


# ---- the official layout in diffusers' names -----------------------------------------------


def diffusers_layout_of(config: DiTConfig, norm_eps: float = 1e-5) -> DiTConfig:
    """The diffusers-layout config of an official-layout one (what diffusers' DiT conversion makes:
    the same sizes, its default `norm_eps`)."""
    fields = {**config.__dict__, "layout": "diffusers", "norm_eps": norm_eps}
    return DiTConfig(**fields)


def official_to_diffusers(state: dict, config: DiTConfig) -> dict:
    """An official-layout DiT state dict (`tcgraph.models.official.dit.DiT`) in diffusers' names and split
    (q/k/v apart, the timestep and label embedders copied into every block): the weights of the
    DiTTransformer2DModel that diffusers' own conversion of the same checkpoint gives."""
    d = config.hidden_size
    out = {"pos_embed.proj.weight": state["x_embedder.proj.weight"], "pos_embed.proj.bias": state["x_embedder.proj.bias"]}
    embed = {"norm1.emb.timestep_embedder.linear_1": "t_embedder.mlp.0", "norm1.emb.timestep_embedder.linear_2": "t_embedder.mlp.2"}
    for i in range(config.depth):
        to, of = f"transformer_blocks.{i}.", f"blocks.{i}."
        for new, old in {**embed, "norm1.linear": of + "adaLN_modulation.1", "attn1.to_out.0": of + "attn.proj",
                         "ff.net.0.proj": of + "mlp.fc1", "ff.net.2": of + "mlp.fc2"}.items():
            out[to + new + ".weight"], out[to + new + ".bias"] = state[old + ".weight"], state[old + ".bias"]
        out[to + "norm1.emb.class_embedder.embedding_table.weight"] = state["y_embedder.embedding_table.weight"]
        for j, name in enumerate(("to_q", "to_k", "to_v")):
            out[f"{to}attn1.{name}.weight"] = state[of + "attn.qkv.weight"][j * d:(j + 1) * d]
            out[f"{to}attn1.{name}.bias"] = state[of + "attn.qkv.bias"][j * d:(j + 1) * d]
    for new, old in (("proj_out_1", "final_layer.adaLN_modulation.1"), ("proj_out_2", "final_layer.linear")):
        out[new + ".weight"], out[new + ".bias"] = state[old + ".weight"], state[old + ".bias"]
    return {k: v.clone().contiguous() for k, v in out.items()}
