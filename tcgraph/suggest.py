""""Did you mean …?" for names a user types: commands, flags, plan and model names, folders.

Close names are found with difflib (the ratio of matching characters), among the names that are
valid there; a folder that does not exist is matched against the entries of the nearest folder
above it that does. Nothing here imports torch.
"""
from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Iterable

CUTOFF = 0.6  # difflib's default: 'digts' finds 'digits', 'fora' finds 'fora', 'xyz' finds nothing


def close_names(word: str, choices: Iterable[str], n: int = 3, cutoff: float = CUTOFF) -> list[str]:
    """Up to `n` of `choices` closest to `word`, best first (case-insensitive)."""
    choices = list(dict.fromkeys(choices))
    by_lower: dict[str, str] = {}
    for c in choices:
        by_lower.setdefault(c.lower(), c)
    return [by_lower[m] for m in difflib.get_close_matches(word.lower(), list(by_lower), n=n, cutoff=cutoff)]


def did_you_mean(word: str, choices: Iterable[str], n: int = 3) -> str:
    """`"did you mean 'fora'?"`, `"did you mean 'a' or 'b'?"`, or "" when nothing is close."""
    found = close_names(word, choices, n)
    if not found:
        return ""
    quoted = [repr(f) for f in found]
    return "did you mean " + (quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " or " + quoted[-1]) + "?"


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()
    except OSError:  # a link to itself
        return False


def _entries(folder: Path, folders_only: bool) -> list[str]:
    try:
        with os.scandir(folder) as it:
            return [e.name for e in it if not e.name.startswith(".") and (not folders_only or _is_dir(e))]
    except OSError:
        return []


def close_paths(path: str | os.PathLike, folders_only: bool = False, n: int = 3) -> list[str]:
    """Existing paths close to a path that does not exist: its first missing part is replaced by
    close entries of the folder that holds it (`tcgraph-out/digts-fora2` -> `tcgraph-out/digits-fora2`,
    `tcgraph-ot/digits-fora2` -> `tcgraph-out/digits-fora2` when that exists)."""
    path = Path(path)
    parts = path.parts
    base = Path(parts[0]) if path.is_absolute() else Path(".")
    start = 1 if path.is_absolute() else 0
    for i in range(start, len(parts)):
        here = base / parts[i]
        if os.path.lexists(here):
            base = here
            continue
        rest = parts[i + 1:]
        last = not rest
        found = []
        for name in close_names(parts[i], _entries(base, folders_only or not last), n=20):
            candidate = base.joinpath(name, *rest)  # the rest of the path must exist below it
            if os.path.lexists(candidate) and (not folders_only or candidate.is_dir()):
                found.append(str(candidate))
        return found[:n]
    return []


def did_you_mean_path(path: str | os.PathLike, folders_only: bool = False) -> str:
    """`"did you mean tcgraph-out/digits-fora2?"` or "" (see `close_paths`)."""
    found = close_paths(path, folders_only)
    return "did you mean " + " or ".join(found) + "?" if found else ""
