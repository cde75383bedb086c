#!/usr/bin/env bash
# The GPU check (issue 15): ONE script for a borrowed GPU machine, at most 8 minutes in all.
#
#   bash benchmarks/gpu_check.sh [--out DIR] [--work DIR] [--plans LIST] [--repeats N] [--budget SECONDS]
#                                [--no-flux] [--flux-budget SECONDS]
#   bash benchmarks/gpu_check.sh --dry-run      # print the settings and the commands, run nothing
#   bash benchmarks/gpu_check.sh --cpu-smoke    # the same path on a CPU machine, tiny settings (~1 min)
#                                               # (or GPU_CHECK_CPU_SMOKE=1)
#
# Made for the lending machine's stock image (one H200, 16 cores, Python 3.12, torch 2.11 with
# CUDA, onnx, onnxscript, onnxruntime for the CPU, safetensors, scikit-learn, pillow, tqdm,
# pytest; no TensorRT, no onnxruntime-gpu, no network). Nothing is installed: tcgraph runs from
# this checkout through PYTHONPATH, and imports safetensors, scikit-learn, pillow and tqdm only
# where they are used (the demo model's weights, calibration data, PNGs, progress bars), so no
# wheels need carrying. The env stage says what is missing; a stage that needs a missing
# package is skipped with that reason.
#
# Stages, in order (each under `timeout`, all inside one budget, default 450 s):
#   env        versions (python, torch, CUDA, GPU, onnx, onnxruntime, tcgraph's dependencies)
#   prepare    the artifact folders, one `bench_gpu.py --prepare-only` process per plan, all
#              at once (transform is CPU work: fx capture, ONNX export, torch.export programs)
#   gpu-tests  `pytest -m gpu` (the tests that skip without CUDA or TensorRT), beside prepare;
#              both end before anything is timed
#   flux       after gpu-tests, still beside prepare (whose exports leave the GPU idle):
#              `bench_gpu.py --family flux`, FLUX.1-dev at full size (random bf16 weights, 1024x1024,
#              28 steps, text 512, guidance 3.5 as an input, batch 1): eager vs the torch backend on
#              full, fora:3, taylor:4 and tokens:2 (a fixed token plan), variants in memory (no folder);
#              gpu-flux.{json,md}. Its own limit, --flux-budget (default 180 s), and never more than
#              leaves measure its share; --no-flux skips it. It has not run on a GPU yet.
#   measure    `bench_gpu.py`: eager bf16 vs the torch backend with CUDA graphs (`torch`) and
#              without (`torch-nograph`) on every prepared plan; the profiler (host<->device
#              copies) runs on the `torch` rows of full and fora:2 only
#   summary    stages, skips and their reasons, the measured rows; exit status 1 if a stage
#              failed or timed out (the later stages still run where they can), else 0
#
# Budget, from transforms of DiT-XL/2 (256x256, batch 8 + guidance 4, DDIM 50, check=False)
# timed on the 2-core development machine (torch 2.13), one process at a time: a variant that
# computes every branch exports in ~57 s (ONNX, dynamo exporter: mostly single-threaded Python),
# a reuse variant in ~9 s, an l2c variant computing 7-19 of 56 branches in ~18 s, a token-pruning
# variant in ~62-74 s; each folder adds ~20 s (parameter map, torch programs, manifest); starting
# a process (imports, the random 675 M-parameter model, plans) ~20 s. Per plan: full ~95 s,
# fora:2 and fora:3 ~110 s, l2c:2 (1 full + 5 mostly-reuse variants) ~230 s, tokencache:2
# (1 full + 4 partial variants) ~490 s. Side by side on 16 cores, `prepare` lasts as long as its
# slowest plan, l2c:2; tokencache:2 alone would outlast the budget, so it is not in the default
# list (--plans full,fora:2,fora:3,l2c:2,tokencache:2 --budget 720 where one command may run
# 12 minutes). `measure`: activating the torch runner on an XL folder (torch programs and
# weights read, cast, moved) took 8-13 s on the CPU here; with 5 runs of ~0.3-0.7 s (warm-up,
# 3 repeats, per-step clock) that is ~10-20 s a row, 9 rows, plus the profiled runs of 2 rows:
# ~170 s. Total ~10 + 230 + 170 = ~410 s of 450 (if the device's cores are as fast as these;
# measure is guaranteed 170 s), and the budget leaves 30 s of the 8 minutes. If a stage runs
# long, its timeout stops it and the later stages get what is left (bench_gpu.py rewrites its
# JSON after every row, so a measure stopped early keeps the rows it measured).
# api.transform has no option to skip the ONNX export (it always writes the ONNX graphs and the
# torch programs), so every folder costs its ONNX export and ~2.6 GB of weights on disk.
#
# flux, estimated for an H100 (not measured): FLUX.1-dev has 11.9 B parameters (24 GB in bf16); a step
# at 4096 image + 512 text tokens is ~125 TFLOP (2 x 11.9 B x 4608 for the matmuls, ~15 for attention),
# at ~300-500 TFLOP/s of bf16 ~0.25-0.4 s (diffusers' own FLUX.1-dev runs ~0.25-0.3 s a step there). A row
# is 3 runs of 28 steps (warm-up, 1 timed, 1 per-step clock): eager and full ~21-34 s each; fora:3 and
# taylor:4 compute 10 and 7 of 28 steps (~6-12 s); tokens:2 computes 14 steps and 14 at 0.6 of the FLOPs
# (~17-27 s): ~75-115 s of steps; plus imports and the model made on the GPU (~15 s), 8 variants
# rewritten (~2 s each on the CPU here) and captured: ~110-155 s. Beside prepare's ~230 s it adds no wall
# time when gpu-tests take under ~60 s. Its host thread shares the CPUs with prepare, but the rows are
# GPU-bound (a block's ~30 kernel launches take far less than its ~4 ms of GPU work; torch rows replay
# CUDA graphs), so the timings should not feel it.
# diffusers is not in the lending machine's image: carry its wheel (`pip download --no-deps diffusers`,
# pure Python; the image has its dependencies) and start the command with `pip install --no-index
# --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site`; without it flux is skipped.
#
# Files in the output folder (7, none in subfolders): summary.txt, pytest-gpu.log, bench.log (flux's
# log too), gpu-bench.json, gpu-bench.md, gpu-flux.json, gpu-flux.md. Artifact folders go to --work
# (default /tmp/tcgraph-gpu-check, ~2.6 GB per XL plan), never to the output folder.
set -u

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-python3}
MODE=gpu
[[ ${GPU_CHECK_CPU_SMOKE:-0} == 1 ]] && MODE=cpu-smoke
DRY_RUN=0
OUT_DIR="" WORK="" PLANS="" REPEATS="" BUDGET=450 FLUX=1 FLUX_BUDGET=180

usage() { sed -n '2,8p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }
die() { echo "gpu_check.sh: $*" >&2; exit 2; }
while (( $# )); do
    case $1 in
        --out) (( $# > 1 )) || die "--out needs a folder"; OUT_DIR=$2; shift 2 ;;
        --work) (( $# > 1 )) || die "--work needs a folder"; WORK=$2; shift 2 ;;
        --plans) (( $# > 1 )) || die "--plans needs a comma list"; PLANS=$2; shift 2 ;;
        --repeats) (( $# > 1 )) || die "--repeats needs a number"; REPEATS=$2; shift 2 ;;
        --budget) (( $# > 1 )) || die "--budget needs seconds"; BUDGET=$2; shift 2 ;;
        --flux-budget) (( $# > 1 )) || die "--flux-budget needs seconds"; FLUX_BUDGET=$2; shift 2 ;;
        --no-flux) FLUX=0; shift ;;
        --cpu-smoke) MODE=cpu-smoke; shift ;;
        --dry-run) DRY_RUN=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) die "unknown argument '$1' (see --help)" ;;
    esac
done
[[ $BUDGET =~ ^[0-9]+$ ]] || die "--budget must be whole seconds, got '$BUDGET'"
[[ $FLUX_BUDGET =~ ^[0-9]+$ ]] || die "--flux-budget must be whole seconds, got '$FLUX_BUDGET'"
[[ -z $REPEATS || $REPEATS =~ ^[1-9][0-9]*$ ]] || die "--repeats must be a number >= 1, got '$REPEATS'"

#################################################################################
#                                  Settings                                     #
#################################################################################

if [[ $MODE == gpu ]]; then
    MODEL=DiT-XL/2 DEVICE=cuda STEPS=50 BATCH=8 GUIDANCE=4
    PLANS=${PLANS:-full,fora:2,fora:3,l2c:2}
    REPEATS=${REPEATS:-3}
    WORK=${WORK:-/tmp/tcgraph-gpu-check}
    PYTEST_TARGETS=(tests)  # collects everything, runs the gpu-marked tests
    KEEP_FOR_MEASURE=170    # seconds of the budget that prepare and gpu-tests leave to measure
    FLUX_ARGS=(--model FLUX.1-dev --device cuda --resolution 1024 --text-length 512 --steps 28 --batch 1
               --guidance 3.5 --repeats 1 --no-profile)
else
    MODEL=digits DEVICE=cpu STEPS=4 BATCH=2 GUIDANCE=4
    PLANS=${PLANS:-full,fora:2}
    REPEATS=${REPEATS:-1}
    WORK=${WORK:-${TMPDIR:-/tmp}/tcgraph-gpu-check-smoke}
    PYTEST_TARGETS=(tests/runtime/test_torch_runner.py tests/runtime/trt)  # the files that hold gpu tests
    KEEP_FOR_MEASURE=60
    FLUX_ARGS=(--model FLUX-tiny --device cpu --dtype bfloat16 --text-length 8 --steps 4 --batch 1 --guidance 3.5
               --repeats 1)  # bf16 on the CPU too: the GPU run's precision path
    export OMP_NUM_THREADS=1  # two small processes at once on a shared CPU: no thread oversubscription
fi
BACKENDS=eager,torch,torch-nograph
PROFILE_BACKENDS=torch PROFILE_PLANS=full,fora:2  # the rows that get the profiled runs
absolute() { if [[ $1 == /* ]]; then echo "$1"; else echo "$PWD/$1"; fi; }  # the stages run in $REPO
OUT_DIR=$(absolute "${OUT_DIR:-${OUT:-$REPO/benchmarks/results/gpu-check}}")
WORK=$(absolute "$WORK")
IFS=, read -r -a PLAN_LIST <<< "${PLANS// /}"
[[ " ${PLAN_LIST[*]} " == *" full "* ]] || PLAN_LIST=(full "${PLAN_LIST[@]}")
NPROC=$(nproc 2>/dev/null || echo 2)
THREADS=$(( NPROC / ${#PLAN_LIST[@]} )); (( THREADS >= 1 )) || THREADS=1
MIN_STAGE=10  # a stage with less time than this left is skipped, not started

COMMON=(--model "$MODEL" --device "$DEVICE" --steps "$STEPS" --batch "$BATCH" --guidance "$GUIDANCE"
        --seed 0 --work "$WORK" --quiet)
# Each *_cmd sets CMD, the stage's command line as an array (paths may hold spaces).
prepare_cmd() {
    CMD=(env OMP_NUM_THREADS="$THREADS" "$PYTHON" benchmarks/bench_gpu.py --prepare-only "${COMMON[@]}"
         --backends torch --plans "$1")
}
measure_cmd() {
    CMD=("$PYTHON" benchmarks/bench_gpu.py "${COMMON[@]}" --repeats "$REPEATS" --plans "$1" --backends "$BACKENDS"
         --profile-backends "$PROFILE_BACKENDS" --profile-plans "$PROFILE_PLANS" --out "$OUT_DIR/gpu-bench")
}
flux_cmd() {
    CMD=("$PYTHON" benchmarks/bench_gpu.py --family flux "${FLUX_ARGS[@]}" --plans full,fora:3,taylor:4,tokens:2
         --backends eager,torch --seed 0 --quiet --out "$OUT_DIR/gpu-flux")
}
pytest_cmd() { CMD=("$PYTHON" -m pytest -q -rs -m gpu -p no:cacheprovider "${PYTEST_TARGETS[@]}"); }
shown() {  # CMD as one line that a shell reads back the same (words quoted where they need it)
    local word words=()
    for word in "${CMD[@]}"; do
        if [[ $word =~ ^[A-Za-z0-9_./:,=+@%-]+$ ]]; then words+=("$word"); else words+=("'${word//\'/\'\\\'\'}'"); fi
    done
    echo "${words[*]}"
}

if [[ $DRY_RUN == 1 ]]; then
    echo "gpu_check.sh $MODE: $MODEL, $STEPS steps, batch $BATCH, guidance $GUIDANCE, device $DEVICE," \
         "repeats $REPEATS, budget ${BUDGET}s, flux $( (( FLUX )) && echo "within ${FLUX_BUDGET}s" || echo off)"
    echo "out $OUT_DIR; work $WORK; PYTHONPATH=$REPO"
    echo "[env] $PYTHON: versions, CUDA and the GPU, the packages tcgraph imports, free disk under work"
    for spec in "${PLAN_LIST[@]}"; do prepare_cmd "$spec"; echo "[prepare] \$ $(shown)"; done
    pytest_cmd; echo "[gpu-tests] \$ $(shown)"
    if [[ $FLUX == 1 ]]; then flux_cmd; echo "[flux] \$ $(shown)"; fi  # after gpu-tests, within --flux-budget
    measure_cmd "$(IFS=,; echo "${PLAN_LIST[*]}")"; echo "[measure] \$ $(shown)"
    exit 0
fi

mkdir -p "$OUT_DIR" "$WORK" || die "cannot make the folders $OUT_DIR and $WORK"
cd "$REPO" || die "cannot enter $REPO"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
STATE=$(mktemp -d "${TMPDIR:-/tmp}/gpu-check-state.XXXXXX") || die "cannot make a temporary folder"
trap 'rm -rf "$STATE"' EXIT
T0=$SECONDS
BENCH_LOG=$OUT_DIR/bench.log PYTEST_LOG=$OUT_DIR/pytest-gpu.log
rm -f "$BENCH_LOG" "$PYTEST_LOG" "$OUT_DIR"/gpu-{bench,flux}.{json,md} "$OUT_DIR/summary.txt"

#################################################################################
#                                   Stages                                      #
#################################################################################

record() {  # ORDER NAME STATUS SECONDS NOTE: one line per stage (background stages too)
    printf '%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "$5" >> "$STATE/stages.tsv"
}
status_of() { awk -F'\t' -v n="$1" '$2 == n {print $3}' "$STATE/stages.tsv" 2>/dev/null | tail -1; }
left() { echo $(( BUDGET - (SECONDS - T0) - $1 )); }  # seconds of the budget left, keeping $1 back

# run_stage ORDER NAME LIMIT LOG SHOW cmd...: runs cmd under `timeout LIMIT`, appends its output to
# LOG (and shows it when SHOW=1, else prefixes its lines with the stage name), records the result.
run_stage() {
    local order=$1 name=$2 limit=$3 log=$4 show=$5 rc start=$SECONDS
    shift 5
    if (( limit < MIN_STAGE )); then
        record "$order" "$name" skipped 0 "only ${limit}s of the ${BUDGET}s budget left"
        return 0
    fi
    CMD=("$@")
    echo "[$name] \$ $(shown) (timeout ${limit}s)" | tee -a "$log"
    if [[ $show == 1 ]]; then
        timeout -k 10 "$limit" "$@" 2>&1 | tee -a "$log"; rc=${PIPESTATUS[0]}
    else
        timeout -k 10 "$limit" "$@" 2>&1 | sed -u "s|^|[$name] |" >> "$log"; rc=${PIPESTATUS[0]}
    fi
    local secs=$(( SECONDS - start ))
    case $rc in
        0) record "$order" "$name" ok "$secs" "" ;;
        124|137) record "$order" "$name" timed-out "$secs" "stopped after ${limit}s; see $(basename "$log")" ;;
        *) record "$order" "$name" failed "$secs" "exit status $rc; see $(basename "$log")" ;;
    esac
    echo "[$name] finished: exit status $rc after ${secs}s"
    return 0
}

# ---- env: versions, and what is missing -------------------------------------------------------
cat > "$STATE/env_check.py" <<'EOF'
"""Print the environment; write the missing modules to $GPU_CHECK_STATE/missing; exit 1 if the check cannot run."""
import importlib, importlib.metadata, os, platform, shutil, subprocess, sys

mode, state = os.environ["GPU_CHECK_MODE"], os.environ["GPU_CHECK_STATE"]
print(f"python       {sys.version.split()[0]} ({sys.executable}), {platform.machine()}, {os.cpu_count()} cores")
# tcgraph's dependencies (pyproject.toml) and pytest, with what each is needed for here: the needed
# ones are imported; the optional ones (tcgraph imports them lazily, where used) are only looked up
needed = {"torch": "everything", "numpy": "everything", "onnx": "transform (ONNX export)",
          "onnxscript": "transform (the torch.onnx dynamo exporter)", "pytest": "the gpu-tests stage",
          "safetensors": "the demo model's weights (gpu tests, --cpu-smoke)",
          "diffusers": "the flux stage (FluxTransformer2DModel; not with --no-flux)"}
optional = {"onnxruntime": "the ort backend, not run here", "scikit-learn": "calibration data only",
            "pillow": "PNG output only", "tqdm": "progress bars only (the stages pass --quiet)",
            "tensorrt": "the trt backend, not run here"}
missing = []
for name, use in needed.items():
    try:
        print(f"{name:<13}{getattr(importlib.import_module(name), '__version__', '?')}")
    except Exception as e:  # ImportError, or a package broken in its own way
        print(f"{name:<13}not importable ({type(e).__name__}: {str(e)[:80]}); NEEDED for {use}")
        missing.append(name)
for name, use in optional.items():
    try:
        print(f"{name:<13}{importlib.metadata.version(name)} (installed; optional here: {use})")
    except importlib.metadata.PackageNotFoundError:
        print(f"{name:<13}not installed (optional here: {use})")
with open(os.path.join(state, "missing"), "w") as f:
    f.write(" ".join(missing))
problems = []
try:
    import torch
    print(f"torch CUDA   {torch.version.cuda or 'none (CPU build)'}; available: {torch.cuda.is_available()}")
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        print(f"GPU          {p.name}, {p.total_memory / 2**30:.0f} GiB, compute capability {p.major}.{p.minor}, "
              f"{p.multi_processor_count} SMs")
    elif mode == "gpu":
        problems.append("torch sees no CUDA GPU: this is the GPU check; on a CPU machine run it with --cpu-smoke")
except ImportError:
    problems.append("torch does not import")
try:
    import onnxruntime
    print(f"ort          providers {onnxruntime.get_available_providers()}")
except ImportError:
    pass
if shutil.which("nvidia-smi"):
    q = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                       capture_output=True, text=True)
    print(f"nvidia-smi   {q.stdout.strip() or q.stderr.strip()}")
try:
    import tcgraph.api  # noqa: F401  (from this checkout, through PYTHONPATH)
    print(f"tcgraph      {tcgraph.__version__} from {os.path.dirname(tcgraph.__file__)}")
except Exception as e:
    problems.append(f"tcgraph does not import from this checkout: {type(e).__name__}: {e}")
work = os.environ["GPU_CHECK_WORK"]
free = shutil.disk_usage(work).free / 2**30
print(f"disk         {free:.0f} GiB free under {work}")
if mode == "gpu" and free < 20:
    problems.append(f"only {free:.0f} GiB free under {work}: a DiT-XL/2 artifact folder takes ~2.6 GB, "
                    "and each plan writes one; pass --work on a larger disk")
for p in problems:
    print(f"PROBLEM      {p}")
sys.exit(1 if problems else 0)
EOF

# skip_reason STAGE: why STAGE cannot run (env failed, a package it needs is missing), or nothing
skip_reason() {
    local need missing m
    [[ $(status_of env) == ok ]] || { echo "the env stage failed (see the environment above)"; return; }
    case $1 in
        prepare) need="torch numpy onnx onnxscript" ;;
        gpu-tests) need="torch numpy onnx onnxscript pytest safetensors" ;;
        flux) need="torch numpy diffusers" ;;
        *) need="torch numpy" ;;
    esac
    [[ $MODE == cpu-smoke ]] && need+=" safetensors"  # the demo model's weights
    missing=$(cat "$STATE/missing" 2>/dev/null)
    for m in $need; do
        [[ " $missing " == *" $m "* ]] && { echo "needs the Python package $m, which is missing (see env)"; return; }
    done
}

echo "gpu_check.sh $MODE: $MODEL, $STEPS steps, batch $BATCH, guidance $GUIDANCE, plans ${PLAN_LIST[*]}," \
     "backends $BACKENDS, repeats $REPEATS, budget ${BUDGET}s; out $OUT_DIR, work $WORK"
export GPU_CHECK_STATE=$STATE GPU_CHECK_MODE=$MODE GPU_CHECK_WORK=$WORK
run_stage 1 env "$(left 0)" "$STATE/env.txt" 1 "$PYTHON" "$STATE/env_check.py"

# ---- prepare (one process per plan) beside gpu-tests; both end before anything is timed --------
LIMIT=$(left "$KEEP_FOR_MEASURE")
flux_stage() {  # FLUX.1-dev after the gpu tests (the GPU is its own then), in what prepare leaves measure
    local why limit
    [[ $FLUX == 1 ]] || { record 2.5 flux skipped 0 "--no-flux"; return 0; }
    why=$(skip_reason flux)
    [[ -z $why ]] || { record 2.5 flux skipped 0 "$why"; return 0; }
    limit=$(left "$KEEP_FOR_MEASURE"); (( limit > FLUX_BUDGET )) && limit=$FLUX_BUDGET
    flux_cmd
    run_stage 2.5 flux "$limit" "$BENCH_LOG" 0 "${CMD[@]}"
}
why=$(skip_reason gpu-tests)
{
    if [[ -n $why ]]; then
        record 2 gpu-tests skipped 0 "$why"
    else
        pytest_cmd
        run_stage 2 gpu-tests "$LIMIT" "$PYTEST_LOG" 0 "${CMD[@]}"
    fi
    flux_stage
} &
why=$(skip_reason prepare)
i=0
for spec in "${PLAN_LIST[@]}"; do
    i=$(( i + 1 ))
    if [[ -n $why ]]; then
        record "3.$i" "prepare $spec" skipped 0 "$why"
    else
        prepare_cmd "$spec"
        run_stage "3.$i" "prepare $spec" "$LIMIT" "$BENCH_LOG" 0 "${CMD[@]}" &
    fi
done
wait
READY=() UNREADY=()
for spec in "${PLAN_LIST[@]}"; do
    if [[ $(status_of "prepare $spec") == ok ]]; then READY+=("$spec"); else UNREADY+=("$spec"); fi
done

# ---- measure ---------------------------------------------------------------------------------
why=$(skip_reason measure)
[[ -z $why && $(status_of "prepare full") != ok ]] && why="the full plan's folder was not prepared (see bench.log)"
if [[ -n $why ]]; then
    record 4 measure skipped 0 "$why"
else
    measure_cmd "$(IFS=,; echo "${READY[*]}")"
    run_stage 4 measure "$(left 0)" "$BENCH_LOG" 1 "${CMD[@]}"
fi

#################################################################################
#                                  Summary                                      #
#################################################################################

summary() {
    echo "gpu_check.sh $MODE, $(date -u '+%Y-%m-%d %H:%M:%S UTC'): $(( SECONDS - T0 ))s of the ${BUDGET}s budget"
    echo "settings: $MODEL, $STEPS steps, batch $BATCH, guidance $GUIDANCE, device $DEVICE, plans ${PLAN_LIST[*]}," \
         "backends $BACKENDS, repeats $REPEATS; profiled rows: $PROFILE_BACKENDS x $PROFILE_PLANS"
    [[ $FLUX == 1 ]] && echo "flux: ${FLUX_ARGS[*]}, at most ${FLUX_BUDGET}s"
    echo
    echo "== environment"
    grep -v '^\[env\]' "$STATE/env.txt" 2>/dev/null
    echo
    echo "== stages"
    sort -t$'\t' -k1,1V "$STATE/stages.tsv" | while IFS=$'\t' read -r _ name status secs note; do
        printf 'stage %-22s %-9s %4ss%s\n' "$name:" "$status" "$secs" "${note:+  $note}"
    done
    (( ${#UNREADY[@]} )) && echo "plans left out of measure (not prepared): ${UNREADY[*]}"
    echo
    echo "== skipped, and why"
    awk -F'\t' '$3 == "skipped" {print "skipped stage " $2 ": " $5}' "$STATE/stages.tsv"
    if [[ -f $PYTEST_LOG ]]; then
        sed -n 's/^\[gpu-tests\] SKIPPED \[\([0-9]*\)\] \([^:]*\):[0-9]*: /skipped gpu test (\1) \2: /p' "$PYTEST_LOG"
    fi
    local jsons=("$OUT_DIR/gpu-bench.json")
    [[ $FLUX == 1 ]] && jsons+=("$OUT_DIR/gpu-flux.json")
    "$PYTHON" benchmarks/gpu/check_summary.py "${jsons[@]}"  # no torch import: works where torch is broken
    if [[ -f $PYTEST_LOG ]]; then
        local last
        last=$(grep -E '[0-9]+ (passed|failed|skipped|errors?|deselected)' "$PYTEST_LOG" | tail -1 \
               | sed 's/^\[gpu-tests\] //')
        echo
        echo "== gpu tests: ${last:-no result line (stopped early? see pytest-gpu.log)}"
    fi
}
summary > "$OUT_DIR/summary.txt" 2>&1
echo
cat "$OUT_DIR/summary.txt"
bad=$(awk -F'\t' '$3 == "failed" || $3 == "timed-out"' "$STATE/stages.tsv" | wc -l)
if (( bad )); then
    echo "gpu_check.sh: $bad stage(s) failed or timed out (see above); files in $OUT_DIR"
    exit 1
fi
echo "gpu_check.sh: every stage that ran passed; files in $OUT_DIR"
exit 0
