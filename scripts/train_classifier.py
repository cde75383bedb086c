"""Train the digits classifier used for class accuracy and Fréchet distance; writes the committed weights.

    python scripts/train_classifier.py      # about a minute on one CPU thread

Fixed seed and epoch count, one thread, so the run is reproducible on one machine.
Trains on digits_split()["train"] with random shifts of up to `--shift` pixels (the
digits are centred, generated ones need not be exactly), Adam with a cosine schedule,
and reports accuracy on the held-out digits_split()["test"], which it never trains on.
Writes tcgraph/eval/weights/digits_classifier.safetensors and a .json beside it.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from tcgraph.data import digits_split
from tcgraph.eval.classifier import WEIGHTS_PATH, DigitsClassifier

BACKGROUND = -1.0  # the digits' background value in [-1, 1]


def random_shift(x: torch.Tensor, max_shift: int, g: torch.Generator) -> torch.Tensor:
    """Shift each image by an integer offset in [-max_shift, max_shift]^2, filling with background."""
    if max_shift == 0:
        return x
    n, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4, value=BACKGROUND)  # (N, 1, H + 2s, W + 2s)
    dy = torch.randint(0, 2 * max_shift + 1, (n,), generator=g)
    dx = torch.randint(0, 2 * max_shift + 1, (n,), generator=g)
    rows = (dy[:, None] + torch.arange(h)[None, :])[:, None, :, None].expand(n, 1, h, w + 2 * max_shift)
    cropped = padded.gather(2, rows)  # (N, 1, H, W + 2s)
    cols = (dx[:, None] + torch.arange(w)[None, :])[:, None, None, :].expand(n, 1, h, w)
    return cropped.gather(3, cols)  # (N, 1, H, W)


@torch.no_grad()
def accuracy(model: DigitsClassifier, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return float((model.predict(x) == y).float().mean())


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--weight-decay", type=float, default=1e-4)
    ap.add_argument("--shift", type=int, default=1, help="max random shift in pixels (0 = no augmentation)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=WEIGHTS_PATH)
    args = ap.parse_args(argv)
    print(f"config: {json.dumps({k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()})}")

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    split = digits_split()
    x_train, y_train = split["train"]
    x_test, y_test = split["test"]
    model = DigitsClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    g = torch.Generator().manual_seed(args.seed)
    steps_per_epoch = math.ceil(len(x_train) / args.batch)
    total = args.epochs * steps_per_epoch

    t0 = time.time()
    step = 0
    for epoch in range(args.epochs):
        model.train()
        perm = torch.randperm(len(x_train), generator=g)
        loss_sum = 0.0
        for i in range(0, len(x_train), args.batch):
            idx = perm[i:i + args.batch]
            x = random_shift(x_train[idx], args.shift, g)
            lr = args.lr * 0.5 * (1 + math.cos(math.pi * step / total))
            for group in opt.param_groups:
                group["lr"] = lr
            loss = F.cross_entropy(model(x), y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += loss.item() * len(idx)
            step += 1
        if epoch % 5 == 0 or epoch == args.epochs - 1:
            print(f"epoch {epoch:3d}/{args.epochs}  loss {loss_sum / len(x_train):.4f}  "
                  f"train acc {accuracy(model, x_train, y_train):.4f}  {time.time() - t0:5.1f}s", flush=True)

    model.eval()
    test_acc = accuracy(model, x_test, y_test)
    info = {"heldout_accuracy": round(test_acc, 6), "n_test": len(x_test),
            "train_accuracy": round(accuracy(model, x_train, y_train), 6), "n_train": len(x_train),
            "seed": args.seed, "epochs": args.epochs, "batch": args.batch, "lr": args.lr,
            "weight_decay": args.weight_decay, "shift": args.shift, "torch": torch.__version__,
            "seconds": round(time.time() - t0, 1)}

    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(tmp), metadata={k: str(v) for k, v in info.items()})
    tmp.chmod(0o644)  # safetensors writes 0600; the committed file should be world-readable
    tmp.replace(args.out)
    meta_path = args.out.with_suffix(".json")
    meta_tmp = meta_path.with_suffix(".json.tmp")
    meta_tmp.write_text(json.dumps(info, indent=2) + "\n")
    meta_tmp.replace(meta_path)
    print(json.dumps(info))
    return info


if __name__ == "__main__":
    main()
