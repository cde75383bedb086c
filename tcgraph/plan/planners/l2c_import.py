"""Import the routers published with Learning-to-Cache (L2C, Ma et al. 2024) as a Plan.

The L2C code releases its trained routers (e.g. `DDIM20_router.pt`, `DDIM50_router.pt` for
DiT-XL/2) as a `torch.save` dict:

- `routers`: the state dict of an `nn.ModuleList` of S routers, one per sampling step.
  Keys are `<i>.prob` for i = 0 … S−1 (a prefix common to every key, such as `module.`,
  is tolerated); each value is a 1-D tensor of 2·depth logits, where position 2j is the
  attention branch of block j and position 2j+1 its MLP branch.
- optionally `opt` (the optimizer state dict) and `args` (an `argparse.Namespace`), which
  are ignored here.

Router i belongs to the i-th *smallest* timestep of the respaced schedule (the ascending
order of `tcgraph.sampling.diffusion.space_timesteps`), so router S−1 is the noisiest one
and generation step s (0 = noisiest, docs/design.md) uses router i = S−1−s. Routers with odd
i are *full* steps: every branch is computed and every cache refreshed. Routers with even
i are *cache* steps: a branch is computed when sigmoid(logit) > threshold (strictly) and
its cached output is reused otherwise. The L2C sampling scripts use threshold 0.1.

Published routers are DiT's: two logits per block (attention, MLP). A model whose blocks
have other branches (PixArt: attn, cross, mlp) has no published router format, and is refused
with a clear error (learn a router for it instead: `l2c[:X]` without `--router`).

The file is read with `torch.load(weights_only=True)` and only `argparse.Namespace` added
to torch's allow-list, so a file that pickles any other Python object is refused before
that object is built; no pickled code runs.
"""
from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch

from tcgraph.errors import TcgraphError
from tcgraph.models.families import ModelConfig
from tcgraph.names import BRANCHES
from tcgraph.plan.plan import COMPUTE, REUSE, Action, Plan, Recipe
from tcgraph.sampling import SamplerSettings

PLANNER_NAME = "l2c"
DEFAULT_THRESHOLD = 0.1  # what the L2C sampling scripts pass as --thres
ROUTERS_KEY = "routers"
# `<prefix><i>.prob`, where the optional prefix is dotted names such as "module.".
_KEY_RE = re.compile(r"^((?:[^.]+\.)*?)(\d+)\.prob$")
# How many keys an error message names before it only counts them.
_MAX_LISTED = 8


def _listed(items: list[str]) -> str:
    shown = ", ".join(repr(x) for x in items[:_MAX_LISTED])
    more = len(items) - _MAX_LISTED
    return shown + (f", ... ({more} more)" if more > 0 else "") if items else "nothing"


#################################################################################
#                                Reading the file                               #
#################################################################################


def _load_router_file(path: Path) -> object:
    """`torch.load` of `path` with weights_only=True, every failure as one TcgraphError."""
    if not path.exists():
        raise TcgraphError(f"L2C router file not found: {path}; pass the path of a published router file "
                           "such as DDIM20_router.pt")
    if not path.is_file():
        raise TcgraphError(f"L2C router path {path} is not a file; pass the path of a router file "
                           "such as DDIM20_router.pt")
    from tcgraph.models.official.checkpoint import restricted_torch_load

    return restricted_torch_load(path, "L2C router file",
                                 "Re-save only the routers: torch.save({'routers': routers.state_dict()}, path)")


def _router_state_dict(obj: object, path: Path) -> Mapping[str, object]:
    if not isinstance(obj, Mapping):
        raise TcgraphError(
            f"{path} holds a {type(obj).__name__}, not an L2C router file; expected a dict with a "
            f"{ROUTERS_KEY!r} entry (the routers' state dict)"
        )
    if ROUTERS_KEY not in obj:
        keys = [str(k) for k in obj]
        raise TcgraphError(
            f"{path} has no {ROUTERS_KEY!r} entry (found keys: {_listed(keys)}); expected a published L2C "
            f"router file, a dict whose {ROUTERS_KEY!r} entry is the state dict of the routers"
        )
    routers = obj[ROUTERS_KEY]
    if not isinstance(routers, Mapping) or not routers:
        what = "an empty dict" if isinstance(routers, Mapping) else f"a {type(routers).__name__}"
        raise TcgraphError(
            f"{path}: {ROUTERS_KEY!r} is {what}; expected the state dict of the routers, "
            "with keys '0.prob', '1.prob', ..."
        )
    return routers


def _router_index(routers: Mapping[str, object], path: Path) -> dict[int, str]:
    """{router index i: key} after checking the keys are `<prefix><i>.prob`, i = 0..S−1."""
    parsed = {k: _KEY_RE.match(k) if isinstance(k, str) else None for k in routers}
    bad = [str(k) for k, m in parsed.items() if m is None]
    if bad:
        raise TcgraphError(
            f"{path}: {len(bad)} router keys are not of the form '<i>.prob': {_listed(bad)}; "
            "expected keys '0.prob', '1.prob', ... (one router per sampling step)"
        )
    prefixes = sorted({m.group(1) for m in parsed.values()})
    if len(prefixes) > 1:
        raise TcgraphError(
            f"{path}: router keys carry different prefixes {_listed(prefixes)}; "
            "expected '<i>.prob' with at most one prefix common to every key"
        )
    index = {int(m.group(2)): k for k, m in parsed.items()}
    num = len(routers)
    if len(index) != num or sorted(index) != list(range(num)):
        got = sorted(int(m.group(2)) for m in parsed.values())
        missing = sorted(set(range(num)) - set(got))
        raise TcgraphError(
            f"{path}: router indices {got[:_MAX_LISTED]}{' ...' if num > _MAX_LISTED else ''} are not "
            f"0..{num - 1} without gaps or repeats (missing {missing[:_MAX_LISTED]}); "
            "expected keys '0.prob' ... '<S-1>.prob', one per sampling step"
        )
    return index


def _logit_rows(routers: Mapping[str, object], index: dict[int, str], path: Path) -> list[torch.Tensor]:
    rows = []
    for i in range(len(index)):
        value = routers[index[i]]
        if not isinstance(value, torch.Tensor) or value.dim() != 1 or not value.is_floating_point():
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise TcgraphError(
                f"{path}: {index[i]!r} is {shape}; expected a 1-D float tensor of 2*depth logits"
            )
        rows.append(value.detach().to(torch.float32))
    lengths = sorted({len(r) for r in rows})
    if len(lengths) > 1:
        raise TcgraphError(
            f"{path}: routers have different numbers of logits {lengths}; every router needs 2*depth "
            "logits (attention and MLP of every block)"
        )
    if lengths[0] == 0 or lengths[0] % 2:
        raise TcgraphError(
            f"{path}: routers have {lengths[0]} logits each; expected an even, positive number, "
            "2*depth (attention and MLP of every block)"
        )
    return rows


def read_published_router(path: str | os.PathLike) -> torch.Tensor:
    """The logits of a published L2C router file, as a float32 tensor `[S, depth, 2]`.

    Indexed by router index i (i = 0 is the *least* noisy step), not by generation step;
    `[..., 0]` is the attention branch and `[..., 1]` the MLP branch of each block.
    """
    path = Path(path)
    routers = _router_state_dict(_load_router_file(path), path)
    rows = _logit_rows(routers, _router_index(routers, path), path)
    return torch.stack(rows).reshape(len(rows), -1, 2)


#################################################################################
#                               Logits -> Plan                                  #
#################################################################################


def _check_inputs(logits: torch.Tensor, model_cfg: ModelConfig, settings: SamplerSettings,
                  threshold: float) -> None:
    if tuple(model_cfg.branches) != BRANCHES:
        raise TcgraphError(
            f"published L2C routers hold one logit per DiT branch ({', '.join(BRANCHES)}) of every block; this "
            f"model's blocks have the branches {', '.join(model_cfg.branches)}, which no router file describes: "
            "learn a router for it instead (plan l2c[:X] without --router, with calibration prompts)"
        )
    if not isinstance(threshold, (int, float)) or not 0.0 < float(threshold) < 1.0:
        raise TcgraphError(
            f"L2C threshold must lie strictly between 0 and 1, got {threshold!r}; "
            f"the L2C code uses {DEFAULT_THRESHOLD}"
        )
    if not isinstance(logits, torch.Tensor) or logits.dim() != 3 or logits.shape[-1] != 2:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise TcgraphError(
            f"L2C logits have shape {shape}; expected [steps, depth, 2], as read_published_router returns"
        )
    steps, depth = int(logits.shape[0]), int(logits.shape[1])
    if steps != settings.num_steps:
        raise TcgraphError(
            f"router has {steps} steps, the sampler {settings.num_steps}: pass --steps {steps} "
            "(an L2C router is trained for one step count)"
        )
    if depth != model_cfg.depth:
        raise TcgraphError(
            f"router has {2 * depth} logits per step ({depth} blocks), the model {2 * model_cfg.depth} "
            f"(depth {model_cfg.depth}): use the router trained for this model, or the model config "
            f"with depth {depth}"
        )
    if not bool(torch.isfinite(logits).all()):
        raise TcgraphError("L2C router logits contain NaN or infinity; the router file is damaged")


def _branch_action(prob: float, threshold: float) -> Action:
    """COMPUTE when sigmoid(logit) > threshold (strict, as in the L2C code), else REUSE."""
    return COMPUTE if prob > threshold else REUSE


def _cache_step_recipe(step_logits: torch.Tensor, threshold: float) -> Recipe:
    # float64 so that the float32 logits of the file are compared without further rounding.
    probs = torch.sigmoid(step_logits.to(torch.float64)).tolist()
    return Recipe(tuple(
        (_branch_action(attn, threshold), _branch_action(mlp, threshold)) for attn, mlp in probs
    ), BRANCHES)


def plan_from_published_router(
    logits: torch.Tensor,
    model_cfg: ModelConfig,
    settings: SamplerSettings,
    threshold: float = DEFAULT_THRESHOLD,
    source: str | os.PathLike = "",
) -> Plan:
    """The Plan that an L2C router (`[S, depth, 2]` logits by router index) prescribes.

    Generation step s uses router i = S−1−s. Odd i are full steps; at even i a branch is
    computed when sigmoid(logit) > `threshold` and reused otherwise.

    If S is odd, router S−1 (generation step 0) is a cache step, but no step has filled a
    cache yet; step 0 is then made a full step (as happens in the L2C code, whose cache is
    still empty there) and the plan records `"first_step_forced_full": True` in its params.
    """
    _check_inputs(logits, model_cfg, settings, threshold)
    threshold = float(threshold)
    steps, depth = int(logits.shape[0]), int(logits.shape[1])
    full = Recipe.uniform(depth, COMPUTE, model_cfg.branches)  # DiT's branches (`_check_inputs`)
    recipes = []
    for s in range(steps):
        i = steps - 1 - s
        recipes.append(full if i % 2 == 1 else _cache_step_recipe(logits[i], threshold))
    params: dict = {"source": "published-router", "router": str(source), "threshold": threshold}
    if steps % 2 == 1:
        recipes[0] = full
        params["first_step_forced_full"] = True
    return Plan(PLANNER_NAME, settings, tuple(recipes), model_cfg.num_tokens, params=params)


def load_published_router_plan(
    path: str | os.PathLike,
    model_cfg: ModelConfig,
    settings: SamplerSettings,
    threshold: float = DEFAULT_THRESHOLD,
) -> Plan:
    """`plan_from_published_router` of the logits in the router file at `path`."""
    return plan_from_published_router(read_published_router(path), model_cfg, settings, threshold, source=path)
