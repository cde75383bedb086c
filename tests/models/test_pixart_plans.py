"""diffusers' PixArtTransformer2DModel transformed: its `full` graph against diffusers' own
forward, and plans of every action on its three branches (attn, cross, mlp), exported and
sampled with ONNX Runtime on text embeddings, against the eager reference loop."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")

from diffusers import PixArtTransformer2DModel  # noqa: E402

from tcgraph import api  # noqa: E402
from tcgraph.compile import build_variants  # noqa: E402
from tcgraph.errors import TcgraphError, UsageError  # noqa: E402
from tcgraph.export.artifact import load_artifact  # noqa: E402
from tcgraph.models.diffusers.pixart import DiffusersPixArt  # noqa: E402
from tcgraph.passes import reference_step  # noqa: E402
from tcgraph.plan import COMPUTE, REUSE, Plan, Recipe, dynamic, forecast, partial  # noqa: E402
from tcgraph.plan.flops import plan_flops  # noqa: E402
from tcgraph.sampling import SamplerSettings, make_noise, run_batches, sampler_for  # noqa: E402
from tcgraph.sampling.conditioning import Text  # noqa: E402

TINY = dict(num_attention_heads=2, attention_head_dim=16, in_channels=2, out_channels=4, num_layers=3,
            sample_size=8, patch_size=2, caption_channels=24, cross_attention_dim=32,
            use_additional_conditions=False)  # 16 tokens, hidden 32, learn sigma
LENGTH, WIDTH = 7, 24
BRANCHES = ("attn", "cross", "mlp")


def tiny_pixart(seed: int = 0) -> DiffusersPixArt:
    """Random weights of std 0.05 (diffusers zero-initialises the gates and tables), the position table kept."""
    torch.manual_seed(seed)
    model = PixArtTransformer2DModel(**TINY).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.05)
    return DiffusersPixArt(model).eval()


def text(n: int, seed: int = 5, negatives: bool = True) -> Text:
    """n prompts of LENGTH tokens, each padded after a different count (mask zeros); an empty negative."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(n, LENGTH)
    for i in range(n):
        mask[i, 2 + i % (LENGTH - 2):] = 0
    neg_mask = torch.zeros(n, LENGTH)
    neg_mask[:, 0] = 1
    if not negatives:
        return Text(torch.randn(n, LENGTH, WIDTH, generator=g), mask)
    return Text(torch.randn(n, LENGTH, WIDTH, generator=g), mask,
                torch.randn(1, LENGTH, WIDTH, generator=g).expand(n, -1, -1), neg_mask)


def settings(steps: int, **kw) -> SamplerSettings:
    return SamplerSettings(**{"num_steps": steps, "batch": 2, "cfg_scale": 2.0, "resolution": 8,
                              "text_length": LENGTH, **kw})


def test_full_variant_graph_equals_diffusers_forward():
    """The rewritten `full` graph reads x, t, the text and its mask, and equals diffusers' forward
    (1e-4); the mask matters (a zero changes the output)."""
    model = tiny_pixart()
    plan = Plan("full", settings(1), (Recipe.uniform(3, COMPUTE, BRANCHES),), model.config.num_tokens)
    (variant,) = build_variants(model, plan)
    assert variant.input_names == ["x", "t", "encoder_hidden_states", "encoder_attention_mask"]
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(4, 2, 8, 8, generator=g), torch.tensor([0, 333, 666, 999])
    cond = text(4)
    ehs, mask = cond.model_inputs(guided=True)
    ehs, mask = ehs[:4], mask[:4]
    with torch.no_grad():
        out = variant.gm(x, t, ehs, mask)
        out = out[0] if isinstance(out, tuple) else out
        diffusers_model = PixArtTransformer2DModel(**TINY).eval()
        diffusers_model.load_state_dict({k: v for k, v in model.state_dict().items() if k != "pos_table"})
        ref = diffusers_model(x, encoder_hidden_states=ehs, timestep=t, encoder_attention_mask=mask,
                              added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample
        unmasked = variant.gm(x, t, ehs, torch.ones_like(mask))
        unmasked = unmasked[0] if isinstance(unmasked, tuple) else unmasked
    assert (out - ref).abs().max().item() <= 1e-4
    assert (unmasked - out).abs().max().item() > 1e-3


def test_plan_of_every_action_on_three_branches_equals_the_eager_reference_loop(tmp_path):
    """compute, reuse, partial, dynamic and forecast steps on attn, cross and mlp, through ONNX
    Runtime with guidance on text, equal an eager reference loop with caches carried step to step;
    the plan carries 3 caches per block and its FLOPs count the cross branch."""
    torch.set_num_threads(1)
    model = tiny_pixart(seed=2)
    full = Recipe.uniform(3, COMPUTE, BRANCHES)
    a = Recipe(((partial([0, 3, 6, 9, 12]), REUSE, partial([1, 2])), (REUSE, partial([1, 2, 3]), REUSE),
                (COMPUTE, REUSE, dynamic(4))), BRANCHES)
    b = Recipe(((REUSE, dynamic(8), REUSE), (partial(range(15)), REUSE, forecast(2)), (dynamic(2), REUSE, REUSE)),
               BRANCHES)
    s = settings(6)
    weights = {2: {(1, "mlp"): (1.0, 0.0)}, 5: {(1, "mlp"): (1.5, -0.5)}}  # one output computed by step 2
    plan = Plan("tokens", s, (full, a, b, full, a, b), model.config.num_tokens, weights=weights)
    path = api.transform(model, plan, tmp_path / "art", progress=False)
    prompts = text(3)
    got, labels = api.sample(path, text=prompts, per_class=1, seed=3, progress=False)
    assert labels == [0, 1, 2]

    caches: dict = {}
    history: list = []  # computed outputs of block 1's mlp, newest first: what its forecast reads

    def eager_step(step, x, t, y):
        feeds = dict(caches)
        if step in weights:
            feeds["forecast.w"] = torch.tensor([w for _, ws in sorted(weights[step].items()) for w in ws])
            feeds["cache.1.mlp.h1"] = history[min(1, len(history) - 1)]
        out, fresh = reference_step(model, x, t, y, plan.recipes[step], feeds, keep_inputs=True)
        caches.update(fresh)
        if "cache.1.mlp" in fresh:
            history.insert(0, fresh["cache.1.mlp"])
        return out

    def reset():
        caches.clear()
        history.clear()

    eager = run_batches(eager_step, reset, sampler_for(s, model.config), prompts,
                        make_noise(3, 2, 8, 3), s.batch, 3)
    assert got.shape == eager.shape == (3, 2, 8, 8)
    assert torch.allclose(got, eager, rtol=1e-5, atol=1e-4), (got - eager).abs().max().item()
    uncached = api.sample_eager(model, s, prompts, seed=3)
    assert (uncached - eager).abs().max().item() > 1e-3
    other = text(3, seed=9)
    got_other, _ = api.sample(path, text=other, per_class=1, seed=3, progress=False)
    assert (got_other - got).abs().max().item() > 1e-3  # the prompts reach the graphs

    art = load_artifact(path)
    caches_read = {n for v in art.variants for n in v.input_names if n.startswith("cache.")}
    assert {"cache.0.cross", "cache.1.cross", "cache.2.cross"} <= caches_read
    flops = plan_flops(model.config, plan)
    d, n, L = 32, 16, LENGTH
    cross_full = 2 * n * d * d * 2 + 2 * L * d * 2 * d + 2 * 2 * n * L * d
    assert flops["full_step"] > 4 * 3 * cross_full  # batch 4 (guidance), 3 blocks, cross included


def test_text_conditioning_errors_are_clear(tmp_path):
    model = tiny_pixart()
    with pytest.raises(UsageError, match="text length"):
        api.transform(model, "fora:2", tmp_path / "a", steps=4, batch=2, progress=False)
    path = api.transform(model, "fora:2", tmp_path / "b", steps=4, batch=2, text_length=LENGTH, progress=False)
    assert load_artifact(path).plan.settings.text_length == LENGTH
    with pytest.raises(UsageError, match="text-conditioned"):
        api.sample(path, classes=[0], progress=False)
    with pytest.raises(UsageError, match="negative prompt"):
        api.sample(path, text=text(2, negatives=False), progress=False)
    short = Text(torch.randn(2, 5, WIDTH), torch.ones(2, 5))
    with pytest.raises(UsageError, match="pad or cut the prompts to 7"):
        api.sample(path, text=short, progress=False)
    with pytest.raises(TcgraphError, match="calibration prompts"):  # a learned planner without them
        api.transform(model, "l2c:1.5", tmp_path / "c", steps=4, batch=2, text_length=LENGTH, progress=False)
    with pytest.raises(UsageError, match="class ids, not text"):
        from tcgraph.models import build_model
        from tcgraph.models.official.dit import make_config

        api.transform(build_model(make_config("digits", depth=1)), "full", tmp_path / "d", steps=2, batch=1,
                      text_length=4, progress=False)
    assert not (tmp_path / "a").exists() and not (tmp_path / "d").exists()
    with pytest.raises(TcgraphError):
        Text(torch.randn(2, 5, WIDTH), torch.ones(2, 4))


def test_cli_transforms_a_pixart_folder_and_samples_from_an_embeddings_file(tmp_path, capsys):
    """`tcgraph transform --model FOLDER --text-length L` and `tcgraph sample --embeddings FILE`
    give the same samples as the Python API; a missing key in the file is one clear error."""
    from safetensors.torch import save_file

    from tcgraph.cli import main
    from tcgraph.models.diffusers.pixart import save_pixart

    folder = save_pixart(tiny_pixart(seed=3), tmp_path / "pixart")
    art = tmp_path / "art"
    assert main(["transform", "--model", str(folder), "--plan", "fora:2", "--steps", "4", "--batch", "2",
                 "--text-length", str(LENGTH), "--out", str(art)]) == 0
    assert f"text {LENGTH} tokens x {WIDTH}" in capsys.readouterr().out
    prompts = text(2)
    file = tmp_path / "prompts.safetensors"
    save_file({"prompt_embeds": prompts.embeddings, "prompt_attention_mask": prompts.mask,
               "negative_prompt_embeds": prompts.negative_embeddings[:1].contiguous(),
               "negative_prompt_attention_mask": prompts.negative_mask[:1].contiguous()}, str(file))
    npy = tmp_path / "s.npy"
    assert main(["sample", str(art), "--embeddings", str(file), "--per-class", "1", "--seed", "2",
                 "--png", str(tmp_path / "s.png"), "--npy", str(npy)]) == 0
    import numpy as np

    want, _ = api.sample(art, text=prompts, per_class=1, seed=2, progress=False)
    assert np.array_equal(np.load(npy), want.numpy())
    save_file({"prompt_embeds": prompts.embeddings}, str(tmp_path / "bad.safetensors"))
    assert main(["sample", str(art), "--embeddings", str(tmp_path / "bad.safetensors"),
                 "--png", str(tmp_path / "t.png")]) != 0
    assert "lacks prompt_attention_mask" in capsys.readouterr().err
    assert not (tmp_path / "t.png").exists()


def test_carried_text_keys_and_values_give_the_recomputed_samples(tmp_path):
    """A plan that carries the text's keys and values (its first step projects them, later steps read
    them) samples what the same plan recomputing them at every step samples; the first step's outputs
    are the projections of the text, and the later steps' graphs hold no text projection at all."""
    torch.set_num_threads(1)
    model = tiny_pixart(seed=4)
    s = settings(4)
    a = Recipe(((REUSE, partial([1, 5, 9]), REUSE), (COMPUTE, REUSE, REUSE), (REUSE, dynamic(3), COMPUTE)), BRANCHES)
    full = Recipe.uniform(3, COMPUTE, BRANCHES)
    carried = Plan("kv", s, (full, a, full, a), model.config.num_tokens)
    recomputed = Plan("kv", s, (full, a, full, a), model.config.num_tokens, carry_constants=False)
    assert len(carried.variants()) == 3 and len(recomputed.variants()) == 2
    prompts = text(2)
    samples = {}
    for name, plan in (("carried", carried), ("recomputed", recomputed)):
        path = api.transform(model, plan, tmp_path / name, progress=False, check=False)  # compared below
        samples[name], _ = api.sample(path, text=prompts, per_class=1, seed=1, progress=False)
    assert torch.allclose(samples["carried"], samples["recomputed"], rtol=1e-5, atol=1e-5), \
        (samples["carried"] - samples["recomputed"]).abs().max().item()

    variants = {v.id: v for v in build_variants(model, carried)}
    first = variants["v0"]
    feeds = first.example_inputs
    outs = dict(zip(first.output_names, first.gm(*[feeds[n] for n in first.input_names])))
    with torch.no_grad():
        projected = model.caption_projection(feeds["encoder_hidden_states"])
        for l, block in enumerate(model.transformer_blocks):
            assert torch.allclose(outs[f"cache.{l}.cross.k"], block.attn2.to_k(projected), atol=1e-6)
            assert torch.allclose(outs[f"cache.{l}.cross.v"], block.attn2.to_v(projected), atol=1e-6)
    art = load_artifact(tmp_path / "carried")
    for vid in ("v0", "v1", "v2"):  # the weights each ONNX graph reads from the shared file
        used = " ".join(art.variant(vid).external_initializers)
        assert ("caption_projection" in used and "attn2.to_k" in used and "attn2.to_v" in used) == (vid == "v0"), vid
        assert "attn2.to_q" in used  # the cross branches still run
    assert [n for n in art.variant("v2").input_names if n.endswith((".k", ".v"))] == \
        [f"cache.{l}.cross.{w}" for l in range(3) for w in ("k", "v")]
    assert art.variant("v2").input("cache.0.cross.k").shape == (4, LENGTH, 32)  # [B with guidance, L, D]

    # An artifact made before the keys and values were carried: its plan JSON has no flag, so the plan
    # now asks for a first-step variant the folder lacks. Refused, saying why, not run wrongly.
    import hashlib
    import json

    old = tmp_path / "recomputed"
    for name in ("plan.json", "manifest.json"):
        data = json.loads((old / name).read_text())
        (data if name == "plan.json" else data["plan"]).pop("carry_constants")
        if name == "manifest.json":
            data["files"]["plan.json"] = hashlib.sha256((old / "plan.json").read_bytes()).hexdigest()
        (old / name).write_text(json.dumps(data))
    with pytest.raises(TcgraphError, match="made before tcgraph carried the text's keys and values.*re-run"):
        load_artifact(old)


def test_micro_conditioned_pixart_transforms_and_samples_on_both_runtimes(tmp_path):
    """A PixArt with PixArt-alpha 1024's micro-conditions (fixed to its square resolution): the `full`
    plan (its first step projecting the text, the others reading it) samples on ONNX Runtime and the
    torch backend what the eager wrapper (equal to diffusers' forward) samples."""
    torch.set_num_threads(1)
    torch.manual_seed(3)
    model = PixArtTransformer2DModel(**{**TINY, "attention_head_dim": 12, "cross_attention_dim": 24,
                                        "use_additional_conditions": True}).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.05)
    wrapped = DiffusersPixArt(model).eval()
    assert wrapped.config.micro_size == 64
    s = settings(3)
    plan = Plan("full", s, (Recipe.uniform(3, COMPUTE, BRANCHES),) * 3, wrapped.config.num_tokens)
    assert len(plan.variants()) == 2
    path = api.transform(wrapped, plan, tmp_path / "micro", progress=False, check=False)  # compared with eager below
    prompts = text(2)
    eager = api.sample_eager(wrapped, s, prompts, seed=2)
    for backend in ("ort", "torch"):
        got, _ = api.sample(path, text=prompts, per_class=1, seed=2, backend=backend, progress=False)
        assert got.shape == eager.shape == (2, 2, 8, 8)
        assert torch.allclose(got, eager, rtol=1e-4, atol=1e-4), (backend, (got - eager).abs().max().item())


@pytest.mark.skipif(not __import__("os").environ.get("TCGRAPH_DIFFUSERS_PIXART"),
                    reason="set TCGRAPH_DIFFUSERS_PIXART to a local PixArtTransformer2DModel folder (or pipeline) to "
                           "check real weights; none can be downloaded here")
def test_real_pixart_weights_from_a_local_folder_equal_diffusers_forward():
    """With real weights (e.g. PixArt-alpha/PixArt-XL-2-512x512 saved locally): the `full` plan's
    graphs (the first step projecting the text, a later one reading it) equal diffusers' own forward
    within 1e-4, float32, micro-conditions included where the model has them."""
    import os

    from tcgraph.models import load_model
    from tcgraph.models.diffusers.folder import read_folder

    path = os.environ["TCGRAPH_DIFFUSERS_PIXART"]
    model = load_model(path)
    reference = PixArtTransformer2DModel.from_pretrained(str(read_folder(path).model_dir)).float().eval()
    cfg = model.config
    length = 120
    s = SamplerSettings(num_steps=2, batch=1, cfg_scale=1.0, resolution=cfg.input_size, text_length=length)
    plan = Plan("full", s, (Recipe.uniform(cfg.depth, COMPUTE, BRANCHES),) * 2, cfg.num_tokens)
    first, later = build_variants(model, plan)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, cfg.in_channels, cfg.input_size, cfg.input_size, generator=g)
    t = torch.tensor([500])
    text = torch.randn(1, length, cfg.caption_channels, generator=g)
    mask = torch.ones(1, length)
    mask[:, 40:] = 0
    extra = ({"resolution": torch.tensor([[float(cfg.micro_size)] * 2]), "aspect_ratio": torch.ones(1, 1)}
             if cfg.micro_size else {"resolution": None, "aspect_ratio": None})
    with torch.no_grad():
        ref = reference(x, encoder_hidden_states=text, timestep=t, encoder_attention_mask=mask,
                        added_cond_kwargs=extra).sample
        outs = dict(zip(first.output_names, first.gm(x, t, text, mask)))
        feeds = {"x": x, "t": t, "encoder_hidden_states": text, "encoder_attention_mask": mask, **outs}
        got_later = later.gm(*[feeds[n] for n in later.input_names])
    got_later = got_later[0] if isinstance(got_later, tuple) else got_later
    assert (outs["out"] - ref).abs().max().item() <= 1e-4
    assert (got_later - ref).abs().max().item() <= 1e-4
