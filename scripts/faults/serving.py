"""Cases: serving. `export-triton` into shared repositories (other models, copied markers, paths
inside the artifact, what can never load), `serve` checks before the server starts, requests
checked by the model (tcgraph.serve.requests, the batch handler), and, with a real server (not
quick), requests over HTTP and `tcgraph serve` started by its path with an empty environment."""
from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

from faults.harness import Case, Ctx, Outcome, api, cli, guarded

MODEL = "shared-art"  # the model name export-triton gives the shared artifact (its folder's name)
MARKER = "tcgraph-model.json"
_SHARED: dict = {}  # made once per battery run: a text-conditioned artifact, a running server


#################################################################################
#                                 export-triton                                 #
#################################################################################


def other_model(repo: Path, name: str = "resnet") -> Path:
    """A model another tool keeps in the same repository."""
    (repo / name / "1").mkdir(parents=True)
    (repo / name / "config.pbtxt").write_text(f'name: "{name}"\nplatform: "onnxruntime_onnx"\n')
    (repo / name / "1" / "model.onnx").write_bytes(bytes(range(256)) * 8)
    return repo / name


def _ours(c: Ctx, name: str = MODEL) -> Path:
    """REPO with a model folder tcgraph wrote (the shared artifact); returns REPO."""
    from tcgraph.serve.repository import write_repository

    return write_repository(c.art, c.root / "repo", name=name)


def _copy_marker(c: Ctx, victim: str, rename: bool) -> None:
    repo = _ours(c)
    marker = json.loads((repo / MODEL / MARKER).read_text())
    if rename:
        marker["model"] = victim
    folder = repo / victim if victim != "resnet" else other_model(repo)
    folder.mkdir(exist_ok=True)
    (folder / MARKER).write_text(json.dumps(marker))


def _edit_ours(change: Callable[[Path], None]) -> Callable[[Ctx], None]:
    def setup(c: Ctx) -> None:
        change(_ours(c) / MODEL)
    return setup


def _marker_lists_outside(folder: Path) -> None:
    marker = json.loads((folder / MARKER).read_text())
    marker["files"]["../../../etc/hostname"] = "0" * 64
    (folder / MARKER).write_text(json.dumps(marker))


def _interrupted_swap(c: Ctx) -> None:
    """A writer killed between its two renames: the old model folder waits in its temporary."""
    repo = _ours(c, "kept")
    dead = 4_000_000  # above pid_max: never a running process
    old = c.root / f".repo.tmp-{dead}-0123abcd" / "old"
    old.mkdir(parents=True)
    (repo / "kept").rename(old / "kept")


def export_cases() -> list[Case]:
    def case(name, argv: Callable[[Ctx], list], words=(), expect="error", code=None, setup=None,
             protect: Callable[[Ctx], list[Path]] = lambda c: [], check=None, quick=True, art=None) -> Case:
        def run(c: Ctx) -> Outcome:
            if setup is not None:
                setup(c)
            source = art(c) if art is not None else c.art
            out = guarded(lambda c: cli(["export-triton", source, *argv(c)], cwd=c.root),
                          protect=lambda c: [c.art, *protect(c)])(c)
            if check is not None:
                out.broken += check(c)
            return out
        return Case(name, "export-triton", run, expect, tuple(words), code, quick)

    repo = lambda c: [c.root / "repo"]  # noqa: E731
    force = lambda *more: lambda c: [c.root / "repo", "--force", *more]  # noqa: E731
    kept = lambda c: [p for p in (c.root / "repo" / n for n in ("resnet", "victim", MODEL)) if p.exists()]  # noqa: E731

    def other_survives(c: Ctx) -> list[str]:
        ok = (c.root / "repo" / "resnet" / "1" / "model.onnx").read_bytes() == bytes(range(256)) * 8
        ok = ok and sorted(os.listdir(c.root / "repo")) == sorted([MODEL, "resnet"])
        return [] if ok else ["the other model changed"]

    def restored(c: Ctx) -> list[str]:
        from tcgraph.serve.repository import check_repository

        check_repository(c.root / "repo", "kept")
        return [] if (c.root / "repo" / MODEL).is_dir() else ["the new model is missing"]

    def file_repo(c: Ctx) -> None:
        (c.root / "repo").write_text("a file")

    def link_into_art(c: Ctx) -> None:
        os.symlink(c.art / "variants", c.root / "repo")

    def dangling(c: Ctx) -> None:
        os.symlink(c.root / "nowhere", c.root / "repo")

    return [
        case("REPO is a file", repo, ["is a file, not a folder"], code=1, setup=file_repo,
             protect=lambda c: [c.root / "repo"]),
        case("REPO below a file", lambda c: [c.root / "repo" / "r"], ["is a file, not a folder"], setup=file_repo,
             protect=lambda c: [c.root / "repo"]),
        case("REPO a dangling link", repo, ["symbolic link that leads to no folder"], setup=dangling),
        case("REPO inside the artifact (ART/repo)", lambda c: [c.root / "art" / "repo"], ["inside the artifact"],
             code=2, art=lambda c: c.copy_art(), protect=lambda c: [c.root / "art"]),
        case("REPO is the artifact", lambda c: [c.root / "art"], ["inside the artifact"], code=2,
             art=lambda c: c.copy_art(), protect=lambda c: [c.root / "art"]),
        case("REPO a link into the artifact", lambda c: [c.root / "repo" / "r"], ["inside the artifact", "links"],
             code=2, setup=link_into_art),
        case("another model kept through --force", force(), expect="ok",
             setup=lambda c: (other_model(_ours(c))), check=other_survives),
        case("another model kept: a new model beside it", repo, expect="ok",
             setup=lambda c: other_model(c.root / "repo"), check=other_survives),
        case("--force --name of another model", force("--name", "resnet"), ["not a model folder that tcgraph wrote"],
             code=2, setup=lambda c: other_model(c.root / "repo"), protect=kept),
        case("existing model without --force", repo, ["already exists", "--force"], code=1,
             setup=lambda c: _ours(c), protect=kept),
        case("copied marker in an empty folder", force("--name", "victim"), ["copied from another model folder"],
             code=2, setup=lambda c: _copy_marker(c, "victim", False), protect=kept),
        case("copied marker, model name edited", force("--name", "victim"), ["is missing"], code=2,
             setup=lambda c: _copy_marker(c, "victim", True), protect=kept),
        case("copied marker in another model", force("--name", "resnet"), ["was not written by tcgraph"], code=2,
             setup=lambda c: _copy_marker(c, "resnet", True), protect=kept),
        case("our model with a file added", force(), ["notes.txt was not written by tcgraph"], code=2,
             setup=_edit_ours(lambda f: (f / "notes.txt").write_text("mine")), protect=kept),
        case("our model with config.pbtxt edited", force(), ["config.pbtxt changed"], code=2,
             setup=_edit_ours(lambda f: (f / "config.pbtxt").write_text("name: \"x\"\n")), protect=kept),
        case("our model's marker lists ../ paths", force(), ["damaged"], code=2,
             setup=_edit_ours(_marker_lists_outside), protect=kept),
        case("model folder is a link to our model", force("--name", "alias"), ["symbolic link"], code=2,
             setup=lambda c: os.symlink(_ours(c) / MODEL, c.root / "repo" / "alias"), protect=kept),
        case("ART inside the model folder --force replaces", force("--name", MODEL), ["inside the model folder"],
             code=2, setup=lambda c: _ours(c), art=lambda c: c.root / "repo" / MODEL / "1" / "artifact", protect=kept),
        case("--backend trt without engines", lambda c: [c.root / "repo", "--backend", "trt"],
             ["no tensorrt engines", "could never load"], code=1, check=lambda c: _absent(c.root / "repo")),
        case("--backend trt --device cpu", lambda c: [c.root / "repo", "--backend", "trt", "--device", "cpu"],
             ["nvidia gpus"], code=2, check=lambda c: _absent(c.root / "repo")),
        case("--name ../up", lambda c: [c.root / "repo", "--name", "../up"], ["not usable"], code=2),
        case("--name .hidden", lambda c: [c.root / "repo", "--name", ".hidden"], ["not usable"], code=2),
        case("a killed writer's swap is undone", lambda c: [c.root / "repo"], expect="ok", setup=_interrupted_swap,
             check=restored),
        case("text-conditioned artifact", repo, ["text-conditioned", "class-conditioned"], code=1,
             art=lambda c: text_artifact(), check=lambda c: _absent(c.root / "repo"), quick=False),
    ]


def _absent(path: Path) -> list[str]:
    return [f"{path.name} was written"] if os.path.lexists(path) else []


def text_artifact() -> Path:
    """The digits-text demo, 2 steps, batch 1 (about 30 s), made once per battery run."""
    if "text" not in _SHARED:
        folder = Path(tempfile.mkdtemp(prefix="battery-text-"))
        atexit.register(shutil.rmtree, folder, True)
        art = folder / "digits-text"
        out = cli(["transform", "--model", "digits-text", "--plan", "full", "--steps", "2", "--batch", "1", "--out",
                   art])
        assert out.ok, out.message
        _SHARED["text"] = art
    return _SHARED["text"]


#################################################################################
#                           serve: before the server                            #
#################################################################################


class _EnginesButNoTensorRT:
    """An artifact whose manifest names engines of another TensorRT (what check_backend_here reads)."""
    tensorrt = {"tensorrt_version": "0.0.1", "device": {"name": "none", "compute_capability": "0.0"}, "engines": {}}


def serve_cases() -> list[Case]:
    def serve(name, argv: Callable[[Ctx], list], words=(), code=None, quick=True, art=None) -> Case:
        def run(c: Ctx) -> Outcome:
            source = art() if art is not None else c.art
            return guarded(lambda c: cli(["serve", source, *argv(c)], cwd=c.root), protect=lambda c: [c.art])(c)
        return Case(name, "serve", run, "error", tuple(words), code, quick)

    def here(backend: str, device: str | None, art=None):
        def run(c: Ctx) -> Outcome:
            from tcgraph.export.artifact import load_artifact
            from tcgraph.serve.launch import check_backend_here

            return api(lambda: check_backend_here(art or load_artifact(c.art), backend, device))
        return run

    return [
        serve("serve --backend trt without engines", lambda c: ["--backend", "trt"], ["no tensorrt engines"], 1),
        serve("serve --port 0", lambda c: ["--port", "0"], ["--port", "1..65533"], 2),
        serve("serve --port 65534", lambda c: ["--port", "65534"], ["--port"], 2),
        serve("serve a missing artifact", lambda c: [], ["not a tcgraph artifact"], 1,
              art=lambda: Path("/nonexistent/art")),
        serve("serve --name with a slash", lambda c: ["--name", "a/b"], ["not usable"], 2),
        Case("serve --backend trt: engines of another TensorRT", "serve",
             guarded(here("trt", None, _EnginesButNoTensorRT())), "error", ("tensorrt",)),
        Case("serve --device cuda: a GPU or a clear error", "serve", guarded(here("ort", "cuda")), "any", ("cuda",)),
        serve("serve a text-conditioned artifact", lambda c: ["--port", "1"], ["text-conditioned"], 1, quick=False,
              art=text_artifact),
    ]


#################################################################################
#                         requests, as the model checks them                    #
#################################################################################


def _request(fn: Callable[[], object]) -> Outcome:
    """A request check: BadRequest is the model's clear answer (a client error); anything else escaping
    is a traceback."""
    from tcgraph.serve.requests import BadRequest

    try:
        fn()
    except BadRequest as e:
        return Outcome(False, f"tcgraph: error: {e}", code=400)
    except BaseException as e:  # noqa: BLE001
        return Outcome(False, f"{type(e).__name__}: {e}", traceback=True)
    return Outcome(True)


def request_cases() -> list[Case]:
    import numpy as np

    def col(*values, dtype=np.int64):
        return np.array(values, dtype=dtype).reshape(-1, 1)

    def case(name, classes, seed, words=(), expect="error") -> Case:
        from tcgraph.serve.requests import check_request

        run = lambda c: _request(lambda: check_request(classes, seed, num_classes=10, max_images=4))  # noqa: E731
        return Case(name, "requests", run, expect, tuple(words), 400 if expect == "error" else None)

    return [
        case("class id 10 of 10", col(10), col(0), ["unknown class id 10", "0..9"]),
        case("class id -1", col(-1), col(0), ["unknown class id -1"]),
        case("class id int64 max", col(2**63 - 1), col(0), ["unknown class id"]),
        case("no rows", col(), col(), ["empty"]),
        case("5 images, max 4", col(1, 2, 3, 4, 5), col(0, 0, 0, 0, 0), ["more than the 4"]),
        case("CLASSES float32", col(1.0, dtype=np.float32), col(0), ["int64", "float32"]),
        case("CLASSES [2, 2]", np.zeros((2, 2), np.int64), col(0, 0), ["shape"]),
        case("SEED rows != CLASSES rows", col(1, 2), col(0), ["seed on every row"]),
        case("SEED differs by row", col(1, 2), col(5, 6), ["same on every row"]),
        case("SEED missing", col(1), None, ["seed is missing"]),
        case("SEED 2^32 (would repeat 0)", col(1), col(2**32), ["0..4294967295", "low 32 bits"]),
        case("SEED -1 (would repeat 2^32-1)", col(1), col(-1), ["0..4294967295"]),
        case("SEED -2^63 (would repeat 0)", col(1), col(-2**63), ["0..4294967295"]),
        case("SEED 2^32-1", col(1), col(2**32 - 1), expect="ok"),
        case("CLASSES as [n]", np.array([3, 3], np.int64), np.array([9, 9], np.int64), expect="ok"),
        Case("a batch of good and bad requests", "requests", _mixed_batch, "ok"),
    ]


def _mixed_batch(c: Ctx) -> Outcome:
    """The handler answers each request of a batch: images for the good (equal to `sample`'s), a client
    refusal for the bad, and the model goes on."""
    import numpy as np

    import tcgraph
    from tcgraph.api import to_images
    from tcgraph.serve.handler import BatchHandler, Refusal

    handler = BatchHandler(c.art)
    try:
        answers = handler.answer([(np.array([[7]]), np.array([[11]])), (np.array([[12]]), np.array([[0]])),
                                  (np.array([[3]]), np.array([[2**32]]))])
    finally:
        handler.close()
    out = Outcome(True)
    want, _ = tcgraph.sample(c.art, classes="7", per_class=1, seed=11, progress=False)
    if not (isinstance(answers[0], np.ndarray) and np.array_equal(answers[0], to_images(want))):
        out.broken.append("the good request's images differ from tcgraph sample's")
    if not all(isinstance(a, Refusal) and a.client for a in answers[1:]):
        out.broken.append(f"bad requests not refused as client errors: {answers[1:]}")
    return out


#################################################################################
#                      with a real server (quick=False)                         #
#################################################################################


def _server(art: Path) -> int:
    """The HTTP port of one server of the shared artifact (model "m", batch 4), started once per run."""
    if "server" not in _SHARED:
        from tcgraph.serve.repository import write_repository
        from tcgraph.serve.server import Ports, TritonServer

        work = Path(tempfile.mkdtemp(prefix="battery-serve-"))
        atexit.register(shutil.rmtree, work, True)
        write_repository(art, work / "repo", name="m", max_queue_delay_us=1000)
        server = TritonServer(work / "repo", Ports.free()).__enter__()
        atexit.register(server.stop)
        _SHARED["server"] = server
    return _SHARED["server"].ports.http


def _post(port: int, body: bytes, model: str = "m") -> tuple[int, str]:
    import urllib.error
    import urllib.request

    request = urllib.request.Request(f"http://127.0.0.1:{port}/v2/models/{model}/infer", data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read()).get("error", "")


def _body(classes: list, seed: list, dtype: str = "INT64", extra: bool = False) -> bytes:
    inputs = [{"name": "CLASSES", "shape": [len(classes), 1], "datatype": dtype, "data": classes},
              {"name": "SEED", "shape": [len(seed), 1], "datatype": "INT64", "data": seed}]
    if extra:
        inputs.append({"name": "STEPS", "shape": [1, 1], "datatype": "INT64", "data": [9]})
    return json.dumps({"inputs": inputs}).encode()


def http_cases() -> list[Case]:
    def case(name, body: bytes, words=(), expect="error") -> Case:
        def run(c: Ctx) -> Outcome:
            code, text = _post(_server(c.art), body)
            if code != 200:
                return Outcome(False, f"tcgraph: error: HTTP {code}: {text}", code=code)
            if expect == "ok":
                return _same_as_sample(c.art, json.loads(text), json.loads(body))
            return Outcome(True)
        return Case(name, "requests over HTTP", run, expect, tuple(words), 400 if expect == "error" else None,
                    quick=False)

    return [
        case("HTTP: class id 12", _body([12], [0]), ["unknown class id 12", "0..9"]),
        case("HTTP: SEED 2^32", _body([3], [2**32]), ["0..4294967295"]),
        case("HTTP: SEED -2^63", _body([3], [-2**63]), ["0..4294967295"]),
        case("HTTP: seeds differ by row", _body([3, 4], [1, 2]), ["same on every row"]),
        case("HTTP: CLASSES FP32 (Triton)", _body([3.0], [0], "FP32"), ["data-type is 'fp32'", "int64"]),
        case("HTTP: 5 images, batch 4 (Triton)", _body([1, 2, 3, 4, 5], [0] * 5), ["batch-size must be <= 4"]),
        case("HTTP: extra input (Triton)", _body([3], [0], extra=True), ["expected 2 inputs but got 3"]),
        case("HTTP: empty body (Triton)", b"", ["raw request", "2 inputs"]),
        case("HTTP: good request equals tcgraph sample", _body([3, 3, 7], [42] * 3), expect="ok"),
        Case("serve by its path, empty environment", "serve", _serve_bare, "ok", quick=False),
    ]


def _same_as_sample(art: Path, answer: dict, request: dict) -> Outcome:
    import numpy as np

    import tcgraph
    from tcgraph.api import to_images

    labels, seed = request["inputs"][0]["data"], request["inputs"][1]["data"][0]
    want, _ = tcgraph.sample(art, classes=",".join(map(str, labels)), per_class=1, seed=seed, progress=False)
    got = np.array(answer["outputs"][0]["data"], np.uint8).reshape(answer["outputs"][0]["shape"])
    return Outcome(True) if np.array_equal(got, to_images(want)) else Outcome(True, broken=["images differ"])


def _serve_bare(c: Ctx) -> Outcome:
    """`tcgraph serve` by its absolute path, env -i style, from a folder holding lib/python3.X/os.py
    (as / does with a system Python): it must start, answer as `sample` does, and stop on SIGTERM."""
    from tcgraph.serve.server import Ports, check_ports

    script = Path(sys.executable).parent / "tcgraph"
    cmd = [str(script)] if os.access(script, os.X_OK) else [sys.executable, "-m", "tcgraph"]
    decoy = c.root / "cwd" / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}"
    decoy.mkdir(parents=True)
    (decoy / "os.py").write_text("")
    port = Ports.free().http
    while True:
        try:
            check_ports(Ports.from_base(port))
            break
        except Exception:  # noqa: BLE001 - P+1 or P+2 taken: another base
            port = Ports.free().http
    log = open(c.root / "serve.log", "w+")
    proc = subprocess.Popen([*cmd, "serve", str(c.art), "--port", str(port)], env={}, cwd=c.root / "cwd",
                            stdout=subprocess.PIPE, stderr=log, text=True)
    try:
        deadline = time.monotonic() + 240
        while "stop with Ctrl-C" not in (line := proc.stdout.readline()):
            if not line and proc.poll() is not None or time.monotonic() > deadline:
                return Outcome(False, "tcgraph: error: did not start: " + (c.root / "serve.log").read_text()[-600:])
        body = _body([5], [8])
        code, text = _post(port, body, model=c.art.name)
        out = _same_as_sample(c.art, json.loads(text), json.loads(body)) if code == 200 else \
            Outcome(False, f"tcgraph: error: HTTP {code}: {text}")
        proc.send_signal(signal.SIGTERM)
        if proc.wait(timeout=120) != 0:
            out.broken.append(f"exit {proc.returncode} after SIGTERM")
        return out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()


def serving_cases() -> list[Case]:
    return export_cases() + serve_cases() + request_cases() + http_cases()
