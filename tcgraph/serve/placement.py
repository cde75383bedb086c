"""Where a model folder may go in a Triton repository, and putting it there atomically.

A Triton repository is shared: `export-triton ART REPO` writes one model folder, REPO/NAME,
and touches nothing else in REPO. REPO may be new or an existing folder (other models in it
stay as they are, byte for byte). An existing REPO/NAME is replaced only with `force`, and
only when it is a model folder tcgraph wrote and nobody changed since (marker.py: every
file as its marker lists it); never a link, a folder with other files, one holding a copied
marker, the current folder, or the folder that holds the artifact being exported. REPO may
not lie inside the artifact (symlinks resolved): the export would write into the artifact,
and each later export would copy the previous repository into the next.

The new model folder is built in a hidden temporary folder on REPO's file system, outside
REPO where possible (Triton reads every folder of a repository, hidden ones too), else
inside it; then renamed into place: the whole REPO when it did not exist, else NAME alone,
exchanged atomically with an old one (renameat2 RENAME_EXCHANGE on Linux; elsewhere two
renames, the old folder waiting in the temporary as `old/NAME`, put back by the next writer
if this one is killed between them). The temporary goes, whatever happens.
"""
from __future__ import annotations

import os
from pathlib import Path

from tcgraph.errors import TcgraphError, UsageError
from tcgraph.export.folder import RENAME_EXCHANGE, RENAME_NOREPLACE, rename_with_flags
from tcgraph.files import (
    check_can_create,
    leftovers,
    pid_alive,
    remove_path,
    remove_stale_temporaries,
    temporary_path,
    write_error,
)
from tcgraph.serve.marker import MARKER, own_model, read_marker

CHOOSE = "choose another REPO"
OLD = "old"  # the temporary's subfolder where a replaced model folder waits between two renames


def resolved(path: Path) -> Path:
    try:
        return path.resolve()
    except (OSError, RuntimeError) as e:  # a symlink loop
        raise TcgraphError(f"cannot resolve {path} ({e}); {CHOOSE}") from None


def _within(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def check_target(artifact: Path, repo: Path, name: str, force: bool) -> None:
    """Refuse, before any copying, a REPO or REPO/NAME that may not be written or replaced."""
    recover(repo, name)
    if os.path.lexists(repo) and not repo.is_dir():
        what = "a symbolic link that leads to no folder (broken, or a loop)" if repo.is_symlink() else "a file"
        raise TcgraphError(f"{repo} is {what}, not a folder; REPO is a Triton model repository: a new folder or "
                           f"one that holds other models: {CHOOSE}")
    art = resolved(artifact)
    if _within(resolved(repo), art):
        raise UsageError(f"{repo} is inside the artifact {artifact} (links resolved); a repository there would change "
                         "the artifact, and each later export would copy the previous one into the next: choose a "
                         "REPO outside the artifact folder")
    target = repo / name
    if not os.path.lexists(target):
        check_can_create(target if repo.is_dir() else repo, CHOOSE)
        return
    if not force:
        if read_marker(target) is not None:
            raise TcgraphError(f"{target} already exists (model {name!r}, written by tcgraph); pass --force to replace "
                               "it (only that model folder, once the new one is complete), or choose another --name")
        raise TcgraphError(f"{target} already exists and is not a model folder tcgraph wrote; tcgraph never replaces "
                           "another model: choose another --name (or another REPO)")
    check_replaceable(target)
    if _within(art, resolved(target)):
        raise UsageError(f"the artifact {artifact} is inside the model folder {target} that --force would replace; "
                         "copy the artifact elsewhere first, or choose another --name")
    if _within(Path.cwd().resolve(), resolved(target)):
        raise UsageError(f"{target} is the current folder or holds it; --force never replaces it: choose another "
                         "--name, or run from another folder")


def check_replaceable(target: Path) -> dict:
    """The marker of REPO/NAME if `--force` may replace it, else one UsageError saying why not."""
    marker, problem = own_model(target)
    if problem:
        raise UsageError(f"{target} is not a model folder that tcgraph wrote and nobody changed ({problem}); --force "
                         f"replaces only such a folder, checked against its {MARKER}, and never another model: "
                         "choose another --name, or move or remove that folder yourself")
    return marker


def make_temporary(repo: Path, name: str) -> Path:
    """A new, empty hidden folder on REPO's file system (beside REPO where possible)."""
    try:
        repo.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise write_error(repo, e, CHOOSE) from None
    remove_stale_temporaries(repo)
    remove_stale_temporaries(repo / name)  # a killed writer's inside REPO, which Triton would take for a model
    tmp = temporary_path(repo)
    try:
        tmp.mkdir()
        if not repo.is_dir() or os.stat(tmp).st_dev == os.stat(repo).st_dev:
            return tmp
        os.rmdir(tmp)  # REPO is a mount point: a rename from beside it would cross file systems
    except OSError as e:
        if not repo.is_dir():
            raise write_error(repo, e, CHOOSE) from None
    tmp = temporary_path(repo / name)  # inside REPO, hidden; Triton may see it while it exists
    try:
        tmp.mkdir()
    except OSError as e:
        raise write_error(repo, e, CHOOSE) from None
    return tmp


def put_in_place(tmp: Path, repo: Path, name: str, force: bool) -> None:
    """Move the finished `tmp/NAME` to REPO/NAME (or `tmp` to REPO when REPO is new). `tmp` is
    left for the caller to delete (when it is still there): it then holds nothing, or the
    replaced model folder."""
    new, target = tmp / name, repo / name
    try:
        if not os.path.lexists(repo) and tmp.parent == repo.parent:
            try:
                if not rename_with_flags(tmp, repo, RENAME_NOREPLACE):
                    os.rename(tmp, repo)
                return
            except FileExistsError:
                pass  # another writer made REPO meanwhile: add the model into it
        if not os.path.lexists(target):
            try:
                if not rename_with_flags(new, target, RENAME_NOREPLACE):
                    os.rename(new, target)
                return
            except FileExistsError:
                pass
            if not force:
                raise TcgraphError(f"another writer created {target} while this one was exporting, and it was kept; "
                                   "choose another --name, or pass --force to replace it")
        check_replaceable(target)  # again: it may have changed during the copy
        if rename_with_flags(new, target, RENAME_EXCHANGE):
            return  # the old folder is now tmp/NAME
        (tmp / OLD).mkdir()
        os.rename(target, tmp / OLD / name)
        try:
            os.rename(new, target)
        except BaseException:
            os.rename(tmp / OLD / name, target)
            raise
    except OSError as e:
        raise write_error(target, e, CHOOSE, verb="move the new model folder to") from None


def recover(repo: Path, name: str) -> None:
    """Put back a model folder that a killed writer left in its temporary between two renames
    (`.<REPO>.tmp-<pid>-…/old/NAME` or `REPO/.<NAME>.tmp-<pid>-…/old/NAME`) where nothing took
    its place. Quiet where it cannot; the temporaries themselves go with the next writer."""
    for tmp, pid in leftovers(repo, "tmp") + leftovers(repo / name, "tmp"):
        old = tmp / OLD
        if pid_alive(pid) or not old.is_dir():
            continue
        for folder in old.iterdir():
            if not os.path.lexists(repo / folder.name):
                try:
                    os.rename(folder, repo / folder.name)
                except OSError:
                    pass
        remove_path(tmp)
