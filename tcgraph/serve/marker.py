"""How tcgraph knows a model folder of a Triton repository is its own, and unchanged.

A Triton model repository is shared: one folder per model, some of them tcgraph's, others
written by hand or by other tools. Each model folder tcgraph writes holds a marker,

    REPO/NAME/tcgraph-model.json   kind, tcgraph version, model NAME, version "1", the
                                   artifact it was copied from, and the sha256 of every
                                   other file tcgraph wrote in NAME/ (config.pbtxt,
                                   1/model.py, every file of 1/artifact/)

written last, when the folder is complete. `own_model` trusts a folder only when its
contents are exactly what its marker lists, byte for byte: a marker copied into another
model's folder, a folder with a file added, removed or edited, a link anywhere in it, are
never taken for tcgraph's (so `--force` never deletes them). The marker proves that the
folder is unchanged since tcgraph wrote it, not who wrote it: someone who copies a whole
tcgraph model folder gets a folder tcgraph may replace, which is the same thing.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path, PurePosixPath

from tcgraph.files import read_folder_json
from tcgraph.version import __version__

MARKER = "tcgraph-model.json"
MARKER_KIND = "tcgraph triton model"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def marker_text(folder: Path, name: str, version: str, artifact: Path) -> str:
    """The marker of the complete model folder `folder` (to be written into it as MARKER)."""
    files = {rel: sha256(folder / rel) for rel in sorted(_contents(folder)[0])}
    marker = {"kind": MARKER_KIND, "tcgraph_version": __version__, "model": name, "version": version,
              "artifact": str(artifact.resolve()), "files": files}
    return json.dumps(marker, indent=2) + "\n"


def read_marker(folder: Path) -> dict | None:
    """The marker of a model folder (a real folder, no link) that has one, or None."""
    marker = read_folder_json(folder, MARKER)
    return marker if isinstance(marker, dict) and marker.get("kind") == MARKER_KIND else None


def own_model(folder: Path) -> tuple[dict | None, str]:
    """(marker, "") when `folder` is a model folder tcgraph wrote and nobody changed since;
    else (marker or None, what is wrong, in a few words)."""
    if folder.is_symlink():
        return None, "it is a symbolic link"
    if not folder.is_dir():
        return None, "it is not a folder"
    marker = read_marker(folder)
    if marker is None:
        return None, f"it has no {MARKER}: tcgraph did not write it"
    files = marker.get("files")
    if (not isinstance(files, dict) or not all(isinstance(v, str) for v in files.values())
            or not all(_safe(k) for k in files)):
        return marker, f"its {MARKER} is damaged (no list of files)"
    if marker.get("model") != folder.name:
        return marker, (f"its {MARKER} is for model {marker.get('model')!r}, not {folder.name!r}: it was copied "
                        "from another model folder")
    found, odd = _contents(folder)
    if odd:
        return marker, f"{odd[0]} is a link or a special file, which tcgraph never writes"
    for rel in sorted(found - set(files)):
        return marker, f"{rel} was not written by tcgraph"
    for rel in sorted(set(files) - found):
        return marker, f"{rel} is missing"
    for rel in sorted(files):
        try:
            if sha256(folder / rel) != files[rel]:
                return marker, f"{rel} changed since tcgraph wrote it (sha256 differs)"
        except OSError as e:
            return marker, f"{rel} cannot be read ({e.strerror})"
    return marker, ""


def _safe(rel) -> bool:
    """A relative path inside the folder: no '..', not absolute, not the marker itself."""
    if not isinstance(rel, str) or not rel or rel == MARKER:
        return False
    p = PurePosixPath(rel)
    return not p.is_absolute() and ".." not in p.parts and "\\" not in rel


def _contents(folder: Path) -> tuple[set[str], list[str]]:
    """The regular files under `folder` (relative POSIX paths, the marker left out), and
    anything else that is there: links, sockets, devices (never followed)."""
    files, odd = set(), []
    for root, dirs, names in os.walk(folder, followlinks=False):
        for entry in dirs + names:
            path = Path(root) / entry
            rel = path.relative_to(folder).as_posix()
            if path.is_symlink():
                odd.append(rel)
            elif entry in names:
                if path.is_file():
                    if rel != MARKER:
                        files.add(rel)
                else:
                    odd.append(rel)
    return files, sorted(odd)
