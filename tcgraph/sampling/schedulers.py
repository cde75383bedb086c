"""Samplers that run diffusers' scheduler classes, for models that come with a diffusers pipeline.

A diffusers pipeline folder names its sampler in `scheduler/scheduler_config.json`
(`_class_name` plus the class's arguments). `DiffusersSampler` builds that class from the
config and runs it with tcgraph's loop, so it has `DDIMSampler`'s interface as calibration,
evaluation and sampling use it: `num_steps`, `use_cfg`, `model_batch`, `schedule`
(`timesteps`, `generation_order()`), `model_inputs`, `eps_from_output` and
`sample(step_fn, noise, y, generator=, phase=)`.

A plan is made for a fixed sequence of steps whose timesteps are constants of its graphs,
so only deterministic schedulers are taken (`SUPPORTED_SCHEDULERS`); one that draws noise
at every step is refused with the reason (`STOCHASTIC_SCHEDULERS`). diffusers is imported
only when a `DiffusersSampler` is built: `import tcgraph` and tcgraph's own DDIM never need it.
"""
from __future__ import annotations

import inspect
import json
import os
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tcgraph.errors import TcgraphError, UsageError
from tcgraph.progress import SILENT, Phase
from tcgraph.sampling.diffusion import GuidedSteps, StepFn

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


def timestep_dtype(config: dict) -> torch.dtype:
    """The dtype of the model's `t` input under this scheduler: float32 for flow matching
    (timesteps sigma * 1000, fractional), int64 for the others (integer training timesteps)."""
    return torch.float32 if config[CLASS_KEY] in FLOAT_TIMESTEP_SCHEDULERS else torch.int64


#################################################################################
#                           Reading a pipeline folder                           #
#################################################################################


def scheduler_config_from_folder(path: str | Path) -> dict:
    """The scheduler config of a diffusers pipeline, ready for `SamplerSettings(scheduler=...)`.

    `path` is a pipeline folder (`<path>/scheduler/scheduler_config.json`), a scheduler
    folder (`<path>/scheduler_config.json`) or the json file itself. Numbers that plain
    JSON cannot hold (PixArt's `"lambda_min_clipped": -Infinity`) are dropped where they
    equal the class's default, which `from_config` restores; others are refused.
    """
    path = Path(path)
    candidates = [path] if path.is_file() else [path / SCHEDULER_FOLDER / SCHEDULER_CONFIG, path / SCHEDULER_CONFIG]
    found = next((p for p in candidates if p.is_file()), None)
    if found == candidates[0] and (path / "model_index.json").is_file():  # a pipeline's own scheduler/
        from tcgraph.models.diffusers.folder import inside

        inside(path, SCHEDULER_FOLDER, path / "model_index.json", "the component")  # no symlink out of it
    if found is None:
        raise TcgraphError(
            f"no diffusers scheduler config at {path}: expected a pipeline folder holding "
            f"{SCHEDULER_FOLDER}/{SCHEDULER_CONFIG}, a scheduler folder holding {SCHEDULER_CONFIG}, or that file "
            "itself; point at the pipeline folder (the one with model_index.json)")
    try:
        config = json.loads(found.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TcgraphError(f"cannot read {found} as JSON ({e}); it should hold the scheduler's config as a JSON "
                           "object: restore it from the pipeline it came with") from e
    if not isinstance(config, dict) or not isinstance(config.get(CLASS_KEY), str):
        raise TcgraphError(f"{found} is not a diffusers scheduler config: expected a JSON object with a "
                           f"{CLASS_KEY!r} string; restore it from the pipeline it came with")
    config = check_scheduler_config(_drop_infinite_defaults(config, found), where=str(found))
    return config


def _drop_infinite_defaults(config: dict, where: Path) -> dict:
    bad = {k: v for k, v in config.items() if isinstance(v, float) and not math.isfinite(v)}
    if not bad or config[CLASS_KEY] not in SUPPORTED_SCHEDULERS:
        return config  # the check that follows names anything left
    defaults = inspect.signature(scheduler_class(config[CLASS_KEY]).__init__).parameters
    for key, value in bad.items():
        default = defaults[key].default if key in defaults else None
        if not (isinstance(default, float) and default == value):
            raise TcgraphError(f"{where}: {key} = {value} is not a finite number and not the class default, so "
                               "plan.json cannot store it; set a finite value")
    return {k: v for k, v in config.items() if k not in bad}


#################################################################################
#                                  The sampler                                  #
#################################################################################


def scheduler_class(name: str):
    """The diffusers scheduler class `name` (diffusers imported here, on first use)."""
    try:
        import diffusers
    except ImportError as e:
        raise TcgraphError(f"sampling with the diffusers scheduler {name} needs diffusers, which is not "
                           "installed: pip install diffusers") from e
    cls = getattr(diffusers, name, None)
    if cls is None:
        raise TcgraphError(f"the installed diffusers {diffusers.__version__} has no scheduler {name}; "
                           "pip install -U diffusers")
    return cls


@dataclass
class DiffusersSchedule:
    """The scheduler's timesteps for one step count, as `DDIMSchedule` lays them out: index i
    holds `timesteps[i]`, generation runs from index S-1 (noisiest, step 0) down to 0, so step
    s uses `timesteps[generation_order()[s]]`, which is the scheduler's `timesteps[s]`."""

    timesteps: np.ndarray  # (S,) int64, or float32 for flow matching

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    def generation_order(self) -> list[int]:
        return list(range(self.num_steps - 1, -1, -1))


class DiffusersSampler(GuidedSteps):
    """A diffusers scheduler run with tcgraph's loop, guidance as in `DDIMSampler`.

    At step s the model sees `x` (through the scheduler's `scale_model_input` where it has
    one; the supported ones leave it unchanged), `t` = the scheduler's timestep s as a [B]
    tensor (int64; float32 for flow matching, whose timesteps are sigma * 1000: its graphs
    are exported with a float32 `t`, `SamplerSettings.timestep_dtype`, and a runner refuses
    a feed of another dtype rather than truncating it),
    and `y`, with the null class batched in for guidance. The scheduler's `step` gets the
    guided output of the first `in_channels` channels (learned-variance channels dropped),
    in whatever form the config's `prediction_type` says the model predicts (epsilon for
    DiT; v_prediction, sample, or a flow model's velocity pass through unchanged).

    `sample` builds a fresh scheduler each run, so multistep history never leaks from one
    run into the next. `mu`, the resolution shift of a config with `use_dynamic_shifting`
    (FLUX), comes from `num_tokens` as FLUX's pipeline computes it.
    """

    def __init__(self, config: dict, num_steps: int, cfg_scale: float = 1.0, in_channels: int = 4,
                 null_class: int = 1000, num_tokens: int | None = None, guidance: str = "cfg"):
        if not cfg_scale >= 1.0:
            raise TcgraphError(f"guidance scale must be >= 1 (1 = no guidance), got {cfg_scale}")
        self.config = check_scheduler_config(config)
        self.cls = scheduler_class(self.config[CLASS_KEY])
        self.num_inference_steps = int(num_steps)
        self.cfg_scale = float(cfg_scale)
        self.in_channels = in_channels
        self.null_class = null_class
        self.guidance = guidance
        self.timestep_dtype = timestep_dtype(self.config)
        self._mu = self._shift_mu(num_tokens)
        try:
            order = self.fresh_scheduler().timesteps.cpu().numpy()
        except (ValueError, TypeError, KeyError, NotImplementedError, ImportError) as e:
            raise TcgraphError(f"diffusers' {self.config[CLASS_KEY]} refused this config for {num_steps} steps "
                               f"({type(e).__name__}: {e}); fix scheduler_config.json or the step count") from e
        if len(order) != self.num_inference_steps:
            raise TcgraphError(f"{self.config[CLASS_KEY]} makes {len(order)} timesteps for {num_steps} steps; "
                               "tcgraph needs one model call per step: choose another step count or timestep_spacing")
        self.schedule = DiffusersSchedule(order[::-1].copy())
        # Python scalars for `step`: no host sync per step, and FlowMatch refuses ints.
        self._step_timesteps = [v.item() for v in order]

    def _shift_mu(self, num_tokens: int | None) -> float | None:
        c = self.config
        if c[CLASS_KEY] != "FlowMatchEulerDiscreteScheduler" or not c.get("use_dynamic_shifting"):
            return None
        if num_tokens is None:
            raise TcgraphError("this FlowMatchEulerDiscreteScheduler config shifts its timesteps by resolution "
                               "(use_dynamic_shifting), which needs the model's number of image tokens")

        def get(key, default):
            return default if c.get(key) is None else c[key]

        lo, hi = get("base_image_seq_len", 256), get("max_image_seq_len", 4096)
        base, top = get("base_shift", 0.5), get("max_shift", 1.15)
        return base + (top - base) * (num_tokens - lo) / (hi - lo)  # linear in the token count

    def fresh_scheduler(self, device: torch.device | str | None = None):
        """A new scheduler object with its timesteps set, at the first step (no history)."""
        scheduler = self.cls.from_config(self.config)
        scheduler.set_timesteps(self.num_inference_steps, device=device,
                                **({} if self._mu is None else {"mu": self._mu}))
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(0)  # step index from the start, not looked up from t (a host sync)
        return scheduler

    def sample(
        self,
        step_fn: StepFn,
        noise: torch.Tensor,
        y,
        generator: torch.Generator | None = None,
        phase: Phase = SILENT,
    ) -> torch.Tensor:
        """Denoise `noise` (N, C, H, W) for labels `y` (N,) or a `Text`; `phase` ticks once per step.
        `generator` is not used: every supported scheduler is deterministic."""
        scheduler = self.fresh_scheduler(noise.device)
        sigma = getattr(scheduler, "init_noise_sigma", 1.0)
        x = noise if sigma == 1.0 else noise * sigma
        scale = getattr(scheduler, "scale_model_input", None)
        for step, index in enumerate(self.schedule.generation_order()):
            t = self._step_timesteps[step]
            xin = x if scale is None else scale(x, t)
            out = step_fn(step, *self.model_inputs(xin, index, y))
            x = scheduler.step(self.eps_from_output(out), t, x, return_dict=False)[0]
            phase.tick()
        return x


def scheduler_for_transform(scheduler, model) -> dict | None:
    """The diffusers scheduler config that `transform(model, scheduler=...)` samples with, or None
    for tcgraph's DDIM: "auto" takes a diffusers pipeline folder's own `scheduler/`."""
    if isinstance(scheduler, dict):
        return scheduler
    if scheduler is None or scheduler == "ddim":
        return None
    if scheduler == "auto":
        if isinstance(model, (str, os.PathLike)) and (Path(model) / "model_index.json").is_file() \
                and (Path(model) / "scheduler").is_dir():
            return scheduler_config_from_folder(model)
        return None
    if not isinstance(scheduler, (str, os.PathLike)):
        raise UsageError(f"scheduler (--scheduler) must be 'auto', 'ddim', a diffusers scheduler folder or "
                         f"scheduler_config.json, or its contents as a dict, got {type(scheduler).__name__}")
    return scheduler_config_from_folder(scheduler)
