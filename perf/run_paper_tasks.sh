#!/usr/bin/env bash
# The paper's synthetic tasks on the GPU machine, in segments that each fit a 10-minute job.
#
#   perf/run_paper_tasks.sh [RUNS] [PIECE...]      (from the repository root)
#
# RUNS (default: runs) holds the run directories sc-paper/ and ih-paper/. Pieces:
#
#   sc       Selective Copying, `paper` preset (length 4096, 16 tokens read at 16 markers as in the
#            paper's data, 2 x 64, batch 64, lr 1e-4 constant): one training segment of at most SEGMENT_MIN minutes, resumed from the
#            newest checkpoint when there is one; finishes when an evaluation (1024 sequences)
#            reaches SC_TARGET, or after the paper's 400K steps
#   ih       Induction Heads, `paper` preset (length 256, 2 x 64, batch 8, Adam lr 1e-3 constant,
#            25 x 8192 steps): one training segment; the segment that finishes also measures the
#            accuracy at every length 2^6 .. 2^20 (512 sequences each)
#   ih-eval  the length sweep alone on ih-paper's newest checkpoint (256 sequences per length;
#            batch 1 at 2^20; sequences beyond 2^20 tokens would be prefilled in chunks), in bf16
#            autocast as in training and in fp32 (lengths-bf16.json, lengths-fp32.json)
#   ih-seeds the `ih` recipe with other seeds (IH_SEEDS, default "2 3 4 5"), each from scratch
#            into ih-paper-seed<N>/, with evaluations only every 8 epochs; a seed starts only
#            while IH_SEEDS_S (default 420) seconds of the piece are not spent: a seed takes
#            about 160 s on an H200 with its length sweep. Length generalization varies strongly
#            between seeds of one recipe (perf/NOTES.md, Run 18): this measures how.
#   status   where the runs stand
#
# Default pieces: sc and ih, at the same time on two GPUs when two are visible, else one after
# the other with SEGMENT_MIN halved. Rerun until both print "done"; every call moves them on.
# When $OUT is set (the device tool's output folder), each run directory, checkpoints included,
# is packed into $OUT/runs-<name>.tar.gz (about 2 MB): unpack it into RUNS and carry RUNS to the
# next call to continue on a fresh machine.
#
# Knobs: SEGMENT_MIN (default 8 for one piece at a time, 4 each when sharing one GPU: training
# stops with a checkpoint after that long; start-up, compile, evaluation and saving fit in the
# rest of a 10-minute job), SC_TARGET (default 0.99; 0 runs all 400K steps), IH_TARGET (default
# 0: the paper's 25 x 8192 steps), CUDA_GRAPH (default 1: `--cuda-graph`, each step one CUDA
# graph; both tasks' models are host-bound without it; 0 for a CPU run), PYTHON (default
# python3), TRAIN_ARGS (appended to the train command, e.g. for a CPU smoke run: CUDA_GRAPH=0
# TRAIN_ARGS="--device cpu --steps 6 --seq-len 64 --eval-every 3 --ckpt-every 3").
# The 2-GPU DDP throughput is perf/bench_ddp.py (gpu_check.sh's ddp section).
set -euo pipefail

PYTHON=${PYTHON:-python3}
SC_TARGET=${SC_TARGET:-0.99}
IH_TARGET=${IH_TARGET:-0}
graph=()
[[ ${CUDA_GRAPH:-1} == 1 ]] && graph=(--cuda-graph)
RUNS=runs
case "${1:-}" in
    sc | ih | ih-eval | ih-seeds | status | "") ;;
    *) RUNS=$1; shift ;;
esac
pieces=("$@")
[[ ${#pieces[@]} -eq 0 ]] && pieces=(sc ih)
mkdir -p "$RUNS"

pack() {  # pack NAME: RUNS/NAME into $OUT/runs-NAME.tar.gz, if $OUT is set
    if [[ -n "${OUT:-}" && -d "$RUNS/$1" ]]; then
        mkdir -p "$OUT"
        tar czf "$OUT/runs-$1.tar.gz" -C "$RUNS" "$1"
    fi
}

segment() {  # segment TASK NAME TARGET MINUTES: one training segment, resumed if possible
    local task=$1 name=$2 target=$3 minutes=$4 dir="$RUNS/$2" resume=()
    if [[ -f "$dir/summary.json" ]]; then
        echo "$task: done already ($dir/summary.json)"
        return 0
    fi
    if compgen -G "$dir/checkpoints/step_*" >/dev/null; then
        resume=(--resume)
    fi
    # shellcheck disable=SC2086  # TRAIN_ARGS is a list of options
    "$PYTHON" -m mamba_compiled train --task "$task" --preset paper --out "$dir" --device cuda \
        --time-limit "$minutes" --target-accuracy "$target" --no-progress "${resume[@]}" "${graph[@]}" \
        ${TRAIN_ARGS:-}
    pack "$name"
    if [[ -f "$dir/summary.json" ]]; then
        echo "$task: done; $dir/summary.json, $dir/metrics.jsonl, $dir/curves.png"
    else
        echo "$task: segment over; call again to continue"
    fi
}

status() {
    "$PYTHON" - "$RUNS" <<'PY'
import sys
from pathlib import Path

from mamba_compiled import checkpointing, metrics

for run in sorted(Path(sys.argv[1]).glob("[si][ch]-paper*")):
    name = run.name
    found = checkpointing.list_checkpoints(run / "checkpoints")
    records = metrics.read(run / "metrics.jsonl")
    evals = [r for r in records if r["kind"] == "eval"]
    state = "done" if (run / "summary.json").exists() else "running" if found else "not started"
    line = f"{name}: {state}, newest checkpoint {found[-1][0] if found else '-'}"
    if evals:
        line += f", eval at step {evals[-1]['step']}: {100 * evals[-1]['accuracy']:.2f} %"
    print(line)
    for r in records:
        if r["kind"] == "length":
            print(f"  length {r['length']:>8}: {100 * r['accuracy']:6.2f} % ({r['sequences']} seqs)")
PY
}

run_piece() {  # run_piece PIECE MINUTES
    case $1 in
        sc) segment selective-copying sc-paper "$SC_TARGET" "$2" ;;
        ih) segment induction-heads ih-paper "$IH_TARGET" "$2" ;;
        ih-eval)
            for precision in bf16 fp32; do
                "$PYTHON" -m mamba_compiled eval "$RUNS/ih-paper" --device cuda --lengths '2^6..2^20' \
                    --sequences 256 --token-budget $((1 << 20)) --precision "$precision" \
                    --json "$RUNS/ih-paper/lengths-$precision.json"
            done
            pack ih-paper ;;
        ih-seeds)
            local start=$SECONDS seed
            for seed in ${IH_SEEDS:-2 3 4 5}; do
                if ((SECONDS - start + 150 > ${IH_SEEDS_S:-420})); then
                    echo "ih-seeds: no time left for seed $seed"
                    break
                fi
                # shellcheck disable=SC2086  # TRAIN_ARGS is a list of options
                TRAIN_ARGS="--seed $seed --eval-every 65536 --ckpt-every 65536 ${TRAIN_ARGS:-}" \
                    segment induction-heads "ih-paper-seed$seed" "$IH_TARGET" "$2"
            done ;;
        status) status ;;
        *) echo "unknown piece $1 (sc, ih, ih-eval, ih-seeds, status)" >&2; return 2 ;;
    esac
}

training=()
for p in "${pieces[@]}"; do
    if [[ $p == sc || $p == ih ]]; then training+=("$p"); fi
done
n_gpus=$("$PYTHON" -c "import torch; print(torch.cuda.device_count())")
if [[ ${#training[@]} -eq 2 && $n_gpus -ge 2 ]]; then  # one GPU each, at the same time
    CUDA_VISIBLE_DEVICES=0 run_piece "${training[0]}" "${SEGMENT_MIN:-8}" &
    CUDA_VISIBLE_DEVICES=1 run_piece "${training[1]}" "${SEGMENT_MIN:-8}" &
    rc=0
    wait %1 || rc=$?
    wait %2 || rc=$?
    for p in "${pieces[@]}"; do
        if [[ $p != sc && $p != ih ]]; then run_piece "$p" 0 || rc=$?; fi
    done
    exit $rc
fi
minutes=${SEGMENT_MIN:-$((${#training[@]} > 1 ? 4 : 8))}
rc=0
for p in "${pieces[@]}"; do run_piece "$p" "$minutes" || rc=$?; done  # a failure stops no other
exit $rc
