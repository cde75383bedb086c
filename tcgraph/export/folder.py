"""Writing a folder atomically: build it in a hidden sibling, rename it into place when complete.

An interrupted transform (an exception, Ctrl-C, SIGKILL, power loss) must never leave a half
folder and never damage the folder it replaces (DESIGN.md, "Artifact folder"). The
temporary is `.<name>.tmp-<pid>-<random>` beside the target, so the rename stays on one
file system, and its pid lets a later writer delete temporaries whose writer is gone.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import secrets
import shutil
from pathlib import Path

from tcgraph.errors import TcgraphError


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def make_temporary(out_dir: Path) -> Path:
    """A new, empty hidden sibling of `out_dir` (after deleting dead writers' leftovers)."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out_dir)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()
    return tmp


def remove_stale_temporaries(out_dir: Path) -> None:
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


def write_json(path: Path, obj: dict) -> None:
    try:
        text = json.dumps(obj, indent=2, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise TcgraphError(f"cannot write {path.name}: its content is not plain JSON ({e}); pass dicts of "
                           "str, int, float, bool, None, lists and dicts only") from e
    path.write_text(text + "\n")


def swap_into_place(tmp: Path, out_dir: Path, overwrite: bool) -> None:
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
