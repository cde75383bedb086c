"""Train the FLUX-architecture demo model ("digits-flux") on scikit-learn's digits; writes its folder.

    python scripts/train_flux_demo.py                       # 80 minutes of training, then the summary
    python scripts/train_flux_demo.py --minutes 10 --out /tmp/digits-flux   # a short trial run
    nice -n 10 python scripts/train_flux_demo.py --threads 1   # on a shared machine

A diffusers FluxTransformer2DModel of `tcgraph.demos.digits_flux.SIZES` (16x16 grey digits packed
2x2 into 64 image tokens, 2 double-stream + 4 single-stream blocks, hidden 128, 4 heads of 32 with
RoPE, a guidance embedding: FLUX.1-dev's form) and the `PooledPromptEncoder` (the text demo's T5
stand-in, its pooled embedding the mean of the prompt's tokens), learned together with flow
matching: x_s = (1 - s) x0 + s noise, s uniform in (0, 1), the model (timestep s) predicts the
velocity noise - x0, as diffusers' FlowMatchEulerDiscreteScheduler integrates it. Each image is
captioned by a random template of its digit ("a handwritten seven", "the digit 7", ...), replaced
by the empty prompt with probability --prompt-dropout. AdamW, warmup then cosine decay over the
budget (--minutes and/or --steps, whichever ends first; warmup over 100 steps or 5 % of
the budget, the shorter), an EMA of the weights (what is saved).

Why this demo should follow its prompts where the PixArt text demo (51 % at guidance 2) did not:
1. the prompt reaches every block's modulation: the pooled embedding goes through FLUX's
   `text_embedder` into the timestep embedding, which sets every block's shift, scale and gate,
   the way the "digits" DiT reads its class label (100 %); PixArt reads text only through
   cross-attention. The text path starts variance-preserving (`init_text_path`, as in
   scripts/train_text_demo.py), so the prompt is a sizeable part of the conditioning from step 1;
2. guidance is trained into the model (guidance distillation without a teacher, "model
   guidance"): FLUX.1-dev reads the guidance scale g as an input, one pass per step. From
   --guided-from of the budget on, a share --guided-share of the prompted rows draw g uniform in
   [1, --max-guidance] and learn the target v + (g - 1) (v(x, c) - v(x, "")), the two velocities
   the model's own at g = 1 (no gradient). Its expectation is the CFG-guided velocity at scale g;
   the other rows (g = 1) keep the conditional and unconditional velocities anchored. Each guided
   row costs one extra forward pass (no backward) of two rows: with its prompt and with "".
The log prints the loss and the "cond gap", mean |v(prompt) - v("")| of the EMA at s = 0.7 on
fixed noise (a run that ignores its prompts shows early).

The summary (printed, and kept as train_info.json): the final loss, and the prompted-digit
accuracy and digits-FD at guidance 1 and at --guidance (tcgraph transform's default, 2), judged
by the digits classifier the other demos use (tcgraph.eval): --eval-per-digit images of "a
handwritten <digit>" per digit, sampled by tcgraph's own sampler with the folder's scheduler
(--eval-steps Euler steps), as `tcgraph sample` runs it.

Writes --out (default tcgraph/models/weights/digits_flux/: transformer/, text_encoder/,
scheduler/, train_info.json; safetensors only) all at once: a new folder replaces the old one
only when complete.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

from tcgraph.data import digits_split
from tcgraph.demos.digits_flux import (LENGTH, SCHEDULER, SCHEDULER_DIR, SCHEDULER_FILE, SIZES, PooledPromptEncoder,
                                       demo_config)
from tcgraph.demos.digits_text import ENCODER_DIR, PROMPTS, TEMPLATES, TRANSFORMER_DIR

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the text demo's script, beside this one
from train_text_demo import publish  # noqa: E402

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "tcgraph" / "models" / "weights" / "digits_flux"
HEAD = 32  # head width: heads = width / 32, RoPE axes 8 + 12 + 12
WARMUP_SHARE = 0.05  # the learning rate warms up over --warmup steps or this share of the budget, the shorter


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=80.0, help="training time budget (default 80; 0: none)")
    ap.add_argument("--steps", type=int, default=0, help="training step budget (0: none; both: whichever ends first)")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=100, help="warmup steps (at most 5 %% of the budget)")
    ap.add_argument("--ema-max", type=float, default=0.995)
    ap.add_argument("--prompt-dropout", type=float, default=0.1, help="share of images captioned by the empty prompt")
    ap.add_argument("--guided-share", type=float, default=0.5, help="share of prompted rows trained with g > 1")
    ap.add_argument("--guided-from", type=float, default=0.2, help="share of the budget before any row has g > 1")
    ap.add_argument("--max-guidance", type=float, default=4.0)
    ap.add_argument("--width", type=int, default=SIZES["hidden_size"], help="hidden width, a multiple of 32")
    ap.add_argument("--double", type=int, default=SIZES["depth"] - SIZES["single_depth"], help="double-stream blocks")
    ap.add_argument("--single", type=int, default=SIZES["single_depth"], help="single-stream blocks")
    ap.add_argument("--guidance", type=float, default=2.0, help="the guidance the summary judges (besides 1)")
    ap.add_argument("--eval-per-digit", type=int, default=10, help="images per digit the summary judges (0: none)")
    ap.add_argument("--eval-steps", type=int, default=50, help="sampling steps of the summary (transform's default)")
    ap.add_argument("--log-every", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--threads", type=int, default=2, help="torch threads; 1 on a shared machine")
    args = ap.parse_args(argv)
    if args.minutes <= 0 and args.steps <= 0:
        ap.error("give a budget: --minutes or --steps")
    if args.width % HEAD or args.width <= 0:
        ap.error(f"--width must be a positive multiple of {HEAD}")
    return args


@torch.no_grad()
def init_text_path(model) -> None:
    """Variance-preserving init of the text path: the sequence's and the pooled embedding's projections."""
    emb = model.time_text_embed.text_embedder
    for layer, gain in ((model.context_embedder, 1.0), (emb.linear_1, 1.0), (emb.linear_2, 2.0)):
        layer.weight.normal_(0, (gain / layer.in_features) ** 0.5)
        layer.bias.zero_()


class Velocity:
    """diffusers' forward of a FluxTransformer2DModel on [B, C, H, W] images (packed and unpacked as the
    tcgraph wrapper does, `tcgraph.models.diffusers.flux`), sigma s in [0, 1] and guidance g."""

    def __init__(self, config):
        from tcgraph.models.diffusers.flux import image_ids

        self.grid = config.input_size // 2
        self.img_ids, self.txt_ids = image_ids(self.grid), torch.zeros(LENGTH, 3)

    def __call__(self, model, x, s, seq, pooled, g):
        from tcgraph.models.diffusers.flux import pack, unpack

        out = model(hidden_states=pack(x, self.grid), encoder_hidden_states=seq, pooled_projections=pooled,
                    timestep=s, img_ids=self.img_ids, txt_ids=self.txt_ids, guidance=g, return_dict=False)[0]
        return unpack(out, self.grid)


def progress(step: int, elapsed: float, args) -> float:
    """Share of the budget used: steps or minutes, whichever is further along."""
    return max(step / args.steps if args.steps > 0 else 0.0, elapsed / (60 * args.minutes) if args.minutes > 0 else 0.0)


def train(args, config):
    """(EMA model, EMA encoder, losses, steps, seconds) of one run."""
    from diffusers import FluxTransformer2DModel

    from tcgraph.models.diffusers.flux_config import flux_kwargs

    torch.manual_seed(args.seed)
    x_train, y_train = digits_split()["train"]
    model = FluxTransformer2DModel(**flux_kwargs(config)).train()
    init_text_path(model)
    encoder = PooledPromptEncoder().train()
    ema, ema_encoder = copy.deepcopy(model).eval(), copy.deepcopy(encoder).eval()
    params = [*model.parameters(), *encoder.parameters()]
    ema_params = [*ema.parameters(), *ema_encoder.parameters()]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    velocity = Velocity(config)
    g = torch.Generator().manual_seed(args.seed)

    ids_mask = [encoder.tokenize(list(PROMPTS[d]), LENGTH) for d in range(10)]  # [10 digits, T templates, L]
    prompt_ids, prompt_mask = torch.stack([i for i, _ in ids_mask]), torch.stack([m for _, m in ids_mask])
    empty_ids, empty_mask = encoder.tokenize([""], LENGTH)
    probe_x = torch.randn(20, 1, config.input_size, config.input_size, generator=torch.Generator().manual_seed(1))
    probe_s, probe_g = torch.full((20,), 0.7), torch.ones(20)
    probe = prompt_ids[torch.arange(20) % 10, 0], prompt_mask[torch.arange(20) % 10, 0]
    probe_null = empty_ids.expand(20, -1), empty_mask.expand(20, -1)

    t0, losses, step, done = time.time(), [], 0, 0.0
    while done < 1.0:
        warm = max((step + 1) / args.warmup, done / WARMUP_SHARE)  # --warmup steps or 5 % of the budget
        lr = args.lr * min(1.0, warm) * 0.5 * (1 + math.cos(math.pi * done))
        for group in opt.param_groups:
            group["lr"] = lr
        idx = torch.randint(0, len(x_train), (args.batch,), generator=g)
        x0, y = x_train[idx], y_train[idx]
        template = torch.randint(0, len(TEMPLATES), (args.batch,), generator=g)
        drop = torch.rand(args.batch, generator=g) < args.prompt_dropout
        ids = torch.where(drop[:, None], empty_ids, prompt_ids[y, template])
        mask = torch.where(drop[:, None], empty_mask, prompt_mask[y, template])
        s = torch.rand(args.batch, generator=g)
        noise = torch.randn(x0.shape, generator=g)
        xs = (1 - s.view(-1, 1, 1, 1)) * x0 + s.view(-1, 1, 1, 1) * noise
        target = noise - x0
        guided = (torch.rand(args.batch, generator=g) < args.guided_share) & ~drop
        scale = torch.where(guided, 1 + torch.rand(args.batch, generator=g) * (args.max_guidance - 1), 1.0)
        if done < args.guided_from:  # the conditional and unconditional velocities first
            guided, scale = torch.zeros_like(guided), torch.ones(args.batch)
        seq, pooled = encoder.embed(ids, mask)
        if guided.any():  # the model's own guided velocity at g = 1, no gradient: the distillation target
            k = guided.nonzero().flatten()
            with torch.no_grad():
                null_seq, null_pooled = encoder.embed(empty_ids.expand(len(k), -1), empty_mask.expand(len(k), -1))
                both = velocity(model, xs[k].repeat(2, 1, 1, 1), s[k].repeat(2), torch.cat([seq[k].detach(), null_seq]),
                                torch.cat([pooled[k].detach(), null_pooled]), torch.ones(2 * len(k)))
                cond, uncond = both.chunk(2)
            target = target.index_add(0, k, (scale[k] - 1).view(-1, 1, 1, 1) * (cond - uncond))
        loss = (velocity(model, xs, s, seq, pooled, scale) - target).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        decay = min(args.ema_max, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, pm in zip(ema_params, params):
                pe.mul_(decay).add_(pm.detach(), alpha=1 - decay)
        losses.append(loss.item())
        step += 1
        elapsed = time.time() - t0
        done = progress(step, elapsed, args)
        if step % args.log_every == 1 or done >= 1.0:
            with torch.no_grad():  # mean |v(prompt) - v("")|: how much the prompt matters
                gap = (velocity(ema, probe_x, probe_s, *ema_encoder.embed(*probe), probe_g)
                       - velocity(ema, probe_x, probe_s, *ema_encoder.embed(*probe_null), probe_g)).abs().mean()
            eta = elapsed / max(done, 1e-9) - elapsed
            print(f"step {step:5d}  loss {np.mean(losses[-50:]):.4f}  cond gap {gap:.4f}  lr {lr:.2e}  "
                  f"{elapsed:6.0f}s  {100 * min(done, 1):5.1f}%  eta {eta:5.0f}s", flush=True)
    return ema, ema_encoder, losses, step, time.time() - t0


def evaluate(folder: Path, args) -> dict:
    """Prompted-digit accuracy and digits-FD of the saved model at guidance 1 and --guidance."""
    from tcgraph.api import sample_eager
    from tcgraph.demos.digits_flux import load_digits_flux
    from tcgraph.eval.quality import digits_quality
    from tcgraph.sampling.settings import SamplerSettings

    model, encoder = load_digits_flux(folder)
    digits = [d for d in range(10) for _ in range(args.eval_per_digit)]
    text = encoder.encode([PROMPTS[d][0] for d in digits], negative=None)
    out = {}
    for scale in sorted({1.0, float(args.guidance)}):
        settings = SamplerSettings(sampler="diffusers", scheduler=SCHEDULER, num_steps=args.eval_steps,
                                   cfg_scale=scale, batch=min(len(digits), 100), resolution=model.config.input_size,
                                   text_length=LENGTH, guidance="input", pooled=True)
        with torch.no_grad():
            samples = sample_eager(model, settings, text, seed=args.seed)
        q = digits_quality(samples, digits)
        out[f"guidance {scale:g}"] = {"accuracy": round(q["accuracy"], 4), "digits_fd": round(q["digits_fd"], 2)}
    return out


def write_folder(out: Path, ema, ema_encoder, config, info: dict) -> None:
    """The demo folder, written beside `out` and moved into place when complete."""
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    ema.save_pretrained(str(tmp / TRANSFORMER_DIR), safe_serialization=True)
    cfg_path = tmp / TRANSFORMER_DIR / "config.json"
    cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), "sample_size": config.input_size},
                                   indent=2) + "\n")
    ema_encoder.save(tmp / ENCODER_DIR)
    (tmp / SCHEDULER_DIR).mkdir()
    (tmp / SCHEDULER_DIR / SCHEDULER_FILE).write_text(json.dumps(SCHEDULER, indent=2) + "\n")
    (tmp / "train_info.json").write_text(json.dumps(info, indent=2) + "\n")
    publish(tmp, out)


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    config = demo_config(hidden_size=args.width, num_heads=args.width // HEAD, depth=args.double + args.single,
                         single_depth=args.single)
    print(f"digits-flux: {args.double} double + {args.single} single blocks, width {args.width}; budget "
          f"{args.minutes:g} min / {args.steps or '-'} steps; writing {args.out}", flush=True)
    ema, ema_encoder, losses, steps, seconds = train(args, config)
    info = {"steps": steps, "seconds": round(seconds, 1), "final_loss": round(float(np.mean(losses[-100:])), 5),
            "first_loss": round(float(np.mean(losses[:50])), 5),
            **{k: getattr(args, k) for k in ("minutes", "batch", "lr", "warmup", "ema_max", "prompt_dropout",
                                             "guided_share", "guided_from", "max_guidance", "width", "double",
                                             "single", "seed", "threads")}}
    write_folder(args.out, ema, ema_encoder, config, info)
    if args.eval_per_digit > 0:
        t0 = time.time()
        info["eval"] = {"per_digit": args.eval_per_digit, "steps": args.eval_steps, "prompt": "a handwritten <digit>",
                        **evaluate(args.out, args), "seconds": round(time.time() - t0, 1)}
        (args.out / "train_info.json").write_text(json.dumps(info, indent=2) + "\n")
    print(json.dumps(info), flush=True)
    return info


if __name__ == "__main__":
    main()
