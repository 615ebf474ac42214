"""One decode step of the selective scan, in place: a Triton kernel and its launcher.

One program per (block of BD channels, batch element) holds a (BD, N) tile of the state:

    Δ = softplus(dt + dt_bias);  h = exp(Δ·A)·h + Δ·B·x;  out = (Σ_n C·h + D·x)·silu(z)

The model's decode step (CONV_U) computes x itself, as the causal conv's output for this step:
x = silu(Σ_k window[k]·w[k] + b), with window = the conv state shifted left by one and the new
input last (also written back), rounded to the output dtype as the model rounds it.

With x_dbl (XDBL), the kernel takes x_proj's output as partial sums over slices of channels,
(P, batch, dt_rank + 2·dstate), sums them in fp32 and rounds to the output dtype (as the model
rounds x_proj's output), then splits dt_low (dt_proj's input), B and C. `conv_x_proj` writes
those partial sums: one program per (slice of BE channels, batch element) computes the conv's
step for its channels and multiplies them with its columns of x_proj's weight, so the conv and
x_proj take one kernel without atomics or a second pass (the model's decode step at small
batch: two kernels from in_proj's output to the gated output). From DT_DOT_MIN_BATCH rows the
launcher first runs dt_proj as `decode_linear`'s tl.dot product (fp32, each weight read once
for all rows) and the kernel takes dt.

The launch configuration is fixed by a heuristic and never autotuned: autotuning would run the
kernel several times and apply the update several times.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .common import (
    LOG2E,
    cdiv,
    decode_config_override,
    interpreting,
    launcher,
    next_power_of_2,
    pdl,
    sigmoid,
    softplus,
    wait_for_previous_kernel,
)
from .linear import decode_linear


@triton.jit
def _state_update_kernel(
    state_ptr, x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, out_ptr,
    dtw_ptr, conv_ptr, cx_ptr, cw_ptr, cb_ptr, xdbl_ptr,
    dim, dstate, B_per_group, C_per_group, rank, width, n_part,
    s_sb, s_sd, s_sn, s_xb, s_xd, s_tb, s_td, s_zb, s_zd,
    s_Bb, s_Bg, s_Bn, s_Cb, s_Cg, s_Cn, s_wd, s_cb, s_cd, s_ck, s_cxb, s_cxd, s_cwd, s_cwk,
    s_xdp, s_xdb,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    DT_PROJ: tl.constexpr, R: tl.constexpr, CONV: tl.constexpr, W: tl.constexpr,
    CONV_U: tl.constexpr, HAS_CB: tl.constexpr, XDBL: tl.constexpr, P: tl.constexpr,
    BD: tl.constexpr, N: tl.constexpr, FAST_MATH: tl.constexpr, GDC: tl.constexpr,
):  # fmt: skip
    pid_d = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    d = pid_d * BD + tl.arange(0, BD)  # (BD,)
    n = tl.arange(0, N)  # (N,)
    dmask = d < dim
    nmask = (n < dstate)[None, :]
    mask = dmask[:, None] & nmask  # (BD, N)

    # Every load first: at batch 1 this kernel is a chain of small loads, and each load used
    # right after it is issued waits for memory alone; issued together, their latencies overlap.
    # The parameters first (with PDL they load while the previous kernel finishes), then what
    # kernels write: the inputs, the state, the conv window.
    if DT_PROJ:
        r = tl.arange(0, R)
        rmask = r < rank
        w = tl.load(
            dtw_ptr + d[:, None].to(tl.int64) * s_wd + r[None, :],
            mask=dmask[:, None] & rmask[None, :],
            other=0.0,
        )
    if CONV:
        k = tl.arange(0, W)
    if CONV_U:
        cw = tl.load(
            cw_ptr + d[:, None].to(tl.int64) * s_cwd + k[None, :] * s_cwk,
            mask=dmask[:, None] & (k < width)[None, :],
            other=0.0,
        )
        if HAS_CB:
            cb = tl.load(cb_ptr + d, mask=dmask, other=0.0)
    if HAS_BIAS:
        dt_bias = tl.load(bias_ptr + d, mask=dmask, other=0.0)
    A = tl.load(A_ptr + d[:, None] * dstate + n[None, :], mask=mask, other=0.0)
    if HAS_D:
        Dv = tl.load(D_ptr + d, mask=dmask, other=0.0)
    wait_for_previous_kernel(GDC)
    if XDBL:  # x_proj's output as partial sums (P, rows): dt_low, B, C tiles
        p = tl.arange(0, P)[:, None]
        part_ptrs = xdbl_ptr + pid_b * s_xdb + p * s_xdp
        pmask = p < n_part
        Bp = tl.load(part_ptrs + rank + n[None, :], mask=pmask & nmask, other=0.0)
        Cp = tl.load(part_ptrs + rank + dstate + n[None, :], mask=pmask & nmask, other=0.0)
    else:
        B = tl.load(
            B_ptr + pid_b * s_Bb + (d // B_per_group)[:, None] * s_Bg + n[None, :] * s_Bn,
            mask=mask,
            other=0.0,
        )
        C = tl.load(
            C_ptr + pid_b * s_Cb + (d // C_per_group)[:, None] * s_Cg + n[None, :] * s_Cn,
            mask=mask,
            other=0.0,
        )
    if DT_PROJ:
        if XDBL:
            dt_low = tl.load(part_ptrs + r[None, :], mask=pmask & rmask[None, :], other=0.0)
        else:
            dt_low = tl.load(dt_ptr + pid_b * s_tb + r * s_td, mask=rmask, other=0.0)
    else:
        dt = tl.load(dt_ptr + pid_b * s_tb + d * s_td, mask=dmask, other=0.0)
    if CONV:  # the conv window of these channels, shifted left by one
        conv_ptrs = conv_ptr + pid_b * s_cb + d[:, None].to(tl.int64) * s_cd + k[None, :] * s_ck
        nxt = tl.load(conv_ptrs + s_ck, mask=dmask[:, None] & (k + 1 < width)[None, :], other=0.0)
        cx = tl.load(cx_ptr + pid_b * s_cxb + d * s_cxd, mask=dmask, other=0.0)
    if not CONV_U:
        x = tl.load(x_ptr + pid_b * s_xb + d * s_xd, mask=dmask, other=0.0).to(tl.float32)
    state_ptrs = state_ptr + pid_b * s_sb + d[:, None].to(tl.int64) * s_sd + n[None, :] * s_sn
    h = tl.load(state_ptrs, mask=mask, other=0.0)
    if HAS_Z:
        z = tl.load(z_ptr + pid_b * s_zb + d * s_zd, mask=dmask, other=0.0).to(tl.float32)

    if XDBL:  # the sum of the partial sums, rounded as the model rounds x_proj's output
        B = tl.sum(Bp.to(tl.float32), 0).to(out_ptr.dtype.element_ty)[None, :]  # (1, N)
        C = tl.sum(Cp.to(tl.float32), 0).to(out_ptr.dtype.element_ty)[None, :]
    B = B.to(tl.float32)
    C = C.to(tl.float32)
    if DT_PROJ:  # dt = dt_weight @ dt_low: a (rank,) dot per channel, in fp32
        if XDBL:
            dt_low = tl.sum(dt_low.to(tl.float32), 0).to(out_ptr.dtype.element_ty)
        dt = tl.sum(w.to(tl.float32) * dt_low.to(tl.float32)[None, :], 1)  # (BD,)
    else:
        dt = dt.to(tl.float32)
    if CONV:  # the window takes the new input last
        window = tl.where((k == width - 1)[None, :], cx[:, None].to(nxt.dtype), nxt)
        tl.debug_barrier()  # every thread has read the old window before any writes it
        tl.store(conv_ptrs, window, mask=dmask[:, None] & (k < width)[None, :])
    if CONV_U:  # x = silu(conv output), from the new window
        x = tl.sum(window.to(tl.float32) * cw.to(tl.float32), 1)  # (BD,)
        if HAS_CB:
            x += cb.to(tl.float32)
        x = x * sigmoid(x)
        x = x.to(out_ptr.dtype.element_ty).to(tl.float32)  # as the model rounds it
    if HAS_BIAS:
        dt += dt_bias
    if SOFTPLUS:
        dt = softplus(dt, FAST_MATH)
    dA = tl.exp2(dt[:, None] * A * LOG2E)  # Ā: (BD, N)
    h = dA * h + (dt * x)[:, None] * B
    tl.store(state_ptrs, h, mask=mask)

    y = tl.sum(h * C, 1)  # (BD,)
    if HAS_D:
        y += Dv * x
    if HAS_Z:
        y = y * z * sigmoid(z)
    tl.store(out_ptr + pid_b * dim + d, y.to(out_ptr.dtype.element_ty), mask=dmask)


# From this many rows, the model's decode step (`state_update` with conv_weight and x_dbl) runs
# dt_proj as a tl.dot product first (`decode_linear`, fp32 out), and the state update takes dt
# from there: the per-row kernel read dt_proj's weight once per row (64 MB of L2 reads per 1.4B
# layer at batch 64), and a kernel holding 16 rows' states (for one tl.dot over them) measured
# 13-18 against 8 µs for the state update alone (H200, perf/RESULTS.md, eighth session).
DT_DOT_MIN_BATCH = 9


def dot_rows(batch: int, dtype: torch.dtype) -> bool:
    """Whether the decode step's ops run x_proj and dt_proj as tl.dot products (`decode_linear`,
    which takes fp32, fp16 and bf16)."""
    return batch >= DT_DOT_MIN_BATCH and dtype != torch.float64


def state_update(
    state: Tensor,
    x: Tensor | None,
    dt: Tensor | None,
    A: Tensor,
    B: Tensor | None,
    C: Tensor | None,
    D: Tensor | None,
    z: Tensor | None,
    dt_bias: Tensor | None,
    dt_softplus: bool,
    dt_weight: Tensor | None = None,
    conv_state: Tensor | None = None,
    conv_x: Tensor | None = None,
    conv_weight: Tensor | None = None,
    conv_bias: Tensor | None = None,
    x_dbl: Tensor | None = None,
    pdl_launch: bool = False,
) -> Tensor:
    """Decode step on CUDA (or under TRITON_INTERPRET=1 on CPU); updates `state` in place.

    state (batch, dim, dstate) fp32; x, dt, z (batch, dim); A (dim, dstate) fp32; B, C (batch,
    groups, dstate); D, dt_bias (dim,) fp32. Returns out (batch, dim) in x.dtype.
    With dt_weight (dim, rank), dt is the low-rank (batch, rank) input of dt_proj and the kernel
    computes dt = dt @ dt_weight.T in fp32. With conv_state (batch, dim, width) and conv_x
    (batch, dim), the kernel also shifts the conv window left by one and writes conv_x last.
    With conv_weight (dim, width) too (and conv_bias (dim,) or None), x is None: the kernel
    computes it as silu(conv output) from the new window, and out takes conv_x's dtype (the
    model's decode step: one kernel for dt_proj, the conv, the state update and the gate).
    With x_dbl (P, batch, rank + 2·dstate), partial sums of x_proj's output (`conv_x_proj`),
    dt, B and C are None: the kernel sums x_dbl over P, rounds it to the output dtype and splits
    it into dt (dt_proj's low-rank input, with dt_weight), B and C (one group); from
    DT_DOT_MIN_BATCH rows with conv_weight too, dt_proj runs first as a tl.dot product (two or
    three kernels).
    """
    if conv_weight is not None:
        if conv_state is None or conv_x is None or x is not None:
            raise ValueError("conv_weight needs conv_state and conv_x, and x=None")
    if x_dbl is not None:
        if dt_weight is None or dt is not None or B is not None or C is not None:
            raise ValueError("x_dbl needs dt_weight, and dt=B=C=None")
    like = conv_x if x is None else x
    batch, dim = like.shape
    dstate = A.shape[1]
    if conv_weight is not None and x_dbl is not None and dot_rows(batch, like.dtype):
        # x_proj's output summed (a view when `conv_x_proj` passes it summed, P = 1) and
        # rounded as the model rounds it, then dt = dt_low @ dt_weight.T in fp32 by tl.dot
        xd = x_dbl[0] if x_dbl.shape[0] == 1 else x_dbl.to(torch.float32).sum(0)
        if dt_weight.dtype != like.dtype:  # else the product's kernel rounds its x tiles
            xd = xd.to(like.dtype)
        rank = dt_weight.shape[1]
        dt = decode_linear(
            xd[:, :rank], dt_weight, None, None, 0.0, None, pdl_launch=pdl_launch, out_fp32=True
        )
        x_dbl, dt_weight = xd[None], None
    N = next_power_of_2(dstate)
    # fixed config (never autotuned, see above; a benchmark may set
    # common.set_override(decode=(BD, num_warps))): about 512 state elements per program and 4
    # warps; above batch 8, 1024 and 2 warps (H200, batch 64, dim 1536 and 4096: 1024 rather
    # than 512 took 8.7 -> 7.4 us with dt_proj in the kernel and 11.4 -> 8.4 us with dt given,
    # perf/RESULTS.md seventh session; 2 warps rather than 4 took dt_proj's product and this
    # kernel 6.66 -> 6.25 and 11.82 -> 11.34 us, eighth session)
    per_program = 1024 if batch > 8 else 512
    BD = max(1, min(next_power_of_2(dim), per_program // N))
    num_warps = (2 if batch > 8 else 4) if BD * N >= 512 else 1
    BD, num_warps = decode_config_override() or (BD, num_warps)
    out = torch.empty((batch, dim), dtype=like.dtype, device=like.device)
    A = A.contiguous()
    D = D.contiguous() if D is not None else None
    dt_bias = dt_bias.contiguous() if dt_bias is not None else None
    x_ = x if x is not None else like  # placeholders are never read (or written)
    z_ = z if z is not None else like
    # dt_proj's rank, or dt_low's columns in x_dbl (dt_low, B, C) when dt is given
    rank = dt_weight.shape[1] if dt_weight is not None else 1
    rank = x_dbl.shape[2] - 2 * dstate if x_dbl is not None else rank
    n_part = x_dbl.shape[0] if x_dbl is not None else 1
    xdbl = x_dbl if x_dbl is not None else A
    xdbl_strides = (x_dbl.stride(0), x_dbl.stride(1)) if x_dbl is not None else (0, 0)
    dt = dt if dt is not None else A  # placeholders, never read
    B = B if B is not None else A[None, :1, :1]
    C = C if C is not None else B
    dtw = dt_weight.contiguous() if dt_weight is not None else A
    width = conv_state.shape[2] if conv_state is not None else 1
    conv = conv_state if conv_state is not None else like
    conv_strides = conv_state.stride() if conv_state is not None else (0, 0, 0)
    cx = conv_x if conv_x is not None else like
    cw = conv_weight if conv_weight is not None else A
    cw_strides = conv_weight.stride() if conv_weight is not None else (0, 0)
    cb = conv_bias if conv_bias is not None else A
    grid = (cdiv(dim, BD), batch)
    launcher(_state_update_kernel, like)[grid](
        state, x_, dt, A, B, C, D if D is not None else A, z_,
        dt_bias if dt_bias is not None else A, out, dtw, conv, cx, cw, cb, xdbl,
        dim, dstate, dim // B.shape[1], dim // C.shape[1], rank, width, n_part,
        state.stride(0), state.stride(1), state.stride(2),
        x_.stride(0), x_.stride(1), dt.stride(0), dt.stride(1), z_.stride(0), z_.stride(1),
        B.stride(0), B.stride(1), B.stride(2), C.stride(0), C.stride(1), C.stride(2),
        dtw.stride(0), *conv_strides, cx.stride(0), cx.stride(1), *cw_strides, *xdbl_strides,
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=dt_bias is not None,
        SOFTPLUS=bool(dt_softplus), DT_PROJ=dt_weight is not None,
        R=next_power_of_2(rank), CONV=conv_state is not None,
        W=next_power_of_2(width), CONV_U=conv_weight is not None,
        HAS_CB=conv_bias is not None, XDBL=x_dbl is not None,
        P=next_power_of_2(n_part), BD=BD, N=N, FAST_MATH=not interpreting(),
        num_warps=num_warps, **pdl(like, pdl_launch),
    )  # fmt: skip
    return out


@triton.jit
def _conv_params(cw_ptr, cb_ptr, e, emask, k, width, s_cwd, s_cwk, HAS_CB: tl.constexpr):
    """The conv's weights (BE, W) and bias (BE,) of channels e (without a bias, the weights
    again as a placeholder, never read)."""
    cw = tl.load(
        cw_ptr + e[:, None].to(tl.int64) * s_cwd + k[None, :] * s_cwk,
        mask=emask[:, None] & (k < width)[None, :],
        other=0.0,
    )
    cb = cw
    if HAS_CB:
        cb = tl.load(cb_ptr + e, mask=emask, other=0.0)
    return cw, cb


@triton.jit
def _conv_output(conv_ptr, cx_ptr, pid_b, e, emask, k, width, s_cb, s_cd, s_ck, s_cxb, s_cxd,
                 cw, cb, HAS_CB: tl.constexpr):  # fmt: skip
    """silu(the conv's step) in fp32 for channels e of row pid_b: the window is conv_state's
    last width - 1 columns, then conv_x; cw (BE, W) and cb (BE,) as the caller loaded them
    (before its PDL wait)."""
    win = tl.load(
        conv_ptr + pid_b * s_cb + e[:, None].to(tl.int64) * s_cd + (k[None, :] + 1) * s_ck,
        mask=emask[:, None] & (k + 1 < width)[None, :],
        other=0.0,
    )
    cx = tl.load(cx_ptr + pid_b * s_cxb + e * s_cxd, mask=emask, other=0.0)
    win = tl.where((k == width - 1)[None, :], cx[:, None], win).to(tl.float32)
    u = tl.sum(win * cw.to(tl.float32), 1)  # (BE,)
    if HAS_CB:
        u += cb.to(tl.float32)
    return u * sigmoid(u)


@triton.jit
def _conv_x_proj_kernel(
    conv_ptr, cx_ptr, cw_ptr, cb_ptr, wx_ptr, part_ptr,
    dim, rows, width,
    s_cb, s_cd, s_ck, s_cxb, s_cxd, s_cwd, s_cwk, s_wr, s_op, s_ob,
    HAS_CB: tl.constexpr, W: tl.constexpr, BE: tl.constexpr, ROWS: tl.constexpr,
    GDC: tl.constexpr,
):  # fmt: skip
    pid_p = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    e = pid_p * BE + tl.arange(0, BE)  # (BE,) channels of this slice
    emask = e < dim
    k = tl.arange(0, W)
    r = tl.arange(0, ROWS)
    rmask = r < rows
    # every load first (their latencies overlap): the conv's weights and x_proj's columns of
    # these channels, then the window (conv_state's last width - 1 columns, then conv_x)
    cw, cb = _conv_params(cw_ptr, cb_ptr, e, emask, k, width, s_cwd, s_cwk, HAS_CB)
    wx = tl.load(
        wx_ptr + r[:, None].to(tl.int64) * s_wr + e[None, :],
        mask=rmask[:, None] & emask[None, :],
        other=0.0,
    )  # (ROWS, BE)
    wait_for_previous_kernel(GDC)
    u = _conv_output(conv_ptr, cx_ptr, pid_b, e, emask, k, width, s_cb, s_cd, s_ck, s_cxb,
                     s_cxd, cw, cb, HAS_CB)  # fmt: skip
    u = u.to(cx_ptr.dtype.element_ty).to(tl.float32)  # as the model rounds it
    part = tl.sum(wx.to(tl.float32) * u[None, :], 1)  # (ROWS,)
    tl.store(part_ptr + pid_p * s_op + pid_b * s_ob + r, part, mask=rmask)


def conv_x_proj_slices(dim: int) -> tuple[int, int]:
    """(channels per slice, slices) of `conv_x_proj`'s one-kernel form for `dim` channels: at
    most 64 slices (the decode kernel sums them per program), at least 32 channels each."""
    per = max(32, next_power_of_2(cdiv(dim, 64)))
    return per, cdiv(dim, per)


def conv_x_proj_parts(batch: int, dim: int, dtype: torch.dtype) -> int:
    """P, the partial sums `conv_x_proj` returns: one (the whole product) where x_proj is a
    tl.dot product (`dot_rows`), else one per slice of channels."""
    return 1 if dot_rows(batch, dtype) else conv_x_proj_slices(dim)[1]


@triton.jit
def _conv_step_kernel(
    conv_ptr, cx_ptr, cw_ptr, cb_ptr, u_ptr,
    dim, width,
    s_cb, s_cd, s_ck, s_cxb, s_cxd, s_cwd, s_cwk,
    HAS_CB: tl.constexpr, W: tl.constexpr, BE: tl.constexpr, GDC: tl.constexpr,
):  # fmt: skip
    """u (batch, dim) = silu(the conv's step), rounded to conv_x's dtype: the window is
    conv_state's last width - 1 columns, then conv_x; one program per (BE channels, row)."""
    pid_e = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    e = pid_e * BE + tl.arange(0, BE)
    emask = e < dim
    k = tl.arange(0, W)
    cw, cb = _conv_params(cw_ptr, cb_ptr, e, emask, k, width, s_cwd, s_cwk, HAS_CB)
    wait_for_previous_kernel(GDC)
    u = _conv_output(conv_ptr, cx_ptr, pid_b, e, emask, k, width, s_cb, s_cd, s_ck, s_cxb,
                     s_cxd, cw, cb, HAS_CB)  # fmt: skip
    tl.store(u_ptr + pid_b * dim + e, u.to(u_ptr.dtype.element_ty), mask=emask)


def conv_x_proj(
    conv_state: Tensor,
    conv_x: Tensor,
    conv_weight: Tensor,
    conv_bias: Tensor | None,
    x_proj_weight: Tensor,
    pdl_launch: bool = False,
) -> Tensor:
    """The conv's step and x_proj as partial sums, on CUDA (or under TRITON_INTERPRET=1).

    conv_state (batch, dim, width), conv_x (batch, dim), conv_weight (dim, width), conv_bias
    (dim,) or None, x_proj_weight (rows, dim) with unit stride along dim. u = silu(conv output)
    of the window (conv_state's last width - 1 columns, then conv_x), rounded to conv_x's
    dtype; returns (P, batch, rows) float32 partial sums of u @ x_proj_weight.T
    (`conv_x_proj_parts`): up to 8 rows, one kernel, partial sums over slices of the channels;
    from DT_DOT_MIN_BATCH rows (`dot_rows`), the conv's step as a kernel of its own, then x_proj as
    `decode_linear`'s tl.dot product in fp32 (P = 1): there the slices' kernel would read x_proj's
    weight once per row. conv_state is not changed.
    """
    batch, dim = conv_x.shape
    rows, width = x_proj_weight.shape[0], conv_state.shape[2]
    if dot_rows(batch, conv_x.dtype):
        u = torch.empty_like(conv_x, memory_format=torch.contiguous_format)
        BE = min(256, next_power_of_2(dim))
        launcher(_conv_step_kernel, conv_x)[(cdiv(dim, BE), batch)](
            conv_state, conv_x, conv_weight, conv_bias if conv_bias is not None else conv_weight,
            u, dim, width, *conv_state.stride(), *conv_x.stride(), *conv_weight.stride(),
            HAS_CB=conv_bias is not None, W=next_power_of_2(width), BE=BE, num_warps=4,
            **pdl(conv_x, pdl_launch),
        )  # fmt: skip
        out = decode_linear(
            u, x_proj_weight, None, None, 0.0, None, pdl_launch=pdl_launch, out_fp32=True
        )
        return out[None]
    BE, n_part = conv_x_proj_slices(dim)
    ROWS = next_power_of_2(rows)
    out = torch.empty((n_part, batch, rows), dtype=torch.float32, device=conv_x.device)
    cb = conv_bias if conv_bias is not None else conv_weight
    grid = (n_part, batch)
    launcher(_conv_x_proj_kernel, conv_x)[grid](
        conv_state, conv_x, conv_weight, cb, x_proj_weight, out,
        dim, rows, width,
        *conv_state.stride(), *conv_x.stride(), *conv_weight.stride(), x_proj_weight.stride(0),
        out.stride(0), out.stride(1),
        HAS_CB=conv_bias is not None, W=next_power_of_2(width), BE=BE, ROWS=ROWS,
        num_warps=max(1, min(8, ROWS * BE // 2048)), **pdl(conv_x, pdl_launch),
    )  # fmt: skip
    return out
