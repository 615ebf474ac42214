"""The selective scan forward: one fused Triton kernel and its launcher.

A program owns a block of BD channels of one batch element over one segment of the sequence and
walks it in chunks of T steps: load (T, BD) tiles of delta, u, z and (T, N) tiles of B, C; form
Ā = exp2(Δ·A·log2 e) and B̄u = Δ·B·u over (T, N_A, BD, N_B) (see common.py for the frame); fold
the carried state into the first step (b_0 += Ā_0·h_prev) and scan along T; contract with C; add
D·u; gate with silu(z); store the (T, BD) output. The state before every CK steps is written as a
checkpoint for the backward (unless no backward can follow: STORE_CK); the expanded
(batch, dim, L, dstate) tensor never leaves registers.

Segments (when batch · channel blocks alone would leave the GPU idle, e.g. batch 1 at long L):
the sequence is cut into n_seg segments processed by separate programs, chained by a decoupled
look-back in the same launch. The program of segment s

    1. scans its share of the chunks before the last segment from the zero state
       (`common.local_range`): about (n_seg - 1) / n_seg of a segment, from inside segment
       s - 1 to inside segment s, with a snapshot where segment s starts;
    2. waits for the program of segment s - 1 to publish the true state where its share ends;
    3. from it, its own start state and the true state at the end of its share (h =
       exp2(A·log2e·ΣΔ)·h_start + h_loc), which it publishes;
    4. runs the full forward over its segment from its start state.

All programs scan the same number of steps in 1., so they reach the chain together; with the
local pass by segment (program s scanning segment s - 1: balance=False in the config, for
comparison) program 0 idles through it.

Where the number of segments is known at launch (eager, or static shapes) the default is the
HEAD look-back instead (`common.segments_with_head`): segment 0 is 1.7 times as long as the
others and its program scans nothing before its full forward, during which it publishes its
state seg_len steps before its end; program s > 0 scans the seg_len steps before its segment
meanwhile, waits for program s - 1's state where they start, and publishes its own start
state. Less local work than the balanced look-back, and all programs still end together
(perf/NOTES.md, Run 21: 3.05 -> 2.84 ms at 1 x 4096 x 65536).

Programs take tickets from an atomic counter, segment-major, so a program only waits for
programs that started before it (no deadlock whatever order the hardware starts programs in).
Inside a segment, full chunks run without time masks (vectorized loads); the sequence's last,
partial chunk runs masked.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .common import (
    LOG2E,
    cdiv,
    chain,
    checkpoint_dtype,
    checkpoint_interval,
    fwd_config,
    interpreting,
    launch_options,
    launcher,
    linear_combine,
    local_range,
    next_power_of_2,
    publish,
    segments_with_head,
    sigmoid,
    softplus,
    stage_bc,
    take_ticket,
)


@triton.jit
def _load_chunk(
    t0, seqlen, t2, t3, dmask2, ntmask3, delta_ptrs, u_ptrs, z_ptrs, B_ptrs, C_ptrs,
    LOAD_Z: tl.constexpr, LOAD_C: tl.constexpr, B_SHARED: tl.constexpr, C_SHARED: tl.constexpr,
    MASKED: tl.constexpr, EVEN_D: tl.constexpr, EVEN_N: tl.constexpr,
):  # fmt: skip
    """The raw tiles of the chunk starting at t0: delta, u, z (T, BD) and B, C (T, N_A, N_B).
    MASKED: zero past seqlen (and before 0); else the chunk lies inside the sequence and only
    padded channels and states are masked (none when EVEN_D and EVEN_N), so loads vectorize.
    Absent inputs (z when not LOAD_Z, C when not LOAD_C, shared B/C) come back as zeros."""
    tt2 = t0 + t2
    tt3 = t0 + t3
    if MASKED:
        m2 = (tt2 >= 0) & (tt2 < seqlen) & dmask2
        m3 = ntmask3 & (tt3 >= 0) & (tt3 < seqlen)
    else:
        m2 = dmask2
        m3 = ntmask3
    if MASKED or not EVEN_D:
        delta = tl.load(delta_ptrs + tt2, mask=m2, other=0.0)
        u = tl.load(u_ptrs + tt2, mask=m2, other=0.0)
        if LOAD_Z:
            z = tl.load(z_ptrs + tt2, mask=m2, other=0.0)
        else:
            z = u
    else:
        delta = tl.load(delta_ptrs + tt2)
        u = tl.load(u_ptrs + tt2)
        if LOAD_Z:
            z = tl.load(z_ptrs + tt2)
        else:
            z = u
    zero3 = tl.zeros(t3.shape, dtype=tl.float32) + tl.zeros(ntmask3.shape, dtype=tl.float32)
    if B_SHARED:
        Bc = zero3
    elif MASKED or not EVEN_N:
        Bc = tl.load(B_ptrs + tt3, mask=m3, other=0.0)
    else:
        Bc = tl.load(B_ptrs + tt3)
    if C_SHARED or not LOAD_C:
        Cc = zero3
    elif MASKED or not EVEN_N:
        Cc = tl.load(C_ptrs + tt3, mask=m3, other=0.0)
    else:
        Cc = tl.load(C_ptrs + tt3)
    return delta, u, z, Bc, Cc


@triton.jit
def _delta(delta, bias, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, FAST_MATH: tl.constexpr):
    """Δ (T, BD) in fp32 from the raw tile: + delta_bias, then softplus."""
    delta = delta.to(tl.float32)
    if HAS_BIAS:
        delta += bias
    if SOFTPLUS:
        delta = softplus(delta, FAST_MATH)
    return delta


@triton.jit
def _delta_split(delta, bias, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
                 FAST_MATH: tl.constexpr):  # fmt: skip
    """`_delta` with the softplus of each (step, channel) computed once: the two state lanes
    that hold a channel take half of the steps each and share them by a sum over the lanes
    (the other lane adds an exact 0). Each thread then runs T/2 softplus (2 MUFU operations
    each) instead of T: triton 3.6, 16-step chunks, 176 -> 160 MUFU and 1204 -> 1177
    instructions per chunk (perf/NOTES.md, Run 20). Needs N_B = 2, even T."""
    T: tl.constexpr = delta.shape[0]
    BD: tl.constexpr = delta.shape[1]
    d = delta.to(tl.float32)
    if HAS_BIAS:
        d += bias
    if SOFTPLUS:
        lo, hi = tl.split(tl.permute(tl.reshape(d, (2, T // 2, BD)), (1, 2, 0)))
        lane = tl.arange(0, 2)[None, None, :]  # (T/2, BD, 2) takes the layout's state lanes
        sp = softplus(tl.where(lane == 0, lo[:, :, None], hi[:, :, None]), FAST_MATH)
        lo = tl.sum(tl.where(lane == 0, sp, 0.0), 2)
        hi = tl.sum(tl.where(lane == 1, sp, 0.0), 2)
        d = tl.reshape(tl.permute(tl.join(lo, hi), (2, 0, 1)), (T, BD))
    return d


@triton.jit
def _delta_of(delta, bias, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
              FAST_MATH: tl.constexpr, SP_SPLIT: tl.constexpr):  # fmt: skip
    if SP_SPLIT:
        return _delta_split(delta, bias, HAS_BIAS, SOFTPLUS, FAST_MATH)
    else:
        return _delta(delta, bias, HAS_BIAS, SOFTPLUS, FAST_MATH)


@triton.jit
def _scan_chunk(h, delta, u, B_raw, A2, B_sh, t4, B_SHARED: tl.constexpr):
    """h_t over the chunk, (T, N_A, BD, N_B), from the state h before it and Δ (T, BD).
    Zero Δ (masked steps) gives Ā = 1, B̄u = 0: the state carries on."""
    if B_SHARED:
        Bt = B_sh
    else:
        Bt = B_raw.to(tl.float32)[:, :, None, :]
    dA = tl.exp2(delta[:, None, :, None] * A2)  # Ā
    dBu = (delta * u.to(tl.float32))[:, None, :, None] * Bt  # B̄u
    dBu = tl.where(t4 == 0, dBu + dA * h[None], dBu)
    _, hs = tl.associative_scan((dA, dBu), 0, linear_combine)
    return hs


@triton.jit
def _last(hs, t4, T: tl.constexpr):
    """The state after the chunk's last step (a register move: positions are compile-time)."""
    return tl.sum(tl.where(t4 == T - 1, hs, -0.0), 0)


@triton.jit
def _store_checkpoint(ck_base, ci, h, slab, n3, smask3, n_ck, MASKED: tl.constexpr):
    """Checkpoint ci (the state before step ci · CK) in the checkpoints' dtype."""
    h = h.to(ck_base.dtype.element_ty)
    if MASKED:
        tl.store(ck_base + ci.to(tl.int64) * slab, h, mask=smask3 & (ci + 0 * n3 < n_ck))
    else:
        tl.store(ck_base + ci.to(tl.int64) * slab, h, mask=smask3)


@triton.jit
def _fwd_chunk(
    h, c, t0, seqlen, n_ck, delta, u, z, B_raw, C_raw, bias, Dv, A2, B_sh, C_sh,
    t2, t4, dmask2, n3, smask3, ck_base, slab, out_ptrs,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    B_SHARED: tl.constexpr, C_SHARED: tl.constexpr, MASKED: tl.constexpr, EVEN_D: tl.constexpr,
    T: tl.constexpr, CK: tl.constexpr, FAST_MATH: tl.constexpr, STORE_CK: tl.constexpr,
    SP_SPLIT: tl.constexpr,
):  # fmt: skip
    """The full forward over one chunk (c: its index, t0 its first step): checkpoints (when
    STORE_CK), output. Returns the state after the chunk."""
    delta = _delta_of(delta, bias, HAS_BIAS, SOFTPLUS, FAST_MATH, SP_SPLIT)
    if MASKED:
        m2 = (t0 + t2 < seqlen) & dmask2
        delta = tl.where(m2, delta, 0.0)  # past the end: Ā = 1, B̄u = 0
    u = u.to(tl.float32)
    hs = _scan_chunk(h, delta, u, B_raw, A2, B_sh, t4, B_SHARED)
    # checkpoints: the state before steps t0, t0 + CK, ... (CK < T), or before this chunk when
    # it starts one of every CK // T chunks (CK >= T)
    if not STORE_CK:
        pass
    elif CK >= T:
        if c % (CK // T) == 0:
            _store_checkpoint(ck_base, c // (CK // T), h, slab, n3, smask3, n_ck, MASKED)
    else:
        for j in tl.static_range(T // CK):
            if j == 0:
                hj = h
            else:
                hj = tl.sum(tl.where(t4 == j * CK - 1, hs, -0.0), 0)
            _store_checkpoint(ck_base, c * (T // CK) + j, hj, slab, n3, smask3, n_ck, MASKED)
    if C_SHARED:
        Ct = C_sh
    else:
        Ct = C_raw.to(tl.float32)[:, :, None, :]
    y = tl.sum(tl.sum(hs * Ct, 1), 2)  # (T, BD): in-thread over N_A first, then lanes
    if HAS_D:
        y += Dv * u
    if HAS_Z:
        z = z.to(tl.float32)
        y = y * z * sigmoid(z)
    y = y.to(out_ptrs.dtype.element_ty)
    if MASKED:
        tl.store(out_ptrs + (t0 + t2), y, mask=(t0 + t2 < seqlen) & dmask2)
    elif EVEN_D:
        tl.store(out_ptrs + (t0 + t2), y)
    else:
        tl.store(out_ptrs + (t0 + t2), y, mask=dmask2)
    return _last(hs, t4, T)


@triton.jit
def _local_span(
    h, c_lo, c_hi, t2, t3, t4, dmask2, ntmask3, delta_ptrs, u_ptrs, B_ptrs, bias, A2, B_sh,
    HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, B_SHARED: tl.constexpr, EVEN_D: tl.constexpr,
    EVEN_N: tl.constexpr, T: tl.constexpr, FAST_MATH: tl.constexpr, PIPE: tl.constexpr,
    SP_SPLIT: tl.constexpr,
):  # fmt: skip
    """The states alone over the whole chunks [c_lo, c_hi) from h: the end state and ΣΔ (1, BD)."""
    dsum = tl.zeros(dmask2.shape, dtype=tl.float32)
    for c in tl.range(c_lo, c_hi, num_stages=PIPE):  # PIPE > 1: cp.async stages
        delta, u, _, B_raw, _ = _load_chunk(
            c * T, 0, t2, t3, dmask2, ntmask3, delta_ptrs, u_ptrs, u_ptrs, B_ptrs, B_ptrs,
            False, False, B_SHARED, True, False, EVEN_D, EVEN_N,
        )  # fmt: skip
        delta = _delta_of(delta, bias, HAS_BIAS, SOFTPLUS, FAST_MATH, SP_SPLIT)
        dsum += tl.sum(delta, 0)[None, :]
        h = _last(_scan_chunk(h, delta, u, B_raw, A2, B_sh, t4, B_SHARED), t4, T)
    return h, dsum


@triton.jit
def _scan_fwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, h0_ptr,
    out_ptr, last_ptr, ck_ptr, carry_ptr, sync_ptr,
    batch, dim, dstate, seqlen, n_ck, n_seg, seg_len, head_len, balance, B_per_group,
    C_per_group,
    s_ub, s_ud, s_db, s_dd, s_zb, s_zd, s_ob, s_od,
    s_Bb, s_Bg, s_Bn, s_Cb, s_Cg, s_Cn,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_H0: tl.constexpr,
    SOFTPLUS: tl.constexpr, B_SHARED: tl.constexpr, C_SHARED: tl.constexpr,
    BD: tl.constexpr, T: tl.constexpr, CK: tl.constexpr, N: tl.constexpr, N_B: tl.constexpr,
    EVEN_D: tl.constexpr, EVEN_N: tl.constexpr, FAST_MATH: tl.constexpr, STORE_CK: tl.constexpr,
    PIPE: tl.constexpr, SP_SPLIT: tl.constexpr, HEAD: tl.constexpr,
):  # fmt: skip
    N_A: tl.constexpr = N // N_B
    n_dblk = tl.cdiv(dim, BD)
    pid_d, pid_b, seg = take_ticket(sync_ptr, n_seg, n_dblk, batch)
    d0 = pid_d * BD
    # segment 0 has head_len steps (seg_len unless HEAD), the others seg_len (multiples of T)
    t_begin = tl.minimum(seg, 1) * (head_len + (seg - 1) * seg_len)
    t_end = tl.minimum(head_len + seg * seg_len, seqlen)
    n_full = (t_end - t_begin) // T  # chunks of the segment that need no time mask

    # (T, BD) frame for per-(channel, step) values
    t2 = tl.arange(0, T)[:, None]
    dl2 = tl.arange(0, BD)[None, :]
    dmask2 = d0 + dl2 < dim
    # (N_A, BD, N_B) frame for per-(channel, state) values
    n3 = tl.arange(0, N_A)[:, None, None] + tl.arange(0, N_B)[None, None, :] * N_A
    d3 = d0 + tl.arange(0, BD)[None, :, None]
    smask3 = (n3 < dstate) & (d3 < dim)
    state_off3 = d3 * dstate + n3  # offset inside one (dim, dstate) slab
    # (T, N_A, N_B) frame for per-(step, state) values: B and C tiles are loaded in it and only
    # then expanded to 4-d. A 4-d load would anchor the whole computation to the load's coalesced
    # layout (lanes along T) and turn the scan into shuffles.
    t3 = tl.arange(0, T)[:, None, None]
    nt3 = tl.arange(0, N_A)[None, :, None] + tl.arange(0, N_B)[None, None, :] * N_A
    ntmask3 = nt3 < dstate
    t4 = t3[:, :, :, None]  # (T, 1, 1, 1)

    delta_ptrs = delta_ptr + pid_b * s_db + d0.to(tl.int64) * s_dd + dl2.to(tl.int64) * s_dd
    u_ptrs = u_ptr + pid_b * s_ub + d0.to(tl.int64) * s_ud + dl2.to(tl.int64) * s_ud
    z_ptrs = z_ptr + pid_b * s_zb + d0.to(tl.int64) * s_zd + dl2.to(tl.int64) * s_zd
    out_ptrs = out_ptr + pid_b * s_ob + d0.to(tl.int64) * s_od + dl2.to(tl.int64) * s_od
    B_ptrs = B_ptr + pid_b * s_Bb + (d0 // B_per_group).to(tl.int64) * s_Bg + nt3 * s_Bn
    C_ptrs = C_ptr + pid_b * s_Cb + (d0 // C_per_group).to(tl.int64) * s_Cg + nt3 * s_Cn

    A2_3 = tl.load(A_ptr + state_off3, mask=smask3, other=0.0) * LOG2E  # (N_A, BD, N_B)
    A2 = A2_3[None]
    bias = A2  # (placeholders for absent inputs, never read)
    Dv = A2
    B_sh = A2
    C_sh = A2
    if HAS_BIAS:
        bias = tl.load(bias_ptr + d0 + dl2, mask=dmask2, other=0.0)  # (1, BD)
    if HAS_D:
        Dv = tl.load(D_ptr + d0 + dl2, mask=dmask2, other=0.0)  # (1, BD)
    if B_SHARED:
        B_sh = tl.load(B_ptr + d3 * s_Bg + n3 * s_Bn, mask=smask3, other=0.0).to(tl.float32)[None]
    if C_SHARED:
        C_sh = tl.load(C_ptr + d3 * s_Cg + n3 * s_Cn, mask=smask3, other=0.0).to(tl.float32)[None]

    slab = dim * dstate
    ck_base = ck_ptr + pid_b * (n_ck + 1) * slab + state_off3
    if HAS_H0:
        h0 = tl.load(h0_ptr + pid_b * slab + state_off3, mask=smask3, other=0.0)
    else:
        h0 = tl.zeros((N_A, BD, N_B), dtype=tl.float32)
    flag = sync_ptr + 1 + (seg * batch + pid_b) * n_dblk + pid_d  # (segment, batch, block)

    # the states in the scan's layout (a slice of the (T, ...) frame) from the start: the local
    # pass then carries them without a layout exchange per chunk (Triton 3.6: 459 -> 428
    # instructions per chunk there)
    h0 = _last(tl.zeros((T, N_A, BD, N_B), dtype=tl.float32) + h0[None], t4, T)
    h = h0
    zero = _last(tl.zeros((T, N_A, BD, N_B), dtype=tl.float32), t4, T)
    pub_c = -1  # HEAD: the chunk of segment 0 before which its program publishes its state
    if HEAD:
        # 1.-3. (segment s > 0) the seg_len steps before the segment from the zero state, then
        # the true state where they start: segment s - 1's start state, or for s = 1 the state
        # segment 0's program publishes seg_len steps before its end, during its full forward
        if seg > 0:
            c_mid = t_begin // T
            h_a, dsum_a = _local_span(
                zero, c_mid - seg_len // T, c_mid, t2, t3, t4, dmask2, ntmask3, delta_ptrs,
                u_ptrs, B_ptrs, bias, A2, B_sh, HAS_BIAS, SOFTPLUS, B_SHARED, EVEN_D, EVEN_N, T,
                FAST_MATH, PIPE, SP_SPLIT,
            )  # fmt: skip
            h = chain(seg, h0, h_a, dsum_a, zero, tl.zeros(dmask2.shape, dtype=tl.float32), A2_3,
                      carry_ptr + pid_b * slab + state_off3, (pid_b * 0 + batch) * slab, smask3,
                      flag, flag - batch * n_dblk)  # fmt: skip
        elif n_seg > 1:
            pub_c = (head_len - seg_len) // T
    elif n_seg > 1:
        # 1. the local pass (segments 0 .. n_seg - 2 are whole chunks inside the sequence: no
        # time masks): chunks [lo, mid) and [mid, hi), each from the zero state
        seg_chunks = seg_len // T
        lo, mid, hi = local_range(seg, n_seg, seg_chunks, seg_chunks, balance)
        h_a, dsum_a = _local_span(
            zero, lo, mid, t2, t3, t4, dmask2, ntmask3, delta_ptrs, u_ptrs, B_ptrs, bias, A2,
            B_sh, HAS_BIAS, SOFTPLUS, B_SHARED, EVEN_D, EVEN_N, T, FAST_MATH, PIPE, SP_SPLIT,
        )  # fmt: skip
        h_b, dsum_b = _local_span(
            zero, mid, hi, t2, t3, t4, dmask2, ntmask3, delta_ptrs, u_ptrs, B_ptrs, bias, A2,
            B_sh, HAS_BIAS, SOFTPLUS, B_SHARED, EVEN_D, EVEN_N, T, FAST_MATH, PIPE, SP_SPLIT,
        )  # fmt: skip
        # 2.-3. the chain: this segment's start state
        h = chain(seg, h0, h_a, dsum_a, h_b, dsum_b, A2_3, carry_ptr + pid_b * slab + state_off3,
                  (pid_b * 0 + batch) * slab, smask3, flag, flag - batch * n_dblk)  # fmt: skip

    # 4. the full forward over the segment, whole chunks first. PIPE > 1: Triton's pipeliner
    # copies the tiles of the next PIPE - 1 chunks into shared memory (cp.async) while this one
    # computes, and reads them from there straight into the compute layout. PIPE = 1: software
    # pipelining by hand, the loads of chunk c + 1 issued into registers before the math of
    # chunk c, then exchanged through shared memory.
    c_begin = t_begin // T
    if PIPE == 1:
        delta_n, u_n, z_n, B_n, C_n = _load_chunk(  # masked: the segment may hold no full chunk
            t_begin, seqlen, t2, t3, dmask2, ntmask3, delta_ptrs, u_ptrs, z_ptrs, B_ptrs, C_ptrs,
            HAS_Z, True, B_SHARED, C_SHARED, True, EVEN_D, EVEN_N,
        )  # fmt: skip
    c_first = 0
    if HEAD:
        if PIPE > 1:  # (PIPE = 1: in the loop below)
            # segment 0's program: the chunks before it publishes in a loop of their own (a
            # publication inside the pipelined loop costs every chunk registers)
            c_first = tl.maximum(pub_c, 0)
            for c in tl.range(0, c_first, num_stages=PIPE):
                t0 = t_begin + c * T
                delta, u, z, B_raw, C_raw = _load_chunk(
                    t0, seqlen, t2, t3, dmask2, ntmask3, delta_ptrs, u_ptrs, z_ptrs, B_ptrs,
                    C_ptrs, HAS_Z, True, B_SHARED, C_SHARED, False, EVEN_D, EVEN_N,
                )  # fmt: skip
                h = _fwd_chunk(
                    h, c_begin + c, t0, seqlen, n_ck, delta, u, z, B_raw, C_raw, bias, Dv, A2,
                    B_sh, C_sh, t2, t4, dmask2, n3, smask3, ck_base, slab, out_ptrs,
                    HAS_D, HAS_Z, HAS_BIAS, SOFTPLUS, B_SHARED, C_SHARED, False, EVEN_D, T, CK,
                    FAST_MATH, STORE_CK, SP_SPLIT,
                )  # fmt: skip
            if pub_c >= 0:  # the state segment 1's program waits for
                tl.store(carry_ptr + pid_b * slab + state_off3, h, mask=smask3)
                publish(flag)
    for c in tl.range(c_first, n_full, num_stages=PIPE):
        t0 = t_begin + c * T
        if HEAD:
            if PIPE == 1:
                if c == pub_c:
                    tl.store(carry_ptr + pid_b * slab + state_off3, h, mask=smask3)
                    publish(flag)
        if PIPE > 1:
            delta, u, z, B_raw, C_raw = _load_chunk(
                t0, seqlen, t2, t3, dmask2, ntmask3, delta_ptrs, u_ptrs, z_ptrs, B_ptrs, C_ptrs,
                HAS_Z, True, B_SHARED, C_SHARED, False, EVEN_D, EVEN_N,
            )  # fmt: skip
        else:
            delta, u, z, B_raw, C_raw = delta_n, u_n, z_n, B_n, C_n
            # the next full chunk (the last one again at the end: in bounds, never masked)
            delta_n, u_n, z_n, B_n, C_n = _load_chunk(
                t_begin + tl.minimum(c + 1, n_full - 1) * T, seqlen, t2, t3, dmask2, ntmask3,
                delta_ptrs, u_ptrs, z_ptrs, B_ptrs, C_ptrs,
                HAS_Z, True, B_SHARED, C_SHARED, False, EVEN_D, EVEN_N,
            )  # fmt: skip
        h = _fwd_chunk(
            h, c_begin + c, t0, seqlen, n_ck, delta, u, z, B_raw, C_raw, bias, Dv, A2, B_sh, C_sh,
            t2, t4, dmask2, n3, smask3, ck_base, slab, out_ptrs,
            HAS_D, HAS_Z, HAS_BIAS, SOFTPLUS, B_SHARED, C_SHARED, False, EVEN_D, T, CK, FAST_MATH,
            STORE_CK, SP_SPLIT,
        )  # fmt: skip
    for c in range(n_full, tl.cdiv(t_end - t_begin, T)):  # the partial last chunk, if any
        t0 = t_begin + c * T
        delta, u, z, B_raw, C_raw = _load_chunk(
            t0, seqlen, t2, t3, dmask2, ntmask3, delta_ptrs, u_ptrs, z_ptrs, B_ptrs, C_ptrs,
            HAS_Z, True, B_SHARED, C_SHARED, True, EVEN_D, EVEN_N,
        )  # fmt: skip
        h = _fwd_chunk(
            h, c_begin + c, t0, seqlen, n_ck, delta, u, z, B_raw, C_raw, bias, Dv, A2, B_sh, C_sh,
            t2, t4, dmask2, n3, smask3, ck_base, slab, out_ptrs,
            HAS_D, HAS_Z, HAS_BIAS, SOFTPLUS, B_SHARED, C_SHARED, True, EVEN_D, T, CK, FAST_MATH,
            STORE_CK, SP_SPLIT,
        )  # fmt: skip

    if seg == n_seg - 1:
        tl.store(last_ptr + pid_b * slab + state_off3, h, mask=smask3)
        if STORE_CK:
            # the extra last slot (n_ck may be a constant: the JIT specializes arguments equal
            # to 1)
            tl.store(ck_base + (pid_b * 0 + n_ck) * slab, h.to(ck_base.dtype.element_ty),
                     mask=smask3)  # fmt: skip


def bc_args(M: Tensor, dim: int) -> tuple[bool, int, int, int, int]:
    """(shared, channels per group, stride batch, stride group-or-channel, stride state)."""
    if M.dim() == 2:  # shared (dim, dstate)
        return True, dim, 0, M.stride(0), M.stride(1)
    return False, dim // M.shape[1], M.stride(0), M.stride(1), M.stride(2)


def groups_of(*Ms: Tensor) -> tuple[int, ...]:
    return tuple(1 if M.dim() == 2 else M.shape[1] for M in Ms)


def scan_fwd(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None,
    z: Tensor | None,
    delta_bias: Tensor | None,
    initial_state: Tensor | None,
    delta_softplus: bool,
    save_checkpoints: bool = True,
) -> tuple[Tensor, Tensor, Tensor]:
    """Forward scan on CUDA (or under TRITON_INTERPRET=1 on CPU).

    u, delta, z (batch, dim, L) with stride(-1) == 1; A (dim, dstate) fp32; B, C (dim, dstate) or
    (batch, groups, dstate, L); D, delta_bias (dim,); initial_state (batch, dim, dstate).
    Returns out (batch, dim, L) in u.dtype (in u's memory layout when u is dense), last_state
    (batch, dim, dstate) fp32, and the checkpoints (batch, cdiv(L, CK) + 1, dim, dstate) in
    `checkpoint_dtype(u.dtype)`: the state before steps 0, CK, 2·CK, ..., then the last state.
    (The extra slot keeps that dimension from being 1 for short sequences: the compiler would
    guard on a size-1 dimension and specialize a dynamic seqlen.) Without save_checkpoints (no
    backward will run: inference) the kernel writes none and the checkpoints are
    (batch, 0, dim, dstate).
    """
    batch, dim, seqlen = u.shape
    dstate = A.shape[1]
    ck = checkpoint_interval()
    n_ck = cdiv(seqlen, ck)
    cfg = fwd_config(dim, dstate, groups_of(B, C))
    assert cfg.T % ck == 0 or ck % cfg.T == 0, "chunks and checkpoint intervals must nest"
    n_dblk = cdiv(dim, cfg.BD)
    n_seg, seg_len, head_len, head = segments_with_head(batch * n_dblk, seqlen, cfg)
    B, C = stage_bc(B, cfg), stage_bc(C, cfg)
    # out in u's layout when u is dense (a model that keeps (channels, batch, L) in memory gets
    # its output that way too, ready for the next GEMM), else contiguous; unit stride along L.
    out = torch.empty_like(u, memory_format=torch.preserve_format)
    last_state = torch.empty((batch, dim, dstate), dtype=torch.float32, device=u.device)
    checkpoints = torch.empty(
        (batch, n_ck + 1 if save_checkpoints else 0, dim, dstate),
        dtype=checkpoint_dtype(u.dtype), device=u.device,
    )  # fmt: skip
    # the true states the look-back's programs publish, in fp32 (transient; n_seg + 1 rows, as
    # the partial sums' buffers: a size that is never 1, and no comparison of a symbolic n_seg)
    carry = torch.empty((n_seg + 1, batch, dim, dstate), dtype=torch.float32, device=u.device)
    # ticket counter, then one flag per (segment, batch, channel block)
    sync = torch.zeros((1 + (n_seg + 1) * batch * n_dblk,), dtype=torch.int32, device=u.device)
    A = A.contiguous()
    D = D.contiguous() if D is not None else None
    delta_bias = delta_bias.contiguous() if delta_bias is not None else None
    initial_state = initial_state.contiguous() if initial_state is not None else None
    B_shared, B_per_group, s_Bb, s_Bg, s_Bn = bc_args(B, dim)
    C_shared, C_per_group, s_Cb, s_Cg, s_Cn = bc_args(C, dim)
    z_ = z if z is not None else u
    N = next_power_of_2(dstate)
    grid = (n_seg * batch * n_dblk,)
    launcher(_scan_fwd_kernel, u)[grid](
        u, delta, A, B, C,
        D if D is not None else A, z_,
        delta_bias if delta_bias is not None else A,
        initial_state if initial_state is not None else A,
        # (without checkpoints the kernel stores none: A stands in, as for absent inputs; an
        # empty tensor's null pointer would fail the launcher's check)
        out, last_state, checkpoints if save_checkpoints else A, carry, sync,
        batch, dim, dstate, seqlen, n_ck, n_seg, seg_len, head_len, int(cfg.balance),
        B_per_group, C_per_group,
        u.stride(0), u.stride(1), delta.stride(0), delta.stride(1), z_.stride(0), z_.stride(1),
        out.stride(0), out.stride(1),
        s_Bb, s_Bg, s_Bn, s_Cb, s_Cg, s_Cn,
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
        HAS_H0=initial_state is not None, SOFTPLUS=bool(delta_softplus),
        B_SHARED=B_shared, C_SHARED=C_shared,
        BD=cfg.BD, T=cfg.T, CK=ck, N=N, N_B=cfg.N_B,
        EVEN_D=dim % cfg.BD == 0, EVEN_N=dstate == N, FAST_MATH=not interpreting(),
        STORE_CK=bool(save_checkpoints), PIPE=cfg.pipe,
        SP_SPLIT=cfg.sp_split and cfg.N_B == 2 and cfg.T % 2 == 0,
        HEAD=head,
        **launch_options(cfg, u, n_seg * batch * n_dblk),
    )  # fmt: skip
    return out, last_state, checkpoints
