"""Artifacts are untrusted input: a tampered folder whose hashes were recomputed (so that the damage
checks pass) carries a payload that would create a marker file if anything ran it; no backend,
`inspect` or `export-triton` runs it (serving: tests/serve/test_untrusted.py).

The payloads: a torch.export archive (`.pt2`, the program format of earlier versions) whose pickled
entry creates the marker when `torch.export.load` reads it (checked here first: the payload is real);
a program file replaced by a pickle; a program graph that calls `builtins.open` on the marker; a
weights file replaced by a pickle.
"""
from __future__ import annotations

import io
import json
import pickle
import shutil
import zipfile
from pathlib import Path

import pytest
import torch

import tcgraph
from tcgraph.errors import TcgraphError
from tcgraph.export.onnx import file_sha256


class Payload:
    """Unpickling this opens (creates) the marker file: a stand-in for any code an attacker would run."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return open, (self.marker, "w")


def _malicious_pt2(path: Path, marker: Path) -> None:
    """A real torch.export archive whose sample-inputs entry is a pickle of the payload."""

    class Tiny(torch.nn.Module):
        def forward(self, x):
            return x * 2

    good = path.with_suffix(".good.pt2")
    torch.export.save(torch.export.export(Tiny(), (torch.ones(2),)), good)
    payload = io.BytesIO()
    torch.save(Payload(str(marker)), payload)
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            data = payload.getvalue() if info.filename.endswith("sample_inputs/model.pt") else src.read(info.filename)
            dst.writestr(info, data)
    good.unlink()


def _rehash(art: Path, manifest: dict) -> None:
    manifest["files"] = {p.relative_to(art).as_posix(): file_sha256(p) for p in sorted(art.rglob("*"))
                         if p.is_file() and p.name != "manifest.json"}
    (art / "manifest.json").write_text(json.dumps(manifest))


def _tamper(art: Path, how: str, marker: Path) -> None:
    m = json.loads((art / "manifest.json").read_text())
    first = sorted(m["programs"])[0]
    program = art / m["programs"][first]
    if how == "pt2 archive":
        for vid, rel in list(m["programs"].items()):
            (art / rel).unlink()
            m["programs"][vid] = f"variants/{vid}.pt2"
            _malicious_pt2(art / m["programs"][vid], marker)
    elif how == "pickle as program":
        program.write_bytes(pickle.dumps(Payload(str(marker))))
    elif how == "graph calls python":
        from safetensors.torch import load_file, save_file
        from safetensors import safe_open

        with safe_open(str(program), framework="pt") as f:
            info = json.loads(f.metadata()["tcgraph.program"])
        node = next(n for n in info["graph"]["nodes"] if "target" in n)
        node["target"], node["args"], node["kwargs"] = "builtins.open", [str(marker), "w"], {}
        save_file(load_file(str(program)), str(program), metadata={"tcgraph.program": json.dumps(info)})
    elif how == "pickle as weights":
        weights = art / m["weights"]["file"]
        data = pickle.dumps(Payload(str(marker)))
        weights.write_bytes(data + b"\0" * max(0, weights.stat().st_size - len(data)))
    else:
        raise AssertionError(how)
    _rehash(art, m)


def test_the_pt2_payload_is_real(tmp_path):
    """What the old loader did with such a file: torch.export.load runs the payload."""
    marker = tmp_path / "marker"
    _malicious_pt2(tmp_path / "bad.pt2", marker)
    with pytest.raises(Exception):
        torch.export.load(tmp_path / "bad.pt2")
    assert marker.exists()


TAMPERS = ["pt2 archive", "pickle as program", "graph calls python", "pickle as weights"]


@pytest.mark.parametrize("how", TAMPERS)
def test_no_backend_inspect_or_export_runs_a_tampered_artifact(demo_fora2_artifact, tmp_path, how):
    marker = tmp_path / "marker"
    art = tmp_path / "art"
    shutil.copytree(demo_fora2_artifact, art)
    _tamper(art, how, marker)
    tcgraph.inspect(art)  # hashes pass (recomputed): inspect reads the manifest and the ONNX graphs only
    for step in (0, 1):
        tcgraph.inspect(art, step=step)
    # torch: every program is read before any step runs, so each tamper is refused, with its cause
    words = {"pt2 archive": "torch.export archive, which tcgraph no longer loads",
             "pickle as program": "cannot read the torch program", "graph calls python": "'builtins.open'",
             "pickle as weights": "samples hold NaN"}[how]
    with pytest.raises(TcgraphError, match=words):
        tcgraph.sample(art, classes="1", per_class=1, backend="torch")
    try:  # ONNX Runtime reads no program: it samples, or refuses the weights
        tcgraph.sample(art, classes="1", per_class=1, backend="ort")
    except TcgraphError:
        assert how == "pickle as weights"
    from tcgraph.serve.repository import write_repository

    write_repository(art, tmp_path / "repo")
    assert not marker.exists()
