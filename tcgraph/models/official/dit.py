"""Diffusion Transformer (DiT), Peebles & Xie 2023, in the official parameter layout.

Parameter names follow facebookresearch/DiT `models.py` exactly, so an official
checkpoint such as `DiT-XL-2-256x256.pt` loads as is. The model is written so that
torch.fx traces it with each `DiTBlock` as one leaf module: no data-dependent Python
control flow and no shape reads turned into Python ints inside `forward`.

Shape legend: N batch, C channels, H = W image side, T tokens = (H / p) ** 2,
D hidden size, p patch size.
"""
from __future__ import annotations

import math
from dataclasses import asdict

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from tcgraph.errors import TcgraphError
# the config registry, which every family's model reads (official, diffusers DiT, PixArt), kept importable here
from tcgraph.models.config import CONFIGS, PIXEL_SPACE, TEXT_DEMO, DiTConfig, make_config  # noqa: F401

#################################################################################
#               Embedding layers for timesteps and class labels                 #
#################################################################################


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class TimestepEmbedder(nn.Module):
    """Scalar timesteps -> D-dim vectors: sinusoidal features, then a 2-layer MLP."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )
        self.frequency_embedding_size = frequency_embedding_size

    @staticmethod
    def timestep_embedding(t: torch.Tensor, dim: int, max_period: int = 10000) -> torch.Tensor:
        half = dim // 2
        freqs = torch.exp(
            -math.log(max_period) * torch.arange(start=0, end=half, dtype=torch.float32, device=t.device) / half
        )  # (half,)
        args = t[:, None].float() * freqs[None]  # (N, half)
        embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (N, 2 * half)
        if dim % 2:
            embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
        return embedding

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        t_freq = self.timestep_embedding(t, self.frequency_embedding_size)  # (N, 256)
        return self.mlp(t_freq)  # (N, D)


class LabelEmbedder(nn.Module):
    """Class labels -> D-dim vectors; row `num_classes` is the null class for guidance."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        use_cfg_embedding = int(dropout_prob > 0)
        self.embedding_table = nn.Embedding(num_classes + use_cfg_embedding, hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def token_drop(self, labels: torch.Tensor, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        if force_drop_ids is None:
            drop_ids = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        else:
            drop_ids = force_drop_ids == 1
        return torch.where(drop_ids, self.num_classes, labels)

    def forward(self, labels: torch.Tensor, train: bool, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        use_dropout = self.dropout_prob > 0
        if (train and use_dropout) or (force_drop_ids is not None):
            labels = self.token_drop(labels, force_drop_ids)
        return self.embedding_table(labels)  # (N, D)


class PatchEmbed(nn.Module):
    """(N, C, H, W) -> (N, T, D) with a strided convolution (timm's PatchEmbed layout)."""

    def __init__(self, patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)  # (N, D, H/p, W/p)
        return x.flatten(2).transpose(1, 2)  # (N, T, D)


#################################################################################
#                                 Core DiT Model                                #
#################################################################################


class Attention(nn.Module):
    """Multi-head self-attention with timm's parameter names (`qkv`, `proj`)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        qkv = self.qkv(x).reshape(B, T, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (3, N, h, T, d)
        q, k, v = qkv[0], qkv[1], qkv[2]  # (N, h, T, d) each
        x = F.scaled_dot_product_attention(q, k, v)  # (N, h, T, d)
        x = x.transpose(1, 2).reshape(B, T, D)  # (N, T, D)
        return self.proj(x)  # (N, T, D)


class Mlp(nn.Module):
    """fc1 -> tanh-GELU -> fc2, timm's parameter names."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, bias=True)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))  # (N, T, D)


class DiTBlock(nn.Module):
    """A DiT block with adaLN-Zero conditioning.

    The two branches (`attn`, `mlp`) are plain submodules whose outputs are multiplied by
    their adaLN gates: the caching passes rely on exactly this structure.
    """

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)  # (N, D) each
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))  # (N, T, D)
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))  # (N, T, D)
        return x


class FinalLayer(nn.Module):
    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)  # (N, D) each
        x = modulate(self.norm_final(x), shift, scale)  # (N, T, D)
        return self.linear(x)  # (N, T, p * p * C_out)


class DiT(nn.Module):
    """Diffusion model with a Transformer backbone; `forward(x, t, y)` -> model output."""

    def __init__(self, config: DiTConfig):
        super().__init__()
        if config.family.module != __name__ or config.norm_eps != 1e-6:  # the family this module implements
            raise TcgraphError(
                f"DiT builds the official DiT (norm eps 1e-6); this config is of the family {config.family.title}, "
                f"norm eps {config.norm_eps}: use tcgraph.models.build_model, which builds every family"
            )
        self.config = config
        self.learn_sigma = config.learn_sigma
        self.in_channels = config.in_channels
        self.out_channels = config.out_channels
        self.patch_size = config.patch_size
        self.num_heads = config.num_heads
        self.grid = config.input_size // config.patch_size  # tokens per side, a constant for tracing

        self.x_embedder = PatchEmbed(config.patch_size, config.in_channels, config.hidden_size)
        self.t_embedder = TimestepEmbedder(config.hidden_size)
        self.y_embedder = LabelEmbedder(config.num_classes, config.hidden_size, config.class_dropout_prob)
        # Fixed sin-cos embedding; a Parameter (not a buffer) so the official state dict matches.
        self.pos_embed = nn.Parameter(torch.zeros(1, config.num_tokens, config.hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList(
            [DiTBlock(config.hidden_size, config.num_heads, config.mlp_ratio) for _ in range(config.depth)]
        )
        self.final_layer = FinalLayer(config.hidden_size, config.patch_size, self.out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        def _basic_init(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                torch.nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.constant_(module.bias, 0)

        self.apply(_basic_init)
        pos_embed = get_2d_sincos_pos_embed(self.pos_embed.shape[-1], self.grid)
        self.pos_embed.data.copy_(torch.from_numpy(pos_embed).float().unsqueeze(0))
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
        nn.init.constant_(self.x_embedder.proj.bias, 0)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        # adaLN-Zero: every block starts as the identity.
        for block in self.blocks:
            nn.init.constant_(block.adaLN_modulation[-1].weight, 0)
            nn.init.constant_(block.adaLN_modulation[-1].bias, 0)
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].weight, 0)
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].bias, 0)
        nn.init.constant_(self.final_layer.linear.weight, 0)
        nn.init.constant_(self.final_layer.linear.bias, 0)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        c, p, g = self.out_channels, self.patch_size, self.grid
        x = x.reshape(x.shape[0], g, g, p, p, c)  # (N, H/p, W/p, p, p, C_out)
        x = x.permute(0, 5, 1, 3, 2, 4)  # (N, C_out, H/p, p, W/p, p)
        return x.reshape(x.shape[0], c, g * p, g * p)  # (N, C_out, H, W)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x = self.x_embedder(x) + self.pos_embed  # (N, T, D)
        t = self.t_embedder(t)  # (N, D)
        y = self.y_embedder(y, self.training)  # (N, D)
        c = t + y  # (N, D)
        for block in self.blocks:
            x = block(x, c)  # (N, T, D)
        x = self.final_layer(x, c)  # (N, T, p * p * C_out)
        return self.unpatchify(x)  # (N, C_out, H, W)

    @property
    def null_class(self) -> int:
        """Label id of the unconditional (null) class used by classifier-free guidance."""
        return self.config.num_classes


#################################################################################
#                   Sine/Cosine Positional Embedding Functions                  #
#################################################################################
# https://github.com/facebookresearch/mae/blob/main/util/pos_embed.py (the same math)


def get_2d_sincos_pos_embed(embed_dim: int, grid_size: int) -> np.ndarray:
    """(grid_size ** 2, embed_dim) fixed embedding, rows in raster order."""
    grid_h = np.arange(grid_size, dtype=np.float32)
    grid_w = np.arange(grid_size, dtype=np.float32)
    grid = np.meshgrid(grid_w, grid_h)  # w goes first
    grid = np.stack(grid, axis=0).reshape([2, 1, grid_size, grid_size])
    emb_h = _1d_sincos(embed_dim // 2, grid[0])
    emb_w = _1d_sincos(embed_dim // 2, grid[1])
    return np.concatenate([emb_h, emb_w], axis=1)


def _1d_sincos(embed_dim: int, pos: np.ndarray) -> np.ndarray:
    omega = np.arange(embed_dim // 2, dtype=np.float64)
    omega /= embed_dim / 2.0
    omega = 1.0 / 10000**omega  # (D/2,)
    pos = pos.reshape(-1)  # (M,)
    out = np.einsum("m,d->md", pos, omega)  # (M, D/2)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)  # (M, D)


def randomize_weights(model: DiT, std: float = 0.02, seed: int = 0) -> DiT:
    """Random non-zero weights (pos_embed kept), for speed benchmarks and tests.

    adaLN-Zero initialisation makes every block the identity and many tensors equal
    (zeros), which would hide wrong rewrites and let weight deduplication cheat.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name != "pos_embed":
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model.eval()


def build_model(config: DiTConfig | str, **overrides) -> DiT:
    """A freshly initialised DiT in eval mode from a config or a registered name (the official
    layout; `tcgraph.models.build_model` builds either layout)."""
    if isinstance(config, str):
        config = make_config(config, **overrides)
    elif overrides:
        config = DiTConfig(**{**asdict(config), **overrides})
    return DiT(config).eval()
