"""Cases: transform settings, checkpoints, --force and --out."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

from faults.harness import STEPS, Case, Ctx, Custom, Outcome, cli, guarded


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
        from tcgraph.models.official.dit import DiT, make_config, randomize_weights
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
