"""The Triton Inference Server that the `nvidia-pytriton` wheel ships, made runnable for tcgraph.

The wheel carries a `tritonserver` binary, the Python backend (`libtriton_python.so`) and
one backend *stub* per Python version (`python_backend_stubs/3.X/`). Triton runs each
Python-backend model in a stub process, which embeds the libpython it was linked against
in *isolated* mode: it ignores PYTHONPATH and PYTHONHOME, and finds its prefix (standard
library, site-packages, a venv's `pyvenv.cfg`) from the first `python3` on PATH, or,
with none there, from the current folder or the prefix libpython was built for. So a
server started with a bare environment (a service manager, cron, a container entry
point, `env -i`) got another Python's standard library, or one without the venv's
packages. `backend_folder` lays out a backend folder with the stub of *this* Python, and
`stub_environment` makes the stub embed exactly this interpreter: its libpython first on
LD_LIBRARY_PATH, its own folder (or a link to it named `python3`) first on PATH, and its
package folders and tcgraph's in TCGRAPH_STUB_PATH, which `model.py` adds with
`site.addsitedir` before it imports anything else.
"""
from __future__ import annotations

import os
import shutil
import site
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from tcgraph.errors import TcgraphError

STUB_PATH = "TCGRAPH_STUB_PATH"  # package folders model.py adds (the isolated stub ignores PYTHONPATH)
INSTALL_HINT = "install the serve extra: pip install 'tcgraph[serve]' (nvidia-pytriton, tritonclient)"


@dataclass(frozen=True)
class TritonDist:
    """Where the wheel's server parts are."""

    root: Path  # pytriton/tritonserver
    libs: Path  # nvidia_pytriton.libs: the shared libraries the binary and the stubs need

    @property
    def binary(self) -> Path:
        return self.root / "bin" / "tritonserver"

    @property
    def python_backend(self) -> Path:
        return self.root / "backends" / "python"

    def stub(self, version: str | None = None) -> Path:
        version = version or f"{sys.version_info[0]}.{sys.version_info[1]}"
        return self.root / "python_backend_stubs" / version / "triton_python_backend_stub"


def find_triton() -> TritonDist:
    """The wheel's Triton, or one TcgraphError saying how to install it."""
    try:
        import pytriton  # noqa: F401  (only its files are used, not its Python API)
    except ImportError:
        raise TcgraphError(f"Triton Inference Server is not installed; {INSTALL_HINT}") from None
    module = Path(pytriton.__file__).parent
    dist = TritonDist(module / "tritonserver", module.parent / "nvidia_pytriton.libs")
    if not dist.libs.is_dir():  # an editable pytriton checkout keeps them here
        dist = TritonDist(dist.root, dist.root / "external_libs")
    if not dist.binary.is_file():
        raise TcgraphError(f"the nvidia-pytriton package has no tritonserver binary at {dist.binary}; "
                           f"reinstall it ({INSTALL_HINT})")
    if not dist.stub().is_file():
        raise TcgraphError(f"the nvidia-pytriton package has no Python-backend stub for Python "
                           f"{sys.version_info[0]}.{sys.version_info[1]} ({dist.stub()}); use a Python it ships "
                           "a stub for (3.8-3.13)")
    return dist


def backend_folder(dist: TritonDist, into: Path) -> Path:
    """`into/backends/python`: the Python backend with the stub of this Python beside it (the
    backend looks for `triton_python_backend_stub` in its own folder). Links where possible."""
    target = into / "backends" / "python"
    target.mkdir(parents=True, exist_ok=True)
    for item in dist.python_backend.iterdir():
        if item.name != "triton_python_backend_stub" and item.is_file():
            _link_or_copy(item, target / item.name)
    shutil.copy2(dist.stub(), target / "triton_python_backend_stub")  # $ORIGIN-relative RPATH: see stub_environment
    return into / "backends"


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.symlink(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def stub_environment(dist: TritonDist, base: dict | None = None, workdir: Path | None = None) -> dict:
    """The server's environment: the wheel's libraries and this interpreter's libpython first on
    LD_LIBRARY_PATH, a folder whose `python3` is this interpreter first on PATH, and this
    interpreter's package folders (and tcgraph's) in TCGRAPH_STUB_PATH (and PYTHONPATH, for
    stubs that do not run isolated)."""
    env = dict(os.environ if base is None else base)
    libs = [str(dist.libs)]
    libdir = sysconfig.get_config_var("LIBDIR")
    soname = sysconfig.get_config_var("INSTSONAME") or ""
    if libdir and soname and (Path(libdir) / soname).exists():
        libs.append(libdir)  # the stub then embeds this interpreter's build, with its prefix and stdlib
    env["LD_LIBRARY_PATH"] = _join(libs, env.get("LD_LIBRARY_PATH"))
    path = env.get("PATH")
    env["PATH"] = _join([str(python_folder(workdir))], path if path is not None else os.defpath)
    paths = package_paths()
    env[STUB_PATH] = os.pathsep.join(paths)
    env["PYTHONPATH"] = _join(paths, env.get("PYTHONPATH"))
    return env


def _join(first: list[str], rest: str | None) -> str:
    return os.pathsep.join(first + [p for p in (rest or "").split(os.pathsep) if p and p not in first])


def python_folder(workdir: Path | None = None) -> Path:
    """A folder whose `python3` is this interpreter: its own (a venv's `bin/` included, so that the
    stub finds `pyvenv.cfg`), or else `workdir/bin` with a `python3` link made to it."""
    exe = Path(sys.executable)
    own = exe.parent / "python3"
    if exe.is_absolute() and own.is_file() and os.path.realpath(own) == os.path.realpath(exe):
        return exe.parent
    if workdir is None:
        raise TcgraphError(f"this Python ({sys.executable}) has no python3 beside it; pass a work folder for a link")
    folder = Path(workdir) / "bin"
    folder.mkdir(parents=True, exist_ok=True)
    link = folder / "python3"
    if not link.exists():
        os.symlink(os.path.realpath(exe), link)
    return folder


def package_paths() -> list[str]:
    """The folders this interpreter imports packages from, without its standard library: site
    folders (a venv's included), the folder holding tcgraph (an editable install) and the
    other sys.path entries outside the interpreter's prefix."""
    stdlib = {sysconfig.get_path("stdlib"), sysconfig.get_path("platstdlib")}
    found: list[str] = []
    candidates = [str(Path(__file__).resolve().parents[2])]  # the folder holding tcgraph/
    candidates += list(site.getsitepackages()) + [site.getusersitepackages()]
    candidates += [p for p in sys.path if p]
    for p in candidates:
        if not p or not os.path.isdir(p) or p in found or p in stdlib:
            continue
        if any(p.startswith(s + os.sep) and "site-packages" not in p for s in stdlib if s):
            continue  # lib-dynload and friends belong to the stub's own standard library
        found.append(p)
    return found
