"""A linear layer for decoding's few rows (x (batch, K), batch <= 8), with the block's RMSNorm
before it and its residual add after it: one Triton kernel.

    h   = rms_norm(x) · norm_weight    (NORM: x cast to norm_weight's dtype, normalized in fp32,
                                        rounded back, as the model's RMSNorm)
    out = h @ weight.T + bias           (fp32 accumulation, rounded to weight's dtype)
    out = residual + out                (RESIDUAL: in residual's dtype, as `x + mixer(x)`)

At batch 1 a linear layer reads its weight once and does nothing else, so its time is the
weight's bytes over the memory bandwidth plus the latency of the first loads. One program holds
BN whole rows of the weight (about 16 KB) for one row of x and issues every load before any
arithmetic; BN shrinks until there are at least two programs per SM. Each program normalizes x
itself (K values from L2), so the norm costs no kernel of its own. Made for batch 1: each row
of x reads the weight again (from L2 when it fits); with several weight-sharing rows per
program, as first written, the H200 took 10x batch 1's time at batch 8 (cuBLAS: 1x).

The configuration is fixed by a heuristic (autotuning a decode step's kernels adds nothing a
heuristic misses here: the bound is bandwidth).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .common import launcher, pdl, wait_for_previous_kernel

# weight elements per program, the fewest programs (two per SM of an H200), and the most programs
# that take 8 warps (more take 4): the best of perf/bench_scan.py's sweep on the H200 at the
# 130M and 1.4B models' in_proj, out_proj and LM head
TILE_ELEMENTS = 8192
MIN_PROGRAMS = 264
MAX_PROGRAMS_8_WARPS = 1023


@triton.jit
def _decode_linear_kernel(
    x_ptr, w_ptr, bias_ptr, nw_ptr, res_ptr, out_ptr,
    N, K, eps,
    s_xb, s_wn, s_rb, s_ob,
    HAS_BIAS: tl.constexpr, NORM: tl.constexpr, RESIDUAL: tl.constexpr,
    BN: tl.constexpr, KP: tl.constexpr, GDC: tl.constexpr,
):  # fmt: skip
    pid_n = tl.program_id(0)
    row = tl.program_id(1).to(tl.int64)
    n = pid_n * BN + tl.arange(0, BN)
    nmask = n < N
    k = tl.arange(0, KP)
    kmask = k < K
    # every load first: the weight tile, then x's row (and the residual's)
    w = tl.load(
        w_ptr + n[:, None].to(tl.int64) * s_wn + k[None, :],
        mask=nmask[:, None] & kmask[None, :],
        other=0.0,
    )
    if HAS_BIAS:
        bias = tl.load(bias_ptr + n, mask=nmask, other=0.0).to(tl.float32)
    if NORM:
        nw = tl.load(nw_ptr + k, mask=kmask, other=0.0)
    wait_for_previous_kernel(GDC)
    x = tl.load(x_ptr + row * s_xb + k, mask=kmask, other=0.0)
    if RESIDUAL:
        res = tl.load(res_ptr + row * s_rb + n, mask=nmask, other=0.0)
    if NORM:
        # the model's RMSNorm: x in the norm's dtype, normalized in fp32, rounded back
        xf = x.to(nw_ptr.dtype.element_ty).to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, 0) / K + eps)
        h = (xf * rstd * nw.to(tl.float32)).to(nw_ptr.dtype.element_ty)
    else:
        h = x
    out = tl.sum(w.to(tl.float32) * h.to(tl.float32)[None, :], 1)  # (BN,)
    if HAS_BIAS:
        out += bias
    out = out.to(w_ptr.dtype.element_ty)  # the linear layer's output dtype
    if RESIDUAL:
        out = res.to(tl.float32) + out.to(tl.float32)
    tl.store(out_ptr + row * s_ob + n, out.to(out_ptr.dtype.element_ty), mask=nmask)


def decode_linear_config(
    batch: int, N: int, K: int, tile: int = TILE_ELEMENTS, num_warps: int | None = None
) -> tuple[int, int, int]:
    """(BN, KP, num_warps) for x (batch, K) and a (N, K) weight; `tile` weight elements per
    program at most (perf/bench_scan.py sweeps it and num_warps)."""
    KP = triton.next_power_of_2(K)
    BN = max(1, min(64, tile // KP))
    while BN > 1 and triton.cdiv(N, BN) * batch < MIN_PROGRAMS:
        BN //= 2
    if num_warps is None:
        num_warps = 8 if triton.cdiv(N, BN) * batch <= MAX_PROGRAMS_8_WARPS else 4
    return BN, KP, num_warps


def decode_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    norm_weight: Tensor | None,
    eps: float,
    residual: Tensor | None,
    config: tuple[int, int, int] | None = None,
    pdl_launch: bool = False,
) -> Tensor:
    """On CUDA (or under TRITON_INTERPRET=1): x (batch, K) with unit stride along K; weight
    (N, K) with unit stride along K; bias (N,); norm_weight (K,); residual (batch, N) with unit
    stride along N. Returns (batch, N) in residual's dtype with residual, else weight's.
    `config`: (BN, KP, num_warps) instead of `decode_linear_config`'s (benchmarks);
    `pdl_launch`: launched with programmatic dependent launch (`common.pdl`)."""
    batch, K = x.shape
    N = weight.shape[0]
    BN, KP, num_warps = config or decode_linear_config(batch, N, K)
    out_dtype = residual.dtype if residual is not None else weight.dtype
    out = torch.empty((batch, N), dtype=out_dtype, device=x.device)
    res = residual if residual is not None else out  # placeholders are never read
    grid = (triton.cdiv(N, BN), batch)
    launcher(_decode_linear_kernel, x)[grid](
        x, weight, bias if bias is not None else weight,
        norm_weight if norm_weight is not None else weight, res, out,
        N, K, float(eps),
        x.stride(0), weight.stride(0), res.stride(0), out.stride(0),
        HAS_BIAS=bias is not None, NORM=norm_weight is not None, RESIDUAL=residual is not None,
        BN=BN, KP=KP, num_warps=num_warps, **pdl(x, pdl_launch),
    )  # fmt: skip
    return out
