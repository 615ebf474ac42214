"""The decode step's ops launched with programmatic dependent launch (PDL), as opaque CUDA ops.

With PDL (sm_90+) each kernel of the decode step loads its weights while the kernel before it is
still running, then waits for it (`griddepcontrol.wait`) before reading what it wrote: at batch
1 the step is a chain of short, latency-bound kernels (four per block). Compiled graphs cannot
launch the registered ops' Triton kernels that way: Inductor launches a `triton_op`'s kernels
itself, with no PDL option (torch 2.11), and the wait is inline assembly, which traced graphs
cannot take (see `lowering.common.traced`). These opaque twins (`decode_linear_pdl`,
`conv_x_proj_pdl`, `ssm_decode_step_pdl`; same arguments, CUDA only) launch their kernels
themselves, with PDL, also inside a compiled graph and its CUDA graph.

While `programmatic_dependent_launch()` is open, the public wrappers (`decode_linear`,
`conv_x_proj`, `ssm_decode_step`) pick the twins for CUDA tensors; a graph compiled inside the
block keeps them (Dynamo guards on the switch). `MambaGenerator` opens it on sm_90+ GPUs by
default: on an H200 the 130M model's step took 0.374 -> 0.321 ms per token (perf/RESULTS.md,
sixth session), with logits bit-identical to the twins launched without PDL.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor
from torch.library import custom_op

from mamba_compiled.ops.registry import Opt, empty, lowering

_active = False


@contextlib.contextmanager
def programmatic_dependent_launch(on: bool = True) -> Iterator[None]:
    """While open, the decode step's ops on CUDA launch their kernels with PDL."""
    global _active
    previous, _active = _active, bool(on)
    try:
        yield
    finally:
        _active = previous


def use_pdl(x: Tensor) -> bool:
    """Whether an op on x takes its PDL twin."""
    return _active and x.is_cuda


@custom_op("mamba_compiled::decode_linear_pdl", mutates_args=(), device_types="cuda")
def decode_linear_pdl(
    x: Tensor, weight: Tensor, bias: Opt, norm_weight: Opt, eps: float, residual: Opt
) -> Tensor:
    return lowering().decode_linear(x, weight, bias, norm_weight, eps, residual, pdl_launch=True)


@decode_linear_pdl.register_fake
def _(x, weight, bias, norm_weight, eps, residual):
    like = residual if residual is not None else weight
    return empty((x.shape[0], weight.shape[0]), x, like.dtype)


@custom_op("mamba_compiled::conv_x_proj_pdl", mutates_args=(), device_types="cuda")
def conv_x_proj_pdl(
    conv_state: Tensor, conv_x: Tensor, conv_weight: Tensor, conv_bias: Opt, x_proj_weight: Tensor
) -> Tensor:
    return lowering().conv_x_proj(
        conv_state, conv_x, conv_weight, conv_bias, x_proj_weight, pdl_launch=True
    )


@conv_x_proj_pdl.register_fake
def _(conv_state, conv_x, conv_weight, conv_bias, x_proj_weight):
    from mamba_compiled.lowering.decode_step import conv_x_proj_parts

    n_part = conv_x_proj_parts(*conv_x.shape, conv_x.dtype)
    return empty((n_part, conv_x.shape[0], x_proj_weight.shape[0]), conv_x, torch.float32)


@custom_op(
    "mamba_compiled::ssm_decode_step_pdl", mutates_args=("state", "conv_state"), device_types="cuda"
)
def ssm_decode_step_pdl(
    state: Tensor, conv_state: Tensor, conv_x: Tensor, conv_weight: Tensor, conv_bias: Opt,
    x_dbl: Tensor, dt_weight: Tensor, A: Tensor, D: Opt, z: Opt, dt_bias: Opt,
    dt_softplus: bool,
) -> Tensor:  # fmt: skip
    return lowering().state_update(
        state, None, None, A, None, None, D, z, dt_bias, dt_softplus, dt_weight, conv_state,
        conv_x, conv_weight, conv_bias, x_dbl, pdl_launch=True,
    )  # fmt: skip


@ssm_decode_step_pdl.register_fake
def _(state, conv_state, conv_x, conv_weight, conv_bias, x_dbl, dt_weight, A, D, z, dt_bias,
      dt_softplus):  # fmt: skip
    return empty(conv_x.shape, conv_x)
