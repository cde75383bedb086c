"""diffusers' FluxTransformer2DModel in tcgraph: the wrapper, its adapter's block loop and its captured,
exported `full` graph equal diffusers' forward (with and without the guidance embedding); token pruning of
its joint attentions (per-stream projections, q/k norms, RoPE) equals the eager reference and would not if
text rows were pruned or the RoPE rows not gathered; folders load, and bad ones are refused by name.
(The adapter battery, `AdapterTester`, runs on FLUX in tests/models/test_every_adapter.py.)"""
from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("diffusers")

from tcgraph.compile import build_variants, example_inputs  # noqa: E402
from tcgraph.errors import TcgraphError  # noqa: E402
from tcgraph.models import load_model  # noqa: E402
from tcgraph.models.adapter import adapter_for  # noqa: E402
from tcgraph.models.diffusers.flux import FLUX, DiffusersFlux, image_ids, load_diffusers_flux, pack, unpack, wrap  # noqa: E402
from tcgraph.models.diffusers import flux_blocks  # noqa: E402
from tcgraph.models.diffusers.flux_blocks import FluxJointAttention  # noqa: E402
from tcgraph.models.diffusers.flux_config import (flux_config_from_diffusers, flux_diffusers_shapes,  # noqa: E402
                                                  flux_state_dict_shapes)
from tcgraph.models.diffusers.folder import read_folder  # noqa: E402
from tcgraph.models.families import config_from_dict  # noqa: E402
from tcgraph.models.layout import Layout  # noqa: E402
from tcgraph.names import OUT, POOLED, TEXT, is_model_input  # noqa: E402
from tcgraph.passes import capture, expand_blocks, reference_step  # noqa: E402
from tcgraph.plan import COMPUTE, Plan, Recipe  # noqa: E402
from tcgraph.plan.actions import dynamic, partial  # noqa: E402
from tcgraph.sampling import SamplerSettings  # noqa: E402
from tests.models.flux_tiny import tiny_config, tiny_diffusers  # noqa: E402

L = 5  # text tokens
KEPT = [13, 2, 7, 11]  # image rows a partial attention recomputes (any order)


def inputs(config, batch: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, config.in_channels, config.input_size, config.input_size, generator=g),
            torch.rand(batch, generator=g), torch.randn(batch, L, config.caption_channels, generator=g),
            torch.randn(batch, config.pooled_channels, generator=g), 1.0 + 4.0 * torch.rand(batch, generator=g))


def diffusers_forward(model, config, x, sigma, text, pooled, guidance):
    """diffusers' own forward as FluxPipeline calls it: packed latents, timestep sigma, the pipeline's ids."""
    grid = config.input_size // 2
    out = model(pack(x, grid), text, pooled, sigma, img_ids=image_ids(grid), txt_ids=torch.zeros(text.shape[1], 3),
                guidance=guidance if config.guidance_embeds else None, return_dict=False)[0]
    return unpack(out, grid)


@pytest.fixture(scope="module", params=[True, False], ids=["dev", "schnell"])
def case(request):
    config = tiny_config(guidance_embeds=request.param)
    model = tiny_diffusers(config, seed=1)
    return config, model, wrap(model, config)


def test_wrapper_loop_and_graphs_equal_diffusers_forward(case, tmp_path):
    """The wrapper, the adapter's eager block loop, the captured and expanded graph and the exported `full`
    variant (ONNX checked against the graph at export) all equal diffusers' forward within 1e-4."""
    config, model, wrapped = case
    x, sigma, text, pooled, guidance = inputs(config)
    extra = (guidance,) if config.guidance_embeds else ()
    adapter = adapter_for(wrapped)
    assert adapter is FLUX and wrapped.config == config
    with torch.no_grad():
        ref = diffusers_forward(model, config, x, sigma, text, pooled, guidance)
        t = sigma * 1000  # tcgraph's samplers pass the scheduler's timesteps (sigma x 1000)
        got = wrapped(x, t, text, pooled, *extra)
        loop = adapter.run_blocks(wrapped, x, t, (text, pooled, *extra), lambda l, b, u, fn: fn(u()))
        gm = expand_blocks(capture(wrapped).gm)
        traced = gm(x, t, text, pooled, *extra)
        other_pooled = wrapped(x, t, text, torch.zeros_like(pooled), *extra)
    assert ref.shape == (2, 4, 8, 8) and ref.abs().max() > 0.1
    for value in (got, loop, traced):
        assert (value - ref).abs().max().item() <= 1e-4
    assert (other_pooled - ref).abs().max().item() > 1e-3  # the pooled embedding matters
    if config.guidance_embeds:
        with torch.no_grad():
            assert (wrapped(x, t, text, pooled, guidance + 1) - ref).abs().max().item() > 1e-3
    names = ["x", "t", TEXT, POOLED] + (["guidance"] if config.guidance_embeds else [])
    assert [n.target for n in gm.graph.nodes if n.op == "placeholder"] == names

    variant = full_variant(wrapped)
    assert variant.input_names == names
    with torch.no_grad():
        out = variant.gm(*[dict(zip(names, (x, t, text, pooled, *extra)))[n] for n in names])
    assert (out - ref).abs().max().item() <= 1e-4


def full_variant(wrapped):
    """The `full` variant graph of a one-step plan (capture, expand, the passes)."""
    config = wrapped.config
    s = SamplerSettings(num_steps=1, batch=2, cfg_scale=3.5 if config.guidance_embeds else 1.0, resolution=8,
                        text_length=L, pooled=True, guidance=config.guidance)
    layout = config.block_layout()
    plan = Plan("full", s, (Recipe.uniform(layout.depth, COMPUTE, layout.branches()),), config.num_tokens,
                layout=layout)
    (variant,) = build_variants(wrapped, plan, check=False)
    return variant


@pytest.mark.slow  # ~10-20 s: one ONNX export (the adapter battery, also slow, exports every action)
def test_the_exported_full_graph_equals_diffusers_forward(case, tmp_path):
    """The `full` variant exported to ONNX: ONNX Runtime's output equals the graph's (1e-4, checked at export),
    which equals diffusers' forward (1e-4)."""
    from tcgraph.export.onnx import export_variants

    config, model, wrapped = case
    if not config.guidance_embeds:
        pytest.skip("one export is enough: the schnell form's graph is checked above")
    x, sigma, text, pooled, guidance = inputs(config)
    variant = full_variant(wrapped)
    variant.example_inputs = dict(zip(variant.input_names, (x, sigma * 1000, text, pooled, guidance)))
    entry, = export_variants([variant], tmp_path, atol=1e-4)
    with torch.no_grad():
        ref = diffusers_forward(model, config, x, sigma, text, pooled, guidance)
        graph = variant.gm(*variant.example_inputs.values())
    assert (graph - ref).abs().max().item() <= 1e-4 and entry["outputs"][0]["max_abs_diff"] <= 1e-4


def test_state_dicts_config_round_trip_and_layout(case):
    config, model, wrapped = case
    assert flux_diffusers_shapes(config) == {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert flux_state_dict_shapes(config) == {k: tuple(v.shape) for k, v in wrapped.state_dict().items()}
    assert config_from_dict(json.loads(json.dumps(config.to_dict()))) == config
    assert flux_config_from_diffusers(dict(model.config), "cfg", input_size=8) == config
    assert config.block_layout() == Layout(adapter_for(wrapped).layout(wrapped))
    assert config.branches == (("attn", "mlp", "mlp_text"),) * 2 + (("attn", "mlp"),) * 2
    assert config.family.guidance_of(config) == ("input" if config.guidance_embeds else "none")
    d = config.hidden_size  # the single blocks' output projection, split: the same product
    fused = model.single_transformer_blocks[0].proj_out
    block = wrapped.single_transformer_blocks[0]
    assert torch.equal(torch.cat([block.attn.proj_out.weight, block.mlp.proj_out.weight], 1), fused.weight)
    assert torch.equal(block.attn.proj_out.bias, fused.bias) and block.mlp.proj_out.bias is None
    assert block.attn.proj_out.weight.shape == (d, d)


# ---- token pruning of the joint attentions ------------------------------------------------------


def token_plan(config):
    """Two steps: compute everything, then every block's branches partial (even blocks, KEPT) or dynamic
    (odd blocks, k = 3), the text-only branch computed."""
    layout = config.block_layout()
    names = layout.branches()

    def action(block, branch):
        if branch == "mlp_text":
            return COMPUTE
        return partial(KEPT) if block % 2 == 0 else dynamic(3)

    s = SamplerSettings(num_steps=2, batch=2, cfg_scale=3.5, resolution=8, text_length=L, pooled=True,
                        guidance="input")
    tokens = Recipe(tuple(tuple(action(l, b) for b in names[l]) for l in range(layout.depth)), names)
    return Plan("tokens", s, (Recipe.uniform(layout.depth, COMPUTE, names), tokens), config.num_tokens, layout=layout)


def token_worst(wrapped, plan, seeds=(0, 1)) -> dict[str, float]:
    """Max difference per output name between the token variant and the eager reference, over two seeds."""
    variant = build_variants(wrapped, plan, check=False)[1]
    recipe = plan.variants()[1]
    worst: dict[str, float] = {}
    for seed in seeds:
        feeds = example_inputs(wrapped, plan, variant.input_names, seed=10 + seed, recipe=recipe)
        with torch.no_grad():
            got = variant.gm(*[feeds[n] for n in variant.input_names])
        caches = {n: v for n, v in feeds.items() if not is_model_input(n)}
        cond = tuple(feeds[n] for n in (TEXT, POOLED, "guidance"))
        ref, fresh = reference_step(wrapped, feeds["x"], feeds["t"], cond, recipe, caches, keep_inputs=True)
        for name, value in zip(variant.output_names, got):
            want = ref if name == OUT else fresh[name]
            worst[name] = max(worst.get(name, 0.0), (value - want).abs().max().item())
    return worst


@pytest.fixture(scope="module")
def dev():
    """A tiny FLUX.1-dev whose q/k norms scale by 4 (not 0.05): attention that RoPE changes visibly."""
    config = tiny_config(guidance_embeds=True)
    model = tiny_diffusers(config, seed=2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(f"norm_{w}" in name for w in ("q", "k", "added_q", "added_k")):
                p.fill_(4.0)
    return wrap(model, config)


def test_partial_and_dynamic_joint_attentions_equal_the_eager_reference(dev):
    plan = token_plan(dev.config)
    worst = token_worst(dev, plan)
    assert set(worst) >= {OUT, "cache.0.attn", "cache.1.attn", "cache.2.attn", "cache.3.attn", "cache.3.mlp"}
    assert max(worst.values()) <= 1e-5, worst
    gm = build_variants(dev, plan, check=False)[1].gm
    calls = [n for n in gm.graph.nodes if n.op == "call_method" and n.target == "rows"]
    assert len(calls) == 4  # every joint attention through the model's own rows method
    kept = getattr(gm, "_tcgraph_idx_0_attn").tolist()  # the rows block 0's attention recomputes and writes
    image = getattr(gm, "_tcgraph_image_idx_0_attn").tolist()  # what the rows method is given
    assert sorted(image) == sorted(KEPT) and kept == list(range(L)) + [L + i for i in image]  # every text row too


def test_the_check_fails_without_text_rows_or_gathered_rope(dev, monkeypatch):
    """The same comparison on deliberately wrong versions: queries rotated by the RoPE rows of image rows
    0..k-1 instead of the chosen ones; a rows method whose text rows are not recomputed (zero, as a pass
    that pruned them would leave them stale): each puts the graph far from the eager reference."""
    plan = token_plan(dev.config)
    right = FluxJointAttention.rows
    gathered = flux_blocks.query_rows

    def ungathered(image, image_idx, cos, sin):  # the chosen rows, but the RoPE rows of rows 0..k-1
        rows, _, _ = gathered(image, image_idx, cos, sin)
        k = image_idx.shape[-1]
        return rows, cos[:k] if image_idx.dim() == 1 else cos[:k].expand(len(image_idx), -1, -1), \
            sin[:k] if image_idx.dim() == 1 else sin[:k].expand(len(image_idx), -1, -1)

    def text_pruned(self, u, image_idx, cos, sin):  # no text row recomputed: the cached ones kept
        out = right(self, u, image_idx, cos, sin)
        if image_idx is None:  # the full forward (the eager reference's) as it is
            return out
        length = u.shape[1] - cos.shape[0]
        return torch.cat([torch.zeros_like(out[:, :length]), out[:, length:]], dim=1)

    monkeypatch.setattr(flux_blocks, "query_rows", ungathered)
    worst = token_worst(dev, plan, seeds=(0,))
    assert worst[OUT] > 1e-3 and worst["cache.0.attn"] > 1e-2, worst
    monkeypatch.setattr(flux_blocks, "query_rows", gathered)
    monkeypatch.setattr(FluxJointAttention, "rows", text_pruned)
    worst = token_worst(dev, plan, seeds=(0,))
    assert worst[OUT] > 1e-3 and worst["cache.0.attn"] > 1e-2, worst


# ---- folders ----------------------------------------------------------------------------------------


def test_folders_load_and_bad_ones_are_refused(tmp_path):
    config = tiny_config(guidance_embeds=True)
    model = tiny_diffusers(config, seed=5)
    folder = tmp_path / "transformer"
    model.save_pretrained(str(folder), safe_serialization=True)
    loaded = load_diffusers_flux(read_folder(folder), input_size=8)
    assert isinstance(loaded, DiffusersFlux) and loaded.config == config
    x, sigma, text, pooled, guidance = inputs(config, seed=6)
    with torch.no_grad():
        ref = diffusers_forward(model, config, x, sigma, text, pooled, guidance)
        assert (loaded(x, sigma * 1000, text, pooled, guidance) - ref).abs().max().item() <= 1e-4
    assert load_model(folder).config.input_size == 128  # a FLUX config.json names no resolution: 1024 pixels

    raw = json.loads((folder / "config.json").read_text())
    weights = (folder / "diffusion_pytorch_model.safetensors").read_bytes()

    def refused(changes: dict, match: str, name: str, data: bytes = weights) -> None:
        bad = tmp_path / name
        bad.mkdir()
        (bad / "config.json").write_text(json.dumps({**raw, **changes}))
        (bad / "diffusion_pytorch_model.safetensors").write_bytes(data)
        with pytest.raises(TcgraphError, match=match):
            load_model(bad)

    refused({"num_single_layers": 3}, "14 missing .*single_transformer_blocks.2", "mismatched")  # the config says a block the weights lack
    refused({"patch_size": 2}, "patch_size 2", "patched")
    refused({"in_channels": 18}, "in_channels 18", "channels")
    refused({}, "cannot read the weights", "corrupt", data=weights[: len(weights) // 2])


def test_embedding_files_with_pooled_embeddings(tmp_path):
    """FLUX's embeddings file: prompt_embeds and pooled_prompt_embeds (no mask), a negative row repeated."""
    from safetensors.torch import save_file

    from tcgraph.errors import UsageError
    from tcgraph.sampling.conditioning import Text, load_text

    g = torch.Generator().manual_seed(0)
    d = {"prompt_embeds": torch.randn(2, L, 12, generator=g), "pooled_prompt_embeds": torch.randn(2, 10, generator=g),
         "negative_prompt_embeds": torch.randn(1, L, 12, generator=g),
         "negative_pooled_prompt_embeds": torch.randn(1, 10, generator=g)}
    save_file(d, str(tmp_path / "e.safetensors"))
    text = load_text(tmp_path / "e.safetensors")
    embeds, pooled = text.model_inputs(guided=True)
    assert torch.equal(embeds[:2], d["prompt_embeds"]) and torch.equal(embeds[2:], d["negative_prompt_embeds"].expand(2, -1, -1))
    assert torch.equal(pooled, torch.cat([d["pooled_prompt_embeds"], d["negative_pooled_prompt_embeds"].expand(2, -1)]))
    assert torch.equal(text.take([1]).model_inputs(False)[1], d["pooled_prompt_embeds"][1:])
    text.check(L, 12, 10)
    with pytest.raises(UsageError, match=r"pooled text embeddings are \[N, 10\], but this model reads \[N, 8\]"):
        text.check(L, 12, 8)
    with pytest.raises(UsageError, match="pooled text embeddings were given, but this model reads none"):
        text.check(L, 12, 0)
    with pytest.raises(UsageError, match="no pooled text embeddings were given"):
        Text(d["prompt_embeds"], torch.ones(2, L)).check(L, 12, 10)


def test_pipeline_calls_read_as_the_graphs_fix_them():
    """What FluxPipeline passes its transformer, read for the graphs: latents unpacked (and the output packed
    back to the same), the plan's timestep; other position ids or another guidance scale refused by name."""
    from tcgraph.errors import UsageError
    from tcgraph.models.diffusers import flux_pipeline

    config = tiny_config(guidance_embeds=True)
    s = SamplerSettings(num_steps=2, batch=2, cfg_scale=3.5, resolution=8, text_length=L, pooled=True,
                        guidance="input", sampler="diffusers",
                        scheduler={"_class_name": "FlowMatchEulerDiscreteScheduler", "use_dynamic_shifting": True})
    g = torch.Generator().manual_seed(3)
    latents, text = torch.randn(2, 16, 16, generator=g), torch.randn(2, L, 12, generator=g)
    given = dict(pooled_projections=torch.randn(2, 10, generator=g), img_ids=image_ids(4), txt_ids=torch.zeros(L, 3),
                 guidance=torch.full((2,), 3.5))
    x, t, cond = flux_pipeline.call_inputs(s, config, latents, lambda: text, given, 831.8)
    assert x.shape == (2, 4, 8, 8) and torch.equal(flux_pipeline.output(x, config), latents)
    assert t.dtype == torch.float32 and t.tolist() == [pytest.approx(831.8)] * 2 and cond[2].tolist() == [3.5, 3.5]
    shifted = image_ids(4).clone()
    shifted[:, 1] += 1  # another crop's rows
    for bad, match in (({"img_ids": shifted}, "position ids"), ({"txt_ids": torch.ones(L, 3)}, "position ids"),
                       ({"guidance": torch.full((2,), 2.0)}, "made for guidance 3.5"),
                       ({"pooled_projections": torch.randn(2, 8)}, r"pooled text embeddings \[2, 10\]")):
        with pytest.raises(UsageError, match=match):
            flux_pipeline.call_inputs(s, config, latents, lambda: text, {**given, **bad}, 831.8)


def test_guidance_defaults_to_what_the_model_takes(tmp_path):
    """transform's default guidance: 1 for FLUX.1-schnell (no guidance embedding), 2 for FLUX.1-dev; a scale
    other than 1 for schnell is refused by name."""
    from tcgraph import api
    from tcgraph.errors import UsageError
    from tcgraph.export.artifact import load_artifact

    scheduler = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}
    common = dict(steps=2, batch=1, text_length=L, scheduler=scheduler, progress=False, check=False)
    for embeds, scale in ((False, 1.0), (True, 2.0)):
        config = tiny_config(guidance_embeds=embeds, depth=2, single_depth=1)
        model = wrap(tiny_diffusers(config, seed=2), config)
        if not embeds:
            with pytest.raises(UsageError, match="takes no guidance: use guidance 1"):
                api.transform(model, "full", tmp_path / "refused", guidance=2.0, **common)
            assert not (tmp_path / "refused").exists()
        art = api.transform(model, "full", tmp_path / f"embeds-{embeds}", **common)
        assert load_artifact(art).plan.settings.cfg_scale == scale


def test_a_folder_transforms_at_the_resolution_asked(tmp_path, capsys):
    """`transform --resolution` sets a FLUX folder's latent side (RoPE tables are built for it); an odd side
    (2x2 packing), a resolution for a DiT and one for a folder of a family with a position table are refused."""
    from tcgraph.cli import main
    from tcgraph.export.artifact import load_artifact

    config = tiny_config(guidance_embeds=False, depth=2, single_depth=1)
    folder = tmp_path / "transformer"
    tiny_diffusers(config, seed=4).save_pretrained(str(folder), safe_serialization=True)
    assert load_model(folder, resolution=6).config.input_size == 6
    scheduler = tmp_path / "scheduler_config.json"
    scheduler.write_text(json.dumps({"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000}))
    out = tmp_path / "art"
    assert main(["transform", "--model", str(folder), "--resolution", "4", "--plan", "full", "--steps", "2", "--batch",
                 "1", "--text-length", str(L), "--scheduler", str(scheduler), "--out", str(out), "--no-check"]) == 0
    art = load_artifact(out)
    assert art.plan.settings.resolution == 4 and art.model_config.num_tokens == 4  # (4 / 2)^2 packed tokens
    with pytest.raises(TcgraphError, match="input_size 5 is not a multiple of patch_size 2"):
        load_model(folder, resolution=5)
    from tcgraph.models.families import FAMILIES

    with pytest.raises(TcgraphError, match="resolution is its config's sample_size .*drop the resolution"):
        FAMILIES["pixart"].load_folder(None, 8)
    capsys.readouterr()
    assert main(["transform", "--resolution", "8", "--out", str(tmp_path / "dit")]) == 2
    assert "only FLUX and SD3 diffusers folders take a resolution (--resolution)" in capsys.readouterr().err
    assert not (tmp_path / "dit").exists()
