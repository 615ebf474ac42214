#!/usr/bin/env bash
# One call on the GPU machine: the CUDA tests and the benchmarks, with results under $OUT.
#
#   perf/gpu_check.sh                          # every section, one after another
#   perf/gpu_check.sh tests scan               # the sections named, in order
#   perf/gpu_check.sh tests,profile scan,train # comma groups are lanes: with several GPUs each
#                                              # lane runs on its own GPU, at the same time
#   perf/gpu_check.sh tests 2:ddp sc ih        # "N:" gives a lane N GPUs (4 GPUs here)
#
# Sections: tests (pytest -m cuda), scan, scan-sweep, scan-decode (perf/bench_scan.py;
# scan-decode-<table>[+<table>] for some of its tables, e.g. scan-decode-linear+configs), train
# (perf/bench_train.py, 130M and 1.4B; train-130m, train-1.4b for one; train-1.4b-recompute
# with the conv and projections recomputed; TRAIN_ARGS, e.g. "--ck 16", go to both), generate
# (perf/bench_generate.py; generate-130m, generate-1.4b, generate-1.4b@64 for one batch), profile (mamba-compiled profile of the
# 130M model, decode, prefill and train; profile-<mode> for one; profile-<mode>@<batch>[x<seqlen>]
# at that shape, e.g. profile-prefill@1x100, of the model PROFILE_MODEL, default 130m, with
# PROFILE_ARGS, e.g. --no-pdl;
# GENERATE_ARGS, e.g. --no-pdl or "--decode-mode max-autotune", go to generate-<model>@<batch>),
# profile-decode-eager, ncu
# (Nsight Compute on the scan kernel inside its NVTX range), ncu-fwd (on the first row's forward
# with per-instruction stall samples; perf/ncu_stalls.py reads the stall reasons), ddp (perf/bench_ddp.py), tasks
# (perf/run_paper_tasks.sh: carry runs/ to continue a run), sc, ih, ih-eval, ih-seeds (one of its pieces),
# task-step (perf/profile_task_step.py: the paper tasks' step time and its profile), pdl-check
# (perf/pdl_check.py), scan-aot (perf/triton_aot.py bench: carry perf/aot), ncu-aot (its
# profile under Nsight Compute).
# ddp and tasks use every GPU their lane sees: give such a lane "2:" (or a call of its own).
#
# Runs from the repository root with the machine's own python3 (torch, triton); the package is
# used from the working tree (PYTHONPATH), not installed. Sections write under $WORK; console
# output goes to $OUT/<lane>.log, and after every section the tables, plots and logs are packed
# into $OUT/<lane>.tar.gz (the device tool brings back at most 8 files, also after a timeout).
# A failing section does not stop the others. TEST_WORKERS (default 4): pytest-xdist processes
# of the tests section, all on the lane's GPU(s); TESTS (default tests): what pytest collects.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-perf/out}
WORK=${WORK:-/tmp/gpu_check}
mkdir -p "$OUT" "$WORK"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=python3

pack() {  # pack LANE: the lane's small outputs into one archive
    (cd "$WORK/$1" && find . -type f \( -name '*.md' -o -name '*.png' -o -name '*.jsonl' \
        -o -name '*.log' -o -name '*.txt' -o -name 'runs-*.tar.gz' \
        -o \( \( -name '*.json' -o -name '*.ncu-rep' \) -size -3M \) \) \
        -print0 | tar czf "$OUT/$1.tar.gz" --null -T -)
}

section() {  # section LANE NAME COMMAND...: run, log, record the exit status
    local lane=$1 name=$2
    shift 2
    local log="$OUT/$lane.log" start=$SECONDS
    echo "=== [$name] $* ($(date -u +%H:%M:%S))" >>"$log"
    "$@" >>"$log" 2>&1
    local rc=$?
    echo "=== [$name] exit $rc after $((SECONDS - start)) s" | tee -a "$log"
    pack "$lane"
}

run_lane() {  # run_lane LANE SECTION...
    local lane=$1 w
    shift
    w="$WORK/$lane"
    mkdir -p "$w"
    {
        date -u
        git rev-parse --short HEAD 2>/dev/null
        nvidia-smi --query-gpu=index,name,driver_version,memory.total --format=csv
        echo "CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-all}"
        $PY -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
    } >>"$OUT/$lane.log" 2>&1
    for s in "$@"; do
        case $s in
            tests)
                section "$lane" tests $PY -m pytest -m cuda -q -p no:cacheprovider -rfEs --durations=20 -n "${TEST_WORKERS:-4}" \
                    --junitxml="$w/pytest-cuda.xml" ${TESTS:-tests} ;;
            scan)
                section "$lane" scan $PY perf/bench_scan.py --out "$w/scan" ;;
            scan-decode)  # the decode-step tables alone (no scan rows, plot or references)
                section "$lane" scan-decode $PY perf/bench_scan.py --out "$w/scan-decode" --rows "" --skip-refs --skip-plot ;;
            scan-decode-*)  # scan-decode-<table>[+<table>...]: some decode tables (bench_scan's
                # --decode-tables: step, linear, chain, configs)
                t=${s#scan-decode-}
                section "$lane" "$s" $PY perf/bench_scan.py --out "$w/$s" --rows "" --skip-refs --skip-plot --decode-tables "${t//+/,}" ;;
            scan-sweep)
                section "$lane" scan-sweep $PY perf/bench_scan.py --out "$w/scan-sweep" --sweep --skip-refs --skip-plot ;;
            train | train-130m | train-1.4b)
                for m in 130m 1.4b; do
                    [[ $s == train || $s == "train-$m" ]] || continue
                    # shellcheck disable=SC2086
                    section "$lane" "train-$m" $PY perf/bench_train.py --model "$m" --batch 8 --seqlen 2048 ${TRAIN_ARGS:-} --out "$w/train-$m"
                done ;;
            train-*-recompute)  # train-<model>-recompute: with models.set_recompute
                m=${s#train-}
                m=${m%-recompute}
                # shellcheck disable=SC2086
                section "$lane" "$s" $PY perf/bench_train.py --model "$m" --batch 8 --seqlen 2048 --recompute ${TRAIN_ARGS:-} --out "$w/$s" ;;
            generate | generate-130m | generate-1.4b)
                for m in 130m 1.4b; do
                    [[ $s == generate || $s == "generate-$m" ]] || continue
                    section "$lane" "generate-$m" $PY perf/bench_generate.py --model "$m" --batch 1 64 --out "$w/generate-$m"
                done ;;
            generate-*@*)  # generate-<model>@<batch>: one batch size
                m=${s#generate-}
                section "$lane" "$s" $PY perf/bench_generate.py --model "${m%@*}" --batch "${m#*@}" --out "$w/generate-${m%@*}-b${m#*@}" ${GENERATE_ARGS:-} ;;
            profile | profile-decode | profile-prefill | profile-train)
                for mode in decode prefill train; do
                    [[ $s == profile || $s == "profile-$mode" ]] || continue
                    # the decode and train steps' Inductor code comes back too (which kernels,
                    # fused how)
                    logs=()
                    [[ $mode != prefill ]] && mkdir -p "$w/profile-130m-$mode" &&
                        logs=(env TORCH_LOGS=output_code TORCH_LOGS_OUT="$w/profile-130m-$mode/output_code.txt")
                    section "$lane" "profile-$mode" "${logs[@]}" $PY -m mamba_compiled.cli profile --model 130m --mode "$mode" --out "$w/profile-130m-$mode"
                done ;;
            profile-*@*)  # profile-<mode>@<batch>[x<seqlen>]: PROFILE_MODEL (130m) at that shape
                m=${s#profile-}
                mode=${m%@*} shape=${m#*@} pm=${PROFILE_MODEL:-130m}
                extra=(--batch "${shape%x*}")
                [[ $shape == *x* ]] && extra+=(--seqlen "${shape#*x}")
                # PROFILE_ARGS, e.g. --no-pdl (per-kernel times under PDL include the wait)
                # shellcheck disable=SC2086
                section "$lane" "$s" $PY -m mamba_compiled.cli profile --model "$pm" --mode "$mode" "${extra[@]}" ${PROFILE_ARGS:-} --out "$w/profile-$pm-$mode-$shape" ;;
            profile-decode-eager)
                section "$lane" profile-decode-eager $PY -m mamba_compiled.cli profile --model 130m --mode decode --no-compile --out "$w/profile-130m-decode-eager" ;;
            ncu)
                # '/' separates nested ranges in ncu's filter: the slashes inside our names are escaped.
                section "$lane" ncu-scan ncu --nvtx --nvtx-include 'mamba\/layers.0\/scan/' --clock-control none --set full -f \
                    -o "$w/ncu-scan-layer0" $PY -m mamba_compiled.cli profile --model 130m --mode prefill --seqlen 2048 \
                    --no-compile --nvtx --no-torch-profiler --warmup 0 ;;
            pdl-check)  # compiled decoding with PDL against without (perf/pdl_check.py), with
                # the compiled steps' Inductor code
                mkdir -p "$w/pdl-check"
                section "$lane" pdl-check env TORCH_LOGS=output_code TORCH_LOGS_OUT="$w/pdl-check/output_code.txt" \
                    $PY perf/pdl_check.py --out "$w/pdl-check" ;;
            task-step)  # where a paper task's training step spends its time
                for t in induction-heads selective-copying; do
                    section "$lane" "task-step-$t" $PY perf/profile_task_step.py --task "$t" --out "$w/task-step"
                done ;;
            scan-aot)  # the scan kernels as triton 3.9 compiled them (perf/triton_aot.py build,
                # here; carry perf/aot) against the device's JIT
                section "$lane" scan-aot $PY perf/triton_aot.py bench --aot perf/aot --out "$w/scan-aot" ;;
            ncu-fwd)  # Nsight Compute on the first row's forward (the JIT's kernel, with checkpoints
                # twice, then without): warp states, per-instruction stall samples (SASS, CSV as .txt)
                section "$lane" ncu-fwd ncu --clock-control none --kernel-name _scan_fwd_kernel --launch-count 4 \
                    --section WarpStateStats --section SchedulerStats --section SourceCounters --section Occupancy \
                    --section LaunchStats -f -o "$w/ncu-fwd" $PY perf/probes/fwd_ck.py --launch 0
                section "$lane" ncu-fwd-stalls sh -c "$PY perf/ncu_stalls.py '$w/ncu-fwd.ncu-rep' > '$w/ncu-fwd-stalls.txt'"
                section "$lane" ncu-fwd-source sh -c "ncu --import '$w/ncu-fwd.ncu-rep' --page source --csv --print-source sass > '$w/ncu-fwd-source.txt'" ;;
            ncu-aot)  # Nsight Compute on the first row's forward: the JIT's kernel, then triton 3.9's
                section "$lane" ncu-aot ncu --clock-control none --kernel-name _scan_fwd_kernel --launch-count 4 \
                    --section SpeedOfLight --section ComputeWorkloadAnalysis --section WarpStateStats \
                    --section SchedulerStats --section Occupancy --section LaunchStats --section InstructionStats \
                    -f -o "$w/ncu-aot" $PY perf/triton_aot.py profile --aot perf/aot
                section "$lane" ncu-aot-details sh -c "ncu --import '$w/ncu-aot.ncu-rep' --page details > '$w/ncu-aot.txt'" ;;
            ddp)
                # DDP_BUCKETS: gradient bucket sizes (MB) to compare on the multi-GPU runs
                section "$lane" ddp $PY perf/bench_ddp.py --out "$w/ddp" ${DDP_BUCKETS:+--bucket-mb $DDP_BUCKETS} ;;
            tasks)  # one resumable segment of each paper task; runs/ travels back as tarballs
                section "$lane" tasks env OUT="$OUT" bash perf/run_paper_tasks.sh runs ;;
            ih-seeds)  # several runs: each run directory comes back as $OUT/runs-<name>.tar.gz
                # as soon as it is done, so a call cut short keeps the seeds it finished
                section "$lane" "$s" env OUT="$OUT" bash perf/run_paper_tasks.sh runs "$s" ;;
            sc | ih | ih-eval)  # one piece of the paper tasks on this lane's GPU; its run directory
                # comes back as runs-<name>.tar.gz inside the lane's archive (8 files come back)
                section "$lane" "$s" env OUT="$w" bash perf/run_paper_tasks.sh runs "$s" ;;
            *)
                echo "=== [$s] unknown section" | tee -a "$OUT/$lane.log" ;;
        esac
    done
}

lanes=("$@")
[ ${#lanes[@]} -eq 0 ] && lanes=("tests,scan,train,generate,profile,profile-decode-eager,ncu,ddp,tasks")
n_gpus=$(nvidia-smi -L 2>/dev/null | wc -l)
want=0  # GPUs the lanes ask for: a lane "N:sections" takes N of them, others one
for lane in "${lanes[@]}"; do
    [[ $lane =~ ^([0-9]+): ]] && want=$((want + BASH_REMATCH[1])) || want=$((want + 1))
done
if [ ${#lanes[@]} -gt 1 ] && [ -z "${OMP_NUM_THREADS:-}" ]; then
    # lanes share the host's cores: torch's CPU work (data, Inductor's compile) in every lane
    # with one thread per core oversubscribes them
    export OMP_NUM_THREADS=$(($(nproc) / ${#lanes[@]} > 0 ? $(nproc) / ${#lanes[@]} : 1))
fi
i=0
gpu=0
for lane in "${lanes[@]}"; do
    name="lane$i"
    k=1
    if [[ $lane =~ ^([0-9]+):(.*)$ ]]; then
        k=${BASH_REMATCH[1]}
        lane=${BASH_REMATCH[2]}
    fi
    IFS=, read -ra secs <<<"$lane"
    if [ ${#lanes[@]} -gt 1 ] && [ "$n_gpus" -ge "$want" ]; then
        CUDA_VISIBLE_DEVICES=$(seq -s, "$gpu" $((gpu + k - 1))) run_lane "$name" "${secs[@]}" &
    else
        run_lane "$name" "${secs[@]}"
    fi
    gpu=$((gpu + k))
    i=$((i + 1))
done
wait
ls -la "$OUT"
