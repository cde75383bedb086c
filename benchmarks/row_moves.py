"""Moving rows of [B, N, D] on ONNX Runtime (CPU): a per-sample gather of k rows and a scatter of them
back, as dynamic token steps do, in the two forms the exporter gives.

    python benchmarks/row_moves.py

- `elements`: `torch.gather`/`torch.scatter` along dim 1 with the ids expanded to [B, k, D]
  (GatherElements, ScatterElements: an index per element);
- `rows`: `u[b, idx]` and `index_put` with (sample, row) ids (GatherND, ScatterND: whole rows), what
  `tcgraph.passes.token_dynamic` emits.

Median of 200 calls after 20, 2 threads, at the demo's shape and DiT-S/2's. Prints a table; writes
nothing.
"""
from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

SHAPES = ((16, 64, 128, 16), (4, 256, 384, 96), (4, 256, 384, 32))  # B, N, D, k


class Elements(torch.nn.Module):
    def forward(self, u, cache, rows, idx):
        ids = idx.unsqueeze(-1).expand(-1, -1, u.shape[-1])
        kept = torch.gather(u, 1, ids)
        return kept, torch.scatter(cache, 1, ids, kept * 2 + rows)


class Rows(torch.nn.Module):
    def forward(self, u, cache, rows, idx):
        b = torch.arange(u.shape[0]).unsqueeze(1)
        kept = u[b, idx]
        return kept, torch.index_put(cache, (b, idx), kept * 2 + rows)


def time_form(ort, module, args, folder: Path, calls: int = 200) -> float:
    path = folder / f"{type(module).__name__}.onnx"
    torch.onnx.export(module, args, str(path), dynamo=True, input_names=["u", "cache", "rows", "idx"])
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feeds = dict(zip(["u", "cache", "rows", "idx"], (a.numpy() for a in args)))
    for got, want in zip(session.run(None, feeds), module(*args)):
        np.testing.assert_allclose(got, want.numpy(), rtol=1e-6, atol=1e-6)
    for _ in range(20):
        session.run(None, feeds)
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        session.run(None, feeds)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def main() -> None:
    import onnxruntime as ort

    torch.manual_seed(0)
    print("| B, N, D | k | elements µs | rows µs | elements / rows |\n|---|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        for b, n, d, k in SHAPES:
            idx = torch.stack([torch.randperm(n)[:k] for _ in range(b)])
            args = (torch.randn(b, n, d), torch.randn(b, n, d), torch.randn(b, k, d), idx)
            e, r = (time_form(ort, m, args, Path(tmp)) for m in (Elements(), Rows()))
            print(f"| {b}, {n}, {d} | {k} | {e:.0f} | {r:.0f} | {e / r:.2f} |", flush=True)


if __name__ == "__main__":
    sys.exit(main())
