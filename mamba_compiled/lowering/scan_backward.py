"""The selective scan backward: one fused Triton kernel and its launcher.

One program per (block of BD channels, batch element) walks the chunks of CK steps backwards.
For each chunk it reloads the inputs, recomputes the states h_t from the chunk's checkpoint
(forward scan, as in the forward kernel), then runs the adjoint recurrence

    dh_t = C_t·dy_t + Ā_{t+1}·dh_{t+1}            (a reverse scan; dh after the end = dlast_state)

and forms every gradient from h_t and dh_t in registers, using Ā_t·h_{t-1} = h_t − B̄_t·u_t so
that h_{t-1} is never needed:

    du_t    = Δ_t·Σ_n dh·B_t + D·dy_t
    dΔ_t    = Σ_n A·dh·(h_t − B̄u_t) + u_t·Σ_n dh·B_t     (then through softplus and the bias)
    dA     += Σ_t Δ_t·dh·(h_t − B̄u_t)
    dB_t    = Σ_d dh·Δ_t·u_t,   dC_t = Σ_d h_t·dy_t
    dz_t    = dout·y_t·σ(z)(1 + z(1 − σ(z))),  dy_t = dout·silu(z_t)

Sums over time stay in registers; sums over batch are written per batch element and summed by
the launcher. Sums over channels (dB, dC per step) are reduced inside each channel block, then
either added with float atomics into one fp32 buffer (default: little memory) or, with
deterministic=True, written per block and summed by the launcher (bit-identical across runs,
(dim / BD) times the memory of dB).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import wrap_triton

from .common import (
    LOG2E,
    bc_atomics,
    bwd_config,
    checkpoint_interval,
    interpreting,
    linear_combine,
    shifted_combine,
    sigmoid,
    softplus,
)
from .scan_forward import _load_chunk, bc_args, groups_of


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
def _bc_put(ptrs, values, mask, ATOMIC: tl.constexpr):
    if ATOMIC:
        tl.atomic_add(ptrs, values, mask=mask, sem="relaxed")
    else:
        tl.store(ptrs, values, mask=mask)


@triton.jit
def _scan_bwd_kernel(
    dout_ptr, dlast_ptr, u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, ck_ptr,
    du_ptr, ddelta_ptr, dz_ptr, dA_ptr, dBp_ptr, dCp_ptr, dD_ptr, dbias_ptr, dh0_ptr,
    dim, dstate, seqlen, n_ck, B_per_group, C_per_group,
    s_ub, s_ud, s_db, s_dd, s_zb, s_zd, s_ob, s_od, s_ot,
    s_Bb, s_Bg, s_Bn, s_Cb, s_Cg, s_Cn,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_DLAST: tl.constexpr,
    SOFTPLUS: tl.constexpr, B_SHARED: tl.constexpr, C_SHARED: tl.constexpr,
    ATOMIC_BC: tl.constexpr,
    BD: tl.constexpr, T: tl.constexpr, N: tl.constexpr, N_B: tl.constexpr,
    FAST_MATH: tl.constexpr,
):  # fmt: skip
    N_A: tl.constexpr = N // N_B
    pid_d = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    batch = tl.num_programs(1)
    d0 = pid_d * BD

    # frames as in the forward kernel: (T, BD), (N_A, BD, N_B), (T, N_A, N_B), (T, 1, 1, 1)
    t2 = tl.arange(0, T)[:, None]
    dl2 = tl.arange(0, BD)[None, :]
    dmask2 = d0 + dl2 < dim
    n3 = tl.arange(0, N_A)[:, None, None] * N_B + tl.arange(0, N_B)[None, None, :]
    d3 = d0 + tl.arange(0, BD)[None, :, None]
    smask3 = (n3 < dstate) & (d3 < dim)
    state_off3 = d3 * dstate + n3
    t3 = tl.arange(0, T)[:, None, None]
    nt3 = tl.arange(0, N_A)[None, :, None] * N_B + tl.arange(0, N_B)[None, None, :]
    ntmask3 = nt3 < dstate
    t4 = t3[:, :, :, None]

    u_base = u_ptr + pid_b * s_ub + d0.to(tl.int64) * s_ud
    delta_base = delta_ptr + pid_b * s_db + d0.to(tl.int64) * s_dd
    dout_base = dout_ptr + pid_b * s_ob + d0.to(tl.int64) * s_od
    grad_base = (pid_b * dim + d0) * seqlen  # du, ddelta, dz: fresh (batch, dim, L)
    row_u = dl2.to(tl.int64) * s_ud
    row_delta = dl2.to(tl.int64) * s_dd
    row_dout = dl2.to(tl.int64) * s_od
    row_grad = dl2.to(tl.int64) * seqlen
    z_base = z_ptr + pid_b * s_zb + d0.to(tl.int64) * s_zd  # (z_ptr is u_ptr when no z)
    row_z = dl2.to(tl.int64) * s_zd

    A = tl.load(A_ptr + state_off3, mask=smask3, other=0.0)[None]  # (1, N_A, BD, N_B)
    A2 = A * LOG2E
    if HAS_BIAS:
        bias = tl.load(bias_ptr + d0 + dl2, mask=dmask2, other=0.0)
    if HAS_D:
        Dv = tl.load(D_ptr + d0 + dl2, mask=dmask2, other=0.0)
    dD_acc = tl.zeros((BD,), dtype=tl.float32)
    dbias_acc = tl.zeros((BD,), dtype=tl.float32)
    dA_acc = tl.zeros((N_A, BD, N_B), dtype=tl.float32)
    B_base = B_ptr + pid_b * s_Bb + (d0 // B_per_group).to(tl.int64) * s_Bg + nt3 * s_Bn
    C_base = C_ptr + pid_b * s_Cb + (d0 // C_per_group).to(tl.int64) * s_Cg + nt3 * s_Cn
    if B_SHARED:
        B_sh = tl.load(B_ptr + d3 * s_Bg + n3 * s_Bn, mask=smask3, other=0.0).to(tl.float32)[None]
        dB_acc = tl.zeros((N_A, BD, N_B), dtype=tl.float32)
    else:
        slot = _bc_slot(pid_d, pid_b, batch, d0, dim, B_per_group, ATOMIC_BC)
        dB_base = dBp_ptr + (slot * dstate + nt3) * seqlen
    if C_SHARED:
        C_sh = tl.load(C_ptr + d3 * s_Cg + n3 * s_Cn, mask=smask3, other=0.0).to(tl.float32)[None]
        dC_acc = tl.zeros((N_A, BD, N_B), dtype=tl.float32)
    else:
        slot = _bc_slot(pid_d, pid_b, batch, d0, dim, C_per_group, ATOMIC_BC)
        dC_base = dCp_ptr + (slot * dstate + nt3) * seqlen

    slab = dim * dstate
    if HAS_DLAST:
        carry = tl.load(dlast_ptr + pid_b * slab + state_off3, mask=smask3, other=0.0)
    else:
        carry = tl.zeros((N_A, BD, N_B), dtype=tl.float32)  # Ā_{t+1}·dh_{t+1} after the chunk
    ck_base = ck_ptr + pid_b * (n_ck + 1) * slab + state_off3
    ones = tl.full((T, N_A, BD, N_B), 1.0, dtype=tl.float32)

    # Software pipelining by hand, as in the forward: the loads of the chunk before (in time)
    # are issued before the math of this one.
    t_last = (n_ck - 1) * T
    raw_n, u_n, z_n, B_n, C_n = _load_chunk(
        t_last, seqlen, t2, t3, dmask2, ntmask3, delta_base + row_delta, u_base + row_u,
        z_base + row_z, B_base, C_base, HAS_Z, B_SHARED, C_SHARED,
    )  # fmt: skip
    dout_n = tl.load(
        dout_base + row_dout + (t_last + t2) * s_ot, mask=(t_last + t2 < seqlen) & dmask2, other=0.0
    )
    h_start_n = tl.load(ck_base + (n_ck - 1 + 0 * pid_b) * slab, mask=smask3, other=0.0)
    for c in range(0, n_ck):
        ci = n_ck - 1 - c
        t0 = ci * T
        tt2 = t0 + t2
        m2 = (tt2 < seqlen) & dmask2
        raw, u, z, B_raw, C_raw, dout, h_start = raw_n, u_n, z_n, B_n, C_n, dout_n, h_start_n
        tp = t0 - T  # the previous chunk (nothing loads when tp < 0: every mask is false)
        raw_n, u_n, z_n, B_n, C_n = _load_chunk(
            tp, seqlen, t2, t3, dmask2, ntmask3, delta_base + row_delta, u_base + row_u,
            z_base + row_z, B_base, C_base, HAS_Z, B_SHARED, C_SHARED,
        )  # fmt: skip
        dout_n = tl.load(
            dout_base + row_dout + (tp + t2) * s_ot, mask=(tp + t2 >= 0) & dmask2, other=0.0
        )
        h_start_n = tl.load(
            ck_base + (ci - 1 + 0 * pid_b) * slab, mask=smask3 & (ci - 1 + 0 * n3 >= 0), other=0.0
        )

        raw = raw.to(tl.float32)
        u = u.to(tl.float32)
        dout = dout.to(tl.float32)
        if HAS_BIAS:
            raw += bias
        if SOFTPLUS:
            delta = softplus(raw, FAST_MATH)
        else:
            delta = raw
        delta = tl.where(m2, delta, 0.0)  # past the end: Ā = 1, B̄u = 0
        delta_u = delta * u
        delta4 = delta[:, None, :, None]

        tt3 = t0 + t3
        mt3 = ntmask3 & (tt3 < seqlen)
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
        b = tl.where(t4 == 0, dBu + dA * h_start[None], dBu)
        _, hs = tl.associative_scan((dA, b), 0, linear_combine)

        if HAS_Z:
            z = z.to(tl.float32)
            y = _sum_state(hs * Ct)
            if HAS_D:
                y += Dv * u
            sz = sigmoid(z)
            dy = dout * z * sz
            dz = dout * y * sz * (1.0 + z * (1.0 - sz))
            tl.store(dz_ptr + grad_base + row_grad + tt2, dz.to(dz_ptr.dtype.element_ty), mask=m2)
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
        if C_SHARED:
            dC_acc += tl.sum(hdy, 0)
        else:
            _bc_put(dC_base + tt3, tl.sum(hdy, 2), mt3, ATOMIC_BC)
        if B_SHARED:
            dB_acc += tl.sum(dhdu, 0)
        else:
            _bc_put(dB_base + tt3, tl.sum(dhdu, 2), mt3, ATOMIC_BC)

        p = dh * (hs - dBu)  # dh·Ā_t·h_{t-1}
        dA_acc += tl.sum(delta4 * p, 0)
        sw = _sum_state(dh * Bt)  # Σ_n dh·B_t: (T, BD)
        sp = _sum_state(p * A)
        du = delta * sw
        if HAS_D:
            du += Dv * dy
        dD_acc += tl.sum(dy * u, 0)
        ddelta = sp + u * sw
        if SOFTPLUS:
            ddelta = tl.where(raw > 20.0, ddelta, ddelta * sigmoid(raw))
        ddelta = tl.where(m2, ddelta, 0.0)
        dbias_acc += tl.sum(ddelta, 0)
        tl.store(du_ptr + grad_base + row_grad + tt2, du.to(du_ptr.dtype.element_ty), mask=m2)
        tl.store(
            ddelta_ptr + grad_base + row_grad + tt2,
            ddelta.to(ddelta_ptr.dtype.element_ty),
            mask=m2,
        )

    # per-(batch, channel) partial sums; the launcher sums over batch
    part3 = pid_b * slab + state_off3
    tl.store(dh0_ptr + part3, carry, mask=smask3)
    tl.store(dA_ptr + part3, dA_acc, mask=smask3)
    if B_SHARED:
        tl.store(dBp_ptr + part3, dB_acc, mask=smask3)
    if C_SHARED:
        tl.store(dCp_ptr + part3, dC_acc, mask=smask3)
    d1 = d0 + tl.arange(0, BD)
    tl.store(dD_ptr + pid_b * dim + d1, dD_acc, mask=d1 < dim)
    tl.store(dbias_ptr + pid_b * dim + d1, dbias_acc, mask=d1 < dim)


def _bc_grad(partial: Tensor, M: Tensor, batch: int, atomic: bool) -> Tensor:
    """Sum the kernel's partial dB or dC into M's shape and dtype."""
    if M.dim() == 2:  # shared: partial (batch, dim, dstate)
        return partial.sum(0).to(M.dtype)
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
    n_ck = triton.cdiv(seqlen, ck)
    cfg = bwd_config(dim, dstate, groups_of(B, C))
    assert cfg.T == ck, "the backward chunk is the checkpoint interval"
    n_dblk = triton.cdiv(dim, cfg.BD)
    dev, f32 = u.device, torch.float32
    du = torch.empty((batch, dim, seqlen), dtype=u.dtype, device=dev)
    ddelta = torch.empty((batch, dim, seqlen), dtype=u.dtype, device=dev)
    dz = torch.empty((batch, dim, seqlen) if z is not None else (0,), dtype=u.dtype, device=dev)
    dA_part = torch.empty((batch, dim, dstate), dtype=f32, device=dev)
    dD_part = torch.empty((batch, dim), dtype=f32, device=dev)
    dbias_part = torch.empty((batch, dim), dtype=f32, device=dev)
    dinitial_state = torch.empty((batch, dim, dstate), dtype=f32, device=dev)

    atomic = not deterministic and bc_atomics()

    def bc_partial(M: Tensor) -> Tensor:
        if M.dim() == 2:
            return torch.empty((batch, dim, dstate), dtype=f32, device=dev)
        if atomic:
            return torch.zeros((batch, M.shape[1], dstate, seqlen), dtype=f32, device=dev)
        return torch.empty((n_dblk, batch, dstate, seqlen), dtype=f32, device=dev)

    dB_part, dC_part = bc_partial(B), bc_partial(C)
    A = A.contiguous()
    D = D.contiguous() if D is not None else None
    delta_bias = delta_bias.contiguous() if delta_bias is not None else None
    dlast_state = dlast_state.contiguous() if dlast_state is not None else None
    B_shared, B_per_group, s_Bb, s_Bg, s_Bn = bc_args(B, dim)
    C_shared, C_per_group, s_Cb, s_Cg, s_Cn = bc_args(C, dim)
    z_ = z if z is not None else u
    grid = (n_dblk, batch)
    wrap_triton(_scan_bwd_kernel)[grid](
        dout, dlast_state if dlast_state is not None else A,
        u, delta, A, B, C, D if D is not None else A, z_,
        delta_bias if delta_bias is not None else A, checkpoints,
        du, ddelta, dz if z is not None else du, dA_part, dB_part, dC_part, dD_part, dbias_part,
        dinitial_state,
        dim, dstate, seqlen, n_ck, B_per_group, C_per_group,
        u.stride(0), u.stride(1), delta.stride(0), delta.stride(1), z_.stride(0), z_.stride(1),
        dout.stride(0), dout.stride(1), dout.stride(2),
        s_Bb, s_Bg, s_Bn, s_Cb, s_Cg, s_Cn,
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
        HAS_DLAST=dlast_state is not None, SOFTPLUS=bool(delta_softplus),
        B_SHARED=B_shared, C_SHARED=C_shared, ATOMIC_BC=atomic,
        BD=cfg.BD, T=ck, N=triton.next_power_of_2(dstate), N_B=cfg.N_B,
        FAST_MATH=not interpreting(),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    dA = dA_part.sum(0)
    dB = _bc_grad(dB_part, B, batch, atomic)
    dC = _bc_grad(dC_part, C, batch, atomic)
    dD = dD_part.sum(0)  # the gradient at D (or at D = 0 when D is None)
    ddelta_bias = dbias_part.sum(0)
    return du, ddelta, dA, dB, dC, dD, dz, ddelta_bias, dinitial_state
