"""Serving load test: Triton (dynamic batching on and off) against one `tcgraph sample` process,
then a kill -9 of the server under load.

    python benchmarks/bench_serve.py                      # demo model, fora:2, 20 steps, batch 4
    python benchmarks/bench_serve.py --artifact ART --clients 8 --requests 20

1. Builds the artifact (or takes `--artifact`) and writes one model repository per batching
   setting (`tcgraph.serve.write_repository`).
2. For each: starts the server on free 127.0.0.1 ports, warms it up, then `--clients` threads
   each send `--requests` one-image requests (a class and a seed of their own) over HTTP, one
   after the other, until done or `--time-limit` seconds have passed; latency of every request,
   images/s over the whole load. A few answers are compared with `tcgraph.sample` bit for bit.
3. Baseline: one `tcgraph sample` process making the same number of images (wall time of the
   process, start-up included, and of the sampling alone, measured in-process).
4. Crash: under the same load, the tritonserver process gets SIGKILL; the clients' errors are
   counted, the server is started again on the same ports, the clients' requests succeed again,
   and the repository is checked (every sha256) afterwards.

Everything is bounded in count and time and talks to 127.0.0.1 only. Writes
benchmarks/results/serve-<name>.json and .md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import tcgraph  # noqa: E402
from tcgraph.api import to_images  # noqa: E402
from tcgraph.serve.repository import check_repository, write_repository  # noqa: E402
from tcgraph.serve.server import Ports, TritonServer  # noqa: E402


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def request_inputs(http, label: int, seed: int):
    a = http.InferInput("CLASSES", [1, 1], "INT64")
    a.set_data_from_numpy(np.array([[label]], dtype=np.int64))
    b = http.InferInput("SEED", [1, 1], "INT64")
    b.set_data_from_numpy(np.array([[seed]], dtype=np.int64))
    return [a, b]


class Load:
    """`clients` threads, each sending `requests` one-image requests in turn, within `limit_s`."""

    def __init__(self, ports: Ports, model: str, clients: int, requests: int, limit_s: float, num_classes: int,
                 keep: int = 0, retry_errors: bool = False):
        self.ports, self.model = ports, model
        self.clients, self.requests, self.limit_s = clients, requests, limit_s
        self.num_classes = num_classes
        self.keep = keep  # answers kept per client, to compare with tcgraph.sample
        self.retry_errors = retry_errors  # crash run: pause after an error instead of hammering
        self.latencies: list[float] = []
        self.errors: list[tuple[float, str]] = []
        self.kept: list[tuple[int, int, np.ndarray]] = []
        self.successes_after: list[float] = []
        self.stop = threading.Event()  # the crash run ends its clients with it
        self._lock = threading.Lock()

    def run(self) -> float:
        start = time.monotonic()
        self.start = start
        threads = [threading.Thread(target=self._client, args=(c,)) for c in range(self.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return time.monotonic() - start

    def _client(self, c: int) -> None:
        import tritonclient.http as http
        client = http.InferenceServerClient(f"127.0.0.1:{self.ports.http}", network_timeout=60,
                                            connection_timeout=5)
        deadline = self.start + self.limit_s
        try:
            for i in range(self.requests):
                if time.monotonic() > deadline or self.stop.is_set():
                    break
                label, seed = (c * 7 + i) % self.num_classes, 1000 * c + i
                t0 = time.monotonic()
                try:
                    images = client.infer(self.model, request_inputs(http, label, seed)).as_numpy("IMAGES")
                except Exception as e:  # noqa: BLE001 - the server's error, or the connection's (geventhttpclient)
                    with self._lock:
                        self.errors.append((time.monotonic() - self.start, f"{type(e).__name__}: {e}"[:200]))
                    if self.retry_errors:
                        time.sleep(0.5)
                        client.close()
                        client = http.InferenceServerClient(f"127.0.0.1:{self.ports.http}", network_timeout=60,
                                                            connection_timeout=5)
                    continue
                with self._lock:
                    self.latencies.append(time.monotonic() - t0)
                    self.successes_after.append(time.monotonic() - self.start)
                    if i < self.keep:
                        self.kept.append((label, seed, images))
        finally:
            client.close()


def warm_up(ports: Ports, model: str) -> None:
    import tritonclient.http as http

    client = http.InferenceServerClient(f"127.0.0.1:{ports.http}")
    try:
        client.infer(model, request_inputs(http, 0, 0))
    finally:
        client.close()


def verified(art: Path, kept) -> int:
    """How many kept answers equal `tcgraph.sample`'s images for their class and seed (all must)."""
    same = 0
    for label, seed, images in kept:
        samples, _ = tcgraph.sample(art, classes=str(label), per_class=1, seed=seed, progress=False)
        same += int(np.array_equal(to_images(samples), images))
    return same


def load_result(load: Load, wall: float) -> dict:
    n = len(load.latencies)
    return {"requests_ok": n, "errors": len(load.errors), "wall_s": round(wall, 3),
            "images_per_s": round(n / wall, 2) if wall > 0 else None,
            "p50_ms": round(1000 * percentile(load.latencies, 50), 1),
            "p99_ms": round(1000 * percentile(load.latencies, 99), 1),
            "mean_ms": round(1000 * statistics.fmean(load.latencies), 1) if n else None}


def server_stats(ports: Ports, model: str) -> dict:
    import tritonclient.http as http

    client = http.InferenceServerClient(f"127.0.0.1:{ports.http}")
    try:
        s = client.get_inference_statistics(model)["model_stats"][0]
        return {"inference_count": int(s["inference_count"]), "execution_count": int(s["execution_count"])}
    finally:
        client.close()


def bench_config(art: Path, work: Path, name: str, dynamic: bool, args, num_classes: int) -> dict:
    repo = write_repository(art, work / f"repo-{name}", name="dit", dynamic_batching=dynamic,
                            max_queue_delay_us=args.queue_delay_us)
    ports = Ports.free()
    t0 = time.monotonic()
    with TritonServer(repo, ports, workdir=work / f"server-{name}"):
        ready_s = time.monotonic() - t0
        warm_up(ports, "dit")
        before = server_stats(ports, "dit")
        load = Load(ports, "dit", args.clients, args.requests, args.time_limit, num_classes, keep=1)
        wall = load.run()
        after = server_stats(ports, "dit")
    result = load_result(load, wall)
    calls = after["execution_count"] - before["execution_count"]
    result.update({"dynamic_batching": dynamic, "server_ready_s": round(ready_s, 1), "model_calls": calls,
                   "images_per_call": round((after["inference_count"] - before["inference_count"]) / calls, 2)
                   if calls else None,
                   "checked_equal_to_sample": f"{verified(art, load.kept)}/{len(load.kept)}"})
    print(f"  {name}: {result}", flush=True)
    return result


def bench_sample(art: Path, images: int, num_classes: int) -> dict:
    """One `tcgraph sample` process for the same number of images, and the sampling alone in-process."""
    per_class = -(-images // num_classes)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.monotonic()
        subprocess.run([sys.executable, "-m", "tcgraph", "sample", str(art), "--per-class", str(per_class),
                        "--png", f"{tmp}/s.png"], check=True, capture_output=True)
        process_s = time.monotonic() - t0
    tcgraph.sample(art, classes="0", per_class=1, progress=False)  # warm caches of this process
    t0 = time.monotonic()
    tcgraph.sample(art, per_class=per_class, progress=False)
    inproc_s = time.monotonic() - t0
    n = per_class * num_classes
    result = {"images": n, "process_wall_s": round(process_s, 3), "process_images_per_s": round(n / process_s, 2),
              "sampling_only_s": round(inproc_s, 3), "sampling_only_images_per_s": round(n / inproc_s, 2)}
    print(f"  tcgraph sample: {result}", flush=True)
    return result


def bench_crash(art: Path, work: Path, args, num_classes: int) -> dict:
    """kill -9 the server under load; restart on the same ports; check the repository."""
    repo = write_repository(art, work / "repo-crash", name="dit", max_queue_delay_us=args.queue_delay_us)
    ports = Ports.free()
    server = TritonServer(repo, ports, workdir=work / "server-crash")
    shm_before = set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()
    with server:
        warm_up(ports, "dit")
        load = Load(ports, "dit", args.clients, args.crash_requests, args.time_limit, num_classes, retry_errors=True)
        runner = threading.Thread(target=load.run)
        runner.start()
        time.sleep(args.kill_after)
        killed_at = time.monotonic() - load.start
        pid = server.process.pid
        server.kill()  # SIGKILL, as a crash would
        time.sleep(1.0)
        stubs_left = _stubs_under(work / "server-crash")
        t0 = time.monotonic()
        server.start()
        server.wait_ready()
        restart_s = time.monotonic() - t0
        ready_at = time.monotonic() - load.start
        wanted = 2 * args.clients  # answers after the restart, then the clients stop
        while runner.is_alive() and sum(t > ready_at for t in load.successes_after) < wanted:
            time.sleep(0.1)
        load.stop.set()
        runner.join()
        stubs_at_end = _stubs_under(work / "server-crash", not_of=server.process.pid)
    errors = [e for e in load.errors]
    ok_after = [t for t in load.successes_after if t > ready_at]
    marker = check_repository(repo)  # raises, naming the file, if anything were damaged
    shm_after = set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()
    leaked = sorted(shm_after - shm_before)
    for name in leaked:  # our killed server's shared-memory regions
        if name.startswith("triton_python_backend"):
            try:
                os.unlink(f"/dev/shm/{name}")
            except OSError:
                pass
    result = {"killed_pid": pid, "killed_at_s": round(killed_at, 2), "restart_ready_s": round(restart_s, 1),
              "requests_ok_before_kill": sum(1 for t in load.successes_after if t <= killed_at),
              "client_errors": len(errors), "first_error": errors[0][1] if errors else None,
              "requests_ok_after_restart": len(ok_after), "repository_check": f"intact (model {marker['model']})",
              "stub_processes_left_1s_after_kill": stubs_left,
              "stub_processes_of_the_killed_server_at_end": stubs_at_end, "shm_regions_left_by_kill": leaked}
    print(f"  crash: {result}", flush=True)
    return result


def _stubs_under(folder: Path, not_of: int | None = None) -> int:
    """Python-backend stub processes started from `folder`, except those of the server `not_of`."""
    count = 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
            ppid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if str(folder) in cmdline and "triton_python_backend_stub" in cmdline and ppid != not_of:
            count += 1
    return count


def markdown(res: dict) -> str:
    s = res["settings"]
    rows = [
        f"# Serving on Triton: {s['artifact_name']}",
        "",
        f"{s['plan']}, {s['steps']} DDIM steps, guidance {s['guidance']}, image batch {s['batch']} "
        f"(model batch {2 * s['batch'] if s['guidance'] > 1 else s['batch']}); {s['clients']} clients x "
        f"{s['requests']} one-image requests over HTTP on 127.0.0.1, time bound {s['time_limit_s']} s; "
        f"queue delay {s['queue_delay_us']} us; {s['machine']}.",
        "",
        "| setup | images | images/s | p50 ms | p99 ms | model calls | images per call | checked = sample |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for key, label in (("batching_on", "Triton, dynamic batching"), ("batching_off", "Triton, no batching")):
        r = res[key]
        rows.append(f"| {label} | {r['requests_ok']} | {r['images_per_s']} | {r['p50_ms']} | {r['p99_ms']} | "
                    f"{r['model_calls']} | {r['images_per_call']} | {r['checked_equal_to_sample']} |")
    b = res["tcgraph_sample"]
    rows.append(f"| one `tcgraph sample` process (whole process) | {b['images']} | {b['process_images_per_s']} | | | | | |")
    rows.append(f"| `tcgraph.sample`, sampling only (in-process) | {b['images']} | {b['sampling_only_images_per_s']} "
                "| | | | | |")
    c = res["crash"]
    rows += [
        "",
        "## kill -9 under load",
        "",
        f"- SIGKILL at {c['killed_at_s']} s into the load ({c['requests_ok_before_kill']} requests answered before).",
        f"- Clients got {c['client_errors']} errors while it was down; first: `{c['first_error']}`.",
        f"- Restarted on the same ports, ready after {c['restart_ready_s']} s; {c['requests_ok_after_restart']} "
        "requests answered after the restart.",
        f"- Repository after the crash: {c['repository_check']} (marker, config.pbtxt, model.py and every "
        "artifact file's sha256).",
        f"- Python-backend stubs of the killed server still running 1 s after the kill: "
        f"{c['stub_processes_left_1s_after_kill']} (Triton's stubs do not notice a SIGKILLed server); the restart "
        f"(`TritonServer.start`) kills them and deletes their shared memory: "
        f"{c['stub_processes_of_the_killed_server_at_end']} left at the end, "
        f"{len(c['shm_regions_left_by_kill'])} shared-memory regions left.",
    ]
    return "\n".join(rows) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--artifact", type=Path, help="an artifact folder (default: build digits fora:2)")
    p.add_argument("--plan", default="fora:2")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--requests", type=int, default=20)
    p.add_argument("--crash-requests", type=int, default=200, help="most requests per client in the crash run")
    p.add_argument("--kill-after", type=float, default=2.0, help="seconds into the crash load")
    p.add_argument("--time-limit", type=float, default=120.0, help="per load run, seconds")
    p.add_argument("--queue-delay-us", type=int, default=2000)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = p.parse_args()
    import torch

    torch.set_num_threads(min(2, torch.get_num_threads()))
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        work = Path(tmp)
        art = args.artifact
        if art is None:
            print(f"building digits {args.plan}, {args.steps} steps, batch {args.batch} …", flush=True)
            art = tcgraph.transform("digits", args.plan, work / f"digits-{args.plan.replace(':', '')}",
                                    steps=args.steps, batch=args.batch, progress=False)
        from tcgraph.export import load_artifact

        a = load_artifact(art)
        s, num_classes = a.plan.settings, a.model_config.num_classes
        res = {"settings": {"artifact_name": art.name, "plan": a.plan.planner, "steps": s.num_steps,
                            "guidance": s.cfg_scale, "batch": s.batch, "clients": args.clients,
                            "requests": args.requests, "time_limit_s": args.time_limit,
                            "queue_delay_us": args.queue_delay_us,
                            "machine": f"{os.cpu_count()} CPU cores, {platform.processor() or platform.machine()}, "
                                       f"ONNX Runtime on the CPU"}}
        print("load test …", flush=True)
        res["batching_on"] = bench_config(art, work, "on", True, args, num_classes)
        res["batching_off"] = bench_config(art, work, "off", False, args, num_classes)
        res["tcgraph_sample"] = bench_sample(art, args.clients * args.requests, num_classes)
        print("kill -9 under load …", flush=True)
        res["crash"] = bench_crash(art, work, args, num_classes)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"serve-{res['settings']['artifact_name']}"
    stem.with_suffix(".json").write_text(json.dumps(res, indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown(res))
    print(f"wrote {stem}.json and .md")


if __name__ == "__main__":
    main()
