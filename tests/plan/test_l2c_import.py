"""Importing published Learning-to-Cache routers: files built here in the published layout
({"routers": ModuleList state dict, "opt": optimizer state, "args": Namespace}), plans
checked action by action against the definition computed independently below."""
from __future__ import annotations

import argparse
import copy
import math
import random
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

from tcgraph.errors import TcgraphError
from tcgraph.models.official.dit import make_config
from tcgraph.plan import COMPUTE, REUSE, Plan
from tcgraph.sampling import SamplerSettings
from tcgraph.plan.planners.l2c_import import (
    load_published_router_plan,
    plan_from_published_router,
    read_published_router,
)

CFG = make_config("digits")  # depth 6, 64 tokens
DEPTH = CFG.depth


class _Router(nn.Module):
    """The shape of an L2C router: one `prob` parameter of 2*depth logits, no input."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.prob = nn.Parameter(logits.clone().to(torch.float32))


def _optimizer_state(routers: nn.ModuleList) -> dict:
    """Adam state after one step on a copy (a step must not move the stored logits)."""
    routers = copy.deepcopy(routers)
    opt = torch.optim.Adam(routers.parameters(), lr=1e-3)
    loss = sum(r.prob.sum() for r in routers)
    loss.backward()
    opt.step()
    return opt.state_dict()


def write_router_file(path: Path, logits: torch.Tensor, prefix: str = "", extras: bool = True) -> Path:
    """`logits` is [S, depth, 2]; stored as S routers of 2*depth logits (2j attn, 2j+1 mlp)."""
    routers = nn.ModuleList([_Router(row.reshape(-1)) for row in logits])
    sd = {prefix + k: v for k, v in routers.state_dict().items()}
    obj: dict = {"routers": sd}
    if extras:
        obj["opt"] = _optimizer_state(routers)
        obj["args"] = argparse.Namespace(model="DiT-XL/2", num_sampling_steps=len(logits), lr=1e-3, l1=1e-6)
    torch.save(obj, path)
    return path


def settings(steps: int) -> SamplerSettings:
    return SamplerSettings(num_steps=steps, resolution=CFG.input_size)


def expected_action(logits: torch.Tensor, s: int, block: int, branch: int, threshold: float):
    """The L2C definition, computed with Python floats: step s uses router i = S-1-s."""
    steps = logits.shape[0]
    i = steps - 1 - s
    if i % 2 == 1 or (steps % 2 == 1 and s == 0):
        return COMPUTE
    x = float(logits[i, block, branch])
    return COMPUTE if 1.0 / (1.0 + math.exp(-x)) > threshold else REUSE


def assert_plan_matches(plan: Plan, logits: torch.Tensor, threshold: float) -> int:
    """Check every action; returns how many branches are reused (so tests see both kinds)."""
    steps = logits.shape[0]
    assert len(plan.recipes) == steps
    reused = 0
    for s, recipe in enumerate(plan.recipes):
        assert recipe.depth == DEPTH
        for block in range(DEPTH):
            for branch, name in enumerate(("attn", "mlp")):
                want = expected_action(logits, s, block, branch, threshold)
                assert recipe.action(block, name) == want, (s, block, name)
                reused += want == REUSE
    return reused


def random_logits(steps: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # Centered on logit(0.1) = -2.197 so that both sides of the threshold occur.
    return (torch.randn(steps, DEPTH, 2, generator=g) * 1.5 - 2.2).to(torch.float32)


# ---- reading ---------------------------------------------------------------------------


def test_read_returns_logits_by_router_index(tmp_path):
    logits = random_logits(4)
    path = write_router_file(tmp_path / "r.pt", logits)
    got = read_published_router(path)
    assert got.shape == (4, DEPTH, 2) and got.dtype == torch.float32
    assert torch.equal(got, logits)
    # Position 2j of router i is attention of block j, 2j+1 its MLP.
    raw = nn.ModuleList([_Router(row.reshape(-1)) for row in logits]).state_dict()["2.prob"]
    assert float(got[2, 3, 0]) == float(raw[6]) and float(got[2, 3, 1]) == float(raw[7])


def test_read_tolerates_common_prefix_and_missing_extras(tmp_path):
    logits = random_logits(2, seed=1)
    got = read_published_router(write_router_file(tmp_path / "r.pt", logits, prefix="module.", extras=False))
    assert torch.equal(got, logits)


# ---- plan, action by action ---------------------------------------------------------------


@pytest.mark.parametrize("steps", [2, 4, 6, 5, 1])
@pytest.mark.parametrize("threshold", [0.1, 0.3])
def test_plan_matches_definition(tmp_path, steps, threshold):
    logits = random_logits(steps, seed=steps)
    path = write_router_file(tmp_path / "r.pt", logits)
    plan = load_published_router_plan(path, CFG, settings(steps), threshold=threshold)
    reused = assert_plan_matches(plan, logits, threshold)
    assert plan.planner == "l2c"
    assert plan.num_tokens == CFG.num_tokens
    if steps >= 2:
        assert reused > 0  # the data exercises both actions
    expected_params = {"source": "published-router", "router": str(path), "threshold": threshold}
    if steps % 2 == 1:
        expected_params["first_step_forced_full"] = True
    assert plan.params == expected_params
    # Full steps are exactly the odd router indices (plus step 0 when S is odd).
    full = [s for s, r in enumerate(plan.recipes) if r.is_full]
    forced = [0] if steps % 2 == 1 else []
    assert set(full) >= {s for s in range(steps) if (steps - 1 - s) % 2 == 1} | set(forced)
    # The plan survives its JSON form.
    again = Plan.from_json(plan.to_json())
    assert again == plan and again.params == plan.params


def test_step_order_noisiest_router_is_step_zero():
    # S = 6: routers 0, 2, 4 are cache steps; router i computes only block i's attention.
    steps = 6
    logits = torch.full((steps, DEPTH, 2), -5.0)
    for i in (0, 2, 4):
        logits[i, i, 0] = 5.0
    plan = plan_from_published_router(logits, CFG, settings(steps))
    assert [r.is_full for r in plan.recipes] == [True, False, True, False, True, False]
    for s in (1, 3, 5):
        i = steps - 1 - s  # s=1 -> router 4, s=3 -> router 2, s=5 -> router 0
        computed = [(b, br) for b, br, a in plan.recipes[s].items() if a == COMPUTE]
        assert computed == [(i, "attn")], s
    # Every cache step reads the 11 other branches, which the full step before it wrote.
    assert len(plan.cache_keys()) == 2 * DEPTH
    assert plan.schedule() == ["v0", "v1", "v0", "v2", "v0", "v3"]


def test_odd_step_count_forces_first_step_full():
    steps = 5
    logits = torch.full((steps, DEPTH, 2), -5.0)  # every cache branch would be reused
    plan = plan_from_published_router(logits, CFG, settings(steps), source="x.pt")
    # Router 4 (step 0) is a cache step in the file, but nothing is cached yet.
    assert plan.recipes[0].is_full
    assert [r.is_full for r in plan.recipes] == [True, True, False, True, False]
    assert all(a == REUSE for _, _, a in plan.recipes[2].items())
    assert plan.params["first_step_forced_full"] is True
    even = plan_from_published_router(torch.full((4, DEPTH, 2), -5.0), CFG, settings(4))
    assert "first_step_forced_full" not in even.params


def test_threshold_edge_is_strict():
    # At threshold 0.5 the logit 0.0 is exactly logit(threshold): sigmoid(0) = 0.5 is not > 0.5.
    logits = torch.full((2, DEPTH, 2), -3.0)
    logits[0, 0, 0] = 0.0          # exactly at the threshold -> reused
    logits[0, 0, 1] = 1e-6         # just above -> computed
    logits[0, 1, 0] = -1e-6        # just below -> reused
    logits[0, 1, 1] = 3.0
    plan = plan_from_published_router(logits, CFG, settings(2), threshold=0.5)
    cache_step = plan.recipes[1]  # s = 1 <-> router 0
    assert cache_step.action(0, "attn") == REUSE
    assert cache_step.action(0, "mlp") == COMPUTE
    assert cache_step.action(1, "attn") == REUSE
    assert cache_step.action(1, "mlp") == COMPUTE
    assert_plan_matches(plan, logits, 0.5)


def test_threshold_near_default_both_sides():
    thr = 0.1
    at = math.log(thr / (1 - thr))
    logits = torch.full((2, DEPTH, 2), -3.0)
    logits[0, 0, 0] = at + 1e-4
    logits[0, 0, 1] = at - 1e-4
    logits[0, 1, 0] = at  # float32 rounding of logit(0.1): the definition decides
    plan = plan_from_published_router(logits, CFG, settings(2), threshold=thr)
    assert plan.recipes[1].action(0, "attn") == COMPUTE
    assert plan.recipes[1].action(0, "mlp") == REUSE
    assert_plan_matches(plan, logits, thr)


# ---- errors -------------------------------------------------------------------------------


@dataclass
class NotARouter:
    value: int = 3


_EXECUTED: list[str] = []


def _side_effect(tag: str) -> str:
    _EXECUTED.append(tag)
    return tag


class _RunsCodeWhenLoaded:
    def __reduce__(self):
        return (_side_effect, ("ran",))


def test_missing_file(tmp_path):
    with pytest.raises(TcgraphError, match="not found"):
        read_published_router(tmp_path / "nope.pt")
    with pytest.raises(TcgraphError, match="not a file"):
        read_published_router(tmp_path)


@pytest.mark.parametrize("content", [b"", b"\x80\x02garbage", b"PK\x03\x04 truncated zip"])
def test_corrupt_file(tmp_path, content):
    path = tmp_path / "bad.pt"
    path.write_bytes(content)
    with pytest.raises(TcgraphError, match="damaged") as info:
        read_published_router(path)
    assert "\n" not in str(info.value)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_random_bytes_always_give_one_error(tmp_path):
    # torch's unpickler raises IndexError, KeyError, ... on some garbage; all must become TcgraphError.
    rng = random.Random(0)
    path = tmp_path / "bad.pt"
    for _ in range(300):
        path.write_bytes(bytes(rng.randrange(256) for _ in range(64)))
        with pytest.raises(TcgraphError):
            read_published_router(path)


def test_truncated_torch_file(tmp_path):
    path = write_router_file(tmp_path / "r.pt", random_logits(2))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(TcgraphError, match="damaged"):
        read_published_router(path)


def test_custom_class_is_refused(tmp_path):
    path = tmp_path / "r.pt"
    sd = nn.ModuleList([_Router(torch.zeros(2 * DEPTH))]).state_dict()
    torch.save({"routers": sd, "args": NotARouter()}, path)
    with pytest.raises(TcgraphError, match="not a plain L2C router file") as info:
        read_published_router(path)
    assert "NotARouter" in str(info.value)


def test_pickled_code_is_not_executed(tmp_path):
    path = tmp_path / "r.pt"
    sd = nn.ModuleList([_Router(torch.zeros(2 * DEPTH))]).state_dict()
    torch.save({"routers": sd, "opt": _RunsCodeWhenLoaded()}, path)
    _EXECUTED.clear()
    with pytest.raises(TcgraphError, match="not a plain L2C router file"):
        read_published_router(path)
    assert _EXECUTED == []


def test_missing_routers_key_names_found_keys(tmp_path):
    path = tmp_path / "r.pt"
    torch.save({"model": {"w": torch.zeros(1)}, "opt": {}}, path)
    with pytest.raises(TcgraphError, match="no 'routers' entry") as info:
        read_published_router(path)
    assert "'model'" in str(info.value) and "'opt'" in str(info.value)


@pytest.mark.parametrize(
    "keys, match",
    [
        (["0.prob", "2.prob"], "not 0..1 without gaps"),
        (["1.prob", "2.prob"], "missing \\[0\\]"),
        (["0.prob", "1.weight"], "not of the form"),
        (["module.0.prob", "1.prob"], "different prefixes"),
        (["0.prob", "00.prob"], "gaps or repeats"),
    ],
)
def test_bad_router_keys(tmp_path, keys, match):
    path = tmp_path / "r.pt"
    torch.save({"routers": {k: torch.zeros(2 * DEPTH) for k in keys}}, path)
    with pytest.raises(TcgraphError, match=match):
        read_published_router(path)


def test_bad_logit_lengths(tmp_path):
    path = tmp_path / "r.pt"
    torch.save({"routers": {"0.prob": torch.zeros(5), "1.prob": torch.zeros(5)}}, path)
    with pytest.raises(TcgraphError, match="5 logits each"):
        read_published_router(path)
    torch.save({"routers": {"0.prob": torch.zeros(4), "1.prob": torch.zeros(6)}}, path)
    with pytest.raises(TcgraphError, match="different numbers of logits"):
        read_published_router(path)
    torch.save({"routers": {}}, path)
    with pytest.raises(TcgraphError, match="empty"):
        read_published_router(path)


def test_wrong_step_count(tmp_path):
    path = write_router_file(tmp_path / "r.pt", random_logits(4))
    with pytest.raises(TcgraphError, match="router has 4 steps, the sampler 6: pass --steps 4"):
        load_published_router_plan(path, CFG, settings(6))


def test_wrong_depth(tmp_path):
    logits = torch.zeros(4, DEPTH + 1, 2)
    with pytest.raises(TcgraphError, match=f"router has {2 * (DEPTH + 1)} logits per step .*depth {DEPTH}"):
        plan_from_published_router(logits, CFG, settings(4))
    other = make_config("digits", depth=DEPTH + 1)
    plan = plan_from_published_router(logits, other, settings(4))  # the matching config is fine
    assert plan.depth == DEPTH + 1


@pytest.mark.parametrize("threshold", [0.0, 1.0, -0.1, 1.5, float("nan")])
def test_threshold_out_of_range(threshold):
    with pytest.raises(TcgraphError, match="strictly between 0 and 1"):
        plan_from_published_router(torch.zeros(2, DEPTH, 2), CFG, settings(2), threshold=threshold)


def test_non_finite_logits():
    logits = torch.zeros(2, DEPTH, 2)
    logits[0, 2, 1] = float("nan")
    with pytest.raises(TcgraphError, match="NaN"):
        plan_from_published_router(logits, CFG, settings(2))
