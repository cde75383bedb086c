"""The tiny DiT's fora:2 artifact, made once for the inspection tests (read-only: a test that edits
the folder works on a copy)."""
from __future__ import annotations

import pytest
import torch

from tcgraph import api
from tcgraph.plan import make_plan
from tcgraph.sampling import SamplerSettings
from tests.inspection.artifacts import STEPS, tiny_dit


@pytest.fixture(scope="session")
def fora2(tmp_path_factory):
    torch.set_num_threads(min(2, torch.get_num_threads()))
    model = tiny_dit()
    s = SamplerSettings(num_steps=STEPS, cfg_scale=2.0, batch=1, resolution=model.config.input_size)
    out = tmp_path_factory.mktemp("insp") / "fora2"
    return api.transform(model, make_plan("fora:2", model.config, s), out, progress=False)
