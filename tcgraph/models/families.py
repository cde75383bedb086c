"""Model families: one registry entry per architecture tcgraph transforms, in place of tests on a layout string.

A family says everything the rest of tcgraph asks of an architecture without naming its
modules: how to build one from a config (random weights), how to load one from a diffusers
folder, the shapes of its state dict (to infer or check a checkpoint's config), its blocks'
branches in recipe order, how guidance reaches it, and which of its per-step costs are shared
by all blocks. The adapter (`tcgraph.models.adapter`) tells the passes how its blocks are
made; the family is how the model layer finds that adapter's model.

A config names its family in the field that older manifests call `layout` (kept under that
key, omitted for the default, so that configs and their hashes stay what they were).
Everything here is data plus lazy imports: the registry loads no model code until a family
is used, so `tcgraph.models.config` can ask it about a config without an import cycle.

To add a family: write its module (config reading, build, load, adapter registration) and
add one `Family` to `FAMILIES`.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Protocol

from tcgraph.errors import TcgraphError, UsageError

if TYPE_CHECKING:
    import torch.nn as nn

from tcgraph.names import GUIDANCE_MODES  # noqa: E402  (a CFG-doubled batch, a guidance input, none)


@dataclass(frozen=True)
class GraphInput:
    """One model input of every variant graph, as a family declares it for given settings.

    `kind` says what the values are, for whoever must make or check them: "latent" (noise),
    "timestep", "class" (ids in 0..num_classes, the last the null class), "text" (embeddings),
    "mask" (1 = a token, 0 = padding), "pooled" (pooled text embeddings), "guidance" (a scale).
    """

    name: str
    shape: tuple[int, ...]
    dtype: str  # torch dtype name: "float32", "int64"
    kind: str


class ModelConfig(Protocol):
    """What plan/, export/ and sampling/ read of a model's config: sizes and the family, no modules."""

    depth: int
    hidden_size: int
    num_heads: int
    in_channels: int
    input_size: int  # the static resolution (latent or pixel side)
    patch_size: int

    @property
    def num_tokens(self) -> int: ...  # image tokens

    @property
    def family(self) -> "Family": ...

    @property
    def branches(self) -> tuple: ...  # `Recipe.branches`: one tuple, or one per block

    @property
    def text_conditioned(self) -> bool: ...

    def block_layout(self): ...  # tcgraph.models.layout.Layout: each block's branches and their streams

    def to_dict(self) -> dict: ...


@dataclass(frozen=True)
class Family:
    """One architecture: where its code lives and the facts the generic code asks of it.

    `module` holds `builder` (config -> a freshly initialised model) and, for a family read
    from diffusers folders (`diffusers_class`), `load(folder)`; `shapes` names the function
    (`module:function`) that gives {name: shape} of a config's state dict without memory.
    """

    name: str  # the value a config stores (under "layout"): "official", "diffusers", "pixart"
    title: str  # for messages: what a user calls it
    module: str
    builder: str
    shapes: str
    branches: tuple[str, ...]  # every block's branches, in recipe order (with `layout`: all of them)
    diffusers_class: str | None = None
    guidance: str = "cfg"
    shared_modulation: bool = False  # one adaLN linear for all blocks (adaLN-single) instead of one per block
    config: str = "tcgraph.models.config:DiTConfig"  # module:class of its config (to_dict / class(**dict))
    # module:function, config -> per block ((branch, streams), ...): for a family whose blocks differ
    # or write other streams than the image (tcgraph.models.layout); None: every block has `branches`,
    # each writing the image rows
    layout: str | None = None
    resizable: bool = False  # a folder loads at any latent side (RoPE, a cropped position table)

    def __post_init__(self) -> None:
        if self.guidance not in GUIDANCE_MODES:
            raise TcgraphError(f"family {self.name}: guidance {self.guidance!r}; use one of {GUIDANCE_MODES}")

    def _function(self, module: str, name: str) -> Callable[..., Any]:
        return getattr(importlib.import_module(module), name)

    def build(self, config, **overrides) -> "nn.Module":
        """A freshly initialised model of this family, in eval mode."""
        return self._function(self.module, self.builder)(config, **overrides)

    def load_folder(self, folder, input_size: int | None = None) -> "nn.Module":
        """The model of a diffusers folder (`tcgraph.models.diffusers.folder.read_folder`'s result), at the
        latent side `input_size` where the family's resolution is free (`resizable`; None: the folder's)."""
        if self.diffusers_class is None:
            raise TcgraphError(f"{self.title} models are not read from diffusers folders")
        if input_size is None:
            return self._function(self.module, "load")(folder)
        if not self.resizable:
            raise UsageError(f"a {self.title}'s resolution is its config's sample_size (its position table): drop "
                             "the resolution (--resolution)")
        return self._function(self.module, "load")(folder, input_size=input_size)

    def guidance_of(self, config) -> str:
        """How guidance reaches a model of `config`: the config's own `guidance` where it has one (FLUX:
        an input with a guidance embedding, none without), else the family's."""
        return getattr(config, "guidance", None) or self.guidance

    def graph_inputs(self, config, settings) -> tuple[GraphInput, ...]:
        """The model inputs every variant graph reads, in order, before its caches: the noisy
        latent, the timestep, then the conditioning (class ids, or text embeddings and their mask),
        or, for a model with a pooled text input (`pooled_channels`), text embeddings and pooled embeddings),
        then, for a model whose guidance is an input, the guidance scale; with the static shapes of
        `settings` (its model batch counts both CFG halves where guidance doubles the batch)."""
        from tcgraph.names import GUIDANCE, POOLED, TEXT, TEXT_MASK, T, X, Y

        guidance = self.guidance_of(config)
        if settings.guidance != guidance:
            raise TcgraphError(f"{self.title} models take guidance {guidance!r}; the settings say "
                               f"{settings.guidance!r}: make the plan for this model")
        b, side = settings.model_batch, settings.resolution
        t_dtype = settings.timestep_dtype_name
        inputs = [GraphInput(X, (b, config.in_channels, side, side), "float32", "latent"),
                  GraphInput(T, (b,), t_dtype, "timestep")]
        if config.text_conditioned:
            length = settings.text_length
            pooled = getattr(config, "pooled_channels", 0)
            inputs += [GraphInput(TEXT, (b, length, config.caption_channels), "float32", "text"),
                       GraphInput(POOLED, (b, pooled), "float32", "pooled") if pooled
                       else GraphInput(TEXT_MASK, (b, length), "float32", "mask")]
        else:
            inputs.append(GraphInput(Y, (b,), "int64", "class"))
        if guidance == "input":
            inputs.append(GraphInput(GUIDANCE, (b,), "float32", "guidance"))
        return tuple(inputs)

    def graph_output_shape(self, config, settings) -> tuple[int, ...]:
        """Shape of a variant's `out`: the model output of the whole model batch."""
        return settings.model_batch, config.out_channels, settings.resolution, settings.resolution

    def block_layout(self, config):
        """Each block's branches and the streams they write (`tcgraph.models.layout.Layout`)."""
        from tcgraph.models.layout import Layout

        if self.layout is None:
            return Layout.image((self.branches,) * config.depth)
        module, name = self.layout.split(":")
        return Layout(self._function(module, name)(config))

    def config_class(self) -> type:
        module, name = self.config.split(":")
        return self._function(module, name)

    def state_dict_shapes(self, config) -> dict[str, tuple[int, ...]]:
        module, name = self.shapes.split(":")
        return self._function(module, name)(config)


FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("official", "DiT (facebookresearch/DiT)", "tcgraph.models.official.dit", "build_model",
           "tcgraph.models.official.shapes:official_state_dict_shapes", ("attn", "mlp")),
    Family("diffusers", "diffusers DiTTransformer2DModel", "tcgraph.models.diffusers.dit", "build_diffusers_dit",
           "tcgraph.models.diffusers.config:dit_state_dict_shapes", ("attn", "mlp"),
           diffusers_class="DiTTransformer2DModel"),
    Family("pixart", "diffusers PixArtTransformer2DModel", "tcgraph.models.diffusers.pixart",
           "build_diffusers_pixart", "tcgraph.models.diffusers.config:pixart_state_dict_shapes", ("attn", "cross", "mlp"),
           diffusers_class="PixArtTransformer2DModel", shared_modulation=True),
    Family("flux", "diffusers FluxTransformer2DModel", "tcgraph.models.diffusers.flux", "build_diffusers_flux",
           "tcgraph.models.diffusers.flux_config:flux_state_dict_shapes", ("attn", "mlp", "mlp_text"),
           diffusers_class="FluxTransformer2DModel", guidance="input", resizable=True,  # per config: FluxConfig.guidance
           config="tcgraph.models.diffusers.flux_config:FluxConfig",
           layout="tcgraph.models.diffusers.flux_config:flux_layout"),
    Family("sd3", "diffusers SD3Transformer2DModel", "tcgraph.models.diffusers.sd3", "build_diffusers_sd3",
           "tcgraph.models.diffusers.sd3:sd3_state_dict_shapes", ("attn", "attn_image", "mlp", "mlp_text"),
           diffusers_class="SD3Transformer2DModel", config="tcgraph.models.diffusers.sd3_config:SD3Config", resizable=True,
           layout="tcgraph.models.diffusers.sd3:layout"),
)}
DEFAULT_FAMILY = "official"


def family(name: str) -> Family:
    """The registered family `name`; refuses an unknown one with the list."""
    if not isinstance(name, str) or name not in FAMILIES:
        raise TcgraphError(f"unknown model family {name!r}; families: {', '.join(FAMILIES)}")
    return FAMILIES[name]


def family_of_diffusers_class(class_name: str) -> Family | None:
    """The family whose diffusers folders have `_class_name` == `class_name`, or None."""
    return next((f for f in FAMILIES.values() if f.diffusers_class == class_name), None)


def diffusers_classes() -> tuple[str, ...]:
    return tuple(f.diffusers_class for f in FAMILIES.values() if f.diffusers_class is not None)


def config_from_dict(raw: dict) -> ModelConfig:
    """The config a `to_dict()` wrote (a manifest's `model_config`), built by its family's config class."""
    if not isinstance(raw, dict):
        raise TcgraphError(f"a model config is a dict of its fields, got {type(raw).__name__}")
    return family(raw.get("layout", DEFAULT_FAMILY)).config_class()(**raw)
