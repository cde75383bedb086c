"""Checks shared by the partial and dynamic export tests: one variant's ONNX against its graph
on fresh inputs, a whole token plan sampled with the ORT runner against an eager
reference_step loop, and the shared-qkv weight check."""
from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import torch

from tcgraph import api
from tcgraph.compile import build_variants
from tcgraph.export.artifact import load_artifact
from tcgraph.export.onnx import WEIGHTS_PATH, export_variants
from tcgraph.passes import reference_step
from tcgraph.plan import COMPUTE, Plan, Recipe
from tcgraph.sampling import SamplerSettings, make_noise, run_batches, sampler_for
from tcgraph.runtime.dispatch import ScheduleDispatcher
from tcgraph.names import BRANCHES
from tests.export.tiny_variants import param_bytes, tiny_dit


def ort_session(path):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def check_onnx_on_fresh_inputs(variant, path):
    """The exported variant at `path` equals its graph within 1e-4 on fresh random inputs (not
    the ones export verified with); returns (feeds, ONNX Runtime outputs as numpy)."""
    g = torch.Generator().manual_seed(7)
    feeds = {n: (torch.randn(t.shape, generator=g) if t.is_floating_point() else t)
             for n, t in variant.example_inputs.items()}
    with torch.no_grad():
        ref = variant.gm(*feeds.values())
    got = ort_session(path).run(None, {n: t.numpy() for n, t in feeds.items()})
    diffs = [float(np.abs(r.numpy() - a).max()) for r, a in zip(ref, got)]
    assert max(diffs) <= 1e-4, diffs
    return feeds, got


def check_plan_sampled_with_ort(model, tmp_path, recipes, *, keep_inputs: bool = False):
    """Transform a 6-step token plan, sample with ORT and compare with an eager reference_step
    loop (caches carried step to step); then step by step on the reference trajectory, every
    output and carried cache within 1e-4. Returns (plan, dispatcher) for extra checks."""
    torch.set_num_threads(1)
    s = SamplerSettings(num_steps=len(recipes), batch=2, cfg_scale=2.0, resolution=8)
    plan = Plan("tokens", s, tuple(recipes), model.config.num_tokens)
    path = api.transform(model, plan, tmp_path / "art", progress=False)
    labels = [1, 4, 0]  # two runs of 2: the second padded
    got, got_labels = api.sample(path, classes=labels, per_class=1, seed=3, progress=False)
    assert got_labels == labels

    caches: dict = {}

    def eager_step(step, x, t, y):
        out, fresh = reference_step(model, x, t, y, plan.recipes[step], caches, keep_inputs=keep_inputs)
        caches.update(fresh)
        return out

    cfg = model.config
    eager = run_batches(eager_step, caches.clear, sampler_for(s, cfg), labels,
                            make_noise(len(labels), cfg.in_channels, s.resolution, 3), s.batch, 3)
    assert got.shape == eager.shape == (3, 2, 8, 8)
    # Random weights make samples large (|x| ~ 500 here): the full plan's ORT-vs-eager
    # difference is itself ~1e-4 absolute, i.e. float32 rounding; compare relative to size.
    diff = (got - eager).abs().max().item()
    assert torch.allclose(got, eager, rtol=1e-5, atol=1e-4), diff
    full = api.sample_eager(model, s, labels, seed=3)
    assert (full - eager).abs().max().item() > 1e-3  # a different computation from the full model

    worst = []
    caches.clear()
    with api.make_runner("ort", load_artifact(path)) as runner:
        dispatch = ScheduleDispatcher.for_plan(runner, plan)

        def step(i, x, t, y):
            out = dispatch(i, x, t, y)
            ref = eager_step(i, x, t, y)
            worst.append((out - ref).abs().max().item())
            worst.extend((runner.to_torch(v) - caches[n]).abs().max().item() for n, v in dispatch.caches.items())
            return ref

        sampler_for(s, cfg).sample(step, make_noise(2, cfg.in_channels, 8, 0), torch.tensor([2, 3]))
    assert dispatch.calls == plan.schedule()
    assert max(worst) <= 1e-4, max(worst)
    return plan, dispatch


def check_qkv_stored_once(tmp_path, make_recipe) -> None:
    """At D=128 (above the exporter's folding limit) a token variant reads the same
    `qkv.weight.T` as the full variant through two Slices; weights.bin holds each weight
    once plus only small constants. `make_recipe(n)` builds the token recipe of a 2-block model."""
    torch.set_num_threads(1)
    model = tiny_dit()
    n = model.config.num_tokens
    plan = Plan("p", SamplerSettings(num_steps=2, batch=1, cfg_scale=1.0, resolution=16),
                (Recipe.uniform(2, COMPUTE, BRANCHES), make_recipe(n)), n)
    entries = export_variants(build_variants(model, plan), tmp_path)
    assert entries[1]["max_abs_diff"] <= 1e-4
    assert "blocks.0.attn.qkv.weight.T" in entries[1]["external_initializers"]
    ops = Counter(n.op_type for n in onnx.load(str(tmp_path / entries[1]["file"]), load_external_data=False).graph.node)
    assert ops["Slice"] == 2  # Wq, Wkv: column slices of the shared W.T
    size = (tmp_path / WEIGHTS_PATH).stat().st_size
    assert size <= param_bytes(model) + 4096, (size, param_bytes(model))
