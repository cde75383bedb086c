"""benchmarks/gpu_check.sh and benchmarks/gpu_memory.py, on the CPU.

- The script's CPU smoke path (`--cpu-smoke`: the demo model, every CUDA part skipped), run
  once per session (~40-70 s here: two artifact folders are transformed; tests/conftest.py's
  `gpu_check_smoke`, whose folders tests/test_bench_gpu.py reuses), checked by the
  numbers it wrote: the JSON rows, the speedup columns, the stage and skip lines of the summary;
  and its flux stage (`bench_gpu.py --family flux` on a tiny FLUX in bf16, 4 steps) by its rows.
- Its GPU defaults, read from `--dry-run` with bench_gpu.py's own argument parser: the
  settings issue 15 asks for.
- The computed memory table: weights = parameters x bytes of DiT-XL/2 (built on the meta
  device), per-variant copies (ONNX Runtime, TensorRT) against one shared copy (torch).
Tests never assert on time.
"""
from __future__ import annotations

import importlib.util
import json
import math
import re
import shlex
from pathlib import Path

import pytest

from tcgraph.models.official.dit import CONFIGS
from tests.conftest import run_gpu_check

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks" / "bench_gpu.py"
SMOKE_FILES = ["bench.log", "gpu-bench.json", "gpu-bench.md", "gpu-flux.json", "gpu-flux.md", "pytest-gpu.log",
               "summary.txt"]
FLUX_PLANS = ["full", "fora:3", "taylor:4", "tokens:2"]


def _load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # bench_gpu puts benchmarks/ on sys.path for its parts
    return module


@pytest.fixture(scope="module")
def bench():
    return _load(BENCH, "bench_gpu")


_script = run_gpu_check  # bash benchmarks/gpu_check.sh ARGS (tests/conftest.py)


#################################################################################
#                                CPU smoke run                                  #
#################################################################################


@pytest.fixture(scope="module")
def smoke(gpu_check_smoke):
    # `gpu_check.sh --cpu-smoke --out OUT --work WORK`, run once per session (tests/conftest.py):
    # tests/test_bench_gpu.py reuses its two artifact folders (a copy) instead of transforming them again
    return gpu_check_smoke


def _result(out: Path, name: str = "gpu-bench") -> dict:
    return json.loads((out / f"{name}.json").read_text())


def _rows(out: Path, name: str = "gpu-bench") -> dict:
    return {(r["backend"], r["plan"]): r for r in _result(out, name)["rows"]}


@pytest.mark.slow
def test_smoke_exits_0_and_writes_seven_files(smoke):
    proc, out, _ = smoke
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert sorted(p.name for p in out.iterdir()) == SMOKE_FILES  # what comes back from $OUT: at most 8
    assert "every stage that ran passed" in proc.stdout


@pytest.mark.slow
def test_smoke_rows_and_speedups(smoke):
    _, out, _ = smoke
    result = _result(out)
    c = result["config"]
    assert (c["model"], c["device"], c["steps"], c["batch"], c["guidance"], c["repeats"]) == \
        ("digits", "cpu", 4, 2, 4.0, 1)
    assert c["backends"] == ["eager", "torch", "torch-nograph"] and c["plans"] == ["full", "fora:2"]
    rows = _rows(out)
    assert list(rows) == [("eager", "full"), ("torch", "full"), ("torch", "fora:2")]  # nograph: CUDA only
    assert result["failed"] == []
    for r in rows.values():
        assert isinstance(r["median_ms"], float) and r["median_ms"] > 0
        for key in ("realized_speedup", "predicted_speedup", "vs_eager"):
            assert isinstance(r[key], float) and r[key] > 0, (key, r[key])
    assert rows["torch", "full"]["realized_speedup"] == 1.0
    fora = rows["torch", "fora:2"]
    assert fora["realized_speedup"] == rows["torch", "full"]["median_ms"] / fora["median_ms"]
    assert fora["vs_eager"] == rows["eager", "full"]["median_ms"] / fora["median_ms"]
    assert fora["variants"] == 2 and fora["predicted_speedup"] > 1.9  # 4 steps: 2 full, 2 reuse
    md = (out / "gpu-bench.md").read_text()
    assert all(f"| {b} | {p} |" in md for b, p in rows)


@pytest.mark.slow
def test_smoke_summary_names_stages_and_skips(smoke):
    _, out, _ = smoke
    summary = (out / "summary.txt").read_text()
    for stage in ("env", "gpu-tests", "flux", "prepare full", "prepare fora:2", "measure"):
        assert re.search(rf"^stage {re.escape(stage)}: +ok +\d+s$", summary, re.M), stage
    assert "skipped bench torch-nograph: the same as 'torch' off CUDA" in summary
    assert "skipped bench all rows: GPU memory and host<->device copy counts" in summary
    assert re.search(r"^skipped gpu test \(\d+\) tests/runtime/test_torch_runner\.py: needs a CUDA GPU", summary, re.M)
    assert re.search(r"^skipped gpu test \(\d+\) tests/runtime/trt/\S+: needs TensorRT", summary, re.M)
    tests = re.search(r"^== gpu tests: (\d+) skipped, \d+ deselected", summary, re.M)
    assert tests and int(tests.group(1)) >= 4  # every gpu test ran its skip check, none passed or failed here
    skips = [int(n) for n in re.findall(r"^skipped gpu test \((\d+)\)", summary, re.M)]
    assert sum(skips) == int(tests.group(1))  # each skipped test is listed with its reason
    # the summary's table repeats the JSON's numbers
    for (backend, plan), r in _rows(out).items():
        line = re.search(rf"^{re.escape(backend)} +{re.escape(plan)} +(\d+) +([\d.]+) +([\d.]+)", summary, re.M)
        assert line, (backend, plan)
        assert int(line.group(1)) == r["variants"]
        assert float(line.group(2)) == pytest.approx(r["median_ms"], abs=0.051)
        assert float(line.group(3)) == pytest.approx(r["realized_speedup"], abs=0.0051)


@pytest.mark.slow
def test_smoke_flux_rows(smoke):
    # the tiny FLUX (2 double + 2 single blocks), bf16 on the CPU, 4 steps: eager and the torch backend on
    # variants rewritten in memory
    _, out, _ = smoke
    result = _result(out, "gpu-flux")
    c = result["config"]
    assert (c["family"], c["model"], c["device"], c["dtype"], c["steps"], c["batch"], c["guidance"], c["text_length"]) \
        == ("flux", "FLUX-tiny", "cpu", "bfloat16", 4, 1, 3.5, 8)
    assert result["failed"] == []
    rows = _rows(out, "gpu-flux")
    assert list(rows) == [("eager", "full")] + [("torch", p) for p in FLUX_PLANS]
    for r in rows.values():
        assert all(math.isfinite(t) and t > 0 for t in r["times_ms"]) and r["median_ms"] > 0
        assert r["vs_eager"] == rows["eager", "full"]["median_ms"] / r["median_ms"]
        assert r["realized_speedup"] == rows[r["backend"], "full"]["median_ms"] / r["median_ms"]
    assert {p: rows["torch", p]["variants"] for p in FLUX_PLANS} == {"full": 1, "fora:3": 2, "taylor:4": 2,
                                                                       "tokens:2": 2}
    predicted = {p: rows["torch", p]["predicted_speedup"] for p in FLUX_PLANS}
    assert predicted["full"] == 1.0
    assert 1 < predicted["fora:3"] <= 4 / 2  # steps 0 and 3 compute; 1 and 2 reuse (their adaLN still runs)
    assert 1 < predicted["taylor:4"] <= 4 / 1  # step 0 computes; 1-3 forecast
    assert 1 < predicted["tokens:2"] < 4 / 2  # steps 0 and 2 compute; 1 and 3 keep half the image rows
    assert rows["torch", "full"]["psnr_full_vs_eager_db"] > 60  # the same bf16 arithmetic as eager
    summary = (out / "summary.txt").read_text()
    assert "== gpu-flux.json: 5 rows" in summary
    md = (out / "gpu-flux.md").read_text()
    assert "16 image + 8 text tokens" in md and all(f"| torch | {p} |" in md for p in FLUX_PLANS)


@pytest.mark.slow
def test_smoke_prepares_each_plan_in_its_own_process(smoke):
    # --prepare-only makes only the plans named, so that the two processes never build one folder twice
    _, out, work = smoke
    log = (out / "bench.log").read_text()
    assert re.search(r"^\[prepare fora:2\] .*transform fora:2 ->", log, re.M)
    assert not re.search(r"^\[prepare fora:2\] .*transform full ->", log, re.M)
    assert re.search(r"^\[prepare full\] .*transform full ->", log, re.M)
    assert len(re.findall(r"reusing ", log)) == 2  # measure found both folders
    assert sorted(p.parent.name for p in work.rglob("manifest.json")) == ["fora-2", "full"]


#################################################################################
#                            GPU defaults (--dry-run)                           #
#################################################################################


def _dry_run(tmp_path, *args: str) -> dict[str, list[list[str]]]:
    """stage -> the command lines --dry-run prints for it, each split as a shell would."""
    proc = _script("--dry-run", "--out", str(tmp_path / "out"), *args, timeout=60)
    assert proc.returncode == 0, proc.stderr
    commands: dict[str, list[list[str]]] = {}
    for line in proc.stdout.splitlines():
        m = re.match(r"\[([\w-]+)\] \$ (.*)$", line)
        if m:
            commands.setdefault(m.group(1), []).append(shlex.split(m.group(2)))
    assert not (tmp_path / "out").exists()  # a dry run makes nothing
    return commands


def _bench_argv(words: list[str]) -> list[str]:
    return words[words.index("benchmarks/bench_gpu.py") + 1:]


def test_dry_run_gpu_defaults_are_the_issues(bench, tmp_path):
    commands = _dry_run(tmp_path)
    (measure,) = commands["measure"]
    args = bench.parse_args(_bench_argv(measure))
    assert (args.model, args.device, args.batch, args.guidance, args.steps) == ("DiT-XL/2", "cuda", 8, 4.0, 50)
    assert args.resolution is None and CONFIGS["DiT-XL/2"].input_size * bench.PIXELS_PER_LATENT == 256
    assert args.dtype is None  # bench_gpu's CUDA default: bfloat16
    assert {"eager", "torch", "torch-nograph"} <= set(args.backends.split(","))
    plans = args.plans.split(",")
    assert plans[:3] == ["full", "fora:2", "fora:3"] and "l2c:2" in plans
    assert args.repeats == 3 and str(args.work).startswith("/tmp/") and not args.no_profile
    assert (args.profile_backends, args.profile_plans) == ("torch", "full,fora:2")
    assert args.out == tmp_path / "out" / "gpu-bench"
    # one prepare process per plan, with the settings that name measure's folders
    prepares = [bench.parse_args(_bench_argv(c)) for c in commands["prepare"]]
    assert [p.plans for p in prepares] == plans and all(p.prepare_only for p in prepares)
    for p in prepares:
        assert (p.model, p.device, p.batch, p.guidance, p.steps, p.seed, p.work) == \
            (args.model, args.device, args.batch, args.guidance, args.steps, args.seed, args.work)
    (pytest_cmd,) = commands["gpu-tests"]
    assert pytest_cmd[1:] == ["-m", "pytest", "-q", "-rs", "-m", "gpu", "-p", "no:cacheprovider", "tests"]
    (flux,) = commands["flux"]  # FLUX.1-dev at full size, as the issue asks
    f = bench.parse_args(_bench_argv(flux))
    assert (f.family, f.model, f.device, f.resolution, f.steps, f.batch, f.guidance, f.text_length) == \
        ("flux", "FLUX.1-dev", "cuda", 1024, 28, 1, 3.5, 512)
    assert f.dtype is None and f.plans.split(",") == FLUX_PLANS and f.backends == "eager,torch"
    assert f.out == tmp_path / "out" / "gpu-flux"
    assert "flux" not in _dry_run(tmp_path, "--no-flux")


def test_dry_run_cpu_smoke_settings(bench, tmp_path):
    commands = _dry_run(tmp_path, "--cpu-smoke")
    (measure,) = commands["measure"]
    args = bench.parse_args(_bench_argv(measure))
    assert (args.model, args.device, args.steps, args.batch, args.repeats) == ("digits", "cpu", 4, 2, 1)
    assert (args.plans, args.backends) == ("full,fora:2", "eager,torch,torch-nograph")
    (flux,) = commands["flux"]
    f = bench.parse_args(_bench_argv(flux))
    assert (f.family, f.model, f.device, f.dtype, f.steps, f.text_length) == \
        ("flux", "FLUX-tiny", "cpu", "bfloat16", 4, 8)


def test_bad_arguments_are_refused(tmp_path):
    for args, says in ((["--bogus"], "unknown argument '--bogus'"), (["--repeats", "0"], "--repeats must be"),
                       (["--budget", "8min"], "--budget must be whole seconds"),
                       (["--flux-budget", "3min"], "--flux-budget must be whole seconds")):
        proc = _script("--dry-run", *args, timeout=60)
        assert proc.returncode == 2 and says in proc.stderr, (args, proc.stderr)


def test_profiled_rows(bench):
    def rows(*argv):
        args = bench.parse_args(list(argv))
        return {(b, p) for b in ("eager", "torch", "torch-nograph") for p in ("full", "fora:2", "fora:3")
                if bench.profiled(args, b, p)}

    assert len(rows()) == 9  # by default every row is profiled
    assert rows("--profile-backends", "torch", "--profile-plans", "full,fora:2") == {("torch", "full"),
                                                                                      ("torch", "fora:2")}
    assert rows("--profile-plans", "fora:3") == {("eager", "fora:3"), ("torch", "fora:3"), ("torch-nograph", "fora:3")}
    assert rows("--no-profile", "--profile-backends", "torch") == set()


#################################################################################
#                          Computed memory table                                #
#################################################################################


@pytest.fixture(scope="module")
def memory():
    return _load(ROOT / "benchmarks" / "gpu_memory.py", "gpu_memory")


@pytest.fixture(scope="module")
def table(memory):
    return memory.compute()


def _by(table: dict, backend: str, precision: str) -> dict[int, dict]:
    return {r["variants"]: r for r in table["rows"] if (r["backend"], r["precision"]) == (backend, precision)}


def test_weights_are_the_parameters_of_dit_xl2(memory, table):
    model = memory.meta_model("DiT-XL/2")
    params = sum(p.numel() for p in model.parameters())
    assert all(p.is_meta for p in model.parameters())  # no storage: shapes only
    assert params == table["config"]["parameters"] == 675_129_632  # the DiT paper's 675 M
    for precision, itemsize in (("bf16", 2), ("fp32", 4)):
        for backend in ("torch", "torch+cuda-graphs"):
            assert {n: r["weights"] for n, r in _by(table, backend, precision).items()} == \
                {n: params * itemsize for n in (1, 2, 4, 6)}  # one copy, whatever the variant count
    assert _by(table, "ort-cuda", "fp32")[1]["weights"] == params * 4  # `full` reads every weight


def test_per_variant_weight_copies_scale_with_the_variants(table):
    one = _by(table, "ort-cuda", "fp32")  # the default: one session, weights once, one arena
    assert {n: r["weights"] for n, r in one.items()} == {n: table["config"]["parameters"] * 4 for n in (1, 2, 4, 6)}
    assert one[6]["activations"] == one[1]["activations"]
    ort, trt = _by(table, "ort-cuda-per-variant", "fp32"), _by(table, "trt", "bf16")
    params = table["config"]["parameters"]
    assert {n: r["weights_bound"] for n, r in ort.items()} == {n: n * params * 4 for n in (1, 2, 4, 6)}  # linear
    assert {n: r["weights_bound"] for n, r in trt.items()} == {n: n * params * 2 for n in (1, 2, 4, 6)}
    for n in (2, 4, 6):
        assert params * 4 < ort[n]["weights"] < ort[n]["weights_bound"]  # reuse variants read fewer weights
        assert ort[n]["weights"] == sum(ort[n]["weights_read_per_variant"]) * 4
        assert trt[n]["weights"] * 2 == ort[n]["weights"]  # the same tensors, bf16 vs fp32
    assert ort[6]["activations"] == 6 * ort[1]["activations"]  # one arena per session
    torch_rows = _by(table, "torch", "fp32")
    assert torch_rows[6]["total"] - torch_rows[1]["total"] < (ort[6]["total"] - ort[1]["total"]) / 2


def test_caches_and_activations(memory, table):
    cfg = memory.meta_model().config
    rows, bnd = 16, 16 * cfg.num_tokens * cfg.hidden_size  # batch 8 with guidance
    assert table["config"]["model_rows"] == rows
    act = int((2 * cfg.mlp_ratio + 4) * bnd) + rows * cfg.num_heads * cfg.num_tokens ** 2
    assert table["config"]["activation_elements"] == act
    for r in table["rows"]:
        itemsize = 2 if r["precision"] == "bf16" else 4
        assert r["caches"] == r["cache_tensors"] * bnd * itemsize  # Plan.cache_bytes: one [B, N, D] per cache
        assert r["total"] == sum(r[k] for k in ("weights", "caches", "transient_caches", "activations", "static"))
    torch6 = _by(table, "torch", "bf16")[6]
    assert torch6["cache_tensors"] == 2 * cfg.depth  # l2c:2 caches every block's attention and MLP
    assert _by(table, "torch", "bf16")[1]["caches"] == 0  # `full` carries no cache


def test_six_variant_plan_is_bench_gpus_l2c(memory, monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "benchmarks"))
    import bench_tokencache
    from tcgraph.sampling import SamplerSettings

    model = memory.meta_model()
    settings = SamplerSettings(num_steps=50, cfg_scale=4.0, batch=8, resolution=model.config.input_size)
    plans = memory.plans_by_cap(model.config, settings)
    assert {n: len(p.variants()) for n, p in plans.items()} == {1: 1, 2: 2, 4: 4, 6: 6}
    assert plans[6].to_dict() == bench_tokencache.structural_plans(model, settings, [2.0])["l2c:2.0"].to_dict()


@pytest.mark.slow
def test_weights_a_variant_reads_match_its_torch_program(memory, smoke):
    """The rule of gpu_memory.reads_parameter against the weights a real program reads (the
    smoke run's digits fora:2 folder: v0 computes everything, v1 reuses every branch)."""
    from tcgraph.export.artifact import load_artifact
    from tcgraph.export.programs import read_program
    from tcgraph.models import load_model

    _, _, work = smoke
    (folder,) = [p.parent for p in work.rglob("manifest.json") if p.parent.name == "fora-2"]
    art = load_artifact(folder, verify_hashes=False)
    names = dict(load_model("digits").named_parameters())
    for recipe, vid in zip(art.plan.variants(), art.variant_ids()):
        info = read_program(art.file(art.programs[vid])).info
        assert set(info["weights"]) & set(names) == {n for n in names if memory.reads_parameter(n, recipe)}, vid


def test_memory_files(memory, tmp_path):
    result = memory.main(["--out", str(tmp_path / "mem")])
    assert json.loads((tmp_path / "mem.json").read_text()) == json.loads(json.dumps(result))
    md = (tmp_path / "mem.md").read_text()
    assert "computed, not measured" in md and "| ort-cuda | fp32 |" in md and "| eager (reference" in md
    committed = ROOT / "benchmarks" / "results" / "gpu-memory-DiT-XL2.json"
    assert json.loads(committed.read_text()) == json.loads(json.dumps(result))
