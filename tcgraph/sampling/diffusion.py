"""DiT's training noise schedule, ADM-style timestep respacing, and DDIM with guidance.

The sampler never calls the model directly: it calls a *step function*
`step_fn(step, x, t, y) -> model output` once per denoising step, so that the runtime can
run a different exported graph at each step. `step` is the index in generation order
(0 = noisiest); `t` holds the original (un-respaced) timesteps the model was trained on;
`y` is the model's conditioning: class ids, or for a text-conditioned model the tuple
(text embeddings, mask) (`tcgraph.sampling.conditioning`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np
import torch

from tcgraph.errors import TcgraphError
from tcgraph.progress import SILENT, Phase
from tcgraph.sampling.conditioning import as_inputs, model_conditioning
from tcgraph.sampling.settings import NUM_TRAIN_TIMESTEPS  # noqa: F401  (re-exported)

StepFn = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def linear_betas(num_timesteps: int = NUM_TRAIN_TIMESTEPS) -> np.ndarray:
    """DiT/ADM 'linear' schedule, scaled so any step count spans the same noise range."""
    scale = 1000 / num_timesteps
    return np.linspace(scale * 0.0001, scale * 0.02, num_timesteps, dtype=np.float64)


def space_timesteps(num_timesteps: int, section_counts: str | int | Iterable[int]) -> list[int]:
    """Timesteps kept when respacing, as ADM's `space_timesteps` (sorted ascending).

    `section_counts` is an int, a comma list such as "10,15,20" (steps per equal section),
    or "ddimN" (a fixed stride giving exactly N steps).
    """
    try:
        return _space_timesteps(num_timesteps, section_counts)
    except ValueError as e:
        raise TcgraphError(
            f"cannot read the step spec {section_counts!r} ({e}); use a step count such as 50, "
            'a comma list of counts per section such as "10,15,20", or "ddimN"'
        ) from e


def _space_timesteps(num_timesteps: int, section_counts: str | int | Iterable[int]) -> list[int]:
    if isinstance(section_counts, str) and section_counts.startswith("ddim"):
        desired = int(section_counts[len("ddim"):])
        for stride in range(1, num_timesteps):
            if len(range(0, num_timesteps, stride)) == desired:
                return list(range(0, num_timesteps, stride))
        raise TcgraphError(f"cannot make exactly {desired} steps with an integer stride out of {num_timesteps}")
    if isinstance(section_counts, int):
        counts = [section_counts]
    elif isinstance(section_counts, str):
        counts = [int(c) for c in section_counts.split(",")]
    else:
        counts = [int(c) for c in section_counts]
    size_per, extra = divmod(num_timesteps, len(counts))
    start, steps = 0, []
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if not 1 <= count <= size:
            raise TcgraphError(f"cannot take {count} steps from a section of {size} timesteps; use 1..{size}")
        stride = 1.0 if count <= 1 else (size - 1) / (count - 1)
        cur = 0.0
        for _ in range(count):
            steps.append(start + round(cur))
            cur += stride
        start += size
    return sorted(set(steps))


@dataclass
class DDIMSchedule:
    """The respaced process: per respaced index i, the original timestep and alpha-bars."""

    timesteps: np.ndarray  # (S,) original timesteps, ascending
    alphas_cumprod: np.ndarray  # (S,) float64
    alphas_cumprod_prev: np.ndarray  # (S,) float64

    @classmethod
    def make(cls, num_steps: int | str, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> "DDIMSchedule":
        base = np.cumprod(1.0 - linear_betas(num_train_timesteps))
        use = space_timesteps(num_train_timesteps, num_steps)
        # Respaced betas chain the kept alpha-bars, so alphas_cumprod[i] = base[use[i]].
        acp = base[use]
        return cls(
            timesteps=np.asarray(use, dtype=np.int64),
            alphas_cumprod=acp,
            alphas_cumprod_prev=np.append(1.0, acp[:-1]),
        )

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    def generation_order(self) -> list[int]:
        """Respaced indices in the order they are sampled: noisiest first."""
        return list(range(self.num_steps - 1, -1, -1))


def guided_eps(model_out: torch.Tensor, in_channels: int, cfg_scale: float) -> torch.Tensor:
    """Split a batched (cond, uncond) model output and apply classifier-free guidance.

    `model_out` is (2N, C_out, H, W) with the conditional half first. Guidance acts on all
    `in_channels` epsilon channels (the official sample script guides only 3 of 4; see
    the DiT repo's comment); `learn_sigma` channels beyond `in_channels` are dropped,
    since DDIM does not use the variance.
    """
    eps = model_out[:, :in_channels]
    cond, uncond = eps.chunk(2, dim=0)
    return uncond + cfg_scale * (cond - uncond)


class GuidedSteps:
    """What every sampler shares: the guidance batch of each step and the guided epsilon.

    A subclass sets `schedule` (with `timesteps` and `num_steps`), `cfg_scale`,
    `in_channels`, `null_class`, `timestep_dtype` (the dtype of the graphs' `t`) and `guidance`
    (`tcgraph.names.GUIDANCE_MODES`: "cfg" batches the halves; "input" passes `cfg_scale` to the
    model as its last input, one pass per step; "none" takes no guidance).
    `cfg_scale > 1` runs the conditional and unconditional halves in one batch of 2N
    (labels `y` then the null class, or a `Text`'s prompts then its negative prompts);
    otherwise the batch is N and purely conditional.
    """

    timestep_dtype = torch.long
    guidance = "cfg"

    @property
    def use_cfg(self) -> bool:
        return self.cfg_scale > 1.0 and self.guidance == "cfg"

    @property
    def num_steps(self) -> int:
        return self.schedule.num_steps

    def model_batch(self, batch: int) -> int:
        """Rows the model sees per step: the CFG halves are batched together."""
        return 2 * batch if self.use_cfg else batch

    def model_inputs(self, x: torch.Tensor, index: int, y) -> tuple[torch.Tensor, torch.Tensor, object]:
        """(x, t, y) as the model sees them at schedule index `index`; `y` is class ids or a `Text`
        (the model then sees the tuple (embeddings, mask))."""
        t = torch.full((x.shape[0],), self.schedule.timesteps[index].item(), dtype=self.timestep_dtype,
                       device=x.device)
        cond = model_conditioning(y, self.use_cfg, self.null_class)
        if self.guidance == "input":  # the scale as the model's last input, one value per row
            cond = (*as_inputs(cond), torch.full((x.shape[0],), self.cfg_scale, dtype=torch.float32, device=x.device))
        if self.use_cfg:
            return torch.cat([x, x]), torch.cat([t, t]), cond
        return x, t, cond

    def eps_from_output(self, model_out: torch.Tensor) -> torch.Tensor:
        """The (guided) epsilon: the first `in_channels` channels of the model output."""
        if self.use_cfg:
            return guided_eps(model_out, self.in_channels, self.cfg_scale)
        return model_out[:, : self.in_channels]


class DDIMSampler(GuidedSteps):
    """DDIM (Song et al.) over a respaced DiT schedule, with optional guidance and eta.

    `cfg_scale > 1` runs the conditional and unconditional halves in one batch of 2N
    (labels `y` then the null class); otherwise the batch is N and purely conditional.
    """

    def __init__(
        self,
        num_steps: int | str = 50,
        cfg_scale: float = 1.0,
        eta: float = 0.0,
        in_channels: int = 4,
        null_class: int = 1000,
        clip_denoised: bool = False,
        guidance: str = "cfg",
    ):
        # eta > 1 makes 1 - a_prev - sigma**2 negative at low-noise steps (complex samples).
        if not 0.0 <= eta <= 1.0:
            raise TcgraphError(f"eta must be in [0, 1] (0 = deterministic DDIM, 1 = DDPM-like), got {eta}")
        if not cfg_scale >= 1.0:
            raise TcgraphError(f"guidance scale must be >= 1 (1 = no guidance), got {cfg_scale}")
        self.schedule = DDIMSchedule.make(num_steps)
        self.cfg_scale = float(cfg_scale)
        self.eta = float(eta)
        self.in_channels = in_channels
        self.null_class = null_class
        self.clip_denoised = clip_denoised
        self.guidance = guidance

    def ddim_update(
        self, x: torch.Tensor, eps: torch.Tensor, index: int, noise: torch.Tensor | None
    ) -> torch.Tensor:
        """One DDIM step from respaced index `index` to `index - 1`."""
        s = self.schedule
        a, a_prev = float(s.alphas_cumprod[index]), float(s.alphas_cumprod_prev[index])
        x0 = (x - (1 - a) ** 0.5 * eps) / a**0.5
        if self.clip_denoised:
            x0 = x0.clamp(-1, 1)
            eps = (x - a**0.5 * x0) / (1 - a) ** 0.5
        sigma = self.eta * ((1 - a_prev) / (1 - a)) ** 0.5 * (1 - a / a_prev) ** 0.5
        mean = x0 * a_prev**0.5 + (1 - a_prev - sigma**2) ** 0.5 * eps
        if index > 0 and sigma > 0:
            mean = mean + sigma * noise
        return mean

    def sample(
        self,
        step_fn: StepFn,
        noise: torch.Tensor,
        y: torch.Tensor,
        generator: torch.Generator | None = None,
        phase: Phase = SILENT,
    ) -> torch.Tensor:
        """Denoise `noise` (N, C, H, W) for labels `y` (N,) or a `Text` of N prompts with `step_fn` at every step;
        `phase` ticks once per step."""
        x = noise
        for step, index in enumerate(self.schedule.generation_order()):
            xin, tin, yin = self.model_inputs(x, index, y)
            out = step_fn(step, xin, tin, yin)
            eps = self.eps_from_output(out)
            step_noise = None
            if self.eta > 0 and index > 0:
                step_noise = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
            x = self.ddim_update(x, eps, index, step_noise)
            phase.tick()
        return x


def model_step_fn(model: torch.nn.Module) -> StepFn:
    """The plain step function: the same eager model at every step."""

    @torch.no_grad()
    def step(_step: int, x: torch.Tensor, t: torch.Tensor, y) -> torch.Tensor:
        return model(x, t, *as_inputs(y))

    return step
