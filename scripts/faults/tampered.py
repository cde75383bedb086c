"""Cases: tampered artifacts whose payload must never run, links out of the folder, values where they
enter (text embeddings, seeds, the text length, non-finite weights), argument types, a full disk.

A tampered artifact has its hashes recomputed, so that the damage checks pass: what stops the
payload is that nothing tcgraph reads from an artifact is unpickled, imported or evaluated. Each
payload would create a marker file in the case's folder if it ran; its existence afterwards makes
the case `wrong`, whatever the call answered.
"""
from __future__ import annotations

import errno
import io
import json
import os
import pickle
import zipfile
from pathlib import Path
from typing import Callable

from faults.harness import Case, Ctx, Outcome, api, cli, guarded

MARKER = "PAYLOAD-RAN"


class Payload:
    """Unpickling this opens (creates) the marker file: a stand-in for any code an attacker would run."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return open, (self.marker, "w")


def malicious_pt2(path: Path, marker: Path) -> None:
    """A real torch.export archive (the program format of earlier versions) whose sample-inputs entry
    is a pickle of the payload: `torch.export.load` runs it."""
    import torch

    class Tiny(torch.nn.Module):
        def forward(self, x):
            return x * 2

    good = path.with_name("good-" + path.name)
    torch.export.save(torch.export.export(Tiny(), (torch.ones(2),)), good)
    payload = io.BytesIO()
    torch.save(Payload(str(marker)), payload)
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            data = payload.getvalue() if info.filename.endswith("sample_inputs/model.pt") else src.read(info.filename)
            dst.writestr(info, data)
    good.unlink()


def rehash(art: Path, manifest: dict) -> None:
    """Write `manifest` with every file's sha256 recomputed: the damage checks pass."""
    from tcgraph.export.onnx import file_sha256

    manifest["files"] = {p.relative_to(art).as_posix(): file_sha256(p) for p in sorted(art.rglob("*"))
                         if p.is_file() and p.name != "manifest.json"}
    (art / "manifest.json").write_text(json.dumps(manifest))


def tamper(art: Path, how: str, marker: Path) -> None:
    """Plant one payload in the artifact folder `art` (see TAMPERS)."""
    m = json.loads((art / "manifest.json").read_text())
    program = art / m["programs"][sorted(m["programs"])[0]]
    if how == "pt2 archive":
        for vid, rel in list(m["programs"].items()):
            (art / rel).unlink()
            m["programs"][vid] = f"variants/{vid}.pt2"
            malicious_pt2(art / m["programs"][vid], marker)
    elif how == "pickle as program":
        program.write_bytes(pickle.dumps(Payload(str(marker))))
    elif how == "graph calls python":
        from safetensors import safe_open
        from safetensors.torch import load_file, save_file

        with safe_open(str(program), framework="pt") as f:
            info = json.loads(f.metadata()["tcgraph.program"])
        node = next(n for n in info["graph"]["nodes"] if "target" in n)
        node["target"], node["args"], node["kwargs"] = "builtins.open", [str(marker), "w"], {}
        save_file(load_file(str(program)), str(program), metadata={"tcgraph.program": json.dumps(info)})
    elif how == "pickle as weights":
        weights = art / m["weights"]["file"]
        data = pickle.dumps(Payload(str(marker)))
        weights.write_bytes(data + b"\0" * max(0, weights.stat().st_size - len(data)))
    elif how == "pickle as onnx":
        (art / m["variants"][0]["file"]).write_bytes(pickle.dumps(Payload(str(marker))))
    else:
        raise ValueError(how)
    rehash(art, m)


# payload -> the calls that refuse it (the others read nothing of it, or nothing that could run)
TAMPERS = {
    "pt2 archive": {"sample --backend torch"},
    "pickle as program": {"sample --backend torch"},
    "graph calls python": {"sample --backend torch"},
    "pickle as weights": None,  # weights are raw bytes: they sample, or give NaN samples (an error): any
    "pickle as onnx": {"sample --backend ort", "inspect --step 1"},
}
CALLS: dict[str, Callable[[Path, Ctx], list]] = {
    "sample --backend torch": lambda a, c: ["sample", a, "--backend", "torch", "--classes", "1", "--per-class", "1",
                                            "--png", c.root / "s.png"],
    "sample --backend ort": lambda a, c: ["sample", a, "--classes", "1", "--per-class", "1", "--png", c.root / "s.png"],
    "inspect": lambda a, c: ["inspect", a],
    "inspect --step 1": lambda a, c: ["inspect", a, "--step", "1"],
    "export-triton": lambda a, c: ["export-triton", a, c.root / "repo"],
}


def tamper_cases() -> list[Case]:
    def case(how: str, call: str) -> Case:
        def run(c: Ctx) -> Outcome:
            art, marker = c.copy_art(), c.root / MARKER
            tamper(art, how, marker)
            out = guarded(lambda c: cli(CALLS[call](art, c), cwd=c.root))(c)
            if marker.exists():
                out.broken.append("THE PAYLOAD RAN")
            return out
        expect = "any" if TAMPERS[how] is None else "error" if call in TAMPERS[how] else "ok"
        return Case(f"{how}: {call}", "tampered artifacts", run, expect, (), None,
                    quick=call != "export-triton" or how == "pt2 archive")
    return [case(how, call) for how in TAMPERS for call in CALLS]


def _link_edit(kind: str) -> Callable[[Path, Path], None]:
    def edit(art: Path, root: Path) -> None:
        if kind == "plan.json links out":
            (art / "plan.json").rename(root / "plan-elsewhere.json")
            (art / "plan.json").symlink_to(root / "plan-elsewhere.json")
        elif kind == "weights.bin is a link loop":
            (art / "variants/weights.bin").unlink()
            (art / "variants/weights.bin").symlink_to("weights.bin")
        elif kind == "manifest.json is a link loop":
            (art / "manifest.json").unlink()
            (art / "manifest.json").symlink_to("manifest.json")
        elif kind == "the artifact is a link loop":
            import shutil
            shutil.rmtree(art)
            art.symlink_to(art)
    return edit


def link_cases() -> list[Case]:
    def case(kind: str, command: str, words: tuple[str, ...]) -> Case:
        def run(c: Ctx) -> Outcome:
            art = c.copy_art()
            _link_edit(kind)(art, c.root)
            return guarded(lambda c: cli([command, art], cwd=c.root), protect=lambda c: [c.art])(c)
        return Case(f"{kind}: {command}", "links", run, "error", words)

    kinds = {"plan.json links out": ("link to", "outside the artifact folder"),
             "weights.bin is a link loop": ("loop of symbolic links",),
             "manifest.json is a link loop": ("manifest.json",),
             "the artifact is a link loop": ("not a tcgraph artifact",)}
    return [case(kind, command, words) for kind, words in kinds.items() for command in ("sample", "inspect")]


def value_cases() -> list[Case]:
    import torch
    from safetensors.torch import save_file

    def embeddings(name: str, make: Callable[[], dict]) -> Callable[[Ctx], Path]:
        def write(c: Ctx) -> Path:
            path = c.root / f"{name}.safetensors"
            save_file(make(), str(path))
            return path
        return write

    e, m = torch.randn(2, 4, 8), torch.ones(2, 4)
    files = {
        "embeddings of NaN": (lambda: {"prompt_embeds": e * float("nan"), "prompt_attention_mask": m}, "nan"),
        "embeddings of inf": (lambda: {"prompt_embeds": e / 0, "prompt_attention_mask": m}, "infinite"),
        "negative embeddings of NaN": (lambda: {"prompt_embeds": e, "prompt_attention_mask": m,
                                               "negative_prompt_embeds": e * float("nan"),
                                               "negative_prompt_attention_mask": m.clone()}, "negative"),
        "mask of 0.5": (lambda: {"prompt_embeds": e, "prompt_attention_mask": m * 0.5}, "mask"),
        "embeddings of 0 prompts": (lambda: {"prompt_embeds": e[:0], "prompt_attention_mask": m[:0]}, "0 prompts"),
        "mask of 2": (lambda: {"prompt_embeds": e, "prompt_attention_mask": m * 2}, "mask"),
    }
    cases = []
    for name, (make, word) in files.items():
        write = embeddings(name.replace(" ", "-"), make)
        cases.append(Case(f"--embeddings {name}", "values", guarded(
            lambda c, write=write: cli(["sample", c.art, "--embeddings", write(c), "--png", c.root / "s.png"],
                                       cwd=c.root), protect=lambda c: [c.art], absent=lambda c: [c.root / "s.png"]),
            "error", (word,), 2))

    def sample(name, argv, words=(), expect="error", code=None, quick=True) -> Case:
        return Case(name, "values", guarded(lambda c: cli(["sample", c.art, *argv, "--classes", "1", "--per-class", "1",
                                                           "--png", c.root / "s.png"], cwd=c.root),
                                            absent=lambda c: [c.root / "s.png"] if expect == "error" else []),
                    expect, tuple(words), code, quick)

    cases += [
        sample("--seed 4294967296 (would repeat 0)", ["--seed", "4294967296"], ["0..4294967295"], code=2),
        sample("--seed -1 (would repeat 2^32-1)", ["--seed", "-1"], ["seed"], code=2),
        sample("--seed 2^63", ["--seed", str(2**63)], ["seed"], code=2),
        sample("--seed -2^63", ["--seed", str(-(2**63))], ["seed"], code=2),
        sample("--seed 4294967295", ["--seed", "4294967295"], expect="ok", quick=False),
        Case("transform digits-text --text-length 0", "values", guarded(lambda c: cli(
            ["transform", "--model", "digits-text", "--plan", "full", "--text-length", "0", "--out", c.root / "o"]),
            absent=lambda c: [c.root / "o"]), "error", ("text-length", "1.."), 2),
        Case("transform digits-text --text-length -3", "values", guarded(lambda c: cli(
            ["transform", "--model", "digits-text", "--plan", "full", "--text-length", "-3", "--out", c.root / "o"]),
            absent=lambda c: [c.root / "o"]), "error", ("text-length",), 2),
        Case("weights of NaN (hashes updated)", "values", _nan_weights, "error", ("nan", "nothing was written")),
        Case("full disk inside the ONNX exporter", "values", _full_disk, "error", ("no space", "free space")),
    ]
    return cases


def _nan_weights(c: Ctx) -> Outcome:
    import numpy as np

    art = c.copy_art()
    m = json.loads((art / "manifest.json").read_text())
    weights = art / m["weights"]["file"]
    weights.write_bytes(np.full(weights.stat().st_size // 4, np.nan, np.float32).tobytes())
    rehash(art, m)
    return guarded(lambda c: cli(["sample", art, "--classes", "1", "--per-class", "1", "--png", c.root / "s.png",
                                  "--npy", c.root / "s.npy"], cwd=c.root),
                   absent=lambda c: [c.root / "s.png", c.root / "s.npy"])(c)


def _full_disk(c: Ctx) -> Outcome:
    import torch

    def full(*args, **kwargs):  # the exporter wraps the OSError of its writes in its own error types
        try:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except OSError as e:
            raise RuntimeError("failed to save the ONNX model") from e

    real = torch.onnx.export
    torch.onnx.export = full
    try:
        import tcgraph
        return guarded(lambda c: api(lambda: tcgraph.transform("digits", "full", c.root / "o", steps=2, batch=1,
                                                               progress=False)), absent=lambda c: [c.root / "o"])(c)
    finally:
        torch.onnx.export = real


def type_cases() -> list[Case]:
    import tcgraph
    from tcgraph import api as tapi
    from tcgraph.models import load_model

    calls = {
        "load_model(None)": (lambda c: load_model(None), "model"),
        "load_model(3.5)": (lambda c: load_model(3.5), "model"),
        "inspect(123)": (lambda c: tcgraph.inspect(123), "artifact"),
        "inspect(None)": (lambda c: tcgraph.inspect(None), "artifact"),
        "inspect_pictures(art, None)": (lambda c: tapi.inspect_pictures(c.art, None), "out_dir"),
        "inspect_pictures(7, dir)": (lambda c: tapi.inspect_pictures(7, c.root / "p"), "artifact"),
        "sample(None)": (lambda c: tcgraph.sample(None), "artifact"),
        "sample(seed=2**32)": (lambda c: tcgraph.sample(c.art, classes="1", per_class=1, seed=2**32,
                                                        progress=False), "seed"),
    }
    return [Case(name, "API types", guarded(lambda c, f=f: api(lambda: f(c))), "error", (word,))
            for name, (f, word) in calls.items()]


def new_surface_cases() -> list[Case]:
    return tamper_cases() + link_cases() + value_cases() + type_cases()
