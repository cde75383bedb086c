"""Prompted-digit accuracy of the text demo model "digits-text" against guidance.

    python benchmarks/text_demo_quality.py --threads 1        # DDIM 50, 8 images per digit, guidance 1,2,4

The protocol of scripts/train_text_demo.py's docstring: eager PyTorch sampling
(`api.sample_eager`, the uncached reference every plan is compared with), DDIM with
`--steps` steps and x0 clipping, `--per-class` images of each digit of `--digits`, prompted
"a handwritten <digit>" (`digits_text.prompt_for`) with the empty prompt as negative,
seed 0, at every guidance scale of `--guidance`. Each set is judged by the digits
classifier (`eval.digits_quality`): accuracy is the share of images it reads as the
prompted digit; digits-FD is against the real test split. A row for the class-conditional
"digits" DiT (class labels instead of prompts, guidance `--dit-guidance`, the same noise,
steps and clipping) is added for comparison unless `--no-dit`.

Writes JSON (`--out`, with the command that produced it) and prints a markdown table.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from tcgraph import api
from tcgraph.eval import digits_quality
from tcgraph.sampling import SamplerSettings

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "text-demo-quality.json"


def parse_floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def parse_digits(text: str) -> list[int]:
    out = []
    for part in text.split(","):
        lo, _, hi = part.strip().partition("-")
        out += list(range(int(lo), int(hi) + 1)) if hi else [int(lo)]
    if not out or any(not 0 <= d <= 9 for d in out):
        raise SystemExit(f"--digits must name digits 0..9 (e.g. 0-9 or 1,7), got {text!r}")
    return out


def judge(model, settings: SamplerSettings, conditioning, labels: list[int], seed: int) -> dict:
    """Sample eagerly and judge: accuracy, digits-FD, per-digit accuracy, seconds."""
    from tcgraph.eval.quality import _features_and_predictions

    t0 = time.perf_counter()
    samples = api.sample_eager(model, settings, conditioning, seed=seed)
    seconds = time.perf_counter() - t0
    q = digits_quality(samples, labels)
    _, preds = _features_and_predictions(samples.clamp(-1, 1))
    y = torch.tensor(labels)
    per_digit = {str(d): float((preds[y == d] == d).float().mean()) for d in sorted(set(labels))}
    return {"accuracy": q["accuracy"], "digits_fd": q["digits_fd"], "images": q["n"],
            "per_digit_accuracy": per_digit, "sampling_s": round(seconds, 2)}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--guidance", default="1,2,4", help="comma list of guidance scales for digits-text")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--per-class", type=int, default=8, help="images per digit")
    ap.add_argument("--digits", default="0-9", help="digits to prompt for, e.g. 0-9 or 1,7")
    ap.add_argument("--template", type=int, default=0, help="prompt template (0: 'a handwritten <digit>')")
    ap.add_argument("--batch", type=int, default=40, help="images per sampling run")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dit", dest="dit", action="store_true", default=True,
                    help="also judge the class-conditional 'digits' DiT (default on)")
    ap.add_argument("--no-dit", dest="dit", action="store_false", help="leave the 'digits' DiT row out")
    ap.add_argument("--dit-guidance", type=float, default=2.0, help="guidance of the 'digits' DiT row")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (1 on a shared machine)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from tcgraph.demos.digits_text import TEMPLATES, load_prompt_encoder, prompt_for

    digits = parse_digits(args.digits)
    labels = [d for d in digits for _ in range(args.per_class)]
    guidances = parse_floats(args.guidance)
    model, encoder = api.load_dit("digits-text"), load_prompt_encoder()
    prompts = [prompt_for(d, args.template) for d in labels]
    text = encoder.encode(prompts, negative="")
    common = dict(num_steps=args.steps, batch=args.batch, resolution=model.config.input_size, clip_x0=True)
    rows = []
    for g in guidances:
        settings = SamplerSettings(cfg_scale=g, text_length=encoder.length, **common)
        row = {"model": "digits-text", "conditioning": f"prompt '{TEMPLATES[args.template]}', negative ''", "guidance": g, **judge(model, settings, text, labels, args.seed)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.dit:
        dit = api.load_dit("digits")
        settings = SamplerSettings(cfg_scale=args.dit_guidance, **{**common, "resolution": dit.config.input_size})
        row = {"model": "digits", "conditioning": "class label", "guidance": args.dit_guidance,
               **judge(dit, settings, labels, labels, args.seed)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    result = {
        "command": "python benchmarks/text_demo_quality.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "protocol": {"sampler": "ddim", "steps": args.steps, "clip_x0": True, "per_class": args.per_class,
                     "digits": digits, "images": len(labels), "template": args.template,
                     "example_prompt": prompt_for(digits[0], args.template), "negative": "", "seed": args.seed,
                     "batch": args.batch, "sampling": "eager PyTorch (api.sample_eager)",
                     "judge": "tcgraph.eval.digits_quality (accuracy: share read as the prompted digit; "
                              "digits-FD vs the real test split)"},
        "threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
        "python": sys.version.split()[0], "torch": torch.__version__,
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(format_table(result))
    print(f"\nwrote {args.out}")
    return result


def format_table(result: dict) -> str:
    p = result["protocol"]
    lines = [f"DDIM {p['steps']}, clip_x0, {p['per_class']} images per digit ({p['images']}), seed {p['seed']}, "
             f"prompt e.g. {p['example_prompt']!r}, negative ''",
             "| model | conditioning | guidance | accuracy | digits-FD | sampling s |", "|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['model']} | {r['conditioning']} | {r['guidance']:g} | {r['accuracy']:.1%} | "
                     f"{r['digits_fd']:.1f} | {r['sampling_s']:.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
