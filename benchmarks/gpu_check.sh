#!/usr/bin/env bash
# The GPU check (issue 15): ONE script for a borrowed GPU machine, at most 8 minutes in all.
#
#   bash benchmarks/gpu_check.sh [--out DIR] [--work DIR] [--plans LIST] [--repeats N] [--budget SECONDS]
#   bash benchmarks/gpu_check.sh --dry-run      # print the settings and the commands, run nothing
#   bash benchmarks/gpu_check.sh --cpu-smoke    # the same path on a CPU machine, tiny settings (~40 s)
#                                               # (or GPU_CHECK_CPU_SMOKE=1)
#
# Made for the lending machine's stock image (one H200, 16 cores, Python 3.12, torch 2.11 with
# CUDA, onnx, onnxscript, onnxruntime for the CPU, safetensors, scikit-learn, pillow, tqdm,
# pytest; no TensorRT, no onnxruntime-gpu, no network). Nothing is installed: tcgraph runs from
# this checkout through PYTHONPATH, and tcgraph imports safetensors, scikit-learn, pillow and
# tqdm only where they are used (the demo model's weights, calibration data, PNGs, progress
# bars). No wheels need carrying; the env stage says what is missing, and a stage that needs
# a missing package is skipped with that reason.
#
# Stages, in order (each under `timeout`, inside one budget, default 450 s):
#   env        versions (python, torch, CUDA, GPU, onnx, onnxruntime, tcgraph's dependencies)
#   prepare    the artifact folders of the plans, one `bench_gpu.py --prepare-only` process
#              per plan, all at once (transform is CPU work: fx capture, ONNX and torch.export)
#   gpu-tests  `pytest -m gpu` (tests that skip without CUDA or TensorRT), beside `prepare`;
#              both end before anything is timed
#   measure    `bench_gpu.py`: eager bf16 vs the torch backend with CUDA graphs (`torch`) and
#              without (`torch-nograph`), on every prepared plan, no profiler
#   profile    `bench_gpu.py` once more on `torch` x full,fora:2 with the profiler (host<->device
#              copies per loop and per run), into its own JSON/markdown
#   summary    stage results and the measured rows; the exit status is 1 if a stage failed or
#              timed out (later stages still run where they can), 0 otherwise
#
# Budget, from transforms of DiT-XL/2 (256x256, batch 8 + guidance 4, DDIM 50, check=False) timed
# on the 2-core development machine (torch 2.13): a variant that computes every branch exports in
# ~57 s, a reuse variant in ~9 s, a token-pruning (partial) variant in ~62-74 s, plus ~15 s per
# folder for the parameter map, torch programs and manifest; building the random model takes ~17 s.
# So full ~75 s, fora:2 and fora:3 ~87 s each, l2c:2 (1 full + 5 mostly-reuse variants) ~190 s,
# and tokencache:2 (1 full + 4 partial variants) ~400 s. Run side by side (16 cores), `prepare`
# takes as long as its slowest plan: l2c:2. tokencache:2 alone would take most of the budget, so
# it is left out of the default list (add it with --plans ...,tokencache:2 and --budget 720 on a
# longer lease). Activating the torch runner on an XL folder took 8-13 s on the CPU here, which
# with 3 repeats of ~0.3-0.7 s runs makes `measure` ~10-20 s a row (9 rows). The sum, ~10 + 190 +
# 150 + 50 s, leaves ~50 s of the 450 s budget, and the budget 30 s of the 8 minutes.
# Transform has no option to skip the ONNX export (api.transform always writes the ONNX graphs and
# the torch programs), so every folder also costs its ONNX export and ~2.6 GB of weights on disk.
#
# Files under the output folder (at most 8, none in subfolders): summary.txt, pytest-gpu.log,
# bench.log, gpu-bench.{json,md}, gpu-bench-profile.{json,md}. Artifact folders go to --work
# (default /tmp/tcgraph-gpu-check; ~2.6 GB per XL plan), never to the output folder.
set -u

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-python3}
MODE=gpu
[[ ${GPU_CHECK_CPU_SMOKE:-0} == 1 ]] && MODE=cpu-smoke
DRY_RUN=0
OUT_DIR="" WORK="" PLANS="" REPEATS="" BUDGET=450

usage() { sed -n '2,7p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }
die() { echo "gpu_check.sh: $*" >&2; exit 2; }
while (( $# )); do
    case $1 in
        --out) (( $# > 1 )) || die "--out needs a folder"; OUT_DIR=$2; shift 2 ;;
        --work) (( $# > 1 )) || die "--work needs a folder"; WORK=$2; shift 2 ;;
        --plans) (( $# > 1 )) || die "--plans needs a comma list"; PLANS=$2; shift 2 ;;
        --repeats) (( $# > 1 )) || die "--repeats needs a number"; REPEATS=$2; shift 2 ;;
        --budget) (( $# > 1 )) || die "--budget needs seconds"; BUDGET=$2; shift 2 ;;
        --cpu-smoke) MODE=cpu-smoke; shift ;;
        --dry-run) DRY_RUN=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) die "unknown argument '$1' (see --help)" ;;
    esac
done
[[ $BUDGET =~ ^[0-9]+$ ]] || die "--budget must be whole seconds, got '$BUDGET'"
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
    # seconds kept back for the stages after the one starting (measured estimates, see the top)
    KEEP_FOR_MEASURE=150 KEEP_FOR_PROFILE=50
else
    MODEL=digits DEVICE=cpu STEPS=4 BATCH=2 GUIDANCE=4
    PLANS=${PLANS:-full,fora:2}
    REPEATS=${REPEATS:-1}
    WORK=${WORK:-${TMPDIR:-/tmp}/tcgraph-gpu-check-smoke}
    PYTEST_TARGETS=(tests/runtime/test_torch_runner.py tests/runtime/trt)  # the files that hold gpu tests
    KEEP_FOR_MEASURE=30 KEEP_FOR_PROFILE=10
fi
BACKENDS=eager,torch,torch-nograph
PROFILE_BACKENDS=torch PROFILE_PLANS=full,fora:2
absolute() { if [[ $1 == /* ]]; then echo "$1"; else echo "$PWD/$1"; fi; }  # the stages run in $REPO
OUT_DIR=$(absolute "${OUT_DIR:-${OUT:-$REPO/benchmarks/results/gpu-check}}")
WORK=$(absolute "$WORK")
IFS=, read -r -a PLAN_LIST <<< "$PLANS"
[[ " ${PLAN_LIST[*]} " == *" full "* ]] || PLAN_LIST=(full "${PLAN_LIST[@]}")
NPROC=$(nproc 2>/dev/null || echo 2)
THREADS=$(( NPROC / ${#PLAN_LIST[@]} )); (( THREADS >= 1 )) || THREADS=1
MIN_STAGE=10  # a stage with less time left than this is skipped, not started

COMMON=(--model "$MODEL" --device "$DEVICE" --steps "$STEPS" --batch "$BATCH" --guidance "$GUIDANCE"
        --seed 0 --work "$WORK" --quiet)
# Each *_cmd sets CMD, the stage's command line as an array (paths may hold spaces).
prepare_cmd() {
    CMD=(env OMP_NUM_THREADS="$THREADS" "$PYTHON" benchmarks/bench_gpu.py --prepare-only "${COMMON[@]}"
         --backends torch --plans "$1")
}
measure_cmd() {
    CMD=("$PYTHON" benchmarks/bench_gpu.py "${COMMON[@]}" --repeats "$REPEATS" --plans "$1" --backends "$BACKENDS"
         --no-profile --out "$OUT_DIR/gpu-bench")
}
profile_cmd() {
    CMD=("$PYTHON" benchmarks/bench_gpu.py "${COMMON[@]}" --repeats 1 --plans "$PROFILE_PLANS"
         --backends "$PROFILE_BACKENDS" --out "$OUT_DIR/gpu-bench-profile")
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
         "repeats $REPEATS, budget ${BUDGET}s"
    echo "out $OUT_DIR; work $WORK; PYTHONPATH=$REPO"
    echo "[env] \$ $PYTHON ENV_CHECK.py (versions, CUDA, tcgraph's imports)"
    for spec in "${PLAN_LIST[@]}"; do prepare_cmd "$spec"; echo "[prepare] \$ $(shown)"; done
    pytest_cmd; echo "[gpu-tests] \$ $(shown)"
    measure_cmd "$(IFS=,; echo "${PLAN_LIST[*]}")"; echo "[measure] \$ $(shown)"
    if [[ $MODE == gpu ]]; then profile_cmd; echo "[profile] \$ $(shown)"; else echo "[profile] skipped on CPU"; fi
    exit 0
fi

mkdir -p "$OUT_DIR" "$WORK" || die "cannot make the folders $OUT_DIR and $WORK"
cd "$REPO" || die "cannot enter $REPO"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
STATE=$(mktemp -d "${TMPDIR:-/tmp}/gpu-check-state.XXXXXX") || die "cannot make a temporary folder"
trap 'rm -rf "$STATE"' EXIT
T0=$SECONDS
BENCH_LOG=$OUT_DIR/bench.log PYTEST_LOG=$OUT_DIR/pytest-gpu.log
rm -f "$BENCH_LOG" "$PYTEST_LOG" "$OUT_DIR"/gpu-bench.* "$OUT_DIR"/gpu-bench-profile.* "$OUT_DIR/summary.txt"

#################################################################################
#                                   Stages                                      #
#################################################################################

record() {  # ORDER NAME STATUS SECONDS NOTE: one line per stage (background stages too)
    printf '%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "$5" >> "$STATE/stages.tsv"
}
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

status_of() { awk -F'\t' -v n="$1" '$2 == n {print $3}' "$STATE/stages.tsv" 2>/dev/null | tail -1; }

# ---- env: versions, and what is missing -------------------------------------------------------
cat > "$STATE/env_check.py" <<'EOF'
"""Print the environment; write the missing modules to $GPU_CHECK_STATE/missing; exit 1 if the check cannot run."""
import importlib, os, platform, shutil, subprocess, sys

mode, state = os.environ["GPU_CHECK_MODE"], os.environ["GPU_CHECK_STATE"]
print(f"python      {sys.version.split()[0]} ({sys.executable}), {platform.machine()}, {os.cpu_count()} cores")
# tcgraph's dependencies (pyproject.toml), then what the stages use besides them
modules = {"torch": "everything", "numpy": "everything", "onnx": "transform (ONNX export)",
           "onnxscript": "transform (torch.onnx dynamo exporter)", "onnxruntime": "the ort backend (not run here)",
           "safetensors": "the demo model's weights (gpu tests, --cpu-smoke)", "sklearn": "calibration data only",
           "PIL": "PNG output only", "tqdm": "progress bars only (stages pass --quiet)",
           "pytest": "the gpu-tests stage", "tensorrt": "the trt backend (not run here)"}
missing = []
for name, use in modules.items():
    try:
        mod = importlib.import_module(name)
        version = getattr(mod, "__version__", "?")
        print(f"{name:<12}{version}")
    except Exception as e:  # ImportError, or a package broken in its own way
        print(f"{name:<12}MISSING ({type(e).__name__}: {str(e)[:80]}); needed for: {use}")
        missing.append(name)
with open(os.path.join(state, "missing"), "w") as f:
    f.write(" ".join(missing))
problems = []
try:
    import torch
    print(f"torch CUDA  {torch.version.cuda or 'none (CPU build)'}; available: {torch.cuda.is_available()}")
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        print(f"GPU         {p.name}, {p.total_memory / 2**30:.0f} GiB, compute capability {p.major}.{p.minor}, "
              f"{p.multi_processor_count} SMs")
    elif mode == "gpu":
        problems.append("torch sees no CUDA GPU: this is the GPU check; on a CPU machine run it with --cpu-smoke")
except ImportError:
    problems.append("torch does not import")
try:
    import onnxruntime
    print(f"ort         providers {onnxruntime.get_available_providers()}")
except ImportError:
    pass
if shutil.which("nvidia-smi"):
    q = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                       capture_output=True, text=True)
    print(f"nvidia-smi  {q.stdout.strip() or q.stderr.strip()}")
try:
    import tcgraph.api  # noqa: F401  (from this checkout, through PYTHONPATH)
    print(f"tcgraph     {tcgraph.__version__} from {os.path.dirname(tcgraph.__file__)}")
except Exception as e:
    problems.append(f"tcgraph does not import from this checkout: {type(e).__name__}: {e}")
work = os.environ["GPU_CHECK_WORK"]
free = shutil.disk_usage(work).free / 2**30
print(f"disk        {free:.0f} GiB free under {work}")
if mode == "gpu" and free < 20:
    problems.append(f"only {free:.0f} GiB free under {work}: a DiT-XL/2 artifact folder takes ~2.6 GB, "
                    "and each plan writes one; pass --work on a larger disk")
for p in problems:
    print(f"PROBLEM     {p}")
sys.exit(1 if problems else 0)
EOF

# skip_reason STAGE: why STAGE cannot run (env failed, a module it needs is missing), or nothing
skip_reason() {
    local need missing m
    [[ $(status_of env) == ok ]] || { echo "the env stage failed (see summary.txt)"; return; }
    case $1 in
        prepare) need="torch numpy onnx onnxscript" ;;
        gpu-tests) need="torch numpy onnx onnxscript pytest safetensors" ;;
        *) need="torch numpy" ;;
    esac
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
LIMIT=$(left $(( KEEP_FOR_MEASURE + KEEP_FOR_PROFILE )))
why=$(skip_reason gpu-tests)
if [[ -n $why ]]; then
    record 2 gpu-tests skipped 0 "$why"
else
    pytest_cmd
    run_stage 2 gpu-tests "$LIMIT" "$PYTEST_LOG" 0 "${CMD[@]}" &
fi
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
READY=()
for spec in "${PLAN_LIST[@]}"; do
    [[ $(status_of "prepare $spec") == ok ]] && READY+=("$spec")
done
READY_LIST=$(IFS=,; echo "${READY[*]}")

# ---- measure, then profile -------------------------------------------------------------------
why=$(skip_reason measure)
[[ -z $why && $(status_of "prepare full") != ok ]] && why="the full plan's folder was not prepared (see bench.log)"
if [[ -n $why ]]; then
    record 4 measure skipped 0 "$why"
else
    measure_cmd "$READY_LIST"
    run_stage 4 measure "$(left "$KEEP_FOR_PROFILE")" "$BENCH_LOG" 1 "${CMD[@]}"
fi
why=$(skip_reason profile)
if [[ $MODE != gpu ]]; then
    why="no CUDA: the profiled run counts CUDA memcpy events, which a CPU run does not have"
fi
for spec in ${PROFILE_PLANS//,/ }; do
    [[ -z $why && $(status_of "prepare $spec") != ok ]] && why="the $spec plan's folder was not prepared"
done
if [[ -n $why ]]; then
    record 5 profile skipped 0 "$why"
else
    profile_cmd
    run_stage 5 profile "$(left 0)" "$BENCH_LOG" 1 "${CMD[@]}"
fi

#################################################################################
#                                  Summary                                      #
#################################################################################

summary() {
    echo "gpu_check.sh $MODE, $(date -u '+%Y-%m-%d %H:%M:%S UTC'), ${SECONDS}s in all ($(( SECONDS - T0 ))s of" \
         "the ${BUDGET}s budget)"
    echo "settings: $MODEL, $STEPS steps, batch $BATCH, guidance $GUIDANCE, device $DEVICE, plans ${PLAN_LIST[*]}," \
         "backends $BACKENDS, repeats $REPEATS"
    echo
    echo "== environment"
    cat "$STATE/env.txt" 2>/dev/null | grep -v '^\[env\]'
    echo
    echo "== stages"
    sort -t$'\t' -k1,1V "$STATE/stages.tsv" | while IFS=$'\t' read -r _ name status secs note; do
        printf 'stage %-22s %-9s %4ss%s\n' "$name:" "$status" "$secs" "${note:+  $note}"
    done
    if [[ -f $PYTEST_LOG ]]; then
        echo
        echo "== gpu tests: $(grep -E '[0-9]+ (passed|failed|skipped|error|deselected)' "$PYTEST_LOG" | tail -1 \
                              | sed 's/^\[gpu-tests\] //')"
        grep -E '^\[gpu-tests\] SKIPPED' "$PYTEST_LOG" | sed 's/^\[gpu-tests\] /  /' | head -20
    fi
    "$PYTHON" - "$OUT_DIR/gpu-bench.json" "$OUT_DIR/gpu-bench-profile.json" <<'EOF'
"""The measured rows of the bench JSON files (no torch import: fast, and works when torch is broken)."""
import json, sys
from pathlib import Path

def num(v, spec):
    return format(v, spec) if isinstance(v, (int, float)) else "-"

for path in map(Path, sys.argv[1:]):
    print(f"\n== {path.name}")
    if not path.is_file():
        print("  not written")
        continue
    result = json.loads(path.read_text())
    print(f"  {'backend':<14}{'plan':<14}{'variants':>8}{'median ms':>11}{'realized x':>11}{'predicted x':>12}"
          f"{'vs eager x':>11}  copies in loop")
    for r in result["rows"]:
        print(f"  {r['backend']:<14}{r['plan']:<14}{r['variants']:>8}{num(r['median_ms'], '.1f'):>11}"
              f"{num(r['realized_speedup'], '.2f'):>11}{num(r['predicted_speedup'], '.2f'):>12}"
              f"{num(r['vs_eager'], '.2f'):>11}  {r['copies_in_loop']}")
    for s in result["skipped"]:
        print(f"  skipped {s['backend'] or 'all rows'}{' x ' + s['plan'] if s['plan'] else ''}: {s['reason']}")
    for f in result["failed"]:
        print(f"  FAILED {f['backend']} x {f['plan']}: {f['error']}")
EOF
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
