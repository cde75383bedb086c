"""The FLUX demo "digits-flux": scripts/train_flux_demo.py at a tiny budget writes a folder that loads
as the flux family, transforms with fora:2 and samples from prompts; its prompt encoder's sequence and
pooled embeddings; the error naming the training command where the weights are missing."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")

from tcgraph import api, models  # noqa: E402
from tcgraph.demos import digits_flux  # noqa: E402
from tcgraph.demos.digits_flux import PooledPromptEncoder  # noqa: E402
from tcgraph.demos.digits_text import END, LENGTH, PromptEncoder  # noqa: E402
from tcgraph.demos.prompts import prompt_encoder_for  # noqa: E402
from tcgraph.errors import TcgraphError  # noqa: E402

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "train_flux_demo.py"
TINY = ["--steps", "3", "--width", "32", "--double", "1", "--single", "1", "--batch", "8", "--threads", "1",
        "--eval-per-digit", "1", "--eval-steps", "2", "--guided-from", "0", "--log-every", "100"]


def train_main():
    spec = importlib.util.spec_from_file_location("train_flux_demo", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(folder, train_info) of a 3-step run of the training script (width 32, 1 + 1 blocks)."""
    folder = tmp_path_factory.mktemp("flux-demo") / "digits_flux"
    threads = torch.get_num_threads()
    try:
        info = train_main()([*TINY, "--out", str(folder)])
    finally:
        torch.set_num_threads(threads)
    return folder, info


def test_training_writes_the_folder_and_its_summary(trained):
    folder, info = trained
    files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    assert files == ["scheduler/scheduler_config.json", "text_encoder/config.json",
                     "text_encoder/prompt_encoder.safetensors", "train_info.json", "transformer/config.json",
                     "transformer/diffusion_pytorch_model.safetensors"]
    assert info["steps"] == 3 and info["final_loss"] > 0
    assert json.loads((folder / "train_info.json").read_text()) == json.loads(json.dumps(info))
    for scale in ("guidance 1", "guidance 2"):  # 10 images, one per digit: a share in tenths
        accuracy = info["eval"][scale]["accuracy"]
        assert 0 <= accuracy <= 1 and round(accuracy * 10, 6) == int(round(accuracy * 10))
    assert json.loads((folder / "scheduler" / "scheduler_config.json").read_text()) == digits_flux.SCHEDULER


def test_the_folder_loads_as_the_flux_family(trained):
    folder, _ = trained
    model = models.load_model(folder / "transformer")
    cfg = model.config
    assert cfg.family.name == "flux" and type(model).__name__ == "DiffusersFluxGuided"
    assert (cfg.input_size, cfg.in_channels, cfg.hidden_size, cfg.double_depth, cfg.single_depth) == (16, 1, 32, 1, 1)
    assert (cfg.caption_channels, cfg.pooled_channels, cfg.guidance_embeds) == (32, 32, True)
    transformer, encoder = digits_flux.load_digits_flux(folder)
    assert isinstance(encoder, PooledPromptEncoder)
    assert isinstance(prompt_encoder_for(folder / "transformer"), PooledPromptEncoder)
    text = encoder.encode(["a handwritten seven"], negative=None)
    x, t = torch.randn(1, 1, 16, 16, generator=torch.Generator().manual_seed(0)), torch.full((1,), 700.0)
    with torch.no_grad():
        a = model(x, t, *text.model_inputs(False), torch.full((1,), 2.0))
        b = transformer(x, t, *text.model_inputs(False), torch.full((1,), 2.0))
    assert a.shape == (1, 1, 16, 16) and torch.equal(a, b)


def test_fora_transforms_and_samples_from_prompts(trained, tmp_path, monkeypatch):
    folder, _ = trained
    monkeypatch.setitem(models.PRETRAINED, "digits-flux", (folder, None))  # as if trained in place
    art = api.transform("digits-flux", "fora:2", tmp_path / "art", steps=4, batch=2, progress=False,
                        check=False)  # the graphs vs eager: tests/models/test_diffusers_flux.py
    settings = json.loads((art / "manifest.json").read_text())["plan"]["settings"]
    assert settings["scheduler"] == digits_flux.SCHEDULER  # "auto" took the demo's own scheduler
    assert (settings["text_length"], settings["guidance"], settings["pooled"]) == (LENGTH, "input", True)
    prompts = ["a handwritten seven", "the digit 3"]
    samples, labels = api.sample(art, prompts=prompts, per_class=1, progress=False)  # the demo's own encoder
    assert samples.shape == (2, 1, 16, 16) and torch.isfinite(samples).all() and list(labels) == [0, 1]
    named, _ = api.sample(art, prompts=prompts, per_class=1, text_encoder=folder, progress=False)
    assert torch.equal(samples, named)
    # the prompts reached the model: the same noise with the prompts swapped gives other images
    swapped, _ = api.sample(art, prompts=prompts[::-1], per_class=1, progress=False)
    assert (samples - swapped).abs().max() > 1e-3
    # and as the encoder's embeddings, passed directly, give
    text = PooledPromptEncoder.from_folder(folder / "text_encoder").encode(prompts, negative="")
    direct, _ = api.sample(art, text=text, per_class=1, progress=False)
    assert torch.allclose(samples, direct, atol=1e-6)


def test_prompts_give_a_sequence_and_its_pooled_mean():
    torch.manual_seed(0)
    enc = PooledPromptEncoder().eval()
    text = enc.encode(["a handwritten seven", "7"], negative="")
    ids, mask = enc.tokenize(["a handwritten seven", "7"])
    with torch.no_grad():
        seq = enc(ids, mask)
    assert text.embeddings.shape == (2, LENGTH, 32) and torch.equal(text.embeddings, seq)
    assert torch.equal(text.mask, torch.ones(2, LENGTH))  # FLUX reads no mask
    assert torch.allclose(text.pooled[0], seq[0, :4].mean(0), atol=1e-6)  # a, handwritten, seven, </s>
    assert torch.allclose(text.pooled[1], seq[1, :2].mean(0), atol=1e-6)  # 7, </s>
    with torch.no_grad():
        end = enc(torch.tensor([[enc.ids[END]]]), torch.ones(1, 1))[0, 0]
    assert torch.allclose(text.negative_pooled, end.expand(2, -1), atol=1e-6)  # "" is "</s>" alone
    seq_in, pooled_in = text.model_inputs(guided=False)
    assert pooled_in is text.pooled and seq_in is text.embeddings
    assert enc.encode(["seven"], negative=None).negative_pooled is None


def test_the_encoder_folder_says_which_encoder(tmp_path):
    torch.manual_seed(0)
    PooledPromptEncoder().save(tmp_path / "flux" / "text_encoder")
    PromptEncoder().save(tmp_path / "text" / "text_encoder")
    assert digits_flux.is_flux_demo_folder(tmp_path / "flux")
    assert not digits_flux.is_flux_demo_folder(tmp_path / "text")
    assert digits_flux.demo_folder_of("digits-text") is None and digits_flux.demo_folder_of(tmp_path / "text") is None


def test_missing_weights_name_the_training_command(tmp_path, monkeypatch):
    monkeypatch.setitem(models.PRETRAINED, "digits-flux", (tmp_path / "digits_flux", None))
    with pytest.raises(TcgraphError, match="has no weights yet.*python scripts/train_flux_demo.py"):
        models.load_model("digits-flux")
    with pytest.raises(TcgraphError, match="has no weights yet.*python scripts/train_flux_demo.py"):
        api.transform("digits-flux", "fora:2", tmp_path / "art", progress=False)
    with pytest.raises(TcgraphError, match="python scripts/train_flux_demo.py"):
        digits_flux.load_prompt_encoder()
    assert not (tmp_path / "art").exists()


def test_the_cli_names_the_training_command(tmp_path, monkeypatch, capsys):
    from tcgraph.cli import main

    monkeypatch.setitem(models.PRETRAINED, "digits-flux", (tmp_path / "digits_flux", None))
    assert main(["transform", "--model", "digits-flux", "--plan", "fora:2", "--out", str(tmp_path / "art")]) == 1
    assert "python scripts/train_flux_demo.py" in capsys.readouterr().err


def test_the_cli_knows_the_name():
    from tcgraph.cli_table import live_table

    assert "digits-flux" in live_table()["models"]
