"""Paths that a diffusers folder's own files name never leave the folder (a weights index's shards,
model_index.json's components, the text encoder's shards and the tokenizer's file entries), and
damaged or absurd config.json numbers are one clear error naming the file, the key and the value."""
from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

pytest.importorskip("diffusers")

from diffusers import DiTTransformer2DModel  # noqa: E402

from tcgraph.errors import TcgraphError  # noqa: E402
from tcgraph.models import load_diffusers  # noqa: E402
from tcgraph.models.diffusers.folder import read_folder  # noqa: E402
from tcgraph.text.pipeline import PipelineTextEncoder  # noqa: E402
from tcgraph.sampling import scheduler_config_from_folder  # noqa: E402

INDEX = "diffusion_pytorch_model.safetensors.index.json"
TINY = dict(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, num_layers=1, sample_size=4,
            patch_size=2, num_embeds_ada_norm=10)


@pytest.fixture
def sharded(tmp_path):
    """A tiny DiTTransformer2DModel saved in shards (an index and its files), and the model itself."""
    torch.manual_seed(0)
    model = DiTTransformer2DModel(**TINY).eval()
    model.save_pretrained(str(tmp_path / "model"), safe_serialization=True, max_shard_size="20KB")
    assert (tmp_path / "model" / INDEX).is_file()
    return tmp_path / "model", model


def edit_index(folder, change):
    index = json.loads((folder / INDEX).read_text())
    key, shard = next(iter(index["weight_map"].items()))
    new = change(folder, shard)
    index["weight_map"] = {k: (new if v == shard else v) for k, v in index["weight_map"].items()}
    (folder / INDEX).write_text(json.dumps(index))
    return new


def test_sharded_weights_load_as_saved(sharded):
    folder, model = sharded
    loaded = load_diffusers(folder)
    theirs = model.state_dict()
    assert all(torch.equal(v, theirs[k]) for k, v in loaded.state_dict().items() if k != "pos_table")


def move_out(folder, shard):  # a valid shard, moved beside the folder: read before, when the index named it
    shutil.move(folder / shard, folder.parent / shard)
    return f"../{shard}"


def symlink_out(folder, shard):
    shutil.move(folder / shard, folder.parent / shard)
    os.symlink(folder.parent / shard, folder / shard)
    return shard


@pytest.mark.parametrize("change, why", [
    (move_out, "climbs out of the folder with '..'"),
    (lambda folder, shard: "/etc/passwd", "is an absolute path"),
    (symlink_out, "is a symlink to .*, outside the folder"),
    (lambda folder, shard: ["a"], "is not a file name"),
])
def test_a_weights_index_naming_a_path_outside_its_folder_is_refused(sharded, change, why):
    folder, _ = sharded
    entry = edit_index(folder, change)
    with pytest.raises(TcgraphError) as e:
        load_diffusers(folder)
    message = str(e.value)
    assert message.startswith(f"{folder / INDEX}: the weight_map entry of ")
    assert json.dumps(entry) in message and f"must stay inside {folder}" in message
    assert pytest.raises(TcgraphError, load_diffusers, folder).match(why)


def test_a_hugging_face_cache_snapshot_loads(sharded, tmp_path):
    """In the hub cache every file of a snapshot is a symlink into the repository's blobs/: allowed."""
    folder, model = sharded
    repo = tmp_path / "models--x--tiny"
    snapshot = repo / "snapshots" / "abc123" / "transformer"
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for i, f in enumerate(sorted(folder.iterdir())):
        shutil.copy(f, repo / "blobs" / f"blob{i}")
        os.symlink(f"../../../blobs/blob{i}", snapshot / f.name)
    loaded = load_diffusers(snapshot)
    assert torch.equal(loaded.state_dict()["proj_out_2.weight"], model.state_dict()["proj_out_2.weight"])


def pipeline(tmp_path, sharded_folder):
    root = tmp_path / "pipe"
    root.mkdir()
    shutil.copytree(sharded_folder, root / "transformer")
    index = {"_class_name": "DiTPipeline", "transformer": ["diffusers", "DiTTransformer2DModel"]}
    (root / "model_index.json").write_text(json.dumps(index))
    return root, index


@pytest.mark.parametrize("name, why", [("../../evil", "climbs out"), ("/etc", "absolute path"),
                                       ("sub/dir", "not a plain folder name")])
def test_model_index_components_must_be_folders_inside_the_pipeline(sharded, tmp_path, name, why):
    root, index = pipeline(tmp_path, sharded[0])
    assert read_folder(root).model_dir == root / "transformer"
    (root / "model_index.json").write_text(json.dumps({**index, name: ["diffusers", "AutoencoderKL"]}))
    with pytest.raises(TcgraphError, match=f"{root / 'model_index.json'}: the component .*{why}"):
        read_folder(root)


def test_a_component_folder_that_is_a_symlink_out_of_the_pipeline_is_refused(sharded, tmp_path):
    root, _ = pipeline(tmp_path, sharded[0])
    shutil.move(root / "transformer", tmp_path / "elsewhere")
    os.symlink(tmp_path / "elsewhere", root / "transformer")
    with pytest.raises(TcgraphError, match=f"the component \"transformer\" is a symlink to {tmp_path / 'elsewhere'}"):
        read_folder(root)
    (root / "scheduler").mkdir()
    (root / "scheduler" / "scheduler_config.json").write_text('{"_class_name": "DDIMScheduler"}')
    assert scheduler_config_from_folder(root)["_class_name"] == "DDIMScheduler"
    shutil.move(root / "scheduler", tmp_path / "sched")
    os.symlink(tmp_path / "sched", root / "scheduler")
    with pytest.raises(TcgraphError, match="the component \"scheduler\" is a symlink"):
        scheduler_config_from_folder(root)


@pytest.mark.parametrize("where, entry, text", [
    ("tokenizer/tokenizer_config.json", {"vocab_file": "/etc/passwd"}, 'the entry vocab_file "/etc/passwd" is an abs'),
    ("tokenizer/tokenizer_config.json", {"fast_tokenizer_files": ["tokenizer.json", "../../t.json"]},
     'the entry fast_tokenizer_files "../../t.json" climbs out'),
    ("text_encoder/model.safetensors.index.json", {"weight_map": {"w": "../../x.safetensors"}},
     "the weight_map entry of 'w' \"../../x.safetensors\" climbs out"),
])
def test_text_encoder_and_tokenizer_paths_stay_inside(tmp_path, where, entry, text):
    root = tmp_path / "pipe"
    for part in ("text_encoder", "tokenizer"):
        (root / part).mkdir(parents=True)
    (root / "model_index.json").write_text(json.dumps({"_class_name": "PixArtAlphaPipeline",
                                                      "text_encoder": ["transformers", "T5EncoderModel"],
                                                      "tokenizer": ["transformers", "T5Tokenizer"]}))
    (root / where).write_text(json.dumps(entry))
    with pytest.raises(TcgraphError, match=f"{root / where}: {text}".replace("(", r"\(")):
        PipelineTextEncoder(root)


@pytest.mark.parametrize("key, value, expected", [
    ("num_layers", "abc", "an integer from 1 to 1024"),
    ("num_layers", None, "an integer from 1 to 1024"),
    ("num_layers", 10 ** 6, "an integer from 1 to 1024"),
    ("patch_size", 0, "an integer from 1 to 256"),
    ("num_attention_heads", -2, "an integer from 1 to 1024"),
    ("sample_size", 8.5, "an integer from 1 to 4096"),
    ("num_embeds_ada_norm", [3], "an integer from 1 to 1000000"),
    ("in_channels", True, "an integer from 1 to 4096"),
    ("norm_eps", float("nan"), "a finite number between 0 and 1"),
    ("norm_eps", -1, "a finite number between 0 and 1"),
])
def test_config_numbers_out_of_range_name_the_file_key_and_value(sharded, key, value, expected):
    folder, _ = sharded
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, key: value}))
    with pytest.raises(TcgraphError) as e:
        load_diffusers(folder)
    assert str(e.value).startswith(f"{folder / 'config.json'}: {key} = {json.dumps(value)}: expected {expected}")


def test_weights_that_do_not_fit_are_refused_before_the_model_is_built(sharded, monkeypatch):
    folder, _ = sharded
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "num_layers": 1000}))
    monkeypatch.setattr(DiTTransformer2DModel, "from_config", lambda *a, **k: pytest.fail("built"))
    with pytest.raises(TcgraphError, match=r"do not fit its config.json: 18981 missing \(e.g. transformer_blocks.1.norm1"):
        load_diffusers(folder)


@pytest.mark.parametrize("part, entry", [("text_encoder", ["transformers", "pipeline"]),
                                         ("tokenizer", ["transformers", "T5EncoderModel"]),
                                         ("tokenizer", ["transformers", "NoSuchClass"])])
def test_text_parts_must_name_transformers_model_and_tokenizer_classes(tmp_path, part, entry):
    pytest.importorskip("transformers")
    root = tmp_path / "pipe"
    for name in ("text_encoder", "tokenizer"):
        (root / name).mkdir(parents=True)
    index = {"_class_name": "PixArtAlphaPipeline", "text_encoder": ["transformers", "T5EncoderModel"],
             "tokenizer": ["transformers", "T5Tokenizer"], part: entry}
    (root / "model_index.json").write_text(json.dumps(index))
    base = "PreTrainedModel" if part == "text_encoder" else "PreTrainedTokenizerBase"
    with pytest.raises(TcgraphError, match=f"names {part} {entry!r}, not a transformers {base} class".replace("[", r"\[")):
        PipelineTextEncoder(root)
