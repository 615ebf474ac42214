#!/usr/bin/env bash
# One call on the GPU machine: the CUDA tests and the benchmarks, with results under $OUT.
#
#   perf/gpu_check.sh                      # every section (more than one 10-minute call: split it)
#   perf/gpu_check.sh tests scan           # the sections named, in order
#
# Sections: tests (pytest -m cuda), scan (perf/bench_scan.py), train (perf/bench_train.py),
# generate (perf/bench_generate.py), profile (mamba-compiled profile), tasks (perf/run_paper_tasks.sh).
# Runs from the repository root with the machine's own python3 (torch, triton); the package is
# used from the working tree (PYTHONPATH), not installed. Every section writes under $WORK; its
# console output goes to $OUT/gpu_check.log, and at the end the markdown tables, plots and logs are
# packed into $OUT/results.tar.gz (the device tool brings back at most 8 files). A failing section
# does not stop the others.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-perf/out}
WORK=${WORK:-/tmp/gpu_check}
mkdir -p "$OUT" "$WORK"
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
            section scan $PY perf/bench_scan.py --out "$WORK/scan" ;;
        scan-sweep)
            section scan-sweep $PY perf/bench_scan.py --out "$WORK/scan-sweep" --sweep --skip-refs --skip-plot ;;
        train)
            section train-130m $PY perf/bench_train.py --model 130m --batch 8 --seqlen 2048 --out "$WORK/train-130m"
            section train-1.4b $PY perf/bench_train.py --model 1.4b --batch 8 --seqlen 2048 --out "$WORK/train-1.4b" ;;
        generate)
            section generate $PY perf/bench_generate.py --out "$WORK/generate" ;;
        profile)
            for mode in decode prefill train; do
                section "profile-$mode" $PY -m mamba_compiled.cli profile --model 130m --mode "$mode" --out "$WORK/profile-130m-$mode"
            done
            section profile-decode-eager $PY -m mamba_compiled.cli profile --model 130m --mode decode --no-compile --out "$WORK/profile-130m-decode-eager" ;;
        ncu)
            # '/' separates nested ranges in ncu's filter: the slashes inside our names are escaped.
            section ncu-scan ncu --nvtx --nvtx-include 'mamba\/layers.0\/scan/' --clock-control none --set full -f -o "$WORK/ncu-scan-layer0" $PY -m mamba_compiled.cli profile --model 130m --mode prefill --seqlen 2048 --no-compile --nvtx --no-torch-profiler --warmup 0 ;;
        tasks)
            section tasks bash perf/run_paper_tasks.sh "$WORK/tasks" ;;
        *)
            echo "unknown section: $s" | tee -a "$LOG"
            STATUS+=("$s: unknown") ;;
    esac
done

echo "=== summary" | tee -a "$LOG"
printf '%s\n' "${STATUS[@]}" | tee -a "$LOG"
# Tables, plots and logs come back; traces and ncu reports only while they are small.
(cd "$WORK" && find . -type f \( -name '*.md' -o -name '*.png' -o -name '*.jsonl' -o -name '*.log' -o -name '*.txt' \
    -o \( \( -name '*.json' -o -name '*.ncu-rep' \) -size -3M \) \) -print0 | tar czf "$OUT/results.tar.gz" --null -T -)
ls -la "$OUT"
