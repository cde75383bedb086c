"""Model configs: `DiTConfig`, the sizes and family of a DiT-shaped model (official DiT, diffusers'
DiTTransformer2DModel and PixArtTransformer2DModel alike), and the registry of named configs (the
paper's `DiT-S/2` … `DiT-XL/8`, the demo's `digits`), hashed into artifact manifests."""
from __future__ import annotations

from dataclasses import asdict, dataclass

from tcgraph.errors import TcgraphError
from tcgraph.models.families import DEFAULT_FAMILY, Family, family

#################################################################################
#                                  Configs                                      #
#################################################################################


@dataclass(frozen=True)
class DiTConfig:
    """Everything needed to build a DiT; hashed into artifact manifests."""

    input_size: int = 32  # latent (or pixel) side H = W
    patch_size: int = 2
    in_channels: int = 4
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    class_dropout_prob: float = 0.1  # > 0 adds the null class used by guidance
    num_classes: int = 1000
    learn_sigma: bool = True
    # Parameter layout and its forward: "official" (facebookresearch/DiT, `DiT` below) or
    # "diffusers" (diffusers' DiTTransformer2DModel, `tcgraph.models.diffusers.dit`), whose
    # timestep features use a frequency shift of 1 and whose MLP norm uses `norm_eps`.
    # "pixart": diffusers' PixArtTransformer2DModel (`tcgraph.models.diffusers.pixart`), conditioned
    # on text embeddings of width `caption_channels` instead of class ids (num_classes 0).
    layout: str = DEFAULT_FAMILY  # the model family (`tcgraph.models.families`); the key older manifests use
    norm_eps: float = 1e-6  # eps of the norm before the MLP (official: 1e-6 everywhere)
    caption_channels: int = 0  # width of the text embeddings a text-conditioned model reads; 0: class ids
    micro_size: int = 0  # PixArt-alpha 1024's micro-conditions: the square image side in pixels they name; 0: none

    @property
    def text_conditioned(self) -> bool:
        """Whether the model reads text embeddings (`encoder_hidden_states`) rather than class ids."""
        return self.caption_channels > 0

    @property
    def family(self) -> Family:
        """The model family this config builds (`tcgraph.models.families`), named by `layout`."""
        return family(self.layout)

    @property
    def branches(self) -> tuple:
        """Each block's branches in recipe order, as the family has them: DiT's attn, mlp; PixArt's attn,
        cross, mlp; one tuple per block where a family's blocks differ (`Recipe.branches`)."""
        if self.family.layout is None:
            return self.family.branches
        names = self.block_layout().branches()
        return names[0] if len(set(names)) == 1 else names

    def block_layout(self):
        """Each block's branches and the streams each writes (`tcgraph.models.layout.Layout`)."""
        return self.family.block_layout(self)

    def __post_init__(self) -> None:
        family(self.layout)  # an unknown family is refused with the list
        if self.input_size % self.patch_size:
            raise TcgraphError(
                f"input_size {self.input_size} is not a multiple of patch_size {self.patch_size}; "
                "choose sizes so that the image splits into whole patches"
            )
        if self.hidden_size % self.num_heads:
            raise TcgraphError(
                f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}"
            )

    @property
    def num_tokens(self) -> int:
        return (self.input_size // self.patch_size) ** 2

    @property
    def out_channels(self) -> int:
        return self.in_channels * 2 if self.learn_sigma else self.in_channels

    @property
    def mlp_hidden(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)

    def to_dict(self) -> dict:
        """The fields as a dict; `layout`, `norm_eps`, `caption_channels`, `micro_size` only where they differ from the official
        DiT's, so that configs (and manifest hashes) written before they existed stay the same."""
        d = asdict(self)
        for name, default in _LATER_FIELDS.items():
            if d[name] == default:
                del d[name]
        return d


_LATER_FIELDS = {"layout": DEFAULT_FAMILY, "norm_eps": 1e-6, "caption_channels": 0,
                 "micro_size": 0}  # fields added after manifests existed


def _paper(depth: int, hidden: int, heads: int, patch: int) -> DiTConfig:
    return DiTConfig(depth=depth, hidden_size=hidden, num_heads=heads, patch_size=patch)


# The paper's twelve configs (Table 1 of Peebles & Xie), for 256x256 images (32x32 latents).
# Pass `input_size=64` through `make_config` for the 512x512 checkpoints.
CONFIGS: dict[str, DiTConfig] = {}
for _name, (_depth, _hidden, _heads) in {
    "S": (12, 384, 6),
    "B": (12, 768, 12),
    "L": (24, 1024, 16),
    "XL": (28, 1152, 16),
}.items():
    for _patch in (2, 4, 8):
        CONFIGS[f"DiT-{_name}/{_patch}"] = _paper(_depth, _hidden, _heads, _patch)

# The demo model: sklearn's 8x8 digits upsampled to 16x16, pixel space, patch 2 -> 64 tokens.
CONFIGS["digits"] = DiTConfig(
    input_size=16,
    patch_size=2,
    in_channels=1,
    hidden_size=128,
    depth=6,
    num_heads=4,
    mlp_ratio=4.0,
    class_dropout_prob=0.1,
    num_classes=10,
    learn_sigma=False,
)


# Registered configs whose models denoise pixels in [-1, 1] (DDIM clips x0 for them by default).
PIXEL_SPACE = ("digits",)

# The text-conditioned demo ("digits-text", `tcgraph.demos.digits_text`): a PixArtTransformer2DModel
# of the digits DiT's size, conditioned on a 32-wide prompt encoder; pixel space too. Not in CONFIGS
# (which name the official layout's configs for checkpoints): its folder's config.json says it.
TEXT_DEMO = DiTConfig(input_size=16, patch_size=2, in_channels=1, hidden_size=128, depth=6, num_heads=4,
                      mlp_ratio=4.0, class_dropout_prob=0.0, num_classes=0, learn_sigma=False, layout="pixart",
                      norm_eps=1e-6, caption_channels=32)


def make_config(name: str, **overrides) -> DiTConfig:
    """Look up a registered config by the paper's name; `overrides` replace fields."""
    if name not in CONFIGS:
        raise TcgraphError(
            f"unknown model config {name!r}; valid names: {', '.join(CONFIGS)}"
        )
    base = asdict(CONFIGS[name])
    unknown = set(overrides) - set(base)
    if unknown:
        raise TcgraphError(
            f"unknown config fields {sorted(unknown)}; valid fields: {sorted(base)}"
        )
    base.update(overrides)
    return DiTConfig(**base)
