"""TokenCache (Lou et al. 2024, arXiv 2409.18523), learned data-free on one machine: the
`tokencache` and `dynamic` planners.

Three parts, as docs/design.md's TokenCache section names them; each module gives the
definitions the code and the tests follow:

- the **Cache Predictor** (input-invariant token scores, trained with the superposition
  objective) and the block probes: `tcgraph.plan.learning.predictor`;
- **adaptive block selection** and the **TPRR** schedule, from scores to recipes:
  `tcgraph.plan.learning.tprr`;
- this planner: calibrate (`tcgraph.plan.learning.common`), train the predictor, measure block
  sensitivities, then for each TPRR candidate select blocks for the FLOP target and keep
  the candidate with the lowest held-out error.

Candidates are scored with `plan.evaluate` (`speedup_of`, `plan_error`), shared with
Learning-to-Cache; partial branches run there as 0/1 token masks through `mixed_step`,
exactly the partial semantics of `passes.reference`.

`dynamic` is the same plan with every `partial(indices)` made `dynamic(k)` (`to_dynamic`):
the same schedule and token counts, the tokens chosen per sample in the graph (ToCa-style).

Branches: TokenCache prunes blocks, each by the rule of `tcgraph.plan.learning.pruning`, for
any model's layout (`ModelConfig.block_layout()`): a pruned block l takes `partial(kept)` (kept =
image-token indices among 0 … N−1, N = `ModelConfig.num_tokens`) on each of its branches that
write image rows, joint branches included (FLUX's and SD3's joint attention, FLUX's single-block
MLP: their text rows are always recomputed); a branch that writes text rows only (`mlp_text`)
computes at cache steps, the cheap part of the block; a block kept at k = 0 reuses every branch.
The Cache Predictor's one score per image token is shared by the block's image-writing branches
(DiT: attn, mlp; PixArt: attn, cross, mlp, its cross-attention row-wise in the image tokens, its
keys and values being the text). FLOPs count each branch's own rows, so the predicted speedup is
the measured cost table's. A text-conditioned model calibrates on the prompts `calibration_text`.

`dynamic(k)` goes only where `partial` was, so only on image-writing branches; a branch that reads
a stream for keys and values only (SD3's last joint attention: its input has rows its output
lacks, so the change of its input cannot choose output rows) stays `partial(kept)`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from tcgraph.calibrate import Trajectories
from tcgraph.errors import TcgraphError, UsageError
from tcgraph.models.adapter import adapter_for
from tcgraph.models.official.dit import DiT
from tcgraph.models.families import ModelConfig
from tcgraph.names import IMAGE, TEXT_STREAM
from tcgraph.plan.learning.evaluate import plan_errors, speedup_of
from tcgraph.plan.learning.common import (
    calibration_cost,
    calibration_split,
    check_learning_options,
    held_out_count,
    require_weights,
    rounds,
    rows_per_image,
    scoring_cost,
    seconds_per_row,
    selection_cost,
    training_cost,
)
from tcgraph.plan.options import (calib_images_option, compete_option, forecast_option, held_out_option,
                                  max_cache_mb_option, max_variants_option, min_psnr_option, option, tuning)
from tcgraph.plan.plan import Action, Plan, Recipe, dynamic
from tcgraph.plan.learning.select import finish_learned
from tcgraph.plan.learning.forecast import output_grams
from tcgraph.plan.learning.pruning import image_branches
from tcgraph.plan.learning.predictor import (PredictorResult, block_sensitivity, mu_unit, staleness_init,
                                            train_predictor, training_rounds)
from tcgraph.plan.learning.tprr import TPRR, floor_speedup, tprr_choices, tprr_search_space, unreachable
from tcgraph.progress import QUIET, Progress
from tcgraph.sampling import SamplerSettings
from tcgraph.sampling.conditioning import Text

DEFAULT_TARGET = 1.5
DEFAULT_MAX_VARIANTS = 8  # full step + 7 cache recipes
# Training starts from the closed-form token ranking of the output Grams (`staleness_init`); from
# there 2 epochs of 4 images per round plan as well as 8 epochs of 8 from a random start
# (benchmarks/planning_time.py), at 1/8 of the work.
DEFAULT_EPOCHS = 2
DEFAULT_BATCH_IMAGES = 4
SENSITIVITY_IMAGES = 8  # held-out images the block probes run on (the ranking of blocks is what counts)


def parse_tprr(value) -> TPRR:
    """`"b,K1,K2"` (the CLI's form) or a sequence of three ints."""
    parts = value.split(",") if isinstance(value, str) else list(value)
    try:
        out = tuple(int(p) for p in parts)
    except (TypeError, ValueError):
        raise UsageError(f"tprr must be three integers b,K1,K2, got {value!r}") from None
    if len(out) != 3:
        raise UsageError(f"tprr must be three integers b,K1,K2, got {value!r}")
    return out


@dataclass(frozen=True)
class TokenCacheConfig:
    """TokenCache: learned token pruning per block on a two-phase round-robin schedule."""

    target_speedup: float = option(None, "FLOP-predicted speedup over computing every branch at every step",
                                   type=float, default_help=str(DEFAULT_TARGET))
    tprr: TPRR | None = option(None, "TPRR schedule: a full step every K1 steps before step B, every K2 from B on",
                               type=str, parse=parse_tprr, metavar="B,K1,K2", default_help="searched")
    keep_ratio: float = option(0.5, "share of tokens the Cache Predictor learns to keep (and the sensitivity "
                               "probe keeps)", type=float)
    min_keep: float = option(0.25, "lowest keep ratio of a pruned block (0 allows reusing whole blocks)",
                             type=float)
    max_stale: int = option(2, "cache steps a round may have before round-robin rotation starts", type=int)
    max_variants: int | None = max_variants_option(DEFAULT_MAX_VARIANTS)
    calib_images: int = calib_images_option()
    held_out: int | None = held_out_option()
    epochs: int = option(DEFAULT_EPOCHS, "training epochs over the calibration rounds", type=int)
    batch_images: int = tuning(DEFAULT_BATCH_IMAGES, "images per training round")
    lr: float = tuning(0.1, "Adam learning rate of the predictor's logits")
    mu: float = tuning(10.0, "keep-ratio penalty, in units of the reuse-everything eps MSE")
    train_window: int = tuning(3, "training rounds: a full step then train_window - 1 cache steps")
    seed: int = option(0, "seed of the calibration noise, labels and training order", type=int)
    forecast: bool = forecast_option()
    compete: bool = compete_option()
    max_cache_mb: float | None = max_cache_mb_option()
    min_psnr: float | None = min_psnr_option()
    # whether the target was asked for (False: the default target, which --min-psnr alone leaves open)
    speedup_given: bool = field(default=True, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.target_speedup is None:
            object.__setattr__(self, "target_speedup", DEFAULT_TARGET)
            object.__setattr__(self, "speedup_given", False)
        if not self.target_speedup > 1.0:
            raise TcgraphError(f"target speedup must be > 1, got {self.target_speedup}")
        if self.tprr is not None:
            if len(self.tprr) != 3:
                raise TcgraphError(f"tprr is (b, K1, K2), got {self.tprr!r}")
            b, k1, k2 = self.tprr
            if b < 0 or k1 < 1 or k2 < 1:
                raise TcgraphError(f"tprr needs b >= 0 and K1, K2 >= 1, got b={b}, K1={k1}, K2={k2}")
        if not 0.0 < self.keep_ratio < 1.0:
            raise TcgraphError(f"keep ratio must be in (0, 1), got {self.keep_ratio}")
        if not 0.0 <= self.min_keep < 1.0:
            raise TcgraphError(f"min keep ratio must be in [0, 1), got {self.min_keep}")
        if self.max_stale < 1:
            raise TcgraphError(f"max_stale must be >= 1, got {self.max_stale}")
        check_learning_options(self.calib_images, self.held_out, self.max_variants, self.epochs, self.batch_images,
                               self.min_psnr)
        if self.train_window < 2 or self.mu < 0:
            raise TcgraphError("train_window must be >= 2 and mu >= 0")

    @property
    def num_held_out(self) -> int:
        return held_out_count(self.calib_images, self.held_out)


def learn_predictor(cfg: TokenCacheConfig, model: DiT, train: Trajectories, held: Trajectories,
                    progress: Progress = QUIET) -> tuple[PredictorResult, list[float]]:
    """The target-independent part: the trained Cache Predictor and the per-block sensitivities
    (probed on the first `SENSITIVITY_IMAGES` held-out images)."""
    S = train.num_steps
    with progress.phase("train predictor", cfg.epochs * (S - 1)) as phase:
        grams = train.output_grams()
        if grams is None:  # trajectories calibrated elsewhere, without them
            grams = output_grams(model, train)
        layout = model.config.block_layout()
        rows = {IMAGE: model.config.num_tokens, TEXT_STREAM: train.settings.text_length}
        init = staleness_init(grams, S, model.config.depth, image_branches(layout), cfg.keep_ratio,
                              image_rows=lambda key: layout.image_slice(*key, rows))
        pred = train_predictor(model, train, cfg.keep_ratio, cfg.mu * mu_unit(model, train),
                               window=cfg.train_window, epochs=cfg.epochs, batch_images=cfg.batch_images,
                               lr=cfg.lr, seed=cfg.seed, init=init, phase=phase)
    with progress.phase("block sensitivity", sum(1 for _, cs in rounds(S, 2) if cs)) as phase:
        sens = block_sensitivity(model, held.part(0, min(SENSITIVITY_IMAGES, held.num_images)), pred.logits,
                                 cfg.keep_ratio, phase=phase)
    return pred, sens


def learning_outline(settings: SamplerSettings, cfg: TokenCacheConfig, depth: int) -> list[tuple[str, float]]:
    """The phases of `learn_predictor` with their estimated work in model rows."""
    S, rows = settings.num_steps, rows_per_image(settings)
    batch = min(cfg.batch_images, cfg.calib_images - cfg.num_held_out)
    probe_rows = min(SENSITIVITY_IMAGES, cfg.num_held_out) * rows
    probes = sum(2 + (depth + 1) / 2 for _, cs in rounds(S, 2) if cs)  # two full steps, then block l on from l
    return [("train predictor", cfg.epochs * training_cost(training_rounds(S, cfg.train_window), batch * rows)),
            ("block sensitivity", probes * probe_rows)]


def reachable(model_config: ModelConfig, num_steps: int, candidates: list[TPRR], cfg: TokenCacheConfig,
              text_length: int = 0) -> int:
    """The TPRR candidates within the variant cap that reach the target with every block at the floor:
    the ones the search will score (block selection may still skip some)."""
    return sum(1 for tp in candidates if floor_speedup(model_config, num_steps, tp, cfg.min_keep, cfg.max_stale,
                                                      cfg.max_variants, text_length) >= cfg.target_speedup)


def plan_outline(settings: SamplerSettings, cfg: TokenCacheConfig, depth: int, candidates: int,
                 calibrate: bool) -> list[tuple[str, float]]:
    """The phases of a tokencache plan with their estimated work in model rows."""
    steps = [("calibrate", calibration_cost(settings, cfg.calib_images))] if calibrate else []
    steps += learning_outline(settings, cfg, depth)
    steps.append(("TPRR search", scoring_cost(settings.num_steps, cfg.num_held_out * rows_per_image(settings),
                                              candidates)))
    steps.append(("choose by sampling runs", selection_cost(settings)))
    return steps


def make_tokencache(cfg: TokenCacheConfig, model_config: ModelConfig, settings: SamplerSettings, *,
                    weights: DiT | None = None, progress: Progress = QUIET, traj: Trajectories | None = None,
                    learned: tuple[PredictorResult, list[float]] | None = None, finish: bool = True,
                    calibration_text: Text | None = None) -> Plan:
    """The tokencache planner: calibrate, train the Cache Predictor, measure block
    sensitivities, pick the TPRR schedule and the block keep counts for the target, then
    `select.finish_learned` (forecasting where it helps, the final choice by whole sampling
    runs against the fixed-interval plans); see the module docstring.

    `traj` and `learned` (from `learn_predictor` on the same trajectories and keep ratio) let
    benchmarks plan several targets from one calibration and one predictor. `finish=False`
    returns the TPRR plan itself (what `dynamic` turns into per-sample token choices).
    `calibration_text`: the prompts a text-conditioned model calibrates on."""
    model = require_weights(weights, model_config, "a TokenCache plan")
    mcfg = model.config
    S, n, depth, length = settings.num_steps, mcfg.num_tokens, mcfg.depth, settings.text_length
    if S < 2:
        raise TcgraphError(f"TokenCache needs at least 2 steps, got {S}; sample with more steps")
    target = cfg.target_speedup
    # out-of-reach targets and impossible schedules are refused before the expensive part
    candidates = tprr_search_space(mcfg, S, target, min_keep=cfg.min_keep, max_stale=cfg.max_stale,
                                   max_variants=cfg.max_variants, tprr=cfg.tprr, text_length=length)
    if finish:
        outline = plan_outline(settings, cfg, depth, reachable(mcfg, S, candidates, cfg, length), traj is None)
        if learned is not None:
            outline = [st for st in outline if st[0] not in ("train predictor", "block sensitivity")]
        progress = progress.outline(outline, f"plan tokencache:{target}x", seconds_per_row(model, settings))
    train, held = calibration_split(model, settings, cfg, traj, progress, calibration_text, grams=True)
    pred, sens = learned if learned is not None else learn_predictor(cfg, model, train, held, progress)
    scores = pred.logits

    choices = tprr_choices(mcfg, scores, sens, target, candidates, min_keep=cfg.min_keep, max_stale=cfg.max_stale,
                           max_variants=cfg.max_variants, text_length=length)
    table, found = [], []
    scored = [c for c in choices if c.skipped is None]
    with progress.phase("TPRR search", S) as phase:
        errors = iter(plan_errors(model, held, [c.recipes for c in scored], phase=phase))
    for c in choices:
        row = {"b": c.tprr[0], "K1": c.tprr[1], "K2": c.tprr[2]}
        if c.skipped is not None:
            table.append({**row, "skipped": c.skipped})
        else:
            err = next(errors)
            table.append({**row, "keep": c.keep, "predicted_speedup": round(c.predicted_speedup, 4),
                          "held_out_error": err, "variants": len(set(c.recipes))})
            found.append((err, c.tprr, c.keep, c.recipes))
    if not found:
        raise unreachable(mcfg, S, target, cfg.min_keep, cfg.max_stale, cfg.max_variants, cfg.tprr,
                          text_length=length)
    err, tp, keep, recipes = min(found, key=lambda c: c[0])
    w = pred.weights()[1:]
    params = {
        "method": "tokencache",
        "b": tp[0], "K1": tp[1], "K2": tp[2],
        "tprr_given": cfg.tprr is not None,
        "target_speedup": target,
        "predicted_speedup": round(speedup_of(mcfg, recipes, length), 4),
        "keep_counts": keep,
        "keep_ratios": [round(k / n, 4) for k in keep],
        "pruned_blocks": [l for l in range(depth) if keep[l] < n],
        "sensitivity": sens,
        "held_out_error": err,
        "keep_ratio": cfg.keep_ratio,
        "min_keep": cfg.min_keep,
        "max_stale": cfg.max_stale,
        "max_variants": cfg.max_variants,
        "predictor": {"mu": pred.mu, "mean_weight": round(w.mean().item(), 4), "epochs": cfg.epochs,
                      "final_train_loss": pred.history[-1] if pred.history else None,
                      "first_train_loss": pred.history[0] if pred.history else None, "lr": cfg.lr,
                      "train_window": cfg.train_window,
                      "shared_by": _shared_by(mcfg)},
        "calibration": {"images": cfg.calib_images, "held_out": cfg.num_held_out, "seed": cfg.seed,
                        "batch_images": cfg.batch_images},
        "search": table,
    }
    if not finish:
        return Plan(f"tokencache:{target}x", settings, recipes, n, params=params, layout=mcfg.block_layout())
    return finish_learned(model, train, held, f"tokencache:{target}x", recipes, params, forecast=cfg.forecast,
                          max_cache_mb=cfg.max_cache_mb, max_variants=cfg.max_variants,
                          compete=cfg.compete, min_psnr=cfg.min_psnr, speedup_given=cfg.speedup_given,
                          progress=progress)


def _shared_by(cfg: ModelConfig) -> str:
    """Which branches of a block share the Cache Predictor's token set, for the plan's record."""
    layout = cfg.block_layout()
    if layout.is_default:  # DiT, PixArt: as their plans always said
        names = cfg.branches
        return "both branches of a block" if len(names) == 2 else \
            f"all {len(names)} branches of a block ({', '.join(names)})"
    kinds = " / ".join(", ".join(names) for names in dict.fromkeys(image_branches(layout)))
    text = list(dict.fromkeys(br for block in layout.blocks for br, streams in block if IMAGE not in streams))
    return (f"the image-writing branches of a block ({kinds})"
            + (f"; {', '.join(text)} (text rows only) {'computes' if len(text) == 1 else 'compute'} at cache steps"
               if text else ""))


def keys_only_branches(model: DiT) -> frozenset[tuple[int, str]]:
    """(block, branch) of the branches that read a stream for keys and values only (SD3's last joint
    attention), where a `dynamic` action cannot choose output rows (`tcgraph.compile` refuses it)."""
    adapter = adapter_for(model)
    return frozenset((l, spec.name) for l, (_, kind) in enumerate(adapter.block_table(model))
                     for spec in kind.branches if spec.reads_only)


def to_dynamic(plan: Plan, static: frozenset[tuple[int, str]] = frozenset()) -> Plan:
    """The same plan with each `partial(indices)` made `dynamic(k)`: the same schedule and token
    counts, but the tokens chosen per sample in the graph (ToCa-style), for comparison at the
    same compute (plus the score, 2·N·D per branch). Only partial branches change, so only branches
    that write image rows; the (block, branch) pairs of `static` (`keys_only_branches`) stay partial."""

    def swap(l: int, br: str, a: Action) -> Action:
        return dynamic(a.k) if a.kind == "partial" and (l, br) not in static else a

    recipes = tuple(Recipe(tuple(tuple(swap(l, br, a) for br, a in zip(r.block_branches(l), acts))
                                 for l, acts in enumerate(r.actions)), r.branches) for r in plan.recipes)
    params = {**plan.params, "token_choice": "dynamic: per-sample TopK of the branch-input change"}
    kept = sorted(static & {(l, br) for r in plan.recipes for l, br, a in r.items() if a.kind == "partial"})
    if kept:
        params["static_tokens"] = [f"block {l} {br}: reads a stream for keys and values only" for l, br in kept]
    return Plan(plan.planner.replace("tokencache", "dynamic", 1), plan.settings, recipes, plan.num_tokens, params,
                layout=plan.layout)


def make_dynamic(cfg: TokenCacheConfig, model_config: ModelConfig, settings: SamplerSettings, *,
                 weights: DiT | None = None, progress: Progress = QUIET,
                 traj: Trajectories | None = None, calibration_text: Text | None = None) -> Plan:
    """The dynamic planner: `to_dynamic` of the tokencache plan for `cfg` (its TPRR plan, without
    forecasting or the final choice among fixed plans: those are made for static tokens)."""
    if cfg.min_psnr is not None:
        raise UsageError("--min-psnr chooses among plans sampled on held-out images; the dynamic planner makes "
                         "no such choice: drop --min-psnr, or use tokencache")
    if weights is not None and settings.num_steps >= 2:  # (the checks are make_tokencache's)
        candidates = tprr_search_space(model_config, settings.num_steps, cfg.target_speedup, min_keep=cfg.min_keep,
                                       max_stale=cfg.max_stale, max_variants=cfg.max_variants, tprr=cfg.tprr,
                                       text_length=settings.text_length)
        outline = plan_outline(settings, cfg, model_config.depth,
                               reachable(model_config, settings.num_steps, candidates, cfg, settings.text_length),
                               traj is None)[:-1]
        progress = progress.outline(outline, f"plan dynamic:{cfg.target_speedup}x", seconds_per_row(weights, settings))
    plan = make_tokencache(cfg, model_config, settings, weights=weights, progress=progress, traj=traj,
                           finish=False, calibration_text=calibration_text)
    return to_dynamic(plan, keys_only_branches(weights))
