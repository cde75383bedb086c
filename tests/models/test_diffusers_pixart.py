"""diffusers' PixArtTransformer2DModel: tcgraph's wrapper, its adapter's eager loop and its
captured graph against diffusers' own forward; parameter shapes without diffusers; folders as
save_pretrained writes them, and what tcgraph refuses to run."""
from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("diffusers")

from diffusers import PixArtTransformer2DModel  # noqa: E402

from tcgraph.errors import TcgraphError  # noqa: E402
from tcgraph.models import build_model, load_model  # noqa: E402
from tcgraph.models.adapter import adapter_for  # noqa: E402
from tcgraph.models.diffusers.config import (  # noqa: E402
    pixart_config_from_diffusers,
    pixart_kwargs,
    state_dict_shapes,
)
from tcgraph.models.diffusers.pixart import PIXART, DiffusersPixArt, save_pixart  # noqa: E402
from tcgraph.passes import capture, expand_blocks  # noqa: E402

TINY = dict(num_attention_heads=2, attention_head_dim=16, in_channels=2, out_channels=4, num_layers=2,
            sample_size=8, patch_size=2, caption_channels=24, cross_attention_dim=32)  # 16 tokens, hidden 32
TEXT_LEN = 7
NO_EXTRA = {"resolution": None, "aspect_ratio": None}


def tiny_pixart(seed: int = 0, **overrides) -> PixArtTransformer2DModel:
    """diffusers' random initialisation with noise of std 0.05 added to every parameter, so that
    no table, gate or projection is left at a value (such as zero) that would hide a mistake."""
    torch.manual_seed(seed)
    model = PixArtTransformer2DModel(**{**TINY, **overrides}).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def inputs(batch: int = 3, channels: int = 2, side: int = 8, caption: int = 24, mask_dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, channels, side, side, generator=g)
    t = torch.tensor([0, 421, 999, 77][:batch])
    text = torch.randn(batch, TEXT_LEN, caption, generator=g)
    mask = torch.ones(batch, TEXT_LEN)
    mask[0, 5:] = 0  # padding at the end
    mask[1, 2] = 0  # a hole
    if batch > 2:
        mask[2, :3] = 0
    return x, t, text, mask.to(mask_dtype)


def diffusers_forward(model, x, t, text, mask):
    return model(x, encoder_hidden_states=text, timestep=t, encoder_attention_mask=mask,
                 added_cond_kwargs=NO_EXTRA).sample


CASES = [
    ({}, torch.float32),  # learned sigma, norm_eps 1e-6
    ({"out_channels": None, "num_layers": 3, "norm_eps": 1e-5, "interpolation_scale": 2}, torch.int64),
    ({"out_channels": 2, "num_layers": 1, "patch_size": 4, "norm_eps": 1e-4}, torch.bool),
]


@pytest.mark.parametrize("overrides,mask_dtype", CASES)
def test_wrapper_adapter_loop_and_graph_equal_diffusers_forward(overrides, mask_dtype):
    """The traceable forward, the adapter's eager block loop, and the captured and expanded fx
    graph all equal diffusers' forward within 1e-5; the mask and every branch matter."""
    model = tiny_pixart(**overrides)
    wrapped = DiffusersPixArt(model)
    x, t, text, mask = inputs(mask_dtype=mask_dtype)
    adapter = adapter_for(wrapped)
    assert adapter is PIXART and adapter.branch_names == ("attn", "cross", "mlp")
    with torch.no_grad():
        ref = diffusers_forward(model, x, t, text, mask)
        got = wrapped(x, t, text, mask)
        loop = adapter.run_blocks(wrapped, x, t, (text, mask), lambda l, b, u, fn: fn(u()))
        gm = expand_blocks(capture(wrapped).gm)
        traced = gm(x, t, text, mask)
        unmasked = diffusers_forward(model, x, t, text, torch.ones_like(mask))
        no_cross = adapter.run_blocks(wrapped, x, t, (text, mask),
                                      lambda l, b, u, fn: 0 * u() if b == "cross" else fn(u()))
    out_ch = overrides.get("out_channels", 4) or 2
    assert ref.shape == got.shape == (3, out_ch, 8, 8) and ref.abs().max() > 0.1
    for value in (got, loop, traced):
        assert (value - ref).abs().max().item() <= 1e-5
    assert (unmasked - ref).abs().max().item() > 1e-3  # the mask changes the output ...
    assert (unmasked[:, :, :1] - ref[:, :, :1]).abs().amax(dim=(1, 2, 3)).min().item() > 1e-4  # ... of every sample
    assert (no_cross - ref).abs().max().item() > 1e-3  # the cross branch reads the text
    assert [n.target for n in gm.graph.nodes if n.op == "placeholder"] == [
        "x", "t", "encoder_hidden_states", "encoder_attention_mask"]
    cfg = wrapped.config
    assert cfg.layout == "pixart" and cfg.learn_sigma == (out_ch == 4) and cfg.norm_eps == overrides.get("norm_eps", 1e-6)
    assert cfg.caption_channels == 24 and cfg.text_conditioned and cfg.num_classes == 0


def test_timestep_features_are_pixarts_own():
    """PixArt's Timesteps: cos first, frequency shift 0 (DiT's diffusers layout has 1), 256 features."""
    wrapped = DiffusersPixArt(tiny_pixart())
    assert wrapped.time_features == dict(dim=256, shift=0.0, scale=1.0, flip_sin_to_cos=True)


def test_state_dict_shapes_and_config_round_trip_without_diffusers():
    cfg = pixart_config_from_diffusers(TINY, "tiny")
    wrapped = build_model(cfg)
    assert isinstance(wrapped, DiffusersPixArt) and wrapped.config == cfg
    assert pixart_config_from_diffusers(pixart_kwargs(cfg), "again") == cfg
    assert state_dict_shapes(cfg) == {k: tuple(v.shape) for k, v in wrapped.state_dict().items()}
    diffusers_keys = set(PixArtTransformer2DModel(**pixart_kwargs(cfg)).state_dict())
    assert set(wrapped.state_dict()) == diffusers_keys | {"pos_table"}


MICRO_TINY = {**TINY, "attention_head_dim": 12, "cross_attention_dim": 24}  # hidden 24: thirds for the micro-conditions


def test_micro_conditions_are_constants_of_the_resolution(tmp_path):
    """PixArt-alpha 1024's resolution and aspect-ratio micro-conditions: the wrapper and its graph fix
    them to the square image of the latent side times 8 and equal diffusers' forward given those;
    other values change the output; the config round-trips, folders load, parameter shapes hold."""
    model = tiny_pixart(**MICRO_TINY, use_additional_conditions=True)
    wrapped = DiffusersPixArt(model)
    cfg = wrapped.config
    assert cfg.micro_size == 64 and cfg.hidden_size == 24
    x, t, text, mask = inputs()
    square = {"resolution": torch.tensor([[64.0, 64.0]]).repeat(3, 1), "aspect_ratio": torch.ones(3, 1)}
    wide = {"resolution": torch.tensor([[48.0, 96.0]]).repeat(3, 1), "aspect_ratio": torch.full((3, 1), 0.5)}
    with torch.no_grad():
        run = lambda extra: model(x, encoder_hidden_states=text, timestep=t, encoder_attention_mask=mask,  # noqa: E731
                                  added_cond_kwargs=extra).sample
        ref, other = run(square), run(wide)
        got = wrapped(x, t, text, mask)
        traced = expand_blocks(capture(wrapped).gm)(x, t, text, mask)
    for value in (got, traced):
        assert (value - ref).abs().max().item() <= 1e-5
    assert (other - ref).abs().max().item() > 1e-3  # the micro-conditions reach the output
    assert pixart_config_from_diffusers(pixart_kwargs(cfg), "again") == cfg
    assert state_dict_shapes(cfg) == {k: tuple(v.shape) for k, v in wrapped.state_dict().items()}
    model.save_pretrained(str(tmp_path / "m"), safe_serialization=True)
    loaded = load_model(tmp_path / "m")
    assert loaded.config == cfg
    with torch.no_grad():
        assert (loaded(x, t, text, mask) - ref).abs().max().item() <= 1e-5


def test_pipelines_must_pass_the_micro_conditions_the_graphs_fix():
    from types import SimpleNamespace

    from tcgraph.diffusers import ArtifactTransformer
    from tcgraph.errors import UsageError

    check = ArtifactTransformer._check_micro_conditions
    stub = SimpleNamespace(model_config=pixart_config_from_diffusers(
        {**MICRO_TINY, "use_additional_conditions": True}, "micro"))
    check(stub, {"resolution": torch.tensor([[64.0, 64.0]] * 2), "aspect_ratio": torch.ones(2, 1)})
    for bad in ({"resolution": torch.tensor([[64.0, 128.0]] * 2), "aspect_ratio": torch.full((2, 1), 0.5)}, None):
        with pytest.raises(UsageError, match="fix PixArt's micro-conditions to a 64x64 image.*height=64, width=64"):
            check(stub, bad)
    check(SimpleNamespace(model_config=pixart_config_from_diffusers(TINY, "plain")), None)  # nothing to check


def save_pipeline(tmp_path, model: PixArtTransformer2DModel):
    root = tmp_path / "pipe"
    model.save_pretrained(str(root / "transformer"), safe_serialization=True)
    (root / "scheduler").mkdir(parents=True)
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(
        {"_class_name": "DPMSolverMultistepScheduler", "num_train_timesteps": 1000, "beta_schedule": "linear",
         "algorithm_type": "dpmsolver++", "solver_order": 2}))
    (root / "model_index.json").write_text(json.dumps(
        {"_class_name": "PixArtAlphaPipeline", "transformer": ["diffusers", "PixArtTransformer2DModel"],
         "scheduler": ["diffusers", "DPMSolverMultistepScheduler"], "text_encoder": ["transformers", "T5EncoderModel"],
         "tokenizer": ["transformers", "T5Tokenizer"], "vae": ["diffusers", "AutoencoderKL"]}))
    return root


def test_model_and_pipeline_folders_load_with_their_weights(tmp_path):
    model = tiny_pixart(seed=3, interpolation_scale=2)
    model.save_pretrained(str(tmp_path / "model"), safe_serialization=True)
    pipe = save_pipeline(tmp_path, model)
    x, t, text, mask = inputs()
    with torch.no_grad():
        ref = diffusers_forward(model, x, t, text, mask)
        for folder in (tmp_path / "model", pipe):
            loaded = load_model(folder)
            assert isinstance(loaded, DiffusersPixArt) and loaded.config == DiffusersPixArt(model).config
            assert (loaded(x, t, text, mask) - ref).abs().max().item() <= 1e-5

    wrapped = DiffusersPixArt(tiny_pixart(seed=4))  # a wrapper saved as diffusers' model of its config
    again = load_model(save_pixart(wrapped, tmp_path / "saved"))
    with torch.no_grad():
        assert torch.equal(again(x, t, text, mask), wrapped(x, t, text, mask))
    with pytest.raises(TcgraphError, match="position table"):  # interpolation_scale 2 is not in the config
        save_pixart(DiffusersPixArt(model), tmp_path / "scaled")


def test_refusals_name_their_reason(tmp_path):
    folder = tmp_path / "m"
    tiny_pixart().save_pretrained(str(folder), safe_serialization=True)
    config = json.loads((folder / "config.json").read_text())

    def refused(changes: dict, match: str, name: str) -> None:
        bad = tmp_path / name
        bad.mkdir()
        (bad / "config.json").write_text(json.dumps({**config, **changes}))
        (bad / "diffusion_pytorch_model.safetensors").write_bytes((folder / "diffusion_pytorch_model.safetensors")
                                                                  .read_bytes())
        with pytest.raises(TcgraphError, match=match):
            load_model(bad)

    refused({"use_additional_conditions": True}, "use_additional_conditions with hidden size 32", "extra")
    refused({"norm_type": "ada_norm_zero"}, "norm_type 'ada_norm_zero'", "norm")
    with pytest.raises(TcgraphError) as e:
        pixart_config_from_diffusers({**TINY, "caption_channels": None, "activation_fn": "geglu",
                                      "norm_elementwise_affine": True, "cross_attention_dim": 16,
                                      "attention_type": "gated", "out_channels": 3}, "cfg")
    for reason in ("caption_channels null", "activation_fn 'geglu'", "norm_elementwise_affine true",
                   "cross_attention_dim 16 with hidden size 32", "attention_type 'gated'", "out_channels 3"):
        assert reason in str(e.value)
    assert pixart_config_from_diffusers({**TINY, "sample_size": 128, "use_additional_conditions": False}, "ok")
    assert pixart_config_from_diffusers({**MICRO_TINY, "sample_size": 128, "use_additional_conditions": None},
                                        "alpha 1024").micro_size == 1024  # diffusers' rule: sample_size 128 reads them

    bin_only = tmp_path / "bin"
    bin_only.mkdir()
    (bin_only / "config.json").write_text(json.dumps(config))
    (bin_only / "diffusion_pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(TcgraphError, match="safetensors only"):
        load_model(bin_only)

    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({**config, "_class_name": "UNet2DConditionModel"}))
    with pytest.raises(TcgraphError, match="supported classes: DiTTransformer2DModel, PixArtTransformer2DModel"):
        load_model(other)

    fused = tiny_pixart()
    fused.fuse_qkv_projections()
    with pytest.raises(TcgraphError, match="block 0 has .*FusedAttnProcessor2_0"):
        DiffusersPixArt(fused)
