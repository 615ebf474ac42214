"""Where the time of one training step of a paper task goes (the tiny models are host-bound).

    python perf/profile_task_step.py --task induction-heads [--steps 50] [--out DIR]

Builds the task's `paper` preset Trainer, runs warm-up steps (compile), times `--steps` steps
with the device synchronized around them, then profiles a few steps under torch.profiler and
prints the operators by self CPU time and the kernels by GPU time (also written to DIR).
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

import torch

from mamba_compiled.training import Trainer, make_config


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--task", default="induction-heads")
    p.add_argument("--preset", default="paper")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--device", default="cuda")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    c = make_config(args.task, preset=args.preset)
    c = dataclasses.replace(c, device=args.device, out_dir=tempfile.mkdtemp(), progress=False)
    trainer = Trainer(c)
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    t0 = time.perf_counter()
    for s in range(3):
        trainer.train_step(s)
    sync()
    print(
        f"{args.task} ({args.preset}), batch {c.batch_size} x {c.seq_len}: "
        f"warm-up (compile) {time.perf_counter() - t0:.1f} s"
    )
    t0 = time.perf_counter()
    for s in range(3, 3 + args.steps):
        trainer.train_step(s)
    sync()
    ms = (time.perf_counter() - t0) / args.steps * 1e3
    print(f"{ms:.2f} ms per step over {args.steps} steps")
    acts = [torch.profiler.ProfilerActivity.CPU]
    if args.device == "cuda":
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=acts) as prof:
        for s in range(100, 105):
            trainer.train_step(s)
        sync()
    ka = prof.key_averages()
    tables = [
        "## operators by self CPU time (5 steps)\n",
        ka.table(sort_by="self_cpu_time_total", row_limit=30),
    ]
    if args.device == "cuda":
        by_gpu = ka.table(sort_by="self_device_time_total", row_limit=25)
        tables += ["\n## by GPU time (5 steps)\n", by_gpu]
    text = f"{ms:.2f} ms per step\n\n" + "\n".join(tables)
    print(text)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"profile_step_{args.task}.txt").write_text(text)
        prof.export_chrome_trace(str(args.out / f"trace_{args.task}.json"))


if __name__ == "__main__":
    main()
