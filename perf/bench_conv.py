"""Tiles of the conv + SiLU kernels (mamba_compiled/lowering/conv.py) at the models' training
shapes, on CUDA: every candidate checked against the plain PyTorch conv in fp32, then timed.

    python perf/bench_conv.py --out DIR      # DIR/bench_conv.md and DIR/best.json

The kernels take 40-90 µs at these shapes, less than the launchers' host time, so times are GPU
times from CUDA-graph replays (bench_scan.graph_ms), not do_bench's. Each kernel is swept with
the others at their defaults; best.json holds the fastest verified tiles of each (by the sum
over the shapes), for `perf/bench_train.py --conv-tiles best.json`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from bench_scan import Report, graph_ms  # noqa: E402

from mamba_compiled.lowering import common, conv  # noqa: E402
from mamba_compiled.ops.conv import _ConvSiLU  # noqa: E402

T = conv.ConvTiles
# (E, batch, L): the 130M and 1.4B models' conv at batch 8 x 2048
SHAPES = [(1536, 8, 2048), (4096, 8, 2048)]
ROW_TILES = [T(4, 256, 4), T(2, 512, 4), T(4, 512, 4), T(8, 256, 4), T(4, 1024, 8),
             T(8, 512, 8), T(1, 1024, 4), T(2, 1024, 8), T(16, 128, 4)]  # fmt: skip
G_TILES = [T(4, 256, 4, 8), T(4, 256, 4, 2), T(4, 256, 4, 1), T(8, 256, 4, 2), T(4, 256, 8, 2),
           T(4, 512, 4, 4), T(4, 512, 4, 1), T(8, 256, 4, 8), T(8, 256, 8, 2), T(2, 512, 4, 4),
           T(2, 1024, 4, 2), T(4, 1024, 8, 2), T(4, 1024, 8, 1), T(1, 2048, 8, 1),
           T(8, 512, 8, 1)]  # fmt: skip
CANDIDATES = {"fwd": ROW_TILES, "g": G_TILES, "dx": ROW_TILES}


def inputs(E, b, L):
    x = torch.randn(b, E, L, device="cuda").to(torch.bfloat16).permute(1, 0, 2)
    w = torch.randn(E, 4, device="cuda") * 0.5
    bias = torch.randn(E, device="cuda")
    du = torch.randn(E, b, L, device="cuda").to(torch.bfloat16)
    return x, w, bias, du


def reference(x, w, bias, du):
    """fp32 plain conv on the bf16-rounded inputs and weights (the kernels round w to x's dtype)."""
    xr = x.float().requires_grad_(True)
    wr = w.to(x.dtype).float().requires_grad_(True)
    br = bias.to(x.dtype).float().requires_grad_(True)
    u = _ConvSiLU.apply(xr, wr, br)
    u.backward(du.float())
    return u.detach(), xr.grad, wr.grad, br.grad


def errors(got, want) -> float:
    return max(((g.float() - r).abs().max() / r.abs().max()).item()
               for g, r in zip(got, want, strict=True))  # fmt: skip


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--out", type=pathlib.Path, default=None)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_conv needs CUDA", file=sys.stderr)
        return 1
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
    rep = Report(args.out / "bench_conv.md" if args.out else None)
    rep(f"# bench_conv: {torch.cuda.get_device_name()}, torch {torch.__version__}\n")
    data = [(s, inputs(*s)) for s in SHAPES]
    refs = [reference(*d) for _, d in data]
    names = [f"{E}x{b}x{L}" for E, b, L in SHAPES]
    rep("GPU µs (CUDA-graph replays); fwd: conv_silu_fwd; g and dx: conv_silu_bwd with the "
        "other backward kernel at its default. Worst error against fp32 over u, dx, dw, dbias.\n")
    rep("| kernel | BR | BL | warps | NT | " + " | ".join(names) + " | sum | error |")
    rep("|---|---|---|---|---|" + "---|" * len(names) + "---|---|")
    best = {}
    for kernel, cands in CANDIDATES.items():
        scores = []
        for c in cands:
            common.set_override(conv={kernel: c})
            try:
                err, times = 0.0, []
                for (_, (x, w, bias, du)), ref in zip(data, refs, strict=True):
                    u = conv.conv_silu_fwd(x, w, bias)
                    err = max(err, errors((u, *conv.conv_silu_bwd(du, x, w, bias)), ref))
                    if kernel == "fwd":
                        fn = lambda x=x, w=w, bias=bias: conv.conv_silu_fwd(x, w, bias)  # noqa: E731
                    else:
                        fn = lambda x=x, w=w, bias=bias, du=du: conv.conv_silu_bwd(du, x, w, bias)  # noqa: E731
                    times.append(graph_ms(fn, rep=25))
            except Exception as exc:  # a tile that does not compile (registers, shared memory)
                rep(f"| {kernel} | {c.BR} | {c.BL} | {c.num_warps} | {c.NT} | FAILED: "
                    f"{type(exc).__name__}: {str(exc)[:80]} |")  # fmt: skip
                continue
            finally:
                common.set_override()
            ok = err < 5e-2 and None not in times
            total = sum(times) if None not in times else float("inf")
            cells = " | ".join("n/a" if t is None else f"{1e3 * t:.1f}" for t in times)
            rep(f"| {kernel} | {c.BR} | {c.BL} | {c.num_warps} | {c.NT} | {cells} | "
                f"{1e3 * total:.1f} | {err:.1e}{'' if ok else ' ✗'} |")  # fmt: skip
            if ok:
                scores.append((total, c))
        if scores:
            best[kernel] = dataclasses.asdict(min(scores, key=lambda s: s[0])[1])
    rep(f"\nbest: `{json.dumps(best)}`")
    if args.out:
        (args.out / "best.json").write_text(json.dumps(best))
    return 0


if __name__ == "__main__":
    sys.exit(main())
