#!/usr/bin/env bash
# The GPU checks, in order, on one lent CUDA machine: card, wheels, imports, every
# `pytest -m gpu` test on its own, then the GPU benchmark and the planner beside it.
#
#   bash benchmarks/gpu_check.sh                  # results: $OUT, else benchmarks/results/gpu_check_<time>/
#   STOP_ON_FAIL=1 bash benchmarks/gpu_check.sh   # stop at the first failing step (pytest -x)
#   bash benchmarks/gpu_check.sh --fetch-wheels   # on a machine WITH network: fill .whl/ first
#
# Written for the test machine (Python 3.12, CUDA torch, transformers; no network, no vLLM, no
# Transformer Engine): pure-Python wheels that machine lacks travel in the tree under .whl/
# (megatron-core, pytest and the rest of WHEELS below) and are installed from there with
# --no-index; without .whl/ they must already be importable. The repository runs from its
# folder (PYTHONPATH), nothing else is installed.
#
# Each result is written the moment its step ends, so a run cut short still brings back
# what it did: summary.txt (one line per step: status, seconds, name), card.txt, the log of
# every step, the JSON numbers the GPU tests keep (tests/, via MEGATRON_PRIME_RESULTS_DIR)
# and the benchmark's JSON and plan comparison. Every step runs under `timeout`, and the
# whole script keeps within GPU_CHECK_BUDGET_S (default 540 s): a step that would start with
# less than a minute left is recorded as not run.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)

# Pure-Python (or abi3) wheels the GPU tests import beyond torch + transformers.
WHEELS=(megatron-core==0.16.1 pytest pluggy iniconfig math-verify latex2sympy2_extended
        "antlr4-python3-runtime==4.13.2" psutil einops)
if [[ "${1:-}" == "--fetch-wheels" ]]; then
    python3 -m pip download --no-deps --python-version 3.12 --only-binary=:all: \
        --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 -d .whl "${WHEELS[@]}"
    exit $?
fi

OUT=${OUT:-benchmarks/results/gpu_check_$(date -u +%Y%m%d_%H%M%S)}
mkdir -p "$OUT/tests" "$OUT/logs"
OUT=$(cd "$OUT" && pwd)
SUMMARY="$OUT/summary.txt"
BUDGET=${GPU_CHECK_BUDGET_S:-540}
START=$SECONDS
FAILED=0
export PYTHONPATH="$REPO:$REPO/tests${PYTHONPATH:+:$PYTHONPATH}"
export MEGATRON_PRIME_RESULTS_DIR="$OUT/tests"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
PY=${PYTHON:-python3}

# step NAME TIMEOUT_S COMMAND...: runs it under timeout (capped by the time left), logs it,
# appends "STATUS SECONDS NAME" to the summary.
step() {
    local name=$1 limit=$2
    shift 2
    local left=$((BUDGET - (SECONDS - START)))
    if ((left < 60)); then
        echo "NOT-RUN   -  $name (budget of ${BUDGET}s spent)" | tee -a "$SUMMARY"
        return 0
    fi
    ((limit > left)) && limit=$left
    local log="$OUT/logs/${name//[^A-Za-z0-9_.-]/_}.log" begin=$SECONDS status
    timeout --kill-after=10 "$limit" "$@" >"$log" 2>&1
    local rc=$?
    case $rc in
        0) status=PASS ;;
        5) status=NONE ;;  # pytest: nothing collected / all deselected
        124 | 137) status=TIMEOUT ;;
        *) status="FAIL($rc)" ;;
    esac
    # pytest's last line: "1 skipped in 3.1s" (no GPU, no vLLM) is not a pass.
    if [[ $rc == 0 ]] && tail -1 "$log" | grep -q skipped && ! tail -1 "$log" | grep -q passed
    then status=SKIP; fi
    printf '%-9s %4ss %s\n' "$status" $((SECONDS - begin)) "$name" | tee -a "$SUMMARY"
    if [[ $status != PASS && $status != SKIP && $status != NONE ]]; then
        FAILED=$((FAILED + 1))
        tail -25 "$log" | sed 's/^/    | /'
        [[ -n "${STOP_ON_FAIL:-}" ]] && finish
    fi
    return 0
}

finish() {
    echo "# ${FAILED} step(s) failed; $((SECONDS - START)) s; results in $OUT" | tee -a "$SUMMARY"
    exit $((FAILED > 0))
}

: >"$SUMMARY"
# 1. The card (and what runs it), first, so even a failed run says where it ran.
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    $PY - <<'EOF'
import sys, torch
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"cuda available: {torch.cuda.is_available()}")
if torch.cuda.is_available():
    print(f"torch sees: {torch.cuda.get_device_name()}, "
          f"{torch.cuda.get_device_properties(0).total_memory} bytes")
EOF
} >"$OUT/card.txt" 2>&1
echo "# $(head -1 "$OUT/card.txt")" | tee -a "$SUMMARY"

# 2. Wheels carried in the tree (no network on the test machine).
if compgen -G ".whl/*.whl" >/dev/null; then
    step install-wheels 120 $PY -m pip install --no-index --no-deps --find-links .whl .whl/*.whl
fi

# 3. Everything the GPU tests import, named when missing, before any GPU time is spent.
step preflight 120 $PY - <<'EOF'
import importlib, sys
import torch
missing = []
for name in ("megatron.core", "pytest", "transformers", "safetensors", "megatron_prime.train",
             "megatron_prime.update", "megatron_prime.plan",
             "megatron_prime.checkpoint.train_state"):
    try:
        importlib.import_module(name)
    except Exception as error:  # report every one, not only the first
        missing.append(f"{name}: {type(error).__name__}: {error}")
print("\n".join(missing) or "all imports ok")
if not torch.cuda.is_available():
    sys.exit("torch.cuda.is_available() is False: not a GPU machine (or a CPU torch)")
sys.exit(1 if missing else 0)
EOF
if ! tail -1 "$SUMMARY" | grep -q '^PASS'; then
    echo "preflight failed: fix the environment first (logs/preflight.log)" | tee -a "$SUMMARY"
    finish
fi

# 4. The GPU tests, one pytest process each (-x): the PRIME step first, then resume, then
#    the planner's memory check, then any others.
$PY -m pytest -m gpu --collect-only -q -p no:cacheprovider 2>/dev/null | grep '::' >"$OUT/collected.txt"
ORDER=(test_gpu_prime_step test_gpu_train_state test_gpu_plan_memory)
{
    for name in "${ORDER[@]}"; do grep "/$name.py::" "$OUT/collected.txt"; done
    grep -v -e "${ORDER[0]}" -e "${ORDER[1]}" -e "${ORDER[2]}" "$OUT/collected.txt"
} >"$OUT/gpu_tests.txt"
while read -r test_id; do
    step "$test_id" 240 $PY -m pytest -x -q -ra -m gpu -p no:cacheprovider "$test_id" </dev/null
done <"$OUT/gpu_tests.txt"

# 5. The benchmark: one training step of a 1.5B Qwen2 shape at micro-batch 2, SDPA attention
#    against Megatron's unfused one in the same run (no recompute), and the planner's static
#    and activation estimate beside the measurement.
step bench_gpu_train_step 240 $PY benchmarks/bench_gpu_train_step.py --recompute none \
    --attention sdpa,unfused --micro-batch 2 --warmup 2 --steps 3 --out "$OUT/gpu_train_step.json"
if [[ -f "$OUT/gpu_train_step.json" ]]; then
    cp "$OUT/logs/bench_gpu_train_step.log" "$OUT/gpu_train_step.txt"
    step plan_vs_gpu 60 $PY benchmarks/plan_vs_gpu.py "$OUT/gpu_train_step.json"
    cp "$OUT/logs/plan_vs_gpu.log" "$OUT/plan_vs_gpu.txt" 2>/dev/null
fi
finish
