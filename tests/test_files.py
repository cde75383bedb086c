"""Fault injection: nothing lost, nothing half-written, every bad output path one clear error.

`--force` replaces only a tcgraph artifact folder (everything else survives byte for byte);
a writer killed in the middle of its swap is undone by the next writer; a full disk, a
read-only or unwritable folder, a folder's or a too long name, a file on the way or a
symlink loop is one line (exit 1) before sampling where it can be checked then, and no
temporary file stays; a closed stdout and an early Ctrl-C end quietly.
"""
import errno
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from tcgraph import api, files, images
from tcgraph.cli import main
from tcgraph.errors import TcgraphError
from tcgraph.export import folder

STEPS = ["--steps", "6", "--batch", "4"]
# The writers that must get as far as replacing a folder (or as writing its manifest): these tests are
# about the files, the swap and the exit status, not numerics, so the numerical checks of the rewrite
# and the ONNX export (tests/export, tests/test_end_to_end.py) are skipped: the same files, written
# and swapped in the same order, a little sooner.
REWRITE = [*STEPS, "--no-check"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def art(demo_fora2_artifact, tmp_path_factory):
    # `tcgraph transform --plan fora:2 --steps 6 --batch 4`, made once per session (tests/conftest.py);
    # this module's own copy of it, byte for byte
    out = tmp_path_factory.mktemp("files") / "digits-fora2"
    shutil.copytree(demo_fora2_artifact, out, symlinks=True)
    return out


def tree_hashes(root: Path) -> dict[str, str]:
    """Every file and link under `root` (root itself included when it is a file), with its sha256."""
    root = Path(root)
    if root.is_file() and not root.is_symlink():
        return {".": hashlib.sha256(root.read_bytes()).hexdigest()}
    found = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_symlink():
            found[rel] = "link->" + os.readlink(p)
        elif p.is_file():
            found[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
        else:
            found[rel] = "dir"
    return found


def hidden(folder_: Path) -> list[str]:
    return sorted(p.name for p in Path(folder_).iterdir() if p.name.startswith("."))


def one_error_line(err: str, *parts: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tcgraph: error: "), err
    assert "Traceback" not in err
    for part in parts:
        assert part in lines[0], (part, err)


@pytest.fixture
def no_planning(monkeypatch):
    """Planning must not start: the output checks come first."""
    def refuse(*args, **kwargs):
        raise AssertionError("planning started before the output folder was checked")

    monkeypatch.setattr(api, "make_plan", refuse)


@pytest.fixture
def no_sampling(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("sampling started before the output files were checked")

    monkeypatch.setattr(api, "make_runner", refuse)


#################################################################################
#                     --force replaces artifact folders only                    #
#################################################################################


def _project(tmp_path: Path) -> Path:
    project = tmp_path / "project"
    (project / "src").mkdir(parents=True)
    (project / "notes.txt").write_text("my notes\n")
    (project / "src" / "main.py").write_text("print('hello')\n")
    (project / "manifest.json").write_text('{"name": "not tcgraph"}\n')  # a manifest, but not tcgraph's
    return project


@pytest.mark.parametrize("case", ["folder", "file", "cwd", "cwd-parent", "symlink", "cwd-artifact"])
def test_force_refuses_what_is_not_an_artifact_folder(art, tmp_path, monkeypatch, capsys, no_planning, case):
    project = _project(tmp_path)
    if case == "folder":
        out, keep = project, project
    elif case == "file":
        out = keep = project / "notes.txt"
    elif case == "cwd":
        monkeypatch.chdir(project)
        out, keep = Path("."), project
    elif case == "cwd-parent":
        monkeypatch.chdir(project / "src")
        out, keep = Path(".."), project
    elif case == "symlink":  # a link to a real artifact: neither the link nor its target is replaced
        shutil.copytree(art, tmp_path / "real")
        out = tmp_path / "link"
        out.symlink_to(tmp_path / "real")
        keep = tmp_path
    else:  # the current folder is an artifact folder: still never replaced
        shutil.copytree(art, tmp_path / "real")
        monkeypatch.chdir(tmp_path / "real")
        out, keep = Path("."), tmp_path
    before = tree_hashes(keep)
    assert main(["transform", "--plan", "full", "--out", str(out), "--force", *STEPS]) == 2
    one_error_line(capsys.readouterr().err, str(out), "--force")
    assert tree_hashes(keep) == before  # byte for byte, nothing added


def test_without_force_an_existing_path_is_refused(tmp_path, capsys, no_planning):
    project = _project(tmp_path)
    before = tree_hashes(project)
    for out in (project, project / "notes.txt"):
        assert main(["transform", "--plan", "full", "--out", str(out), *STEPS]) == 1
        one_error_line(capsys.readouterr().err, "already exists", "--force")
    assert tree_hashes(project) == before


def test_force_replaces_an_artifact_folder(art, tmp_path):
    target = tmp_path / "target"
    shutil.copytree(art, target)
    (target / "stray.txt").write_text("a file of the old folder\n")
    assert main(["transform", "--plan", "full", "--out", str(target), "--force", *REWRITE]) == 0
    assert not (target / "stray.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["target"]  # no temporary, no old copy


def test_force_is_checked_again_at_swap_time(art, tmp_path):
    """The folder became something else while the new one was written: refused, both kept."""
    target = tmp_path / "target"
    shutil.copytree(art, target)
    tmp = folder.make_temporary(target)
    (tmp / "manifest.json").write_text('{"schema_version": 1, "tcgraph_version": "x"}')
    (target / "manifest.json").write_text("{}")  # no longer tcgraph's
    before = tree_hashes(target)
    with pytest.raises(TcgraphError, match="not a tcgraph artifact folder"):
        folder.swap_into_place(tmp, target, overwrite=True)
    assert tree_hashes(target) == before
    shutil.rmtree(tmp)


#################################################################################
#                       A kill inside the --force swap                          #
#################################################################################

CHILD = r"""
import os, signal, sys
from tcgraph.export import folder
point = sys.argv[1]
real_rename, real_rmtree = os.rename, folder.remove_path

def die():
    os.kill(os.getpid(), signal.SIGKILL)

if point == "after-exchange":
    real = folder.rename_with_flags
    def exchange(src, dst, flags):
        done = real(src, dst, flags)
        if done and flags == folder.RENAME_EXCHANGE:
            die()
        return done
    folder.rename_with_flags = exchange
else:  # the two-rename swap, as where renameat2 is missing
    folder.rename_with_flags = lambda src, dst, flags: False
    def rename(src, dst):
        real_rename(src, dst)
        if point == "after-aside" and ".old-" in os.fspath(dst):
            die()
    os.rename = rename
    def remove(path):
        if point == "before-delete" and ".old-" in os.fspath(path):
            die()
        real_rmtree(path)
    folder.remove_path = remove
from tcgraph.cli import main
sys.exit(main(sys.argv[2:]))
"""


KILL_POINTS = ["after-aside", "before-delete", "after-exchange"]


@pytest.fixture(scope="module")
def killed_swaps(art, tmp_path_factory):
    """point -> a folder holding what a writer killed at `point` of its --force swap left there:
    `target`, a copy of `art`, being replaced by `transform --plan full --force` in a subprocess
    (CHILD) that SIGKILLs itself at that point. The three writers run once, side by side (each in
    its own folder, one thread each), when a test first asks; each test works on a copy."""
    made: dict[str, Path] = {}

    def at(point: str) -> Path:
        if not made:
            procs = {}
            try:
                for p in KILL_POINTS:
                    where = tmp_path_factory.mktemp(f"killed-{p}")
                    target = where / "target"
                    shutil.copytree(art, target)
                    err = tempfile.TemporaryFile()
                    proc = subprocess.Popen([sys.executable, "-c", CHILD, p, "transform", "--plan", "full", "--out",
                                             str(target), "--force", *REWRITE], stdout=subprocess.DEVNULL,
                                            stderr=err, env={**os.environ, "OMP_NUM_THREADS": "1"})
                    procs[p] = where, proc, err
                for p, (where, proc, err) in procs.items():
                    proc.wait(timeout=600)
                    err.seek(0)
                    assert proc.returncode == -signal.SIGKILL, (p, err.read().decode(errors="replace"))
                    made[p] = where
            finally:
                for _, proc, err in procs.values():
                    if proc.poll() is None:
                        proc.kill()
                        proc.wait()
                    err.close()
        return made[point]

    return at


def _killed_swap(killed_swaps, art, tmp_path, point):
    """`tmp_path` as a writer killed at `point` of `transform --plan full --force` on a copy of `art`
    at `tmp_path/target` left it: the dead writer's temporary and aside names (its pid) included,
    byte for byte (a copy of the state the killed subprocess left, made once per point)."""
    old = tree_hashes(art)  # target was a copy of art before the writer started
    shutil.copytree(killed_swaps(point), tmp_path, symlinks=True, dirs_exist_ok=True)
    return tmp_path / "target", old


@pytest.mark.parametrize("point", KILL_POINTS)
def test_a_kill_in_the_swap_is_undone_by_the_next_writer(art, killed_swaps, tmp_path, point):
    target, old = _killed_swap(killed_swaps, art, tmp_path, point)
    names = sorted(p.name for p in tmp_path.iterdir())
    if point == "after-aside":  # nothing at target, the old folder aside under the dead writer's pid
        assert "target" not in names and any(n.startswith(".target.old-") for n in names)
    folder.recover_interrupted_swap(target)
    folder.remove_stale_temporaries(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["target"]
    restored = tree_hashes(target)
    if point == "after-aside":
        assert restored == old  # the old artifact is back, byte for byte
    else:  # the new one made it into place: it is complete and loads
        assert restored != old
        assert api.inspect(target)["planner"] == "full"


def test_the_next_transform_restores_then_replaces(art, killed_swaps, tmp_path, capsys):
    target, old = _killed_swap(killed_swaps, art, tmp_path, "after-aside")
    assert main(["transform", "--plan", "fora:2", "--out", str(target), *STEPS]) == 1  # restored: it exists again
    assert "already exists" in capsys.readouterr().err
    assert tree_hashes(target) == old
    assert main(["transform", "--plan", "full", "--out", str(target), "--force", *REWRITE]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["target"]


def test_a_live_writers_aside_copy_is_left_alone(art, tmp_path):
    target = tmp_path / "target"
    shutil.copytree(art, tmp_path / f".target.old-{os.getpid()}-0123abcd")
    folder.recover_interrupted_swap(target)  # our own pid: a swap in progress
    assert not target.exists() and hidden(tmp_path) == [f".target.old-{os.getpid()}-0123abcd"]


#################################################################################
#                   Disk full, permissions, read-only: one line                 #
#################################################################################


def _fail_with(code):
    def write(f):
        f.write(b"half")
        raise OSError(code, os.strerror(code))
    return write


@pytest.mark.parametrize("code, advice", [(errno.ENOSPC, "free space"), (errno.EACCES, "permissions"),
                                          (errno.EROFS, "read-only"), (errno.EIO, "choose another")])
def test_a_failing_write_keeps_the_old_file_and_no_temporary(tmp_path, code, advice):
    path = tmp_path / "samples.png"
    path.write_bytes(b"old")
    with pytest.raises(TcgraphError) as e:
        files.atomic_write(path, _fail_with(code), choose="choose another --png")
    msg = str(e.value)
    assert msg.startswith(f"cannot write {path}: [Errno {code}] {os.strerror(code)};") and advice in msg
    assert ".tmp-" not in msg  # names the target, not the temporary
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["samples.png"]


def test_ctrl_c_in_a_write_leaves_no_temporary(tmp_path):
    def interrupted(f):
        f.write(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        files.atomic_write(tmp_path / "a.npy", interrupted)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("which", ["png", "npy"])
def test_disk_full_after_sampling_is_one_line_and_leaves_nothing(art, tmp_path, monkeypatch, capsys, which):
    png, npy = tmp_path / "s.png", tmp_path / "s.npy"
    png.write_bytes(b"old png")
    npy.write_bytes(b"old npy")
    real_fdopen = os.fdopen

    class Full:  # the sample file's writes fail as on a full disk
        def __init__(self, f):
            self.f = f

        def write(self, data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    def fdopen(fd, *args, **kwargs):
        f = real_fdopen(fd, *args, **kwargs)
        return Full(f) if os.readlink(f"/proc/self/fd/{fd}").rsplit("/", 1)[1].startswith(f".s.{which}.tmp-") else f

    monkeypatch.setattr(files.os, "fdopen", fdopen)
    argv = ["sample", str(art), "--classes", "0", "--per-class", "1", "--png", str(png), "--npy", str(npy)]
    assert main(argv) == 1
    one_error_line(capsys.readouterr().err, f"cannot write {tmp_path / ('s.' + which)}: [Errno 28] No space left",
                   f"free space or choose another --{which}")
    assert (png.read_bytes() == b"old png") == (which == "png")  # the png is written first
    assert npy.read_bytes() == b"old npy"
    assert hidden(tmp_path) == []


def test_disk_full_during_a_forced_transform_keeps_the_old_artifact(art, tmp_path, monkeypatch, capsys):
    target = tmp_path / "target"
    shutil.copytree(art, target)
    old = tree_hashes(target)
    real = folder.atomic_write_text

    def full(path, text, **kwargs):
        if Path(path).name == "manifest.json":
            return files.atomic_write(path, _fail_with(errno.ENOSPC), **kwargs)
        return real(path, text, **kwargs)

    monkeypatch.setattr(folder, "atomic_write_text", full)
    assert main(["transform", "--plan", "full", "--out", str(target), "--force", *REWRITE]) == 1
    one_error_line(capsys.readouterr().err, "manifest.json: [Errno 28] No space left on device", "free space")
    assert tree_hashes(target) == old and sorted(p.name for p in tmp_path.iterdir()) == ["target"]


def test_an_os_error_that_escapes_is_one_line_at_the_cli(art, tmp_path, monkeypatch, capsys):
    """The CLI's safety net: an OSError from anywhere (here: opening a variant file) is one line."""
    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(art / "variants" / "v0.onnx"))

    monkeypatch.setattr(api, "make_runner", denied)
    assert main(["sample", str(art), "--png", str(tmp_path / "s.png")]) == 1
    one_error_line(capsys.readouterr().err, "v0.onnx: [Errno 13] Permission denied")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("code", [errno.EACCES, errno.EROFS, errno.ENOSPC])
def test_an_unwritable_output_folder_is_refused_before_sampling(art, tmp_path, monkeypatch, capsys, no_sampling,
                                                               code):
    """Root passes permission bits, so the probe file's creation is made to fail as it would."""
    real_open = os.open

    def refusing(path, flags, *args, **kwargs):
        if ".tmp-" in os.fspath(path):  # the probe is named as a temporary
            raise OSError(code, os.strerror(code), os.fspath(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(files.os, "open", refusing)
    png = tmp_path / "out" / "s.png"
    assert main(["sample", str(art), "--png", str(png)]) == 1
    one_error_line(capsys.readouterr().err, f"cannot write {png}: [Errno {code}]", "--png")
    assert os.listdir(tmp_path) == []  # the missing folder was not created either


def test_real_permissions_when_not_root(art, tmp_path, capsys, no_sampling):
    if os.geteuid() == 0:
        pytest.skip("running as root, which writes into read-only folders; the patched case above covers it")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        assert main(["sample", str(art), "--png", str(ro / "s.png")]) == 1
        one_error_line(capsys.readouterr().err, "Permission denied")
    finally:
        ro.chmod(0o700)


#################################################################################
#                   Bad output paths, refused before the work                   #
#################################################################################


def _bad_paths(tmp_path):
    (tmp_path / "adir").mkdir()
    (tmp_path / "afile").write_text("x")
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    return {
        "a folder": (tmp_path / "adir", "it is a folder"),
        "under a file": (tmp_path / "afile" / "s.png", "afile is a file, not a folder"),
        "deep under a file": (tmp_path / "afile" / "x" / "y" / "s.png", "afile is a file, not a folder"),
        "name too long": (tmp_path / ("n" * 300 + ".png"), "File name too long"),
        "symlink loop": (tmp_path / "loop" / "s.png", f"[Errno {errno.ELOOP}]"),
    }


@pytest.mark.parametrize("case", ["a folder", "under a file", "deep under a file", "name too long", "symlink loop"])
@pytest.mark.parametrize("flag", ["--png", "--npy"])
def test_a_bad_sample_output_is_refused_before_sampling(art, tmp_path, capsys, no_sampling, case, flag):
    path, message = _bad_paths(tmp_path)[case]
    before = tree_hashes(tmp_path)
    argv = ["sample", str(art), flag, str(path)] + (["--png", str(tmp_path / "ok.png")] if flag == "--npy" else [])
    assert main(argv) == 1
    one_error_line(capsys.readouterr().err, "cannot write", message, f"{flag}" if case != "name too long" else "")
    assert tree_hashes(tmp_path) == before


@pytest.mark.parametrize("case", ["under a file", "name too long", "symlink loop"])
def test_a_bad_transform_output_is_refused_before_planning(tmp_path, capsys, no_planning, case):
    path, message = _bad_paths(tmp_path)[case]
    path = path.with_suffix("")
    before = tree_hashes(tmp_path)
    assert main(["transform", "--plan", "full", "--out", str(path), *STEPS]) == 1
    one_error_line(capsys.readouterr().err, message)
    assert tree_hashes(tmp_path) == before


def test_a_device_or_pipe_is_never_replaced(art, tmp_path, capsys, no_sampling):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    assert main(["sample", str(art), "--npy", str(fifo), "--png", str(tmp_path / "s.png")]) == 1
    one_error_line(capsys.readouterr().err, "not a regular file", "--npy")
    with pytest.raises(TcgraphError, match="not a regular file"):
        files.atomic_write_bytes(fifo, b"x")
    assert fifo.is_fifo() and os.listdir(tmp_path) == ["fifo"]


def test_png_and_npy_naming_one_file_is_a_usage_error(art, tmp_path, capsys, no_sampling):
    assert main(["sample", str(art), "--png", str(tmp_path / "x"), "--npy", str(tmp_path / "x")]) == 2
    one_error_line(capsys.readouterr().err, "--png and --npy")


def test_the_same_write_to_a_directory_fails_cleanly(tmp_path):
    (tmp_path / "d").mkdir()
    with pytest.raises(TcgraphError, match="it is a folder"):
        files.atomic_write_bytes(tmp_path / "d", b"x")
    with pytest.raises(TcgraphError, match="is a file, not a folder"):
        (tmp_path / "f").write_text("x")
        files.atomic_write_bytes(tmp_path / "f" / "g.png", b"x")
    assert sorted(os.listdir(tmp_path)) == ["d", "f"] and os.listdir(tmp_path / "d") == []


def test_a_long_name_still_gets_a_temporary_that_fits(tmp_path):
    """A 250-byte name leaves no room for `.tmp-<pid>-<random>`: the temporary is shortened."""
    path = tmp_path / ("x" * 246 + ".npy")
    tmp = files.temporary_path(path)
    assert len(tmp.name) <= 255 and tmp.name.startswith(".x") and ".tmp-" in tmp.name
    images.save_npy(path, np.arange(3))
    assert np.load(path).tolist() == [0, 1, 2] and os.listdir(tmp_path) == [path.name]


def test_stale_temporaries_of_dead_writers_are_removed(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    (tmp_path / f".s.png.tmp-{dead}-0123abcd").write_bytes(b"half")
    (tmp_path / f".s.png.tmp-{os.getpid()}-0123abcd").write_bytes(b"ours, in progress")
    (tmp_path / f".s.png.tmp-{dead}-mine").write_bytes(b"not a tcgraph temporary name")
    files.atomic_write_bytes(tmp_path / "s.png", b"new")
    assert sorted(os.listdir(tmp_path)) == sorted(
        ["s.png", f".s.png.tmp-{os.getpid()}-0123abcd", f".s.png.tmp-{dead}-mine"])


#################################################################################
#                        Two writers of the same output                         #
#################################################################################


def test_concurrent_writers_of_one_png(tmp_path):
    path = tmp_path / "grid.png"
    grids = [torch.full((4, 1, 8, 8), v) for v in (-1.0, 0.0, 0.5, 1.0)]
    errors = []

    def write(grid):
        try:
            for _ in range(20):
                images.save_grid(grid, path, nrow=2)
        except Exception as e:  # noqa: BLE001 - collected and checked below
            errors.append(e)

    threads = [threading.Thread(target=write, args=(g,)) for g in grids]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    from PIL import Image

    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC)
    with Image.open(path) as img:
        img.load()
        assert img.size == (88, 88)  # 2 x 2 images of 8 px, 2 px padding, scaled 4 times
        assert len(set(np.asarray(img)[10:30, 10:30].ravel().tolist())) == 1  # one writer's grid, whole
    assert os.listdir(tmp_path) == ["grid.png"]


def test_concurrent_processes_writing_one_file(tmp_path):
    path = tmp_path / "out.npy"
    script = ("import sys, numpy as np; from tcgraph import files\n"
              "for i in range(50): files.atomic_write(sys.argv[1], lambda f: np.save(f, np.full(1000, int(sys.argv[2]))))")
    procs = [subprocess.Popen([sys.executable, "-c", script, str(path), str(k)]) for k in (1, 2)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    arr = np.load(path)
    assert arr.shape == (1000,) and len(set(arr.tolist())) == 1 and arr[0] in (1, 2)
    assert os.listdir(tmp_path) == ["out.npy"]


#################################################################################
#                        Process edges: pipes and Ctrl-C                        #
#################################################################################


def test_a_closed_stdout_ends_quietly(art):
    """`tcgraph inspect A --json | head -c 0`: the reader is gone before the first write."""
    read, write = os.pipe()
    os.close(read)
    proc = subprocess.run([sys.executable, "-m", "tcgraph", "inspect", str(art), "--json"], stdout=write,
                          stderr=subprocess.PIPE, text=True, timeout=300)
    os.close(write)
    assert proc.returncode == 141 and proc.stderr == "", proc.stderr


def test_a_reader_that_leaves_after_a_few_bytes(art):
    """`tcgraph inspect A --json | head -c 100`."""
    proc = subprocess.Popen([sys.executable, "-m", "tcgraph", "inspect", str(art), "--json"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    head = proc.stdout.read(100)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=300) in (0, 141)
    assert head.startswith(b"{") and "Traceback" not in err and "Exception ignored" not in err, err


def _catches(pid: int, sig: int) -> bool:
    """Whether process `pid` has a handler for `sig` (Linux: SigCgt in /proc/<pid>/status)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    mask = int(next(line.split()[1] for line in status.splitlines() if line.startswith("SigCgt:")), 16)
    return bool(mask >> (sig - 1) & 1)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc to see the signal handlers")
def test_ctrl_c_in_the_first_moments_of_transform(tmp_path):
    """SIGINT as soon as `main` has installed its handlers (seen in /proc, not guessed with a sleep):
    at that point the heavy imports are still running. One line, exit 130, no folder."""
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "tcgraph", "transform", "--plan", "full", "--out", str(out),
                             *STEPS], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not _catches(proc.pid, signal.SIGTERM) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.001)
    torch_loaded = "libtorch" in Path(f"/proc/{proc.pid}/maps").read_text()
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode in (130, 0), (proc.returncode, stderr)
    assert "Traceback" not in stderr, stderr
    if proc.returncode == 130:
        assert stderr.strip() == "tcgraph: interrupted; nothing was left half-written"
        assert os.listdir(tmp_path) == []
    print(f"torch loaded when SIGINT was sent: {torch_loaded}")
