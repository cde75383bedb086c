"""Cases: sample and inspect on damaged or edited folders, API types, process edges."""
from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Callable

from faults.harness import STEPS, Case, Ctx, Outcome, cli, guarded, tree_hash, leftovers, api, proc


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
        sample("sample --backend trt without TensorRT", lambda c: ["--backend", "trt", *png(c)], ["tensorrt"]),
        sample("sample --backend unknown", lambda c: ["--backend", "tpu", *png(c)], ["backend"]),
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
        t("guidance=True", {"guidance": True}, ["guidance"]), t("eta='0'", {"eta": "0"}, ["eta"]),
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

    def forced_retransform(c: Ctx, stop: Callable[[object], None]) -> tuple[Outcome, Path, str]:
        """A forced re-transform of a copy of the artifact, stopped by `stop(process)` as soon as
        it has begun writing its temporary folder (an event, polled)."""
        target = c.copy_art("target")
        before = tree_hash(target)
        p = proc(["transform", "--plan", "fora:3", "--steps", "30", "--batch", "4", "--out", target, "--force"],
                 c.root)
        deadline = time.time() + 60
        while time.time() < deadline and not list(c.root.glob(".target.tmp-*")):
            time.sleep(0.05)
        stop(p)
        _, err = p.communicate(timeout=120)
        out = Outcome(True, err, traceback="Traceback" in err, code=p.returncode)
        if tree_hash(target) != before:
            out.broken.append("the old artifact changed")
        return out, target, before

    def sigterm_mid(c: Ctx) -> Outcome:
        out, _, _ = forced_retransform(c, lambda p: p.send_signal(signal.SIGTERM))
        if out.code != 130:
            out.broken.append(f"exit {out.code}, expected 130 (interrupted)")
        if leftovers(c.root):
            out.broken.append(f"left behind {leftovers(c.root)}")
        return out

    def sigkill_then_rerun(c: Ctx) -> Outcome:
        out, target, _ = forced_retransform(c, lambda p: p.kill())  # handled: old folder intact, next run works
        out.traceback = False  # a SIGKILLed process prints nothing of its own
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
        # 0 when the whole report reached the pipe before the reader left, 141 (the documented code for a
        # closed stdout) when it had not: which one depends on timing, and both are right; a traceback is not
        return Outcome(p.returncode in (0, 141), err, traceback="Traceback" in err, code=p.returncode)

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
