"""A battery of bad inputs and faults against tcgraph's CLI and Python API, with a verdict per case.

    python scripts/fault_battery.py            # every case (a few minutes on 2 cores)
    python scripts/fault_battery.py --quick    # the fast cases only (what tests/test_fault_battery.py runs)
    python scripts/fault_battery.py --json out.json

Verdicts:
- `clear error`: the call failed with one `tcgraph: error: ...` line (CLI: exit 1 or 2, no
  traceback; API: a TcgraphError), and the case's invariants hold;
- `handled`: an edge input that must work did, and the invariants hold;
- `traceback`: an exception other than tcgraph's escaped (CLI: "Traceback" on stderr or an
  uncaught exception; API: any other exception type);
- `wrong`: it succeeded where it must fail, failed where it must work, gave a misleading
  message (the expected words are missing), or broke an invariant: files it must not touch
  changed, an output that must not exist exists, a temporary file was left behind.

Every case runs in a fresh folder under one temporary root; a demo-model artifact
(fora:2, 6 steps, batch 4) is made once and copied where a case edits it. Exit status 0
only when no case is `traceback` or `wrong`.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
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
    expect: str = "error"  # "error" | "ok"
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


def transform_case(name: str, args: list[str], words=(), code=None, quick=True, expect="error") -> Case:
    """`tcgraph transform ARGS --out <case>/o`: refused, nothing written."""
    run = guarded(lambda c: cli(["transform", *args, "--out", c.root / "o"], cwd=c.root),
                  absent=lambda c: [c.root / "o"] if expect == "error" else [])
    return Case(name, "transform settings", run, expect, tuple(words), code, quick)


def settings_cases() -> list[Case]:
    S = ["--batch", "2"]
    bad = [
        ("steps 0", ["--steps", "0", *S], ["steps"]), ("steps -1", ["--steps", "-1", *S], ["steps"]),
        ("steps 1001", ["--steps", "1001", *S], ["steps"]), ("steps 10.5", ["--steps", "10.5", *S], ["steps"]),
        ("steps abc", ["--steps", "abc", *S], ["steps"]),
        ("guidance -1", ["--guidance", "-1", *STEPS], ["guidance"]),
        ("guidance nan", ["--guidance", "nan", *STEPS], ["guidance"]),
        ("guidance inf", ["--guidance", "inf", *STEPS], ["guidance"]),
        ("guidance -inf", ["--guidance", "-inf", *STEPS], ["guidance"]),
        ("guidance 0.5", ["--guidance", "0.5", *STEPS], ["guidance"]),
        ("eta 2", ["--eta", "2", *STEPS], ["eta"]), ("eta -0.1", ["--eta", "-0.1", *STEPS], ["eta"]),
        ("eta nan", ["--eta", "nan", *STEPS], ["eta"]), ("eta inf", ["--eta", "inf", *STEPS], ["eta"]),
        ("batch 0", ["--steps", "6", "--batch", "0"], ["batch"]),
        ("batch -3", ["--steps", "6", "--batch", "-3"], ["batch"]),
        ("batch 10^7", ["--steps", "6", "--batch", "10000000"], ["batch"]),
        ("plan empty", ["--plan", "", *STEPS], ["plan"]), ("plan unknown", ["--plan", "sometimes", *STEPS], ["plan"]),
        ("fora without N", ["--plan", "fora:", *STEPS], ["fora"]),
        ("fora:0", ["--plan", "fora:0", *STEPS], ["interval"]),
        ("fora:2:3", ["--plan", "fora:2:3", *STEPS], ["fora"]), ("fora:x", ["--plan", "fora:x", *STEPS], ["fora"]),
        ("fora:2.5", ["--plan", "fora:2.5", *STEPS], ["fora"]),
        ("full:3", ["--plan", "full:3", *STEPS], ["full"]),
        ("l2c:0.5", ["--plan", "l2c:0.5", *STEPS], ["speedup"]), ("l2c:abc", ["--plan", "l2c:abc", *STEPS], ["l2c"]),
        ("l2c:9 out of reach", ["--plan", "l2c:9", *STEPS], ["reach"]),
        ("l2c:nan", ["--plan", "l2c:nan", *STEPS], ["speedup"]),
        ("tokencache:40", ["--plan", "tokencache:40", *STEPS], ["reach"]),
        ("tokencache:-1", ["--plan", "tokencache:-1", *STEPS], ["speedup"]),
        ("tokencache+l2c:2:3", ["--plan", "tokencache+l2c:2:3", *STEPS], ["tokencache+l2c"]),
        ("target 0", ["--plan", "l2c", "--target-speedup", "0", *STEPS], ["speedup"]),
        ("target and lambda", ["--plan", "l2c", "--target-speedup", "2", "--lambda", "0.1", *STEPS], ["both"]),
        ("lambda -1", ["--plan", "l2c", "--lambda", "-1", *STEPS], ["λ"]),
        ("threshold 0", ["--plan", "l2c", "--lambda", "0.1", "--threshold", "0", *STEPS], ["threshold"]),
        ("threshold 2", ["--plan", "l2c", "--lambda", "0.1", "--threshold", "2", *STEPS], ["threshold"]),
        ("max-variants -1", ["--plan", "l2c", "--max-variants", "-1", *STEPS], ["variants"]),
        ("interval 1", ["--plan", "l2c", "--interval", "1", *STEPS], ["interval"]),
        ("calib-images 1", ["--plan", "l2c", "--calib-images", "1", *STEPS], ["calibration"]),
        ("calib-images 0", ["--plan", "tokencache", "--calib-images", "0", *STEPS], ["calibration"]),
        ("tprr two parts", ["--plan", "tokencache", "--tprr", "4,2", *STEPS], ["three"]),
        ("tprr letters", ["--plan", "tokencache", "--tprr", "a,b,c", *STEPS], ["tprr"]),
        ("tprr negative", ["--plan", "tokencache", "--tprr", "-1,2,2", *STEPS], ["tprr"]),
        ("keep-ratio 0", ["--plan", "tokencache", "--keep-ratio", "0", *STEPS], ["keep"]),
        ("keep-ratio 2", ["--plan", "tokencache", "--keep-ratio", "2", *STEPS], ["keep"]),
        ("min-keep 1", ["--plan", "tokencache", "--min-keep", "1", *STEPS], ["keep"]),
        ("option of another planner", ["--plan", "fora:2", "--keep-ratio", "0.3", *STEPS], ["fora"]),
        ("lambda for tokencache", ["--plan", "tokencache", "--lambda", "0.1", *STEPS], ["tokencache"]),
        ("precision without trt", ["--plan", "full", "--precision", "bf16", *STEPS], ["--backend trt"]),
        ("strip-weights without trt", ["--plan", "full", "--strip-weights", *STEPS], ["--backend trt"]),
        ("backend trt without TensorRT", ["--plan", "full", "--backend", "trt", *STEPS], ["tensorrt"]),
        ("backend unknown", ["--plan", "full", "--backend", "onnx", *STEPS], ["backend"]),
        ("config unknown", ["--config", "DiT-Q/3", *STEPS], ["config"]),
    ]
    return [transform_case(n, ["--plan", "full", *a] if "--plan" not in a else a, w) for n, a, w in bad] + [
        transform_case("fora:1 is the full plan", ["--plan", "fora:1", *STEPS], expect="ok", quick=False)]


def checkpoint_cases() -> list[Case]:
    """--model with files the case makes: missing, a folder, garbage, empty, wrapped, unsafe, NaN, mismatch."""

    def with_file(name: str, make: Callable[[Path], Path], words, expect="error", extra=()) -> Case:
        def run(c: Ctx) -> Outcome:
            path = make(c.root)
            return guarded(lambda c: cli(["transform", "--model", path, "--plan", "full", *STEPS, *extra,
                                          "--out", c.root / "o"], cwd=c.root),
                           protect=lambda c: [path], absent=lambda c: [c.root / "o"] if expect == "error" else [])(c)
        return Case(name, "checkpoints", run, expect, tuple(words))

    def tiny_state():
        from tcgraph.models.dit import DiT, make_config, randomize_weights
        return randomize_weights(DiT(make_config("digits"))).state_dict()

    def save(obj, name):
        import torch

        def make(root: Path) -> Path:
            p = root / name
            torch.save(obj() if callable(obj) else obj, p)
            return p
        return make

    def raw(data: bytes, name: str):
        def make(root: Path) -> Path:
            p = root / name
            p.write_bytes(data)
            return p
        return make

    def nan_state():
        import torch
        return {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v for k, v in tiny_state().items()}

    return [
        with_file("missing checkpoint", lambda r: r / "missing.pt", ["missing.pt"]),
        with_file("checkpoint is a folder", lambda r: (r / "ck.pt").mkdir() or r / "ck.pt", ["ck.pt"]),
        with_file("garbage .pt", raw(os.urandom(4096), "g.pt"), ["g.pt"]),
        with_file("empty .pt", raw(b"", "e.pt"), ["e.pt"]),
        with_file("garbage .safetensors", raw(os.urandom(512), "g.safetensors"), ["g.safetensors"]),
        with_file("unknown suffix", raw(b"x", "w.ckpt"), ["w.ckpt"]),
        with_file("unsafe pickle", save(lambda: {"x": Custom()}, "u.pt"), ["unsafe"]),
        with_file("state_dict wrapper", save(lambda: {"state_dict": tiny_state()}, "w.pt"), (), expect="ok"),
        with_file("unknown wrapper", save(lambda: {"weights_here": tiny_state()}, "k.pt"), ["weights_here"]),
        with_file("all-NaN weights", save(nan_state, "nan.pt"), ["finite"]),
        with_file("config mismatch", save(tiny_state, "m.pt"), ["fit"], extra=("--config", "DiT-S/2")),
        with_file("empty state dict", save(lambda: {}, "z.pt"), ["z.pt"]),
    ]


def force_cases() -> list[Case]:
    def case(name, setup: Callable[[Ctx], Path], words=(), expect="error", cwd=None, quick=True) -> Case:
        def run(c: Ctx) -> Outcome:
            target = setup(c)
            where = cwd(c) if cwd else c.root
            return guarded(lambda c: cli(["transform", "--plan", "full", *STEPS, "--out", target, "--force"],
                                         cwd=where),
                           protect=lambda c: [c.root / "keep"] if (c.root / "keep").exists() else [])(c)
        return Case(name, "--force and --out", run, expect, tuple(words), quick=quick)

    def folder_with_files(c: Ctx) -> Path:
        keep = c.root / "keep"
        keep.mkdir()
        (keep / "notes.md").write_text("my notes")
        (keep / "data.bin").write_bytes(os.urandom(100))
        return keep

    def a_file(c: Ctx) -> Path:
        (c.root / "keep").write_text("notes")
        return c.root / "keep"

    def fake_manifest(c: Ctx) -> Path:
        keep = folder_with_files(c)
        (keep / "manifest.json").write_text(json.dumps({"name": "someone else's"}))
        return keep

    def cwd_project(c: Ctx) -> Path:
        folder_with_files(c)
        return Path(".")

    def symlink_to_art(c: Ctx) -> Path:
        real = c.copy_art("keep")
        link = c.root / "link"
        link.symlink_to(real)
        return link

    return [
        case("--force on a non-artifact folder", folder_with_files, ["artifact"]),
        case("--force on a file", a_file, ["artifact"]),
        case("--force on a folder with a foreign manifest.json", fake_manifest, ["artifact"]),
        case("--force on the current directory", cwd_project, ["current folder"], cwd=lambda c: c.root / "keep"),
        case("--force on a parent of the cwd", lambda c: folder_with_files(c) and Path(".."), ["current folder"],
             cwd=lambda c: (c.root / "keep" / "sub").mkdir() or c.root / "keep" / "sub"),
        case("--force through a symlink", symlink_to_art, ["link"]),
        case("--force on an empty folder", lambda c: (c.root / "keep").mkdir() or c.root / "keep", ["artifact"]),
        case("--out under a file", lambda c: (a_file(c), c.root / "keep" / "o")[1], ["keep"]),
        case("--out name too long", lambda c: c.root / ("x" * 300), ["name"]),
        case("--force on an artifact", lambda c: c.copy_art("target"), expect="ok", quick=False),
    ] + [
        Case("--out exists without --force", "--force and --out",
             guarded(lambda c: cli(["transform", "--plan", "full", *STEPS, "--out", c.art]),
                     protect=lambda c: [c.art]), "error", ("already exists",)),
    ]


def sample_cases() -> list[Case]:
    def sample(name, argv: Callable[[Ctx], list], words=(), expect="error", edit=None, quick=True, code=None) -> Case:
        def run(c: Ctx) -> Outcome:
            art = c.art
            if edit is not None:
                art = c.copy_art()
                edit(art)
            return guarded(lambda c: cli(["sample", art, *argv(c)], cwd=c.root),
                           protect=lambda c: [c.art],
                           absent=lambda c: [c.root / "s.png"] if expect == "error" else [])(c)
        return Case(name, "sample", run, expect, tuple(words), code, quick)

    png = lambda c: ["--png", c.root / "s.png"]  # noqa: E731

    def manifest_edit(change: Callable[[dict], None], rehash: bool = False):
        def edit(art: Path) -> None:
            m = json.loads((art / "manifest.json").read_text())
            change(m)
            if rehash:
                from tcgraph.export.manifest import config_hash
                m["model_config_hash"] = config_hash(m["model_config"])
            (art / "manifest.json").write_text(json.dumps(m))
        return edit

    def truncate(rel: str, keep: int = 100):
        def edit(art: Path) -> None:
            p = art / rel
            p.write_bytes(p.read_bytes()[:keep])
        return edit

    def delete(rel: str):
        return lambda art: (art / rel).unlink()

    def set_key(key, value):
        def change(m):
            m[key] = value
        return change

    cases = [
        sample("artifact path missing", lambda c: ["--png", c.root / "s.png"], ["not a tcgraph artifact"],
               edit=lambda a: shutil.rmtree(a)),
        sample("artifact is a file", png, ["artifact"], edit=lambda a: (shutil.rmtree(a), a.write_text("x"))),
        sample("artifact is an empty folder", png, ["artifact"],
               edit=lambda a: (shutil.rmtree(a), a.mkdir())),
        sample("manifest missing", png, ["manifest"], edit=delete("manifest.json")),
        sample("manifest garbage", png, ["manifest"], edit=lambda a: (a / "manifest.json").write_bytes(b"\x00\xff{")),
        sample("manifest is a list", png, ["manifest"], edit=lambda a: (a / "manifest.json").write_text("[]")),
        sample("schema_version 0", png, ["schema"], edit=manifest_edit(set_key("schema_version", 0))),
        sample("schema_version -1", png, ["schema"], edit=manifest_edit(set_key("schema_version", -1))),
        sample("schema_version 999", png, ["schema"], edit=manifest_edit(set_key("schema_version", 999))),
        sample("schema_version '1'", png, ["schema"], edit=manifest_edit(set_key("schema_version", "1"))),
        sample("schema_version missing", png, ["schema"], edit=manifest_edit(lambda m: m.pop("schema_version"))),
        sample("model config edited", png, ["hash"],
               edit=manifest_edit(lambda m: m["model_config"].update(depth=3))),
        sample("model config edited, hash updated", png, ["blocks"],
               edit=manifest_edit(lambda m: m["model_config"].update(depth=3), rehash=True)),
        sample("variants emptied", png, ["variant"], edit=manifest_edit(set_key("variants", []))),
        sample("variant onnx truncated", png, ["v1.onnx"], edit=truncate("variants/v1.onnx")),
        sample("variant onnx deleted", png, ["v0.onnx"], edit=delete("variants/v0.onnx")),
        sample("weights.bin truncated", png, ["weights.bin"], edit=truncate("variants/weights.bin")),
        sample("weights.bin deleted", png, ["weights.bin"], edit=delete("variants/weights.bin")),
        sample("plan.json edited", png, ["plan.json"],
               edit=lambda a: (a / "plan.json").write_text((a / "plan.json").read_text().replace("fora", "arof"))),
        sample("plan.json deleted", png, ["plan.json"], edit=delete("plan.json")),
        sample("classes 10", lambda c: ["--classes", "10", *png(c)], ["0..9"], code=2),
        sample("classes -1", lambda c: ["--classes", "-1", *png(c)], ["class"]),
        sample("classes letters", lambda c: ["--classes", "a", *png(c)], ["class"]),
        sample("classes empty", lambda c: ["--classes", "", *png(c)], ["class"]),
        sample("classes open range", lambda c: ["--classes", "1-", *png(c)], ["class"]),
        sample("classes huge range", lambda c: ["--classes", "0-99999999", *png(c)], ["class"]),
        sample("per-class 0", lambda c: ["--per-class", "0", *png(c)], ["per-class"]),
        sample("per-class -1", lambda c: ["--per-class", "-1", *png(c)], ["per-class"]),
        sample("per-class 1e8", lambda c: ["--per-class", "100000000", *png(c)], ["per-class"]),
        sample("per-class 1.5", lambda c: ["--per-class", "1.5", *png(c)], ["per-class"]),
        sample("batch mismatch", lambda c: ["--batch", "5", *png(c)], ["batch 4"]),
        sample("resolution mismatch", lambda c: ["--resolution", "32", *png(c)], ["resolution 16"]),
        sample("seed letters", lambda c: ["--seed", "x", *png(c)], ["seed"]),
        sample("png is a folder", lambda c: ["--png", (c.root / "d").mkdir() or c.root / "d"], ["d"]),
        sample("png under a file", lambda c: ["--png", (c.root / "f").write_text("x") and c.root / "f" / "s.png"],
               ["f"]),
        sample("npy under a file", lambda c: ["--npy", (c.root / "f").write_text("x") and c.root / "f" / "s.npy",
                                             *png(c)], ["f"]),
        sample("png name too long", lambda c: ["--png", c.root / ("x" * 300 + ".png")], ["name"]),
        sample("backend trt without TensorRT", lambda c: ["--backend", "trt", *png(c)], ["tensorrt"]),
        sample("backend unknown", lambda c: ["--backend", "tpu", *png(c)], ["backend"]),
        sample("--precision with ort", lambda c: ["--precision", "bf16", *png(c)], ["torch"], code=2),
        sample("--no-cuda-graphs with ort", lambda c: ["--no-cuda-graphs", *png(c)], ["torch"], code=2),
        sample("--no-share-weights with torch", lambda c: ["--backend", "torch", "--no-share-weights", *png(c)],
               ["ort"], code=2),
        sample("torch on a folder without programs", lambda c: ["--backend", "torch", *png(c)], ["program"],
               edit=manifest_edit(lambda m: m.pop("programs", None))),
        sample("device cuda without a GPU (ort)", lambda c: ["--device", "cuda", *png(c)], ["cuda"]),
        sample("device cuda without a GPU (torch)", lambda c: ["--backend", "torch", "--device", "cuda", *png(c)],
               ["cuda"]),
        sample("png dir does not exist yet", lambda c: ["--png", c.root / "new" / "dir" / "s.png", "--classes", "0",
                                                       "--per-class", "1"], expect="ok", quick=False),
        sample("a valid sample", lambda c: [*png(c), "--classes", "3", "--per-class", "2"], expect="ok", quick=False),
    ]
    return cases


def inspect_cases() -> list[Case]:
    def insp(name, argv: Callable[[Ctx], list], words=(), edit=None, expect="error", says=None) -> Case:
        """`says`: with expect="ok", words the report must contain (inspect reports, not refuses)."""
        def run(c: Ctx) -> Outcome:
            art = c.art
            if edit is not None:
                art = c.copy_art()
                edit(art)
            out = guarded(lambda c: cli(["inspect", art, *argv(c)], cwd=c.root), protect=lambda c: [c.art])(c)
            if says and out.ok and says.lower() not in out.stdout.lower():
                out.broken.append(f"the report does not say {says!r}")
            return out
        return Case(name, "inspect", run, expect, tuple(words))

    def engines_random(art: Path) -> None:
        from tcgraph.export.manifest import config_hash  # noqa: F401  (the folder layout of a trt artifact)
        import hashlib as h
        eng = art / "engines"
        eng.mkdir()
        (eng / "v0.plan").write_bytes(os.urandom(2048))
        m = json.loads((art / "manifest.json").read_text())
        m["tensorrt"] = {"tensorrt_version": "10.9.0", "precision": "fp16", "weight_stripped": False,
                         "engines": {"v0": "engines/v0.plan"}}
        m["files"]["engines/v0.plan"] = h.sha256((eng / "v0.plan").read_bytes()).hexdigest()
        (art / "manifest.json").write_text(json.dumps(m))

    def variants_empty(art: Path) -> None:
        m = json.loads((art / "manifest.json").read_text())
        m["variants"] = []
        (art / "manifest.json").write_text(json.dumps(m))

    return [
        insp("inspect a missing folder", lambda c: [], ["artifact"], edit=lambda a: shutil.rmtree(a)),
        insp("inspect --variant v9", lambda c: ["--variant", "v9"], ["v0"]),
        insp("inspect --step 99", lambda c: ["--step", "99"], ["0..5"]),
        insp("inspect --step -1", lambda c: ["--step", "-1"], ["step"]),
        insp("inspect --step x", lambda c: ["--step", "x"], ["step"]),
        insp("inspect --variant and --step disagree", lambda c: ["--variant", "v0", "--step", "1"], ["step"]),
        insp("inspect --out is a file", lambda c: ["--out", (c.root / "f").write_text("x") and c.root / "f"], ["f"]),
        insp("inspect random engine bytes", lambda c: [], edit=engines_random, expect="ok", says="not usable"),
        insp("inspect variants emptied", lambda c: [], ["variant"], edit=variants_empty),
        insp("inspect damaged onnx", lambda c: [], ["v0.onnx"],
             edit=lambda a: (a / "variants" / "v0.onnx").write_bytes(b"junk")),
    ]


def api_cases() -> list[Case]:
    import tcgraph

    def t(name, kw: dict, words=()) -> Case:
        base = {"model": "digits", "plan": "full", "steps": 6, "batch": 2, "progress": False}
        return Case(name, "API types", guarded(lambda c: api(lambda: tcgraph.transform(
            **{**base, "out": c.root / "o", **kw})), absent=lambda c: [c.root / "o"]), "error", tuple(words))

    def s(name, kw: dict, words=()) -> Case:
        return Case(name, "API types", guarded(lambda c: api(lambda: tcgraph.sample(
            c.art, **{"progress": False, **kw}))), "error", tuple(words))

    return [
        t("steps=10.5", {"steps": 10.5}, ["steps"]), t("steps='10'", {"steps": "10"}, ["steps"]),
        t("steps=True", {"steps": True}, ["steps"]), t("batch='2'", {"batch": "2"}, ["batch"]),
        t("batch=2.0", {"batch": 2.0}, ["batch"]), t("guidance='2'", {"guidance": "2"}, ["guidance"]),
        t("guidance=None", {"guidance": None}, ["guidance"]), t("eta='0'", {"eta": "0"}, ["eta"]),
        t("plan=3", {"plan": 3}, ["plan"]), t("model=3", {"model": 3}, ["model"]),
        t("plan_options not a dict", {"plan_options": [1]}, ["plan_options"]),
        t("plan_options unknown key", {"plan_options": {"bogus": 1}}, ["bogus"]),
        t("backend='onnx'", {"backend": "onnx"}, ["backend"]),
        s("per_class=1.5", {"per_class": 1.5}, ["per_class"]), s("per_class='2'", {"per_class": "2"}, ["per_class"]),
        s("per_class=True", {"per_class": True}, ["per_class"]),
        s("classes=[1.7]", {"classes": [1.7]}, ["class"]), s("classes=[True]", {"classes": [True]}, ["class"]),
        s("classes=3.5", {"classes": 3.5}, ["class"]), s("classes=[]", {"classes": []}, ["class"]),
        s("seed='x'", {"seed": "x"}, ["seed"]), s("seed=1.5", {"seed": 1.5}, ["seed"]),
        s("backend='nope'", {"backend": "nope"}, ["backend"]), s("device='tpu'", {"device": "tpu"}, ["tpu"]),
        s("runner_options bogus", {"runner_options": {"bogus": 1}}, ["bogus"]),
        s("batch='4'", {"batch": "4"}, ["batch"]),
        Case("inspect step='x'", "API types", lambda c: api(lambda: tcgraph.inspect(c.art, step="x")), "error",
             ("step",)),
        Case("inspect variant=3", "API types", lambda c: api(lambda: tcgraph.inspect(c.art, variant=3)), "error",
             ("variant",)),
    ]


def process_cases() -> list[Case]:
    def sigint_early(c: Ctx) -> Outcome:
        p = proc(["transform", "--plan", "fora:3", *STEPS, "--out", c.root / "o"], c.root)
        time.sleep(0.3)  # in the middle of start-up (imports); the point is that it is early
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=120)
        out = Outcome(p.returncode in (0, 130), err, traceback="Traceback" in err, code=p.returncode)
        if p.returncode not in (0, 130):
            out.broken.append(f"exit {p.returncode}, expected 130")
        return out

    def sigterm_mid(c: Ctx) -> Outcome:
        target = c.copy_art("target")
        before = tree_hash(target)
        p = proc(["transform", "--plan", "fora:3", "--steps", "30", "--batch", "4", "--out", target, "--force"],
                 c.root)
        deadline = time.time() + 60
        while time.time() < deadline and not list(c.root.glob(".target.tmp-*")):
            time.sleep(0.05)
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=120)
        out = Outcome(p.returncode == 130, err, traceback="Traceback" in err, code=p.returncode)
        if p.returncode != 130:
            out.broken.append(f"exit {p.returncode}, expected 130 (interrupted)")
        if tree_hash(target) != before:
            out.broken.append("the old artifact changed")
        if leftovers(c.root):
            out.broken.append(f"left behind {leftovers(c.root)}")
        return out

    def sigkill_then_rerun(c: Ctx) -> Outcome:
        target = c.copy_art("target")
        before = tree_hash(target)
        p = proc(["transform", "--plan", "fora:3", "--steps", "30", "--batch", "4", "--out", target, "--force"],
                 c.root)
        deadline = time.time() + 60
        while time.time() < deadline and not list(c.root.glob(".target.tmp-*")):
            time.sleep(0.05)
        p.kill()
        p.communicate(timeout=60)
        out = Outcome(True)  # handled when the old folder is intact and the next run succeeds
        if tree_hash(target) != before:
            out.broken.append("the old artifact changed")
        rerun = cli(["transform", "--plan", "full", *STEPS, "--out", target, "--force"])
        if not rerun.ok:
            out.broken.append(f"the next transform failed: {rerun.message[-200:]}")
        if leftovers(c.root):
            out.broken.append(f"left behind {leftovers(c.root)}")
        return out

    def broken_pipe(c: Ctx) -> Outcome:
        p = proc(["inspect", c.art, "--json"], c.root)
        p.stdout.read(100)
        p.stdout.close()
        err = p.stderr.read()
        p.wait(timeout=60)
        return Outcome(p.returncode == 0, err, traceback="Traceback" in err, code=p.returncode)

    def concurrent_samples(c: Ctx) -> Outcome:
        png = c.root / "same.png"
        ps = [proc(["sample", c.art, "--classes", "0", "--per-class", "1", "--png", png], c.root) for _ in range(2)]
        errs = [p.communicate(timeout=300)[1] for p in ps]
        out = Outcome(all(p.returncode == 0 for p in ps), "\n".join(errs), traceback=any("Traceback" in e for e in errs))
        from PIL import Image
        try:
            Image.open(png).verify()
        except Exception as e:  # noqa: BLE001
            out.broken.append(f"the PNG is not valid: {e}")
        if leftovers(c.root):
            out.broken.append(f"left behind {leftovers(c.root)}")
        return out

    def concurrent_transforms(c: Ctx) -> Outcome:
        target = c.root / "t"
        ps = [proc(["transform", "--plan", "full", *STEPS, "--out", target, "--force"], c.root) for _ in range(2)]
        errs = [p.communicate(timeout=300)[1] for p in ps]
        out = Outcome(any(p.returncode == 0 for p in ps), "\n".join(errs),
                      traceback=any("Traceback" in e for e in errs))
        check = cli(["inspect", target])
        if not check.ok:
            out.broken.append(f"the result does not verify: {check.message[-200:]}")
        if leftovers(c.root):
            out.broken.append(f"left behind {leftovers(c.root)}")
        return out

    return [
        Case("Ctrl-C early in transform", "process", sigint_early, "ok", quick=False),
        Case("SIGTERM in a forced re-transform", "process", sigterm_mid, "ok", quick=False),
        Case("SIGKILL in a forced re-transform, then rerun", "process", sigkill_then_rerun, "ok", quick=False),
        Case("inspect --json into a closed pipe", "process", broken_pipe, "ok", quick=False),
        Case("two samples write one PNG", "process", concurrent_samples, "ok", quick=False),
        Case("two forced transforms to one folder", "process", concurrent_transforms, "ok", quick=False),
    ]


def all_cases() -> list[Case]:
    return settings_cases() + checkpoint_cases() + force_cases() + sample_cases() + inspect_cases() + api_cases() \
        + process_cases()


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
    if case.expect == "ok":
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


def run_battery(quick: bool = False, only: str | None = None) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        art = make_artifact(root)
        for i, case in enumerate(c for c in all_cases() if (c.quick or not quick) and (only is None or only in c.name)):
            folder = root / f"case{i:03d}"
            folder.mkdir()
            start = time.perf_counter()
            try:
                out = case.run(Ctx(folder, art))
            except BaseException:  # noqa: BLE001 - the harness itself must not stop the battery
                out = Outcome(False, traceback.format_exc(), traceback=True)
            v, why = verdict(case, out)
            rows.append({"group": case.group, "case": case.name, "verdict": v, "detail": why,
                         "seconds": round(time.perf_counter() - start, 2)})
            print(f"{v:12s} {case.group:20s} {case.name:48s} {why[:90]}", flush=True)
            shutil.rmtree(folder, ignore_errors=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="only the fast cases")
    p.add_argument("--only", help="only the cases whose name contains this text")
    p.add_argument("--json", type=Path, help="write the rows here")
    args = p.parse_args(argv)
    rows = run_battery(args.quick, args.only)
    counts = {v: sum(r["verdict"] == v for r in rows) for v in ("clear error", "handled", "traceback", "wrong")}
    print("\n| verdict | cases |\n|---|---|")
    for v, n in counts.items():
        print(f"| {v} | {n} |")
    print(f"\n{len(rows)} cases: {counts['clear error']} clear error, {counts['handled']} handled, "
          f"{counts['traceback']} traceback, {counts['wrong']} wrong")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0 if counts["traceback"] == counts["wrong"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
