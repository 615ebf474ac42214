#!/usr/bin/env bash
# The paper's synthetic tasks and the data-parallel throughput, on the GPU machine, in pieces
# that each fit a 10-minute job. Run from the repository root, with the package installed.
#
#   perf/run_paper_tasks.sh sc      # Selective Copying, `paper` preset: one training segment of
#                                   # at most SEGMENT_MIN minutes, resumed from the newest
#                                   # checkpoint; rerun until it prints "done"
#   perf/run_paper_tasks.sh ih      # Induction Heads, `paper` preset: one training segment;
#                                   # when training is done, the accuracy at 2^6 .. 2^20
#   perf/run_paper_tasks.sh ih-eval # Induction Heads: the length sweep alone, on the newest
#                                   # checkpoint (batch 1 at 2^20, chunked prefill beyond the budget)
#   perf/run_paper_tasks.sh ddp     # 130M training tokens/s, 1 GPU against 2 GPUs (DDP)
#   perf/run_paper_tasks.sh status  # where the runs stand
#
# Run directories: $RUNS/sc-paper and $RUNS/ih-paper (RUNS=runs). When $OUT is set (the device
# tool's output folder), each piece copies its run directory (checkpoints, metrics.jsonl,
# curves.png, summary.json) there, to carry into the next job on a fresh machine.
#
# Knobs: SEGMENT_MIN (default 8: training stops with a checkpoint after 8 minutes; compile,
# evaluation and saving fit in the rest of a 10-minute job), SC_TARGET (default 0.99: Selective
# Copying finishes early once an evaluation on 1024 sequences reaches it; 0 runs all 400K steps),
# IH_TARGET (default 0: Induction Heads runs the paper's 25 x 8192 steps), PYTHON, and
# TRAIN_ARGS (appended to the train command, e.g. for a CPU smoke run:
# TRAIN_ARGS="--device cpu --steps 6 --seq-len 64 --eval-every 3 --ckpt-every 3").
set -euo pipefail

PYTHON=${PYTHON:-python}
RUNS=${RUNS:-runs}
SEGMENT_MIN=${SEGMENT_MIN:-8}
SC_TARGET=${SC_TARGET:-0.99}
IH_TARGET=${IH_TARGET:-0}
MC=("$PYTHON" -m mamba_compiled)

save() {  # copy a run directory to $OUT, if set
    if [[ -n "${OUT:-}" && -d "$1" ]]; then
        mkdir -p "$OUT/$(dirname "$1")"
        cp -r "$1" "$OUT/$(dirname "$1")/"
    fi
}

segment() {  # task run-dir target: one training segment, resumed when a checkpoint exists
    local task=$1 dir=$2 target=$3 resume=()
    if [[ -f "$dir/summary.json" ]]; then
        echo "$task: done already ($dir/summary.json)"
        return 0
    fi
    if compgen -G "$dir/checkpoints/step_*" > /dev/null; then
        resume=(--resume)
    fi
    "${MC[@]}" train --task "$task" --preset paper --out "$dir" --device cuda \
        --time-limit "$SEGMENT_MIN" --target-accuracy "$target" --no-progress "${resume[@]}" \
        ${TRAIN_ARGS:-}
    save "$dir"
    if [[ -f "$dir/summary.json" ]]; then
        echo "$task: done; $dir/summary.json, $dir/curves.png"
    else
        echo "$task: segment over; run this piece again to continue"
    fi
}

status() {
    "$PYTHON" - "$RUNS" <<'PY'
import json, sys
from pathlib import Path
from mamba_compiled import checkpointing, metrics
for name in ("sc-paper", "ih-paper"):
    run = Path(sys.argv[1]) / name
    found = checkpointing.list_checkpoints(run / "checkpoints")
    evals = [r for r in metrics.read(run / "metrics.jsonl") if r["kind"] == "eval"]
    last = f", last eval at step {evals[-1]['step']}: {100 * evals[-1]['accuracy']:.2f} %" if evals else ""
    state = "done" if (run / "summary.json").exists() else "in progress" if found else "not started"
    print(f"{name}: {state}, newest checkpoint {found[-1][0] if found else '-'}{last}")
    for r in metrics.read(run / "metrics.jsonl"):
        if r["kind"] == "length":
            print(f"  length {r['length']:>8}: {100 * r['accuracy']:.2f} % ({r['sequences']} sequences)")
PY
}

case "${1:-}" in
    sc) segment selective-copying "$RUNS/sc-paper" "$SC_TARGET" ;;
    ih) segment induction-heads "$RUNS/ih-paper" "$IH_TARGET" ;;
    ih-eval)
        "${MC[@]}" eval "$RUNS/ih-paper" --device cuda --lengths '2^6..2^20' --sequences 256 \
            --token-budget $((1 << 20)) --json "$RUNS/ih-paper/lengths.json"
        save "$RUNS/ih-paper"
        ;;
    ddp)
        mkdir -p "$RUNS/bench"
        "$PYTHON" perf/bench_ddp.py --gpus 1 2 --out "$RUNS/bench"
        save "$RUNS/bench"
        ;;
    status) status ;;
    *)
        sed -n '2,/^set -euo/p' "$0" | sed '$d'

        exit 2
        ;;
esac
