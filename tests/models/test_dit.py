"""DiT: the official parameter layout, the config registry, fx tracing, checkpoints."""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import pytest
import torch
import torch.fx

import tcgraph.models as models
from tcgraph.errors import TcgraphError
from tcgraph.models import (
    CONFIGS,
    DiT,
    DiTConfig,
    build_model,
    check_class_ids,
    infer_config,
    load_checkpoint_into,
    load_model,
    make_config,
    save_checkpoint,
)
from tcgraph.models.official.checkpoint import load_state_dict_file
from tcgraph.models.official.dit import DiTBlock


XL2_PARAMS = 675_129_632  # the paper's "675M", pos_embed included

# A tiny config that no registered name fits: the checkpoint tests run on it in milliseconds.
TINY = make_config("DiT-S/2", input_size=8, hidden_size=32, depth=2, num_heads=2, num_classes=5)


#################################################################################
#     The official key list, generated independently of tcgraph's model code    #
#################################################################################


def official_keys(
    *, depth: int, hidden: int, patch: int, in_channels: int, input_size: int, num_classes: int,
    learn_sigma: bool, mlp_ratio: float = 4.0, freq_dim: int = 256,
) -> dict[str, tuple[int, ...]]:
    """Names and shapes of facebookresearch/DiT `models.py` DiT.state_dict(), from its source."""
    out_channels = in_channels * 2 if learn_sigma else in_channels
    mlp_hidden = int(hidden * mlp_ratio)
    keys = {
        "pos_embed": (1, (input_size // patch) ** 2, hidden),
        "x_embedder.proj.weight": (hidden, in_channels, patch, patch),
        "x_embedder.proj.bias": (hidden,),
        "t_embedder.mlp.0.weight": (hidden, freq_dim),
        "t_embedder.mlp.0.bias": (hidden,),
        "t_embedder.mlp.2.weight": (hidden, hidden),
        "t_embedder.mlp.2.bias": (hidden,),
        "y_embedder.embedding_table.weight": (num_classes + 1, hidden),  # + the null class
    }
    for n in range(depth):
        b = f"blocks.{n}."
        keys.update({
            b + "attn.qkv.weight": (3 * hidden, hidden),
            b + "attn.qkv.bias": (3 * hidden,),
            b + "attn.proj.weight": (hidden, hidden),
            b + "attn.proj.bias": (hidden,),
            b + "mlp.fc1.weight": (mlp_hidden, hidden),
            b + "mlp.fc1.bias": (mlp_hidden,),
            b + "mlp.fc2.weight": (hidden, mlp_hidden),
            b + "mlp.fc2.bias": (hidden,),
            b + "adaLN_modulation.1.weight": (6 * hidden, hidden),
            b + "adaLN_modulation.1.bias": (6 * hidden,),
        })
    keys.update({
        "final_layer.linear.weight": (patch * patch * out_channels, hidden),
        "final_layer.linear.bias": (patch * patch * out_channels,),
        "final_layer.adaLN_modulation.1.weight": (2 * hidden, hidden),
        "final_layer.adaLN_modulation.1.bias": (2 * hidden,),
    })
    return keys


# The paper's Table 1, written out here rather than read from the registry.
PAPER = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}


def expected_for(name: str) -> dict[str, tuple[int, ...]]:
    if name == "digits":
        return official_keys(depth=6, hidden=128, patch=2, in_channels=1, input_size=16, num_classes=10, learn_sigma=False)
    size, patch = name[len("DiT-"):].split("/")
    depth, hidden, _heads = PAPER[size]
    return official_keys(depth=depth, hidden=hidden, patch=int(patch), in_channels=4, input_size=32,
                         num_classes=1000, learn_sigma=True)


def meta_model(config: DiTConfig | str) -> DiT:
    config = make_config(config) if isinstance(config, str) else config
    with torch.device("meta"):
        return DiT(config)


def shapes(module_or_sd) -> dict[str, tuple[int, ...]]:
    sd = module_or_sd.state_dict() if isinstance(module_or_sd, torch.nn.Module) else module_or_sd
    return {k: tuple(v.shape) for k, v in sd.items()}


def randomized(config: DiTConfig, seed: int = 0) -> DiT:
    """A model whose every weight is random: the DiT init zeroes adaLN and the final layer,
    which would make any two models agree trivially."""
    model = build_model(config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def inputs(config: DiTConfig, batch: int = 3, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, config.in_channels, config.input_size, config.input_size, generator=g)
    t = torch.tensor([999, 500, 3][:batch])
    y = torch.tensor([0, config.num_classes - 1, config.num_classes][:batch])  # incl. the null class
    return x, t, y


def out(model: DiT, config: DiTConfig) -> torch.Tensor:
    with torch.no_grad():
        return model(*inputs(config))


#################################################################################
#                                Parameter layout                               #
#################################################################################


def test_xl2_official_key_list_literal_shapes():
    keys = expected_for("DiT-XL/2")
    assert len(keys) == 28 * 10 + 12
    literal = {
        "pos_embed": (1, 256, 1152),
        "x_embedder.proj.weight": (1152, 4, 2, 2),
        "t_embedder.mlp.0.weight": (1152, 256),
        "y_embedder.embedding_table.weight": (1001, 1152),
        "blocks.27.attn.qkv.weight": (3456, 1152),
        "blocks.27.attn.qkv.bias": (3456,),
        "blocks.0.mlp.fc1.weight": (4608, 1152),
        "blocks.0.mlp.fc2.weight": (1152, 4608),
        "blocks.13.adaLN_modulation.1.weight": (6912, 1152),
        "final_layer.linear.weight": (32, 1152),
        "final_layer.adaLN_modulation.1.weight": (2304, 1152),
    }
    for k, shape in literal.items():
        assert keys[k] == shape, k
    assert sum(torch.Size(s).numel() for s in keys.values()) == XL2_PARAMS


@pytest.mark.parametrize("name", ["DiT-XL/2", "DiT-S/2", "digits"])
def test_state_dict_keys_and_shapes_match_official(name):
    got, want = shapes(meta_model(name)), expected_for(name)
    assert set(got) == set(want), (sorted(set(got) - set(want)), sorted(set(want) - set(got)))
    assert got == want


def test_every_registered_config_builds_with_official_layout():
    assert set(CONFIGS) == {f"DiT-{s}/{p}" for s in PAPER for p in (2, 4, 8)} | {"digits"}
    for name in CONFIGS:
        model = meta_model(name)
        n_params = sum(p.numel() for p in model.parameters())
        assert shapes(model) == expected_for(name), name
        assert n_params == sum(torch.Size(s).numel() for s in expected_for(name).values()), name
    assert sum(p.numel() for p in meta_model("DiT-XL/2").parameters()) == XL2_PARAMS


def test_build_model_real_weights_and_output_shape():
    model = build_model("digits", depth=2)
    assert not model.training
    x, t, y = inputs(model.config)
    assert model(x, t, y).shape == x.shape  # learn_sigma False: C_out = C
    sigma = build_model(TINY)
    assert sigma(*inputs(TINY)).shape == (3, 8, 8, 8)  # learn_sigma: 2C channels


#################################################################################
#                                   torch.fx                                    #
#################################################################################


class BlockLeafTracer(torch.fx.Tracer):
    def is_leaf_module(self, m: torch.nn.Module, qualname: str) -> bool:
        return isinstance(m, DiTBlock) or super().is_leaf_module(m, qualname)


def block_calls(graph: torch.fx.Graph) -> list[str]:
    return [n.target for n in graph.nodes if n.op == "call_module" and str(n.target).startswith("blocks.")]


def test_fx_traces_each_block_as_one_leaf_call():
    model = randomized(TINY)
    graph = BlockLeafTracer().trace(model)
    assert block_calls(graph) == ["blocks.0", "blocks.1"]
    # Nothing inside a block leaks into the graph.
    inner = [n for n in graph.nodes if n.op in ("call_module", "get_attr") and str(n.target).count(".") > 1
             and str(n.target).startswith("blocks.")]
    assert inner == []
    gm = torch.fx.GraphModule(model, graph)
    assert torch.equal(out(gm, TINY), out(model, TINY))


def test_fx_traces_xl2_on_meta_device():
    graph = BlockLeafTracer().trace(meta_model("DiT-XL/2"))
    assert block_calls(graph) == [f"blocks.{i}" for i in range(28)]


#################################################################################
#                                  Checkpoints                                  #
#################################################################################


def test_official_bare_state_dict_round_trip(tmp_path):
    model = randomized(TINY)
    path = tmp_path / "DiT-tiny.pt"
    torch.save(model.state_dict(), path)  # how the released DiT-XL-2-256x256.pt was written
    loaded = load_model(path, config=TINY)
    assert not loaded.training
    assert torch.equal(out(loaded, TINY), out(model, TINY))
    assert loaded.pos_embed.requires_grad is False


def test_official_training_checkpoint_prefers_ema(tmp_path):
    model, ema = randomized(TINY, seed=0), randomized(TINY, seed=1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0)
    model(*inputs(TINY)).square().mean().backward()
    opt.step()
    args = argparse.Namespace(model="DiT-XL/2", image_size=256, num_classes=1000, global_batch_size=256,
                              results_dir="results", ckpt_every=50_000, vae="ema", epochs=1400)
    path = tmp_path / "0400000.pt"
    # The layout of facebookresearch/DiT train.py's checkpoints.
    torch.save({"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(), "args": args}, path)
    loaded = load_model(str(path), config=TINY)
    assert torch.equal(out(loaded, TINY), out(ema, TINY))
    assert not torch.equal(out(loaded, TINY), out(model, TINY))

    torch.save({"model": model.state_dict(), "args": args}, path)
    assert torch.equal(out(load_model(path, config=TINY), TINY), out(model, TINY))
    torch.save({"state_dict": ema.state_dict(), "epoch": 3}, path)
    assert torch.equal(out(load_model(path, config=TINY), TINY), out(ema, TINY))


def test_ddp_and_compile_prefixes_are_removed(tmp_path):
    model = randomized(TINY)
    path = tmp_path / "ddp.pt"
    torch.save({f"module.{k}": v for k, v in model.state_dict().items()}, path)
    assert set(load_state_dict_file(path)) == set(model.state_dict())


@pytest.mark.parametrize("suffix", [".safetensors", ".pt", ".pth", ".bin"])
def test_save_checkpoint_round_trip(tmp_path, suffix):
    model = randomized(TINY)
    path = save_checkpoint(model, tmp_path / "sub" / f"w{suffix}")
    assert os.listdir(tmp_path / "sub") == [f"w{suffix}"]  # no temp file left behind
    assert torch.equal(out(load_model(path, config=TINY), TINY), out(model, TINY))


def test_load_checkpoint_into_existing_model():
    model, other = randomized(TINY, seed=0), randomized(TINY, seed=1)
    load_checkpoint_into(other, model.state_dict())
    assert torch.equal(out(other, TINY), out(model, TINY))


def test_loads_half_precision_weights_as_float32(tmp_path):
    model = randomized(TINY)
    path = save_checkpoint({k: v.half() for k, v in model.state_dict().items()}, tmp_path / "h.safetensors")
    loaded = load_model(path, config=TINY)
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    torch.testing.assert_close(out(loaded, TINY), out(model, TINY), atol=2e-2, rtol=2e-2)


#################################################################################
#                                Config inference                               #
#################################################################################


def test_infer_config_names_every_registered_config():
    for name in CONFIGS:
        assert infer_config(meta_model(name).state_dict()) == [name]


def test_infer_config_other_input_size_and_none():
    sd = meta_model(make_config("DiT-XL/2", input_size=64)).state_dict()
    assert tuple(sd["pos_embed"].shape) == (1, 1024, 1152)
    assert infer_config(sd) == ["DiT-XL/2 with input_size=64"]
    assert infer_config(meta_model(TINY).state_dict()) == []
    assert infer_config({}) == []


def test_load_model_infers_the_config(tmp_path):
    digits = randomized(CONFIGS["digits"])
    path = save_checkpoint(digits, tmp_path / "d.safetensors")
    loaded = load_model(path)
    assert loaded.config == CONFIGS["digits"]
    assert torch.equal(out(loaded, loaded.config), out(digits, digits.config))
    assert load_model(path, config="digits").config == CONFIGS["digits"]


def test_load_model_without_a_fitting_config_says_so(tmp_path):
    path = save_checkpoint(randomized(TINY), tmp_path / "tiny.pt")
    with pytest.raises(TcgraphError, match="no registered config") as e:
        load_model(path)
    assert "depth 2" in str(e.value) and "hidden_size 32" in str(e.value)


#################################################################################
#                                     Errors                                    #
#################################################################################


def test_unknown_config_name_lists_valid_names(tmp_path):
    with pytest.raises(TcgraphError) as e:
        make_config("DiT-Q/2")
    assert "DiT-Q/2" in str(e.value) and "DiT-XL/2" in str(e.value) and "digits" in str(e.value)
    path = save_checkpoint(randomized(TINY), tmp_path / "w.pt")
    with pytest.raises(TcgraphError, match="DiT-XL/2"):
        load_model(path, config="DiT-Q/2")


def test_checkpoint_of_another_config_names_the_shapes(tmp_path):
    path = save_checkpoint(randomized(CONFIGS["digits"]), tmp_path / "digits.safetensors")
    narrow = make_config("digits", hidden_size=64, depth=5)
    with pytest.raises(TcgraphError) as e:
        load_model(path, config=narrow)
    msg = str(e.value)
    assert str(path) in msg
    assert "pos_embed (1, 64, 128) in the checkpoint vs (1, 64, 64) in the model" in msg
    assert "10 unexpected keys: blocks.5." in msg  # the sixth block
    assert "keys with other shapes" in msg
    assert "fits registered config 'digits'" in msg


def test_missing_and_unexpected_keys_are_counted():
    model = randomized(TINY)
    sd = model.state_dict()
    sd.pop("pos_embed")
    sd.pop("blocks.1.mlp.fc2.bias")
    sd["extra.weight"] = torch.zeros(1)
    with pytest.raises(TcgraphError) as e:
        load_checkpoint_into(build_model(TINY), sd)
    msg = str(e.value)
    assert "2 missing keys: pos_embed, blocks.1.mlp.fc2.bias" in msg
    assert "1 unexpected keys: extra.weight" in msg
    assert "no registered config fits" in msg


def test_missing_file(tmp_path):
    path = tmp_path / "nowhere.pt"
    with pytest.raises(TcgraphError, match="nowhere.pt"):
        load_model(path, config=TINY)
    with pytest.raises(TcgraphError, match="not found"):
        load_state_dict_file(path)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_corrupt_file(tmp_path, suffix):
    path = tmp_path / f"corrupt{suffix}"
    path.write_bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0),
                                   dtype=torch.uint8).numpy().tobytes())
    with pytest.raises(TcgraphError, match="damaged") as e:
        load_model(path, config=TINY)
    assert str(path) in str(e.value)
    (tmp_path / f"empty{suffix}").write_bytes(b"")
    with pytest.raises(TcgraphError, match="damaged"):
        load_state_dict_file(tmp_path / f"empty{suffix}")


def test_random_bytes_never_escape_as_other_errors(tmp_path):
    # torch's weights-only unpickler raises IndexError/KeyError on some short random inputs.
    g = torch.Generator().manual_seed(1)
    for i in range(150):
        path = tmp_path / f"r{i}.pt"
        path.write_bytes(b"\x80\x02" + torch.randint(0, 256, (62,), generator=g, dtype=torch.uint8).numpy().tobytes())
        with pytest.raises(TcgraphError):
            load_state_dict_file(path)


def test_unknown_suffix(tmp_path):
    path = tmp_path / "w.ckpt"
    path.write_bytes(b"x")
    with pytest.raises(TcgraphError, match=r"\.safetensors"):
        load_state_dict_file(path)
    with pytest.raises(TcgraphError, match="unknown file type"):
        save_checkpoint(randomized(TINY), tmp_path / "w.npz")


class _RunsCode:
    """Unpickling this would create a file: the loader must refuse, not execute."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickled_code_is_refused_not_run(tmp_path):
    marker = tmp_path / "executed"
    path = tmp_path / "evil.pt"
    torch.save({"model": randomized(TINY).state_dict(), "payload": _RunsCode(marker)}, path)
    with pytest.raises(TcgraphError, match="arbitrary code"):
        load_model(path, config=TINY)
    assert not marker.exists()


def test_file_without_weights(tmp_path):
    path = tmp_path / "opt.pt"
    torch.save({"opt": {"lr": 1.0}, "step": 3}, path)
    with pytest.raises(TcgraphError, match="'opt', 'step'"):
        load_state_dict_file(path)


def test_unknown_model_name_lists_pretrained():
    with pytest.raises(TcgraphError) as e:
        load_model("no-such-model")
    assert "digits" in str(e.value) and "no-such-model" in str(e.value)
    with pytest.raises(TcgraphError, match="build_model"):
        load_model("DiT-XL/2")  # a config, not weights


def test_missing_demo_weights_tell_how_to_make_them(tmp_path, monkeypatch):
    monkeypatch.setitem(models.PRETRAINED, "digits", (tmp_path / "digits.safetensors", "digits"))
    with pytest.raises(TcgraphError, match=r"python scripts/train_demo\.py"):
        load_model("digits")


@pytest.mark.skipif(not models.PRETRAINED["digits"][0].exists(), reason="demo weights not trained yet")
def test_demo_weights_load():
    model = load_model()
    assert model.config == CONFIGS["digits"] and not model.training
    x, t, y = inputs(model.config)
    assert torch.isfinite(model(x, t, y)).all()


def test_class_ids_checked():
    assert torch.equal(check_class_ids([0, 9, 3], 10), torch.tensor([0, 9, 3]))
    assert check_class_ids(4, 10).tolist() == [4]
    with pytest.raises(TcgraphError, match=r"0\.\.9") as e:
        check_class_ids(torch.tensor([1, 10, -1]), 10)
    assert "10, -1" in str(e.value)
    with pytest.raises(TcgraphError, match="integers"):
        check_class_ids([1.5], 10)
