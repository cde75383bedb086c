"""Artifacts are untrusted input: a tampered folder whose hashes were recomputed (so that the damage
checks pass) carries a payload that would create a marker file if anything ran it; no backend,
`inspect` or `export-triton` runs it (serve: tests/serve/test_untrusted.py).

The payloads: a torch.export archive (`.pt2`, the program format of earlier versions) whose pickled
entry creates the marker when `torch.export.load` reads it (checked here first: the payload is real);
a program file replaced by a pickle; a program graph that calls `builtins.open` on the marker; a
weights file replaced by a pickle.
"""
from __future__ import annotations

import importlib
import shutil
import sys
from pathlib import Path

import pytest
import torch

import tcgraph
from tcgraph.errors import TcgraphError


SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


@pytest.fixture(scope="module")
def tampered():
    """scripts/faults/tampered.py: the payloads the fault battery plants too."""
    sys.path.insert(0, str(SCRIPTS))
    try:
        yield importlib.import_module("faults.tampered")
    finally:
        sys.path.remove(str(SCRIPTS))


def test_the_pt2_payload_is_real(tampered, tmp_path):
    """What the old loader did with such a file: torch.export.load runs the payload."""
    marker = tmp_path / "marker"
    tampered.malicious_pt2(tmp_path / "bad.pt2", marker)
    with pytest.raises(Exception):
        torch.export.load(tmp_path / "bad.pt2")
    assert marker.exists()


@pytest.mark.parametrize("how", ["pt2 archive", "pickle as program", "graph calls python", "pickle as weights"])
def test_no_backend_inspect_or_export_runs_a_tampered_artifact(tampered, demo_fora2_artifact, tmp_path, how):
    marker = tmp_path / "marker"
    art = tmp_path / "art"
    shutil.copytree(demo_fora2_artifact, art)
    tampered.tamper(art, how, marker)
    tcgraph.inspect(art)  # hashes pass (recomputed): inspect reads the manifest and the ONNX graphs only
    for step in (0, 1):
        tcgraph.inspect(art, step=step)
    # torch: every program is read before any step runs, so each program tamper is refused, with its cause
    words = {"pt2 archive": "torch.export archive, which tcgraph no longer loads",
             "pickle as program": "cannot read the torch program", "graph calls python": "'builtins.open'"}
    if how in words:
        with pytest.raises(TcgraphError, match=words[how]):
            tcgraph.sample(art, classes="1", per_class=1, backend="torch")
    for backend in ("ort", "torch") if how not in words else ("ort",):
        try:  # weights are raw bytes and ONNX Runtime reads no program: they sample, or give NaN (refused)
            tcgraph.sample(art, classes="1", per_class=1, backend=backend)
        except TcgraphError as e:
            assert how == "pickle as weights" and "samples hold NaN" in str(e)
    from tcgraph.serve.repository import write_repository

    write_repository(art, tmp_path / "repo")
    assert not marker.exists()
