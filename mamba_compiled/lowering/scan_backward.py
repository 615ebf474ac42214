"""The selective scan backward: one fused Triton kernel and its launcher.

One program per (block of BD channels, batch element) walks the chunks of T steps backwards.
For each chunk it reloads the inputs, recomputes the states h_t from the chunk's start state
(forward scan, as in the forward kernel), then runs the adjoint recurrence

    dh_t = C_t·dy_t + Ā_{t+1}·dh_{t+1}            (a reverse scan; dh after the end = dlast_state)

and forms every gradient from h_t and dh_t in registers, using Ā_t·h_{t-1} = h_t − B̄_t·u_t so
that h_{t-1} is never needed:

    du_t    = Δ_t·Σ_n dh·B_t + D·dy_t
    dΔ_t    = Σ_n A·dh·(h_t − B̄u_t) + u_t·Σ_n dh·B_t     (then through softplus and the bias)
    dA     += Σ_t Δ_t·dh·(h_t − B̄u_t)
    dB_t    = Σ_d dh·Δ_t·u_t,   dC_t = Σ_d h_t·dy_t
    dz_t    = dout·y_t·σ(z)(1 + z(1 − σ(z))),  dy_t = dout·silu(z_t)

The start state is the chunk's checkpoint when the checkpoint interval CK is T; with CK = 2T
(R = 2: half the checkpoints' memory) every other chunk starts from the state after the chunk
before it, scanned from that chunk's checkpoint.

When batch x blocks is small the sequence is cut into segments, run by separate programs
chained by a look-back (`common.segments`): segment s needs the adjoint flowing out of segment
s + 1. With few programs, every program first runs the adjoint alone over its share of the
segments after the first (`common.local_range`, as the forward's look-back but backwards in
time), so that the chain reaches each segment at once; their number is then capped at one wave
of programs (`common.bwd_resident`), as that pass grows with them. Once a segment's programs
outnumber the resident ones, segments instead publish after their full backward, which the
programs of s - 1 (later tickets, hence a wave later) seldom wait for.

Sums over time stay in registers; sums over batch are written per batch element and summed by
the launcher. Sums over channels (dB, dC per step) are reduced inside each channel block, then
either added with float atomics into one fp32 buffer (default: little memory) or, with
deterministic=True, written per block and summed by the launcher (bit-identical across runs,
(dim / BD) times the memory of dB).
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl
from torch import Tensor

from .common import (
    LOG2E,
    bc_atomics,
    bwd_config,
    bwd_resident,
    cdiv,
    chain,
    checkpoint_interval,
    interpreting,
    launcher,
    linear_combine,
    local_range,
    next_power_of_2,
    publish,
    segments,
    shifted_combine,
    sigmoid,
    softplus,
    stage_bc,
    sum_channels_scattered,
    take_ticket,
    traced,
    wait_for,
)
from .scan_forward import _delta, _last, _load_chunk, _scan_chunk, bc_args, groups_of


@triton.jit
def _sum_state(x):
    """(T, N_A, BD, N_B) -> (T, BD): in-thread over N_A first, then across the N_B lanes."""
    return tl.sum(tl.sum(x, 1), 2)


@triton.jit
def _bc_slot(pid_d, pid_b, batch, d0, dim, per_group, ATOMIC: tl.constexpr):
    """Row of the dB/dC buffer this program adds to: (batch, groups) with atomics, else its own
    (n_dblk, batch) row."""
    if ATOMIC:
        return pid_b * (dim // per_group) + d0 // per_group
    else:
        return pid_d * batch + pid_b


@triton.jit
def _bc_put(ptrs, values, mask, ATOMIC: tl.constexpr, MASK: tl.constexpr):
    if ATOMIC:
        if MASK:
            tl.atomic_add(ptrs, values, mask=mask, sem="relaxed")
        else:
            tl.atomic_add(ptrs, values, sem="relaxed")
    elif MASK:
        tl.store(ptrs, values, mask=mask)
    else:
        tl.store(ptrs, values)


@triton.jit
def _bwd_chunk(
    carry, h_start, t0, seqlen, raw, u, z, B_raw, C_raw, dout,
    A, A2, bias, Dv, B_sh, C_sh, t2, t3, t4, dmask2, ntmask3, ones,
    du_ptrs, ddelta_ptrs, dz_ptrs, dB_row, dC_row, nt3, dstate,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    B_SHARED: tl.constexpr, C_SHARED: tl.constexpr, ATOMIC_BC: tl.constexpr, RS: tl.constexpr,
    MASKED: tl.constexpr, EVEN_D: tl.constexpr, EVEN_N: tl.constexpr, T: tl.constexpr,
    FAST_MATH: tl.constexpr,
):  # fmt: skip
    """The backward over one chunk (t0 its first step) given the carry from the chunk after it
    and the state before it (its checkpoint). Stores du, ddelta, dz and the per-step dB, dC;
    returns the carry into the chunk before it and this chunk's contributions to the sums over
    time: (carry, dA (N_A, BD, N_B), dB, dC when shared (N_A, BD, N_B), dD (BD,), dbias (BD,))."""
    tt2 = t0 + t2
    tt3 = t0 + t3
    if MASKED:
        m2 = (tt2 < seqlen) & dmask2
        mt3 = ntmask3 & (tt3 < seqlen)
    else:
        m2 = dmask2
        mt3 = ntmask3
    raw = raw.to(tl.float32)
    u = u.to(tl.float32)
    dout = dout.to(tl.float32)
    if HAS_BIAS:
        raw += bias
    if SOFTPLUS:
        delta = softplus(raw, FAST_MATH)
    else:
        delta = raw
    if MASKED:
        delta = tl.where(m2, delta, 0.0)  # past the end: Ā = 1, B̄u = 0
    delta_u = delta * u
    delta4 = delta[:, None, :, None]
    if B_SHARED:
        Bt = B_sh
    else:
        Bt = B_raw.to(tl.float32)[:, :, None, :]
    if C_SHARED:
        Ct = C_sh
    else:
        Ct = C_raw.to(tl.float32)[:, :, None, :]

    # recompute h_t inside the chunk from its checkpoint (h_start)
    dA = tl.exp2(delta4 * A2)  # (T, N_A, BD, N_B)
    dBu = delta_u[:, None, :, None] * Bt
    # (the checkpoint in its stored dtype until here: a conversion next to its prefetch would
    # wait for the load there)
    b = tl.where(t4 == 0, dBu + dA * h_start.to(tl.float32)[None], dBu)
    _, hs = tl.associative_scan((dA, b), 0, linear_combine)

    if HAS_Z:
        z = z.to(tl.float32)
        y = _sum_state(hs * Ct)
        if HAS_D:
            y += Dv * u
        sz = sigmoid(z)
        dy = dout * z * sz
        dz = (dout * y * sz * (1.0 + z * (1.0 - sz))).to(dz_ptrs.dtype.element_ty)
        _store2(dz_ptrs + tt2, dz, m2, MASKED, EVEN_D)
    else:
        dy = dout
    dy4 = dy[:, None, :, None]

    # adjoint: dh_t = C_t·dy_t + Ā_{t+1}·dh_{t+1}, the next chunk entering through `carry`
    g = Ct * dy4
    g = tl.where(t4 == T - 1, g + carry[None], g)
    _, _, dh = tl.associative_scan(
        (tl.flip(dA, 0), ones, tl.flip(g, 0)), 0, shifted_combine
    )  # time-flipped
    dh = tl.flip(dh, 0)
    carry = tl.sum(tl.where(t4 == 0, dA * dh, -0.0), 0)

    hdy = hs * dy4
    dhdu = dh * delta_u[:, None, :, None]
    dB = carry  # (placeholders when per step)
    dC = carry
    if C_SHARED:
        dC = tl.sum(hdy, 0)
    else:
        _put_per_step(dC_row, hdy, t0, tt3, mt3, nt3, seqlen, dstate, ATOMIC_BC, RS,
                      MASKED or not EVEN_N, FAST_MATH)  # fmt: skip
    if B_SHARED:
        dB = tl.sum(dhdu, 0)
    else:
        _put_per_step(dB_row, dhdu, t0, tt3, mt3, nt3, seqlen, dstate, ATOMIC_BC, RS,
                      MASKED or not EVEN_N, FAST_MATH)  # fmt: skip

    p = dh * (hs - dBu)  # dh·Ā_t·h_{t-1}
    dA_c = tl.sum(delta4 * p, 0)
    sw = _sum_state(dh * Bt)  # Σ_n dh·B_t: (T, BD)
    sp = _sum_state(p * A)
    du = delta * sw
    if HAS_D:
        du += Dv * dy
    ddelta = sp + u * sw
    if SOFTPLUS:
        ddelta = tl.where(raw > 20.0, ddelta, ddelta * sigmoid(raw))
    if MASKED:
        ddelta = tl.where(m2, ddelta, 0.0)
    _store2(du_ptrs + tt2, du.to(du_ptrs.dtype.element_ty), m2, MASKED, EVEN_D)
    _store2(ddelta_ptrs + tt2, ddelta.to(ddelta_ptrs.dtype.element_ty), m2, MASKED, EVEN_D)
    return carry, dA_c, dB, dC, tl.sum(dy * u, 0), tl.sum(ddelta, 0)


@triton.jit
def _end_state(h, raw, u, B_raw, bias, A2, B_sh, t4, HAS_BIAS: tl.constexpr,
               SOFTPLUS: tl.constexpr, B_SHARED: tl.constexpr, T: tl.constexpr,
               FAST_MATH: tl.constexpr):  # fmt: skip
    """The state after a whole chunk, from the state h before it (a checkpoint, in its dtype):
    the start state of a chunk that has no checkpoint of its own (R = 2)."""
    delta = _delta(raw, bias, HAS_BIAS, SOFTPLUS, FAST_MATH)
    return _last(_scan_chunk(h.to(tl.float32), delta, u, B_raw, A2, B_sh, t4, B_SHARED), t4, T)


@triton.jit
def _put_per_step(row, x, t0, tt3, mt3, nt3, seqlen, dstate, ATOMIC: tl.constexpr,
                  RS: tl.constexpr, MASK: tl.constexpr, FAST: tl.constexpr):  # fmt: skip
    """Add (atomics) or write (partials) Σ_d x of x (T, N_A, BD, N_B) at row[n, t0 + t] (row:
    this program's (dstate, L) slab of the dB or dC buffer). RS: a reduce-scatter over the
    channel lanes, each thread then puts its own few (step, state) values."""
    if RS:
        r, t_off, na_off = sum_channels_scattered(x, FAST)
        N_A: tl.constexpr = x.shape[1]
        N_B: tl.constexpr = x.shape[3]
        t = t0 + tl.arange(0, r.shape[0])[:, None, None, None] + t_off
        n = tl.arange(0, r.shape[1])[None, :, None, None] + na_off
        n += tl.arange(0, N_B)[None, None, None, :] * N_A
        _bc_put(row + n.to(tl.int64) * seqlen + t, r, (t < seqlen) & (n < dstate), ATOMIC, MASK)
    else:
        _bc_put(row + nt3.to(tl.int64) * seqlen + tt3, tl.sum(x, 2), mt3, ATOMIC, MASK)


@triton.jit
def _store2(ptrs, values, mask, MASKED: tl.constexpr, EVEN_D: tl.constexpr):
    if MASKED or not EVEN_D:
        tl.store(ptrs, values, mask=mask)
    else:
        tl.store(ptrs, values)


@triton.jit
def _adjoint_chunk(carry, dsum, raw, z, C_raw, dout, A2, bias, C_sh, t4, ones,
                   HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
                   C_SHARED: tl.constexpr, MASKED: tl.constexpr, m2, T: tl.constexpr,
                   FAST_MATH: tl.constexpr):  # fmt: skip
    """The adjoint alone over one chunk (it needs no state): the carry into the chunk before it,
    and ΣΔ over the chunk added to dsum (1, BD)."""
    raw = raw.to(tl.float32)
    if HAS_BIAS:
        raw += bias
    if SOFTPLUS:
        delta = softplus(raw, FAST_MATH)
    else:
        delta = raw
    if MASKED:
        delta = tl.where(m2, delta, 0.0)
    dsum += tl.sum(delta, 0)[None, :]
    dout = dout.to(tl.float32)
    if HAS_Z:
        z = z.to(tl.float32)
        dy = dout * z * sigmoid(z)
    else:
        dy = dout
    if C_SHARED:
        Ct = C_sh
    else:
        Ct = C_raw.to(tl.float32)[:, :, None, :]
    dA = tl.exp2(delta[:, None, :, None] * A2)
    g = Ct * dy[:, None, :, None]
    g = tl.where(t4 == T - 1, g + carry[None], g)
    _, _, dh = tl.associative_scan((tl.flip(dA, 0), ones, tl.flip(g, 0)), 0, shifted_combine)
    dh = tl.flip(dh, 0)
    return tl.sum(tl.where(t4 == 0, dA * dh, -0.0), 0), dsum


@triton.jit
def _load_dout(dout_ptrs, t0, t2, s_ot, seqlen, dmask2, MASKED: tl.constexpr,
               EVEN_D: tl.constexpr):  # fmt: skip
    """dout's (T, BD) tile of the chunk at t0 (MASKED: zero past seqlen)."""
    ptrs = dout_ptrs + (t0 + t2) * s_ot
    if MASKED:
        return tl.load(ptrs, mask=(t0 + t2 < seqlen) & dmask2, other=0.0)
    elif EVEN_D:
        return tl.load(ptrs)
    else:
        return tl.load(ptrs, mask=dmask2, other=0.0)


@triton.jit
def _adjoint_span(
    carry, r_lo, r_hi, n_chunks, tail, seqlen, t2, t3, t4, dmask2, ntmask3, delta_ptrs, u_ptrs,
    z_ptrs, C_ptrs, dout_ptrs, s_ot, A2, bias, C_sh, ones,
    HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, C_SHARED: tl.constexpr,
    EVEN_D: tl.constexpr, EVEN_N: tl.constexpr, T: tl.constexpr, FAST_MATH: tl.constexpr,
):  # fmt: skip
    """The adjoint alone over chunks [r_lo, r_hi) counted from the sequence's end (r = 0 is its
    partial last chunk when `tail`), from `carry`: the carry out of the span and its ΣΔ (1, BD)."""
    dsum = tl.zeros(dmask2.shape, dtype=tl.float32)
    for _tail in range(0, tail * (r_lo == 0) * (r_hi > 0)):
        t0 = (n_chunks - 1) * T
        m2 = (t0 + t2 < seqlen) & dmask2
        raw, _, z, _, C_raw = _load_chunk(
            t0, seqlen, t2, t3, dmask2, ntmask3, delta_ptrs, u_ptrs, z_ptrs, C_ptrs, C_ptrs,
            HAS_Z, True, True, C_SHARED, True, EVEN_D, EVEN_N,
        )  # fmt: skip
        dout = _load_dout(dout_ptrs, t0, t2, s_ot, seqlen, dmask2, True, EVEN_D)
        carry, dsum = _adjoint_chunk(carry, dsum, raw, z, C_raw, dout, A2, bias, C_sh, t4, ones,
                                     HAS_Z, HAS_BIAS, SOFTPLUS, C_SHARED, True, m2, T,
                                     FAST_MATH)  # fmt: skip
    for r in range(tl.maximum(r_lo, tail), r_hi):
        t0 = (n_chunks - 1 - r) * T
        raw, _, z, _, C_raw = _load_chunk(
            t0, seqlen, t2, t3, dmask2, ntmask3, delta_ptrs, u_ptrs, z_ptrs, C_ptrs, C_ptrs,
            HAS_Z, True, True, C_SHARED, False, EVEN_D, EVEN_N,
        )  # fmt: skip
        dout = _load_dout(dout_ptrs, t0, t2, s_ot, seqlen, dmask2, False, EVEN_D)
        carry, dsum = _adjoint_chunk(carry, dsum, raw, z, C_raw, dout, A2, bias, C_sh, t4, ones,
                                     HAS_Z, HAS_BIAS, SOFTPLUS, C_SHARED, False, dmask2, T,
                                     FAST_MATH)  # fmt: skip
    return carry, dsum


@triton.jit
def _scan_bwd_kernel(
    dout_ptr, dlast_ptr, u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, ck_ptr,
    du_ptr, ddelta_ptr, dz_ptr, dA_ptr, dBp_ptr, dCp_ptr, dD_ptr, dbias_ptr, dh0_ptr,
    sync_ptr, seg_ptr,
    batch, dim, dstate, seqlen, n_ck, n_seg, seg_len, balance, chained, B_per_group,
    C_per_group,
    s_ub, s_ud, s_db, s_dd, s_zb, s_zd, s_ob, s_od, s_ot,
    s_gb, s_gd,
    s_Bb, s_Bg, s_Bn, s_Cb, s_Cg, s_Cn,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_DLAST: tl.constexpr,
    SOFTPLUS: tl.constexpr, B_SHARED: tl.constexpr, C_SHARED: tl.constexpr,
    ATOMIC_BC: tl.constexpr, RS: tl.constexpr,
    BD: tl.constexpr, T: tl.constexpr, R: tl.constexpr, N: tl.constexpr, N_B: tl.constexpr,
    EVEN_D: tl.constexpr, EVEN_N: tl.constexpr, FAST_MATH: tl.constexpr,
):  # fmt: skip
    N_A: tl.constexpr = N // N_B
    n_dblk = tl.cdiv(dim, BD)
    pid_d, pid_b, k_seg = take_ticket(sync_ptr, n_seg, n_dblk, batch)
    seg = n_seg - 1 - k_seg  # the last segment first: the adjoint runs backwards in time
    d0 = pid_d * BD
    t_begin = seg * seg_len  # a multiple of CK = R·T
    t_end = tl.minimum(t_begin + seg_len, seqlen)
    c_begin = t_begin // T
    n_full = (t_end - t_begin) // T  # whole chunks (the partial one, if any, comes after them)
    has_tail = tl.cdiv(t_end - t_begin, T) - n_full  # 1 when the segment ends the sequence early

    # frames as in the forward kernel: (T, BD), (N_A, BD, N_B), (T, N_A, N_B), (T, 1, 1, 1)
    t2 = tl.arange(0, T)[:, None]
    dl2 = tl.arange(0, BD)[None, :]
    dmask2 = d0 + dl2 < dim
    n3 = tl.arange(0, N_A)[:, None, None] + tl.arange(0, N_B)[None, None, :] * N_A
    d3 = d0 + tl.arange(0, BD)[None, :, None]
    smask3 = (n3 < dstate) & (d3 < dim)
    state_off3 = d3 * dstate + n3
    t3 = tl.arange(0, T)[:, None, None]
    nt3 = tl.arange(0, N_A)[None, :, None] + tl.arange(0, N_B)[None, None, :] * N_A
    ntmask3 = nt3 < dstate
    t4 = t3[:, :, :, None]

    row_d = d0.to(tl.int64) + dl2.to(tl.int64)
    u_ptrs = u_ptr + pid_b * s_ub + row_d * s_ud
    delta_ptrs = delta_ptr + pid_b * s_db + row_d * s_dd
    z_ptrs = z_ptr + pid_b * s_zb + row_d * s_zd  # (z_ptr is u_ptr when no z)
    dout_ptrs = dout_ptr + pid_b * s_ob + row_d * s_od
    grad_row = pid_b * s_gb + row_d * s_gd  # du, ddelta, dz: in u's layout
    du_ptrs = du_ptr + grad_row
    ddelta_ptrs = ddelta_ptr + grad_row
    dz_ptrs = dz_ptr + grad_row

    A3 = tl.load(A_ptr + state_off3, mask=smask3, other=0.0)  # (N_A, BD, N_B)
    A = A3[None]
    A2_3 = A3 * LOG2E
    A2 = A2_3[None]
    bias = A  # (placeholders for absent inputs, never read)
    Dv = A
    B_sh = A
    C_sh = A
    if HAS_BIAS:
        bias = tl.load(bias_ptr + d0 + dl2, mask=dmask2, other=0.0)
    if HAS_D:
        Dv = tl.load(D_ptr + d0 + dl2, mask=dmask2, other=0.0)
    B_ptrs = B_ptr + pid_b * s_Bb + (d0 // B_per_group).to(tl.int64) * s_Bg + nt3 * s_Bn
    C_ptrs = C_ptr + pid_b * s_Cb + (d0 // C_per_group).to(tl.int64) * s_Cg + nt3 * s_Cn
    dB_row = dBp_ptr  # this program's (dstate, L) slab of the per-step dB, dC buffers
    dC_row = dCp_ptr
    if B_SHARED:
        B_sh = tl.load(B_ptr + d3 * s_Bg + n3 * s_Bn, mask=smask3, other=0.0).to(tl.float32)[None]
    else:
        slot = _bc_slot(pid_d, pid_b, batch, d0, dim, B_per_group, ATOMIC_BC)
        dB_row = dBp_ptr + slot * dstate * seqlen
    if C_SHARED:
        C_sh = tl.load(C_ptr + d3 * s_Cg + n3 * s_Cn, mask=smask3, other=0.0).to(tl.float32)[None]
    else:
        slot = _bc_slot(pid_d, pid_b, batch, d0, dim, C_per_group, ATOMIC_BC)
        dC_row = dCp_ptr + slot * dstate * seqlen

    slab = dim * dstate
    if HAS_DLAST:
        dlast = tl.load(dlast_ptr + pid_b * slab + state_off3, mask=smask3, other=0.0)
    else:
        dlast = tl.zeros((N_A, BD, N_B), dtype=tl.float32)
    ck_base = ck_ptr + pid_b * (n_ck + 1) * slab + state_off3
    ones = tl.full((T, N_A, BD, N_B), 1.0, dtype=tl.float32)
    flag = sync_ptr + 1 + (seg * batch + pid_b) * n_dblk + pid_d  # (segment, batch, block)
    seg_state = seg_ptr + (seg * batch + pid_b) * slab + state_off3  # its carry, when chained

    # 1.-3. the carry into the segment's last step (decoupled look-back, as in the forward but
    # backwards in time: segment s needs the adjoint flowing out of segment s + 1). Not chained:
    # the local pass (`common.local_range` in ticket order, chunks counted from the sequence's
    # end) runs the adjoint alone over this program's share from a zero carry, and the chain
    # gives this segment's carry from the one program k_seg - 1 publishes. `chained` (when every
    # segment's programs outnumber the resident ones): no such pass; s publishes after its full
    # backward (4.), which s - 1, started only once every program of s had started, seldom
    # waits for.
    carry = dlast
    if chained == 0:
        if n_seg > 1:
            # chunks counted from the sequence's end (r = 0: its last, partial chunk, if any):
            # segment n_seg - 1 has n_last of them, the others seg_chunks
            n_chunks = tl.cdiv(seqlen, T)
            tail = n_chunks - seqlen // T
            seg_chunks = seg_len // T
            n_last = n_chunks - (n_seg - 1) * seg_chunks
            lo, mid, hi = local_range(k_seg, n_seg, n_last, seg_chunks, balance)
            zero = tl.zeros((N_A, BD, N_B), dtype=tl.float32)
            c_a, dsum_a = _adjoint_span(
                zero, lo, mid, n_chunks, tail, seqlen, t2, t3, t4, dmask2, ntmask3, delta_ptrs,
                u_ptrs, z_ptrs, C_ptrs, dout_ptrs, s_ot, A2, bias, C_sh, ones, HAS_Z, HAS_BIAS,
                SOFTPLUS, C_SHARED, EVEN_D, EVEN_N, T, FAST_MATH,
            )  # fmt: skip
            c_b, dsum_b = _adjoint_span(
                zero, mid, hi, n_chunks, tail, seqlen, t2, t3, t4, dmask2, ntmask3, delta_ptrs,
                u_ptrs, z_ptrs, C_ptrs, dout_ptrs, s_ot, A2, bias, C_sh, ones, HAS_Z, HAS_BIAS,
                SOFTPLUS, C_SHARED, EVEN_D, EVEN_N, T, FAST_MATH,
            )  # fmt: skip
            carry = chain(k_seg, dlast, c_a, dsum_a, c_b, dsum_b, A2_3,
                          seg_ptr + pid_b * slab + state_off3, (pid_b * 0 + batch) * slab,
                          smask3, flag, flag + batch * n_dblk)  # fmt: skip
    elif seg < n_seg - 1:
        wait_for(flag + batch * n_dblk)  # segment s + 1 of this (batch, block)
        carry = tl.load(seg_state + batch * slab, mask=smask3, other=0.0, cache_modifier=".cg")

    # 4. the full backward over the segment, chunks in reverse: the partial last chunk (masked),
    # then whole chunks with the loads of the chunk before issued before the math of this one.
    dD_acc = tl.zeros((BD,), dtype=tl.float32)
    dbias_acc = tl.zeros((BD,), dtype=tl.float32)
    dA_acc = tl.zeros((N_A, BD, N_B), dtype=tl.float32)
    dB_acc = tl.zeros((N_A, BD, N_B), dtype=tl.float32)
    dC_acc = tl.zeros((N_A, BD, N_B), dtype=tl.float32)
    for _tail in range(0, has_tail):
        ci = c_begin + n_full
        t0 = ci * T
        raw, u, z, B_raw, C_raw = _load_chunk(
            t0, seqlen, t2, t3, dmask2, ntmask3, delta_ptrs, u_ptrs, z_ptrs, B_ptrs, C_ptrs,
            HAS_Z, True, B_SHARED, C_SHARED, True, EVEN_D, EVEN_N,
        )  # fmt: skip
        dout = _load_dout(dout_ptrs, t0, t2, s_ot, seqlen, dmask2, True, EVEN_D)
        h_start = tl.load(ck_base + (ci // R).to(tl.int64) * slab, mask=smask3, other=0.0)
        if R == 2:
            h_start = h_start.to(tl.float32)  # (one type on both sides of the branch)
            if ci % 2 == 1:  # the checkpoint is the start of the (whole) chunk before
                raw_p, u_p, _, B_p, _ = _load_chunk(
                    t0 - T, seqlen, t2, t3, dmask2, ntmask3, delta_ptrs, u_ptrs, z_ptrs, B_ptrs,
                    C_ptrs, False, False, B_SHARED, True, False, EVEN_D, EVEN_N,
                )  # fmt: skip
                h_start = _end_state(h_start, raw_p, u_p, B_p, bias, A2, B_sh, t4, HAS_BIAS,
                                     SOFTPLUS, B_SHARED, T, FAST_MATH)  # fmt: skip
        carry, dA_c, dB_c, dC_c, dD_c, dbias_c = _bwd_chunk(
            carry, h_start, t0, seqlen, raw, u, z, B_raw, C_raw, dout,
            A, A2, bias, Dv, B_sh, C_sh, t2, t3, t4, dmask2, ntmask3, ones,
            du_ptrs, ddelta_ptrs, dz_ptrs, dB_row, dC_row, nt3, dstate,
            HAS_D, HAS_Z, HAS_BIAS, SOFTPLUS, B_SHARED, C_SHARED, ATOMIC_BC, RS,
            True, EVEN_D, EVEN_N, T, FAST_MATH,
        )  # fmt: skip
        dA_acc += dA_c
        dB_acc += dB_c
        dC_acc += dC_c
        dD_acc += dD_c
        dbias_acc += dbias_c
    # (masked: the segment may hold no whole chunk)
    t_n = t_begin + tl.maximum(n_full - 1, 0) * T
    raw_n, u_n, z_n, B_n, C_n = _load_chunk(
        t_n, seqlen, t2, t3, dmask2, ntmask3, delta_ptrs, u_ptrs, z_ptrs, B_ptrs, C_ptrs,
        HAS_Z, True, B_SHARED, C_SHARED, True, EVEN_D, EVEN_N,
    )  # fmt: skip
    dout_n = _load_dout(dout_ptrs, t_n, t2, s_ot, seqlen, dmask2, True, EVEN_D)
    h_start_n = tl.load(ck_base + (t_n // T // R).to(tl.int64) * slab, mask=smask3, other=0.0)
    for c in range(0, n_full):
        ci = c_begin + n_full - 1 - c
        t0 = ci * T
        raw, u, z, B_raw, C_raw, dout, h_start = raw_n, u_n, z_n, B_n, C_n, dout_n, h_start_n
        tp = tl.maximum(ci - 1, c_begin) * T  # the chunk before (this one again at the start)
        raw_n, u_n, z_n, B_n, C_n = _load_chunk(
            tp, seqlen, t2, t3, dmask2, ntmask3, delta_ptrs, u_ptrs, z_ptrs, B_ptrs, C_ptrs,
            HAS_Z, True, B_SHARED, C_SHARED, False, EVEN_D, EVEN_N,
        )  # fmt: skip
        dout_n = _load_dout(dout_ptrs, tp, t2, s_ot, seqlen, dmask2, False, EVEN_D)
        h_start_n = tl.load(ck_base + (tp // T // R).to(tl.int64) * slab, mask=smask3, other=0.0)
        if R == 2:
            h_start = h_start.to(tl.float32)
            if ci % 2 == 1:  # h_start is the checkpoint before the chunk just loaded (ci - 1)
                h_start = _end_state(h_start, raw_n, u_n, B_n, bias, A2, B_sh, t4, HAS_BIAS,
                                     SOFTPLUS, B_SHARED, T, FAST_MATH)  # fmt: skip
        carry, dA_c, dB_c, dC_c, dD_c, dbias_c = _bwd_chunk(
            carry, h_start, t0, seqlen, raw, u, z, B_raw, C_raw, dout,
            A, A2, bias, Dv, B_sh, C_sh, t2, t3, t4, dmask2, ntmask3, ones,
            du_ptrs, ddelta_ptrs, dz_ptrs, dB_row, dC_row, nt3, dstate,
            HAS_D, HAS_Z, HAS_BIAS, SOFTPLUS, B_SHARED, C_SHARED, ATOMIC_BC, RS,
            False, EVEN_D, EVEN_N, T, FAST_MATH,
        )  # fmt: skip
        dA_acc += dA_c
        dB_acc += dB_c
        dC_acc += dC_c
        dD_acc += dD_c
        dbias_acc += dbias_c

    if (seg > 0) & (chained != 0):
        tl.store(seg_state, carry, mask=smask3)
        publish(flag)
    # per-(segment, batch, channel) partial sums, (n_seg + 1, batch, ...) with the extra row
    # zero (no dimension of size 1); the launcher sums over segments and batch
    _put_partials(seg * batch + pid_b, slab, dim, state_off3, smask3, d0, BD, dA_ptr, dBp_ptr,
                  dCp_ptr, dD_ptr, dbias_ptr, dA_acc, dB_acc, dC_acc, dD_acc, dbias_acc,
                  B_SHARED, C_SHARED)  # fmt: skip
    if seg == 0:
        tl.store(dh0_ptr + pid_b * slab + state_off3, carry, mask=smask3)
        zero3 = tl.zeros((N_A, BD, N_B), dtype=tl.float32)
        zero1 = tl.zeros((BD,), dtype=tl.float32)
        _put_partials(n_seg * batch + pid_b, slab, dim, state_off3, smask3, d0, BD, dA_ptr,
                      dBp_ptr, dCp_ptr, dD_ptr, dbias_ptr, zero3, zero3, zero3, zero1, zero1,
                      B_SHARED, C_SHARED)  # fmt: skip


@triton.jit
def _put_partials(part, slab, dim, state_off3, smask3, d0, BD: tl.constexpr, dA_ptr, dBp_ptr,
                  dCp_ptr, dD_ptr, dbias_ptr, dA, dB, dC, dD, dbias,
                  B_SHARED: tl.constexpr, C_SHARED: tl.constexpr):  # fmt: skip
    part3 = part * slab + state_off3
    tl.store(dA_ptr + part3, dA, mask=smask3)
    if B_SHARED:
        tl.store(dBp_ptr + part3, dB, mask=smask3)
    if C_SHARED:
        tl.store(dCp_ptr + part3, dC, mask=smask3)
    d1 = d0 + tl.arange(0, BD)
    tl.store(dD_ptr + part * dim + d1, dD, mask=d1 < dim)
    tl.store(dbias_ptr + part * dim + d1, dbias, mask=d1 < dim)


def _bc_grad(partial: Tensor, M: Tensor, batch: int, atomic: bool) -> Tensor:
    """Sum the kernel's partial dB or dC into M's shape and dtype."""
    if M.dim() == 2:  # shared: partial (n_seg + 1, batch, dim, dstate)
        return partial.sum((0, 1)).to(M.dtype)
    if atomic:  # already (batch, groups, dstate, L)
        return partial.to(M.dtype)
    groups = M.shape[1]
    n_dblk = partial.shape[0]  # (n_dblk, batch, dstate, L); blocks never straddle groups
    g = partial.view(groups, n_dblk // groups, batch, partial.shape[2], partial.shape[3]).sum(1)
    return g.permute(1, 0, 2, 3).to(M.dtype).contiguous()


def scan_bwd(
    dout: Tensor,
    dlast_state: Tensor | None,
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None,
    z: Tensor | None,
    delta_bias: Tensor | None,
    initial_state: Tensor | None,
    checkpoints: Tensor,
    delta_softplus: bool,
    deterministic: bool,
) -> tuple[Tensor, ...]:
    """Backward of scan_fwd. Returns (du, ddelta, dA, dB, dC, dD, dz, ddelta_bias,
    dinitial_state); dz is an empty tensor when z is None; dD and ddelta_bias are always (dim,).

    initial_state enters only through the checkpoints (the first one is it). deterministic=True:
    no float atomics (per-step dB, dC are summed over channel blocks by torch).
    """
    del initial_state
    batch, dim, seqlen = u.shape
    dstate = A.shape[1]
    ck = checkpoint_interval()
    n_ck = cdiv(seqlen, ck)
    cfg = bwd_config(dim, dstate, groups_of(B, C))
    if ck not in (cfg.T, 2 * cfg.T):
        raise ValueError(f"checkpoint interval {ck} must be the chunk {cfg.T} or twice it")
    assert not cfg.rs or interpreting() or (cfg.num_warps == 1 and cfg.BD * cfg.N_B == 32), (
        "the reduce-scatter of dB/dC works across the lanes of one warp: BD * N_B == 32"
    )
    n_dblk = cdiv(dim, cfg.BD)
    # segments start on a checkpoint (a chunk's start state is its checkpoint or comes from the
    # chunk before it, in the same segment). Chained (1 or 0, from sizes alone: no guard) once a
    # segment's programs fill the GPU: no adjoint-only pass. Otherwise the balanced look-back
    # (cfg.balance) takes at most one wave of programs: its local pass grows with the segments.
    programs, resident = batch * n_dblk, bwd_resident(u.device)
    chained = torch.sym_min(1, programs // resident)
    cap = torch.sym_max(chained * (1 << 30), resident // programs) if cfg.balance else None
    n_seg, seg_len = segments(programs, seqlen, dataclasses.replace(cfg, T=ck), cap)
    dev, f32 = u.device, torch.float32
    # du, ddelta, dz in u's layout (as the op's fake says), unit stride in time: a model that
    # keeps (channels, batch, L) memory gets its gradients that way, with no transposing copy
    du = torch.empty_like(u)
    ddelta = torch.empty_like(u)
    dz = torch.empty_like(u) if z is not None else u.new_empty((0,))
    # per-(segment, batch) partial sums; row n_seg is zero (never a dimension of size 1)
    dA_part = torch.empty((n_seg + 1, batch, dim, dstate), dtype=f32, device=dev)
    dD_part = torch.empty((n_seg + 1, batch, dim), dtype=f32, device=dev)
    dbias_part = torch.empty((n_seg + 1, batch, dim), dtype=f32, device=dev)
    dinitial_state = torch.empty((batch, dim, dstate), dtype=f32, device=dev)
    # the look-back: ticket counter and flags; the carry each segment publishes
    sync = torch.zeros((1 + (n_seg + 1) * batch * n_dblk,), dtype=torch.int32, device=dev)
    seg_carry = torch.empty((n_seg + 1, batch, dim, dstate), dtype=f32, device=dev)

    atomic = not deterministic and bc_atomics()

    def bc_partial(M: Tensor) -> Tensor:
        if M.dim() == 2:
            return torch.empty((n_seg + 1, batch, dim, dstate), dtype=f32, device=dev)
        if atomic:
            return torch.zeros((batch, M.shape[1], dstate, seqlen), dtype=f32, device=dev)
        return torch.empty((n_dblk, batch, dstate, seqlen), dtype=f32, device=dev)

    dB_part, dC_part = bc_partial(B), bc_partial(C)
    B_in, C_in = B, C  # (the gradients take these dtypes)
    B, C = stage_bc(B, cfg), stage_bc(C, cfg)
    A = A.contiguous()
    D = D.contiguous() if D is not None else None
    delta_bias = delta_bias.contiguous() if delta_bias is not None else None
    dlast_state = dlast_state.contiguous() if dlast_state is not None else None
    B_shared, B_per_group, s_Bb, s_Bg, s_Bn = bc_args(B, dim)
    C_shared, C_per_group, s_Cb, s_Cg, s_Cn = bc_args(C, dim)
    z_ = z if z is not None else u
    N = next_power_of_2(dstate)
    grid = (n_seg * batch * n_dblk,)
    launcher(_scan_bwd_kernel, u)[grid](
        dout, dlast_state if dlast_state is not None else A,
        u, delta, A, B, C, D if D is not None else A, z_,
        delta_bias if delta_bias is not None else A, checkpoints,
        du, ddelta, dz if z is not None else du, dA_part, dB_part, dC_part, dD_part, dbias_part,
        dinitial_state, sync, seg_carry,
        batch, dim, dstate, seqlen, n_ck, n_seg, seg_len, int(cfg.balance), chained, B_per_group,
        C_per_group,
        u.stride(0), u.stride(1), delta.stride(0), delta.stride(1), z_.stride(0), z_.stride(1),
        dout.stride(0), dout.stride(1), dout.stride(2),
        du.stride(0), du.stride(1),
        s_Bb, s_Bg, s_Bn, s_Cb, s_Cg, s_Cn,
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
        HAS_DLAST=dlast_state is not None, SOFTPLUS=bool(delta_softplus),
        B_SHARED=B_shared, C_SHARED=C_shared, ATOMIC_BC=atomic, RS=cfg.rs and not traced(u),
        BD=cfg.BD, T=cfg.T, R=ck // cfg.T, N=N, N_B=cfg.N_B,
        EVEN_D=dim % cfg.BD == 0, EVEN_N=dstate == N, FAST_MATH=not interpreting(),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    dA = dA_part.sum((0, 1))
    dB = _bc_grad(dB_part, B_in, batch, atomic)
    dC = _bc_grad(dC_part, C_in, batch, atomic)
    dD = dD_part.sum((0, 1))  # the gradient at D (or at D = 0 when D is None)
    ddelta_bias = dbias_part.sum((0, 1))
    return du, ddelta, dA, dB, dC, dD, dz, ddelta_bias, dinitial_state
