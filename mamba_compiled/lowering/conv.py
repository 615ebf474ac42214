"""The causal depthwise conv and its SiLU over a whole sequence, forward and backward, for the
model's (channels, batch, L) memory (training and prefill without a cache).

    conv_silu_fwd(x, weight, bias) -> u = silu(conv(x)), x (E, b, L) unit stride in time,
        weight (E, W), bias (E,) or None; u in x's layout and dtype
    conv_silu_bwd(du, x, weight, bias) -> (dx, dweight, dbias)

Taps as in `mamba_compiled.ops.conv.causal_conv`: u[t] = silu(bias + sum_k w_k x[t-(W-1)+k]),
zeros before the sequence, the weights and bias rounded to x's dtype first, products and sums
in fp32. The backward stores SiLU's gradient g once (one kernel, with per-program partial sums
of dweight and dbias), then dx[t] = sum_k w_k g[t + W-1-k] (a second kernel): Inductor's code
for the same math recomputed g per tap (perf/NOTES.md, Run 13). Programs: a block of BR rows
(channel, batch) by BL steps, shifted taps as shifted loads (L1 hits).
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl
from torch import Tensor

from .common import cdiv, launcher, next_power_of_2, override


@dataclasses.dataclass(frozen=True)
class ConvTiles:
    """Tiles of one conv kernel: BR rows (channel, batch) by BL steps, num_warps; NT (the g
    kernel only) programs along L per block of rows, each looping over every NT-th step block."""

    BR: int = 4
    BL: int = 256
    num_warps: int = 4
    NT: int = 8


# Twelfth session (perf/bench_conv.py, H200, GPU µs at 1536 / 4096 channels x 8 x 2048): the
# backward (g + dx) 138 / 341 with the g kernel's 2 programs along L against 148 / 359 with 8;
# every other tile within 2 % of 4 x 256, 4 warps (the forward 42 / 107).
DEFAULT_TILES = {"fwd": ConvTiles(), "g": ConvTiles(NT=2), "dx": ConvTiles()}


def tiles(kernel: str) -> ConvTiles:
    """The tiles of "fwd", "g" or "dx": common.set_override(conv={kernel: ConvTiles}) for
    benchmarks (perf/bench_conv.py), else DEFAULT_TILES."""
    return (override("conv") or {}).get(kernel, DEFAULT_TILES[kernel])  # type: ignore[union-attr]


@triton.jit
def _row_ptrs(ptr, rows, nb, s_e, s_b):
    return ptr + (rows // nb).to(tl.int64) * s_e + (rows % nb).to(tl.int64) * s_b


@triton.jit
def _pre(x_rows, cw_ptr, bias_ptr, e, rmask, t, seqlen, W: tl.constexpr, HAS_BIAS: tl.constexpr,
         dtype: tl.constexpr):  # fmt: skip
    """The conv's output before SiLU at steps t (BL,) of rows (BR,), in fp32."""
    acc = tl.zeros((x_rows.shape[0], t.shape[0]), dtype=tl.float32)
    for k in tl.static_range(W):
        tt = t - (W - 1 - k)
        m = rmask[:, None] & (tt[None, :] >= 0) & (tt[None, :] < seqlen)
        xv = tl.load(x_rows[:, None] + tt[None, :], mask=m, other=0.0).to(tl.float32)
        wk = tl.load(cw_ptr + e * W + k, mask=rmask, other=0.0).to(dtype).to(tl.float32)
        acc += xv * wk[:, None]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + e, mask=rmask, other=0.0).to(dtype).to(tl.float32)[:, None]
    return acc


@triton.jit
def _conv_fwd_kernel(
    x_ptr, cw_ptr, bias_ptr, out_ptr, n_rows, nb, seqlen, s_xe, s_xb, s_oe, s_ob,
    W: tl.constexpr, HAS_BIAS: tl.constexpr, BR: tl.constexpr, BL: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    t = tl.program_id(1) * BL + tl.arange(0, BL)
    rmask = rows < n_rows
    dtype = out_ptr.dtype.element_ty
    pre = _pre(_row_ptrs(x_ptr, rows, nb, s_xe, s_xb), cw_ptr, bias_ptr, rows // nb, rmask, t,
               seqlen, W, HAS_BIAS, dtype)  # fmt: skip
    u = pre * tl.sigmoid(pre)
    m = rmask[:, None] & (t[None, :] < seqlen)
    tl.store(_row_ptrs(out_ptr, rows, nb, s_oe, s_ob)[:, None] + t[None, :], u.to(dtype), mask=m)


@triton.jit
def _conv_bwd_g_kernel(
    du_ptr, x_ptr, cw_ptr, bias_ptr, g_ptr, part_ptr, n_rows, nb, seqlen, s_ue, s_ub, s_xe, s_xb,
    W: tl.constexpr, HAS_BIAS: tl.constexpr, BR: tl.constexpr, BL: tl.constexpr,
    NT: tl.constexpr, WP: tl.constexpr,
):  # fmt: skip
    """g = du * silu'(pre), stored (rows, L) contiguous in x's dtype. Program (i, j) takes the
    step blocks j, j + NT, ... of its rows and stores the sums over them of g * x[t - (W-1) + k]
    (column k < W) and of g (column W): part_ptr (NT, rows, W + 1). NT is fixed, so the
    partials' shape does not depend on L (a compiled graph would guard on it otherwise)."""
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    rmask = rows < n_rows
    e = rows // nb
    dtype = x_ptr.dtype.element_ty
    x_rows = _row_ptrs(x_ptr, rows, nb, s_xe, s_xb)
    du_rows = _row_ptrs(du_ptr, rows, nb, s_ue, s_ub)
    g_rows = g_ptr + rows.to(tl.int64) * seqlen
    cols = tl.arange(0, WP)
    acc = tl.zeros((BR, WP), dtype=tl.float32)
    for tb in range(tl.program_id(1), tl.cdiv(seqlen, BL), NT):
        t = tb * BL + tl.arange(0, BL)
        pre = _pre(x_rows, cw_ptr, bias_ptr, e, rmask, t, seqlen, W, HAS_BIAS, dtype)
        m = rmask[:, None] & (t[None, :] < seqlen)
        du = tl.load(du_rows[:, None] + t[None, :], mask=m, other=0.0).to(tl.float32)
        s = tl.sigmoid(pre)
        g = (du * s * (1.0 + pre * (1.0 - s))).to(dtype)
        tl.store(g_rows[:, None] + t[None, :], g, mask=m)
        g = tl.where(m, g.to(tl.float32), 0.0)
        for k in tl.static_range(W):
            tt = t - (W - 1 - k)
            mk = m & (tt[None, :] >= 0)
            xv = tl.load(x_rows[:, None] + tt[None, :], mask=mk, other=0.0).to(tl.float32)
            acc += tl.where(cols[None, :] == k, tl.sum(g * xv, 1)[:, None], 0.0)
        acc += tl.where(cols[None, :] == W, tl.sum(g, 1)[:, None], 0.0)
    part = (tl.program_id(1) * n_rows + rows).to(tl.int64) * (W + 1)
    tl.store(part_ptr + part[:, None] + cols[None, :], acc,
             mask=rmask[:, None] & (cols[None, :] <= W))  # fmt: skip


@triton.jit
def _conv_bwd_dx_kernel(
    g_ptr, cw_ptr, dx_ptr, n_rows, nb, seqlen, s_dxe, s_dxb,
    W: tl.constexpr, BR: tl.constexpr, BL: tl.constexpr,
):  # fmt: skip
    """dx[t] = sum_k w_k g[t + W-1-k], g zero past the end."""
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    t = tl.program_id(1) * BL + tl.arange(0, BL)
    rmask = rows < n_rows
    e = rows // nb
    dtype = dx_ptr.dtype.element_ty
    g_rows = g_ptr + rows.to(tl.int64) * seqlen
    acc = tl.zeros((BR, BL), dtype=tl.float32)
    for k in tl.static_range(W):
        tt = t + (W - 1 - k)
        m = rmask[:, None] & (tt[None, :] < seqlen)
        gv = tl.load(g_rows[:, None] + tt[None, :], mask=m, other=0.0).to(tl.float32)
        wk = tl.load(cw_ptr + e * W + k, mask=rmask, other=0.0).to(dtype).to(tl.float32)
        acc += gv * wk[:, None]
    m = rmask[:, None] & (t[None, :] < seqlen)
    tl.store(_row_ptrs(dx_ptr, rows, nb, s_dxe, s_dxb)[:, None] + t[None, :], acc.to(dtype), mask=m)


def _unit_time(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _grid(n_rows, seqlen, c: ConvTiles):
    return (cdiv(n_rows, c.BR), cdiv(seqlen, c.BL))


def conv_silu_fwd(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    x = _unit_time(x)
    E, nb, seqlen = x.shape
    weight = weight.contiguous()
    out = torch.empty_like(x)
    n_rows = E * nb
    c = tiles("fwd")
    launcher(_conv_fwd_kernel, x)[_grid(n_rows, seqlen, c)](
        x, weight, bias if bias is not None else weight, out, n_rows, nb, seqlen,
        x.stride(0), x.stride(1), out.stride(0), out.stride(1),
        W=weight.shape[1], HAS_BIAS=bias is not None, BR=c.BR, BL=c.BL, num_warps=c.num_warps,
    )  # fmt: skip
    return out


def conv_silu_bwd(
    du: Tensor, x: Tensor, weight: Tensor, bias: Tensor | None
) -> tuple[Tensor, Tensor, Tensor]:
    """(dx in x's layout and dtype, dweight (E, W) and dbias (E,) in fp32: dbias even when
    bias is None)."""
    x, du = _unit_time(x), _unit_time(du)
    E, nb, seqlen = x.shape
    W = weight.shape[1]
    weight = weight.contiguous()
    n_rows = E * nb
    g = torch.empty((n_rows, seqlen), dtype=x.dtype, device=x.device)
    c = tiles("g")
    part = torch.empty((c.NT, E, nb, W + 1), dtype=torch.float32, device=x.device)
    launcher(_conv_bwd_g_kernel, x)[(cdiv(n_rows, c.BR), c.NT)](
        du, x, weight, bias if bias is not None else weight, g, part, n_rows, nb, seqlen,
        du.stride(0), du.stride(1), x.stride(0), x.stride(1),
        W=W, HAS_BIAS=bias is not None, BR=c.BR, BL=c.BL, NT=c.NT,
        WP=next_power_of_2(W + 1), num_warps=c.num_warps,
    )  # fmt: skip
    dx = torch.empty_like(x)
    c = tiles("dx")
    launcher(_conv_bwd_dx_kernel, x)[_grid(n_rows, seqlen, c)](
        g, weight, dx, n_rows, nb, seqlen, dx.stride(0), dx.stride(1),
        W=W, BR=c.BR, BL=c.BL, num_warps=c.num_warps,
    )  # fmt: skip
    part = part.sum((0, 2))
    return dx, part[:, :W].clone(), part[:, W].clone()  # outputs may not alias
