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

import numpy as np
import torch

from tcgraph.errors import TcgraphError, UsageError
from tcgraph.progress import SILENT, Phase
from tcgraph.sampling.diffusion import GuidedSteps, StepFn
from tcgraph.sampling.scheduler_config import (  # noqa: F401  (re-exported)
    SCHEDULER_CONFIG,
    SCHEDULER_FOLDER,
    CLASS_KEY,
    SUPPORTED_SCHEDULERS,
    STOCHASTIC_SCHEDULERS,
    check_scheduler_config,
    check_scheduler_values,
    timestep_dtype,
)


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
    (FLUX), comes from `num_tokens` as FLUX's pipeline computes it; `sigmas`, where given, are the
    ones the model's pipeline sets the timesteps with (FluxPipeline: 1 down to 1/S).
    """

    def __init__(self, config: dict, num_steps: int, cfg_scale: float = 1.0, in_channels: int = 4,
                 null_class: int = 1000, num_tokens: int | None = None, guidance: str = "cfg",
                 sigmas: list[float] | None = None):
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
        self._sigmas = None if sigmas is None else [float(s) for s in sigmas]
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
        steps = {"num_inference_steps": self.num_inference_steps} if self._sigmas is None else {"sigmas": self._sigmas}
        scheduler.set_timesteps(device=device, **steps, **({} if self._mu is None else {"mu": self._mu}))
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
    for tcgraph's DDIM: "auto" takes a diffusers pipeline folder's own `scheduler/` (and the
    digits-flux demo's, of its name or folder)."""
    if isinstance(scheduler, dict):
        return scheduler
    if scheduler is None or scheduler == "ddim":
        return None
    if scheduler == "auto":
        from tcgraph.demos.digits_flux import scheduler_folder_for

        demo = scheduler_folder_for(model)  # the digits-flux demo's own scheduler/
        if demo is not None:
            return scheduler_config_from_folder(demo)
        if isinstance(model, (str, os.PathLike)) and (Path(model) / "model_index.json").is_file() \
                and (Path(model) / "scheduler").is_dir():
            return scheduler_config_from_folder(model)
        return None
    if not isinstance(scheduler, (str, os.PathLike)):
        raise UsageError(f"scheduler (--scheduler) must be 'auto', 'ddim', a diffusers scheduler folder or "
                         f"scheduler_config.json, or its contents as a dict, got {type(scheduler).__name__}")
    return scheduler_config_from_folder(scheduler)
