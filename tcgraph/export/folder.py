"""Writing a folder atomically: build it in a hidden sibling, rename it into place when complete.

An interrupted transform (an exception, Ctrl-C, SIGKILL, power loss) must never leave a half
folder and never damage the folder it replaces (docs/design.md, "Artifact folder"). The
temporary is `.<name>.tmp-<pid>-<random>` beside the target (`tcgraph.files`), so the
rename stays on one file system, and its pid lets a later writer delete temporaries whose
writer is gone.

Replacing (`--force`) is allowed only for a tcgraph artifact folder (`check_replaceable`:
a real folder, not a link, not the current folder or one that holds it, with a tcgraph
manifest.json), checked before any work and again at swap time. The swap is one atomic
`renameat2(RENAME_EXCHANGE)` where Linux has it. Elsewhere it is two renames, and the old
folder waits between them as `.<name>.old-<pid>-<random>`: a writer killed right there
leaves it, and the next writer (`recover_interrupted_swap`) renames it back when nothing
is at `<name>`, or deletes it when the new folder made it into place.
"""
from __future__ import annotations

import datetime as _dt
import errno
import json
import os
import sys
from pathlib import Path

from tcgraph.errors import TcgraphError, UsageError
from tcgraph.files import (
    atomic_write_text,
    check_can_create,
    leftovers,
    pid_alive,
    read_folder_json,
    remove_path,
    remove_stale_temporaries,
    temporary_path,
    write_error,
)

MANIFEST_NAME = "manifest.json"
TCGRAPH_KEYS = ("schema_version", "tcgraph_version")
CHOOSE = "choose another --out"


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


#################################################################################
#                                    Checks                                     #
#################################################################################


def is_tcgraph_artifact(folder: Path) -> bool:
    """A real folder (no link) holding a manifest.json that tcgraph wrote (its version keys)."""
    manifest = read_folder_json(folder, MANIFEST_NAME)
    return isinstance(manifest, dict) and all(k in manifest for k in TCGRAPH_KEYS)


def check_replaceable(out_dir: Path) -> None:
    """Refuse (UsageError) to replace anything but a tcgraph artifact folder."""
    out_dir = Path(out_dir)
    refuse = ("--force replaces only a tcgraph artifact folder (one with the manifest.json that "
              "`tcgraph transform` writes)")
    if out_dir.is_symlink():
        raise UsageError(f"{out_dir} is a symbolic link; {refuse}, never a link or what it points to: "
                         f"remove the link yourself or {CHOOSE}")
    if not out_dir.is_dir():
        raise UsageError(f"{out_dir} is a file, not an artifact folder; {refuse}: {CHOOSE}")
    resolved, cwd = out_dir.resolve(), Path.cwd().resolve()
    if resolved == cwd or resolved in cwd.parents:
        raise UsageError(f"{out_dir} is the current folder or holds it; --force never replaces it: "
                         f"{CHOOSE} (e.g. a new subfolder)")
    if not is_tcgraph_artifact(out_dir):
        raise UsageError(f"{out_dir} is not a tcgraph artifact folder (no tcgraph manifest.json in it); {refuse}: "
                         f"{CHOOSE}, or remove the folder yourself")


def check_output_folder(out_dir: Path, force: bool) -> Path:
    """Everything about `out_dir` that can be checked before minutes of planning: an
    interrupted swap is undone first; an existing path needs `force` and must be an
    artifact folder; a new one must be creatable."""
    out_dir = Path(out_dir)
    recover_interrupted_swap(out_dir)
    if os.path.lexists(out_dir):
        if not force:
            raise TcgraphError(f"{out_dir} already exists; pass --force to replace it "
                               "(it is replaced only once the new one is complete)")
        check_replaceable(out_dir)
    check_can_create(out_dir, CHOOSE)
    return out_dir


#################################################################################
#                                    Writing                                    #
#################################################################################


def make_temporary(out_dir: Path) -> Path:
    """A new, empty hidden sibling of `out_dir` (after undoing dead writers' leftovers)."""
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise write_error(out_dir, e, CHOOSE) from None
    recover_interrupted_swap(out_dir)
    remove_stale_temporaries(out_dir)
    tmp = temporary_path(out_dir)
    try:
        tmp.mkdir()
    except OSError as e:
        raise write_error(out_dir, e, CHOOSE) from None
    return tmp


def recover_interrupted_swap(out_dir: Path) -> None:
    """Undo a swap whose writer was killed between its two renames: the old folder,
    `.<name>.old-<pid>-…` of a pid that no longer runs, goes back to `<name>` when nothing is
    there, and is deleted when the new folder is in place. Quiet where it cannot."""
    for old, pid in leftovers(out_dir, "old"):
        if pid_alive(pid):
            continue  # a writer in the middle of its swap
        if not os.path.lexists(out_dir):
            try:
                os.rename(old, out_dir)
                continue
            except OSError:
                pass
        remove_path(old)


def write_json(path: Path, obj: dict) -> None:
    try:
        text = json.dumps(obj, indent=2, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise TcgraphError(f"cannot write {path.name}: its content is not plain JSON ({e}); pass dicts of "
                           "str, int, float, bool, None, lists and dicts only") from e
    atomic_write_text(path, text + "\n", choose=CHOOSE)


def swap_into_place(tmp: Path, out_dir: Path, overwrite: bool) -> None:
    """Rename the finished folder to `out_dir`, replacing an old artifact folder atomically."""
    try:
        if not os.path.lexists(out_dir):
            if not rename_with_flags(tmp, out_dir, RENAME_NOREPLACE):
                os.rename(tmp, out_dir)
            return
    except FileExistsError:
        pass  # appeared since the check: handled below
    except OSError as e:
        raise write_error(out_dir, e, CHOOSE, verb="rename the new folder to") from None
    if not overwrite:  # appeared while we were exporting
        raise TcgraphError(f"another writer created {out_dir} while this one was exporting, and it was kept; choose "
                           "another output folder, or replace it (`--force` on the command line, force=True in the "
                           "API)")
    check_replaceable(out_dir)  # again: it may have changed during the minutes of export
    try:
        if rename_with_flags(tmp, out_dir, RENAME_EXCHANGE):
            remove_path(tmp)  # the old folder, now under the temporary name
            return
        old = temporary_path(out_dir, "old")
        os.rename(out_dir, old)
        try:
            os.rename(tmp, out_dir)
        except BaseException:
            os.rename(old, out_dir)
            raise
    except OSError as e:
        raise write_error(out_dir, e, CHOOSE, verb="replace") from None
    remove_path(old)


RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2
_renameat2 = None


def rename_with_flags(src: Path, dst: Path, flags: int) -> bool:
    """Linux renameat2(src, dst, flags); False where the system or file system lacks it."""
    global _renameat2
    if not sys.platform.startswith("linux"):
        return False
    if _renameat2 is None:
        import ctypes

        fn = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
        if fn is None:
            _renameat2 = False
            return False
        fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
        fn.restype = ctypes.c_int
        _renameat2 = (fn, ctypes)
    if _renameat2 is False:
        return False
    fn, ctypes = _renameat2
    at_fdcwd = -100
    if fn(at_fdcwd, os.fsencode(src), at_fdcwd, os.fsencode(dst), flags) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(src), None, str(dst))
