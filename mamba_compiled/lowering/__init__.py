"""Triton kernels for CUDA tensors: the selective scan forward and backward, and the decode step.

The launchers below are what `mamba_compiled.ops` calls for CUDA tensors (and what CPU
tests call directly under TRITON_INTERPRET=1). Importing this package does not import triton:
each launcher imports its kernel module on first call, so the package imports (and the CPU ops
work) where triton is not installed.

    scan_fwd(u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus,
             save_checkpoints=True)
        -> (out, last_state, checkpoints)   (none written without save_checkpoints: inference)
    scan_bwd(dout, dlast_state, u, delta, A, B, C, D, z, delta_bias, initial_state, checkpoints,
             delta_softplus, deterministic)
        -> (du, ddelta, dA, dB, dC, dD, dz, ddelta_bias, dinitial_state)
    state_update(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, dt_weight=None,
                 conv_state=None, conv_x=None, conv_weight=None, conv_bias=None, x_dbl=None)
        -> out (state in place) with dt_weight, dt is dt_proj's low-rank input; with
        conv_state, the conv window shifts in the same kernel; with conv_weight (x=None), x is
        the conv's output, computed there too; with x_dbl (dt=B=C=None), dt, B and C come
        from x_proj's partial sums (the model's decode step)
    conv_x_proj(conv_state, conv_x, conv_weight, conv_bias, x_proj_weight)
        -> (P, batch, rows) float32 partial sums of x_proj applied to the conv's step
    (state_update, conv_x_proj and decode_linear take pdl_launch=True: launched with
    programmatic dependent launch, for `mamba_compiled.ops.pdl`)
    decode_linear(x, weight, bias, norm_weight, eps, residual)
        -> [residual +] linear([rms_norm] x): a linear layer for decoding's few rows
    conv_silu_fwd(x, weight, bias) -> silu(causal depthwise conv(x)), x (channels, b, L)
    conv_silu_bwd(du, x, weight, bias) -> (dx, dweight, dbias)

Shapes and dtypes are the op contract's (mamba_compiled/ops/scan.py). The launchers allocate
with torch.empty and launch through torch.library.wrap_triton when traced (the JIT function
itself in eager: `common.launcher`), computing grids with integer arithmetic on sizes only, so
they trace under FakeTensorMode with a dynamic seqlen.
"""

from __future__ import annotations

__all__ = [
    "scan_fwd", "scan_bwd", "state_update", "conv_x_proj", "decode_linear", "conv_silu_fwd",
    "conv_silu_bwd",
]  # fmt: skip

# The kernel modules (scan_forward, scan_backward, decode_step, linear) are named apart from these
# functions: importing a submodule sets an attribute of the package with the submodule's name.


def scan_fwd(
    u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus, save_checkpoints=True
):
    from .scan_forward import scan_fwd as launch

    return launch(
        u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus, save_checkpoints
    )


def scan_bwd(
    dout, dlast_state, u, delta, A, B, C, D, z, delta_bias, initial_state, checkpoints,
    delta_softplus, deterministic,
):  # fmt: skip
    from .scan_backward import scan_bwd as launch

    return launch(
        dout, dlast_state, u, delta, A, B, C, D, z, delta_bias, initial_state, checkpoints,
        delta_softplus, deterministic,
    )  # fmt: skip


def state_update(
    state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, dt_weight=None, conv_state=None,
    conv_x=None, conv_weight=None, conv_bias=None, x_dbl=None, pdl_launch=False,
):  # fmt: skip
    from .decode_step import state_update as launch

    return launch(
        state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, dt_weight, conv_state, conv_x,
        conv_weight, conv_bias, x_dbl, pdl_launch,
    )  # fmt: skip


def conv_x_proj(conv_state, conv_x, conv_weight, conv_bias, x_proj_weight, pdl_launch=False):
    from .decode_step import conv_x_proj as launch

    return launch(conv_state, conv_x, conv_weight, conv_bias, x_proj_weight, pdl_launch)


def decode_linear(x, weight, bias, norm_weight, eps, residual, pdl_launch=False):
    from .linear import decode_linear as launch

    return launch(x, weight, bias, norm_weight, eps, residual, pdl_launch=pdl_launch)


def conv_silu_fwd(x, weight, bias):
    from .conv import conv_silu_fwd as launch

    return launch(x, weight, bias)


def conv_silu_bwd(du, x, weight, bias):
    from .conv import conv_silu_bwd as launch

    return launch(du, x, weight, bias)
