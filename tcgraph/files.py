"""Writing files atomically, and one way to say what went wrong on the file system.

Every file tcgraph writes outside a temporary artifact folder (PNG and NPY samples, inspect
pictures) and the artifact's JSON files go through `atomic_write`: the bytes go to a hidden
temporary beside the target, `.<name>.tmp-<pid>-<random>` (same folder, so the rename
stays on one file system; pid and random part, so two writers never share a temporary),
which replaces the target only when complete. On any failure, Ctrl-C included, the
temporary is deleted; a SIGKILLed writer's temporary is deleted by the next writer of the
same name (its pid no longer runs). An `OSError` becomes one `TcgraphError` that names the
target (not the temporary) and the cause, with what to do.

`check_output_file` / `check_can_create` run the same checks before long work (sampling,
planning) so that a bad output path is refused in a second, not after minutes.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import secrets
import shutil
import stat
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from tcgraph.errors import TcgraphError

DEFAULT_NAME_MAX = 255
_LEFTOVER_TAIL = re.compile(r"(\d+)-[0-9a-f]{8}")


#################################################################################
#                                   Messages                                    #
#################################################################################


def cause(e: OSError) -> str:
    """`[Errno 28] No space left on device`, without the (temporary) file name."""
    if e.errno is not None and e.strerror:
        return f"[Errno {e.errno}] {e.strerror}"
    return str(e) or type(e).__name__


def advice(e: OSError | None, choose: str) -> str:
    """What to do about `e`; `choose` is the fallback, e.g. "choose another --png"."""
    code = getattr(e, "errno", None)
    if code in (errno.ENOSPC, getattr(errno, "EDQUOT", -1)):
        return f"free space or {choose}"
    if code in (errno.EACCES, errno.EPERM):
        return f"check the permissions or {choose}"
    if code == errno.EROFS:
        return f"the file system is read-only: {choose}"
    if code == errno.ENAMETOOLONG:
        return "choose a shorter name"
    if code == errno.ELOOP:
        return f"a symbolic link in the path points to itself: fix it or {choose}"
    return choose


def write_error(path: str | Path, e: OSError, choose: str = "choose another path", verb: str = "write") -> TcgraphError:
    """The one-line error for an OSError met while writing `path`."""
    return TcgraphError(f"cannot {verb} {path}: {cause(e)}; {advice(e, choose)}")


def describe_os_error(e: OSError) -> str:
    """One line for an OSError that reached the CLI edge (a safety net: callers say more)."""
    code = e.errno
    verb = "write" if code in (errno.ENOSPC, errno.EROFS, getattr(errno, "EDQUOT", -1)) else "access"
    if e.filename is not None and e.filename2 is not None:
        return f"cannot move {e.filename} to {e.filename2}: {cause(e)}"
    if e.filename is not None:
        return f"cannot {verb} {e.filename}: {cause(e)}; {advice(e, 'check the path')}"
    return f"operating system error: {cause(e)}"


#################################################################################
#                                Temporary names                                #
#################################################################################


def name_max(folder: Path) -> int:
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError):
        return DEFAULT_NAME_MAX


def _prefix(path: Path) -> str:
    """`.<name>` for a temporary of `path`; a name too long to carry a suffix is shortened
    and tagged with its hash, so that the temporary name still fits and still identifies it."""
    name = path.name
    room = name_max(path.parent) - len(".tmp-4294967295-01234567") - 1
    if len(os.fsencode(name)) <= room:
        return f".{name}"
    tag = hashlib.sha256(os.fsencode(name)).hexdigest()[:8]
    short = os.fsencode(name)[: room - len(tag) - 1].decode(errors="ignore")
    return f".{short}~{tag}"


def temporary_path(path: str | Path, kind: str = "tmp") -> Path:
    """A new unique hidden sibling name of `path`: `.<name>.<kind>-<pid>-<random>`."""
    path = Path(path)
    return path.parent / f"{_prefix(path)}.{kind}-{os.getpid()}-{secrets.token_hex(4)}"


def leftovers(path: str | Path, kind: str = "tmp") -> list[tuple[Path, int]]:
    """Hidden siblings of `path` of this kind, with the pid of the writer that made them."""
    path = Path(path)
    prefix = _prefix(path) + f".{kind}-"
    try:
        names = os.listdir(path.parent)
    except OSError:
        return []
    found = []
    for n in sorted(names):
        m = _LEFTOVER_TAIL.fullmatch(n[len(prefix):]) if n.startswith(prefix) else None
        if m:
            found.append((path.parent / n, int(m.group(1))))
    return found


def pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    return True


def remove_path(path: Path) -> None:
    """Delete a file, link or folder tree; quietly (a leftover that cannot go stays)."""
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink()
    except OSError:
        pass


def remove_stale_temporaries(path: str | Path) -> None:
    """Delete temporaries of `path` left by a writer that was killed (SIGKILL, power loss):
    their name carries the writer's pid, and a pid that no longer runs cannot finish."""
    for leftover, pid in leftovers(path, "tmp"):
        if not pid_alive(pid):
            remove_path(leftover)


#################################################################################
#                                    Checks                                     #
#################################################################################


def _stat(path: Path):
    """os.stat, or None where nothing is there; NotADirectoryError passes (a file on the way)."""
    try:
        return os.stat(path)
    except FileNotFoundError:
        return None


def check_can_create(path: str | Path, choose: str = "choose another path") -> Path:
    """Refuse, now, a `path` that could not be created: a name too long, a file on the way,
    a symlink loop, a folder that cannot be written. Creates nothing (a probe file, named as
    a temporary, is created and deleted in the nearest existing folder)."""
    path = Path(path)
    limit = DEFAULT_NAME_MAX
    for part in path.parts:
        if len(os.fsencode(part)) > limit:
            raise TcgraphError(f"cannot write {path}: [Errno {errno.ENAMETOOLONG}] File name too long "
                               f"({len(os.fsencode(part))} bytes in one name, the limit is {limit}); choose a shorter name")
    folder = path.parent
    while True:
        try:
            st = _stat(folder)
        except NotADirectoryError:
            st = None
        except OSError as e:
            raise write_error(path, e, choose) from None
        if st is not None or folder == folder.parent:
            break
        folder = folder.parent
    if st is None or not stat.S_ISDIR(st.st_mode):
        raise TcgraphError(f"cannot write {path}: {folder} is a file, not a folder; {choose}")
    child = path
    while child.parent != folder and child.parent != child:
        child = child.parent
    probe = temporary_path(child)  # named as a temporary of it: a killed check's probe is a stale temporary
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except OSError as e:
        raise write_error(path, e, choose) from None
    try:
        os.unlink(probe)
    except OSError:
        pass
    return path


def check_output_file(path: str | Path, choose: str = "choose another path") -> Path:
    """`check_can_create`, and `path` itself must not be a folder (or a symlink loop)."""
    path = Path(path)
    try:
        st = _stat(path)
    except NotADirectoryError:
        st = None  # a file on the way: check_can_create names it
    except OSError as e:
        raise write_error(path, e, choose) from None
    _check_replaceable_file(path, st, choose)
    return check_can_create(path, choose)


def _check_replaceable_file(path: Path, st, choose: str) -> None:
    """An existing target must be a regular file: a folder is refused, and so is a device,
    pipe or socket (`--npy /dev/stdout` would replace the link in /dev, not write to it)."""
    if st is None or stat.S_ISREG(st.st_mode):
        return
    if stat.S_ISDIR(st.st_mode):
        raise TcgraphError(f"cannot write {path}: it is a folder; name a file, or {choose}")
    raise TcgraphError(f"cannot write {path}: it is not a regular file (a device, pipe or socket), and tcgraph "
                       f"writes by replacing the file; {choose}")


def ensure_folder(path: str | Path, choose: str = "choose another folder") -> Path:
    """`mkdir -p path`, with one clear error (a file in the way, permissions, disk full)."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise TcgraphError(f"cannot write into {path}: it is a file, not a folder; {choose}") from None
    except OSError as e:
        raise write_error(path, e, choose) from None
    return path


#################################################################################
#                                    Writing                                    #
#################################################################################


def atomic_write(path: str | Path, write: Callable[[BinaryIO], object], *, choose: str = "choose another path",
                 fsync: bool = False) -> Path:
    """Write `path` through `write(binary file)`: to a unique temporary beside it, renamed
    over `path` only when `write` returned. On any failure (OSError, Ctrl-C, an error in
    `write`) the temporary is deleted and `path` is as it was; an OSError is raised as one
    `TcgraphError` naming `path`. `fsync` flushes file and folder to disk before returning."""
    path = Path(path)
    try:
        st = _stat(path)
    except OSError:
        st = None  # the writes below say what is wrong
    _check_replaceable_file(path, st, choose)
    ensure_folder(path.parent, choose)
    remove_stale_temporaries(path)
    tmp = temporary_path(path)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies, as for open()
    except OSError as e:
        raise write_error(path, e, choose) from None
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        _discard(tmp, path, e, choose)
        raise
    if fsync:
        _fsync_folder(path.parent)
    return path


@contextlib.contextmanager
def atomic_output(path: str | Path, *, choose: str = "choose another path"):
    """For writers that need a file name (a subprocess's `-o`): yields a unique temporary
    path beside `path` that replaces `path` when the block ends normally; on any failure
    the temporary is deleted. OSErrors are raised as one `TcgraphError` naming `path`."""
    path = Path(path)
    ensure_folder(path.parent, choose)
    remove_stale_temporaries(path)
    tmp = temporary_path(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException as e:
        _discard(tmp, path, e, choose)
        raise


def _discard(tmp: Path, path: Path, e: BaseException, choose: str) -> None:
    """After a failed write: delete the temporary; an OSError becomes one TcgraphError naming `path`
    (any other exception, Ctrl-C included, is re-raised by the caller)."""
    try:
        os.unlink(tmp)
    except OSError:
        pass
    if isinstance(e, OSError):
        raise write_error(path, e, choose) from e


def atomic_write_bytes(path: str | Path, data: bytes, **kwargs) -> Path:
    return atomic_write(path, lambda f: f.write(data), **kwargs)


def atomic_write_text(path: str | Path, text: str, **kwargs) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"), **kwargs)


def _fsync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def read_folder_json(folder: Path, name: str):
    """The JSON value of `folder/name` where `folder` is a real folder (no link), else None
    (missing, unreadable or not JSON): how tcgraph recognises the folders it wrote."""
    folder = Path(folder)
    if folder.is_symlink() or not folder.is_dir():
        return None
    try:
        return json.loads((folder / name).read_text())
    except (OSError, ValueError):
        return None


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    """The SHA-256 of a file's bytes, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
