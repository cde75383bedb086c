"""The manifest format: its schema, the hash of the model config, and the checks that
`write_artifact` and `load_artifact` share.

A folder `load_artifact` would refuse is never written, so both call the same checks: the
model config is one of a registered family, the plan a tcgraph plan for that model, the plan's
schedule runs exactly the exported variants, and the block table (`tcgraph.export.blocks`:
where the model's blocks are) has the model's blocks with the plan's branches. Errors name the
file (or the folder being written) and say what to do.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

from tcgraph.errors import TcgraphError
from tcgraph.files import file_sha256
from tcgraph.export.blocks import BlockTable, old_manifest_table
from tcgraph.export.specs import REDO
from tcgraph.models.families import ModelConfig, config_from_dict
from tcgraph.plan.plan import Plan

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
PLAN = "plan.json"


def config_hash(model_config: dict) -> str:
    """sha256 of the canonical JSON of a model config (sorted keys, no spaces)."""
    text = json.dumps(model_config, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()


def model_config_of(raw, where: str, todo: str) -> ModelConfig:
    if not isinstance(raw, dict) and hasattr(raw, "to_dict"):  # already typed
        return raw
    try:
        return config_from_dict(raw)
    except (TypeError, ValueError, ZeroDivisionError, TcgraphError) as e:
        raise TcgraphError(f"{where}: the model config is not one tcgraph can build ({e}); {todo}") from None


def plan_of(raw, where: str, todo: str) -> Plan:
    if isinstance(raw, Plan):
        return raw
    if not isinstance(raw, dict):
        raise TcgraphError(f"{where}: the plan is {type(raw).__name__}, not a tcgraph plan; {todo}")
    try:
        return Plan.from_dict(raw)
    except (TcgraphError, AttributeError, TypeError, KeyError, ValueError) as e:
        raise TcgraphError(f"{where}: the plan cannot be read ({e}); {todo}") from None


def check_agree(plan: Plan, config: ModelConfig, variant_ids: Sequence[str], where: str, todo: str) -> None:
    """The plan is for this model, and its schedule names exactly these variants."""
    if (plan.depth, plan.num_tokens) != (config.depth, config.num_tokens):
        raise TcgraphError(
            f"{where}: the plan is for {plan.depth} blocks x {plan.num_tokens} tokens, but the model config has "
            f"{config.depth} blocks x {config.num_tokens} tokens; {todo}"
        )
    if plan.settings.resolution != config.input_size:
        raise TcgraphError(
            f"{where}: the plan is for resolution {plan.settings.resolution}, but the model config has input size "
            f"{config.input_size}; {todo}"
        )
    scheduled = list(dict.fromkeys(plan.schedule()))
    if not variant_ids:
        raise TcgraphError(f"{where}: lists no variants, but the plan's schedule runs {scheduled}; {todo}")
    if len(set(variant_ids)) != len(variant_ids) or set(variant_ids) != set(scheduled):
        older = (" (a text-conditioned artifact made before tcgraph carried the text's keys and values from the "
                 "first step lacks that step's own variant)" if plan.constant_keys() and
                 len(scheduled) == len(variant_ids) + 1 else "")
        raise TcgraphError(
            f"{where}: the variants are {list(variant_ids)}, but the plan's schedule runs {scheduled}{older}; {todo}"
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


def inside_folder(root: Path, rel: str, what: str = "manifest.json lists") -> Path:
    """`root / rel`, refused with the real cause where it would leave the folder: an absolute path or
    `..` (a damaged manifest), a link loop, or a link to somewhere outside (a copy made with links)."""
    parts = Path(rel).parts
    if not isinstance(rel, str) or not rel or Path(rel).is_absolute() or ".." in parts:
        raise TcgraphError(f"{what} {rel!r}, a path outside the artifact folder {root}; the manifest is damaged; "
                           f"{REDO}")
    path = root / rel
    try:
        resolved_root, resolved = root.resolve(), path.resolve()
    except (RuntimeError, OSError) as e:  # a loop of links: RuntimeError on Python 3.11-3.12, OSError later
        raise TcgraphError(f"{rel} in {root} is a loop of symbolic links ({e}); replace it with the file itself "
                           f"(copy the folder again without links), or {REDO}") from None
    if resolved != resolved_root and resolved_root not in resolved.parents:
        raise TcgraphError(f"{rel} in {root} is a link to {resolved}, outside the artifact folder; tcgraph reads "
                           "only files inside an artifact folder: copy the folder with its files (cp -rL), or "
                           f"{REDO}")
    return path


def check_files(root: Path, files: dict[str, str], verify_hashes: bool) -> None:
    """Every listed file lies inside the folder and exists; with `verify_hashes`, has its sha256."""
    for rel, expected in files.items():
        file = inside_folder(root, rel)
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


#################################################################################
#               Variant I/O and the parameter map against the model             #
#################################################################################


def _cache_key(name: str) -> tuple[int, str] | None:
    """(block, branch) of `cache.<l>.<branch>`, `….in`, a history entry `….h<j>` or a run constant
    (`cache.<l>.cross.k`); None if malformed."""
    from tcgraph.names import BRANCH_ORDER, CACHE_PREFIX, INPUT_SUFFIX, history_index, is_constant
    from tcgraph.plan.plan import MAX_HISTORY

    if is_constant(name):
        name = name.rpartition(".")[0]
    name, j = history_index(name)
    if j >= MAX_HISTORY:
        return None
    body = name[len(CACHE_PREFIX):]
    if body.endswith(INPUT_SUFFIX):
        body = body[: -len(INPUT_SUFFIX)]
    block, _, branch = body.partition(".")
    if not block.isdigit() or branch not in BRANCH_ORDER:
        return None
    return int(block), branch


def check_variant_io(plan: Plan, config: ModelConfig, variants: Sequence, where: str, todo: str) -> None:
    """Every variant's graph I/O as the plan's settings and the model config fix it (docs/design.md,
    "Graph interface of a variant"): `x` [B, C, H, W], `t` and `y` [B] (a text-conditioned model:
    `encoder_hidden_states` [B, L, D_text] and `encoder_attention_mask` [B, L] for `y`), `out` [B, C_out, H, W],
    each cache `cache.<l>.<branch>` (`….in`, history `….h<j>`) [B, N, D] with l a block of the
    model, each run constant `cache.<l>.cross.k`/`.v` [B, L, D], where B is the model batch (2x with guidance), `forecast.w` 1-D (one weight per history
    point it reads); and every cache a variant reads is written by some variant (a history
    entry by the writes of its branch's cache). A manifest edited to another model (its hash updated to match) fails here, since
    the ONNX files it lists keep the shapes they were exported with."""
    from tcgraph.names import FORECAST_WEIGHTS, GATE_PARAMS, OUT, history_index, is_cache, is_gate
    from tcgraph.plan.plan import MAX_HISTORY

    s = plan.settings
    b, side = s.model_batch, s.resolution
    declared = config.family.graph_inputs(config, s)  # the family declares the model inputs
    model_inputs = tuple(i.name for i in declared)
    expected = {**{i.name: i.shape for i in declared}, OUT: config.family.graph_output_shape(config, s)}
    written = {o.name for v in variants for o in v.outputs}
    for v in variants:
        if tuple(v.input_names[: len(model_inputs)]) != model_inputs or v.output_names[:1] != (OUT,):
            raise TcgraphError(
                f"{where}: variant {v.id} has inputs {list(v.input_names)} and outputs {list(v.output_names)}; every "
                f"variant reads {', '.join(model_inputs)} first and writes {OUT} first; {todo}")
        for kind, specs in (("input", v.inputs), ("output", v.outputs)):
            for spec in specs:
                if is_cache(spec.name):
                    key = _cache_key(spec.name)
                    if key is None or key[0] >= config.depth:
                        raise TcgraphError(
                            f"{where}: variant {v.id} has {kind} {spec.name}, not a cache of this model's "
                            f"{config.depth} blocks; {todo}")
                    want = plan.cache_shape(spec.name, config.hidden_size)
                elif is_gate(spec.name) and plan.gate is not None and (spec.name != GATE_PARAMS or kind == "input"):
                    want = plan.gate_shape(spec.name, config.hidden_size)
                elif spec.name == FORECAST_WEIGHTS and kind == "input":
                    limit = len(plan.branches) * config.depth * MAX_HISTORY  # every branch forecast from the longest history
                    want = tuple(spec.shape) if len(spec.shape) == 1 and 1 <= spec.shape[0] <= limit else (f"1..{limit}",)
                elif spec.name in expected and (kind == "output") == (spec.name == OUT):
                    want = expected[spec.name]
                else:
                    raise TcgraphError(f"{where}: variant {v.id} has an unknown {kind} {spec.name!r}; {todo}")
                if tuple(spec.shape) != want and is_gate(spec.name):  # an older gate state, not another model
                    raise TcgraphError(
                        f"{where}: variant {v.id} {kind} {spec.name} has shape {list(spec.shape)}, but this version's "
                        f"gated steps give it {list(want)} (gate.times: one row of steps per later branch, gate.count:"
                        f" steps and work, gate.params: 5 values); the artifact was made by an older tcgraph: "
                        f"transform the model again ({REDO})")
                if tuple(spec.shape) != want:
                    raise TcgraphError(
                        f"{where}: variant {v.id} {kind} {spec.name} has shape {list(spec.shape)}, but the plan "
                        f"(batch {s.batch}{', x2 with guidance' if b != s.batch else ''}, resolution {side}) and the "
                        f"model config ({config.depth} blocks, hidden {config.hidden_size}, {config.num_tokens} "
                        f"tokens) give {list(want)}; {todo}")
        unread = [n for n in v.input_names if is_cache(n) and history_index(n)[0] not in written]
        if unread:
            raise TcgraphError(f"{where}: variant {v.id} reads {unread}, which no variant writes; {todo}")


def check_parameters(parameters: Sequence, variants: Sequence, config: ModelConfig, blocks: BlockTable, where: str,
                     todo: str) -> None:
    """The parameter map holds exactly the state dict of a model with `config` (names and shapes),
    and no variant reads the weights of a block the model does not have (`blocks`: where its
    blocks are)."""
    want = config.family.state_dict_shapes(config)
    if parameters is not None:
        have = {p.name: tuple(p.shape) for p in parameters}
        missing = [k for k in want if k not in have]
        extra = [k for k in have if k not in want]
        other = [f"{k} {list(have[k])} vs {list(want[k])}" for k in want if k in have and have[k] != want[k]]
        if missing or extra or other:
            parts = [f"{len(missing)} missing (e.g. {', '.join(missing[:3])})" if missing else "",
                     f"{len(extra)} not in the model (e.g. {', '.join(extra[:3])})" if extra else "",
                     f"{len(other)} with other shapes (e.g. {', '.join(other[:3])})" if other else ""]
            raise TcgraphError(
                f"{where}: the parameter map does not fit the model config ({config.depth} blocks, hidden "
                f"{config.hidden_size}): {'; '.join(p for p in parts if p)}; {todo}")
    # Initializer names are the model's parameter names where export could tell (else `const.<hash>`):
    # one under a block container past the blocks it holds is a block the model does not have.
    for v in variants:
        foreign = [n for n in v.external_initializers if blocks.is_foreign(n)]
        if foreign:
            raise TcgraphError(
                f"{where}: variant {v.id} reads weights {foreign[:3]} of blocks that a model with this config "
                f"({', '.join(f'{k.count} blocks in {k.container}' for k in blocks.kinds)}) does not have; {todo}")


def blocks_of(raw, config: ModelConfig, plan: Plan, where: str, todo: str) -> BlockTable:
    """The manifest's block table (`raw`, None where the folder predates it: its family's table),
    checked against the model config's depth and the plan's branches."""
    if raw is None:
        table = old_manifest_table(config.family.name, config.depth)
        if table is None:
            raise TcgraphError(f"{where}: no block table (where the model's blocks are), which every "
                               f"{config.family.title} folder records; {todo}")
    else:
        table = BlockTable.from_dict(raw, where, todo)
    table.check(config.depth, plan.block_layout().branches(), where, todo)
    return table
