"""Scheduler configs without diffusers or torch: which schedulers a plan may use, and the checks
of a scheduler config's class and values (`tcgraph.sampling.schedulers` runs them)."""
from __future__ import annotations

import json
import math
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

from tcgraph.errors import UsageError

SCHEDULER_CONFIG = "scheduler_config.json"
SCHEDULER_FOLDER = "scheduler"
CLASS_KEY = "_class_name"

# Deterministic schedulers whose input needs no per-step scaling and whose step is a pure
# function of (model output, timestep, sample, the scheduler's own history).
# EulerDiscreteScheduler is left out: it scales the model input by the step's sigma and
# feeds the model fractional timesteps; PNDMScheduler calls the model num_steps + 1 times.
SUPPORTED_SCHEDULERS = ("DDIMScheduler", "DPMSolverMultistepScheduler", "FlowMatchEulerDiscreteScheduler")
# Schedulers whose timesteps are float (sigma * num_train_timesteps): the model's `t` input
# is float32 for them, int64 for the others.
FLOAT_TIMESTEP_SCHEDULERS = ("FlowMatchEulerDiscreteScheduler",)

_NOISE_EACH_STEP = "draws fresh noise at every step"
STOCHASTIC_SCHEDULERS = {
    "DDPMScheduler": _NOISE_EACH_STEP,
    "DDPMParallelScheduler": _NOISE_EACH_STEP,
    "DDPMWuerstchenScheduler": _NOISE_EACH_STEP,
    "EulerAncestralDiscreteScheduler": _NOISE_EACH_STEP + " (ancestral sampling)",
    "KDPM2AncestralDiscreteScheduler": _NOISE_EACH_STEP + " (ancestral sampling)",
    "LTXEulerAncestralRFScheduler": _NOISE_EACH_STEP + " (ancestral sampling)",
    "DPMSolverSDEScheduler": "solves the SDE with Brownian-tree noise",
    "SASolverScheduler": "solves the SDE, adding noise at every step",
    "LCMScheduler": "adds fresh noise between its consistency steps",
    "FlowMatchLCMScheduler": "adds fresh noise between its consistency steps",
    "TCDScheduler": "adds fresh noise between its steps (gamma > 0)",
    "CMStochasticIterativeScheduler": "adds fresh noise between its consistency steps",
    "ScoreSdeVeScheduler": "solves the SDE, adding noise at every step",
}
_WHY_DETERMINISTIC = ("tcgraph plans a fixed, deterministic step sequence: its caches and forecasts are fitted "
                      "to the trajectory the full model takes, and the noise a stochastic scheduler draws at "
                      "every step moves each run off that trajectory")


#################################################################################
#                         Config checks (no diffusers)                          #
#################################################################################


def check_scheduler_config(config: Any, where: str = "scheduler") -> dict:
    """A plain-JSON copy of a diffusers scheduler config, refused (UsageError) unless it names
    a supported, deterministic scheduler. `where` names the config's origin in messages."""
    if not isinstance(config, dict):
        raise UsageError(f"{where} must be a dict (the contents of a diffusers {SCHEDULER_CONFIG}), "
                         f"got {type(config).__name__}")
    name = config.get(CLASS_KEY)
    if not isinstance(name, str):
        raise UsageError(f"{where} has no {CLASS_KEY!r} string naming the diffusers scheduler class (got "
                         f"{name!r}); pass the contents of the pipeline's {SCHEDULER_FOLDER}/{SCHEDULER_CONFIG}")
    supported = ", ".join(SUPPORTED_SCHEDULERS)
    if name in STOCHASTIC_SCHEDULERS:
        raise UsageError(f"{where}: {name} {STOCHASTIC_SCHEDULERS[name]}; {_WHY_DETERMINISTIC}. "
                         f"Use a deterministic scheduler: {supported}")
    if name not in SUPPORTED_SCHEDULERS:
        raise UsageError(f"{where}: scheduler {name} is not supported; supported: {supported} "
                         f"(write one of them as {CLASS_KEY} in the config)")
    algorithm = config.get("algorithm_type")
    if name == "DPMSolverMultistepScheduler" and isinstance(algorithm, str) and algorithm.startswith("sde-"):
        raise UsageError(f"{where}: DPMSolverMultistepScheduler with algorithm_type {algorithm!r} draws noise at "
                         f"every step; {_WHY_DETERMINISTIC}. Set algorithm_type to 'dpmsolver++' (deterministic)")
    if name == "FlowMatchEulerDiscreteScheduler" and config.get("stochastic_sampling"):
        raise UsageError(f"{where}: FlowMatchEulerDiscreteScheduler with stochastic_sampling draws noise at every "
                         f"step; {_WHY_DETERMINISTIC}. Set stochastic_sampling to false")
    if name == "DPMSolverMultistepScheduler" and config.get("variance_type") is not None:
        raise UsageError(f"{where}: variance_type {config['variance_type']!r} makes DPMSolverMultistepScheduler cut "
                         "the model output to its first 3 channels; tcgraph drops learned-variance channels itself "
                         "(it keeps the model's first in_channels), so set variance_type to null")
    check_scheduler_values(config, where)
    try:
        return json.loads(json.dumps(config, allow_nan=False))
    except (TypeError, ValueError) as e:
        raise UsageError(f"{where} is not plain JSON ({e}); plan.json stores it, so use only str, finite numbers, "
                         "bool, null, lists and dicts (scheduler_config_from_folder drops infinite defaults)") from e


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _between(lo, hi, lo_in=False, hi_in=False, integer=False):
    def ok(v):
        if not _number(v) or (integer and not isinstance(v, int)):
            return False
        return (lo is None or (v >= lo if lo_in else v > lo)) and (hi is None or (v <= hi if hi_in else v < hi))
    return ok


_BOOL = (lambda v: isinstance(v, bool), "true or false")
_PROB = (_between(0, 1), "a finite number between 0 and 1 (exclusive)")
_POSITIVE = (_between(0, None), "a finite number > 0")
# What each scheduler argument tcgraph's supported classes take must be (where the config has it): a value
# outside makes diffusers compute NaN samples or timesteps outside the training range without a word.
VALUE_RULES = {
    "num_train_timesteps": (_between(1, 100_000, True, True, integer=True), "an integer from 1 to 100000 (usually 1000)"),
    "steps_offset": (_between(0, 100_000, True, True, integer=True), "an integer >= 0 below num_train_timesteps"),
    "beta_start": (_PROB[0], "a finite number between 0 and 1, at most beta_end (DiT and PixArt: 0.0001)"),
    "beta_end": (_PROB[0], "a finite number between 0 and 1, at least beta_start (DiT and PixArt: 0.02)"),
    "beta_schedule": (lambda v: v in ("linear", "scaled_linear", "squaredcos_cap_v2"),
                      "'linear', 'scaled_linear' or 'squaredcos_cap_v2'"),
    "trained_betas": (lambda v: v is None or isinstance(v, list) and bool(v) and all(_PROB[0](b) for b in v),
                      "null or a list of num_train_timesteps numbers between 0 and 1"),
    "prediction_type": (lambda v: v in ("epsilon", "sample", "v_prediction", "flow_prediction"),
                        "'epsilon', 'sample', 'v_prediction' or 'flow_prediction'"),
    "timestep_spacing": (lambda v: v in ("linspace", "leading", "trailing"), "'linspace', 'leading' or 'trailing'"),
    "clip_sample_range": _POSITIVE, "sample_max_value": _POSITIVE, "flow_shift": _POSITIVE, "shift": _POSITIVE,
    "dynamic_thresholding_ratio": (_between(0, 1, hi_in=True), "a number in (0, 1] (default 0.995)"),
    "solver_order": (_between(1, 3, True, True, integer=True), "1, 2 or 3"),
    "solver_type": (lambda v: v in ("midpoint", "heun"), "'midpoint' or 'heun'"),
    "algorithm_type": (lambda v: v in ("dpmsolver", "dpmsolver++"), "'dpmsolver' or 'dpmsolver++'"),
    "final_sigmas_type": (lambda v: v in ("zero", "sigma_min"), "'zero' or 'sigma_min'"),
    "lambda_min_clipped": (lambda v: _number(v) or v == float("-inf"), "a number or -Infinity"),
    "base_shift": (lambda v: v is None or _number(v), "a finite number or null"),
    "max_shift": (lambda v: v is None or _number(v), "a finite number or null"),
    "base_image_seq_len": (_between(1, None, True, integer=True), "an integer >= 1, below max_image_seq_len"),
    "max_image_seq_len": (_between(1, None, True, integer=True), "an integer >= 1, above base_image_seq_len"),
    "shift_terminal": (lambda v: v is None or _PROB[0](v), "null or a number between 0 and 1"),
    "time_shift_type": (lambda v: v in ("exponential", "linear"), "'exponential' or 'linear'"),
    **{k: _BOOL for k in ("clip_sample", "set_alpha_to_one", "thresholding", "rescale_betas_zero_snr",
                          "lower_order_final", "euler_at_final", "use_karras_sigmas", "use_exponential_sigmas",
                          "use_beta_sigmas", "use_lu_lambdas", "use_flow_sigmas", "use_dynamic_shifting",
                          "invert_sigmas", "stochastic_sampling")},
}


def check_scheduler_values(config: dict, where: str) -> None:
    """Refuse (UsageError naming `where`, the key, the value and what it must be) scheduler arguments
    out of their range (`VALUE_RULES`) or out of order with each other."""
    def refuse(key, expected):
        try:
            shown = json.dumps(config[key])[:80]
        except (TypeError, ValueError):
            shown = repr(config[key])[:80]
        raise UsageError(f"{where}: {key} = {shown}: expected {expected}; fix the scheduler config (or restore "
                         "it from the pipeline it came with): diffusers would sample NaN or off-range steps with it")

    for key, (ok, expected) in VALUE_RULES.items():
        if key in config and not ok(config[key]):
            refuse(key, expected)
    get = config.get
    start, end = get("beta_start", 0.0001), get("beta_end", 0.02)  # diffusers' defaults
    if "beta_start" in config and _number(end) and start > end:
        refuse("beta_start", f"at most beta_end ({end}{'' if 'beta_end' in config else ', the default'})")
    if "beta_end" in config and _number(start) and start > end:
        refuse("beta_end", f"at least beta_start ({start}{'' if 'beta_start' in config else ', the default'})")
    steps = get("num_train_timesteps", 1000)
    if isinstance(get("steps_offset"), int) and get("steps_offset") >= steps:
        refuse("steps_offset", f"below num_train_timesteps ({steps})")
    if isinstance(get("trained_betas"), list) and len(config["trained_betas"]) != steps:
        refuse("trained_betas", f"{steps} values (num_train_timesteps), got {len(config['trained_betas'])}")
    if get("use_dynamic_shifting") and get("base_image_seq_len", 256) >= get("max_image_seq_len", 4096):
        refuse("base_image_seq_len", f"below max_image_seq_len ({get('max_image_seq_len', 4096)})")


def timestep_dtype_name(config: dict) -> str:
    """The dtype of the model's `t` input under this scheduler: "float32" for flow matching
    (timesteps sigma * 1000, fractional), "int64" for the others (integer training timesteps)."""
    return "float32" if config[CLASS_KEY] in FLOAT_TIMESTEP_SCHEDULERS else "int64"


def timestep_dtype(config: dict) -> "torch.dtype":
    """`timestep_dtype_name` as a torch dtype."""
    import torch

    return getattr(torch, timestep_dtype_name(config))
