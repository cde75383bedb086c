"""Argument checks for sampler settings and sampling runs: one place, one kind of message.

Every check raises a `UsageError` that names the parameter (and its command-line option),
the expected type or range and the value found, so that a bad argument is refused where
it enters (`SamplerSettings`, `tcgraph.api.transform`, `sample`, `sample_eager`), not deep
inside a sampler, an exporter or `torch.randn`. A bool is never taken for an int (`True`
is an int to Python, not to a user), nor a float with a fraction for an int (`10.5` steps).
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from os import PathLike

from tcgraph.errors import UsageError

# Noise for one sampling call is n x C x H x W float32, and the samples as many again; past
# this the call would end in a MemoryError (or swap) long after it started.
MAX_SAMPLE_BYTES = 4 * 2**30
FLOAT32_BYTES = 4


def _gib(n: float) -> str:
    return f"{n / 2**30:.3g} GiB"


def label(name: str, option: str | None) -> str:
    """`per_class (--per-class)`: the API name and, where it differs, the CLI option."""
    return name if option is None else f"{name} ({option})"


def integer(value, name: str, option: str | None = None, *, lo: int | None = None, hi: int | None = None,
            why: str = "") -> int:
    """`value` as an int in lo..hi; an integral float (2.0) is refused too: ints only."""
    what = label(name, option)
    rng = _range_text(lo, hi)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise UsageError(f"{what} must be an integer{rng}, got {_shown(value)}")
    value = int(value)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise UsageError(f"{what} must be an integer{rng}{why}, got {value}")
    return value


def real(value, name: str, option: str | None = None, *, lo: float | None = None, hi: float | None = None,
         why: str = "") -> float:
    """`value` as a finite number in [lo, hi] (an int is fine: guidance 2)."""
    what = label(name, option)
    rng = _range_text(lo, hi, interval=True)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise UsageError(f"{what} must be a number{rng}, got {_shown(value)}")
    if not math.isfinite(value):
        raise UsageError(f"{what} must be a finite number{rng}{why}, got {value}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise UsageError(f"{what} must be{rng}{why}, got {value}")
    return float(value)


def flag(value, name: str) -> bool:
    if not isinstance(value, bool):
        raise UsageError(f"{name} must be True or False, got {_shown(value)}")
    return value


def text(value, name: str, option: str | None = None, *, optional: bool = False) -> str | None:
    if value is None and optional:
        return None
    if not isinstance(value, str):
        raise UsageError(f"{label(name, option)} must be a string{' or None' if optional else ''}, got {_shown(value)}")
    return value


def path(value, name: str, option: str | None = None, *, optional: bool = False):
    if value is None and optional:
        return None
    if not isinstance(value, (str, PathLike)) or (isinstance(value, str) and not value):
        raise UsageError(f"{label(name, option)} must be a path (str or pathlib.Path)"
                         f"{' or None' if optional else ''}, got {_shown(value)}")
    return value


def class_ids(values, name: str = "classes", option: str | None = "--classes") -> list[int]:
    """A sequence of class ids as ints; 1.7 is not class 1, and True is not class 1 either."""
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, numbers.Integral):
            raise UsageError(f"{label(name, option)} must hold integer class ids, got {_shown(v)} in {_shown(values)}")
        out.append(int(v))
    return out


def sample_memory(count: int, channels: int, size: int, *, name: str, option: str | None, detail: str) -> None:
    """Refuse a sampling call whose noise (count x channels x size x size float32) alone passes
    `MAX_SAMPLE_BYTES`: before anything is allocated, naming the option that asked for it."""
    need = count * channels * size * size * FLOAT32_BYTES
    if need > MAX_SAMPLE_BYTES:
        per = channels * size * size * FLOAT32_BYTES
        raise UsageError(
            f"{label(name, option)}: {detail} asks for {count:,} images, whose noise alone needs {_gib(need)} "
            f"({count:,} x {channels} x {size} x {size} float32), more than the {_gib(MAX_SAMPLE_BYTES)} one call may "
            f"use; ask for at most {MAX_SAMPLE_BYTES // per:,} images per call and sample the rest with other seeds"
        )


def _range_text(lo, hi, interval: bool = False) -> str:
    if lo is not None and hi is not None:
        return f" in [{lo}, {hi}]" if interval else f" in {lo}..{hi}"
    if lo is not None:
        return f" >= {lo}"
    if hi is not None:
        return f" <= {hi}"
    return ""


def _shown(value) -> str:
    shown = repr(value)
    if len(shown) > 60:
        shown = shown[:57] + "..."
    return f"{shown} ({type(value).__name__})"


def parse_classes(spec: str | Sequence[int] | None, num_classes: int) -> list[int]:
    """`None` -> all classes; "0-9" or "1,3,5" or a list -> class ids, each checked."""
    import numpy as np
    import torch

    from tcgraph.models import check_class_ids

    if spec is None:
        ids = list(range(num_classes))
    elif isinstance(spec, str):
        ids = []
        for part in spec.split(","):
            part = part.strip()
            try:
                if "-" in part[1:]:
                    lo, hi = part.split("-", 1)
                    lo, hi = int(lo), int(hi)
                    check_class_ids([lo, hi], num_classes)  # before the range is spelled out: '0-10**12'
                    ids.extend(range(lo, hi + 1))
                else:
                    ids.append(int(part))
            except ValueError:
                raise UsageError(f"cannot read class list {spec!r}; write e.g. '0-9' or '1,3,5'") from None
    elif isinstance(spec, (bytes, dict)) or not isinstance(spec, (Sequence, np.ndarray, torch.Tensor, range)):
        raise UsageError(f"classes (--classes) must be a string such as '0-9' or '1,3,5', a sequence of class ids "
                         f"or None, got {type(spec).__name__}")
    else:
        values = spec.tolist() if isinstance(spec, (np.ndarray, torch.Tensor)) else spec
        ids = class_ids(values if isinstance(values, list) else list(values))
    if not ids:
        raise UsageError(f"no class ids in {spec!r}; this model has classes 0..{num_classes - 1}")
    return check_class_ids(ids, num_classes).tolist()


MAX_SEED = 2**32 - 1  # torch's CPU generator (mt19937) keeps the low 32 bits: larger seeds would repeat others


def seed(value) -> int:
    # Every seed in range gives its own noise; each run r of a call uses seed + 1 + r.
    return integer(value, "seed", "--seed", lo=0, hi=MAX_SEED)
