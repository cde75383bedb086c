"""A real Triton server: `tcgraph serve` started by its absolute path with an empty environment (as a
service manager, cron or a container entry point starts it) on 127.0.0.1, requests over HTTP and
gRPC, the images compared with `tcgraph sample` bit for bit, bad requests answered with clear client
errors (HTTP 400, gRPC INVALID_ARGUMENT) while the model keeps serving, and a clean stop on SIGTERM.
Skipped, with the reason, without the serve extra."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

import tcgraph
from tcgraph.api import to_images
from tcgraph.errors import TcgraphError

pytest.importorskip("pytriton", reason="the serve extra is not installed (pip install -e '.[serve]')")
http = pytest.importorskip("tritonclient.http", reason="the serve extra is not installed (tritonclient[http])")
grpc = pytest.importorskip("tritonclient.grpc", reason="the serve extra is not installed (tritonclient[grpc])")
from tritonclient.utils import InferenceServerException  # noqa: E402

from tcgraph.serve.server import Ports, check_ports  # noqa: E402
from tests.processes import stop  # noqa: E402

MODEL = "digits-fora2"
QUEUE_DELAY_US = 300_000  # long enough that requests sent together are always batched together


def free_base_port() -> int:
    """A port P with P, P+1 and P+2 free on 127.0.0.1 (tcgraph serve's HTTP, gRPC, metrics)."""
    rng = random.Random(os.getpid())
    for _ in range(50):
        base = rng.randrange(20000, 60000)
        try:
            check_ports(Ports.from_base(base))
            return base
        except TcgraphError:
            continue
    raise RuntimeError("no three consecutive free ports found")


def serve_command() -> list[str]:
    """`tcgraph serve` by absolute path: the environment's console script, else this Python with -m."""
    script = Path(sys.executable).parent / "tcgraph"
    return [str(script)] if script.is_file() and os.access(script, os.X_OK) else [sys.executable, "-m", "tcgraph"]


@pytest.fixture(scope="module")
def server(serve_artifact, tmp_path_factory):
    """`tcgraph serve ART --port P` in a subprocess with an empty environment (no PATH: the environment's
    bin/ is not on it) from a folder that holds `lib/python3.X/os.py`, as `/` does where a system
    Python is installed: Triton's isolated stub, left to itself, takes such a folder for its prefix
    and fails to start. Until its endpoints are printed; SIGTERM after."""
    port = free_base_port()
    logs = tmp_path_factory.mktemp("serve-logs")
    decoy = tmp_path_factory.mktemp("cwd")
    (decoy / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}").mkdir(parents=True)
    (decoy / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}" / "os.py").write_text("")
    out, err = open(logs / "out", "w+"), open(logs / "err", "w+")
    cmd = [*serve_command(), "serve", str(serve_artifact), "--port", str(port),
           "--max-queue-delay-us", str(QUEUE_DELAY_US)]
    proc = subprocess.Popen(cmd, stdout=out, stderr=err, stdin=subprocess.DEVNULL, env={}, cwd=decoy)
    deadline = time.monotonic() + 240
    while "stop with Ctrl-C" not in Path(out.name).read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"tcgraph serve did not start: {Path(err.name).read_text()[-2000:]}")
        time.sleep(0.2)
    info = {"proc": proc, "ports": Ports.from_base(port), "out": Path(out.name), "err": Path(err.name), "cmd": cmd}
    yield info
    if proc.poll() is None:  # a failed test skipped the SIGTERM test: stop it in order all the same
        stop(proc)
    out.close()
    err.close()


@pytest.fixture(scope="module")
def clients(server):
    p = server["ports"]
    h = http.InferenceServerClient(f"127.0.0.1:{p.http}", concurrency=8)
    g = grpc.InferenceServerClient(f"127.0.0.1:{p.grpc}")
    yield h, g
    h.close()  # open connections would make Triton wait at shutdown
    g.close()


def inputs(module, classes, seed, classes_dtype=np.int64):
    classes = np.asarray(classes, dtype=classes_dtype).reshape(-1, 1) if np.ndim(classes) < 2 else np.asarray(classes)
    seed = np.full((classes.shape[0], 1), seed, dtype=np.int64) if np.ndim(seed) == 0 else np.asarray(seed)
    a = module.InferInput("CLASSES", list(classes.shape), "INT64" if classes.dtype == np.int64 else "FP32")
    a.set_data_from_numpy(classes)
    b = module.InferInput("SEED", list(seed.shape), "INT64")
    b.set_data_from_numpy(seed)
    return [a, b]


def expected(art, labels, seed) -> np.ndarray:
    samples, _ = tcgraph.sample(art, classes=",".join(map(str, labels)), per_class=1, seed=seed, progress=False)
    return to_images(samples)


def test_serve_prints_the_endpoints(server):
    assert os.path.isabs(server["cmd"][0])
    p = server["ports"]
    out = server["out"].read_text()
    assert f"HTTP     http://127.0.0.1:{p.http}/v2/models/{MODEL}/infer" in out
    assert f"gRPC     127.0.0.1:{p.grpc}" in out and f"127.0.0.1:{p.metrics}/metrics" in out


def test_a_second_serve_on_the_same_port_is_one_clear_error(serve_artifact, server, capsys):
    from tcgraph.cli import main

    assert main(["serve", str(serve_artifact), "--port", str(server["ports"].http)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("tcgraph: error: ") and f"port {server['ports'].http} on 127.0.0.1 (HTTP) is in use" in err


def test_http_and_grpc_answer_as_tcgraph_sample(serve_artifact, clients):
    h, g = clients
    meta = h.get_model_metadata(MODEL)
    assert [(i["name"], i["datatype"], i["shape"]) for i in meta["inputs"]] == [
        ("CLASSES", "INT64", [-1, 1]), ("SEED", "INT64", [-1, 1])]
    assert [(o["name"], o["datatype"], o["shape"]) for o in meta["outputs"]] == [("IMAGES", "UINT8", [-1, 16, 16, 1])]
    got = h.infer(MODEL, inputs(http, [7], 11)).as_numpy("IMAGES")
    assert got.dtype == np.uint8 and np.array_equal(got, expected(serve_artifact, [7], 11))
    got = g.infer(MODEL, inputs(grpc, [3, 3], 2**31 + 4)).as_numpy("IMAGES")
    assert np.array_equal(got, expected(serve_artifact, [3, 3], 2**31 + 4))


def test_concurrent_requests_are_batched_and_each_equals_tcgraph_sample(serve_artifact, clients):
    h, _ = clients
    asks = [([1], 5), ([2, 9], 6), ([4], 7), ([0], 5), ([8], 100), ([6, 6], 3)]
    before = h.get_inference_statistics(MODEL)["model_stats"][0]
    pending = [h.async_infer(MODEL, inputs(http, labels, seed)) for labels, seed in asks]
    results = [p.get_result().as_numpy("IMAGES") for p in pending]
    deadline = time.monotonic() + 10  # Triton may answer a request before it has counted it
    while True:
        after = h.get_inference_statistics(MODEL)["model_stats"][0]
        if int(after["inference_count"]) - int(before["inference_count"]) >= 8 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    for (labels, seed), got in zip(asks, results):
        assert np.array_equal(got, expected(serve_artifact, labels, seed)), (labels, seed)
    images = int(after["inference_count"]) - int(before["inference_count"])
    calls = int(after["execution_count"]) - int(before["execution_count"])
    assert images == 8 and calls < len(asks), (images, calls)  # the dynamic batcher packed requests


CLIENT_ERROR = {"http": "400", "grpc": "StatusCode.INVALID_ARGUMENT"}
BAD = [
    # (classes, seed, message): checked by the model (tcgraph/serve/requests.py) ...
    ([12], 0, "unknown class id 12: this model has 10 classes, valid ids are 0..9"),
    ([-1], 0, "unknown class id -1"),
    ([[1], [2]], [[0], [1]], "SEED must be the same on every row of a request"),
    ([3], 2**32, "SEED must be in 0..4294967295 (the seeds `tcgraph sample --seed` takes"),
    ([3], -2**63, "SEED must be in 0..4294967295"),
    # ... and by Triton itself, from the model's config.pbtxt, before the model sees them
    ([1.0], 0, "inference input 'CLASSES' data-type is 'FP32', but model 'digits-fora2' expects 'INT64'"),
    ([[1, 2]], [[0]], "unexpected shape for input 'CLASSES' for model 'digits-fora2'. Expected [-1,1], got [1,2]"),
    ([1, 2, 3], 0, "inference request batch-size must be <= 2"),
    ([[1], [2]], [[0]], "input 'CLASSES' batch size does not match other inputs"),
    (np.zeros((0, 1), np.int64), np.zeros((0, 1), np.int64), "input byte size mismatch"),  # empty
]


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_bad_requests_get_a_clear_client_error_and_the_model_keeps_serving(serve_artifact, clients, protocol):
    client, module = (clients[0], http) if protocol == "http" else (clients[1], grpc)
    for classes, seed, message in BAD:
        dtype = np.float32 if isinstance(classes, list) and isinstance(classes[0], float) else np.int64
        with pytest.raises(InferenceServerException) as e:
            client.infer(MODEL, inputs(module, classes, seed, dtype))
        assert message in e.value.message(), (classes, e.value.message())
        assert e.value.status() == CLIENT_ERROR[protocol], (classes, e.value.status())  # not retried as a 500
    with pytest.raises(InferenceServerException) as e:
        client.infer(MODEL, inputs(module, [1], 0)[:1])
    assert "missing required input(s) ['SEED']" in e.value.message()
    assert client.is_model_ready(MODEL)
    got = client.infer(MODEL, inputs(module, [5], 8)).as_numpy("IMAGES")
    assert np.array_equal(got, expected(serve_artifact, [5], 8))


def post(server, body: bytes) -> tuple[int, str]:
    url = f"http://127.0.0.1:{server['ports'].http}/v2/models/{MODEL}/infer"
    request = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())["error"]


def column(name, values):
    return {"name": name, "shape": [len(values), 1], "datatype": "INT64", "data": values}


# What Triton answers, before the model, to bodies it cannot use (README, "What a request means").
RAW = [
    (b"", 400, "Raw request must only have 1 input (found 1) to be deduced but got 2 inputs"),
    (b"{}", 500, "Unable to parse 'inputs'"),
    (json.dumps({"inputs": [column("CLASSES", [3]), column("SEED", [7]), column("STEPS", [9])]}).encode(), 400,
     "expected 2 inputs but got 3 inputs for model 'digits-fora2'"),
    (json.dumps({"inputs": [column("CLASSES", []), column("SEED", [])]}).encode(), 400, "input byte size mismatch"),
    (json.dumps({"inputs": [column("CLASSES", [3]), column("SEED", [2**64 - 1])]}).encode(), 500,
     "attempt to access JSON non-signed-integer as signed-integer"),
]


def test_http_bodies_triton_refuses_and_the_json_protocol(serve_artifact, server, clients):
    for body, status, message in RAW:
        assert post(server, body)[:1] == (status,) and message in post(server, body)[1], body
    status, text = post(server, json.dumps({"inputs": [column("CLASSES", [12]), column("SEED", [0])]}).encode())
    assert (status, text) == (400, "unknown class id 12: this model has 10 classes, valid ids are 0..9")
    status, text = post(server, json.dumps({"inputs": [column("CLASSES", [4]), column("SEED", [2**32 - 1])]}).encode())
    images = json.loads(text)["outputs"][0]
    assert status == 200 and images["shape"] == [1, 16, 16, 1]
    assert np.array_equal(np.array(images["data"], np.uint8).reshape(1, 16, 16, 1),
                          expected(serve_artifact, [4], 2**32 - 1))


def test_sigterm_stops_the_server_cleanly(server, clients):
    clients[0].close()
    clients[1].close()
    proc = server["proc"]
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 0
    err = server["err"].read_text()
    assert "stopping the server" in err and "server stopped (exit code 0)" in err and "Traceback" not in err
    workdir = err.split("(log: ")[1].split("/tritonserver.log")[0]
    assert not Path(workdir).exists()  # the private repository is gone
    check_ports(server["ports"])  # the ports are free again
