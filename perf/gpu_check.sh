#!/usr/bin/env bash
# One call on the GPU machine: the CUDA tests and the benchmarks, with results under $OUT.
#
#   perf/gpu_check.sh                      # every section (more than one 10-minute call: split it)
#   perf/gpu_check.sh tests scan           # the sections named, in order
#
# Sections: tests (pytest -m cuda), scan (perf/bench_scan.py), train (perf/bench_train.py),
# generate (perf/bench_generate.py), profile (mamba-compiled profile), tasks (perf/run_paper_tasks.sh).
# Runs from the repository root with the machine's own python3 (torch, triton); the package is
# used from the working tree (PYTHONPATH), not installed. Each section's output goes to
# $OUT/gpu_check.log; benchmark tables to $OUT/*.md; a failing section does not stop the others.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-perf/out}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
LOG="$OUT/gpu_check.log"
PY=python3

section() {  # section NAME COMMAND...: run, log, record the exit status
    local name=$1
    shift
    echo "=== [$name] $* ($(date -u +%H:%M:%S))" | tee -a "$LOG"
    local start=$SECONDS
    "$@" 2>&1 | tee -a "$LOG"
    local rc=${PIPESTATUS[0]}
    echo "=== [$name] exit $rc after $((SECONDS - start)) s" | tee -a "$LOG"
    STATUS+=("$name: exit $rc, $((SECONDS - start)) s")
}

{
    date -u
    git rev-parse --short HEAD 2>/dev/null
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv
    $PY -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
} 2>&1 | tee -a "$LOG"

STATUS=()
sections=("$@")
[ ${#sections[@]} -eq 0 ] && sections=(tests scan train generate profile tasks)
for s in "${sections[@]}"; do
    case $s in
        tests)
            section tests $PY -m pytest -m cuda -q -p no:cacheprovider -rfEs --durations=15 tests ;;
        scan)
            section scan $PY perf/bench_scan.py --out "$OUT" ;;
        scan-sweep)
            section scan-sweep $PY perf/bench_scan.py --out "$OUT" --sweep --skip-refs --skip-plot ;;
        train)
            section train-130m $PY perf/bench_train.py --model 130m --batch 8 --seqlen 2048 --out "$OUT"
            section train-1.4b $PY perf/bench_train.py --model 1.4b --batch 8 --seqlen 2048 --out "$OUT" ;;
        generate)
            section generate $PY perf/bench_generate.py --out "$OUT" ;;
        profile)
            for mode in decode train; do
                section "profile-$mode" $PY -m mamba_compiled.cli profile --model 130m --mode "$mode" --out "$OUT"
            done ;;
        tasks)
            section tasks bash perf/run_paper_tasks.sh "$OUT" ;;
        *)
            echo "unknown section: $s" | tee -a "$LOG"
            STATUS+=("$s: unknown") ;;
    esac
done

echo "=== summary" | tee -a "$LOG"
printf '%s\n' "${STATUS[@]}" | tee -a "$LOG"
