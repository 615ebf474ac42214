"""Training-step and forward benchmark of the compiled Mamba LM (random weights, synthetic tokens).

    # H200 (ANCHORS.md): 130M and 1.4B, batch 8 x 2048, bf16 autocast, fused AdamW
    python perf/bench_train.py --model 130m --batch 8 --seqlen 2048
    python perf/bench_train.py --model 1.4b --batch 8 --seqlen 2048
    # CPU targets: 130M train step 2 x 256 (<= 10 s), forward 1 x 512 (<= 1.5 s)
    python perf/bench_train.py --model 130m --batch 2 --seqlen 256 --device cpu
    python perf/bench_train.py --model 130m --batch 1 --seqlen 512 --device cpu --mode forward

Reports compile time, step time (median), tokens/s, MFU (6·params FLOPs per trained token against
--peak-tflops, default 989 on CUDA: H100/H200 dense bf16) and peak memory, as a markdown table on
stdout and, with --out DIR, in DIR/bench_train.md. Before timing it checks that the compiled
step's loss is finite and equal to eager's.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from mamba_compiled.models import MambaConfig, MambaLMHeadModel, set_recompute


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KiB on Linux -> GB


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default="130m", help="130m, 370m, 790m, 1.4b, 2.8b")
    p.add_argument("--n-layer", type=int, default=None, help="override the depth (smoke runs)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--mode", choices=["train", "forward"], default="train")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--amp",
        choices=["bf16", "none"],
        default=None,
        help="autocast dtype (default: bf16 on CUDA, none on CPU)",
    )
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument(
        "--recompute",
        action="store_true",
        help="recompute the conv, x_proj and dt_proj in the backward (models.set_recompute)",
    )
    p.add_argument(
        "--ck",
        type=int,
        default=None,
        help="the scan's checkpoint interval (default 8; 16 halves the checkpoints' memory, "
        "the backward recomputing every other chunk's start state)",
    )
    p.add_argument(
        "--conv-kernels",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the conv and its SiLU as Triton kernels on CUDA (the default; "
        "--no-conv-kernels: plain PyTorch, ops.set_conv_kernels(False))",
    )
    p.add_argument(
        "--conv-tiles",
        type=Path,
        default=None,
        help="JSON of the conv kernels' tiles ({kernel: ConvTiles fields}, "
        "perf/bench_conv.py's best.json) instead of the defaults",
    )
    p.add_argument("--warmup", type=int, default=2, help="steps after the compiling one")
    p.add_argument("--steps", type=int, default=5, help="timed steps")
    p.add_argument("--peak-tflops", type=float, default=None, help="for MFU (default 989 on CUDA)")
    p.add_argument("--out", type=Path, default=None, help="also write DIR/bench_train.md")
    args = p.parse_args(argv)

    device = torch.device(args.device)
    if args.ck is not None or args.conv_tiles is not None:
        from mamba_compiled.lowering import common, conv

        tiles = json.loads(args.conv_tiles.read_text()) if args.conv_tiles else {}
        common.set_override(
            ck=args.ck, conv={k: conv.ConvTiles(**v) for k, v in tiles.items()} or None
        )
    if not args.conv_kernels:
        from mamba_compiled.ops import set_conv_kernels

        set_conv_kernels(False)
    tags = [f"ck{args.ck}"] * (args.ck is not None) + ["plain-conv"] * (not args.conv_kernels)
    if args.conv_tiles is not None:
        tags.append("conv-tiles-" + args.conv_tiles.read_text())
    if tags:
        # Both change what ops decompose into inside a compiled graph, but the compile caches
        # key on the graph of op calls: without a tag, a process compiling after a run with
        # the defaults gets that run's graph back (the tenth session's `--ck 16` run at 130M
        # did: 13 s first step, the same 14.05 GB).
        torch.compiler.config.cache_key_tag = "mamba_compiled-" + "-".join(tags)
    amp = args.amp or ("bf16" if device.type == "cuda" else "none")
    peak = args.peak_tflops or (989.0 if device.type == "cuda" else None)
    torch.manual_seed(0)
    config = MambaConfig.from_name(
        args.model, **({} if args.n_layer is None else {"n_layer": args.n_layer})
    )
    model = set_recompute(MambaLMHeadModel(config, device=device), args.recompute)
    n_params = sum(p.numel() for p in model.parameters())
    train = args.mode == "train"
    model.train(train)
    opt = (
        torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
        if train
        else None
    )
    ids = torch.randint(0, config.vocab_size, (args.batch, args.seqlen + 1), device=device)
    inputs, targets = ids[:, :-1], ids[:, 1:]

    def loss_fn(inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        # Model and loss in one graph: the float32 log-softmax over the vocabulary fuses with
        # the LM head's output instead of materializing (batch·seqlen, vocab) copies.
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp == "bf16"):
            logits = model(inputs).logits
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())

    compiled_loss = torch.compile(loss_fn, fullgraph=True) if args.compile else loss_fn

    def loss_of(f) -> torch.Tensor:
        return f(inputs, targets)

    def step() -> torch.Tensor:
        if not train:
            with torch.no_grad():
                return loss_of(compiled_loss)
        loss = loss_of(compiled_loss)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    # Correctness first: the compiled loss equals eager's on the same weights, and is finite.
    with torch.no_grad():
        eager_loss = loss_of(loss_fn)
    start = time.perf_counter()
    first = step()
    sync(device)
    first_s = time.perf_counter() - start
    tol = 2e-2 if amp == "bf16" else 1e-4
    if not torch.isfinite(first) or abs(float(first) - float(eager_loss)) > tol * max(
        1.0, abs(float(eager_loss))
    ):
        print(
            f"FAILED: compiled loss {float(first):.5f} vs eager {float(eager_loss):.5f}",
            file=sys.stderr,
        )
        return 1
    for _ in range(args.warmup):
        step()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        loss = step()
        sync(device)
        times.append(time.perf_counter() - start)
    # The same steps back to back, one sync at the end (a loop that never waits for the GPU,
    # as one that logs the loss only every few steps): without the start of each step, when
    # the GPU waits for the host to launch the first kernels.
    start = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    sync(device)
    unsynced = (time.perf_counter() - start) / args.steps
    if not torch.isfinite(loss):
        print("FAILED: non-finite loss during timing", file=sys.stderr)
        return 1
    t = statistics.median(times)
    tokens = args.batch * args.seqlen
    flops = (6 if train else 2) * n_params * tokens
    mfu = f"{100 * flops / t / (peak * 1e12):.1f} %" if peak else "n/a"
    what = "train step (fwd+bwd+AdamW)" if train else "forward"
    name = (
        torch.cuda.get_device_name()
        if device.type == "cuda"
        else f"CPU, {torch.get_num_threads()} threads"
    )
    rows = [
        (
            "work",
            f"{args.model} ({n_params / 1e6:.0f}M params) {what}, "
            f"batch {args.batch} x {args.seqlen}, {'bf16 autocast' if amp == 'bf16' else 'fp32'}, "
            f"{'compiled' if args.compile else 'eager'}"
            f"{', conv and projections recomputed' if args.recompute else ''}"
            f"{f', checkpoints every {args.ck} steps' if args.ck else ''}"
            f"{', the conv as Triton kernels' if args.conv_kernels and device.type == 'cuda' else ''}",  # noqa: E501
        ),
        ("device", f"{name}; torch {torch.__version__}"),
        (f"step time (median of {args.steps})", f"{1e3 * t:.1f} ms"),
        ("tokens/s", f"{tokens / t / 1e3:.1f} K"),
        (
            f"{args.steps} steps back to back, one sync: time per step, tokens/s",
            f"{1e3 * unsynced:.1f} ms, {tokens / unsynced / 1e3:.1f} K",
        ),
        ("MFU (6·N·tokens)" if train else "MFU (2·N·tokens)", mfu),
        (
            "peak memory",
            f"{peak_memory_gb(device):.2f} GB"
            + ("" if device.type == "cuda" else " (process RSS)"),
        ),
        ("first step (compile + run)", f"{first_s:.1f} s"),
        ("loss (compiled / eager, first batch)", f"{float(first):.4f} / {float(eager_loss):.4f}"),
    ]
    table = "| metric | value |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)
    print(table)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        with open(args.out / "bench_train.md", "a") as f:
            f.write(f"\n## {time.strftime('%Y-%m-%d %H:%M')} `{' '.join(sys.argv)}`\n\n{table}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
