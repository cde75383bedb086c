"""Every bad input is one clear error, early: sampler settings and API argument types
(checked before anything slow, nothing written), huge sizes refused before allocation,
manifests edited consistently (hashes updated) still refused, and checkpoint messages that
say what is wrong (unsafe pickle, wrapped state dict, non-finite weights)."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import time

import pytest
import torch

from tcgraph import api
from tcgraph.cli import main
from tcgraph.errors import TcgraphError, UsageError
from tcgraph.export.artifact import config_hash, load_artifact
from tcgraph.inspection import format_report, inspect_artifact
from tcgraph.models import load_model, save_checkpoint
from tcgraph.models.official.dit import DiT, make_config, randomize_weights
from tcgraph.plan import make_plan
from tcgraph.plan.plan import Plan, Recipe
from tcgraph.sampling import SamplerSettings
from tcgraph.names import BRANCHES


def _tiny_model() -> DiT:
    # The shape of tests/conftest.py's `tiny_model` (that fixture is function-scoped).
    cfg = make_config("DiT-S/2", input_size=8, depth=3, hidden_size=32, num_heads=2, in_channels=2,
                      num_classes=5, learn_sigma=True)
    return randomize_weights(DiT(cfg), std=0.05)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return _tiny_model()


@pytest.fixture(scope="module")
def artifact(tmp_path_factory, model):
    torch.set_num_threads(min(2, torch.get_num_threads()))
    s = SamplerSettings(num_steps=3, cfg_scale=2.0, batch=1, resolution=model.config.input_size)
    out = tmp_path_factory.mktemp("valid") / "fora2"
    return api.transform(model, make_plan("fora:2", model.config, s), out, progress=False)


@pytest.fixture
def copy(artifact, tmp_path):
    dst = tmp_path / "art"
    shutil.copytree(artifact, dst)
    return dst


def _one_error(capsys, code: int, *needles: str) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("tcgraph: error: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


#################################################################################
#                    Sampler settings: refused before anything                  #
#################################################################################

BAD_SETTINGS = [
    (["--steps", "1001"], "--steps", "1..1000"),
    (["--steps", "0"], "--steps", "1..1000"),
    (["--eta", "2"], "--eta", "[0.0, 1.0]"),
    (["--eta", "-0.1"], "--eta", "[0.0, 1.0]"),
    (["--eta", "nan"], "--eta", "finite"),
    (["--guidance", "-1"], "--guidance", ">= 1"),
    (["--guidance", "0.5"], "--guidance", ">= 1"),
    (["--guidance", "nan"], "--guidance", "finite"),
    (["--guidance", "inf"], "--guidance", "finite"),
    (["--batch", "0"], "--batch", "1..4096"),
    (["--batch", "10000000"], "--batch", "1..4096"),
    (["--plan", "fora:2:3"], "fora:2:3", "at most 1"),
    (["--plan", "nosuch"], "nosuch", "unknown plan"),
]


@pytest.mark.parametrize("argv, option, rule", BAD_SETTINGS, ids=[" ".join(a) for a, _, _ in BAD_SETTINGS])
def test_transform_refuses_bad_settings_at_once(argv, option, rule, tmp_path, capsys, monkeypatch):
    import tcgraph.models

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the settings were checked")

    monkeypatch.setattr(tcgraph.models, "load_model", no_load)
    out = tmp_path / "out"
    start = time.monotonic()
    assert main(["transform", "--out", str(out), *argv]) == 2
    assert time.monotonic() - start < 5
    _one_error(capsys, 2, option, rule)
    assert not out.exists() and list(tmp_path.iterdir()) == []


API_TRANSFORM = [
    ({"steps": 10.5}, "steps", "integer"),
    ({"steps": True}, "steps", "integer"),
    ({"steps": 1001}, "steps", "1..1000"),
    ({"batch": "2"}, "batch", "integer"),
    ({"batch": 2.0}, "batch", "integer"),
    ({"guidance": "2"}, "guidance", "number"),
    ({"guidance": float("nan")}, "guidance", "finite"),
    ({"eta": None}, "eta", "number"),
    ({"eta": 2}, "eta", "[0.0, 1.0]"),
    ({"check": "yes"}, "check", "True or False"),
    ({"plan": 3}, "plan", "plan spec"),
    ({"out": 3}, "out", "path"),
]


@pytest.mark.parametrize("kwargs, name, rule", API_TRANSFORM, ids=[str(k) for k, _, _ in API_TRANSFORM])
def test_api_transform_types(kwargs, name, rule, tmp_path, model):
    kwargs = {"out": tmp_path / "out", **kwargs}
    with pytest.raises(UsageError) as e:
        api.transform(model, progress=False, **kwargs)
    assert name in str(e.value) and rule in str(e.value)
    assert list(tmp_path.iterdir()) == []


def test_settings_are_checked_where_they_are_made():
    with pytest.raises(UsageError, match=r"steps \(--steps\) must be an integer in 1..1000"):
        SamplerSettings(num_steps=1001)
    with pytest.raises(UsageError, match="unknown sampler"):
        SamplerSettings(sampler="euler")
    s = SamplerSettings(num_steps=torch.tensor(5).numpy().item(), cfg_scale=2, batch=3)
    assert (s.num_steps, s.cfg_scale, s.batch) == (5, 2, 3)


#################################################################################
#                     sample / sample_eager argument types                      #
#################################################################################

API_SAMPLE = [
    ({"per_class": 1.5}, "per_class", "integer"),
    ({"per_class": 0}, "per_class", ">= 1"),
    ({"per_class": True}, "per_class", "integer"),
    ({"seed": "x"}, "seed", "integer"),
    ({"seed": 1.0}, "seed", "integer"),
    ({"batch": "2"}, "batch", "integer"),
    ({"classes": [1.7]}, "classes", "integer class ids"),
    ({"classes": [True]}, "classes", "integer class ids"),
    ({"classes": 3}, "classes", "sequence of class ids"),
    ({"classes": [7]}, "class ids 7", "0..4"),
    ({"classes": "0-1000000000000"}, "class ids 1000000000000", "0..4"),
]


@pytest.mark.parametrize("kwargs, name, rule", API_SAMPLE, ids=[str(k) for k, _, _ in API_SAMPLE])
def test_api_sample_types(kwargs, name, rule, artifact, tmp_path):
    png = tmp_path / "s.png"
    with pytest.raises(UsageError) as e:
        api.sample(artifact, png=png, progress=False, **kwargs)
    assert name in str(e.value) and rule in str(e.value)
    assert not png.exists()


@pytest.mark.parametrize("argv, option", [(["--per-class", "100000000"], "--per-class"),
                                          (["--per-class", "0"], "--per-class"),
                                          (["--seed", "99999999999999999999"], "--seed")])
def test_cli_sample_refuses_huge_or_bad_sizes_fast(argv, option, artifact, tmp_path, capsys):
    png = tmp_path / "s.png"
    start = time.monotonic()
    assert main(["sample", str(artifact), "--png", str(png), *argv]) == 2
    assert time.monotonic() - start < 5
    _one_error(capsys, 2, option)
    assert not png.exists()


def test_huge_per_class_is_refused_before_allocation(artifact):
    start = time.monotonic()
    with pytest.raises(UsageError, match=r"per_class \(--per-class\).*GiB"):
        api.sample(artifact, per_class=100_000_000, png=None, progress=False)
    assert time.monotonic() - start < 5


def test_sample_eager_checks_its_arguments(model):
    s = SamplerSettings(num_steps=2, cfg_scale=1.0, batch=1, resolution=model.config.input_size)
    with pytest.raises(UsageError, match="labels must hold integer class ids"):
        api.sample_eager(model, s, [1.7])
    with pytest.raises(UsageError, match="out of range"):
        api.sample_eager(model, s, [5])
    with pytest.raises(UsageError, match="seed"):
        api.sample_eager(model, s, [1], seed="x")
    with pytest.raises(UsageError, match="resolution"):
        api.sample_eager(model, dataclasses.replace(s, resolution=16), [1])
    with pytest.raises(UsageError, match="settings must be"):
        api.sample_eager(model, {"num_steps": 2}, [1])


def test_valid_eager_runs_are_unchanged(model):
    s = SamplerSettings(num_steps=2, cfg_scale=1.0, batch=2, resolution=model.config.input_size)
    a = api.sample_eager(model, s, [0, 1, 2], seed=3)
    b = api.sample_eager(model, s, (0, 1, 2), seed=3)
    assert torch.equal(a, b) and a.shape == (3, 2, 8, 8)


#################################################################################
#                  Manifests edited consistently are still refused              #
#################################################################################


def _sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _edit(folder, edit) -> None:
    """Edit manifest.json (and plan.json to match its plan), then recompute every hash, so that
    only the consistency checks can catch the edit."""
    manifest = json.loads((folder / "manifest.json").read_text())
    edit(manifest)
    manifest["model_config_hash"] = config_hash(manifest["model_config"])
    (folder / "plan.json").write_text(json.dumps(manifest["plan"], indent=1))
    manifest["files"] = {rel: _sha256(folder / rel) for rel in manifest["files"] if (folder / rel).is_file()}
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=1))


def _fewer_blocks(manifest) -> None:
    manifest["model_config"]["depth"] = 2
    plan = Plan.from_dict(manifest["plan"])
    plan = dataclasses.replace(plan, recipes=tuple(Recipe(r.actions[:2], BRANCHES) for r in plan.recipes))
    manifest["plan"] = plan.to_dict()


EDITS = {
    "another depth": (_fewer_blocks, "blocks"),
    "another hidden size": (lambda m: m["model_config"].update(hidden_size=64, num_heads=2), "shape"),
    "another batch": (lambda m: m["plan"]["settings"].update(batch=3), "shape"),
    "another resolution": (lambda m: m["plan"]["settings"].update(resolution=16), "resolution 16"),
    "eta out of range": (lambda m: m["plan"]["settings"].update(eta=2.0), "--eta"),
    "no variants": (lambda m: m.update(variants=[]), "no variants"),
    "a cache of a block the model lacks": (
        lambda m: m["variants"][1]["inputs"][3].update(name="cache.9.attn"), "cache.9.attn"),
}


@pytest.mark.parametrize("edit, needle", EDITS.values(), ids=list(EDITS))
def test_consistently_edited_manifest_is_refused(edit, needle, copy, capsys):
    _edit(copy, edit)
    with pytest.raises(TcgraphError) as e:
        load_artifact(copy)
    assert not isinstance(e.value, UsageError)  # a damaged folder, not a bad command: exit 1
    msg = str(e.value)
    assert needle in msg and "re-run `tcgraph transform`" in msg
    assert "manifest.json" in msg or "plan.json" in msg  # the file is named
    assert main(["inspect", str(copy)]) == 1
    _one_error(capsys, 1, needle)


def test_random_engine_bytes_are_not_reported_as_engines(copy):
    (copy / "engines").mkdir()
    (copy / "engines" / "v0.plan").write_bytes(b"\x00random bytes, not an engine")
    # Even with the file listed under "files" (hash recomputed), no "tensorrt" section names it.
    _edit(copy, lambda m: m["files"].update({"engines/v0.plan": ""}))
    info = inspect_artifact(copy)
    assert info["engines"]["status"] == "unlisted"
    assert "NOT USABLE" in format_report(info) and "engines/v0.plan is not listed" in format_report(info)


def test_listed_engines_say_what_inspect_cannot_know(copy):
    (copy / "engines").mkdir()
    for vid in ("v0", "v1"):
        (copy / "engines" / f"{vid}.plan").write_bytes(b"engine bytes")

    def section(m):
        m["tensorrt"] = {"tensorrt_version": "10.9.0", "precision": "fp16", "weight_stripped": False,
                         "device": {"name": "GPU", "compute_capability": "9.0"},
                         "engines": {v: {"file": f"engines/{v}.plan", "bytes": 12} for v in ("v0", "v1")}}
        m["files"].update({f"engines/{v}.plan": "" for v in ("v0", "v1")})
    _edit(copy, section)
    info = inspect_artifact(copy)
    assert info["engines"]["status"] == "listed" and info["engines"]["problems"] == []
    assert "only TensorRT can tell whether they load" in format_report(info)


#################################################################################
#                              Checkpoint messages                              #
#################################################################################


class _NotWeights:
    def __init__(self):
        self.value = 1


def test_unsafe_pickle_is_refused_as_unsafe_not_damaged(tmp_path, model, capsys):
    path = tmp_path / "unsafe.pt"
    torch.save({"model": model.state_dict(), "extra": _NotWeights()}, path)
    with pytest.raises(TcgraphError) as e:
        load_model(path, config=model.config)
    msg = str(e.value)
    assert "unsafe to load" in msg and "_NotWeights" in msg and "(the file is not damaged)" in msg
    assert "safetensors" in msg and "weights_only=False" in msg
    out = tmp_path / "out"
    assert main(["transform", "--model", str(path), "--out", str(out)]) == 1
    _one_error(capsys, 1, "unsafe to load")
    assert not out.exists()


@pytest.mark.parametrize("wrap", [
    lambda sd: {"state_dict": sd, "epoch": 3},
    lambda sd: {"state_dict": {f"model.{k}": v for k, v in sd.items()}, "global_step": 10},
    lambda sd: {"model": sd, "args": None},
    lambda sd: {"ema": {f"module.{k}": v for k, v in sd.items()}},
    lambda sd: {"state_dict": {"model": sd}},
], ids=["state_dict", "lightning", "model", "ema-ddp", "nested"])
def test_wrapped_checkpoints_are_unwrapped(wrap, tmp_path, model):
    path = tmp_path / "wrapped.pt"
    torch.save(wrap(model.state_dict()), path)
    loaded = load_model(path, config=model.config)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))


def test_foreign_keys_are_named_not_called_depth_0(tmp_path, model):
    path = tmp_path / "foreign.pt"
    torch.save({f"encoder.{k}": v for k, v in model.state_dict().items()}, path)
    with pytest.raises(TcgraphError) as e:
        load_model(path)
    assert "depth 0" not in str(e.value) and "not a DiT's" in str(e.value) and "encoder.pos_embed" in str(e.value)
    torch.save({"weights_of": {"net2": 1}}, path)
    with pytest.raises(TcgraphError, match="top-level keys 'weights_of'"):
        load_model(path)


def test_non_finite_weights_are_named(tmp_path, model, capsys):
    sd = {k: torch.full_like(v, float("nan")) for k, v in model.state_dict().items()}
    path = save_checkpoint(sd, tmp_path / "nan.safetensors")
    with pytest.raises(TcgraphError, match="weights are not finite") as e:
        load_model(path, config=model.config)
    assert "bug" not in str(e.value)
    bad = _tiny_model()
    with torch.no_grad():
        bad.pos_embed.fill_(float("inf"))
    with pytest.raises(TcgraphError, match="weights are not finite"):
        api.transform(bad, "full", tmp_path / "out", steps=2, progress=False)
    assert not (tmp_path / "out").exists()


def test_compile_check_says_non_finite_not_a_bug(model):
    from tcgraph.compile import build_variants

    bad = _tiny_model()
    with torch.no_grad():
        bad.pos_embed.fill_(float("nan"))
    s = SamplerSettings(num_steps=2, cfg_scale=1.0, batch=1, resolution=bad.config.input_size)
    with pytest.raises(TcgraphError, match="weights are not finite") as e:
        build_variants(bad, make_plan("full", bad.config, s))
    assert "bug in a pass" not in str(e.value)
