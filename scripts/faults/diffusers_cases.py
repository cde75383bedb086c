"""Cases: diffusers folders and pipelines (paths that leave a folder, damaged configs, scheduler values,
wrong classes) and `tcgraph.diffusers.use` (save_pretrained inside it, wrong types and kinds).

The folders are built here from local parts, no download: the demo model as a diffusers pipeline folder
(`scripts/digits_to_diffusers.py`'s `write_pipeline`: transformer/ + a DDIM scheduler/, sizes equal to the
shared artifact's, so `use` takes that artifact), a tiny random DiTTransformer2DModel saved in shards, and
tiny random VAEs and PixArt transformers as tests/test_pixart_pipeline.py builds them. Templates are made
once per process and copied into each case's folder; a case edits only its copy.
"""
from __future__ import annotations

import atexit
import json
import os
import shutil
import sys
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Callable

from faults.harness import Case, Ctx, Outcome, api, cli, guarded

GROUP = "diffusers"
INDEX = "diffusion_pytorch_model.safetensors.index.json"
TRANSFORM = ["--plan", "full", "--steps", "2", "--batch", "1", "--guidance", "1"]


@lru_cache(maxsize=None)
def _templates() -> Path:
    root = Path(tempfile.mkdtemp(prefix="tcgraph-diffusers-cases-"))
    atexit.register(shutil.rmtree, root, True)
    return root


@lru_cache(maxsize=None)
def _demo_pipeline() -> Path:
    """The demo model as a diffusers pipeline folder (DDIM scheduler), made once."""
    scripts = str(Path(__file__).resolve().parents[1])  # fault_battery.py puts it on the path; a driver may not
    sys.path.insert(0, scripts)
    try:
        from digits_to_diffusers import write_pipeline
    finally:
        sys.path.remove(scripts)
    return write_pipeline(_templates() / "digits-diffusers")


@lru_cache(maxsize=None)
def _sharded_model() -> Path:
    """A tiny random DiTTransformer2DModel saved in shards: an index and its files, made once."""
    import torch
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    model = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
                                  num_layers=1, sample_size=4, patch_size=2, num_embeds_ada_norm=10)
    model.save_pretrained(str(_templates() / "sharded"), safe_serialization=True, max_shard_size="20KB")
    return _templates() / "sharded"


def _copy(src: Path, c: Ctx, name: str) -> Path:
    dst = c.root / name
    shutil.copytree(src, dst, symlinks=True)
    return dst


def _vae(latent_channels: int):
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=latent_channels, block_out_channels=(8,),
                         down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
                         layers_per_block=1, norm_num_groups=4, sample_size=8).eval()


def _dit_pipe(**sizes):
    """A DiTPipeline object from the demo pipeline folder's transformer (the shared artifact's model), or a
    random one of other `sizes`, with a tiny random VAE and a DDIM scheduler."""
    from diffusers import DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    if sizes:
        transformer = DiTTransformer2DModel(**sizes)
    else:
        transformer = DiTTransformer2DModel.from_pretrained(str(_demo_pipeline() / "transformer"))
    pipe = DiTPipeline(transformer=transformer.eval(), vae=_vae(transformer.config.in_channels),
                       scheduler=DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _pixart_transformer():
    from diffusers import PixArtTransformer2DModel

    return PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8,
                                    num_layers=1, sample_size=8, patch_size=2, caption_channels=16,
                                    cross_attention_dim=32, use_additional_conditions=False).eval()


@lru_cache(maxsize=None)
def _text_artifact() -> Path:
    """A `full` artifact of a tiny random PixArt pipeline folder (2 steps, batch 1, text length 4), made once."""
    import tcgraph

    folder = _templates() / "pixart"
    _pixart_transformer().save_pretrained(str(folder / "transformer"), safe_serialization=True)
    (folder / "scheduler").mkdir()
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(
        {"_class_name": "DPMSolverMultistepScheduler", "algorithm_type": "dpmsolver++"}))
    (folder / "model_index.json").write_text(json.dumps(
        {"_class_name": "PixArtAlphaPipeline", "transformer": ["diffusers", "PixArtTransformer2DModel"],
         "scheduler": ["diffusers", "DPMSolverMultistepScheduler"]}))
    return tcgraph.transform(str(folder), "full", _templates() / "pixart-full", steps=2, batch=1, guidance=1.0,
                             text_length=4, check=False, progress=False)


#################################################################################
#                                    Folders                                    #
#################################################################################


def _transform_case(name: str, edit: Callable[[Path, Ctx], None], words, source=_demo_pipeline,
                    extra: Callable[[Ctx], list] = lambda c: [], quick: bool = True) -> Case:
    """`tcgraph transform --model <an edited copy of a folder>`: refused, nothing written."""
    def run(c: Ctx) -> Outcome:
        folder = _copy(source(), c, "model")
        edit(folder, c)
        return guarded(lambda c: cli(["transform", "--model", folder, *TRANSFORM, *extra(c), "--out", c.root / "o"],
                                     cwd=c.root), absent=lambda c: [c.root / "o"])(c)
    return Case(name, GROUP, run, "error", tuple(words), quick=quick)


def _index(change: Callable[[Path, str, Ctx], object]):
    """Point the first shard of the weights index at `change(folder, shard, ctx)`."""
    def edit(folder: Path, c: Ctx) -> None:
        index = json.loads((folder / INDEX).read_text())
        shard = next(iter(index["weight_map"].values()))
        new = change(folder, shard, c)
        index["weight_map"] = {k: (new if v == shard else v) for k, v in index["weight_map"].items()}
        (folder / INDEX).write_text(json.dumps(index))
    return edit


def _out_by_dots(folder: Path, shard: str, c: Ctx) -> str:
    shutil.move(folder / shard, c.root / shard)  # a valid shard beside the folder: once loaded as it was
    return f"../{shard}"


def _out_by_symlink(folder: Path, shard: str, c: Ctx) -> str:
    shutil.move(folder / shard, c.root / shard)
    os.symlink(c.root / shard, folder / shard)
    return shard


def _config(change: Callable[[dict], object]):
    def edit(folder: Path, c: Ctx) -> None:
        path = folder / "transformer" / "config.json"
        config = json.loads(path.read_text())
        change(config)
        path.write_text(json.dumps(config))
    return edit


def _write(rel: str, data: bytes):
    return lambda folder, c: (folder / rel).write_bytes(data)


def _scheduler(**values):
    def edit(folder: Path, c: Ctx) -> None:
        path = folder / "scheduler" / "scheduler_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **values}))
    return edit


def _symlink_out(rel: str):
    def edit(folder: Path, c: Ctx) -> None:
        shutil.move(folder / rel, c.root / "elsewhere")
        os.symlink(c.root / "elsewhere", folder / rel)
    return edit


def _component(name: str):
    def edit(folder: Path, c: Ctx) -> None:
        index = json.loads((folder / "model_index.json").read_text())
        (folder / "model_index.json").write_text(json.dumps({**index, name: ["diffusers", "AutoencoderKL"]}))
    return edit


def _hub_snapshot(c: Ctx) -> Outcome:
    """The Hugging Face cache's layout (every file a symlink into blobs/) loads, with the same weights."""
    from tcgraph.models import load_diffusers

    repo = c.root / "models--x--tiny"
    snapshot = repo / "snapshots" / "0123abc" / "transformer"
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for i, f in enumerate(sorted(_sharded_model().iterdir())):
        shutil.copy(f, repo / "blobs" / f"blob{i}")
        os.symlink(f"../../../blobs/blob{i}", snapshot / f.name)
    loaded = {}
    out = api(lambda: loaded.update(a=load_diffusers(snapshot), b=load_diffusers(_sharded_model())))
    if out.ok and not all(v.equal(loaded["b"].state_dict()[k]) for k, v in loaded["a"].state_dict().items()):
        out.broken.append("the snapshot's weights differ from the folder's")
    return out


def _text_parts(rel: str, content: dict):
    """A pipeline folder with text_encoder/ and tokenizer/ whose `rel` file holds `content` (model_index.json:
    merged into it); its text encoder is read."""
    def run(c: Ctx) -> Outcome:
        from tcgraph.text.pipeline import PipelineTextEncoder

        root = c.root / "pipe"
        for part in ("text_encoder", "tokenizer"):
            (root / part).mkdir(parents=True)
        index = {"_class_name": "PixArtAlphaPipeline", "text_encoder": ["transformers", "T5EncoderModel"],
                 "tokenizer": ["transformers", "T5Tokenizer"]}
        (root / "model_index.json").write_text(json.dumps(index))
        (root / rel).write_text(json.dumps({**index, **content} if rel == "model_index.json" else content))
        return api(lambda: PipelineTextEncoder(root))
    return run


def folder_cases() -> list[Case]:
    t = _transform_case
    sharded = _sharded_model
    return [
        t("index shard '../x' (valid, outside)", _index(_out_by_dots), ["weight_map", "climbs out"], sharded),
        t("index shard '/etc/passwd'", _index(lambda f, s, c: "/etc/passwd"), ["weight_map", "absolute"], sharded),
        t("index shard a symlink out", _index(_out_by_symlink), ["weight_map", "symlink"], sharded),
        t("index shard a list", _index(lambda f, s, c: ["x"]), ["weight_map", "not a file name"], sharded),
        t("index without weight_map", lambda f, c: (f / INDEX).write_text("{}"), ["weight_map"], sharded),
        Case("hub cache snapshot (symlinks into blobs)", GROUP, _hub_snapshot, "ok"),
        t("transformer/config.json missing", lambda f, c: (f / "transformer" / "config.json").unlink(),
          ["config.json"]),
        t("config.json garbage", _write("transformer/config.json", b"\x00\xff{"), ["config"]),
        t("config.json a list", _write("transformer/config.json", b"[1]"), ["json object"]),
        t("config num_layers 'abc'", _config(lambda d: d.update(num_layers="abc")), ["num_layers", "integer"]),
        t("config patch_size 0", _config(lambda d: d.update(patch_size=0)), ["patch_size", "from 1"]),
        t("config num_layers 10**6", _config(lambda d: d.update(num_layers=10 ** 6)), ["num_layers", "1024"]),
        t("config norm_eps NaN", _config(lambda d: d.update(norm_eps=float("nan"))), ["norm_eps", "finite"]),
        t("config class HunyuanDiT2DModel", _config(lambda d: d.update(_class_name="HunyuanDiT2DModel")),
          ["HunyuanDiT2DModel", "supported"]),
        t("a DiT's config as SD3Transformer2DModel", _config(lambda d: d.update(_class_name="SD3Transformer2DModel")),
          ["caption_projection_dim"]),
        t("a DiT's config as FluxTransformer2DModel", _config(lambda d: d.update(_class_name="FluxTransformer2DModel")),
          ["config.json"]),
        t("model_index component '../../evil'", _component("../../evil"), ["component", "climbs out"]),
        t("model_index component '/etc'", _component("/etc"), ["component", "absolute"]),
        t("model_index garbage", _write("model_index.json", b"{\x00"), ["pipeline index"]),
        t("transformer/ a symlink out of the pipeline", _symlink_out("transformer"), ["transformer", "symlink"]),
        Case("tokenizer vocab_file '/etc/passwd'", GROUP, _text_parts(
            "tokenizer/tokenizer_config.json", {"vocab_file": "/etc/passwd"}), "error", ("vocab_file", "absolute")),
        Case("text encoder shard '../../x'", GROUP, _text_parts(
            "text_encoder/model.safetensors.index.json", {"weight_map": {"w": "../../x.safetensors"}}), "error",
            ("weight_map", "climbs out")),
        Case("text encoder class 'pipeline'", GROUP, _text_parts(
            "model_index.json", {"text_encoder": ["transformers", "pipeline"]}), "error",
            ("text_encoder", "not a transformers pretrainedmodel class")),
    ]


#################################################################################
#                                  Schedulers                                   #
#################################################################################


def scheduler_cases() -> list[Case]:
    def s(name, words, **values) -> Case:
        return _transform_case(f"scheduler {name}", _scheduler(**values), ["scheduler_config.json", *words])

    flow = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000}
    return [
        s("beta_start -0.5", ["beta_start = -0.5", "between 0 and 1"], beta_start=-0.5),
        s("beta_end 1.5", ["beta_end = 1.5"], beta_end=1.5),
        s("beta_start > beta_end", ["at most beta_end"], beta_start=0.03, beta_end=0.02),
        s("beta_end NaN", ["beta_end", "not a finite number"], beta_end=float("nan")),
        s("beta_end Infinity", ["beta_end", "not a finite number"], beta_end=float("inf")),
        s("num_train_timesteps 0", ["num_train_timesteps = 0"], num_train_timesteps=0),
        s("num_train_timesteps 10**9", ["num_train_timesteps", "100000"], num_train_timesteps=10 ** 9),
        s("beta_schedule 'cubic'", ["beta_schedule", "linear"], beta_schedule="cubic"),
        s("trained_betas negative", ["trained_betas"], trained_betas=[-0.1] * 1000),
        s("clip_sample 'no'", ["clip_sample", "true or false"], clip_sample="no"),
        s("steps_offset 5000", ["steps_offset", "below num_train_timesteps"], steps_offset=5000),
        s("FlowMatch shift -1", ["shift = -1", "> 0"], **flow, shift=-1.0),
        s("FlowMatch shift 0", ["shift = 0", "> 0"], **flow, shift=0),
        s("DDPMScheduler (stochastic)", ["fresh noise"], _class_name="DDPMScheduler"),
        _transform_case("scheduler/ a symlink out of the pipeline", _symlink_out("scheduler"),
                        ["scheduler", "symlink"]),
        _transform_case("--scheduler FILE with negative betas", lambda f, c: (c.root / "s.json").write_text(
            json.dumps({"_class_name": "DDIMScheduler", "beta_start": -0.1})), ["s.json", "beta_start"],
            extra=lambda c: ["--scheduler", c.root / "s.json"]),
    ]


#################################################################################
#                             tcgraph.diffusers.use                             #
#################################################################################


def _use(make_pipe: Callable[[], object], artifact: Callable[[Ctx], object], **kw):
    def run(c: Ctx) -> Outcome:
        import tcgraph.diffusers as tcd

        pipe = make_pipe()
        return api(lambda: tcd.use(pipe, artifact(c), **kw).restore())
    return run


def _save_inside_use(c: Ctx) -> Outcome:
    """pipe.save_pretrained inside `use` writes the pipeline's own transformer; from_pretrained reads it back."""
    import torch
    from diffusers import DiTPipeline

    import tcgraph.diffusers as tcd

    pipe, loaded = _dit_pipe(), {}
    components = lambda: {k: v for k, v in pipe.config.items() if not k.startswith("_")}  # noqa: E731
    config = components()  # diffusers' own save adds _class_name and _diffusers_version

    def go():
        with tcd.use(pipe, c.art):
            pipe.save_pretrained(str(c.root / "saved"), safe_serialization=True)
        loaded["pipe"] = DiTPipeline.from_pretrained(str(c.root / "saved"))

    out = api(go)
    if out.ok:
        ours, theirs = pipe.transformer.state_dict(), loaded["pipe"].transformer.state_dict()
        if ours.keys() != theirs.keys() or not all(torch.equal(ours[k], theirs[k]) for k in ours):
            out.broken.append("the saved transformer differs from the pipeline's own")
        if components() != config or "save_pretrained" in vars(pipe):
            out.broken.append("the pipeline's config or save_pretrained was left changed")
    return out


def _wrong_steps(c: Ctx) -> Outcome:
    import tcgraph.diffusers as tcd

    pipe = _dit_pipe()

    def go():
        with tcd.use(pipe, c.art):
            pipe(class_labels=[1, 2, 3, 4], num_inference_steps=5, guidance_scale=2.0, output_type="np")
    return api(go)


def _twice(c: Ctx) -> Outcome:
    import tcgraph.diffusers as tcd

    pipe = _dit_pipe()

    def go():
        with tcd.use(pipe, c.art):
            tcd.use(pipe, c.art)
    return api(go)


def _no_transformer():
    pipe = _dit_pipe()
    object.__setattr__(pipe, "transformer", None)
    return pipe


def _pixart_pipe():
    from diffusers import DPMSolverMultistepScheduler, PixArtAlphaPipeline

    return PixArtAlphaPipeline(tokenizer=None, text_encoder=None, transformer=_pixart_transformer(), vae=_vae(4),
                               scheduler=DPMSolverMultistepScheduler())


def use_cases() -> list[Case]:
    art = lambda c: c.art  # noqa: E731
    other = dict(num_attention_heads=4, attention_head_dim=32, in_channels=1, out_channels=1, num_layers=3,
                 sample_size=16, patch_size=2, num_embeds_ada_norm=10)
    u = lambda name, pipe, artifact, words, quick=True, **kw: Case(  # noqa: E731
        f"use: {name}", GROUP, _use(pipe, artifact, **kw), "error", tuple(words), quick=quick)
    return [
        Case("use: save_pretrained inside use", GROUP, _save_inside_use, "ok"),
        u("artifact None", _dit_pipe, lambda c: None, ["`artifact`", "got none"]),
        u("artifact 123", _dit_pipe, lambda c: 123, ["`artifact`", "got int"]),
        u("pipe None", lambda: None, art, ["`pipe`", "got none"]),
        u("pipe a path", lambda: "local/dit-pipeline", art, ["`pipe`", "got str"]),
        u("backend a list", _dit_pipe, art, ["backend"], backend=["ort"]),
        u("pipe without a transformer", _no_transformer, art, ["no transformer"]),
        u("class artifact in a PixArt pipeline", _pixart_pipe, art, ["class-conditional", "use the artifact with a "
                                                                     "ditpipeline"]),
        u("text artifact in a DiT pipeline", _dit_pipe, lambda c: _text_artifact(),
          ["text-conditioned", "pixartalphapipeline"], quick=False),
        u("another model's pipeline", lambda: _dit_pipe(**other), art, ["another model", "depth 6 vs 3"]),
        Case("use: twice on one pipeline", GROUP, _twice, "error", ("already runs",)),
        Case("use: pipeline called with other steps", GROUP, _wrong_steps, "error", ("num_inference_steps=6",)),
    ]


def diffusers_cases() -> list[Case]:
    """Every diffusers case; each builds what it needs (templates once per process)."""
    return folder_cases() + scheduler_cases() + use_cases()
