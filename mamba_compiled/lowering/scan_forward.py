"""The selective scan forward: one fused Triton kernel and its launcher.

One program per (block of BD channels, batch element) walks the sequence in chunks of T steps:
load (T, BD) tiles of delta, u, z and (T, N) tiles of B, C; form Ā = exp2(Δ·A·log2 e) and
B̄u = Δ·B·u over (T, N_A, BD, N_B) (see common.py for the frame); fold the carried state into the
first step (b_0 += Ā_0·h_prev) and scan along T; contract with C; add D·u; gate with silu(z);
store the (T, BD) output. The state after each CK steps is written as a checkpoint for the
backward; the expanded (batch, dim, L, dstate) tensor never leaves registers.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import wrap_triton

from .common import (
    LOG2E,
    checkpoint_interval,
    fwd_config,
    interpreting,
    linear_combine,
    sigmoid,
    softplus,
)


@triton.jit
def _load_chunk(
    t0, seqlen, t2, t3, dmask2, ntmask3, delta_ptrs, u_ptrs, z_ptrs, B_ptrs, C_ptrs,
    HAS_Z: tl.constexpr, B_SHARED: tl.constexpr, C_SHARED: tl.constexpr,
):  # fmt: skip
    """The raw tiles of the chunk starting at t0: delta, u, z (T, BD) and B, C (T, N_A, N_B),
    zero past the end (and zero-size placeholders for absent inputs are never loaded)."""
    tt2 = t0 + t2
    m2 = (tt2 >= 0) & (tt2 < seqlen) & dmask2  # t0 < 0 or t0 >= seqlen: nothing loads
    delta = tl.load(delta_ptrs + tt2, mask=m2, other=0.0)
    u = tl.load(u_ptrs + tt2, mask=m2, other=0.0)
    if HAS_Z:
        z = tl.load(z_ptrs + tt2, mask=m2, other=0.0)
    else:
        z = u
    tt3 = t0 + t3
    mt3 = ntmask3 & (tt3 >= 0) & (tt3 < seqlen)
    if B_SHARED:
        Bc = tl.zeros(t3.shape, dtype=tl.float32) + tl.zeros(ntmask3.shape, dtype=tl.float32)
    else:
        Bc = tl.load(B_ptrs + tt3, mask=mt3, other=0.0)
    if C_SHARED:
        Cc = tl.zeros(t3.shape, dtype=tl.float32) + tl.zeros(ntmask3.shape, dtype=tl.float32)
    else:
        Cc = tl.load(C_ptrs + tt3, mask=mt3, other=0.0)
    return delta, u, z, Bc, Cc


@triton.jit
def _scan_fwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, h0_ptr,
    out_ptr, last_ptr, ck_ptr,
    dim, dstate, seqlen, n_ck, B_per_group, C_per_group,
    s_ub, s_ud, s_db, s_dd, s_zb, s_zd,
    s_Bb, s_Bg, s_Bn, s_Cb, s_Cg, s_Cn,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_H0: tl.constexpr,
    SOFTPLUS: tl.constexpr, B_SHARED: tl.constexpr, C_SHARED: tl.constexpr,
    BD: tl.constexpr, T: tl.constexpr, CK: tl.constexpr, N: tl.constexpr, N_B: tl.constexpr,
    FAST_MATH: tl.constexpr,
):  # fmt: skip
    N_A: tl.constexpr = N // N_B
    pid_d = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    d0 = pid_d * BD

    # (T, BD) frame for per-(channel, step) values
    t2 = tl.arange(0, T)[:, None]
    dl2 = tl.arange(0, BD)[None, :]
    dmask2 = d0 + dl2 < dim
    # (N_A, BD, N_B) frame for per-(channel, state) values
    n3 = tl.arange(0, N_A)[:, None, None] * N_B + tl.arange(0, N_B)[None, None, :]
    d3 = d0 + tl.arange(0, BD)[None, :, None]
    smask3 = (n3 < dstate) & (d3 < dim)
    state_off3 = d3 * dstate + n3  # offset inside one (dim, dstate) slab
    # (T, N_A, N_B) frame for per-(step, state) values: B and C tiles are loaded in it and only
    # then expanded to 4-d. A 4-d load would anchor the whole computation to the load's coalesced
    # layout (lanes along T) and turn the scan into shuffles.
    t3 = tl.arange(0, T)[:, None, None]
    nt3 = tl.arange(0, N_A)[None, :, None] * N_B + tl.arange(0, N_B)[None, None, :]
    ntmask3 = nt3 < dstate
    t4 = t3[:, :, :, None]  # (T, 1, 1, 1)

    u_base = u_ptr + pid_b * s_ub + d0.to(tl.int64) * s_ud
    delta_base = delta_ptr + pid_b * s_db + d0.to(tl.int64) * s_dd
    out_base = out_ptr + (pid_b * dim + d0) * seqlen
    row_u = dl2.to(tl.int64) * s_ud
    row_delta = dl2.to(tl.int64) * s_dd
    row_out = dl2.to(tl.int64) * seqlen
    z_base = z_ptr + pid_b * s_zb + d0.to(tl.int64) * s_zd  # (z_ptr is u_ptr when no z)
    row_z = dl2.to(tl.int64) * s_zd

    A2 = tl.load(A_ptr + state_off3, mask=smask3, other=0.0) * LOG2E  # (N_A, BD, N_B)
    A2 = A2[None]
    if HAS_BIAS:
        bias = tl.load(bias_ptr + d0 + dl2, mask=dmask2, other=0.0)  # (1, BD)
    if HAS_D:
        Dv = tl.load(D_ptr + d0 + dl2, mask=dmask2, other=0.0)  # (1, BD)
    if B_SHARED:
        B_sh = tl.load(B_ptr + d3 * s_Bg + n3 * s_Bn, mask=smask3, other=0.0).to(tl.float32)[None]
    B_base = B_ptr + pid_b * s_Bb + (d0 // B_per_group).to(tl.int64) * s_Bg + nt3 * s_Bn
    if C_SHARED:
        C_sh = tl.load(C_ptr + d3 * s_Cg + n3 * s_Cn, mask=smask3, other=0.0).to(tl.float32)[None]
    C_base = C_ptr + pid_b * s_Cb + (d0 // C_per_group).to(tl.int64) * s_Cg + nt3 * s_Cn

    slab = dim * dstate
    if HAS_H0:
        h = tl.load(h0_ptr + pid_b * slab + state_off3, mask=smask3, other=0.0)
    else:
        h = tl.zeros((N_A, BD, N_B), dtype=tl.float32)
    ck_base = ck_ptr + pid_b * (n_ck + 1) * slab + state_off3

    # Software pipelining by hand: the loads of chunk c + 1 are issued before the math of chunk
    # c, so their latency hides behind it (few warps fit per SM at these register counts).
    delta_n, u_n, z_n, B_n, C_n = _load_chunk(
        0, seqlen, t2, t3, dmask2, ntmask3, delta_base + row_delta, u_base + row_u, z_base + row_z,
        B_base, C_base, HAS_Z, B_SHARED, C_SHARED,
    )  # fmt: skip
    for c in range(0, tl.cdiv(seqlen, T)):
        t0 = c * T
        tt2 = t0 + t2
        m2 = (tt2 < seqlen) & dmask2
        delta, u, z, B_raw, C_raw = delta_n, u_n, z_n, B_n, C_n
        delta_n, u_n, z_n, B_n, C_n = _load_chunk(
            t0 + T, seqlen, t2, t3, dmask2, ntmask3, delta_base + row_delta, u_base + row_u,
            z_base + row_z, B_base, C_base, HAS_Z, B_SHARED, C_SHARED,
        )  # fmt: skip
        delta = delta.to(tl.float32)
        u = u.to(tl.float32)
        if HAS_BIAS:
            delta += bias
        if SOFTPLUS:
            delta = softplus(delta, FAST_MATH)
        delta = tl.where(m2, delta, 0.0)  # past the end: Ā = 1, B̄u = 0, the state carries on

        if B_SHARED:
            Bt = B_sh
        else:
            Bt = B_raw.to(tl.float32)[:, :, None, :]
        dA = tl.exp2(delta[:, None, :, None] * A2)  # Ā: (T, N_A, BD, N_B)
        dBu = (delta * u)[:, None, :, None] * Bt  # B̄u
        dBu = tl.where(t4 == 0, dBu + dA * h[None], dBu)
        _, hs = tl.associative_scan((dA, dBu), 0, linear_combine)  # h_t

        # checkpoints: the state before steps t0, t0 + CK, ... (positions are compile-time
        # constants in registers, so the masked sums below fold to register moves)
        for j in tl.static_range(T // CK):
            if j == 0:
                hj = h
            else:
                hj = tl.sum(tl.where(t4 == j * CK - 1, hs, -0.0), 0)
            ci = c * (T // CK) + j
            ck_mask = smask3 & (ci + 0 * n3 < n_ck)  # (as a tensor: the interpreter wants one)
            tl.store(ck_base + ci.to(tl.int64) * slab, hj, mask=ck_mask)
        h = tl.sum(tl.where(t4 == T - 1, hs, -0.0), 0)

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
        tl.store(out_base + row_out + tt2, y.to(out_ptr.dtype.element_ty), mask=m2)

    tl.store(last_ptr + pid_b * slab + state_off3, h, mask=smask3)
    ck_last = ck_ptr + (pid_b * (n_ck + 1) + n_ck) * slab + state_off3
    tl.store(ck_last, h, mask=smask3)  # the extra last slot


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
) -> tuple[Tensor, Tensor, Tensor]:
    """Forward scan on CUDA (or under TRITON_INTERPRET=1 on CPU).

    u, delta, z (batch, dim, L) with stride(-1) == 1; A (dim, dstate) fp32; B, C (dim, dstate) or
    (batch, groups, dstate, L); D, delta_bias (dim,); initial_state (batch, dim, dstate).
    Returns out (batch, dim, L) in u.dtype, last_state (batch, dim, dstate) fp32, and the
    checkpoints (batch, cdiv(L, CK) + 1, dim, dstate) fp32: the state before steps 0, CK, 2·CK,
    ..., then the last state. (The extra slot keeps that dimension from being 1 for short
    sequences: the compiler would guard on a size-1 dimension and specialize a dynamic seqlen.)
    """
    batch, dim, seqlen = u.shape
    dstate = A.shape[1]
    ck = checkpoint_interval()
    n_ck = triton.cdiv(seqlen, ck)
    cfg = fwd_config(dim, dstate, groups_of(B, C))
    assert cfg.T % ck == 0, "the forward chunk must be a multiple of the checkpoint interval"
    out = torch.empty((batch, dim, seqlen), dtype=u.dtype, device=u.device)
    last_state = torch.empty((batch, dim, dstate), dtype=torch.float32, device=u.device)
    checkpoints = torch.empty((batch, n_ck + 1, dim, dstate), dtype=torch.float32, device=u.device)
    A = A.contiguous()
    D = D.contiguous() if D is not None else None
    delta_bias = delta_bias.contiguous() if delta_bias is not None else None
    initial_state = initial_state.contiguous() if initial_state is not None else None
    B_shared, B_per_group, s_Bb, s_Bg, s_Bn = bc_args(B, dim)
    C_shared, C_per_group, s_Cb, s_Cg, s_Cn = bc_args(C, dim)
    z_ = z if z is not None else u
    grid = (triton.cdiv(dim, cfg.BD), batch)
    wrap_triton(_scan_fwd_kernel)[grid](
        u, delta, A, B, C,
        D if D is not None else A, z_,
        delta_bias if delta_bias is not None else A,
        initial_state if initial_state is not None else A,
        out, last_state, checkpoints,
        dim, dstate, seqlen, n_ck, B_per_group, C_per_group,
        u.stride(0), u.stride(1), delta.stride(0), delta.stride(1), z_.stride(0), z_.stride(1),
        s_Bb, s_Bg, s_Bn, s_Cb, s_Cg, s_Cn,
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
        HAS_H0=initial_state is not None, SOFTPLUS=bool(delta_softplus),
        B_SHARED=B_shared, C_SHARED=C_shared,
        BD=cfg.BD, T=cfg.T, CK=ck, N=triton.next_power_of_2(dstate), N_B=cfg.N_B,
        FAST_MATH=not interpreting(),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return out, last_state, checkpoints
