"""The parts of benchmarks/bench_gpu.py: prepare.py (model, plans, artifact folders, backend
sessions), measure.py (timing, memory, copies), report.py (derived columns, table, JSON).
bench_gpu.py puts benchmarks/ on sys.path, so these import as `gpu.<part>`."""
