"""What the command line needs from the planner and config registries, as plain data.

`tcgraph transform` takes one flag per plan option, a `--plan` help listing every planner, a
`--config` choice of every registered config, and `--model` names a pretrained model or a path.
Those registries live beside torch code (`tcgraph.plan.registry`, `tcgraph.models`), and importing
them takes seconds; the parser reads this table instead, so that `--help` and usage errors answer
at once.

`table()` reads the registries once and keeps what it read in the user's cache folder
(`$XDG_CACHE_HOME/tcgraph`, else `~/.cache/tcgraph`; `TCGRAPH_CACHE_DIR` overrides it), under the
sha256 of the source files it was read from (`SOURCES`): any edit of them, or another tcgraph
installation, reads the registries again. A cache that cannot be written costs start-up time,
never a wrong flag. Nothing here imports torch until the registries are read.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent
# The files the table is read from, relative to the package: the registries and the modules
# declaring the planner configs (their fields are the plan options, their defaults the help's),
# and this one (what the table holds).
SOURCES = ("cli_table.py", "plan/registry.py", "plan/options.py", "plan/planners/*.py", "models/__init__.py",
           "models/config.py", "models/families.py")
TYPES = {"int": int, "float": float, "str": str}  # the argparse types plan options use
KEYS = ("models", "configs", "planners", "plan_help", "plan_options", "diffusers_classes")
KEEP = 8  # cached tables kept (the newest): one per edit of the sources, per installation


def source_files() -> list[Path]:
    files: list[Path] = []
    for pattern in SOURCES:
        files.extend(sorted(PACKAGE.glob(pattern)))
    return files


def fingerprint() -> str | None:
    """sha256 over the package's path and its source files' names and bytes; None where one cannot be read."""
    h = hashlib.sha256(str(PACKAGE).encode() + b"\0")
    try:
        for path in source_files():
            h.update(path.relative_to(PACKAGE).as_posix().encode() + b"\0")
            h.update(path.read_bytes())
    except OSError:
        return None
    return h.hexdigest()


def cache_dir() -> Path:
    if os.environ.get("TCGRAPH_CACHE_DIR"):
        return Path(os.environ["TCGRAPH_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tcgraph"


def cache_file(print_: str) -> Path:
    return cache_dir() / f"cli-table-{print_[:32]}.json"


def live_table() -> dict:
    """The table read from the registries (imports torch)."""
    from tcgraph.models import FAMILIES, PRETRAINED
    from tcgraph.models.config import CONFIGS
    from tcgraph.plan.options import flag_of
    from tcgraph.plan.registry import PLAN_HELP, PLANNERS, _option_help, plan_option_fields

    options = []
    for name, owners in plan_option_fields().items():
        first = owners[0][1]
        kind = first.metadata.get("type")
        if kind is not None and kind not in TYPES.values():
            raise TypeError(f"plan option {name}: argparse type {kind!r} is not one of {sorted(TYPES)}")
        options.append({"flag": flag_of(first), "dest": name, "help": _option_help(owners),
                        "type": None if kind is None else kind.__name__, "metavar": first.metadata.get("metavar"),
                        "planners": [planner for planner, _ in owners]})
    return {"models": list(PRETRAINED), "configs": list(CONFIGS), "planners": list(PLANNERS), "plan_help": PLAN_HELP,
            "plan_options": options,
            "diffusers_classes": [f.diffusers_class for f in FAMILIES.values() if f.diffusers_class]}


def _read(path: Path) -> dict | None:
    try:
        found = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return found if isinstance(found, dict) and all(k in found for k in KEYS) else None


def table() -> dict:
    """The table: from the cache while its sources are unchanged, else read from the registries (and kept)."""
    print_ = fingerprint()
    if print_ is None:
        return live_table()
    path = cache_file(print_)
    found = _read(path)
    if found is not None:
        return found
    found = live_table()
    try:
        from tcgraph.files import atomic_write_text

        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(found, indent=1))
        older = sorted(path.parent.glob("cli-table-*.json"), key=lambda p: p.stat().st_mtime, reverse=True)[KEEP:]
        for old in older:
            old.unlink()
    except Exception:  # noqa: BLE001  a cache that cannot be written is only slower
        pass
    return found
