"""The oracle: the selective scan written next to the paper's equations.

Naive and readable on purpose: a Python loop over time that works in whatever dtype it is given
(tests pass float64). Tests compare every kernel against it; nothing registers it and no hot path
calls it.

Glossary (code name -> paper symbol, Gu & Dao 2023, Algorithm 2):

    b      batch            d    channel (D in the paper's (B, L, D))
    l      sequence step    n    state index (N)
    u      input x          delta  Δ before its bias and softplus
    A      A (dim, dstate), real and negative for a stable scan
    B, C   B and C, input-dependent ("selective") or shared
    D      the skip connection, y += D·u
    z      the gate: out = y · silu(z)

Shapes:
    u, delta, z   (batch, dim, seqlen)
    A             (dim, dstate)
    B, C          (dim, dstate)                   shared over batch and time
                  (batch, dstate, seqlen)         per step
                  (batch, groups, dstate, seqlen) per step, channel d reads group
                                                  d // (dim // groups)
    D, delta_bias (dim,)
    initial_state (batch, dim, dstate)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _per_step(M: Tensor, batch: int, dim: int, seqlen: int) -> Tensor:
    """Any B/C layout as (batch, dim, dstate, seqlen)."""
    if M.dim() == 2:  # shared (dim, dstate)
        return M[None, :, :, None].expand(batch, dim, M.shape[1], seqlen)
    if M.dim() == 3:  # (batch, dstate, seqlen): one group
        M = M.unsqueeze(1)
    groups = M.shape[1]
    return M.repeat_interleave(dim // groups, dim=1)


def discretize_delta(delta: Tensor, delta_bias: Tensor | None, delta_softplus: bool) -> Tensor:
    """Δ = softplus(delta + delta_bias), with softplus(x) = x above 20 (as mamba_ssm)."""
    if delta_bias is not None:
        delta = delta + delta_bias[..., None]
    if delta_softplus:
        delta = torch.where(delta <= 20.0, F.softplus(delta), delta)
    return delta


def selective_scan_ref(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
    initial_state: Tensor | None = None,
    dtype: torch.dtype | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """The scan, computed in `dtype` (default: float32, or float64 if u is float64).

    Returns out (batch, dim, seqlen) in that dtype, and with return_last_state also the state
    after the last step (batch, dim, dstate).
    """
    if dtype is None:
        dtype = torch.float64 if u.dtype == torch.float64 else torch.float32
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    u, delta, A, B, C, D, z, delta_bias, initial_state = map(
        cast, (u, delta, A, B, C, D, z, delta_bias, initial_state)
    )
    batch, dim, seqlen = u.shape
    dstate = A.shape[1]
    delta = discretize_delta(delta, delta_bias, delta_softplus)  # Δ: (b, d, l)
    B = _per_step(B, batch, dim, seqlen)  # (b, d, n, l)
    C = _per_step(C, batch, dim, seqlen)  # (b, d, n, l)

    # Zero-order hold for A, Euler for B (the paper's simplified discretization):
    #   Ā = exp(Δ·A),  B̄·u = Δ·B·u
    h = (
        torch.zeros(batch, dim, dstate, dtype=dtype, device=u.device)
        if initial_state is None
        else initial_state
    )
    ys = []
    # One view per step (unbind: its backward is one stack, where indexing [..., t] in the loop
    # would make every step's backward write a whole (…, seqlen) tensor).
    steps = zip(delta.unbind(-1), u.unbind(-1), B.unbind(-1), C.unbind(-1), strict=True)
    for delta_t, u_t, B_t, C_t in steps:
        dA = torch.exp(delta_t[..., None] * A)  # Ā_t: (b, d, n)
        dBu = delta_t[..., None] * B_t * u_t[..., None]  # B̄_t·u_t: (b, d, n)
        h = dA * h + dBu  # h_t = Ā_t h_{t-1} + B̄_t u_t
        ys.append((h * C_t).sum(-1))  # y_t = C_t h_t: (b, d)
    y = torch.stack(ys, dim=-1)  # (b, d, l)
    if D is not None:
        y = y + D[:, None] * u
    if z is not None:
        y = y * F.silu(z)
    return (y, h) if return_last_state else y


def selective_state_update_ref(
    state: Tensor,
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    dt_bias: Tensor | None = None,
    dt_softplus: bool = False,
) -> tuple[Tensor, Tensor]:
    """One decode step, out of place: returns (out (batch, dim), new state (batch, dim, dstate)).

    state (batch, dim, dstate); x, dt, z (batch, dim); B, C (batch, dstate) or grouped
    (batch, groups, dstate); A (dim, dstate); D, dt_bias (dim,). Computed like the scan with L = 1.
    """
    seq = lambda t: None if t is None else t[..., None]  # noqa: E731  (…) -> (…, 1)
    out, new_state = selective_scan_ref(
        seq(x),
        seq(dt),
        A,
        seq(B),
        seq(C),
        D,
        seq(z),
        dt_bias,
        dt_softplus,
        return_last_state=True,
        initial_state=state,
    )
    return out[..., 0], new_state


def decode_linear_ref(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    norm_weight: Tensor | None = None,
    eps: float = 1e-5,
    residual: Tensor | None = None,
) -> Tensor:
    """`decode_linear` in float64, rounded where the model rounds: the norm's output and the
    linear layer's output to weight's dtype. Returns float64."""
    f = torch.float64
    h = x.to(f)
    if norm_weight is not None:
        h = x.to(weight.dtype).to(f)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps) * norm_weight.to(f)
        h = h.to(weight.dtype).to(f)
    out = h @ weight.to(f).t()
    if bias is not None:
        out = out + bias.to(f)
    if residual is not None:
        out = residual.to(f) + out.to(weight.dtype).to(f)
    return out
