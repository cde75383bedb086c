"""The family registry: every config names its family, manifests rebuild configs through it, unknown
names and modes are one clear error, and the declared graph inputs are the plan's model inputs."""
from __future__ import annotations

import dataclasses

import pytest

from tcgraph.errors import TcgraphError
from tcgraph.models.config import CONFIGS, TEXT_DEMO, DiTConfig
from tcgraph.models.families import FAMILIES, Family, config_from_dict, family, family_of_diffusers_class
from tcgraph.sampling import SamplerSettings


def test_configs_round_trip_through_their_family():
    for cfg in (CONFIGS["digits"], dataclasses.replace(CONFIGS["digits"], layout="diffusers", norm_eps=1e-5),
                TEXT_DEMO):
        assert config_from_dict(cfg.to_dict()) == cfg and cfg.family is FAMILIES[cfg.layout]
    assert "layout" not in CONFIGS["digits"].to_dict()  # the default family is omitted: hashes unchanged
    assert family_of_diffusers_class("PixArtTransformer2DModel") is FAMILIES["pixart"]
    assert family_of_diffusers_class("FluxTransformer2DModel") is FAMILIES["flux"]
    assert family_of_diffusers_class("UNet2DConditionModel") is None


def test_unknown_families_and_guidance_modes_are_refused():
    with pytest.raises(TcgraphError, match=r"unknown model family 'unet'; families: official, diffusers, pixart"):
        family("unet")
    with pytest.raises(TcgraphError, match="unknown model family"):
        DiTConfig(layout="unet")
    with pytest.raises(TcgraphError, match=r"guidance 'double'; use one of"):
        dataclasses.replace(FAMILIES["official"], guidance="double")
    later = dataclasses.replace(FAMILIES["official"], guidance="input")
    cfg_settings = SamplerSettings(num_steps=2, batch=2, cfg_scale=2.0, resolution=16)
    with pytest.raises(TcgraphError, match="take guidance 'input'; the settings say 'cfg'"):
        later.graph_inputs(CONFIGS["digits"], cfg_settings)
    inputs = later.graph_inputs(CONFIGS["digits"], dataclasses.replace(cfg_settings, guidance="input"))
    assert [(i.name, i.shape, i.dtype) for i in inputs] == [
        ("x", (2, 1, 16, 16), "float32"), ("t", (2,), "int64"), ("y", (2,), "int64"), ("guidance", (2,), "float32")]


@pytest.mark.parametrize("cfg, text_length", [(CONFIGS["digits"], 0), (TEXT_DEMO, 8)])
def test_declared_inputs_are_the_plans_model_inputs(cfg, text_length):
    s = SamplerSettings(num_steps=2, batch=3, cfg_scale=2.0, resolution=cfg.input_size, text_length=text_length)
    inputs = cfg.family.graph_inputs(cfg, s)
    assert tuple(i.name for i in inputs) == s.model_inputs
    assert inputs[0].shape == (6, cfg.in_channels, cfg.input_size, cfg.input_size)  # both CFG halves
    assert isinstance(cfg.family, Family) and cfg.family.graph_output_shape(cfg, s)[0] == 6


@pytest.mark.parametrize("name,overrides", [("digits", {}), ("DiT-S/2", {}), ("DiT-B/4", {"input_size": 64}),
                                            ("DiT-S/8", {"class_dropout_prob": 0.0, "learn_sigma": False})])
def test_official_shapes_are_the_built_models_in_order(name, overrides):
    """The official family's state-dict shapes, written from the config, are a built DiT's, key for key in order."""
    import torch

    from tcgraph.models.config import make_config
    from tcgraph.models.official.checkpoint import official_state_dict_shapes
    from tcgraph.models.official.dit import DiT

    cfg = make_config(name, **overrides)
    with torch.device("meta"):
        model = DiT(cfg)
    assert list(official_state_dict_shapes(cfg).items()) == [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
