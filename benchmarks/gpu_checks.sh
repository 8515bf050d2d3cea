#!/usr/bin/env bash
# Every GPU check and benchmark of moe-export in one run, for the GPU test machine as it is (one H200,
# Python 3.12, torch 2.11, triton 3.6, onnx 1.23.1, onnxruntime 1.30.0; no onnx-graphsurgeon, no
# polygraphy, no TensorRT, no network) or any machine with an NVIDIA GPU, with or without TensorRT.
#
#   python benchmarks/gpu_wheels.py                            # here: .whl/ and the command to send
#   GPU_CHECKS_WHEELS=.whl OUT=/path/to/results bash benchmarks/gpu_checks.sh   # there, from the repo root
#
# Writes to $OUT (default ./gpu_checks_out):
#   env.txt                  GPU (nvidia-smi), Python and package versions, "TensorRT: <version>" or
#                            "TensorRT: absent", "CUDA: available" or "CUDA: not available"
#   wheels.txt               pip install --no-index --no-deps --target of the carried wheels
#                            ($GPU_CHECKS_WHEELS: onnx-graphsurgeon, polygraphy), then on PYTHONPATH
#   pip_install.txt          pip install --no-deps --no-build-isolation --no-index -e .
#   pytest_gpu.txt           pytest -m gpu tests/            (TensorRT engines of each plugin, bench rows)
#   pytest_kernels_cuda.txt  pytest tests/plugins/test_kernels_cuda.py   (compiled Triton kernels, no TensorRT)
#   build_vmoe_tiny.txt, build_soft_moe_tiny.txt, vmoe-tiny/, soft-moe-tiny/
#                            moe-export build engine (bundle + engine + validation); TensorRT only
#   plugin_kernels.txt/.json benchmarks/plugin_kernels.py: every plugin kernel at V-MoE B/16 E=8/32 shapes
#                            (224 and 384 px groups) and Soft-MoE S/16, fp16, against PyTorch eager and
#                            torch.compile, GB/s against the copy bandwidth it measures, and the targets
#   bench_vmoe_s32.txt/.json moe-export bench --model vmoe-s32-last2-e8 --batch 8: PyTorch eager on CUDA,
#                            ONNX Runtime CUDA, TensorRT portable and with plugins (skipped rows say why)
#   summary.txt              one line per step: exit code, status, wall time, the timeout it ran under;
#                            then the kernel targets, each met or MISSED
#
# Budget: at most GPU_CHECKS_BUDGET_S (default 330 s) from the start, whatever happens, so that a
# run under a 360 s timeout can be repeated once within 15 minutes of device time:
#   setup (sequential)           env 20 s, wheels 15 s, pip 20 s
#   correctness (in parallel)    90 s for all of: pytest -m gpu, the CUDA kernel tests, and the two
#                                engine builds one after the other; results do not depend on timing
#   timing (sequential, alone)   plugin kernels 120 s, bench 60 s
# These caps are estimates made without a GPU (none has been lent yet): the first run's wall times in
# summary.txt are what to tune them with.
# Each step runs under `timeout` (TERM, then KILL 5 s later), within its phase's deadline and within
# the budget; a step that would get under 10 s is skipped. Steps never stop the script (no `set -e`):
# each one's exit code lands in summary.txt, TIMEOUT for 124/137. Steps that need CUDA or TensorRT are
# skipped, with the reason, where env.txt says they are missing, so on a CPU machine the script ends in
# about a minute with the pytest steps reporting skips (CI runs it so, with the GPU machine's package
# versions: the rehearsal).
# Exit code: 0 when no step failed or timed out, else 1 (pip failing is "no-pip", not a failure).
#
# Environment: PYTHON (default: python, else python3), OUT, GPU_CHECKS_BUDGET_S, GPU_CHECKS_WHEELS (a
# folder of wheels to install first), and GPU_CHECKS_INSTALL=0 to skip the pip step. The repository
# root is always put on PYTHONPATH, so everything runs from this checkout even when pip cannot install it.

set -u

OUT=${OUT:-$PWD/gpu_checks_out}
BUDGET_S=${GPU_CHECKS_BUDGET_S:-330}
KILL_AFTER_S=5
MIN_STEP_S=10
mkdir -p "$OUT/.steps"
rm -f "$OUT"/.steps/*
T0=$(date +%s)
FINAL_DEADLINE=$((T0 + BUDGET_S))

PY=${PYTHON:-$(command -v python || command -v python3 || echo python3)}
export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET # the kernel tests must compile for the GPU, not interpret on the CPU
# moe-export from this checkout, installed or not (argv[0] set for click's usage lines)
MOE=("$PY" -c 'import sys; sys.argv[0] = "moe-export"; from cli import main; main()')
STEP_NO=0
LAST_RC=- LAST_WALL=- LAST_CAP=-

# ---------------------------------------------------------------------------------------------------

record() { # record NO NAME RC STATUS WALL CAP NOTE
    printf '%-21s %5s  %-7s %7s %6s  %s\n' "$2" "$3" "$4" "$5" "$6" "$7" >"$OUT/.steps/$(printf '%02d' "$1")"
}

skip() { # skip NAME REASON
    STEP_NO=$((STEP_NO + 1))
    record "$STEP_NO" "$1" - SKIP - - "$2"
    echo "== $1: skipped: $2"
}

# run_step NAME CAP_S DEADLINE LOG QUIET -- COMMAND...: runs COMMAND under timeout, output to $OUT/LOG
# (and to the terminal unless QUIET=1), and records its exit code and wall time.
run_step() {
    local name=$1 cap=$2 deadline=$3 log=$4 quiet=$5
    shift 6
    STEP_NO=$((STEP_NO + 1))
    local no=$STEP_NO now t rc status start wall_ms
    ((deadline > FINAL_DEADLINE)) && deadline=$FINAL_DEADLINE
    now=$(date +%s)
    t=$((deadline - now - KILL_AFTER_S))
    ((cap < t)) && t=$cap
    if ((t < MIN_STEP_S)); then
        LAST_RC=- LAST_WALL=- LAST_CAP=-
        record "$no" "$name" - SKIP - - "out of time ($((now - T0)) s used of $BUDGET_S s)"
        echo "== $name: skipped: out of time"
        return 0
    fi
    local shown="$*"
    shown=${shown/"${MOE[*]}"/moe-export}
    echo "== $name (timeout ${t}s, log $log): $shown"
    start=$(date +%s%N)
    if [ "$quiet" = 1 ]; then
        {
            echo "\$ $shown"
            timeout -k "$KILL_AFTER_S" "$t" "$@" </dev/null
        } >"$OUT/$log" 2>&1
        rc=$?
    else
        {
            echo "\$ $shown"
            timeout -k "$KILL_AFTER_S" "$t" "$@" </dev/null
        } 2>&1 | tee "$OUT/$log"
        rc=${PIPESTATUS[0]}
    fi
    wall_ms=$((($(date +%s%N) - start) / 1000000))
    case $rc in
    0) status=ok ;;
    124 | 137) status=TIMEOUT ;;
    *) status=FAIL ;;
    esac
    LAST_WALL="$((wall_ms / 1000)).$(((wall_ms % 1000) / 100))" LAST_CAP=$t LAST_RC=$rc
    record "$no" "$name" "$rc" "$status" "$LAST_WALL" "$t" "$log"
    echo "== $name: $status (exit $rc) in $((wall_ms / 1000)) s"
}

# --- setup -----------------------------------------------------------------------------------------

ENV_PY='
import importlib, platform, subprocess, sys

print("python:", sys.version.split()[0], sys.executable)
print("platform:", platform.platform(), "|", platform.machine())

def version(module):
    try:
        return getattr(importlib.import_module(module), "__version__", "(no __version__)")
    except Exception as e:
        return f"absent ({type(e).__name__}: {str(e).strip().splitlines()[0][:120] if str(e).strip() else e!r})"

for module in ("torch", "triton", "onnxruntime", "onnx", "cupy", "polygraphy", "numpy"):
    print(f"{module}: {version(module)}")
trt = version("tensorrt")
print("TensorRT:", trt if not trt.startswith("absent") else "absent" + trt[len("absent"):])

try:
    import torch

    cuda = torch.cuda.is_available()
except Exception as e:
    print("torch does not import:", type(e).__name__, e)
    cuda = False
if cuda:
    print("CUDA: available")
    print("torch.version.cuda:", torch.version.cuda, "| devices:", torch.cuda.device_count())
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        print(f"  cuda:{i} {p.name} sm_{p.major}{p.minor} {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs")
else:
    print("CUDA: not available")
try:
    import onnxruntime

    print("onnxruntime providers:", ", ".join(onnxruntime.get_available_providers()))
except Exception as e:
    print("onnxruntime providers: unknown", type(e).__name__)
'

env_report() {
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "commit: $(git rev-parse HEAD 2>/dev/null || echo unknown)"
    echo "cpus: $(nproc 2>/dev/null || echo '?')"
    echo "--- nvidia-smi -L"
    if command -v nvidia-smi >/dev/null; then
        timeout 10 nvidia-smi -L 2>&1
        timeout 10 nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit --format=csv 2>&1
    else
        echo "nvidia-smi: not found"
    fi
    echo "--- python"
    "$PY" -c "$ENV_PY"
}
export -f env_report
export PY ENV_PY

run_step env 20 "$FINAL_DEADLINE" env.txt 0 -- bash -c env_report
TRT_VERSION=$(sed -n 's/^TensorRT: //p' "$OUT/env.txt" | head -n 1)
TRT_VERSION=${TRT_VERSION:-absent (no answer)}
if grep -q '^CUDA: available' "$OUT/env.txt"; then HAS_CUDA=1; else HAS_CUDA=0; fi
case $TRT_VERSION in absent*) HAS_TRT=0 ;; *) HAS_TRT=1 ;; esac
echo "== CUDA: $([ $HAS_CUDA = 1 ] && echo available || echo 'not available')   TensorRT: $TRT_VERSION"

WHEELS=${GPU_CHECKS_WHEELS:-}
if [ -z "$WHEELS" ]; then
    skip wheels "GPU_CHECKS_WHEELS not set (python benchmarks/gpu_wheels.py makes .whl/)"
elif ! ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    skip wheels "no wheels in $WHEELS"
else
    SITE=${GPU_CHECKS_SITE:-${TMPDIR:-/tmp}/moe-export-site}
    run_step wheels 15 "$FINAL_DEADLINE" wheels.txt 0 -- \
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
        "$WHEELS"/*.whl
    export PYTHONPATH="$SITE:$PYTHONPATH"
    "$PY" -c 'import onnx_graphsurgeon, polygraphy; print("from the wheels:", onnx_graphsurgeon.__version__, polygraphy.__version__)' >>"$OUT/wheels.txt" 2>&1
fi

if [ "${GPU_CHECKS_INSTALL:-1}" = 0 ]; then
    skip pip_install "GPU_CHECKS_INSTALL=0"
else
    run_step pip_install 20 "$FINAL_DEADLINE" pip_install.txt 0 -- \
        "$PY" -m pip install --no-deps --no-build-isolation --no-index -e .
    if [ "$LAST_RC" != 0 ] && [ "$LAST_RC" != - ]; then # not a failure of the checks: PYTHONPATH covers it
        record "$STEP_NO" pip_install "$LAST_RC" no-pip "$LAST_WALL" "$LAST_CAP" \
            "pip_install.txt: not installed; running from PYTHONPATH=$PWD"
    fi
fi

# --- correctness, in parallel ----------------------------------------------------------------------

PHASE_END=$(($(date +%s) + 90 + KILL_AFTER_S))
STEP_NO=10
run_step pytest_gpu 90 "$PHASE_END" pytest_gpu.txt 1 -- \
    "$PY" -m pytest -m gpu -q -rs -p no:cacheprovider tests/ &
PIDS=($!)
STEP_NO=20
run_step pytest_kernels_cuda 80 "$PHASE_END" pytest_kernels_cuda.txt 1 -- \
    "$PY" -m pytest -q -rs -p no:cacheprovider tests/plugins/test_kernels_cuda.py &
PIDS+=($!)
STEP_NO=30
if [ $HAS_TRT = 0 ]; then
    skip build_vmoe_tiny "no TensorRT ($TRT_VERSION)"
    skip build_soft_moe_tiny "no TensorRT"
elif ! "${MOE[@]}" build engine --help >/dev/null 2>&1; then
    skip build_vmoe_tiny "this checkout's moe-export has no 'build engine' command"
    skip build_soft_moe_tiny "this checkout's moe-export has no 'build engine' command"
else
    (
        run_step build_vmoe_tiny 45 "$PHASE_END" build_vmoe_tiny.txt 1 -- \
            "${MOE[@]}" build engine --model vmoe-tiny -o "$OUT/vmoe-tiny"
        run_step build_soft_moe_tiny 45 "$PHASE_END" build_soft_moe_tiny.txt 1 -- \
            "${MOE[@]}" build engine --model soft-moe-tiny -o "$OUT/soft-moe-tiny"
    ) &
    PIDS+=($!)
fi
wait "${PIDS[@]}"
for log in pytest_gpu.txt pytest_kernels_cuda.txt; do
    [ -f "$OUT/$log" ] && echo "--- $log (last lines)" && tail -n 15 "$OUT/$log"
done

# --- timing, one at a time -------------------------------------------------------------------------

STEP_NO=40
BENCH=("${MOE[@]}" bench --model vmoe-s32-last2-e8 --batch 8)
if [ $HAS_CUDA = 0 ]; then
    skip plugin_kernels "no CUDA GPU"
    skip bench_vmoe_s32 "no CUDA GPU"
else
    run_step plugin_kernels 120 "$FINAL_DEADLINE" plugin_kernels.txt 0 -- \
        "$PY" benchmarks/plugin_kernels.py --dtypes fp16 --iters 50 --warmup 5 --json "$OUT/plugin_kernels.json"
    run_step bench_vmoe_s32 60 "$FINAL_DEADLINE" bench_vmoe_s32.txt 0 -- "${BENCH[@]}" \
        --backends torch-eager,onnxruntime-cuda,tensorrt,tensorrt-plugins --warmup 3 --runs 20 \
        --json "$OUT/bench_vmoe_s32.json"
fi

# --- summary ---------------------------------------------------------------------------------------

{
    echo "moe-export GPU checks: $(date -u +%Y-%m-%dT%H:%M:%SZ), $(($(date +%s) - T0)) s in all (budget $BUDGET_S s)"
    echo "CUDA: $([ $HAS_CUDA = 1 ] && echo available || echo 'not available')   TensorRT: $TRT_VERSION"
    echo
    printf '%-21s %5s  %-7s %7s %6s  %s\n' step exit status wall_s cap_s "log / reason"
    cat "$OUT"/.steps/*
    if [ -f "$OUT/plugin_kernels.txt" ]; then
        echo
        grep -E '^target ' "$OUT/plugin_kernels.txt" || echo "plugin kernel targets: none measured (see plugin_kernels.txt)"
    fi
} >"$OUT/summary.txt"
rm -rf "$OUT/.steps"
echo
cat "$OUT/summary.txt"
! grep -Eq '  (FAIL|TIMEOUT) ' "$OUT/summary.txt"
