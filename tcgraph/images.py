"""What `sample` writes: samples as uint8 images, a PNG grid and a .npy array, each written atomically
(`tcgraph.files.atomic_write`), and the output paths checked before sampling starts."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from tcgraph.errors import UsageError


def to_images(samples: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> (N, H, W, 3 or 1) uint8; latents show their first channels."""
    x = samples.detach().float().clamp(-1, 1)
    x = x[:, :3] if x.shape[1] >= 3 else x[:, :1]
    return ((x + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def save_grid(samples: torch.Tensor, path: str | Path, nrow: int, scale: int = 4, pad: int = 2,
              choose: str = "choose another --png") -> Path:
    """A PNG grid with `nrow` images per row (one row per class when sampled per class),
    written atomically (`tcgraph.files.atomic_write`)."""
    from PIL import Image

    from tcgraph.files import atomic_write

    imgs = to_images(samples)
    n, h, w, c = imgs.shape
    rows = math.ceil(n / nrow)
    grid = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), 255, dtype=np.uint8)
    for i, img in enumerate(imgs):
        r, col = divmod(i, nrow)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + col * (w + pad): pad + col * (w + pad) + w] = img
    pil = Image.fromarray(grid[..., 0] if c == 1 else grid)
    pil = pil.resize((pil.width * scale, pil.height * scale), Image.NEAREST)
    return atomic_write(path, lambda f: pil.save(f, format="PNG"), choose=choose)


def save_npy(path: str | Path, array: np.ndarray, choose: str = "choose another --npy") -> Path:
    from tcgraph.files import atomic_write

    return atomic_write(path, lambda f: np.save(f, array), choose=choose)


def checked_outputs(png: str | Path | None, npy: str | Path | None) -> tuple[Path | None, Path | None]:
    """The output files of `sample`, refused now (not after sampling) where they could not be
    written: a folder's name, a file on the way, a folder that cannot be written, a name too long."""
    from tcgraph.files import check_output_file

    png = None if png is None else check_output_file(png, "choose another --png")
    npy = None if npy is None else check_output_file(npy, "choose another --npy")
    if png is not None and npy is not None and png.absolute() == npy.absolute():
        raise UsageError(f"--png and --npy both name {png}; give each its own file")
    return png, npy
