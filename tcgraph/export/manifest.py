"""The manifest format: its schema, the hash of the model config, and the checks that
`write_artifact` and `load_artifact` share.

A folder `load_artifact` would refuse is never written, so both call the same checks: the
model config is a DiT config, the plan a tcgraph plan for that model, and the plan's
schedule runs exactly the exported variants. Errors name the file (or the folder being
written) and say what to do.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

from tcgraph.errors import TcgraphError
from tcgraph.export.onnx import file_sha256
from tcgraph.export.specs import REDO
from tcgraph.models.dit import DiTConfig
from tcgraph.plan.plan import Plan

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
PLAN = "plan.json"


def config_hash(model_config: dict) -> str:
    """sha256 of the canonical JSON of a model config (sorted keys, no spaces)."""
    text = json.dumps(model_config, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()


def model_config_of(raw, where: str, todo: str) -> DiTConfig:
    if isinstance(raw, DiTConfig):
        return raw
    try:
        return DiTConfig(**raw)
    except (TypeError, ValueError, ZeroDivisionError, TcgraphError) as e:
        raise TcgraphError(f"{where}: the model config is not a DiT config ({e}); {todo}") from None


def plan_of(raw, where: str, todo: str) -> Plan:
    if isinstance(raw, Plan):
        return raw
    if not isinstance(raw, dict):
        raise TcgraphError(f"{where}: the plan is {type(raw).__name__}, not a tcgraph plan; {todo}")
    try:
        return Plan.from_dict(raw)
    except (TcgraphError, AttributeError, TypeError, KeyError, ValueError) as e:
        raise TcgraphError(f"{where}: the plan cannot be read ({e}); {todo}") from None


def check_agree(plan: Plan, config: DiTConfig, variant_ids: Sequence[str], where: str, todo: str) -> None:
    """The plan is for this model, and its schedule names exactly these variants."""
    if (plan.depth, plan.num_tokens) != (config.depth, config.num_tokens):
        raise TcgraphError(
            f"{where}: the plan is for {plan.depth} blocks x {plan.num_tokens} tokens, but the model config has "
            f"{config.depth} blocks x {config.num_tokens} tokens; {todo}"
        )
    scheduled = list(dict.fromkeys(plan.schedule()))
    if len(set(variant_ids)) != len(variant_ids) or set(variant_ids) != set(scheduled):
        raise TcgraphError(
            f"{where}: the variants are {list(variant_ids)}, but the plan's schedule runs {scheduled}; {todo}"
        )


def check_schema(manifest, root: Path) -> None:
    version = manifest.get("schema_version") if isinstance(manifest, dict) else None
    if isinstance(version, bool) or not isinstance(version, int):
        raise TcgraphError(f"{root / MANIFEST} has no integer schema_version; it was not written by tcgraph; {REDO}")
    if version < 1:
        raise TcgraphError(f"{root / MANIFEST} has schema_version {version}, but artifact schemas start at 1; the "
                           f"manifest is damaged or not written by tcgraph; {REDO}")
    if version > SCHEMA_VERSION:
        raise TcgraphError(
            f"{root} was written by a newer tcgraph (artifact schema {version}, "
            f"tcgraph {manifest.get('tcgraph_version', '?')}); this tcgraph reads schema {SCHEMA_VERSION} and older: "
            "upgrade tcgraph (pip install -U tcgraph) or re-run `tcgraph transform` with this version"
        )


def check_files(root: Path, files: dict[str, str], verify_hashes: bool) -> None:
    """Every listed file lies inside the folder and exists; with `verify_hashes`, has its sha256."""
    resolved_root = root.resolve()
    for rel, expected in files.items():
        file = (root / rel).resolve()
        if resolved_root not in file.parents:
            raise TcgraphError(f"manifest.json lists {rel!r}, which lies outside {root}; the manifest is damaged; {REDO}")
        if not file.is_file():
            raise TcgraphError(f"missing file: {rel} in {root}; the folder is damaged (incomplete copy?); {REDO}")
        if verify_hashes:
            found = file_sha256(file)
            if found != expected:
                raise TcgraphError(
                    f"hash mismatch: {rel} in {root} (expected sha256 {str(expected)[:12]}…, found {found[:12]}…, "
                    f"{file.stat().st_size} bytes); the file was edited or truncated: the folder is damaged, {REDO}"
                )


def read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TcgraphError(f"cannot read {path}: {e}; the artifact folder is damaged; {REDO}") from e
