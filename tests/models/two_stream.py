"""A test-only two-stream model (not a real family): the seams FLUX and SD3 will use, proven on a toy.

`TwoStreamToy` carries an image stream (16 tokens) and a text stream (the prompt's L tokens,
projected to the width) through two kinds of block, in the way an MMDiT does:

- `DoubleBlock` (kind "double"): each stream has its own modulation and norms; one joint
  attention over the text rows then the image rows (one branch, `attn`, writing both streams
  with each stream's gate), then an MLP per stream (`mlp` on the image rows, `mlp_text` on the
  text rows);
- `SingleBlock` (kind "single", parallel): one modulation; the streams concatenated, normed
  once, and attention and MLP side by side on all rows (both branches read the block's input),
  each added with the one gate.

Its joint attention projects every row with one q/k/v weight (official DiT `Attention`); a real
MMDiT projects each stream with its own. The family ("two-stream-toy") and the adapter are
registered only while a test module asks for them (`registered`).
"""
from __future__ import annotations

import contextlib
from dataclasses import replace

import torch
import torch.nn as nn

from tcgraph.models.adapter import ADAPTERS, BlockKind, BranchSpec, ModelAdapter, StreamRead, config_dims
from tcgraph.models.adapter import AttentionSpec
from tcgraph.models.config import DiTConfig
from tcgraph.models.families import FAMILIES, Family
from tcgraph.models.official.dit import Attention, FinalLayer, Mlp, PatchEmbed, TimestepEmbedder, modulate
from tcgraph.names import IMAGE, TEXT_STREAM

FAMILY = "two-stream-toy"


def _norm(d: int) -> nn.LayerNorm:
    return nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)


def _mlp(d: int, ratio: float) -> Mlp:
    return Mlp(d, int(d * ratio))


class DoubleBlock(nn.Module):
    def __init__(self, d: int, heads: int, ratio: float):
        super().__init__()
        self.mod_image = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))
        self.mod_text = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))
        self.norm1, self.norm1_text, self.norm2, self.norm2_text = _norm(d), _norm(d), _norm(d), _norm(d)
        self.attn = Attention(d, heads)
        self.mlp, self.mlp_text = _mlp(d, ratio), _mlp(d, ratio)

    def forward(self, img: torch.Tensor, txt: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mi, mt = self.mod_image(c).chunk(6, dim=1), self.mod_text(c).chunk(6, dim=1)
        joint = self.attn(torch.cat([modulate(self.norm1_text(txt), mt[0], mt[1]),
                                     modulate(self.norm1(img), mi[0], mi[1])], dim=1))
        length = txt.shape[1]
        txt = txt + mt[2].unsqueeze(1) * joint[:, :length]
        img = img + mi[2].unsqueeze(1) * joint[:, length:]
        img = img + mi[5].unsqueeze(1) * self.mlp(modulate(self.norm2(img), mi[3], mi[4]))
        txt = txt + mt[5].unsqueeze(1) * self.mlp_text(modulate(self.norm2_text(txt), mt[3], mt[4]))
        return img, txt


class SingleBlock(nn.Module):
    def __init__(self, d: int, heads: int, ratio: float):
        super().__init__()
        self.mod = nn.Sequential(nn.SiLU(), nn.Linear(d, 3 * d))
        self.norm = _norm(d)
        self.attn = Attention(d, heads)
        self.mlp = _mlp(d, ratio)

    def forward(self, img: torch.Tensor, txt: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        m = self.mod(c).chunk(3, dim=1)
        x = torch.cat([txt, img], dim=1)
        u = modulate(self.norm(x), m[0], m[1])
        x = x + m[2].unsqueeze(1) * self.attn(u) + m[2].unsqueeze(1) * self.mlp(u)
        length = txt.shape[1]
        return x[:, length:], x[:, :length]


def singles_of(config: DiTConfig) -> int:
    return max(1, config.depth // 2)


class TwoStreamToy(nn.Module):
    """depth - depth // 2 double blocks, then depth // 2 single blocks (one at least);
    text-conditioned (embeddings and their mask)."""

    def __init__(self, config: DiTConfig):
        super().__init__()
        self.config = config
        d = config.hidden_size
        self.x_embedder = PatchEmbed(config.patch_size, config.in_channels, d)
        self.pos_embed = nn.Parameter(torch.randn(1, config.num_tokens, d) * 0.1)
        self.t_embedder = TimestepEmbedder(d)
        self.text_proj = nn.Linear(config.caption_channels, d)
        self.pool_proj = nn.Linear(config.caption_channels, d)
        singles = singles_of(config)
        self.double_blocks = nn.ModuleList(DoubleBlock(d, config.num_heads, config.mlp_ratio)
                                           for _ in range(config.depth - singles))
        self.single_blocks = nn.ModuleList(SingleBlock(d, config.num_heads, config.mlp_ratio) for _ in range(singles))
        self.final_layer = FinalLayer(d, config.patch_size, config.out_channels)

    def embed(self, x, t, text, mask):
        keep = mask.unsqueeze(-1)
        txt = self.text_proj(text) * keep
        pooled = (text * keep).sum(1) / keep.sum(1).clamp(min=1.0)
        return self.x_embedder(x) + self.pos_embed, txt, self.t_embedder(t) + self.pool_proj(pooled)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        c, p = self.config.out_channels, self.config.patch_size
        h = w = self.config.input_size // p
        x = x.reshape(x.shape[0], h, w, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], c, h * p, w * p)

    def forward(self, x, t, encoder_hidden_states, encoder_attention_mask):
        img, txt, c = self.embed(x, t, encoder_hidden_states, encoder_attention_mask)
        for block in self.double_blocks:
            img, txt = block(img, txt, c)
        for block in self.single_blocks:
            img, txt = block(img, txt, c)
        return self.unpatchify(self.final_layer(img, c))


class GuidedToy(TwoStreamToy):
    """The toy as a guidance-distilled model: the guidance scale is an input (embedded into the
    conditioning vector like the timestep), one pass per step, no doubled batch."""

    def __init__(self, config: DiTConfig):
        super().__init__(config)
        self.g_embedder = TimestepEmbedder(config.hidden_size)

    def embed(self, x, t, text, mask, guidance):
        img, txt, c = super().embed(x, t, text, mask)
        return img, txt, c + self.g_embedder(guidance * 100.0)

    def forward(self, x, t, encoder_hidden_states, encoder_attention_mask, guidance):
        img, txt, c = self.embed(x, t, encoder_hidden_states, encoder_attention_mask, guidance)
        for block in self.double_blocks:
            img, txt = block(img, txt, c)
        for block in self.single_blocks:
            img, txt = block(img, txt, c)
        return self.unpatchify(self.final_layer(img, c))


ATTENTION = AttentionSpec(in_proj="qkv", out_proj="proj", num_heads="num_heads", head_dim="head_dim")


def _embed(model: TwoStreamToy, x, t, y):
    img, txt, c = model.embed(x, t, *y)
    return (img, txt), c


def _final(model: TwoStreamToy, h, c):
    return model.unpatchify(model.final_layer(h[0], c))


ADAPTER = ModelAdapter(
    name="TwoStreamToy",
    model_type=TwoStreamToy,
    streams=(IMAGE, TEXT_STREAM),
    kinds=(
        BlockKind(
            name="double", block_type=DoubleBlock, blocks="double_blocks",
            modulation=("mod_image", "mod_text"), chunks=(6, 6), streams=(IMAGE, TEXT_STREAM),
            branches=(
                BranchSpec("attn", "attn", Attention, None, None, None, None, ATTENTION,
                           reads=(StreamRead(TEXT_STREAM, "norm1_text", 0, 1, 2, modulation=1),
                                  StreamRead(IMAGE, "norm1", 0, 1, 2))),
                BranchSpec("mlp", "mlp", Mlp, "norm2", 3, 4, 5),
                BranchSpec("mlp_text", "mlp_text", Mlp, None, None, None, None,
                           reads=(StreamRead(TEXT_STREAM, "norm2_text", 3, 4, 5, modulation=1),)),
            )),
        BlockKind(
            name="single", block_type=SingleBlock, blocks="single_blocks", modulation="mod", chunks=3,
            streams=(IMAGE, TEXT_STREAM), parallel=True,
            branches=(
                BranchSpec("attn", "attn", Attention, None, None, None, None, ATTENTION,
                           reads=(StreamRead(TEXT_STREAM, "norm", 0, 1, 2), StreamRead(IMAGE, "norm", 0, 1, 2))),
                BranchSpec("mlp", "mlp", Mlp, None, None, None, None,
                           reads=(StreamRead(TEXT_STREAM, "norm", 0, 1, 2), StreamRead(IMAGE, "norm", 0, 1, 2))),
            )),
    ),
    embed=_embed,
    final=_final,
    dims=config_dims,
)


def _class(config: DiTConfig) -> type:
    return GuidedToy if config.family.guidance == "input" else TwoStreamToy


def build(config: DiTConfig, **overrides) -> TwoStreamToy:
    config = replace(config, **overrides) if overrides else config
    return _class(config)(config).eval()


def state_dict_shapes(config: DiTConfig) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in _class(config)(config).state_dict().items()}


def layout(config: DiTConfig):
    """Per block: the double blocks' attn (text, image rows), mlp (image), mlp_text (text); the
    single blocks' attn and mlp (text, image rows)."""
    both = (TEXT_STREAM, IMAGE)
    double = (("attn", both), ("mlp", (IMAGE,)), ("mlp_text", (TEXT_STREAM,)))
    singles = singles_of(config)
    return (double,) * (config.depth - singles) + ((("attn", both), ("mlp", both)),) * singles


TOY_FAMILY = Family(FAMILY, "two-stream test model", __name__, "build", f"{__name__}:state_dict_shapes",
                    ("attn", "mlp", "mlp_text"), layout=f"{__name__}:layout")
GUIDED_FAMILY = replace(TOY_FAMILY, name=f"{FAMILY}-guided", title="guidance-input two-stream test model",
                        guidance="input")


@contextlib.contextmanager
def registered():
    """The toy's families (with a doubled batch, and with a guidance input) and its adapter registered
    while the block runs (removed after)."""
    FAMILIES[FAMILY], FAMILIES[GUIDED_FAMILY.name] = TOY_FAMILY, GUIDED_FAMILY
    ADAPTERS[TwoStreamToy] = ADAPTERS[GuidedToy] = ADAPTER
    try:
        yield
    finally:
        for name in (FAMILY, GUIDED_FAMILY.name):
            FAMILIES.pop(name, None)
        for cls in (TwoStreamToy, GuidedToy):
            ADAPTERS.pop(cls, None)


def toy_config(**overrides) -> DiTConfig:
    """The toy's config (its family must be registered)."""
    return DiTConfig(**{**dict(input_size=8, patch_size=2, in_channels=2, hidden_size=32, depth=2, num_heads=2,
                               mlp_ratio=2.0, class_dropout_prob=0.0, num_classes=0, learn_sigma=False,
                               layout=FAMILY, caption_channels=8), **overrides})
