"""A linear layer for decoding's rows (x (batch, K)), with the block's RMSNorm before it and its
residual add after it: one Triton kernel below DOT_MIN_ROWS rows; from there on up to three (the
norm, the product, a split-K epilogue).

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

From DOT_MIN_ROWS rows on, a second kernel multiplies tiles with `tl.dot` instead: one program
per (BN weight rows, BM rows of x), the weight streamed once along K in BK-wide chunks, the
residual add in the epilogue; when the tiles are too few to fill the SMs, SPLIT programs share K
and a second kernel sums their fp32 partial products and applies the epilogue. On an H200 at
batch 64 it equals cuBLAS on the models' large products and beats it on the skinny ones
(x_proj), and it launches with PDL and adds the residual in its epilogue: 130M's decode step
0.866 -> 0.693 ms per token with the state-update configuration of the same session
(perf/RESULTS.md, seventh session). The norm runs before it as its own small kernel
(`_rms_norm_rows_kernel`, one program per row of x, writing h in the norm's dtype): inside the
tl.dot kernel every program re-read x's whole fp32 rows (130M in_proj at batch 64: 18.9 µs with
the norm inside against 5.1 without, H200, perf/RESULTS.md seventh session).

The configuration is fixed by a heuristic (autotuning a decode step's kernels adds nothing a
heuristic misses here: the bound is bandwidth).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from .common import (
    cdiv,
    interpreting,
    launcher,
    next_power_of_2,
    pdl,
    wait_for_previous_kernel,
)

# weight elements per program, the fewest programs (two per SM of an H200), and the most programs
# that take 8 warps (more take 4): the best of perf/bench_scan.py's sweep on the H200 at the
# 130M and 1.4B models' in_proj, out_proj and LM head
TILE_ELEMENTS = 8192
MIN_PROGRAMS = 264
MAX_PROGRAMS_8_WARPS = 1023
# rows of x from which `decode_linear` multiplies with tl.dot (below, each row is a GEMV that
# reads the weight again, from L2 when it fits)
DOT_MIN_ROWS = 9


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
    KP = next_power_of_2(K)
    BN = max(1, min(64, tile // KP))
    while BN > 1 and cdiv(N, BN) * batch < MIN_PROGRAMS:
        BN //= 2
    if num_warps is None:
        num_warps = 8 if cdiv(N, BN) * batch <= MAX_PROGRAMS_8_WARPS else 4
    return BN, KP, num_warps


def decode_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    norm_weight: Tensor | None,
    eps: float,
    residual: Tensor | None,
    config: tuple[int, int, int] | DotConfig | None = None,
    pdl_launch: bool = False,
    out_fp32: bool = False,
) -> Tensor:
    """On CUDA (or under TRITON_INTERPRET=1): x (batch, K) with unit stride along K; weight
    (N, K) with unit stride along K; bias (N,); norm_weight (K,); residual (batch, N) with unit
    stride along N. Returns (batch, N) in residual's dtype with residual, else weight's.
    `config`: (BN, KP, num_warps) instead of `decode_linear_config`'s, or a `DotConfig`
    instead of `decode_dot_config`'s (benchmarks);
    `pdl_launch`: launched with programmatic dependent launch (`common.pdl`);
    `out_fp32` (no residual, from DOT_MIN_ROWS rows): the fp32 product, not rounded."""
    batch, K = x.shape
    N = weight.shape[0]
    out_dtype = residual.dtype if residual is not None else weight.dtype
    if out_fp32:
        if residual is not None or not (batch >= DOT_MIN_ROWS or isinstance(config, DotConfig)):
            raise ValueError(f"out_fp32 needs {DOT_MIN_ROWS}+ rows and no residual")
        out_dtype = torch.float32
    out = torch.empty((batch, N), dtype=out_dtype, device=x.device)
    if isinstance(config, DotConfig) or (config is None and batch >= DOT_MIN_ROWS):
        # the tl.dot kernel's x tiles are the norm's output when there is one
        h_bytes = (norm_weight if norm_weight is not None else x).element_size()
        config = config or decode_dot_config(batch, N, K, h_bytes, weight.element_size())
        return decode_dot(x, weight, bias, norm_weight, eps, residual, out, config, pdl_launch)
    BN, KP, num_warps = config or decode_linear_config(batch, N, K)
    res = residual if residual is not None else out  # placeholders are never read
    grid = (cdiv(N, BN), batch)
    launcher(_decode_linear_kernel, x)[grid](
        x, weight, bias if bias is not None else weight,
        norm_weight if norm_weight is not None else weight, res, out,
        N, K, float(eps),
        x.stride(0), weight.stride(0), res.stride(0), out.stride(0),
        HAS_BIAS=bias is not None, NORM=norm_weight is not None, RESIDUAL=residual is not None,
        BN=BN, KP=KP, num_warps=num_warps, **pdl(x, pdl_launch),
    )  # fmt: skip
    return out


@dataclass(frozen=True)
class DotConfig:
    """Launch configuration of `_decode_dot_kernel`: BM rows of x and BN rows of the weight per
    program, BK columns per step along K; SPLIT programs share K (their fp32 partial products
    summed by `_split_epilogue_kernel`)."""

    BM: int
    BN: int
    BK: int = 64
    SPLIT: int = 1
    num_warps: int = 4
    num_stages: int = 4


def decode_dot_config(batch: int, N: int, K: int, x_bytes: int = 2, w_bytes: int = 2) -> DotConfig:
    """`_decode_dot_kernel`'s configuration for x (batch, K) and a (N, K) weight (elements of
    x_bytes and w_bytes). Every program reads its BM rows of x whole (from L2): BN is about
    N / 96, from 16 to 64, and K steps by 128; with fewer than 48 tiles, K is split in up to 8
    pieces of 64-wide steps, and from K = 4096 on too, with BN 64 (1.4B's out_proj: 9.95
    against 10.90 µs, perf/RESULTS.md, ninth session). The best, or within 10 % of the best,
    of perf/bench_scan.py's sweep at batch 64 on the H200 for the 130M and 1.4B models'
    in_proj, out_proj, x_proj and dt_proj. Stages (then BK) shrink to keep the pipeline's
    tiles within 160 KB of shared memory."""
    BM = min(64, max(16, next_power_of_2(batch)))
    BN = min(64, max(16, _pow2_floor(N // 96)))
    tiles = cdiv(N, BN) * cdiv(batch, BM)
    BK, SPLIT = (128, 1) if tiles >= 48 or K < 512 else (64, 8)
    if SPLIT == 1 and K >= 4096:  # a long serial chain along K: 64-wide tiles, K in 8 pieces
        BN, BK, SPLIT = 64, 64, 8
    while SPLIT > 1 and K // (SPLIT * BK) < 2:
        SPLIT //= 2
    stages = 4
    while stages * BK * (BM * x_bytes + BN * w_bytes) > 160 << 10:
        if stages > 2:
            stages -= 1
        else:
            BK //= 2
    return DotConfig(BM, BN, min(BK, max(16, next_power_of_2(K))), SPLIT, 4, stages)


def _pow2_floor(n: int) -> int:
    return 1 << max(0, n.bit_length() - 1)


@triton.jit
def _decode_dot_kernel(
    x_ptr, w_ptr, bias_ptr, res_ptr, out_ptr,
    M, N, K, k_per_split,
    s_xm, s_wn, s_rm, s_om, s_op,
    HAS_BIAS: tl.constexpr, RESIDUAL: tl.constexpr, PARTIAL: tl.constexpr,
    EVEN_K: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
    PRECISION: tl.constexpr, DOT_F32: tl.constexpr, ROUND: tl.constexpr, GDC: tl.constexpr,
):  # fmt: skip
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_s = tl.program_id(2)
    m = pid_m * BM + tl.arange(0, BM)
    n = pid_n * BN + tl.arange(0, BN)
    mmask = m < M
    nmask = n < N
    kk = tl.arange(0, BK)
    k_lo = pid_s * k_per_split
    w_ptrs = w_ptr + n[:, None].to(tl.int64) * s_wn + kk[None, :]  # (BN, BK)
    x_ptrs = x_ptr + m[:, None].to(tl.int64) * s_xm + kk[None, :]  # (BM, BK)
    if HAS_BIAS and not PARTIAL:
        bias = tl.load(bias_ptr + n, mask=nmask, other=0.0).to(tl.float32)
    wait_for_previous_kernel(GDC)
    acc = tl.zeros((BM, BN), tl.float32)
    for k0 in range(k_lo, tl.minimum(k_lo + k_per_split, K), BK):
        if EVEN_K:
            w = tl.load(w_ptrs + k0, mask=nmask[:, None], other=0.0)
            xk = tl.load(x_ptrs + k0, mask=mmask[:, None], other=0.0)
        else:
            kmask = (kk + k0 < K)[None, :]
            w = tl.load(w_ptrs + k0, mask=nmask[:, None] & kmask, other=0.0)
            xk = tl.load(x_ptrs + k0, mask=mmask[:, None] & kmask, other=0.0)
        # DOT_F32: the interpreter's bf16 dot is wrong (triton 3.9); bf16 products are exact in fp32
        if DOT_F32:
            xk = xk.to(w.dtype).to(tl.float32)  # x rounded to the weight's dtype, as below
            acc = tl.dot(xk, tl.trans(w.to(tl.float32)), acc, input_precision="ieee")
        else:
            acc = tl.dot(xk.to(w.dtype), tl.trans(w), acc, input_precision=PRECISION)
    offs = m[:, None].to(tl.int64) * s_om + n[None, :]
    omask = mmask[:, None] & nmask[None, :]
    if PARTIAL:  # fp32 partial products, summed by _split_epilogue_kernel
        tl.store(out_ptr + pid_s * s_op + offs, acc, mask=omask)
    else:
        if HAS_BIAS:
            acc += bias[None, :]
        out = acc
        if ROUND:
            out = acc.to(w_ptr.dtype.element_ty)  # the linear layer's output dtype
        if RESIDUAL:
            res = tl.load(res_ptr + m[:, None].to(tl.int64) * s_rm + n[None, :], mask=omask)
            out = res.to(tl.float32) + out.to(tl.float32)
        tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=omask)


@triton.jit
def _split_epilogue_kernel(
    part_ptr, bias_ptr, res_ptr, out_ptr, w_ptr,
    N, n_split, s_pp, s_pm, s_rm, s_om,
    HAS_BIAS: tl.constexpr, RESIDUAL: tl.constexpr, S: tl.constexpr, BN: tl.constexpr,
    ROUND: tl.constexpr, GDC: tl.constexpr,
):  # fmt: skip
    pid_n = tl.program_id(0)
    row = tl.program_id(1).to(tl.int64)
    n = pid_n * BN + tl.arange(0, BN)
    nmask = n < N
    s = tl.arange(0, S)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + n, mask=nmask, other=0.0).to(tl.float32)
    wait_for_previous_kernel(GDC)
    part = tl.load(
        part_ptr + s[:, None] * s_pp + row * s_pm + n[None, :],
        mask=(s < n_split)[:, None] & nmask[None, :],
        other=0.0,
    )
    out = tl.sum(part, 0)
    if HAS_BIAS:
        out += bias
    if ROUND:
        out = out.to(w_ptr.dtype.element_ty)
    if RESIDUAL:
        res = tl.load(res_ptr + row * s_rm + n, mask=nmask)
        out = res.to(tl.float32) + out.to(tl.float32)
    tl.store(out_ptr + row * s_om + n, out.to(out_ptr.dtype.element_ty), mask=nmask)


@triton.jit
def _rms_norm_rows_kernel(
    x_ptr, nw_ptr, h_ptr,
    K, eps, s_xm,
    KP: tl.constexpr, GDC: tl.constexpr,
):  # fmt: skip
    """h (rows of K, contiguous) = the model's RMSNorm of x, one row per program, as
    `_decode_linear_kernel`'s NORM computes it, for `_decode_dot_kernel`: normalizing inside
    that kernel made each of its programs read x's whole fp32 rows."""
    row = tl.program_id(0).to(tl.int64)
    k = tl.arange(0, KP)
    kmask = k < K
    nw = tl.load(nw_ptr + k, mask=kmask, other=0.0)
    wait_for_previous_kernel(GDC)
    x = tl.load(x_ptr + row * s_xm + k, mask=kmask, other=0.0)
    # x in the norm's dtype, normalized in fp32, rounded back
    xf = x.to(nw_ptr.dtype.element_ty).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, 0) / K + eps)
    h = (xf * rstd * nw.to(tl.float32)).to(nw_ptr.dtype.element_ty)
    tl.store(h_ptr + row * K + k, h, mask=kmask)


def decode_dot(x, weight, bias, norm_weight, eps, residual, out, config, pdl_launch):
    """`decode_linear`'s product with tl.dot (arguments as there, `out` allocated)."""
    M, K = x.shape
    N = weight.shape[0]
    c = config
    steps = cdiv(K, c.BK)
    k_per_split = cdiv(steps, c.SPLIT) * c.BK
    split = cdiv(K, k_per_split)
    if norm_weight is not None:  # h = the norm of x, (M, K) contiguous in the norm's dtype
        h = torch.empty((M, K), dtype=norm_weight.dtype, device=x.device)
        launcher(_rms_norm_rows_kernel, x)[(M,)](
            x, norm_weight, h, K, float(eps), x.stride(0),
            KP=next_power_of_2(K), num_warps=4, **pdl(x, pdl_launch),
        )  # fmt: skip
        x = h
    res = residual if residual is not None else out  # placeholders are never read
    fp32 = weight.dtype in (torch.float32, torch.float64)
    # an fp32 `out` for a 16-bit weight takes the product unrounded (`decode_linear`'s out_fp32)
    round_out = residual is not None or out.dtype != torch.float32 or fp32
    part = out
    if split > 1:
        part = torch.empty((split, M, N), dtype=torch.float32, device=x.device)
    grid = (cdiv(N, c.BN), cdiv(M, c.BM), split)
    launcher(_decode_dot_kernel, x)[grid](
        x, weight, bias if bias is not None else weight, res, part,
        M, N, K, k_per_split,
        x.stride(0), weight.stride(0), res.stride(0), N, part.stride(0) if split > 1 else 0,
        HAS_BIAS=bias is not None, RESIDUAL=residual is not None, PARTIAL=split > 1,
        EVEN_K=K % c.BK == 0, BM=c.BM, BN=c.BN, BK=c.BK, PRECISION="ieee" if fp32 else "tf32",
        DOT_F32=interpreting() and weight.dtype == torch.bfloat16, ROUND=round_out,
        num_warps=c.num_warps, num_stages=c.num_stages, **pdl(x, pdl_launch),
    )  # fmt: skip
    if split > 1:
        BN = min(256, next_power_of_2(N))
        launcher(_split_epilogue_kernel, x)[(cdiv(N, BN), M)](
            part, bias if bias is not None else weight, res, out, weight,
            N, split, part.stride(0), part.stride(1), res.stride(0), out.stride(0),
            HAS_BIAS=bias is not None, RESIDUAL=residual is not None,
            S=next_power_of_2(split), BN=BN, ROUND=round_out, num_warps=4,
            **pdl(x, pdl_launch),
        )  # fmt: skip
    return out
