"""The stream and kind seams on a test-only two-stream model (tests/models/two_stream.py): double
blocks whose joint attention writes text and image rows, a text-only MLP, a parallel single block,
a per-block branch layout. It passes every check of `AdapterTester` (capture, every action through
the passes against the eager reference, calibration's blended step, export, load and sampling on
ONNX Runtime and the torch backend), and its plans store and check their layout."""
from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from tcgraph.errors import TcgraphError
from tcgraph.names import GUIDANCE, IMAGE, TEXT_STREAM
from tcgraph.plan import COMPUTE, REUSE, Plan, Recipe, partial
from tcgraph.plan.actions import dynamic
from tcgraph.models.layout import Layout
from tcgraph.plan.registry import make_plan
from tcgraph.sampling import SamplerSettings
from tests.models.adapter_tester import AdapterTester
from tests.models.two_stream import ADAPTER, FAMILY, GUIDED_FAMILY, build, registered, toy_config


@pytest.fixture(scope="module", autouse=True)
def toy_family():
    with registered():
        yield


class TestTwoStreamToy(AdapterTester):
    """Two streams (image, text), a double kind (attn over both, mlp, mlp_text) and a parallel single kind."""

    adapter = ADAPTER
    family = FAMILY
    text_length = 5

    def make_model(self):
        model = build(toy_config(depth=4))  # two double blocks, two single blocks
        g = torch.Generator().manual_seed(7)
        with torch.no_grad():  # every gate and table away from zero
            for p in model.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        return model.eval()

    def mixed_recipes(self, layout, n):
        return self.alternating_recipes(layout, n)


# The whole battery with a guidance input runs on a real family, FLUX.1-dev (TestFluxDev in
# tests/models/test_every_adapter.py); the guided toy keeps the checks of its interface below.


def test_a_guidance_input_is_one_pass_per_step_with_the_scale_as_input():
    """The guided toy's graphs read `guidance` after the text; the batch is not doubled; the sampler feeds
    the scale; a plan of another guidance mode is refused."""
    from tcgraph.compile import example_inputs
    from tcgraph.sampling import sampler_for

    cfg = toy_config(layout=GUIDED_FAMILY.name)
    s = replace(settings(steps=1), guidance="input")
    plan = make_plan("full", cfg, s)
    assert s.model_batch == s.batch == 2 and s.model_inputs[-1] == GUIDANCE
    assert plan.variant_io(plan.recipes[0])[0] == ["x", "t", "encoder_hidden_states", "encoder_attention_mask", GUIDANCE]
    assert [(i.name, i.shape) for i in cfg.family.graph_inputs(cfg, s)][-1] == (GUIDANCE, (2,))
    sampler = sampler_for(s, cfg)
    x = torch.zeros(2, 2, 8, 8)
    from tcgraph.sampling.conditioning import Text
    text = Text(torch.randn(2, 5, 8), torch.ones(2, 5))
    xin, tin, cond = sampler.model_inputs(x, 0, text)
    assert xin.shape[0] == 2 and torch.equal(cond[-1], torch.full((2,), 2.0))
    assert torch.equal(sampler.eps_from_output(torch.ones(2, 2, 8, 8)), torch.ones(2, 2, 8, 8))
    feeds = example_inputs(build(cfg), plan, list(s.model_inputs))
    assert feeds[GUIDANCE].shape == (2,) and feeds[GUIDANCE].min() >= 1.0
    with pytest.raises(TcgraphError, match="take guidance 'input'; the settings say 'cfg'"):
        cfg.family.graph_inputs(cfg, settings(steps=1))
    assert "guidance" not in settings().to_dict() and s.to_dict()["guidance"] == "input"
    with pytest.raises(TcgraphError, match="takes no guidance: use guidance 1"):
        replace(settings(), guidance="none")


def settings(text_length=5, steps=3):
    return SamplerSettings(num_steps=steps, batch=2, cfg_scale=2.0, resolution=8, text_length=text_length)


def test_cache_rows_follow_each_branchs_streams():
    cfg = toy_config()
    layout = cfg.block_layout()
    full = Recipe.uniform(2, COMPUTE, layout.branches())
    plan = Plan("fora", settings(), (full, Recipe.uniform(2, REUSE, layout.branches()), full), cfg.num_tokens,
                layout=layout)
    n, length, d = cfg.num_tokens, 5, cfg.hidden_size
    assert {name: plan.cache_shape(name, d)[1] for name in plan.cache_names()} == {  # one double, one single block
        "cache.0.attn": length + n, "cache.0.mlp": n, "cache.0.mlp_text": length,
        "cache.1.attn": length + n, "cache.1.mlp": length + n}
    assert plan.cache_bytes(d) == plan.settings.model_batch * d * 4 * (3 * (length + n) + n + length)
    assert layout.image_slice(0, "attn", plan.stream_rows) == slice(length, length + n)
    assert layout.image_slice(0, "mlp_text", plan.stream_rows) is None
    from tcgraph.inspection.report import cache_memory

    memory = cache_memory(plan, d)  # what inspect shows: each cache at its own rows
    assert memory["bytes"] == plan.cache_bytes(d) and memory["caches"]["bytes"] == plan.cache_bytes(d)
    assert memory["tensor_shape"] == [plan.settings.model_batch, None, d] and memory["tensor_bytes"] is None


def test_the_layout_is_stored_compactly_and_read_back():
    cfg = toy_config(depth=3)  # two double blocks, one single
    plan = make_plan("fora:2", cfg, settings())
    d = plan.to_dict()
    assert "branches" not in d and d["layout"] == [
        {"blocks": 2, "branches": {"attn": ["text", "image"], "mlp": ["image"], "mlp_text": ["text"]}},
        {"blocks": 1, "branches": {"attn": ["text", "image"], "mlp": ["text", "image"]}}]
    back = Plan.from_json(plan.to_json())
    assert back == plan and back.block_layout() == cfg.block_layout() and back.to_json() == plan.to_json()


def test_fixed_planners_plan_the_layout_and_learned_ones_ask_for_weights():
    cfg = toy_config(depth=4)
    for spec in ("full", "fora:2", "taylor:2"):
        plan = make_plan(spec, cfg, settings(steps=5))
        assert plan.block_layout() == cfg.block_layout() and plan.recipes[0].per_block
    for spec in ("l2c:2", "tokencache:2", "tokencache+l2c:2", "dynamic:2", "adaptive:0.9"):
        with pytest.raises(TcgraphError, match="needs the model's weights"):  # the learned ones take the layout
            make_plan(spec, cfg, settings(steps=5))


def test_a_text_only_branch_is_never_partial_or_dynamic():
    cfg = toy_config()
    names = cfg.block_layout().branches()
    full = Recipe.uniform(2, COMPUTE, names)
    for action in (partial([0, 3]), dynamic(2)):
        bad = Recipe(((COMPUTE, COMPUTE, action), (COMPUTE, COMPUTE)), names)
        with pytest.raises(TcgraphError, match=r"block 0 mlp_text: a (partial|dynamic) action chooses image tokens, "
                                               r"but this branch writes the text rows only"):
            Plan("p", settings(steps=2), (full, bad), cfg.num_tokens, layout=cfg.block_layout())
    joint = Recipe(((partial([0, 3]), partial([1]), COMPUTE), (dynamic(2), dynamic(3))), names)
    Plan("p", settings(steps=2), (full, joint), cfg.num_tokens, layout=cfg.block_layout())  # image rows: allowed


def test_a_layout_that_disagrees_is_refused():
    cfg = toy_config()
    names = cfg.block_layout().branches()
    full = Recipe.uniform(2, COMPUTE, names)
    with pytest.raises(TcgraphError, match="plan layout gives blocks the branches"):
        Plan("p", settings(steps=1), (full,), cfg.num_tokens, layout=Layout.image(((("attn", "mlp"),) * 2)))
    with pytest.raises(TcgraphError, match="text-stream branches but its settings have no text length"):
        Plan("p", settings(text_length=0, steps=1), (full,), cfg.num_tokens, layout=cfg.block_layout())
    with pytest.raises(TcgraphError, match="malformed plan: layout"):
        Plan.from_dict({**json.loads(Plan("p", settings(steps=1), (full,), cfg.num_tokens,
                                          layout=cfg.block_layout()).to_json()), "layout": [{"blocks": 0}]})


def test_a_dit_plan_for_the_toy_is_refused_before_any_rewrite():
    from tcgraph.compile import build_variants

    cfg = toy_config()
    plan = Plan("p", settings(steps=1), (Recipe.uniform(2, COMPUTE, ("attn", "mlp")),), cfg.num_tokens)
    with pytest.raises(TcgraphError, match=r"plan is for the layout .* but TwoStreamToy blocks have .*mlp_text"):
        build_variants(build(cfg), plan)


def test_streams_and_parallel_kinds_are_declared_consistently():
    from dataclasses import replace

    from tcgraph.models.adapter import BlockKind, BranchSpec, ModelAdapter, StreamRead

    double = ADAPTER.kinds[0]
    assert ADAPTER.streams == (IMAGE, TEXT_STREAM) and not ADAPTER.uniform and ADAPTER.kinds[1].parallel
    assert double.branch("attn").streams == (TEXT_STREAM, IMAGE) and double.branch("mlp").streams == (IMAGE,)
    with pytest.raises(TcgraphError, match="either norm/shift/scale/gate .* or `reads`"):
        BranchSpec("mlp", "mlp", torch.nn.Module, "norm2", 3, 4, 5, reads=(StreamRead(IMAGE, None, None, None, 2),))
    with pytest.raises(TcgraphError, match=r"reads stream 'text' with modulation 1; the kind has streams \['image'\] and 2"):
        replace(double, streams=(IMAGE,))
    with pytest.raises(TcgraphError, match="reads stream 'text' with modulation 1; the kind has streams .* 1 modul"):
        replace(double, modulation="mod_image", chunks=6)
    with pytest.raises(TcgraphError, match="takes streams .* the model's are"):
        ModelAdapter(**{**ADAPTER.__dict__, "streams": (IMAGE,)})
    assert isinstance(double, BlockKind)
