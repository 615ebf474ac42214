"""CPU kernels for the selective scan, in plain torch.

The recurrence runs as a loop over time steps, each step one fused multiply-add over the whole
(batch, dim, dstate) state. Time is cut into chunks of CHUNK steps; the (time, batch, dim, dstate)
tensors exist for one chunk at a time, in buffers allocated once per call and small enough to stay
in cache, so memory stays bounded for any sequence length. The forward saves the state at every
chunk boundary; the backward walks the chunks in reverse and recomputes each chunk's states from
its checkpoint.

Layout: time first, (L, b, d) for per-step values and (T, b, d, n) inside a chunk, so that one step
is a contiguous slice. A channel dimension d that reads B or C by group is viewed as (G, d // G)
to broadcast against them, and contractions over the state run as batched matrix products.
Accumulation is float32 (float64 for float64 inputs) whatever the input dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

CHUNK = 8  # time steps per chunk: a (CHUNK, b, d, n) buffer stays in cache at model sizes


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


def _time_first(x: Tensor, acc: torch.dtype) -> Tensor:
    """(b, d, L) -> (L, b, d) in the accumulation dtype, contiguous. May alias x: never write to it.

    Done as a 2-D transpose, which torch copies block-wise (a 3-D permute copy is 4x slower).
    """
    b, d, L = x.shape
    return x.reshape(b * d, L).t().to(acc, memory_format=torch.contiguous_format).view(L, b, d)


def _batch_first(x: Tensor, dtype: torch.dtype) -> Tensor:
    """(L, b, d) -> (b, d, L) in `dtype`, contiguous."""
    L, b, d = x.shape
    return x.reshape(L, b * d).t().to(dtype, memory_format=torch.contiguous_format).view(b, d, L)


class _BC:
    """B or C as something that broadcasts against (T, b, G, d // G, n) for steps [t0, t1)."""

    def __init__(self, M: Tensor, acc: torch.dtype):
        self.shared = M.dim() == 2
        if self.shared:  # (d, n) -> (G = d, 1, n)
            self.groups = M.shape[0]
            self.value = M.to(acc)[:, None, :]
        else:  # (b, G, n, L) -> (L, b, G, 1, n)
            self.groups = M.shape[1]
            self.value = M.permute(3, 0, 1, 2).to(acc, memory_format=torch.contiguous_format)
            self.value = self.value.unsqueeze(3)

    def at(self, t0: int, t1: int) -> Tensor:
        return self.value if self.shared else self.value[t0:t1]

    def grouped(self, x: Tensor) -> Tensor:
        """(T, b, d, ...) -> (T, b, G, d // G, ...)."""
        return x.unflatten(2, (self.groups, -1))

    def times(self, x: Tensor, t0: int, t1: int, out: Tensor) -> Tensor:
        """out (T, b, d, n) = x (T, b, d) times this matrix."""
        torch.mul(self.grouped(x)[..., None], self.at(t0, t1), out=self.grouped(out))
        return out

    def contract(self, h: Tensor, t0: int, t1: int) -> Tensor:
        """Σ_n h[..., n]·M[n]: (T, b, d, n) -> (T, b, d)."""
        if self.shared:
            return (h * self.value.squeeze(1)).sum(-1)
        return (self.grouped(h) @ self.at(t0, t1).transpose(-1, -2)).flatten(2, 4)

    def grad_buffer(self) -> Tensor:
        """Zeros for this matrix's gradient: (d, n) shared, or time-first (L, b, G, n)."""
        return torch.zeros_like(self.value.squeeze(-2))

    def add_grad(self, x: Tensor, g: Tensor, t0: int, t1: int, grad: Tensor) -> None:
        """grad += d/dM of Σ x[t, b, d]·g[t, b, d, n]·M[.., n] over steps [t0, t1)."""
        if self.shared:
            grad += (g * x[..., None]).sum((0, 1))  # (d, n)
        else:
            torch.matmul(
                self.grouped(x)[..., None, :], self.grouped(g), out=grad[t0:t1, ..., None, :]
            )

    def grad_like(self, grad: Tensor, M: Tensor) -> Tensor:
        """The gradient in M's shape and dtype, contiguous (as the op's fake says)."""
        if not self.shared:
            grad = grad.permute(1, 2, 3, 0)  # (L, b, G, n) -> (b, G, n, L)
        return grad.to(M.dtype).contiguous()


class _Scan:
    """One call's per-step inputs in time-first layout, and the chunk buffers of the recurrence."""

    def __init__(self, u, delta, A, B, C, delta_bias, delta_softplus):
        self.acc = acc = acc_dtype(u.dtype)
        self.batch, self.dim, self.seqlen = u.shape
        self.A = A.to(acc)
        self.u = _time_first(u, acc)  # (L, b, d)
        dt = _time_first(delta, acc)
        if delta_bias is not None:
            dt = dt + delta_bias.to(acc)
        # Δ = softplus(delta + bias), = delta + bias above 20 (as mamba_ssm); and dΔ/d(delta).
        self.dt_grad = None
        if delta_softplus:
            self.dt_grad = torch.where(dt <= 20.0, torch.sigmoid(dt), 1.0)
            dt = torch.where(dt <= 20.0, F.softplus(dt), dt)
        self.dt = dt  # Δ: (L, b, d)
        self.dtu = dt * self.u  # Δ·u: (L, b, d)
        self.B, self.C = _BC(B, acc), _BC(C, acc)
        shape = (CHUNK, self.batch, self.dim, A.shape[1])
        self.dA = torch.empty(shape, dtype=acc)  # Ā = exp(Δ·A) for one chunk
        self.hs = torch.empty((CHUNK + 1, *shape[1:]), dtype=acc)  # h_{t0-1} … h_{t1-1}

    def chunks(self):
        for c in range(n_chunks(self.seqlen)):
            yield c, c * CHUNK, min((c + 1) * CHUNK, self.seqlen)

    def recur(self, t0: int, t1: int, h0: Tensor) -> tuple[Tensor, Tensor]:
        """h_t = Ā_t·h_{t-1} + B̄_t·u_t for t in [t0, t1) from h_{t0-1} = h0.

        Returns views of the buffers: Ā (T, b, d, n) and the states (T + 1, b, d, n), whose
        slot 0 is h0 and slot t + 1 is h_{t0+t}.
        """
        T = t1 - t0
        dA, hs = self.dA[:T], self.hs[: T + 1]
        torch.mul(self.dt[t0:t1, :, :, None], self.A, out=dA).exp_()
        hs[0].copy_(h0)
        self.B.times(self.dtu[t0:t1], t0, t1, out=hs[1:])  # B̄·u = Δ·B·u
        for t in range(T):
            hs[t + 1].addcmul_(dA[t], hs[t])
        return dA, hs


def scan_fwd(
    u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus, save_checkpoints=True
):
    """Forward: (out (b, d, L), last_state (b, d, n), checkpoints (n_chunks + 1, b, d, n));
    without save_checkpoints (no backward to come) the checkpoints are (0, b, d, n)."""
    s = _Scan(u, delta, A, B, C, delta_bias, delta_softplus)
    n_ck = n_checkpoints(s.seqlen) if save_checkpoints else 0
    checkpoints = torch.empty(n_ck, s.batch, s.dim, A.shape[1], dtype=s.acc)
    h = torch.zeros_like(s.hs[0]) if initial_state is None else initial_state.to(s.acc)
    y = torch.empty_like(s.u)  # (L, b, d)
    for c, t0, t1 in s.chunks():
        if n_ck:
            checkpoints[c] = h
        _, hs = s.recur(t0, t1, h)
        y[t0:t1] = s.C.contract(hs[1:], t0, t1)  # y_t = C_t·h_t
        h = hs[t1 - t0]
    if n_ck:
        checkpoints[-1] = h
    if D is not None:
        y += D.to(s.acc) * s.u
    if z is not None:
        y *= F.silu(_time_first(z, s.acc))
    return _batch_first(y, u.dtype), h.clone(), checkpoints


def scan_bwd(
    dout, dlast_state, u, delta, A, B, C, D, z, delta_bias, initial_state, checkpoints,
    delta_softplus,
):
    """Backward by recomputation, chunks in reverse. Returns the gradients of every input.

    With g_t = dL/dh_t (through every later step):  g_t = C_t·dy_t + Ā_{t+1}·g_{t+1}.
    Then dL/dĀ_t = g_t·h_{t-1}, and the rest follows from Ā = exp(Δ·A), B̄·u = Δ·B·u.
    """
    s = _Scan(u, delta, A, B, C, delta_bias, delta_softplus)
    acc = s.acc
    dout = _time_first(dout, acc)  # (L, b, d)
    z_t = None if z is None else _time_first(z, acc)
    dy = dout if z is None else dout * F.silu(z_t)  # dL/dy before the gate
    y = None if z is None else torch.empty_like(dy)  # y before the gate, for dz
    d_dt = torch.empty_like(dy)  # dL/dΔ
    du = torch.empty_like(dy)
    dA = torch.zeros_like(s.A)
    dB, dC = s.B.grad_buffer(), s.C.grad_buffer()
    g_buf = torch.empty_like(s.dA)
    tmp = torch.empty_like(s.dA)
    # q = Ā_t·g_t: what step t hands back to step t-1; at the end it is dL/dh_{-1}.
    q = torch.zeros_like(s.hs[0]) if dlast_state is None else dlast_state.to(acc)
    for c, t0, t1 in reversed(list(s.chunks())):
        T = t1 - t0
        dA_c, hs = s.recur(t0, t1, checkpoints[c])
        if y is not None:
            y[t0:t1] = s.C.contract(hs[1:], t0, t1)
        g = s.C.times(dy[t0:t1], t0, t1, out=g_buf[:T])  # C_t·dy_t
        g[T - 1] += q
        for t in range(T - 2, -1, -1):
            g[t].addcmul_(dA_c[t + 1], g[t + 1])
        q = dA_c[0] * g[0]

        dAh = dA_c.mul_(hs[:T]).mul_(g)  # dL/dĀ_t·Ā_t = g_t·Ā_t·h_{t-1}, in Ā's buffer
        dA += torch.mul(dAh, s.dt[t0:t1, :, :, None], out=tmp[:T]).sum((0, 1))
        gB = s.B.contract(g, t0, t1)  # Σ_n g·B: (T, b, d)
        d_dt[t0:t1] = torch.mul(dAh, s.A, out=tmp[:T]).sum(-1) + gB * s.u[t0:t1]
        torch.mul(gB, s.dt[t0:t1], out=du[t0:t1])
        s.B.add_grad(s.dtu[t0:t1], g, t0, t1, dB)
        s.C.add_grad(dy[t0:t1], hs[1:], t0, t1, dC)

    dD = torch.zeros(s.dim, dtype=acc)
    if D is not None:
        du += D.to(acc) * dy
        dD = (dy * s.u).sum((0, 1))
        if y is not None:
            y += D.to(acc) * s.u
    dz = torch.empty(0, dtype=u.dtype)
    if z is not None:
        sig = torch.sigmoid(z_t)
        # silu' = σ(1 + z(1 - σ))
        dz = _batch_first(dout * y * sig * (1 + z_t * (1 - sig)), z.dtype)
    d_delta = d_dt if s.dt_grad is None else d_dt * s.dt_grad  # through softplus and the bias
    return (
        _batch_first(du, u.dtype), _batch_first(d_delta, delta.dtype), dA,
        s.B.grad_like(dB, B), s.C.grad_like(dC, C), dD, dz, d_delta.sum((0, 1)), q,
    )


def state_update(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus):
    """One step: updates state (b, d, n) in place, returns out (b, d) in x's dtype."""
    acc = state.dtype
    delta = dt.to(acc)
    if dt_bias is not None:
        delta = delta + dt_bias
    if dt_softplus:
        delta = torch.where(delta <= 20.0, F.softplus(delta), delta)
    dim = x.shape[1]
    Bd = B.to(acc).repeat_interleave(dim // B.shape[1], 1)  # (b, G, n) -> (b, d, n)
    Cd = C.to(acc).repeat_interleave(dim // C.shape[1], 1)
    state.mul_(torch.exp(delta[..., None] * A)).add_(Bd * (delta * x.to(acc))[..., None])
    y = (state * Cd).sum(-1)
    if D is not None:
        y = y + D * x.to(acc)
    if z is not None:
        y = y * F.silu(z.to(acc))
    return y.to(x.dtype)
