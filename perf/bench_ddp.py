"""Data-parallel training throughput: tokens/s of the trainer's step on 1 GPU against N GPUs.

    python perf/bench_ddp.py                       # 130M, 8 x 2048 per GPU: 1, 2 and all GPUs
    python perf/bench_ddp.py --gpus 1 2 4 --fsdp   # FSDP2 instead of DDP
    python perf/bench_ddp.py --device cpu --model-size 130m --n-layer 2 --batch 1 --seqlen 64 \
        --gpus 1 2 --steps 2                       # a smoke run on CPU (gloo)

Each configuration runs under torchrun (this script relaunches itself) with the trainer's own
pieces: the compiled objective (model + cross-entropy, fullgraph), DDP or FSDP2 wrapping, AdamW
(fused on CUDA), bf16 autocast, gradient clipping. Every process trains on its own random tokens,
batch x seqlen per process (weak scaling: the global batch grows with the processes). Reports
the median step time, tokens/s over all processes, the speed-up against the first configuration
and its efficiency (speed-up / processes), peak memory per process; markdown on stdout and, with
--out DIR, in DIR/bench_ddp.md and DIR/bench_ddp.json. Target (issue 6): 2 GPUs >= 1.9x one.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def worker(args: argparse.Namespace) -> None:
    """One process of one configuration (launched by torchrun)."""
    from mamba_compiled import distributed
    from mamba_compiled.evaluation import autocast
    from mamba_compiled.models import MambaConfig, MambaLMHeadModel
    from mamba_compiled.training import Objective, TrainConfig, build_optimizer

    env = distributed.init(args.device)
    torch.manual_seed(0)
    overrides = {} if args.n_layer is None else {"n_layer": args.n_layer}
    config = MambaConfig.from_name(args.model_size, **overrides)
    model = MambaLMHeadModel(config, device=env.device)
    objective = Objective(model)
    module = distributed.wrap(
        objective, env, fsdp=args.fsdp, compile=not args.no_compile, bucket_cap_mb=args.bucket_mb
    )
    optimizer = build_optimizer(module, TrainConfig(lr=1e-4), env.device)
    gen = torch.Generator(device=env.device).manual_seed(1000 + env.rank)
    shape = (args.batch, args.seqlen + 1)

    def step() -> torch.Tensor:
        tokens = torch.randint(0, config.vocab_size, shape, device=env.device, generator=gen)
        with autocast(env.device):
            loss_sum, _ = module(tokens[:, :-1], tokens[:, 1:])
        (loss_sum / tokens[:, 1:].numel()).backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss_sum

    def sync() -> None:
        if env.device.type == "cuda":
            torch.cuda.synchronize()
        distributed.barrier(env)

    t = time.perf_counter()
    step()
    sync()
    compile_s = time.perf_counter() - t
    for _ in range(args.warmup):
        step()
    sync()
    if env.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.steps):
        t = time.perf_counter()
        loss = step()
        sync()
        times.append(time.perf_counter() - t)
    # The slowest process sets the pace: take every step's maximum over processes.
    per_step = torch.tensor(times, device=env.device)
    if env.world_size > 1:
        torch.distributed.all_reduce(per_step, op=torch.distributed.ReduceOp.MAX)
    if env.is_main:
        median = statistics.median(per_step.tolist())
        result = {
            "processes": env.world_size,
            "mode": "FSDP2"
            if args.fsdp
            else (
                ("DDP" + (", one bucket (the default)" if args.bucket_mb is None
                          else f", buckets {args.bucket_mb:g} MB"))
                if env.world_size > 1
                else "single"
            ),
            "model": args.model_size + (f" ({args.n_layer} layers)" if args.n_layer else ""),
            "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
            "batch_per_process": args.batch,
            "seqlen": args.seqlen,
            "compile_s": compile_s,
            "step_ms": 1000 * median,
            "tokens_per_s": env.world_size * args.batch * args.seqlen / median,
            "peak_memory_gb": torch.cuda.max_memory_allocated() / 1e9
            if env.device.type == "cuda"
            else None,
            "loss": float(loss.detach()) / (args.batch * args.seqlen),
            "device": torch.cuda.get_device_name() if env.device.type == "cuda" else "cpu",
            "torch": torch.__version__,
        }
        Path(args.result).write_text(json.dumps(result))
    distributed.shutdown(env)


def table(results: list[dict]) -> str:
    base = results[0]["tokens_per_s"]
    lines = [
        "| processes | mode | model | batch/process x seqlen | step (ms) | tokens/s | speed-up "
        "| efficiency | peak mem/process (GB) | compile (s) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        speedup = r["tokens_per_s"] / base
        mem = "n/a" if r["peak_memory_gb"] is None else f"{r['peak_memory_gb']:.1f}"
        lines.append(
            f"| {r['processes']} | {r['mode']} | {r['model']}, {r['params_m']:.0f}M "
            f"| {r['batch_per_process']} x {r['seqlen']} | {r['step_ms']:.1f} "
            f"| {r['tokens_per_s']:,.0f} | {speedup:.2f}x "
            f"| {100 * speedup / r['processes']:.0f} % | {mem} | {r['compile_s']:.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--gpus",
        type=int,
        nargs="+",
        default=None,
        help="process counts to run (default: 1, 2 and every visible GPU)",
    )
    p.add_argument("--model-size", default="130m")
    p.add_argument("--n-layer", type=int, default=None, help="override the depth (smoke runs)")
    p.add_argument("--batch", type=int, default=8, help="sequences per process and step")
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--fsdp", action="store_true", help="FSDP2 instead of DDP")
    p.add_argument(
        "--bucket-mb",
        type=float,
        nargs="+",
        default=None,
        help="DDP gradient bucket sizes to compare (MiB; default: distributed.wrap's, one bucket "
        "when compiled); each multi-GPU "
        "count runs once per size",
    )
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--warmup", type=int, default=3, help="steps after the compiling one")
    p.add_argument("--steps", type=int, default=20, help="timed steps")
    p.add_argument("--out", type=Path, default=None, help="also write DIR/bench_ddp.{md,json}")
    p.add_argument(
        "--timeout", type=float, default=540, help="seconds per configuration before it is killed"
    )
    p.add_argument("--result", help=argparse.SUPPRESS)  # set on the workers
    args = p.parse_args(argv)

    if args.result is not None:
        args.bucket_mb = None if args.bucket_mb is None else args.bucket_mb[0]
        worker(args)
        return 0
    available = torch.cuda.device_count() if args.device == "cuda" else 2
    if args.device == "cuda" and available == 0:
        p.error("no CUDA device is visible; pass --device cpu for a smoke run")
    if args.gpus is None:
        args.gpus = sorted({1, min(2, available), available})
    if max(args.gpus) > available:
        p.error(f"--gpus {max(args.gpus)} but {available} CUDA device(s) are visible")
    results = []
    forwarded = list(argv if argv is not None else sys.argv[1:])
    runs = [
        (n, mb)
        for n in args.gpus
        for mb in ([None] if n == 1 or args.bucket_mb is None else args.bucket_mb)
    ]
    with tempfile.TemporaryDirectory() as tmp:
        for n, mb in runs:
            result = Path(tmp) / f"{n}-{mb}.json"
            bucket = [] if mb is None else ["--bucket-mb", str(mb)]  # the last one given wins
            cmd = [
                sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc-per-node", str(n), __file__, *forwarded, *bucket, "--result", str(result),
            ]  # fmt: skip
            env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
            print(f"running {n} process(es): {' '.join(cmd[3:])}", file=sys.stderr, flush=True)
            subprocess.run(cmd, check=True, env=env, timeout=args.timeout)
            results.append(json.loads(result.read_text()))
            print(table(results), file=sys.stderr, flush=True)
    text = (
        f"# Data-parallel training throughput ({results[0]['device']}, torch {results[0]['torch']})"
        f"\n\n`python perf/bench_ddp.py {' '.join(forwarded)}`\n\n{table(results)}\n"
    )
    print(text)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "bench_ddp.md").write_text(text)
        (args.out / "bench_ddp.json").write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
