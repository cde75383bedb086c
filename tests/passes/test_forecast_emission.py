"""Forecast emissions (passes/forecast.py: `gate`, the weights folded into the gate's multiply;
`sum`; `stack`): each equals the eager reference and the others (<= 1e-5) in fx, and exported,
on every backend present (ONNX Runtime, the torch programs; TensorRT where it is installed)."""
from __future__ import annotations

import importlib
import operator

import pytest
import torch

from tcgraph import api
from tcgraph.compile import check_variant, example_inputs, rewrite_variant
from tcgraph.errors import TcgraphError
from tcgraph.export.artifact import load_artifact
from tcgraph.models.official.dit import DiT, make_config, randomize_weights
from tcgraph.passes import io_names
from tcgraph.runtime.dispatch import ScheduleDispatcher
from tests.passes.test_forecast import MIXED, plan_with
from tests.runtime.test_forecast_dispatch import check_steps, hand_plan

forecast_module = importlib.import_module("tcgraph.passes.forecast")
EMISSIONS = forecast_module.EMISSIONS


def outputs(gm, feeds, names):
    got = gm(*[feeds[n] for n in names])
    return got if isinstance(got, tuple) else (got,)


@pytest.mark.parametrize("idx", range(len(MIXED)))
def test_every_emission_equals_the_reference_and_the_others(tiny_model, idx, monkeypatch):
    recipe = MIXED[idx]
    plan = plan_with(recipe, seed=idx)
    results = {}
    for emission in EMISSIONS:
        monkeypatch.setattr(forecast_module, "EMISSION", emission)
        gm = rewrite_variant(tiny_model, plan, recipe)
        ins, _ = io_names(gm)
        feeds = example_inputs(tiny_model, plan, ins, seed=idx, recipe=recipe)
        assert check_variant(tiny_model, gm, recipe, feeds, atol=1e-5) <= 1e-5
        results[emission] = outputs(gm, feeds, ins)
    for emission in EMISSIONS[1:]:
        for a, b in zip(results["gate"], results[emission]):
            assert (a - b).abs().max().item() <= 1e-5 * max(1.0, b.abs().max().item()), emission


def count_full_size_muls(gm) -> int:
    """Multiplies that read a history input or a sum of history terms (the full-size ones)."""
    history = {n for n in gm.graph.nodes
               if n.op == "placeholder" and str(n.meta.get("tcgraph.io_name", "")).startswith("cache.")}
    muls = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in (torch.mul, operator.mul)]
    summed = {n for n in gm.graph.nodes if n.op == "call_function" and n.target is torch.add
              and any(a in history or getattr(a, "target", None) is torch.mul for a in n.args)}
    return sum(1 for n in muls if any(a in history or a in summed for a in n.args))


def test_the_gate_emission_saves_one_full_size_multiply_per_gated_branch(tiny_model, monkeypatch):
    recipe = MIXED[1]  # every branch forecasts from 2 or 3 points, or reuses
    plan = plan_with(recipe)
    counts = {}
    for emission in ("gate", "sum"):
        monkeypatch.setattr(forecast_module, "EMISSION", emission)
        counts[emission] = count_full_size_muls(rewrite_variant(tiny_model, plan, recipe))
    forecasts = len(recipe.forecasts())
    assert counts["sum"] - counts["gate"] == forecasts, counts


def test_an_unknown_emission_is_refused(tiny_model, monkeypatch):
    recipe = MIXED[0]
    monkeypatch.setattr(forecast_module, "EMISSION", "fma")
    with pytest.raises(TcgraphError, match="unknown forecast emission 'fma'; choose one of gate, sum, stack"):
        rewrite_variant(tiny_model, plan_with(recipe), recipe)


@pytest.fixture(scope="module")
def model():
    cfg = make_config("DiT-S/2", input_size=8, depth=3, hidden_size=32, num_heads=2, in_channels=2,
                      num_classes=5, learn_sigma=True)
    return randomize_weights(DiT(cfg), std=0.05)


def backends() -> list[str]:
    names = ["ort", "torch"]
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return names
    return names + ["trt"]


@pytest.mark.parametrize("emission", EMISSIONS)
def test_exported_emissions_equal_the_eager_loop_on_every_backend(model, emission, tmp_path, monkeypatch):
    """The hand plan (forecast, partial, compute and reuse mixed) transformed with each emission:
    every step on every backend equals the eager reference with hand-carried history (<= 1e-5)."""
    monkeypatch.setattr(forecast_module, "EMISSION", emission)
    plan = hand_plan()
    art = load_artifact(api.transform(model, plan, tmp_path / emission, check=False, progress=False))
    for backend in backends():
        with api.make_runner(backend, art) as runner:
            worst = check_steps(model, plan, ScheduleDispatcher.for_plan(runner, plan))
        assert max(worst) <= 1e-5, (backend, worst)
