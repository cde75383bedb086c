"""`tcgraph serve` of a tampered artifact (hashes recomputed; a payload that creates a marker file if
anything runs it): the torch backend refuses it before any server starts; ONNX Runtime, which reads
no program, serves it, answers as `tcgraph sample` does, and the payload never runs
(tests/test_untrusted_artifacts.py: the other readers)."""
from __future__ import annotations

import importlib
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("pytriton", reason="the serve extra is not installed (pip install -e '.[serve]')")
http = pytest.importorskip("tritonclient.http", reason="the serve extra is not installed (tritonclient[http])")

from tcgraph.cli import main  # noqa: E402
from tests.serve.test_triton import expected, free_base_port, inputs, serve_command  # noqa: E402

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


@pytest.fixture(scope="module")
def tampered(serve_artifact, tmp_path_factory):
    sys.path.insert(0, str(SCRIPTS))
    try:
        faults = importlib.import_module("faults.tampered")
    finally:
        sys.path.remove(str(SCRIPTS))
    root = tmp_path_factory.mktemp("tampered")
    art, marker = root / "art", root / "marker"
    shutil.copytree(serve_artifact, art)
    faults.tamper(art, "pt2 archive", marker)
    return art, marker


def test_serve_with_torch_refuses_the_tampered_programs_before_starting(tampered, capsys):
    art, marker = tampered
    assert main(["serve", str(art), "--backend", "torch", "--port", str(free_base_port())]) == 1
    err = capsys.readouterr().err
    assert "torch.export archive, which tcgraph no longer loads" in err and "starting Triton" not in err
    assert not marker.exists()


def test_serve_with_ort_answers_and_the_payload_never_runs(tampered, tmp_path):
    art, marker = tampered
    port = free_base_port()
    out, err = open(tmp_path / "out", "w+"), open(tmp_path / "err", "w+")
    proc = subprocess.Popen([*serve_command(), "serve", str(art), "--port", str(port)], stdout=out, stderr=err,
                            stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while "stop with Ctrl-C" not in (tmp_path / "out").read_text():
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "err").read_text()[-2000:]
            time.sleep(0.2)
        client = http.InferenceServerClient(f"127.0.0.1:{port}")
        try:
            got = client.infer("art", inputs(http, [3, 5], 7)).as_numpy("IMAGES")
        finally:
            client.close()
        np.testing.assert_array_equal(got, expected(art, [3, 5], 7))
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        out.close()
        err.close()
    assert not marker.exists()
