"""The artifact folder: everything `tcgraph transform` produces, written atomically.

Layout (DESIGN.md, "Artifact folder")::

    <out_dir>/
      manifest.json          schema, versions, model config + hash, plan, variants, file hashes
      plan.json              the plan, verbatim
      variants/<id>.onnx     one static graph per variant
      variants/weights.bin   every large initializer of every variant, once

The folder is built in a hidden sibling (`.<name>.tmp-<pid>-<random>`) and renamed into place
only when complete, so an interrupted transform never leaves a half folder and never
damages the folder it replaces. `load_artifact` refuses damaged or foreign folders with
a message that says what to do.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from tcgraph.errors import TcgraphError
from tcgraph.version import __version__
from tcgraph.export.onnx import WEIGHTS_PATH, VariantGraph, export_variants, file_sha256
from tcgraph.export.weights import map_parameters

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
PLAN = "plan.json"


def config_hash(model_config: dict) -> str:
    """sha256 of the canonical JSON of a model config (sorted keys, no spaces)."""
    text = json.dumps(model_config, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()


def _utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


#################################################################################
#                                    Writing                                    #
#################################################################################


def write_artifact(
    out_dir: Path,
    *,
    model_config: dict,
    plan: dict,
    variants: list[VariantGraph],
    extra: dict | None = None,
    overwrite: bool = False,
    progress: Callable[[str], None] | None = None,
    opset: int | None = None,
    verify: bool = True,
    atol: float = 1e-4,
    engines: Callable[[Path, list[dict]], dict] | None = None,
    state: dict | None = None,
) -> Path:
    """Export `variants` and write a complete artifact folder at `out_dir`; returns its path.

    `opset`, `verify`, `atol` go to `export_variants`. `engines(folder, variant entries)`,
    when given, builds backend engines into the (temporary) folder once the ONNX files are
    written and returns their manifest section (`manifest["tensorrt"]`); the engine files
    are hashed like every other file. `state` (the model's state dict) is located in (or
    appended to) the shared weights file and mapped in `manifest["parameters"]`, so that
    the `torch` backend can rebuild the model from the folder alone. An existing `out_dir` is replaced only with
    `overwrite=True`, and only once the new folder is complete.
    """
    out_dir = Path(out_dir).absolute()
    if out_dir.exists() and not overwrite:
        raise TcgraphError(
            f"the output folder {out_dir} already exists; pass overwrite=True (`--force` on the command line) "
            "to replace it, or choose another folder"
        )
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(out_dir)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        _write_json(tmp / PLAN, plan)
        entries = export_variants(variants, tmp, opset=opset, verify=verify, atol=atol, progress=progress)
        parameters = None
        if state is not None:
            onnx_paths = [tmp / e["file"] for e in entries]
            parameters = map_parameters(tmp / WEIGHTS_PATH, onnx_paths, state)
        engine_section = engines(tmp, entries) if engines is not None else None
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
            "weights": {"file": WEIGHTS_PATH, "bytes": (tmp / WEIGHTS_PATH).stat().st_size},
            "files": files,
            "created": _utc_now(),
            "extra": extra or {},
        }
        if parameters is not None:
            manifest["parameters"] = parameters
        if engine_section is not None:
            manifest["tensorrt"] = engine_section
        _write_json(tmp / MANIFEST, manifest)
        _swap_into_place(tmp, out_dir, overwrite)
    except BaseException:  # KeyboardInterrupt too: never leave the half-built folder behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if progress:
        progress(f"wrote {out_dir} ({len(entries)} variants)")
    return out_dir


def _remove_stale_temporaries(out_dir: Path) -> None:
    """Delete hidden temporaries of `out_dir` left by a writer that was killed (SIGKILL, power
    loss): their name carries the writer's pid, and a pid that no longer runs cannot finish."""
    for path in out_dir.parent.glob(f".{out_dir.name}.tmp-*"):
        pid = path.name.rsplit(".tmp-", 1)[1].split("-")[0]
        if pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _write_json(path: Path, obj: dict) -> None:
    try:
        text = json.dumps(obj, indent=2, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise TcgraphError(f"cannot write {path.name}: its content is not plain JSON ({e}); pass dicts of "
                           "str, int, float, bool, None, lists and dicts only") from e
    path.write_text(text + "\n")


def _swap_into_place(tmp: Path, out_dir: Path, overwrite: bool) -> None:
    """Rename the finished folder to `out_dir`, moving an old one aside first."""
    if not out_dir.exists():
        os.rename(tmp, out_dir)
        return
    if not overwrite:  # appeared while we were exporting
        raise TcgraphError(f"the output folder {out_dir} appeared while writing; pass overwrite=True to replace it")
    old = out_dir.parent / f".{out_dir.name}.old-{secrets.token_hex(4)}"
    os.rename(out_dir, old)
    try:
        os.rename(tmp, out_dir)
    except BaseException:
        os.rename(old, out_dir)
        raise
    if old.is_dir() and not old.is_symlink():
        shutil.rmtree(old, ignore_errors=True)
    else:
        old.unlink()


#################################################################################
#                                    Loading                                    #
#################################################################################


@dataclass
class Artifact:
    """A loaded (and, by default, hash-checked) artifact folder."""

    root: Path
    manifest: dict
    plan: dict
    model_config: dict

    @property
    def variants(self) -> dict[str, dict]:
        """Variant manifest entries by id, in export order."""
        return {v["id"]: v for v in self.manifest["variants"]}

    def variant_ids(self) -> list[str]:
        return [v["id"] for v in self.manifest["variants"]]

    def variant(self, vid: str) -> dict:
        entries = self.variants
        if vid not in entries:
            raise TcgraphError(
                f"unknown variant {vid!r} in {self.root}; available variants: {', '.join(entries)}"
            )
        return entries[vid]

    def io_names(self) -> dict[str, tuple[list[str], list[str]]]:
        """variant id -> (input names, output names), as runners take and return them."""
        return {v["id"]: ([i["name"] for i in v["inputs"]], [o["name"] for o in v["outputs"]])
                for v in self.manifest["variants"]}

    def variant_path(self, vid: str) -> Path:
        return self.root / self.variant(vid)["file"]

    @property
    def weights_path(self) -> Path:
        return self.root / self.manifest.get("weights", {}).get("file", WEIGHTS_PATH)


def load_artifact(path: Path, verify_hashes: bool = True) -> Artifact:
    """Open an artifact folder; check its schema and (by default) every file's sha256."""
    root = Path(path)
    redo = "re-run `tcgraph transform` to rebuild it"
    if not root.is_dir() or not (root / MANIFEST).is_file():
        if not root.exists():
            what = "does not exist"
        else:
            what = "is not a folder" if not root.is_dir() else "has no manifest.json"
        raise TcgraphError(
            f"{root} is not a tcgraph artifact folder (no manifest.json: it {what}); "
            "pass the folder written by `tcgraph transform`, or run `tcgraph transform` to make one"
        )
    manifest = _read_json(root / MANIFEST, redo)
    version = manifest.get("schema_version") if isinstance(manifest, dict) else None
    if not isinstance(version, int):
        raise TcgraphError(f"{root / MANIFEST} has no integer schema_version; it was not written by tcgraph; {redo}")
    if version > SCHEMA_VERSION:
        raise TcgraphError(
            f"{root} was written by a newer tcgraph (artifact schema {version}, "
            f"tcgraph {manifest.get('tcgraph_version', '?')}); this tcgraph reads schema {SCHEMA_VERSION} and older: "
            "upgrade tcgraph (pip install -U tcgraph) or re-run `tcgraph transform` with this version"
        )
    for key, kind in (("files", dict), ("variants", list), ("model_config", dict)):
        if not isinstance(manifest.get(key), kind):
            raise TcgraphError(f"{root / MANIFEST} lacks a valid {key!r} entry; the folder is damaged; {redo}")

    files: dict[str, str] = manifest["files"]
    for entry in manifest["variants"]:
        if entry.get("file") not in files:
            raise TcgraphError(
                f"variant {entry.get('id')!r} names file {entry.get('file')!r}, which manifest.json does not list; "
                f"the folder is damaged; {redo}"
            )
    resolved_root = root.resolve()
    for rel, expected in files.items():
        file = (root / rel).resolve()
        if resolved_root not in file.parents:
            raise TcgraphError(
                f"manifest.json lists {rel!r}, which lies outside {root}; the manifest is damaged; {redo}"
            )
        if not file.is_file():
            raise TcgraphError(f"missing file: {rel} in {root}; the folder is damaged (incomplete copy?); {redo}")
        if verify_hashes:
            found = file_sha256(file)
            if found != expected:
                raise TcgraphError(
                    f"hash mismatch: {rel} in {root} (expected sha256 {expected[:12]}…, found {found[:12]}…, "
                    f"{file.stat().st_size} bytes); the file was edited or truncated: the folder is damaged, {redo}"
                )
    plan = _read_json(root / PLAN, redo) if (root / PLAN).is_file() else manifest.get("plan", {})
    return Artifact(root=root, manifest=manifest, plan=plan, model_config=manifest["model_config"])


def _read_json(path: Path, redo: str):
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TcgraphError(f"cannot read {path}: {e}; the artifact folder is damaged; {redo}") from e
