"""Generation benchmark: wall time of prefill + greedy decoding, as mamba_ssm's benchmark times it.

    # H200 (ANCHORS.md): fp16, prompt 100 + 200 new tokens, 130M and 1.4B at batch 1 and 64
    python perf/bench_generate.py --model 130m --batch 1 64
    python perf/bench_generate.py --model 1.4b --batch 1 64
    # CPU target: 130M, 32-token prompt + 64 new, <= 2 s
    python perf/bench_generate.py --model 130m --prompt-len 32 --new-tokens 64 --device cpu

Random weights unless --checkpoint DIR (the work per token is the same). Reports, per batch size:
wall time of one generate call (prefill included; median of --repeats), prefill time, ms per
decoded token, tokens/s, the weight bandwidth the decode achieves (parameter bytes read per step /
step time), peak memory, and compile time (first call minus a warm one). Before timing it checks
that the compiled generator produces the eager generator's tokens.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
import torch._inductor.config

from mamba_compiled.generation import MambaGenerator
from mamba_compiled.models import MambaConfig, MambaLMHeadModel, mamba

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(device, fn):
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - start, out


def build(args, device, dtype) -> MambaLMHeadModel:
    if args.checkpoint:
        return MambaLMHeadModel.from_pretrained(args.checkpoint, device=device, dtype=dtype).eval()
    torch.manual_seed(0)
    return MambaLMHeadModel(
        MambaConfig.from_name(
            args.model, **({} if args.n_layer is None else {"n_layer": args.n_layer})
        ),
        device=device,
        dtype=dtype,
    ).eval()


def check_against_eager(model, gen: MambaGenerator, seq: torch.Tensor, start: int) -> float:
    """Teacher-force `seq` through the compiled generator and an eager one; the largest logit
    difference relative to the logits' scale. (Comparing greedy tokens would fail on near-ties,
    which random weights are full of.)"""
    eager = MambaGenerator(model, seq.shape[0], compile=False)
    pairs = [(gen.prefill(seq[:, :start]).float(), eager.prefill(seq[:, :start]).float())]
    for t in range(start, seq.shape[1]):
        pairs.append((gen.step(seq[:, t]).float().clone(), eager.step(seq[:, t]).float()))
    got, ref = (torch.stack(x) for x in zip(*pairs, strict=True))
    return float((got - ref).abs().max() / ref.abs().max().clamp_min(1e-6))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default="130m", help="130m, 370m, 790m, 1.4b, 2.8b (random weights)")
    p.add_argument("--checkpoint", type=Path, default=None, help="a checkpoint directory instead")
    p.add_argument("--n-layer", type=int, default=None, help="override the depth (smoke runs)")
    p.add_argument("--batch", type=int, nargs="+", default=[1])
    p.add_argument("--prompt-len", type=int, default=100)
    p.add_argument("--new-tokens", type=int, default=200)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--dtype",
        choices=sorted(DTYPES),
        default=None,
        help="default: float16 on CUDA, float32 on CPU",
    )
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument(
        "--check-tokens",
        type=int,
        default=16,
        help="compiled vs eager logits over this many tokens",
    )
    p.add_argument(
        "--decode-mode",
        default=None,
        help="torch.compile mode of the decode step (default on CUDA: CUDA graphs and "
        "coordinate-descent tuning), e.g. reduce-overhead or max-autotune",
    )
    p.add_argument(
        "--pdl",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="the decode step's kernels with programmatic dependent launch (default: on sm_90+)",
    )
    p.add_argument(
        "--dot",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="batches 9-64 run in_proj and out_proj as decode_linear's tl.dot kernel on CUDA "
        "(--no-dot: cuBLAS and the compiler's norms; x_proj and dt_proj stay tl.dot products "
        "inside the decode ops)",
    )
    p.add_argument("--out", type=Path, default=None, help="also write DIR/bench_generate.md")
    args = p.parse_args(argv)
    if not args.dot:
        mamba.DOT_MAX_BATCH = mamba.GEMV_MAX_BATCH

    device = torch.device(args.device)
    dtype = (
        DTYPES[args.dtype]
        if args.dtype
        else (torch.float16 if device.type == "cuda" else torch.float32)
    )
    model = build(args, device, dtype)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    name = (
        torch.cuda.get_device_name()
        if device.type == "cuda"
        else f"CPU, {torch.get_num_threads()} threads"
    )
    rows = []
    for batch in args.batch:
        ids = torch.randint(0, model.config.vocab_size, (batch, args.prompt_len), device=device)
        gen = MambaGenerator(
            model,
            batch,
            compile=args.compile,
            decode_mode=args.decode_mode if args.compile else None,
            pdl=args.pdl,
        )
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()

        def run(n=args.new_tokens, g=gen, ids=ids):
            return g.generate(ids, max_new_tokens=n, temperature=0.0)

        first_s, out = timed(device, run)
        err = float("nan")
        if args.compile and args.check_tokens:
            err = check_against_eager(
                model, gen, out[:, : args.prompt_len + args.check_tokens], args.prompt_len
            )
            tol = 1e-4 if dtype == torch.float32 else 2e-2
            if not err <= tol:
                print(
                    f"FAILED: compiled logits differ from eager by {err:.2e} (> {tol})",
                    file=sys.stderr,
                )
                return 1
        walls = [timed(device, run)[0] for _ in range(args.repeats)]
        prefills = [
            timed(device, lambda g=gen, i=ids: g.prefill(i))[0] for _ in range(args.repeats)
        ]
        wall, pre = statistics.median(walls), statistics.median(prefills)
        per_token = (wall - pre) / max(args.new_tokens - 1, 1)
        mem = (
            torch.cuda.max_memory_allocated() / 1e9
            if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
        )
        rows.append(
            (
                batch,
                f"{1e3 * wall:.1f}",
                f"{1e3 * pre:.1f}",
                f"{1e3 * per_token:.3f}",
                f"{batch * args.new_tokens / wall:.0f}",
                f"{weight_bytes / per_token / 1e9:.0f}",
                f"{mem:.2f}",
                f"{max(first_s - wall, 0.0):.1f}",
                f"{err:.1e}",
            )
        )

    header = (
        f"{args.checkpoint or args.model} ({weight_bytes / 1e9:.2f} GB of weights), "
        f"{str(dtype)[6:]}, "
        f"prompt {args.prompt_len} + {args.new_tokens} new, greedy, "
        f"{'compiled' if args.compile else 'eager'}"
        f"{f' (decode mode {args.decode_mode})' if args.decode_mode else ''}"
        f"{', programmatic dependent launch' if gen.pdl else ''}"
        f"{'' if args.dot else ', in_proj and out_proj on cuBLAS'}; "
        f"{name}; torch {torch.__version__}"
    )
    table = (
        f"{header}\n\n| batch | wall ms (all in) | prefill ms | ms / decoded token | tokens/s "
        "| weight GB/s | peak mem GB | compile s | logits vs eager |\n"
        "|---|---|---|---|---|---|---|---|---|\n"
        + "\n".join("| " + " | ".join(map(str, r)) + " |" for r in rows)
    )
    print(table)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        with open(args.out / "bench_generate.md", "a") as f:
            f.write(f"\n## {time.strftime('%Y-%m-%d %H:%M')} `{' '.join(sys.argv)}`\n\n{table}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
