"""diffusers' DiTTransformer2DModel: tcgraph's wrapper and its graphs against diffusers' own
forward, folders as save_pretrained writes them, the official layout converted to diffusers',
and every plan kind sampled through ONNX Runtime against the eager reference loop."""
from __future__ import annotations

import json
import os

import pytest
import torch

pytest.importorskip("diffusers")

from diffusers import DiTTransformer2DModel  # noqa: E402

from tcgraph import api  # noqa: E402
from tcgraph.compile import build_variants  # noqa: E402
from tcgraph.export.artifact import load_artifact  # noqa: E402
from tcgraph.errors import TcgraphError, UsageError  # noqa: E402
from tcgraph.models import build_model, load_model  # noqa: E402
from tcgraph.models.diffusers import dit as diffusers_dit  # noqa: E402
from tcgraph.models.official.checkpoint import state_dict_shapes  # noqa: E402
from tcgraph.models.diffusers.config import config_from_diffusers  # noqa: E402
from tcgraph.models.diffusers.dit import DiffusersDiT, save_as_diffusers  # noqa: E402
from tcgraph.models.official.dit import DiT, DiTConfig, randomize_weights  # noqa: E402
from tcgraph.passes import capture, expand_blocks  # noqa: E402
from tcgraph.plan import COMPUTE, REUSE, Plan, Recipe, dynamic, partial  # noqa: E402
from tcgraph.sampling import SamplerSettings  # noqa: E402
from tcgraph.names import BRANCHES
from tests.export.token_plans import check_plan_sampled_with_ort  # noqa: E402

TINY = dict(num_attention_heads=2, attention_head_dim=16, in_channels=2, out_channels=4, num_layers=3,
            sample_size=8, patch_size=2, num_embeds_ada_norm=5)  # 16 tokens, hidden 32, learn sigma


def tiny_diffusers(seed: int = 0, **overrides) -> DiTTransformer2DModel:
    """Random weights of std 0.05 (diffusers' default initialisation makes outputs of size ~1e3,
    where float32 rounding alone exceeds the tolerances), the position table kept."""
    torch.manual_seed(seed)
    model = DiTTransformer2DModel(**{**TINY, **overrides}).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.05)
    return model


def inputs(batch: int = 4, channels: int = 2, side: int = 8, classes: int = 5):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, channels, side, side, generator=g)
    t = torch.tensor([0, 333, 666, 999][:batch])
    y = torch.tensor([0, 2, 4, classes][:batch])  # the last is the null class
    return x, t, y


@pytest.mark.parametrize("overrides", [{}, {"out_channels": None}, {"norm_eps": 1e-6, "num_layers": 1}])
def test_wrapper_and_its_graph_equal_diffusers_forward(overrides):
    """The traceable forward and the captured, expanded fx graph equal diffusers' forward within 1e-5."""
    model = tiny_diffusers(**overrides)
    wrapped = DiffusersDiT(model)
    x, t, y = inputs()
    with torch.no_grad():
        ref = model(x, t, y).sample
        got = wrapped(x, t, y)
        traced = expand_blocks(capture(wrapped).gm)(x, t, y)
    assert ref.shape == got.shape and ref.abs().max() > 0.1
    assert (got - ref).abs().max().item() <= 1e-5
    assert (traced - ref).abs().max().item() <= 1e-5
    assert wrapped.config.learn_sigma == (overrides.get("out_channels", 4) == 4)


def test_full_variant_graph_equals_diffusers_forward():
    model = tiny_diffusers()
    wrapped = DiffusersDiT(model)
    plan = Plan("full", SamplerSettings(num_steps=1, batch=2, cfg_scale=2.0, resolution=8),
                (Recipe.uniform(3, COMPUTE, BRANCHES),), wrapped.config.num_tokens)
    (variant,) = build_variants(wrapped, plan)
    x, t, y = inputs()
    with torch.no_grad():
        out = variant.gm(x, t, y)
        out = out[0] if isinstance(out, tuple) else out
        ref = model(x, t, y).sample
    assert (out - ref).abs().max().item() <= 1e-4


def test_state_dict_shapes_without_diffusers_match_the_model():
    wrapped = build_model(config_from_diffusers(TINY, "tiny"))
    assert isinstance(wrapped, DiffusersDiT) and wrapped.config == config_from_diffusers(TINY, "tiny")
    assert state_dict_shapes(wrapped.config) == {k: tuple(v.shape) for k, v in wrapped.state_dict().items()}
    assert not any(k.startswith("_") for k in wrapped.state_dict())


def test_official_layout_converted_matches_when_the_two_differences_are_undone(monkeypatch, tmp_path):
    """Converting an official-layout DiT to diffusers' layout is exact: with diffusers' timestep
    frequency shift set to the official 0 and its MLP norm eps to the official 1e-6, the two
    families' forwards agree; as diffusers builds it (shift 1, eps 1e-5) they differ."""
    official = randomize_weights(DiT(DiTConfig(input_size=8, patch_size=2, in_channels=2, hidden_size=32, depth=3,
                                               num_heads=2, num_classes=5)), std=0.05)
    x, t, y = inputs()
    with torch.no_grad():
        ref = official(x, t, y)
    same = load_model(save_as_diffusers(official, tmp_path / "eps6", norm_eps=1e-6))
    default = load_model(save_as_diffusers(official, tmp_path / "default"))
    with torch.no_grad():
        shifted = same(x, t, y)
        as_diffusers = default(x, t, y)
        monkeypatch.setattr(diffusers_dit, "TIME_SHIFT", 0.0)
        undone = same(x, t, y)
    assert (undone - ref).abs().max().item() <= 1e-5
    assert (shifted - ref).abs().max().item() > 1e-4  # the frequency shift alone changes the output
    assert (as_diffusers - ref).abs().max().item() > 1e-4
    assert default.config.norm_eps == 1e-5 and default.config.layout == "diffusers"


def save_pipeline(tmp_path, model: DiTTransformer2DModel):
    root = tmp_path / "pipe"
    model.save_pretrained(str(root / "transformer"), safe_serialization=True)
    (root / "scheduler").mkdir(parents=True)
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(
        {"_class_name": "DDIMScheduler", "num_train_timesteps": 1000, "beta_schedule": "linear"}))
    (root / "model_index.json").write_text(json.dumps(
        {"_class_name": "DiTPipeline", "transformer": ["diffusers", "DiTTransformer2DModel"],
         "scheduler": ["diffusers", "DDIMScheduler"]}))
    return root


def test_model_and_pipeline_folders_load_with_their_weights(tmp_path):
    model = tiny_diffusers(seed=3)
    model.save_pretrained(str(tmp_path / "model"), safe_serialization=True)
    pipe = save_pipeline(tmp_path, model)
    x, t, y = inputs()
    with torch.no_grad():
        ref = model(x, t, y).sample
        for folder in (tmp_path / "model", pipe):
            loaded = load_model(folder)
            assert isinstance(loaded, DiffusersDiT)
            assert (loaded(x, t, y) - ref).abs().max().item() <= 1e-5
    with pytest.raises(UsageError, match="drop the config"):
        load_model(tmp_path / "model", config="DiT-S/2")


def test_folder_errors_are_clear(tmp_path):
    model = tiny_diffusers()
    folder = tmp_path / "m"
    model.save_pretrained(str(folder), safe_serialization=True)
    config = json.loads((folder / "config.json").read_text())

    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({**config, "_class_name": "UNet2DConditionModel"}))
    with pytest.raises(TcgraphError, match="does not transform diffusers' UNet2DConditionModel; supported "
                                           "classes: DiTTransformer2DModel"):
        load_model(other)

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text(json.dumps(config))
    with pytest.raises(TcgraphError, match="no safetensors weights"):
        load_model(empty)
    (empty / "diffusion_pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(TcgraphError, match="safetensors only"):
        load_model(empty)

    (empty / "diffusion_pytorch_model.safetensors").write_bytes(b"not safetensors at all")
    with pytest.raises(TcgraphError, match="cannot read the weights"):
        load_model(empty)

    bigger = tmp_path / "bigger"
    tiny_diffusers(num_layers=4).save_pretrained(str(bigger), safe_serialization=True)
    (bigger / "config.json").write_text(json.dumps(config))  # weights of 4 blocks, config of 3
    with pytest.raises(TcgraphError, match="do not fit its config.json: .*unexpected"):
        load_model(bigger)

    (folder / "config.json").write_text("{ not json")
    with pytest.raises(TcgraphError, match="cannot read the model config"):
        load_model(folder)

    pipe = tmp_path / "pipe"
    pipe.mkdir()
    (pipe / "model_index.json").write_text(json.dumps({"_class_name": "DiTPipeline"}))
    with pytest.raises(TcgraphError, match="has no transformer/config.json"):
        load_model(pipe)

    with pytest.raises(TcgraphError, match="norm_type 'ada_norm_single'"):
        config_from_diffusers({**TINY, "norm_type": "ada_norm_single"}, "cfg")


def test_transformed_plan_of_every_action_equals_the_eager_reference_loop(tmp_path):
    """compute, reuse, partial (constant kept tokens) and dynamic steps of a diffusers DiT, through
    ONNX Runtime, equal an eager reference loop with caches carried step to step; the partial
    attention reads to_q/to_k/to_v themselves, and the user's model keeps all its modules."""
    model = DiffusersDiT(tiny_diffusers(seed=2))
    before = [name for name, _ in model.named_modules()]
    full = Recipe.uniform(3, COMPUTE, BRANCHES)
    a = Recipe(((partial([0, 3, 6, 9, 12]), REUSE), (REUSE, partial([1, 2, 3])), (COMPUTE, dynamic(4))), BRANCHES)
    b = Recipe(((REUSE, dynamic(8)), (partial(range(15)), REUSE), (dynamic(2), REUSE)), BRANCHES)
    check_plan_sampled_with_ort(model, tmp_path, (full, a, b, full, a, b), keep_inputs=True)
    assert [name for name, _ in model.named_modules()] == before


def test_a_pipeline_folder_samples_with_its_own_scheduler_by_default(tmp_path):
    """`scheduler="auto"` takes the pipeline's scheduler/ (here DPM-Solver++); the artifact samples
    the same as the eager model along that scheduler, and inspect names it."""
    from tcgraph.sampling.schedulers import scheduler_config_from_folder

    pipe = save_pipeline(tmp_path, tiny_diffusers(seed=4))
    (pipe / "scheduler" / "scheduler_config.json").write_text(json.dumps(
        {"_class_name": "DPMSolverMultistepScheduler", "num_train_timesteps": 1000, "beta_schedule": "linear",
         "algorithm_type": "dpmsolver++", "solver_order": 2}))
    art = api.transform(str(pipe), "fora:2", tmp_path / "art", steps=5, guidance=2.0, batch=2, progress=False)
    s = load_artifact(art).plan.settings
    assert s.sampler == "diffusers" and s.scheduler == scheduler_config_from_folder(pipe)
    got, _ = api.sample(art, classes=[0, 3], per_class=1, seed=1, progress=False)
    caches: dict = {}
    from tcgraph.passes import reference_step
    from tcgraph.sampling import make_noise, run_batches, sampler_for

    model, plan = load_model(pipe), load_artifact(art).plan

    def step(i, x, t, y):
        out, fresh = reference_step(model, x, t, y, plan.recipes[i], caches)
        caches.update(fresh)
        return out

    ref = run_batches(step, caches.clear, sampler_for(s, model.config), [0, 3], make_noise(2, 2, 8, 1), 2, 1)
    assert (got - ref).abs().max().item() <= 1e-6 * ref.abs().max().item() + 1e-5  # samples ~ 250: float32 rounding
    assert "diffusers DPMSolverMultistepScheduler 5 steps" in api.format_inspect(api.inspect(art))
    ddim = api.transform(str(pipe), "full", tmp_path / "ddim", steps=5, batch=2, scheduler="ddim", progress=False)
    assert load_artifact(ddim).plan.settings.sampler == "ddim"


@pytest.mark.skipif(not os.environ.get("TCGRAPH_DIFFUSERS_DIT"),
                    reason="set TCGRAPH_DIFFUSERS_DIT to a local DiTTransformer2DModel folder (or pipeline) to check "
                           "real weights; none can be downloaded here")
def test_real_weights_from_a_local_folder_equal_diffusers_forward():
    """With real weights (e.g. facebook/DiT-XL-2-256 saved locally): tcgraph's wrapper and its
    `full` graph equal diffusers' own forward within 1e-4, float32."""
    from tcgraph.models.diffusers.folder import read_folder

    path = os.environ["TCGRAPH_DIFFUSERS_DIT"]
    model = load_model(path)
    reference = DiTTransformer2DModel.from_pretrained(str(read_folder(path).model_dir)).float().eval()
    cfg = model.config
    x, t, y = inputs(2, cfg.in_channels, cfg.input_size, cfg.num_classes)
    x, t, y = x[:2], t[:2], y[:2]
    plan = Plan("full", SamplerSettings(num_steps=1, batch=2, cfg_scale=1.0, resolution=cfg.input_size),
                (Recipe.uniform(cfg.depth, COMPUTE, BRANCHES),), cfg.num_tokens)
    (variant,) = build_variants(model, plan)
    with torch.no_grad():
        ref = reference(x, t, y).sample
        got = variant.gm(x, t, y)
    got = got[0] if isinstance(got, tuple) else got
    assert (got - ref).abs().max().item() <= 1e-4
