"""`tcgraph serve ART`: one artifact on a Triton server on localhost, until Ctrl-C or SIGTERM.

Checks first, in a second (the serve extra, the artifact with its hashes, that the model can
serve it, and here: TensorRT and its engines for `--backend trt`, a GPU for `--device cuda`;
the ports), then
writes a private model repository (the artifact's files hard-linked where possible) into a
temporary folder, starts the server, waits until the model has loaded, prints the
endpoints and waits. Ctrl-C and SIGTERM (the CLI turns both into KeyboardInterrupt) stop
the server in order (Triton unloads the model), delete the temporary folder, and return 0.
A server that dies on its own is an error (exit 1) with its last log lines.
"""
from __future__ import annotations

import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

from tcgraph.errors import TcgraphError, UsageError
from tcgraph.export.artifact import load_artifact
from tcgraph.serve.config import DEFAULT_QUEUE_DELAY_US, check_name, default_name
from tcgraph.serve.repository import check_servable, write_repository
from tcgraph.serve.server import Ports, TritonServer, check_ports
from tcgraph.serve.triton import find_triton

DEFAULT_PORT = 8000


def serve(artifact: str | Path, *, port: int = DEFAULT_PORT, backend: str = "ort", device: str | None = None,
          name: str | None = None, instances: int = 1, max_queue_delay_us: int = DEFAULT_QUEUE_DELAY_US,
          say: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True)) -> int:
    """Serve until interrupted (Ctrl-C, SIGTERM); returns 0 after a clean stop."""
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65533:
        raise UsageError(f"port (--port) must be in 1..65533 (P, P+1 and P+2 are used), got {port!r}")
    dist = find_triton()  # the serve extra, before anything else
    artifact = Path(artifact)
    art = load_artifact(artifact)  # missing or damaged: refused now, by file name
    check_servable(art, artifact, backend, device)
    check_backend_here(art, backend, device)
    name = check_name(name if name is not None else default_name(artifact.resolve().name))
    ports = Ports.from_base(port)
    check_ports(ports)
    workdir = Path(tempfile.mkdtemp(prefix="tcgraph-serve-"))
    try:
        write_repository(artifact, workdir / "repository", name=name, instances=instances,
                         max_queue_delay_us=max_queue_delay_us, backend=backend, device=device, link=True, log=say)
        server = TritonServer(workdir / "repository", ports, workdir=workdir, dist=dist)
        say(f"starting Triton Inference Server on {ports.urls()['HTTP']} (log: {workdir / 'tritonserver.log'}) …")
        started = time.monotonic()
        try:
            server.start()
            server.wait_ready()
            say(f"model {name!r} ready after {time.monotonic() - started:.1f} s")
            urls = ports.urls()
            print(f"serving {artifact} as model {name!r} (backend {backend})")
            print(f"  HTTP     {urls['HTTP']}/v2/models/{name}/infer")
            print(f"  gRPC     {urls['gRPC']}")
            print(f"  metrics  {urls['metrics']}")
            print("stop with Ctrl-C or SIGTERM", flush=True)
            _wait(server)
        except KeyboardInterrupt:
            say("stopping the server (unloading the model) …")
        finally:
            code = server.stop()
        say(f"server stopped (exit code {code})")
        return 0
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def check_backend_here(art, backend: str, device: str | None) -> None:
    """What the model will need when it loads on this machine, checked now: Triton would only
    say it in its log, after the server started."""
    if backend == "trt":
        from tcgraph.runtime.trt import check_engines, cuda_device_info, import_tensorrt

        trt = import_tensorrt()
        info = cuda_device_info()
        check_engines(art.tensorrt, tensorrt_version=str(trt.__version__), device_name=info["name"],
                      compute_capability=info["compute_capability"])
    elif backend == "torch":  # every program is read now (data only, nothing runs): a refused one fails here
        from tcgraph.export.programs import read_program

        for vid, rel in art.programs.items():
            read_program(art.file(rel))
    if backend != "trt" and device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise TcgraphError(f"--device cuda: torch sees no CUDA device here (torch {torch.__version__}); serve on "
                               "a machine with an NVIDIA GPU and a CUDA build of torch, or drop --device cuda")


def _wait(server: TritonServer) -> None:
    while server.running():
        time.sleep(0.5)
    raise TcgraphError(f"the Triton server stopped by itself (exit code {server.process.returncode}): "
                       f"{server.log_tail()}")


def export_triton(artifact: str | Path, repo: str | Path, **options) -> Path:
    """`tcgraph export-triton ART REPO`: write_repository with progress on stderr."""
    from tcgraph.progress import bars

    return write_repository(artifact, repo, log=lambda line: print(line, file=sys.stderr, flush=True),
                            progress=bars(sys.stderr.isatty()), **options)
