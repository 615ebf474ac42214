"""CPU kernels for the selective scan, in plain torch.

The recurrence runs as a loop over time steps, each step one fused multiply-add over the whole
(batch, dim, dstate) state. Time is cut into chunks of CHUNK steps; everything per step and state,
the (time, batch, dim, dstate) tensors, exists for one chunk at a time, so memory stays bounded for
any sequence length. The forward saves the state at each chunk's start; the backward walks the
chunks in reverse and recomputes each chunk's states from its checkpoint.

Layout inside a chunk: (T, b, d, n), time first, so that one step is a contiguous slice. A channel
dimension d that reads B or C by group is viewed as (G, d // G) to broadcast against them.
Accumulation is float32 (float64 for float64 inputs) whatever the input dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

CHUNK = 64  # time steps per chunk: (T, b, d, n) buffers of this length bound the memory


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def n_chunks(seqlen: int) -> int:
    return (seqlen + CHUNK - 1) // CHUNK


def n_checkpoints(seqlen: int) -> int:
    """States kept by the forward: one at every chunk boundary, 0 and seqlen included.

    Never 1, so a fake output of this size does not make the compiler specialize on seqlen
    (a size-1 dimension is guarded to stay 1).
    """
    return n_chunks(seqlen) + 1


def _time_first(t: Tensor, t0: int, t1: int, acc: torch.dtype) -> Tensor:
    """(b, d, L) -> (T, b, d) for steps [t0, t1), in the accumulation dtype."""
    return t[..., t0:t1].permute(2, 0, 1).to(acc)


def _delta(delta: Tensor, delta_bias: Tensor | None, softplus: bool) -> tuple[Tensor, Tensor]:
    """Δ and dΔ/d(delta) for a (T, b, d) chunk. softplus(x) = x above 20, as mamba_ssm."""
    if delta_bias is not None:
        delta = delta + delta_bias
    if not softplus:
        return delta, torch.ones_like(delta)
    small = delta <= 20.0
    return torch.where(small, F.softplus(delta), delta), torch.where(
        small, torch.sigmoid(delta), torch.ones_like(delta)
    )


class _BC:
    """B or C for a chunk, as something that broadcasts against (T, b, G, d // G, n)."""

    def __init__(self, M: Tensor, t0: int, t1: int, acc: torch.dtype):
        self.shared = M.dim() == 2
        if self.shared:  # (d, n)
            self.groups = M.shape[0]
            self.value = M.to(acc)[:, None, :]  # (G=d, 1, n)
        else:  # (b, G, n, L) -> (T, b, G, 1, n)
            self.groups = M.shape[1]
            self.value = M[..., t0:t1].permute(3, 0, 1, 2).to(acc).unsqueeze(3)

    def grouped(self, x: Tensor) -> Tensor:
        """(T, b, d, ...) -> (T, b, G, d // G, ...)."""
        return x.unflatten(2, (self.groups, -1))

    def times(self, x: Tensor) -> Tensor:
        """x (T, b, d) times this matrix: (T, b, d, n)."""
        return (self.grouped(x)[..., None] * self.value).flatten(2, 3)

    def contract(self, h: Tensor) -> Tensor:
        """Σ_n h[..., n]·M[n]: (T, b, d, n) -> (T, b, d)."""
        return (self.grouped(h) * self.value).sum(-1).flatten(2, 3)

    def grad(self, x: Tensor, g: Tensor) -> Tensor:
        """Gradient w.r.t. this matrix of Σ x[t, b, d]·g[t, b, d, n]·M[.., n], in M's own layout."""
        prod = self.grouped(g * x[..., None])  # (T, b, G, d//G, n)
        if self.shared:
            return prod.sum((0, 1)).flatten(0, 1)  # (d, n)
        return prod.sum(3).permute(1, 2, 3, 0)  # (b, G, n, T)


def _chunk_inputs(u, delta, A, B, C, delta_bias, softplus, t0, t1, acc):
    u_c = _time_first(u, t0, t1, acc)  # (T, b, d)
    dt, dt_grad = _delta(_time_first(delta, t0, t1, acc), delta_bias, softplus)
    dA = torch.exp(dt[..., None] * A.to(acc))  # Ā = exp(Δ·A): (T, b, d, n)
    Bc, Cc = _BC(B, t0, t1, acc), _BC(C, t0, t1, acc)
    dBu = Bc.times(dt * u_c)  # B̄·u = Δ·B·u: (T, b, d, n)
    return u_c, dt, dt_grad, dA, dBu, Bc, Cc


def _states(dA: Tensor, dBu: Tensor, h0: Tensor) -> Tensor:
    """h_t = Ā_t·h_{t-1} + B̄_t·u_t over one chunk: (T, b, d, n), from h_{-1} = h0."""
    hs = torch.empty_like(dBu)
    h = h0
    for t in range(dA.shape[0]):
        h = torch.addcmul(dBu[t], dA[t], h, out=hs[t])
    return hs


def _gate(y: Tensor, z_c: Tensor | None) -> Tensor:
    return y if z_c is None else y * F.silu(z_c)


def scan_fwd(u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus):
    """Forward: (out (b, d, L), last_state (b, d, n), checkpoints (b, d, n_chunks + 1, n))."""
    acc = acc_dtype(u.dtype)
    batch, dim, seqlen = u.shape
    dstate = A.shape[1]
    out = torch.empty(batch, dim, seqlen, dtype=u.dtype)
    checkpoints = torch.empty(batch, dim, n_checkpoints(seqlen), dstate, dtype=acc)
    h = (
        torch.zeros(batch, dim, dstate, dtype=acc)
        if initial_state is None
        else initial_state.to(acc)
    )
    for c in range(n_chunks(seqlen)):
        t0, t1 = c * CHUNK, min((c + 1) * CHUNK, seqlen)
        checkpoints[:, :, c] = h
        u_c, _, _, dA, dBu, _, Cc = _chunk_inputs(
            u, delta, A, B, C, delta_bias, delta_softplus, t0, t1, acc
        )
        hs = _states(dA, dBu, h)
        y = Cc.contract(hs)  # y_t = C_t·h_t: (T, b, d)
        if D is not None:
            y = y + D.to(acc) * u_c
        z_c = None if z is None else _time_first(z, t0, t1, acc)
        out[..., t0:t1] = _gate(y, z_c).permute(1, 2, 0)
        h = hs[-1]
    checkpoints[:, :, -1] = h
    return out, h.clone(), checkpoints


def scan_bwd(
    dout, dlast_state, u, delta, A, B, C, D, z, delta_bias, initial_state, checkpoints,
    delta_softplus,
):
    """Backward by recomputation, chunks in reverse. Returns the gradients of every input.

    With g_t = dL/dh_t (through every later step):  g_t = C_t·dy_t + Ā_{t+1}·g_{t+1}.
    Then dĀ_t·h_{t-1} is written g_t·(h_t − B̄_t u_t), so h_{t-1} is never needed.
    """
    acc = acc_dtype(u.dtype)
    batch, dim, seqlen = u.shape
    A_acc = A.to(acc)
    du = torch.empty_like(u)
    ddelta = torch.empty_like(delta)
    dz = torch.empty_like(z) if z is not None else torch.empty(0, dtype=u.dtype)
    dA = torch.zeros_like(A_acc)
    dD = torch.zeros(dim, dtype=acc)
    ddelta_bias = torch.zeros(dim, dtype=acc)
    dB = torch.zeros(B.shape, dtype=acc)
    dC = torch.zeros(C.shape, dtype=acc)
    # q = Ā_t·g_t: what step t hands back to step t-1; at the end it is dL/dh_{-1}.
    q = (
        torch.zeros(batch, dim, A.shape[1], dtype=acc)
        if dlast_state is None
        else dlast_state.to(acc)
    )
    for c in reversed(range(n_chunks(seqlen))):
        t0, t1 = c * CHUNK, min((c + 1) * CHUNK, seqlen)
        u_c, dt, dt_grad, dA_c, dBu, Bc, Cc = _chunk_inputs(
            u, delta, A, B, C, delta_bias, delta_softplus, t0, t1, acc
        )
        hs = _states(dA_c, dBu, checkpoints[:, :, c].to(acc))
        dout_c = _time_first(dout, t0, t1, acc)
        if z is not None:
            z_c = _time_first(z, t0, t1, acc)
            y = Cc.contract(hs)
            if D is not None:
                y = y + D.to(acc) * u_c
            sig = torch.sigmoid(z_c)
            dz[..., t0:t1] = (dout_c * y * sig * (1 + z_c * (1 - sig))).permute(1, 2, 0)
            dy = dout_c * z_c * sig  # silu(z) = z·σ(z)
        else:
            dy = dout_c
        # Reverse recurrence, in place: g holds C_t·dy_t, then g_t.
        g = Cc.times(dy)
        g[-1] += q
        for t in range(g.shape[0] - 2, -1, -1):
            g[t].addcmul_(dA_c[t + 1], g[t + 1])
        q = dA_c[0] * g[0]

        dAh = g * (hs - dBu)  # g_t·Ā_t·h_{t-1}: (T, b, d, n)
        dA += (dAh * dt[..., None]).sum((0, 1))
        gB = Bc.contract(g)  # Σ_n g·B: (T, b, d)
        d_dt = (dAh * A_acc).sum(-1) + gB * u_c  # dL/dΔ
        du_c = gB * dt
        if D is not None:
            du_c = du_c + D.to(acc) * dy
            dD += (dy * u_c).sum((0, 1))
        du[..., t0:t1] = du_c.permute(1, 2, 0)
        d_delta = d_dt * dt_grad  # through softplus and the bias
        ddelta[..., t0:t1] = d_delta.permute(1, 2, 0)
        ddelta_bias += d_delta.sum((0, 1))
        if Bc.shared:
            dB += Bc.grad(dt * u_c, g)
        else:
            dB[..., t0:t1] = Bc.grad(dt * u_c, g)
        if Cc.shared:
            dC += Cc.grad(dy, hs)
        else:
            dC[..., t0:t1] = Cc.grad(dy, hs)
    return du, ddelta, dA, dB.to(B.dtype), dC.to(C.dtype), dD, dz, ddelta_bias, q


def state_update(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus):
    """One step: updates state (b, d, n) in place, returns out (b, d) in x's dtype."""
    acc = state.dtype
    delta, _ = _delta(dt.to(acc), dt_bias, dt_softplus)  # (b, d)
    dA = torch.exp(delta[..., None] * A)  # (b, d, n)
    dim = x.shape[1]
    Bd = B.to(acc).repeat_interleave(dim // B.shape[1], 1)  # (b, G, n) -> (b, d, n)
    Cd = C.to(acc).repeat_interleave(dim // C.shape[1], 1)
    state.mul_(dA).add_(Bd * (delta * x.to(acc))[..., None])
    y = (state * Cd).sum(-1)
    if D is not None:
        y = y + D * x.to(acc)
    if z is not None:
        y = y * F.silu(z.to(acc))
    return y.to(x.dtype)
