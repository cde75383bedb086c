"""diffusers' SD3Transformer2DModel as tcgraph wraps it: the traceable forward, the adapter's block loop
and the captured and expanded fx graph equal diffusers' forward (float32, tiny random configs: an
SD3-Medium-like one, and an SD3.5-like one with qk-norm and the extra image attention in its first
block); every branch reaches the output; save_pretrained folders load, damaged ones are refused."""
from __future__ import annotations

import json
import os

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from tcgraph.compile import build_variants  # noqa: E402
from tcgraph.errors import TcgraphError  # noqa: E402
from tcgraph.models.adapter import adapter_for  # noqa: E402
from tcgraph.models.diffusers.sd3 import SD3, DiffusersSD3, layout, sd3_state_dict_shapes  # noqa: E402
from tcgraph.models.diffusers.sd3_config import SD3Config, sd3_config_from_diffusers, sd3_kwargs  # noqa: E402
from tcgraph.models.families import FAMILIES, config_from_dict  # noqa: E402
from tcgraph.models.layout import Layout  # noqa: E402
from tcgraph.models.loading import load_diffusers  # noqa: E402
from tcgraph.names import IMAGE, TEXT_STREAM  # noqa: E402
from tcgraph.passes import capture, expand_blocks  # noqa: E402
from tcgraph.plan import COMPUTE, Plan, Recipe  # noqa: E402
from tcgraph.sampling import SamplerSettings  # noqa: E402

TEXT_LENGTH, TEXT_WIDTH, POOLED_WIDTH = 5, 12, 10
PLAIN = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=3, num_heads=2,
             caption_channels=TEXT_WIDTH, pooled_channels=POOLED_WIDTH, pos_embed_max_size=8)
SD35 = {**PLAIN, "qk_norm": "rms_norm", "dual_attention_layers": (0,)}
ATOL = 1e-4  # float32 against diffusers (seen: 5e-7)


def tiny_sd3(seed: int = 0, **fields) -> "diffusers.SD3Transformer2DModel":
    """diffusers' model of a tiny config, every weight N(0, 0.1) so that no gate or table is zero."""
    torch.manual_seed(seed)
    model = diffusers.SD3Transformer2DModel(**sd3_kwargs(SD3Config(**fields))).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def inputs(batch: int = 2, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 4, 8, 8, generator=g), torch.tensor([900.0, 312.5])[:batch],
            torch.randn(batch, TEXT_LENGTH, TEXT_WIDTH, generator=g), torch.randn(batch, POOLED_WIDTH, generator=g))


def diffusers_forward(model, x, t, text, pooled) -> torch.Tensor:
    return model(hidden_states=x, encoder_hidden_states=text, pooled_projections=pooled, timestep=t).sample


@pytest.fixture(scope="module", params=[PLAIN, SD35], ids=["sd3-medium-like", "sd35-like"])
def pair(request):
    model = tiny_sd3(**request.param)
    return model, DiffusersSD3(model), request.param


def test_wrapper_loop_and_graphs_equal_diffusers_forward(pair):
    model, wrapped, fields = pair
    x, t, text, pooled = inputs()
    adapter = adapter_for(wrapped)
    with torch.no_grad():
        ref = diffusers_forward(model, x, t, text, pooled)
        got = wrapped(x, t, text, pooled)
        loop = adapter.run_blocks(wrapped, x, t, (text, pooled), lambda l, b, u, fn: fn(u()))
        cap = capture(wrapped)
        expanded = expand_blocks(cap.gm)
        values = {"wrapper": got, "run_blocks": loop, "captured": cap.gm(x, t, text, pooled),
                  "expanded": expanded(x, t, text, pooled)}
    assert ref.shape == (2, 4, 8, 8) and ref.abs().max().item() > 0.1
    diffs = {k: (v - ref).abs().max().item() for k, v in values.items()}
    assert max(diffs.values()) <= ATOL, diffs
    assert [n.target for n in cap.gm.graph.nodes if n.op == "placeholder"] == [
        "x", "t", "encoder_hidden_states", "pooled_projections"]
    kinds = ["dual"] * len(fields.get("dual_attention_layers", ())) + ["joint"] * (
        fields["depth"] - 1 - len(fields.get("dual_attention_layers", ()))) + ["last"]
    assert [b.kind for b in cap.blocks] == kinds and adapter is SD3


def test_every_branch_reaches_the_output(pair):
    _, wrapped, _ = pair
    x, t, text, pooled = inputs()
    lay = Layout(SD3.layout(wrapped))
    with torch.no_grad():
        ref = wrapped(x, t, text, pooled)
        for block, names in enumerate(lay.branches()):
            for name in names:
                dropped = SD3.run_blocks(wrapped, x, t, (text, pooled),
                                         lambda l, b, u, fn: 0 * fn(u()) if (l, b) == (block, name) else fn(u()))
                assert (dropped - ref).abs().max().item() > 1e-4, (block, name)


def test_layout_streams_and_the_last_blocks_text():
    """The family's layout is the adapter's; the last block's attention writes the image rows only
    (its text gives keys and values), and its text keys matter."""
    model = tiny_sd3(**SD35)
    wrapped = DiffusersSD3(model)
    cfg = wrapped.config
    assert Layout(SD3.layout(wrapped)) == cfg.block_layout() == Layout(layout(cfg))
    assert cfg.block_layout().streams(0, "attn") == (TEXT_STREAM, IMAGE)
    assert cfg.block_layout().streams(0, "attn_image") == (IMAGE,)
    assert cfg.block_layout().branches() == (("attn", "attn_image", "mlp", "mlp_text"), ("attn", "mlp", "mlp_text"),
                                             ("attn", "mlp"))
    assert cfg.block_layout().streams(2, "attn") == (IMAGE,)
    x, t, text, pooled = inputs()
    seen = {}
    last = wrapped.transformer_blocks[2].attn
    handle = last.register_forward_hook(lambda m, a, out: seen.update(rows=a[0].shape[1], out=out.shape[1]))
    with torch.no_grad():
        wrapped(x, t, text, pooled)
    handle.remove()
    assert seen == {"rows": TEXT_LENGTH + cfg.num_tokens, "out": cfg.num_tokens}


def test_config_round_trips_and_state_dict_shapes_are_the_models():
    for fields in (PLAIN, SD35):
        model = tiny_sd3(**fields)
        cfg = DiffusersSD3(model).config
        assert cfg == SD3Config(**fields) and cfg.family is FAMILIES["sd3"]
        assert config_from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
        assert sd3_state_dict_shapes(cfg) == {k: tuple(v.shape) for k, v in model.state_dict().items()}
        assert cfg.family.state_dict_shapes(cfg) == {k: tuple(v.shape) for k, v in
                                                    DiffusersSD3(model).state_dict().items()}
        rebuilt = cfg.family.build(cfg)
        assert isinstance(rebuilt, DiffusersSD3) and rebuilt.config == cfg


def test_folders_load_and_bad_ones_are_refused(tmp_path):
    model = tiny_sd3(seed=3, **SD35)
    folder = tmp_path / "model"
    model.save_pretrained(str(folder), safe_serialization=True)
    x, t, text, pooled = inputs()
    loaded = load_diffusers(folder)
    with torch.no_grad():
        assert (loaded(x, t, text, pooled) - diffusers_forward(model, x, t, text, pooled)).abs().max().item() <= ATOL
    assert isinstance(loaded, DiffusersSD3) and loaded.config == SD3Config(**SD35)
    config = json.loads((folder / "config.json").read_text())
    weights = (folder / "diffusion_pytorch_model.safetensors").read_bytes()

    def refused(name: str, changes: dict, match: str, data: bytes = weights) -> None:
        bad = tmp_path / name
        bad.mkdir()
        (bad / "config.json").write_text(json.dumps({**config, **changes}))
        (bad / "diffusion_pytorch_model.safetensors").write_bytes(data)
        with pytest.raises(TcgraphError, match=match):
            load_diffusers(bad)

    refused("deeper", {"num_layers": 4}, "do not fit its config.json: .* missing")
    refused("wider", {"pooled_projection_dim": 11}, "other shapes")
    refused("damaged", {}, "cannot read the weights", weights[: len(weights) // 2])
    refused("dual", {"dual_attention_layers": [1]}, r"dual_attention_layers \[1\]")
    refused("qk", {"qk_norm": "layer_norm"}, "qk_norm 'layer_norm'")
    refused("caption", {"caption_projection_dim": 16}, "caption_projection_dim 16 is not the width 32")
    with pytest.raises(TcgraphError, match="beyond the position table"):
        sd3_config_from_diffusers(config, "cfg", input_size=32)


def test_rows_are_the_attentions_rows_of_the_chosen_image_tokens():
    """Each attention's `rows` (what a token action computes): every text row it writes (none in the last
    block), then the chosen image rows, for indices shared by the batch [k] and per sample [B, k]; equal
    to those rows of its whole output."""
    wrapped = DiffusersSD3(tiny_sd3(**SD35))
    n, g = wrapped.config.num_tokens, torch.Generator().manual_seed(2)
    u = torch.randn(2, TEXT_LENGTH + n, 32, generator=g)
    shared, own = torch.tensor([1, 4, 6, 11, 15]), torch.tensor([[0, 3, 9], [15, 2, 7]])
    with torch.no_grad():
        for block in wrapped.transformer_blocks:
            attns = [(block.attn, u, 0 if block.attn.to_add_out is None else TEXT_LENGTH)]
            if hasattr(block, "attn2"):
                attns.append((block.attn2, u[:, TEXT_LENGTH:], 0))
            for attn, rows_in, text in attns:
                whole = attn(rows_in)
                image = whole[:, text:]
                assert whole.shape[1] == text + n
                for idx, want in ((shared, image[:, shared]), (own, torch.stack([image[b, own[b]] for b in range(2)]))):
                    got = attn.rows(rows_in, idx)
                    assert (got - torch.cat([whole[:, :text], want], dim=1)).abs().max().item() <= 1e-6


@pytest.mark.skipif(not os.environ.get("TCGRAPH_DIFFUSERS_SD3"),
                    reason="set TCGRAPH_DIFFUSERS_SD3 to a local SD3Transformer2DModel folder (or SD3/SD3.5 pipeline) "
                           "to check real weights; none can be downloaded here")
def test_real_weights_from_a_local_folder_equal_diffusers_forward():
    """With real weights (SD3-Medium or SD3.5 saved locally), at a 32x32 latent and 16 text tokens to
    keep it short: the folder's config reads, and tcgraph's wrapper and its `full` graph equal
    diffusers' own forward within 1e-4, float32."""
    from tcgraph.models.diffusers.folder import read_folder

    folder = read_folder(os.environ["TCGRAPH_DIFFUSERS_SD3"])
    reference = diffusers.SD3Transformer2DModel.from_pretrained(str(folder.model_dir)).float().eval()
    model = DiffusersSD3(reference, input_size=32).eval()  # the same modules, one copy of the weights
    cfg = model.config
    assert sd3_config_from_diffusers(folder.config, "config.json", input_size=32) == cfg
    g, length = torch.Generator().manual_seed(0), 16
    x, t = torch.randn(2, cfg.in_channels, 32, 32, generator=g), torch.tensor([980.0, 400.0])
    text = torch.randn(2, length, cfg.caption_channels, generator=g)
    pooled = torch.randn(2, cfg.pooled_channels, generator=g)
    settings = SamplerSettings(sampler="diffusers", scheduler={"_class_name": "FlowMatchEulerDiscreteScheduler",
                                                               "shift": 3.0},
                               num_steps=1, batch=2, cfg_scale=1.0, resolution=32, text_length=length, pooled=True)
    lay = cfg.block_layout()
    plan = Plan("full", settings, (Recipe.uniform(lay.depth, COMPUTE, lay.branches()),), cfg.num_tokens, layout=lay)
    (variant,) = build_variants(model, plan, check=False)
    with torch.no_grad():
        ref = diffusers_forward(reference, x, t, text, pooled)
        got = variant.gm(x, t, text, pooled)
        got = got[0] if isinstance(got, tuple) else got
        assert (model(x, t, text, pooled) - ref).abs().max().item() <= ATOL
    assert (got - ref).abs().max().item() <= ATOL
