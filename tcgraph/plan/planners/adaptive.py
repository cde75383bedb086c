"""`adaptive`: every step gated (docs/design.md, "Gated steps"; the gate: `tcgraph.plan.gate`), the
threshold calibrated on calibration noise to a target *measured* compute fraction.

The plan is one gated variant for every step: the first `warmup` steps and the last `final` ones
compute (their threshold is below 0), the others skip their later blocks where the indicator stays
under the threshold. With a base plan (`base`: `adaptive_base`), a computing step runs the base's recipe
at that step (its first F blocks computing), so a plan has one gated variant per distinct base recipe,
and the warm-up grows until the base has computed every later branch order + 1 times (`params["warmup"]`,
the asked one in `params["warmup_given"]`).
The compute fraction is the share of block work a run does, each step's block FLOPs over all blocks'
(`adaptive_base.step_work`): without a base and for blocks of equal cost,
`(computed steps · L + skipped steps · F) / (steps · L)` for L blocks of which F always compute: a
skipped step still runs its first F blocks. To calibrate, the planner samples from random noise and
labels (a text-conditioned model: the calibration prompts) with an eager loop that keeps the gate's
state as the graph does (`EagerGate`), and bisects
the threshold (log scale) until the measured fraction is the target's. The decision is taken per
batch, so the fraction a run measures depends on the batch it samples: the plan records the
calibrated fraction and the range a run may measure (all skips its gates allow … all computed).

Any family the adapters describe takes it: a model of several streams (FLUX, SD3) forms the indicator
from the image stream out of block F - 1, its text-only branches reuse or forecast like the others.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from tcgraph.errors import TcgraphError
from tcgraph.models.adapter import run_blocks
from tcgraph.models.families import ModelConfig
from tcgraph.names import IMAGE
from tcgraph.plan.learning.common import check_calibration_text
from tcgraph.plan.gate import FORCE_COMPUTE, INDICATORS, Gate, lagrange_weights, uniform_work, work_range
from tcgraph.plan.options import option
from tcgraph.plan.planners.adaptive_base import base_plan, base_warmup, computing_paths, step_work
from tcgraph.plan.plan import COMPUTE, MAX_HISTORY, Plan
from tcgraph.progress import QUIET, Progress
from tcgraph.sampling import SamplerSettings, run_batches, sampler_for
from tcgraph.sampling.conditioning import Text

EPS = 1e-12


@dataclass(frozen=True)
class AdaptiveConfig:
    """Gated steps: the first F blocks always compute; the others reuse or forecast while the
    accumulated change of the first blocks' output stays under a threshold calibrated to a target
    measured compute fraction."""

    fraction: float = option(0.35, "target measured compute fraction (share of block work, 0..1)", type=float)
    first: int = option(1, "blocks that always compute; the indicator is formed from their output", type=int)
    max_skips: int = option(4, "most steps skipped in a row", type=int)
    indicator: str = option("step", f"indicator: {' or '.join(INDICATORS)}", type=str)
    order: int = option(1, f"cheap action: 0 reuse, n forecast from n + 1 points (0..{MAX_HISTORY - 1})", type=int)
    warmup: int = option(3, "first steps that always compute (over a base: more where a skip needs them)", type=int)
    final: int = option(1, "last steps that always compute", type=int)
    threshold: float | None = option(None, "a given threshold instead of calibrating one", type=float,
                                     default_help="calibrated to --fraction")
    base: str | None = option(None, "a plan whose recipe each computing step runs: a spec made for the same model "
                              "and settings (l2c:2, fora:2) or a plan JSON file", type=str,
                              default_help="every branch computes")
    calib_images: int = option(16, "calibration images (random noise and labels)", type=int)
    seed: int = option(0, "seed of the calibration noise and labels", type=int)

    def __post_init__(self) -> None:
        Gate(self.first, self.max_skips, self.indicator, self.order)  # one error for a bad gate
        if not 0.0 < self.fraction <= 1.0:
            raise TcgraphError(f"adaptive fraction must be in (0, 1], got {self.fraction}")
        if self.warmup < self.order + 1 or self.final < 0 or self.calib_images < 1:
            raise TcgraphError(f"adaptive needs warmup >= order + 1 = {self.order + 1} (the forecast's history), "
                               f"final >= 0 and calib_images >= 1; got warmup {self.warmup}, final {self.final}, "
                               f"calib_images {self.calib_images}")


class EagerGate:
    """A sampler step function: the gated plan run eagerly, the gate's state kept as the graph keeps it.
    `paths`: each step's gated recipe (`adaptive_base.computing_paths`; None: every branch computes);
    `work`: each step's (computing, skipping) share of block work (None: 1 and first / depth)."""

    def __init__(self, model: nn.Module, gate: Gate, thresholds, depth: int, paths=None, work=None):
        self.model, self.gate, self.thresholds, self.depth = model, gate, list(thresholds), depth
        self.paths = paths
        self.work = list(work) if work is not None else uniform_work(gate, depth, len(self.thresholds))
        self.computed_total = self.skipped_total = 0
        self.done = 0.0  # block work of the steps run, each step's share
        self.reset()

    def reset(self) -> None:
        # per later branch: the values it computed at its last computing steps and those steps, newest first
        self.ref, self.acc, self.skips, self.times, self.history = None, 0.0, 0, {}, {}

    @torch.no_grad()
    def __call__(self, step: int, x, t, y):
        gate, seen = self.gate, {}
        state = {}

        def after(l, hs):
            if l == gate.first - 1:
                seen["h"] = hs[IMAGE]

        def branch(l, name, u, fn):
            if l < gate.first:
                return fn(u())
            if "skip" not in state:
                state["skip"] = self._decide(step, seen["h"])
            key = (l, name)
            if state["skip"]:
                w = lagrange_weights(self.times[key], float(step))
                return sum(wj * hj for wj, hj in zip(w, self.history[key]))
            action = self.paths[step].action(l, name) if self.paths is not None else COMPUTE
            if action.kind != "compute":  # the base reuses (1 point) or forecasts it: from its own history
                n = action.points or 1
                w = lagrange_weights(self.times[key][:n], float(step))
                return sum(wj * hj for wj, hj in zip(w, self.history[key][:n]))
            value = fn(u())
            self.history[key] = [value] + self.history.get(key, [])[:gate.points - 1]
            self.times[key] = [float(step)] + self.times.get(key, [])[:gate.points - 1]
            return value

        out = run_blocks(self.model, x, t, y, branch, after_block=after)
        self.done += self.work[step][1 if state.get("skip") else 0]
        if state.get("skip"):
            self.skipped_total += 1
        else:
            self.computed_total += 1
        return out

    def _decide(self, step: int, h: torch.Tensor) -> bool:
        ref = torch.zeros_like(h) if self.ref is None else self.ref
        change = float((h - ref).abs().mean() / ref.abs().mean().clamp_min(EPS))
        indicator = change if self.gate.indicator == "anchor" else self.acc + change
        skip = indicator < self.thresholds[step] and self.skips < self.gate.max_skips
        if skip:
            self.acc, self.skips = indicator, self.skips + 1
            if self.gate.indicator == "step":
                self.ref = h
        else:
            self.acc, self.skips, self.ref = 0.0, 0, h
        return skip

    def fraction(self) -> float:
        """Share of block work done so far: a computing step does its path's, a skipped one its first blocks'."""
        return self.done / max(self.computed_total + self.skipped_total, 1)


def thresholds_for(settings: SamplerSettings, cfg: AdaptiveConfig, threshold: float) -> tuple[float, ...]:
    steps = settings.num_steps
    return tuple(FORCE_COMPUTE if s < cfg.warmup or s >= steps - cfg.final else float(threshold)
                 for s in range(steps))


def fraction_range(settings: SamplerSettings, cfg: AdaptiveConfig, depth: int, work=None) -> tuple[float, float]:
    """(least, most) compute fraction a run of the plan may measure: every skip its gates allow, or none
    (`work`: each step's (computing, skipping) share, `step_work`; None: 1 and first / depth)."""
    work = work if work is not None else uniform_work(Gate(cfg.first, cfg.max_skips), depth, settings.num_steps)
    return work_range(work, thresholds_for(settings, cfg, 0.0), cfg.max_skips)


def measure(model: nn.Module, settings: SamplerSettings, cfg: AdaptiveConfig, gate: Gate, threshold: float,
            text: Text | None = None, paths=None, work=None) -> float:
    """The compute fraction the gated plan measures on the calibration noise at `threshold`; a
    text-conditioned model is conditioned on `text` (its prompts cycled to the calibration images);
    `paths` and `work` as `EagerGate` takes them."""
    mc = model.config
    g = torch.Generator().manual_seed(cfg.seed)  # labels, then noise, as tcgraph.calibrate draws them:
    if getattr(mc, "text_conditioned", False):
        if text is None:
            raise TcgraphError("adaptive calibrates a text-conditioned model on prompts: give calibration embeddings "
                               "(calibration_text=, --calibration-embeddings FILE), or a threshold (--threshold)")
        labels = text.repeat_to(cfg.calib_images)
    else:
        labels = torch.randint(0, mc.num_classes, (cfg.calib_images,), generator=g).tolist()  # not a sampling run's
    noise = torch.randn(cfg.calib_images, mc.in_channels, settings.resolution, settings.resolution, generator=g)
    eager = EagerGate(model.eval(), gate, thresholds_for(settings, cfg, threshold), mc.depth, paths, work)
    run_batches(eager, eager.reset, sampler_for(settings, mc), labels, noise, settings.batch, cfg.seed)
    return eager.fraction()


def calibrate_threshold(model: nn.Module, settings: SamplerSettings, cfg: AdaptiveConfig, gate: Gate,
                        progress: Progress = QUIET, rounds: int = 9, text: Text | None = None, paths=None,
                        work=None) -> tuple[float, float]:
    """(threshold, measured fraction): bisection in log threshold over [1e-3, 10] for the target fraction,
    the measured fraction nearest it."""
    lo, hi = math.log(1e-3), math.log(1e1)
    best = None
    with progress.phase("calibrate threshold", rounds) as phase:
        for _ in range(rounds):
            mid = (lo + hi) / 2
            got = measure(model, settings, cfg, gate, math.exp(mid), text, paths, work)
            if best is None or abs(got - cfg.fraction) < abs(best[1] - cfg.fraction):
                best = (math.exp(mid), got)
            if got > cfg.fraction:
                lo = mid  # computes too much: a higher threshold skips more
            else:
                hi = mid
            phase.tick(f"threshold {math.exp(mid):.4g}: fraction {got:.3f}")
    return best


def make_adaptive(cfg: AdaptiveConfig, model_config: ModelConfig, settings: SamplerSettings, *,
                  weights: nn.Module | None = None, progress: Progress = QUIET, calibration_text=None,
                  make_plan=None) -> Plan:
    """The adaptive plan; `make_plan` makes a base given as a spec (the registry passes its own)."""
    depth = model_config.depth
    if cfg.first >= depth:
        raise TcgraphError(f"adaptive first={cfg.first} leaves none of the model's {depth} blocks to skip")
    gate = Gate(cfg.first, cfg.max_skips, cfg.indicator, cfg.order)
    base = None
    if cfg.base is not None:
        base = base_plan(cfg.base, model_config, settings, weights=weights, progress=progress,
                         calibration_text=calibration_text, make_plan=make_plan)
    given = cfg.warmup  # over a base, lengthened until every later branch computed what a skip reads
    cfg = dataclasses.replace(cfg, warmup=base_warmup(base, gate, cfg.warmup, settings.num_steps, cfg.final))
    paths = computing_paths(base, gate, thresholds_for(settings, cfg, 0.0), model_config)
    work = step_work(model_config, paths, cfg.first, settings.text_length)
    least, most = fraction_range(settings, cfg, depth, work)
    if cfg.threshold is None:
        if weights is None:
            raise TcgraphError("adaptive needs the model's weights to calibrate its threshold (or give one: "
                               "--threshold)")
        check_calibration_text(model_config, calibration_text, "an adaptive threshold")
        over = f" over the base {base.planner}" if base is not None else ""
        if cfg.fraction < least - 1e-9:
            raise TcgraphError(f"adaptive fraction {cfg.fraction} is below the least this gate can measure{over}, "
                               f"{least:.3f} ({cfg.warmup} warm-up and {cfg.final} final steps compute, at most "
                               f"{cfg.max_skips} skips in a row, {cfg.first} of {depth} blocks always compute)")
        if cfg.fraction > most + 1e-9:
            raise TcgraphError(f"adaptive fraction {cfg.fraction} is above the most this gate can measure{over}, "
                               f"{most:.3f} (every step computing its base recipe)")
        threshold, measured = calibrate_threshold(weights, settings, cfg, gate, progress, text=calibration_text,
                                                  paths=paths, work=work)
    else:
        threshold, measured = cfg.threshold, None
    params = {"fraction": cfg.fraction, "first": cfg.first, "max_skips": cfg.max_skips, "indicator": cfg.indicator,
              "order": cfg.order, "warmup": cfg.warmup, "final": cfg.final, "threshold": threshold,
              "calibrated_fraction": measured, "fraction_range": [round(least, 6), round(most, 6)],
              "calib_images": cfg.calib_images, "seed": cfg.seed, "step_work": [[c, k] for c, k in work]}
    name = f"adaptive:{cfg.fraction:g}"
    if base is not None:
        params["base"] = {"name": base.planner, "spec": cfg.base, "params": base.params}
        name += f"+{base.planner}"
        if cfg.warmup != given:
            params["warmup_given"] = given
    return Plan(name, settings, tuple(paths), model_config.num_tokens, params=params, carry_constants=False,
                gate_thresholds=thresholds_for(settings, cfg, threshold), layout=model_config.block_layout())
