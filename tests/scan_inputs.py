"""Random inputs for the selective scan, drawn like mamba_ssm's own tests, and tolerances.

Distributions follow mamba_ssm's test_selective_scan: u, z, B, C, D ~ N(0, 1); delta ~ 0.5·U(0, 1);
A ~ -0.5·U(0, 1); delta_bias ~ 0.5·U(0, 1). Fresh draws on every call.
"""

from __future__ import annotations

import dataclasses

import torch

# (rtol, atol) for outputs; mamba_ssm's table. Gradients get multiples of these.
TOLERANCES = {
    torch.float64: (1e-9, 1e-9),
    torch.float32: (6e-4, 2e-3),
    torch.float16: (3e-3, 5e-3),
    torch.bfloat16: (3e-2, 5e-2),
}

# B/C layouts: "var" (batch, dstate, L), "shared" (dim, dstate), "g2" (batch, 2, dstate, L)
LAYOUTS = ("var", "shared", "g2")


@dataclasses.dataclass
class ScanCase:
    batch: int = 2
    dim: int = 8
    seqlen: int = 64
    dstate: int = 8
    B_layout: str = "var"
    C_layout: str = "var"
    has_D: bool = True
    has_z: bool = True
    has_delta_bias: bool = True
    delta_softplus: bool = True
    has_initial_state: bool = True
    return_last_state: bool = True
    dtype: torch.dtype = torch.float64
    bc_dtype: torch.dtype | None = None  # B, C dtype; default: like u
    device: str = "cpu"

    def _bc(self, layout: str) -> torch.Tensor:
        b, d, L, n = self.batch, self.dim, self.seqlen, self.dstate
        dtype = self.bc_dtype or self.dtype
        shape = {"var": (b, n, L), "shared": (d, n), "g2": (b, 2, n, L)}[layout]
        return torch.randn(shape, dtype=dtype, device=self.device)

    def inputs(self, requires_grad: bool = False) -> dict:
        """Keyword arguments for selective_scan_fn (and selective_scan_ref)."""
        b, d, L, n = self.batch, self.dim, self.seqlen, self.dstate
        act = dict(dtype=self.dtype, device=self.device)
        par = dict(dtype=torch.float64 if self.dtype == torch.float64 else torch.float32,
                   device=self.device)
        kw = dict(
            u=torch.randn(b, d, L, **act),
            delta=0.5 * torch.rand(b, d, L, **act),
            A=-0.5 * torch.rand(d, n, **par),
            B=self._bc(self.B_layout),
            C=self._bc(self.C_layout),
            D=torch.randn(d, **par) if self.has_D else None,
            z=torch.randn(b, d, L, **act) if self.has_z else None,
            delta_bias=0.5 * torch.rand(d, **par) if self.has_delta_bias else None,
            initial_state=torch.randn(b, d, n, **par) if self.has_initial_state else None,
        )
        if requires_grad:
            for t in kw.values():
                if t is not None:
                    t.requires_grad_(True)
        kw["delta_softplus"] = self.delta_softplus
        kw["return_last_state"] = self.return_last_state
        return kw


def tensors(kw: dict) -> dict:
    return {k: v for k, v in kw.items() if isinstance(v, torch.Tensor)}


def as_float64(kw: dict) -> dict:
    """The same inputs in float64 (fresh leaves), for the oracle."""
    out = {}
    for k, v in kw.items():
        if isinstance(v, torch.Tensor):
            v = v.detach().double().requires_grad_(v.requires_grad)
        out[k] = v
    return out


def joint_loss(result, weights) -> torch.Tensor:
    """Σ out·w_out (+ Σ last_state·w_state): covers the state's gradient path."""
    if isinstance(result, tuple):
        return sum((r * w).sum() for r, w in zip(result, weights, strict=True))
    return (result * weights[0]).sum()


def loss_weights(result) -> list[torch.Tensor]:
    rs = result if isinstance(result, tuple) else (result,)
    return [torch.randn(r.shape, dtype=torch.float64, device=r.device) for r in rs]


def decode_step_reference(state, conv_state, conv_x, z, conv_w, conv_b, x_dbl, dt_weight, A, D,
                          bias):  # fmt: skip
    """The model's decode step (`ssm_decode_step`, softplus on) in float64, each value rounded
    where the model rounds it (the conv's output and x_proj's summed output in conv_x's dtype):
    (out, state after, conv window after). The inputs are not changed."""
    from mamba_compiled.ops.reference import selective_state_update_ref

    f = lambda t: t.double()  # noqa: E731
    dtype, rank, n = conv_x.dtype, dt_weight.shape[1], A.shape[1]
    window = torch.cat([conv_state[:, :, 1:], conv_x[:, :, None]], dim=-1)
    u = (f(window) * f(conv_w)).sum(-1) + (f(conv_b) if conv_b is not None else 0)
    u = torch.nn.functional.silu(u).to(dtype)
    xd = f(x_dbl).sum(0).to(dtype)
    dt_low, B, C = torch.split(xd, [rank, n, n], dim=-1)
    dt = f(dt_low) @ f(dt_weight).t()
    out, new_state = selective_state_update_ref(
        f(state), f(u), dt, f(A), f(B)[:, None], f(C)[:, None], f(D), f(z), f(bias), True
    )
    return out, new_state, window


def run_decode_step(inputs):
    """The model's decode step by `lowering.state_update` on `inputs` (as for
    `decode_step_reference`; state and conv_state change in place), after the float64
    reference on them: (out, reference out, reference state, reference conv window)."""
    from mamba_compiled.lowering import state_update

    state, conv_state, conv_x, z, conv_w, conv_b, x_dbl, dt_weight, A, D, bias = inputs
    ref = decode_step_reference(*inputs)
    out = state_update(
        state, None, None, A, None, None, D, z, bias, True, dt_weight, conv_state, conv_x,
        conv_w, conv_b, x_dbl,
    )  # fmt: skip
    return (out, *ref)
