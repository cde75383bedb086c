"""A Triton model repository for one artifact, written atomically, and its check.

    REPO/
      tcgraph-repository.json    marks the folder as tcgraph's: version, model, sha256 of the files below
      NAME/config.pbtxt          tcgraph/serve/config.py
      NAME/1/model.py            the Python-backend model (tcgraph/serve/model_template.py)
      NAME/1/artifact/           the artifact folder, copied; its manifest has every file's sha256,
                                 checked when the model loads and by `check_repository`

The whole repository is built in a hidden sibling (`tcgraph.files.temporary_path`), its copy
of the artifact loaded and hash-checked, and only then renamed into place, so that an
interrupted export leaves no half repository. An existing REPO is replaced only with
`force` and only when it is a tcgraph repository (a real folder with the marker file):
never a plain folder, a file, a link, the current folder or one that holds it. The old
one is moved aside as `.REPO.old-<pid>-…` for the moment of the swap; a writer killed
right there is undone by the next one (`tcgraph.export.folder.recover_interrupted_swap`).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Callable

from tcgraph.errors import TcgraphError, UsageError
from tcgraph.export.artifact import load_artifact
from tcgraph.export.folder import recover_interrupted_swap, swap_into_place
from tcgraph.files import (
    atomic_write_text,
    check_can_create,
    read_folder_json,
    remove_path,
    remove_stale_temporaries,
    temporary_path,
    write_error,
)
from tcgraph.progress import QUIET, Progress
from tcgraph.runtime import BACKENDS
from tcgraph.serve.config import DEFAULT_QUEUE_DELAY_US, ModelConfig, check_name, default_name
from tcgraph.version import __version__

MARKER = "tcgraph-repository.json"
MARKER_KIND = "tcgraph triton model repository"
VERSION = "1"
ARTIFACT = "artifact"
CHOOSE = "choose another REPO"
TEMPLATE = Path(__file__).with_name("model_template.py")


def write_repository(artifact: str | Path, repo: str | Path, *, name: str | None = None, instances: int = 1,
                     max_queue_delay_us: int = DEFAULT_QUEUE_DELAY_US, dynamic_batching: bool = True,
                     backend: str = "ort", device: str | None = None, force: bool = False, link: bool = False,
                     progress: Progress = QUIET, log: Callable[[str], None] = lambda line: None) -> Path:
    """Write REPO for `artifact`; returns REPO. `link` hard-links the artifact's files instead of
    copying them where the file system allows (`tcgraph serve`'s private repository)."""
    artifact, repo = Path(artifact), Path(repo)
    instances = _integer(instances, "instances", "--instances", lo=1, hi=1024)
    max_queue_delay_us = _integer(max_queue_delay_us, "max_queue_delay_us", "--max-queue-delay-us", lo=0,
                                  hi=60_000_000)
    if backend not in BACKENDS:
        raise UsageError(f"unknown backend {backend!r}; available backends: {', '.join(BACKENDS)}")
    if device not in (None, "cpu", "cuda"):
        raise UsageError(f"device (--device) must be cpu or cuda, got {device!r}")
    name = check_name(name if name is not None else default_name(artifact.resolve().name))
    art = load_artifact(artifact)  # a missing or damaged artifact is refused before anything is written
    check_target(repo, force)
    s = art.plan.settings
    channels = 3 if art.model_config.in_channels >= 3 else 1
    config = ModelConfig(name=name, batch=s.batch, image_shape=(s.resolution, s.resolution, channels),
                         instances=instances, max_queue_delay_us=max_queue_delay_us,
                         dynamic_batching=dynamic_batching, backend=backend, device=device or "")
    tmp = _make_temporary(repo)
    try:
        _fill(tmp, repo, artifact, config, link, progress, log)
        log("checking the copy (sha256 of every file) …")
        check_repository(tmp)
        _put_in_place(tmp, repo, force)
    except BaseException:
        remove_path(tmp)
        raise
    return repo


def _fill(tmp: Path, repo: Path, artifact: Path, config: ModelConfig, link: bool, progress: Progress, log) -> None:
    version = tmp / config.name / VERSION
    files = sorted(p for p in artifact.rglob("*") if p.is_file() and not _hidden(p, artifact))
    size = sum(p.stat().st_size for p in files)
    log(f"{'linking' if link else 'copying'} {artifact} ({size / 2**20:.1f} MiB, {len(files)} files) "
        f"into model {config.name!r} version {VERSION} …")
    try:
        with progress.phase("copy artifact", len(files)) as phase:
            for src in files:
                dst = version / ARTIFACT / src.relative_to(artifact)
                dst.parent.mkdir(parents=True, exist_ok=True)
                _copy(src, dst, link)
                phase.tick(src.name)
        shutil.copyfile(TEMPLATE, version / "model.py")
        (tmp / config.name / "config.pbtxt").write_text(config.text())
    except OSError as e:
        raise write_error(repo, e, CHOOSE) from None
    marker = {"kind": MARKER_KIND, "tcgraph_version": __version__, "model": config.name, "version": VERSION,
              "artifact": str(artifact.resolve()),
              "files": {rel: _sha256(tmp / rel) for rel in (f"{config.name}/config.pbtxt",
                                                            f"{config.name}/{VERSION}/model.py")}}
    atomic_write_text(tmp / MARKER, json.dumps(marker, indent=2) + "\n", choose=CHOOSE)


def _hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)  # a writer's temporaries


def _copy(src: Path, dst: Path, link: bool) -> None:
    if link:
        try:
            os.link(src, dst)
            return
        except OSError:
            pass  # another file system, or links not allowed: copy
    shutil.copy2(src, dst)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


#################################################################################
#                             Reading and checking                              #
#################################################################################


def read_marker(repo: Path) -> dict | None:
    """The marker of a tcgraph repository (a real folder, no link), or None."""
    marker = read_folder_json(repo, MARKER)
    return marker if isinstance(marker, dict) and marker.get("kind") == MARKER_KIND else None


def check_repository(repo: str | Path) -> dict:
    """Check a repository tcgraph wrote: the marker, the sha256 of config.pbtxt and model.py, and the
    artifact copy (load_artifact: every file's sha256). Returns the marker; one TcgraphError names
    the first damaged file."""
    repo = Path(repo)
    marker = read_marker(repo)
    if marker is None:
        raise TcgraphError(f"{repo} is not a tcgraph model repository (no {MARKER} in it)")
    for rel, digest in marker.get("files", {}).items():
        path = repo / rel
        if not path.is_file():
            raise TcgraphError(f"the model repository {repo} is damaged: {rel} is missing; export it again")
        if _sha256(path) != digest:
            raise TcgraphError(f"the model repository {repo} is damaged: {rel} changed since it was written "
                               "(sha256 differs); export it again")
    load_artifact(repo / marker["model"] / marker["version"] / ARTIFACT)
    return marker


#################################################################################
#                                  The target                                   #
#################################################################################


def check_target(repo: Path, force: bool) -> None:
    """Refuse, before any copying, a REPO that may not be written or replaced."""
    recover_interrupted_swap(repo)
    if os.path.lexists(repo):
        is_ours = read_marker(repo) is not None
        if not force:
            what = "a tcgraph model repository" if is_ours else "and is not a tcgraph model repository"
            hint = ("pass --force to replace it (only once the new one is complete)" if is_ours else
                    f"tcgraph writes only new folders or replaces its own repositories: {CHOOSE}")
            raise TcgraphError(f"{repo} already exists ({what}); {hint}")
        if repo.is_symlink():
            raise UsageError(f"{repo} is a symbolic link; --force never replaces a link or what it points to: "
                             f"{CHOOSE}")
        if not is_ours:
            raise UsageError(f"{repo} is not a tcgraph model repository (no {MARKER} in it); --force replaces "
                             f"only repositories tcgraph wrote: {CHOOSE}, or remove it yourself")
        resolved, cwd = repo.resolve(), Path.cwd().resolve()
        if resolved == cwd or resolved in cwd.parents:
            raise UsageError(f"{repo} is the current folder or holds it; --force never replaces it: {CHOOSE}")
    check_can_create(repo, CHOOSE)


def _make_temporary(repo: Path) -> Path:
    try:
        repo.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(repo)
        tmp = temporary_path(repo)
        tmp.mkdir()
    except OSError as e:
        raise write_error(repo, e, CHOOSE) from None
    return tmp


def _put_in_place(tmp: Path, repo: Path, replace: bool) -> None:
    """Rename the finished repository to REPO; an old tcgraph repository is moved aside first
    (checked again now: it may have changed during the copy) and deleted once the new one is in."""
    if not (replace and os.path.lexists(repo)):
        swap_into_place(tmp, repo, overwrite=False)
        return
    check_target(repo, force=True)
    old = temporary_path(repo, "old")
    try:
        os.rename(repo, old)
    except OSError as e:
        raise write_error(repo, e, CHOOSE, verb="replace") from None
    try:
        swap_into_place(tmp, repo, overwrite=False)
    except BaseException:
        os.rename(old, repo)
        raise
    remove_path(old)


def _integer(value, name: str, option: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise UsageError(f"{name} ({option}) must be an integer in {lo}..{hi}, got {value!r}")
    return value
