"""The battery's harness: cases, outcomes, running a CLI or API call, invariants, verdicts."""
from __future__ import annotations

import contextlib
import hashlib
import io
import os
import shutil
import subprocess
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

STEPS = ["--steps", "6", "--batch", "4"]


class Custom:
    """An object a checkpoint may pickle but torch's weights-only loader refuses to build."""


@dataclass
class Case:
    name: str
    group: str
    run: Callable[["Ctx"], "Outcome"]
    expect: str = "error"  # "error" | "ok" | "any" (either is right; an error must still be a clear one)
    words: tuple[str, ...] = ()  # expected in the error message (lower-cased match)
    code: int | None = None  # expected CLI exit code, where it matters
    quick: bool = True


@dataclass
class Outcome:
    ok: bool  # the call succeeded (exit 0 / no exception)
    message: str = ""  # stderr, or the exception text
    traceback: bool = False
    code: int | None = None
    broken: list[str] = field(default_factory=list)  # invariants that failed
    stdout: str = ""


@dataclass
class Ctx:
    root: Path  # this case's folder
    art: Path  # the shared artifact (read-only: copy before editing)

    def copy_art(self, name: str = "art") -> Path:
        dst = self.root / name
        shutil.copytree(self.art, dst)
        return dst


#################################################################################
#                                 Running calls                                 #
#################################################################################


def tree_hash(path: Path) -> str:
    """One hash of every file's relative path and bytes below `path` (or of the file itself)."""
    h = hashlib.sha256()
    if path.is_file():
        h.update(path.read_bytes())
        return h.hexdigest()
    for p in sorted(path.rglob("*")):
        h.update(str(p.relative_to(path)).encode())
        if p.is_file() and not p.is_symlink():
            h.update(p.read_bytes())
    return h.hexdigest()


def leftovers(root: Path) -> list[str]:
    """Temporary files or folders of tcgraph's atomic writes left anywhere below `root`."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")
                  if ".tmp" in p.name and p.name.startswith("."))


def cli(argv: list[str], cwd: Path | None = None) -> Outcome:
    """`tcgraph.cli.main(argv)` in this process, stderr captured; an escaping exception is a traceback."""
    from tcgraph.cli import main

    err, out = io.StringIO(), io.StringIO()
    old = os.getcwd()
    try:
        if cwd is not None:
            os.chdir(cwd)
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            try:
                code = main([str(a) for a in argv])
            except SystemExit as e:  # argparse
                code = e.code if isinstance(e.code, int) else 2
            except BaseException:  # noqa: BLE001 - that is what the battery looks for
                return Outcome(False, traceback.format_exc(), traceback=True)
    finally:
        os.chdir(old)
    text = err.getvalue()
    return Outcome(code == 0, text, traceback="Traceback" in text, code=code, stdout=out.getvalue())


def api(fn: Callable[[], object]) -> Outcome:
    from tcgraph.errors import TcgraphError

    try:
        with contextlib.redirect_stderr(io.StringIO()):
            fn()
    except TcgraphError as e:
        return Outcome(False, f"tcgraph: error: {e}", code=e.exit_code)
    except BaseException as e:  # noqa: BLE001
        return Outcome(False, f"{type(e).__name__}: {e}", traceback=True)
    return Outcome(True)


def proc(argv: list[str], cwd: Path, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "tcgraph", *map(str, argv)], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def guarded(run: Callable[[Ctx], Outcome], protect: Callable[[Ctx], list[Path]] = lambda c: [],
            absent: Callable[[Ctx], list[Path]] = lambda c: []) -> Callable[[Ctx], Outcome]:
    """`run`, then check that the `protect` paths are unchanged, the `absent` ones do not exist, and
    no temporary was left in the case folder."""

    def go(ctx: Ctx) -> Outcome:
        kept = {p: tree_hash(p) for p in protect(ctx) if p.exists()}
        out = run(ctx)
        for p, h in kept.items():
            if not p.exists() or tree_hash(p) != h:
                out.broken.append(f"{p.name} changed or vanished")
        for p in absent(ctx):
            if p.exists():
                out.broken.append(f"{p.name} was written")
        left = leftovers(ctx.root)
        if left:
            out.broken.append(f"left behind: {left[:3]}")
        return out

    return go


#################################################################################
#                                   The cases                                   #
#################################################################################
#                                    Verdicts                                   #
#################################################################################


def verdict(case: Case, out: Outcome) -> tuple[str, str]:
    """(verdict, reason)."""
    first = out.message.strip().splitlines()[-1] if out.message.strip() else ""
    if out.traceback:
        return "traceback", first[:160]
    if out.broken:
        return "wrong", "; ".join(out.broken)[:160]
    if case.expect == "ok" or (case.expect == "any" and out.ok):
        return ("handled", "") if out.ok else ("wrong", f"failed: {first[:150]}")
    if out.ok:
        return "wrong", "succeeded, but must be refused"
    lines = [l for l in out.message.strip().splitlines() if l.strip()]
    error_lines = [l for l in lines if "error:" in l]
    if not error_lines:
        return "wrong", f"no error line: {first[:140]}"
    text = " ".join(error_lines).lower()
    missing = [w for w in case.words if w.lower() not in text]
    if missing:
        return "wrong", f"message lacks {missing}: {error_lines[-1][:120]}"
    if case.code is not None and out.code is not None and out.code != case.code:
        return "wrong", f"exit {out.code}, expected {case.code}"
    return "clear error", error_lines[-1][:160]


def make_artifact(root: Path) -> Path:
    from tcgraph.cli import main

    art = root / "shared-art"
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        assert main(["transform", "--plan", "fora:2", *STEPS, "--out", str(art)]) == 0
    return art
