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
    assert family_of_diffusers_class("FluxTransformer2DModel") is None


def test_unknown_families_and_guidance_modes_are_refused():
    with pytest.raises(TcgraphError, match=r"unknown model family 'flux'; families: official, diffusers, pixart"):
        family("flux")
    with pytest.raises(TcgraphError, match="unknown model family"):
        DiTConfig(layout="flux")
    with pytest.raises(TcgraphError, match=r"guidance 'double'; use one of"):
        dataclasses.replace(FAMILIES["official"], guidance="double")
    later = dataclasses.replace(FAMILIES["official"], guidance="input")
    with pytest.raises(TcgraphError, match="guidance mode 'input' has no graph inputs yet"):
        later.graph_inputs(CONFIGS["digits"], SamplerSettings(num_steps=2, batch=2, cfg_scale=2.0, resolution=16))


@pytest.mark.parametrize("cfg, text_length", [(CONFIGS["digits"], 0), (TEXT_DEMO, 8)])
def test_declared_inputs_are_the_plans_model_inputs(cfg, text_length):
    s = SamplerSettings(num_steps=2, batch=3, cfg_scale=2.0, resolution=cfg.input_size, text_length=text_length)
    inputs = cfg.family.graph_inputs(cfg, s)
    assert tuple(i.name for i in inputs) == s.model_inputs
    assert inputs[0].shape == (6, cfg.in_channels, cfg.input_size, cfg.input_size)  # both CFG halves
    assert isinstance(cfg.family, Family) and cfg.family.graph_output_shape(cfg, s)[0] == 6
