"""A Triton server process on localhost for one model repository: start, wait until ready, stop.

`TritonServer` is what `tcgraph serve`, the tests and the benchmark use. It listens on
127.0.0.1 only (HTTP, gRPC, metrics on three ports), checks the ports before it starts,
waits until `/v2/health/ready` answers (with `--strict-readiness` that means every model
has loaded), and stops with SIGTERM, which Triton answers by unloading its models (then
SIGKILL after a grace period). The server is started in its own session (a Ctrl-C in the
terminal reaches tcgraph, which stops it in order) and dies with the process that started
it (PR_SET_PDEATHSIG), so that a killed `tcgraph serve` leaves no server behind.
"""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tcgraph.errors import TcgraphError
from tcgraph.serve.triton import TritonDist, backend_folder, find_triton, stub_environment

HOST = "127.0.0.1"
READY_TIMEOUT_S = 300.0
EXIT_TIMEOUT_S = 10  # Triton's wait for open connections and requests in flight when it stops
STOP_TIMEOUT_S = EXIT_TIMEOUT_S + 20.0


@dataclass(frozen=True)
class Ports:
    http: int
    grpc: int
    metrics: int

    @classmethod
    def from_base(cls, port: int) -> "Ports":
        """`tcgraph serve --port P`: HTTP on P, gRPC on P+1, metrics on P+2 (Triton's 8000/8001/8002)."""
        return cls(port, port + 1, port + 2)

    @classmethod
    def free(cls) -> "Ports":
        """Three ports free right now (the kernel picks them), for tests and benchmarks."""
        socks = []
        try:
            for _ in range(3):
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                s.bind((HOST, 0))
                socks.append(s)
            return cls(*(s.getsockname()[1] for s in socks))
        finally:
            for s in socks:
                s.close()

    def urls(self) -> dict[str, str]:
        return {"HTTP": f"http://{HOST}:{self.http}", "gRPC": f"{HOST}:{self.grpc}",
                "metrics": f"http://{HOST}:{self.metrics}/metrics"}


def check_ports(ports: Ports, option: str = "--port") -> None:
    """One clear error for a port that is taken or not a port, before the server starts."""
    for what, port in (("HTTP", ports.http), ("gRPC", ports.grpc), ("metrics", ports.metrics)):
        if not 1 <= port <= 65535:
            raise TcgraphError(f"the {what} port {port} is not a TCP port (1..65535); choose another {option}")
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds: TIME_WAIT is no obstacle
            try:
                s.bind((HOST, port))
            except OSError as e:
                why = "is in use" if e.errno == errno.EADDRINUSE else f"cannot be used ({e.strerror})"
                raise TcgraphError(f"port {port} on {HOST} ({what}) {why}; choose another {option} "
                                   "(tcgraph serve uses P for HTTP, P+1 for gRPC, P+2 for metrics)") from None


class TritonServer:
    """`with TritonServer(repo, ports) as server:` … the server is ready inside, stopped after."""

    def __init__(self, repository: str | Path, ports: Ports, *, workdir: str | Path | None = None,
                 dist: TritonDist | None = None, ready_timeout_s: float = READY_TIMEOUT_S):
        self.repository = Path(repository)
        self.ports = ports
        self.dist = dist or find_triton()
        self._own_workdir = workdir is None
        self.workdir = Path(workdir) if workdir is not None else None
        self.ready_timeout_s = ready_timeout_s
        self.process: subprocess.Popen | None = None
        self.log_path: Path | None = None

    def __enter__(self) -> "TritonServer":
        self.start()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def command(self, backends: Path) -> list[str]:
        p = self.ports
        return [str(self.dist.binary), f"--model-repository={self.repository}", f"--backend-directory={backends}",
                "--model-control-mode=none", "--strict-readiness=true", "--exit-on-error=true",
                f"--http-address={HOST}", f"--http-port={p.http}", f"--grpc-address={HOST}", f"--grpc-port={p.grpc}",
                f"--metrics-address={HOST}", f"--metrics-port={p.metrics}", "--allow-gpu-metrics=false",
                f"--exit-timeout-secs={EXIT_TIMEOUT_S}", "--log-verbose=0"]

    def start(self) -> None:
        """Start the server (a restart after `kill` included); returns once the process runs."""
        check_ports(self.ports)
        if self.workdir is None:
            self.workdir = Path(tempfile.mkdtemp(prefix="tcgraph-triton-"))
        backends = self.workdir / "backends"
        if not backends.is_dir():
            backend_folder(self.dist, self.workdir)
        reap_orphan_stubs(backends)  # those of a server of this folder that was killed
        self.log_path = self.workdir / "tritonserver.log"
        with open(self.log_path, "ab") as log:
            env = stub_environment(self.dist, workdir=self.workdir)
            self.process = subprocess.Popen(self.command(backends), stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, env=env, start_new_session=True,
                                            preexec_fn=_die_with_parent)

    def wait_ready(self) -> None:
        deadline = time.monotonic() + self.ready_timeout_s
        url = f"http://{HOST}:{self.ports.http}/v2/health/ready"
        while True:
            if self.process is None or self.process.poll() is not None:
                code = None if self.process is None else self.process.returncode
                raise TcgraphError(f"the Triton server stopped while starting (exit code {code}): "
                                   f"{self.log_tail()}")
            with contextlib.suppress(OSError, urllib.error.URLError):
                with urllib.request.urlopen(url, timeout=2) as r:
                    if r.status == 200:
                        return
            if time.monotonic() > deadline:
                self.stop()
                raise TcgraphError(f"the Triton server was not ready after {self.ready_timeout_s:.0f} s; "
                                   f"{self.log_tail()}")
            time.sleep(0.2)

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> int | None:
        """SIGTERM (Triton unloads its models and exits), SIGKILL after `timeout_s`; the exit code."""
        if self.process is None:
            return None
        try:
            if self.process.poll() is None:
                self.process.terminate()
                try:
                    self.process.wait(timeout_s)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait()
        except KeyboardInterrupt:  # a second Ctrl-C while stopping: no more waiting
            self.process.kill()
            self.process.wait()
        code = self.process.returncode
        if self.workdir is not None:
            reap_orphan_stubs(self.workdir / "backends")
        if self._own_workdir and self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None
        return code

    def kill(self) -> None:
        """SIGKILL, as a crash would (benchmarks); `start()` again to restart on the same ports."""
        if self.running():
            self.process.kill()
            self.process.wait()

    def log_tail(self, lines: int = 8) -> str:
        """The last error lines of the server's log, joined into one line."""
        try:
            text = self.log_path.read_text(errors="replace") if self.log_path else ""
        except OSError:
            text = ""
        rows = [r.strip() for r in text.splitlines() if r.strip()]
        errors = [r for r in rows if r[:1] == "E" or "error" in r.lower() or "failed" in r.lower()]
        picked = [r if len(r) <= 300 else r[:300] + " …" for r in (errors or rows)[-lines:]]
        return " | ".join(picked) if picked else "it printed nothing"


def reap_orphan_stubs(backends: Path) -> int:
    """Kill the Python-backend stubs started from `backends` whose server is gone, and delete their
    shared-memory regions. A SIGKILLed tritonserver leaves its stubs running (seen with the
    wheel's 2.x server: they do not notice); a server that stops normally leaves none. Returns
    how many were found."""
    stub = str(backends / "python" / "triton_python_backend_stub")
    found = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            parent = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if os.fsdecode(argv[0]) != stub or (parent != 1 and _is_tritonserver(parent)):
            continue
        found += 1
        with contextlib.suppress(OSError):
            os.kill(int(entry), signal.SIGKILL)
        region = os.fsdecode(argv[2]) if len(argv) > 2 else ""
        if region.startswith("triton_python_backend_shm_region") and "/" not in region:
            with contextlib.suppress(OSError):
                os.unlink(f"/dev/shm/{region}")
    return found


def _is_tritonserver(pid: int) -> bool:
    try:
        return Path(os.readlink(f"/proc/{pid}/exe")).name == "tritonserver"
    except OSError:
        return False


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM when the parent dies (Linux); nothing elsewhere."""
    if sys.platform.startswith("linux"):
        import ctypes

        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


__all__ = ["HOST", "Ports", "TritonServer", "check_ports", "reap_orphan_stubs"]

