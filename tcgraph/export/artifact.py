"""The artifact folder: everything `tcgraph transform` produces, written atomically, loaded typed.

Layout (docs/design.md, "Artifact folder")::

    <out_dir>/
      manifest.json          schema, versions, model config + hash, plan, variants, block table
                             (tcgraph.export.blocks), file hashes
      plan.json              the plan, verbatim
      variants/<id>.onnx     one static graph per variant
      variants/weights.bin   every large initializer of every variant, once
      variants/<id>.program.safetensors  ATen graph per variant for the torch backend (no pickle)
      engines/<id>.plan      TensorRT engines, when they were built

The folder is built in a hidden sibling and renamed into place only when complete
(`tcgraph.export.folder`). `load_artifact` is the one reader of `manifest.json` (with the
format's checks in `tcgraph.export.manifest`): it checks
what is cheap (schema, hashes, the model config against its hash, the plan against the
model and the variants) and returns an `Artifact` of typed parts — a `Plan`, a
model config (its family's class), `VariantSpec`s — so that no other module reads manifest keys.
"""
from __future__ import annotations

import copy
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from tcgraph.errors import TcgraphError
from tcgraph.export.folder import (make_temporary, recover_interrupted_swap, swap_into_place, utc_now,
                                   write_json)
from tcgraph.files import write_error
from tcgraph.export.manifest import (
    MANIFEST,
    PLAN,
    SCHEMA_VERSION,
    blocks_of,
    check_agree,
    check_files,
    check_parameters,
    check_schema,
    check_variant_io,
    inside_folder,
    config_hash,
    model_config_of,
    plan_of,
    read_json,
)
from tcgraph.export.blocks import BlockTable, variants_block_table
from tcgraph.export.specs import (REDO, WEIGHTS_PATH, ParameterSpec, TensorSpec, VariantSpec, parameter_specs,
                                  variant_spec)
from tcgraph.files import file_sha256
from tcgraph.models.families import ModelConfig
from tcgraph.plan.plan import Plan
from tcgraph.progress import QUIET, Phase, Progress
from tcgraph.version import __version__

if TYPE_CHECKING:  # writing imports torch and onnx (`_write_contents`); reading an artifact needs neither
    from tcgraph.export.onnx import ExportableVariant

__all__ = ["SCHEMA_VERSION", "Artifact", "ParameterSpec", "TensorSpec", "VariantSpec", "config_hash",
           "load_artifact", "write_artifact"]

#################################################################################
#                                    Writing                                    #
#################################################################################


def write_artifact(
    out_dir: Path,
    *,
    model_config: ModelConfig | dict,
    plan: Plan | dict,
    variants: Sequence[ExportableVariant],
    extra: dict | None = None,
    overwrite: bool = False,
    progress: Progress = QUIET,
    opset: int | None = None,
    verify: bool = True,
    atol: float = 1e-4,
    engines: Callable[[Path, list[VariantSpec]], dict] | None = None,
    state: dict | None = None,
) -> Path:
    """Export `variants` and write a complete artifact folder at `out_dir`; returns its path.

    `model_config` and `plan` (typed, or their `to_dict()`) are checked first, as
    `load_artifact` will check them: a folder that could not be loaded is never written.
    `opset`, `verify`, `atol` go to the ONNX export. `state` (the model's state dict) is
    located in (or appended to) the shared weights file and mapped under "parameters", and
    every variant's torch program (`tcgraph.export.programs`, weights read through that
    map) is listed under "programs", so that the `torch` backend runs from the folder
    alone. `engines(folder, variant specs)`, when given, builds backend engines into the
    (temporary) folder last and returns their manifest section ("tensorrt"). Every file is hashed. An existing
    `out_dir` is replaced only with `overwrite=True`, and only once the new folder is
    complete. `progress` gets one phase, "export": a tick per variant, then the parameter
    map, the programs and the manifest (engine builders report on their own).
    """
    out_dir = Path(out_dir).absolute()
    if out_dir.exists() and not overwrite:
        raise TcgraphError(
            f"the output folder {out_dir} already exists; replace it (`--force` on the command line, force=True in "
            "the API) or choose another folder"
        )
    config_dict = model_config if isinstance(model_config, dict) else model_config.to_dict()
    plan_dict = plan.to_dict() if isinstance(plan, Plan) else plan
    where, todo = f"cannot write {out_dir}", "pass the model's config and a tcgraph Plan made for it"
    typed_config, typed_plan = model_config_of(config_dict, where, todo), plan_of(plan_dict, where, todo)
    check_agree(typed_plan, typed_config, [v.id for v in variants], where,
                "pass one variant graph per variant of the plan, with the plan's ids (v0, v1, ...)")
    total = len(variants) + 2 * (state is not None) + 1
    tmp = make_temporary(out_dir)
    try:
        with progress.phase("export", total) as phase:
            _write_contents(tmp, config_dict, plan_dict, variants, extra, phase, opset, verify, atol, engines,
                            state)
        swap_into_place(tmp, out_dir, overwrite)
    except OSError as e:  # a full disk while exporting: name the folder asked for, not the temporary
        shutil.rmtree(tmp, ignore_errors=True)
        raise write_error(out_dir, e, "choose another --out") from None
    except BaseException:  # KeyboardInterrupt too: never leave the half-built folder behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _write_contents(tmp: Path, model_config: dict, plan: dict, variants, extra, phase: Phase, opset, verify,
                    atol, engines, state) -> None:
    from tcgraph.export.onnx import export_each
    from tcgraph.export.programs import write_programs
    from tcgraph.export.weights import map_parameters

    write_json(tmp / PLAN, plan)
    exported: dict | None = {} if state is not None else None  # one torch.export per variant, for both files
    entries = export_each(variants, tmp, opset=opset, verify=verify, atol=atol, tick=phase.tick, programs=exported)
    parameters = None
    if state is not None:
        parameters = map_parameters(tmp / WEIGHTS_PATH, [tmp / e["file"] for e in entries], state)
        phase.tick("parameter map")
    programs = None
    if parameters is not None:  # a program file holds no weights: it reads them through the parameter map
        specs = parameter_specs(parameters, "the parameter map")
        programs = _checked_programs(write_programs(tmp, variants, specs, exported), tmp)
        phase.tick("torch programs")
    # What load_artifact checks of the exported I/O and the parameter map, checked before it is written.
    where, todo = f"cannot write {tmp}", "pass variant graphs made for this plan and model (tcgraph.compile.build_variants)"
    typed_plan, typed_config = plan_of(plan, where, todo), model_config_of(model_config, where, todo)
    exported = [variant_spec(e, where, i) for i, e in enumerate(entries)]
    check_variant_io(typed_plan, typed_config, exported, where, todo)
    # The block table the graphs record (capture's; graphs made otherwise record none, and the folder
    # is read with its family's table, as a folder written before manifests held one).
    recorded = variants_block_table(variants)
    blocks = blocks_of(None if recorded is None else recorded.to_dict(), typed_config, typed_plan, where, todo)
    check_parameters(None if parameters is None else parameter_specs(parameters, where), exported, typed_config,
                     blocks, where, todo)
    if engines is not None:
        specs = [variant_spec(e, "the exported variants", i) for i, e in enumerate(entries)]
        engine_section = engines(tmp, specs)
    else:
        engine_section = None
    files = {}
    for path in sorted(p for p in tmp.rglob("*") if p.is_file()):
        rel = path.relative_to(tmp).as_posix()
        known = next((e["sha256"] for e in entries if e["file"] == rel), None)
        files[rel] = known or file_sha256(path)
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "tcgraph_version": __version__,
        "model_config": model_config,
        "model_config_hash": config_hash(model_config),
        "plan": plan,
        "variants": entries,
        **({"blocks": recorded.to_dict()} if recorded is not None else {}),
        "weights": {"file": WEIGHTS_PATH, "bytes": (tmp / WEIGHTS_PATH).stat().st_size},
        "files": files,
        "created": utc_now(),
        "extra": extra or {},
    }
    if parameters is not None:
        manifest["parameters"] = parameters
    if programs is not None:
        manifest["programs"] = programs
    if engine_section is not None:
        manifest["tensorrt"] = engine_section
    write_json(tmp / MANIFEST, manifest)
    phase.tick(f"wrote {len(entries)} variants")


def _checked_programs(programs, tmp: Path) -> dict[str, str]:
    if not isinstance(programs, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                 for k, v in programs.items()):
        raise TcgraphError(f"write_programs returned {programs!r}, not a map from variant ids to relative files; "
                           "this is a bug in tcgraph.export.programs, please report it")
    missing = [f for f in programs.values() if not (tmp / f).is_file()]
    if missing:
        raise TcgraphError(f"write_programs named files it did not write: {missing}; this is a bug in "
                           "tcgraph.export.programs, please report it")
    return dict(programs)


#################################################################################
#                                    Loading                                    #
#################################################################################


@dataclass(frozen=True, eq=False)
class Artifact:
    """A loaded (and, by default, hash-checked) artifact folder, typed.

    `variants` are in export order. `parameters` is None for folders written without the
    parameter map; `programs` (variant id -> relative file of its torch program) is {} for
    folders written before programs existed. `tensorrt`, `flops` and `programs` return
    copies: the artifact does not change once loaded.
    """

    root: Path
    plan: Plan
    model_config: ModelConfig
    variants: tuple[VariantSpec, ...]
    parameters: tuple[ParameterSpec, ...] | None = None
    source_model: str | None = None
    tcgraph_version: str = ""
    model_config_hash: str = ""
    schema_version: int = SCHEMA_VERSION
    weights_file: str = WEIGHTS_PATH
    files: dict[str, str] = field(default_factory=dict, repr=False)  # relative file -> sha256
    created: str | None = None
    programs_map: dict[str, str] = field(default_factory=dict, repr=False)
    tensorrt_section: dict | None = field(default=None, repr=False)
    extra: dict = field(default_factory=dict, repr=False)
    blocks: BlockTable | None = field(default=None, repr=False)  # where the model's blocks are (load_artifact: always)

    def variant_ids(self) -> list[str]:
        return [v.id for v in self.variants]

    def variant(self, vid: str) -> VariantSpec:
        for v in self.variants:
            if v.id == vid:
                return v
        raise TcgraphError(f"unknown variant {vid!r} in {self.root}; available variants: {', '.join(self.variant_ids())}")

    def io_names(self) -> dict[str, tuple[list[str], list[str]]]:
        """variant id -> (input names, output names), as runners take and return them."""
        return {v.id: (list(v.input_names), list(v.output_names)) for v in self.variants}

    def file(self, relative: str) -> Path:
        """`root / relative`, refusing a path that leaves the folder (absolute, `..`, a link out)."""
        return inside_folder(self.root, relative, "the artifact names")

    def variant_path(self, vid: str) -> Path:
        return self.file(self.variant(vid).file)

    @property
    def weights_path(self) -> Path:
        return self.file(self.weights_file)

    @property
    def programs(self) -> dict[str, str]:
        return dict(self.programs_map)

    @property
    def tensorrt(self) -> dict | None:
        """The manifest's "tensorrt" section as the engine builder wrote it (a copy), or None."""
        return copy.deepcopy(self.tensorrt_section)

    @property
    def flops(self) -> dict | None:
        flops = self.extra.get("flops")
        return copy.deepcopy(flops) if isinstance(flops, dict) else None


def load_artifact(path: Path, verify_hashes: bool = True) -> Artifact:
    """Open an artifact folder; check its schema, files and (by default) every file's sha256,
    then that the model config, the plan and the variants agree. Errors name the file."""
    root = Path(path)
    if not os.path.lexists(root):  # a forced re-transform killed inside its swap: put the old folder back
        recover_interrupted_swap(root)
    if not root.is_dir() or not (root / MANIFEST).is_file():
        if not root.exists():
            what = "does not exist"
        else:
            what = "is not a folder" if not root.is_dir() else "has no manifest.json"
        raise TcgraphError(
            f"{root} is not a tcgraph artifact folder (no manifest.json: it {what}); "
            "pass the folder written by `tcgraph transform`, or run `tcgraph transform` to make one"
        )
    where = str(root / MANIFEST)
    manifest = read_json(root / MANIFEST)
    check_schema(manifest, root)
    for key, kind in (("files", dict), ("variants", list), ("model_config", dict)):
        if not isinstance(manifest.get(key), kind):
            raise TcgraphError(f"{where} lacks a valid {key!r} entry; the folder is damaged; {REDO}")
    files: dict[str, str] = manifest["files"]
    variants = tuple(variant_spec(e, where, i) for i, e in enumerate(manifest["variants"]))
    programs = manifest.get("programs", {})
    if not isinstance(programs, dict) or not all(isinstance(f, str) for f in programs.values()):
        raise TcgraphError(f"{where}: 'programs' is not a map from variant ids to files; the folder is damaged; {REDO}")
    for what, owner, rel in [*(("variant", v.id, v.file) for v in variants),
                             *(("program of variant", vid, rel) for vid, rel in programs.items())]:
        if rel not in files:
            raise TcgraphError(f"{what} {owner!r} names file {rel!r}, which manifest.json does not list; "
                               f"the folder is damaged; {REDO}")
    check_files(root, files, verify_hashes)

    raw_config = manifest["model_config"]
    found = config_hash(raw_config)
    if manifest.get("model_config_hash") != found:
        raise TcgraphError(
            f"{where}: model_config_hash {str(manifest.get('model_config_hash'))[:12]}… does not match its model "
            f"config (sha256 {found[:12]}…); manifest.json was edited or damaged: {REDO}"
        )
    config = model_config_of(raw_config, where, f"the folder is damaged or not a DiT's; {REDO}")
    plan_file = root / PLAN
    plan_where = str(plan_file) if plan_file.is_file() else f"{where} ('plan')"
    plan = plan_of(read_json(plan_file) if plan_file.is_file() else manifest.get("plan"), plan_where,
                 f"the folder is damaged; {REDO}")
    check_agree(plan, config, [v.id for v in variants], plan_where, f"the folder is inconsistent; {REDO}")
    parameters = manifest.get("parameters")
    parameter_map = None if parameters is None else parameter_specs(parameters, where)
    check_variant_io(plan, config, variants, where, f"the folder is inconsistent; {REDO}")
    blocks = blocks_of(manifest.get("blocks"), config, plan, where, f"the folder is inconsistent; {REDO}")
    check_parameters(parameter_map, variants, config, blocks, where, f"the folder is inconsistent; {REDO}")
    unknown = sorted(set(programs) - {v.id for v in variants})
    if unknown:
        raise TcgraphError(f"{where}: 'programs' names variants {unknown} that the folder does not have; {REDO}")

    extra = manifest.get("extra") if isinstance(manifest.get("extra"), dict) else {}
    weights = manifest.get("weights") if isinstance(manifest.get("weights"), dict) else {}
    section = manifest.get("tensorrt")
    source = extra.get("model")
    return Artifact(
        root=root,
        plan=plan,
        model_config=config,
        variants=variants,
        parameters=parameter_map,
        source_model=None if source is None else str(source),
        tcgraph_version=str(manifest.get("tcgraph_version", "unknown")),
        model_config_hash=found,
        schema_version=manifest["schema_version"],
        weights_file=str(weights.get("file", WEIGHTS_PATH)),
        files=dict(files),
        created=manifest.get("created"),
        programs_map=dict(programs),
        tensorrt_section=copy.deepcopy(section) if isinstance(section, dict) else None,
        extra=copy.deepcopy(extra),
        blocks=blocks,
    )
