"""diffusers' SD3Transformer2DModel through every check of `AdapterTester` (tests/models/adapter_tester.py):
an SD3.5-like tiny model (qk-norm, the extra image attention `attn_image` in its first two blocks, a joint
block, the `context_pre_only` last block whose attention writes the image rows only), every action on
every branch through the passes against the eager reference, calibration's blended step, export, load
and sampling on ONNX Runtime and the torch backend.

Token actions fall on every block, so that each kind's attention computes its rows with its own `rows`
method (`AttentionSpec(rows=...)`): text rows always, image rows as chosen; the last block's attention
queries no text row and is partial (a dynamic action needs a branch whose input and output rows are the
same). tests/models/test_every_adapter.py imports this module, so that it counts the tester."""
from __future__ import annotations

import dataclasses

import pytest
import torch

pytest.importorskip("diffusers")

from diffusers import SD3Transformer2DModel  # noqa: E402

from tcgraph.models.diffusers.sd3 import SD3, DiffusersSD3  # noqa: E402
from tcgraph.models.diffusers.sd3_config import SD3Config, sd3_kwargs  # noqa: E402
from tcgraph.compile import build_variants  # noqa: E402
from tcgraph.errors import TcgraphError  # noqa: E402
from tcgraph.plan import COMPUTE, REUSE, Plan, Recipe  # noqa: E402
from tcgraph.plan.actions import dynamic, forecast, partial  # noqa: E402
from tests.models.adapter_tester import FORECAST_WEIGHTS_BY_BRANCH, AdapterTester  # noqa: E402

STD = 0.1  # random weights: diffusers zero-initialises gates and tables; at 0.05 block 0's text MLP moves the output < 1e-4


def tiny_sd35(seed: int = 5) -> DiffusersSD3:
    cfg = SD3Config(input_size=8, patch_size=2, in_channels=2, hidden_size=32, depth=4, num_heads=2,
                    caption_channels=12, pooled_channels=10, pos_embed_max_size=8, qk_norm="rms_norm",
                    dual_attention_layers=(0, 1))
    torch.manual_seed(seed)
    model = SD3Transformer2DModel(**sd3_kwargs(cfg))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * STD)
    return DiffusersSD3(model.eval()).eval()


@pytest.mark.slow  # ~75-100 s on 2 shared cores: two exports of 4 blocks' variants, sampling on both backends
class TestSD3(AdapterTester):
    """SD3.5-like: two dual blocks (attn, attn_image, mlp, mlp_text), a joint block, the last block (attn, mlp)."""

    adapter = SD3
    family = "sd3"
    text_length = 5

    def make_model(self):
        return tiny_sd35()

    def mixed_recipes(self, layout, n):
        """As the base class's, with token actions on every block: in A, the image branches of block l
        alternate partial and dynamic ((l + i) % 2 for its i-th branch), the last block's attention partial
        (it reads text rows it does not write: no dynamic action); in C, even blocks reuse, odd blocks
        forecast(2). (test_partial_attn_and_attn_image has both attentions of a block partial.)"""
        names, last = layout.branches(), layout.depth - 1

        def action(l, i, br):
            if not self.tokens(layout, l, br):
                return COMPUTE
            if (l + i) % 2 == 0 or (l, br) == (last, "attn"):
                return partial(range((l + i) % 3, n, 2 + (l + i) % 3))
            return dynamic(3 + l)

        a = Recipe(tuple(tuple(action(l, i, br) for i, br in enumerate(names[l])) for l in range(layout.depth)), names)
        c = Recipe(tuple(((REUSE,) if l % 2 == 0 else (forecast(2),)) * len(names[l]) for l in range(layout.depth)),
                   names)
        weights = {2: {(l, br): FORECAST_WEIGHTS_BY_BRANCH[i % len(FORECAST_WEIGHTS_BY_BRANCH)]
                       for l in range(1, layout.depth, 2) for i, br in enumerate(names[l])}}
        return [self.full_recipe(layout), a, c, a], weights


def test_partial_attn_and_attn_image():
    """A dual block with both attentions partial, on other image rows: its graph is the eager reference."""
    model = tiny_sd35()
    tester = TestSD3()
    layout = tester.layout(model)
    n, names = model.config.num_tokens, layout.branches()
    both = Recipe(tuple((partial(range(0, n, 2)), partial(range(1, n, 3)), COMPUTE, COMPUTE) if l == 0
                        else (COMPUTE,) * len(names[l]) for l in range(layout.depth)), names)
    s = tester.settings(model)
    plan = Plan("both", dataclasses.replace(s, num_steps=2), (tester.full_recipe(layout), both), n, layout=layout)
    build_variants(model, plan, check=True)  # the compile-time check against the eager reference


def test_a_dynamic_last_attention_is_refused_by_name():
    """The last block's attention reads the text for keys and values only: a dynamic action there (which
    scores its input's change to choose output rows) is one clear error when the graphs are made."""
    model = tiny_sd35()
    tester = TestSD3()
    layout = tester.layout(model)
    names = layout.branches()
    last = Recipe(tuple((dynamic(4),) + (COMPUTE,) * (len(names[l]) - 1) if l == layout.depth - 1
                        else (COMPUTE,) * len(names[l]) for l in range(layout.depth)), names)
    plan = Plan("d", dataclasses.replace(tester.settings(model), num_steps=2), (tester.full_recipe(layout), last),
                model.config.num_tokens, layout=layout)
    with pytest.raises(TcgraphError, match="dynamic actions on block 3 attn, which reads a stream for keys and values"):
        build_variants(model, plan, check=False)
