"""What one inference request asks for, checked, and what it means.

The model's inputs (docs/design.md, "Serving"), Triton's batch dimension first (one row per image):

    CLASSES  INT64 [n, 1]  the class id of each image
    SEED     INT64 [n, 1]  the request's seed, the same on every row, in 0..2^32-1

A request with CLASSES l_1 … l_n and SEED s returns exactly the images of
`tcgraph sample ART --seed s` whose labels are l_1 … l_n: `--classes 3 --per-class 4` is
CLASSES [3, 3, 3, 3], `--classes 1,3 --per-class 1` is [1, 3]. The seed is carried on every
row because Triton batches every input along its first dimension; rows that disagree are
refused (send one request per seed), and so are seeds outside 0..2^32-1, which `sample`
refuses too (`tcgraph.api.MAX_SEED`: torch's generator keeps the low 32 bits, so a larger or
negative seed would silently repeat another's images). `check_request` returns a `Request` or raises
`BadRequest` with a one-line message that the model sends back as the Triton error.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

CLASSES = "CLASSES"
SEED = "SEED"
IMAGES = "IMAGES"


class BadRequest(ValueError):
    """A request the model refuses; its message goes back to the client as is."""


@dataclass(frozen=True)
class Request:
    labels: tuple[int, ...]
    seed: int

    @property
    def count(self) -> int:
        return len(self.labels)


def check_request(classes, seed, *, num_classes: int, max_images: int) -> Request:
    """Check the two input arrays of one request (as numpy arrays; None = missing)."""
    classes = int_column(classes, CLASSES)
    seeds = int_column(seed, SEED)
    n = classes.shape[0]
    if n == 0:
        raise BadRequest(f"{CLASSES} is empty: ask for at least one image (one class id per row)")
    if n > max_images:
        raise BadRequest(f"{CLASSES} asks for {n} images, more than the {max_images} one request may hold "
                         f"(the model's max_batch_size); split it into several requests")
    if seeds.shape[0] != n:
        raise BadRequest(f"{SEED} has {seeds.shape[0]} rows and {CLASSES} {n}: give the seed on every row")
    bad = [int(c) for c in classes if not 0 <= int(c) < num_classes]
    if bad:
        raise BadRequest(f"unknown class id {bad[0]}" + (f" (and {len(bad) - 1} more)" if len(bad) > 1 else "")
                         + f": this model has {num_classes} classes, valid ids are 0..{num_classes - 1}")
    distinct = np.unique(seeds)
    if distinct.size != 1:
        raise BadRequest(f"{SEED} must be the same on every row of a request (one request = one seed), got "
                         f"{distinct.size} different values; send one request per seed")
    return Request(labels=tuple(int(c) for c in classes), seed=check_seed(int(distinct[0])))


def check_seed(seed: int) -> int:
    """A request's seed, in the range `tcgraph sample --seed` takes (every seed its own noise)."""
    from tcgraph.api import MAX_SEED

    if not 0 <= seed <= MAX_SEED:
        raise BadRequest(f"{SEED} must be in 0..{MAX_SEED} (the seeds `tcgraph sample --seed` takes: torch's "
                         f"generator keeps only the low 32 bits, so {seed} would repeat another seed's images), "
                         f"got {seed}")
    return seed


def int_column(array, name: str) -> np.ndarray:
    """An INT64 array of shape [n, 1] (or [n]) as a flat [n] array, or BadRequest."""
    if array is None:
        raise BadRequest(f"input {name} is missing: send {CLASSES} and {SEED}, both INT64 of shape [n, 1]")
    array = np.asarray(array)
    if array.dtype != np.int64:
        raise BadRequest(f"input {name} must be INT64, got {array.dtype}")
    if array.ndim == 2 and array.shape[1] == 1:
        return array[:, 0]
    if array.ndim == 1:
        return array
    raise BadRequest(f"input {name} must have shape [n, 1] (one row per image), got {list(array.shape)}")
