"""The parameter shapes of tcgraph's DiT (official layout) from its config alone: no torch, no module
built, so that loading an artifact checks its stored parameters without importing torch."""
from __future__ import annotations

from functools import lru_cache

from tcgraph.models.config import DiTConfig


@lru_cache(maxsize=64)
def _shapes_cached(config: DiTConfig) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """The state dict of `DiT(config)` in its order, from the config alone (no module is built: a
    meta-device build initialises an embedding table, which imports torch's compiler, seconds on
    every artifact load; the adapter tester checks these shapes against a built model)."""
    d, p, c, h = config.hidden_size, config.patch_size, config.in_channels, config.mlp_hidden
    out = [("pos_embed", (1, config.num_tokens, d)),
           ("x_embedder.proj.weight", (d, c, p, p)), ("x_embedder.proj.bias", (d,)),
           ("t_embedder.mlp.0.weight", (d, 256)), ("t_embedder.mlp.0.bias", (d,)),
           ("t_embedder.mlp.2.weight", (d, d)), ("t_embedder.mlp.2.bias", (d,)),
           ("y_embedder.embedding_table.weight", (config.num_classes + int(config.class_dropout_prob > 0), d))]
    for i in range(config.depth):
        out += [(f"blocks.{i}.{name}", shape) for name, shape in (
            ("attn.qkv.weight", (3 * d, d)), ("attn.qkv.bias", (3 * d,)),
            ("attn.proj.weight", (d, d)), ("attn.proj.bias", (d,)),
            ("mlp.fc1.weight", (h, d)), ("mlp.fc1.bias", (h,)), ("mlp.fc2.weight", (d, h)), ("mlp.fc2.bias", (d,)),
            ("adaLN_modulation.1.weight", (6 * d, d)), ("adaLN_modulation.1.bias", (6 * d,)))]
    out += [("final_layer.linear.weight", (p * p * config.out_channels, d)),
            ("final_layer.linear.bias", (p * p * config.out_channels,)),
            ("final_layer.adaLN_modulation.1.weight", (2 * d, d)), ("final_layer.adaLN_modulation.1.bias", (2 * d,))]
    return tuple(out)


def official_state_dict_shapes(config: DiTConfig) -> dict[str, tuple[int, ...]]:
    """{parameter name: shape} of tcgraph's DiT built from `config`, without allocating it."""
    return dict(_shapes_cached(config))
