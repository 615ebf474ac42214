"""The selective scan and its decode step as torch.library ops (namespace `mamba_compiled`).

Registered ops:

    selective_scan_fwd(u, delta, A, B, C, D?, z?, delta_bias?, initial_state?, delta_softplus,
                       save_checkpoints=True)
        -> (out, last_state, checkpoints)
                    (save_checkpoints=False: inference, no backward can follow; the kernel
                    writes no checkpoints and `checkpoints` has no elements)
    selective_scan_bwd(dout, dlast_state?, u, delta, A, B, C, D?, z?, delta_bias?, initial_state?,
                       checkpoints, delta_softplus, deterministic)
        -> (du, ddelta, dA, dB, dC, dD, dz, ddelta_bias, dinitial_state)
    selective_state_update(state!, x, dt, A, B, C, D?, z?, dt_bias?, dt_softplus) -> out
    conv_x_proj(conv_state, conv_x, conv_weight, conv_bias?, x_proj_weight) -> x_dbl
                    (the conv's step and x_proj, as (P, batch, rows) partial sums: one kernel)
    (conv_x_proj_pdl and ssm_decode_step_pdl: opaque CUDA twins launched with programmatic
    dependent launch, in `mamba_compiled.ops.pdl`)
    ssm_decode_step(state!, conv_state!, conv_x, conv_weight, conv_bias?, x_dbl, dt_weight, A,
                    D?, z?, dt_bias?, dt_softplus) -> out
                    (the model's decode step after x_proj: x_proj's partial sums summed, the
                    conv, dt_proj, the state update, the gate and the conv-window shift, one
                    kernel on CUDA)

The forward and the decode steps are `triton_op`s (where triton is installed), so torch.compile and
AOTInductor see the Triton kernels of their CUDA branch; a `triton_op` has no per-device
registration, so its body picks the implementation from the inputs' device: CUDA -> the Triton
launchers in `mamba_compiled.lowering`; CPU -> the torch kernels in `ops/cpu.py`, registered as
opaque CPU-only ops (`*_cpu`) so the compiler never unrolls their time loop. The body is also the
fake implementation. `checkpoints` is whatever the device's backward needs (states at chunk
boundaries); its shape depends only on input sizes and no dimension of it may be 1 for some
seqlens and not others: the compiler guards size-1 dimensions, which would specialize a dynamic
seqlen.

The backward is an opaque `custom_op` on both devices, by choice: its fastest CUDA kernel sums
dB and dC with inline-PTX shuffles, and torch 2.11's Inductor cannot tell which arguments an
inline-assembly kernel writes (it clones them all, and failed under dynamic shapes). Opaque, the
compiled training step runs the same kernel as eager (2.8 against 3.6 ms at 8x4096x2048 bf16);
a backward is never part of an exported or AOTInductor inference graph.

The forward's autograd formula calls the registered backward op, so AOT autograd traces it.
In plain eager use `selective_scan_fn` skips torch.library's dispatch (its host time) and calls
the same kernels and formula through `_EagerScan`; whenever anything traces or intercepts the
call, it goes through the registered op.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.library import custom_op

from mamba_compiled.ops import cpu, pdl
from mamba_compiled.ops.checks import (
    check_conv_x_proj_inputs,
    check_decode_step_inputs,
    check_scan_inputs,
    check_state_update_inputs,
)
from mamba_compiled.ops.registry import Opt, empty, layout_of, lowering, public_op

# --------------------------------------------------------------------------------------------
# CPU kernels as opaque ops, with their fakes (contiguous outputs, as the kernels return).


@custom_op("mamba_compiled::selective_scan_fwd_cpu", mutates_args=(), device_types="cpu")
def _scan_fwd_cpu(
    u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Opt, z: Opt,
    delta_bias: Opt, initial_state: Opt, delta_softplus: bool, save_checkpoints: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    return cpu.scan_fwd(
        u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus, save_checkpoints
    )


@_scan_fwd_cpu.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus, save_checkpoints):
    batch, dim, seqlen = u.shape
    acc = cpu.acc_dtype(u.dtype)
    n_ck = cpu.n_checkpoints(seqlen) if save_checkpoints else 0
    return (
        empty((batch, dim, seqlen), u),
        empty((batch, dim, A.shape[1]), u, acc),
        empty((n_ck, batch, dim, A.shape[1]), u, acc),
    )


def _bwd_fake(u, delta, A, B, C, z):
    """Gradient shapes: each like its input; du, ddelta and dz in u's layout (strides, that of
    torch.empty_like(u)); dD, ddelta_bias, dinitial_state always present."""
    batch, dim, _ = u.shape
    acc = cpu.acc_dtype(u.dtype)
    return (
        torch.empty_like(u),
        torch.empty_like(u),
        empty(A.shape, A),
        empty(B.shape, B),
        empty(C.shape, C),
        empty((dim,), u, acc),
        torch.empty_like(u) if z is not None else empty((0,), u),
        empty((dim,), u, acc),
        empty((batch, dim, A.shape[1]), u, acc),
    )


@custom_op(
    "mamba_compiled::selective_state_update_cpu", mutates_args=("state",), device_types="cpu"
)
def _state_update_cpu(
    state: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Opt, z: Opt,
    dt_bias: Opt, dt_softplus: bool,
) -> Tensor:
    return cpu.state_update(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus)


@_state_update_cpu.register_fake
def _(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus):
    return empty(x.shape, x)


# --------------------------------------------------------------------------------------------
# The public ops: one body for both devices.


@public_op("mamba_compiled::selective_scan_fwd", mutates_args=())
def selective_scan_fwd(
    u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Opt, z: Opt,
    delta_bias: Opt, initial_state: Opt, delta_softplus: bool, save_checkpoints: bool = True,
) -> tuple[Tensor, Tensor, Tensor]:
    args = (u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus, save_checkpoints)
    if u.device.type == "cuda":
        return lowering().scan_fwd(*args)
    return torch.ops.mamba_compiled.selective_scan_fwd_cpu(*args)


@custom_op("mamba_compiled::selective_scan_bwd", mutates_args=())
def selective_scan_bwd(
    dout: Tensor, dlast_state: Opt, u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
    D: Opt, z: Opt, delta_bias: Opt, initial_state: Opt, checkpoints: Tensor,
    delta_softplus: bool, deterministic: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    return _scan_bwd(
        dout, dlast_state, u, delta, A, B, C, D, z, delta_bias, initial_state, checkpoints,
        delta_softplus, deterministic,
    )  # fmt: skip


def _scan_bwd(
    dout, dlast_state, u, delta, A, B, C, D, z, delta_bias, initial_state, checkpoints,
    delta_softplus, deterministic,
):  # fmt: skip
    """The backward op's body (also the eager path's backward, `_EagerScan`)."""
    if u.device.type == "cuda":
        return lowering().scan_bwd(
            dout, dlast_state, u, delta, A, B, C, D, z, delta_bias, initial_state, checkpoints,
            delta_softplus, deterministic,
        )
    # The CPU kernel has no atomics: it is deterministic either way. It returns contiguous
    # gradients; du, ddelta, dz go back in u's layout, as the fake says.
    du, ddelta, dA, dB, dC, dD, dz, ddelta_bias, dinitial_state = cpu.scan_bwd(
        dout, dlast_state, u, delta, A, B, C, D, z, delta_bias, initial_state, checkpoints,
        delta_softplus,
    )
    du, ddelta = layout_of(du, u), layout_of(ddelta, u)
    dz = layout_of(dz, u) if z is not None else dz
    return du, ddelta, dA, dB, dC, dD, dz, ddelta_bias, dinitial_state


@selective_scan_bwd.register_fake
def _(dout, dlast_state, u, delta, A, B, C, D, z, delta_bias, initial_state, checkpoints,
      delta_softplus, deterministic):
    return _bwd_fake(u, delta, A, B, C, z)


@public_op("mamba_compiled::selective_state_update", mutates_args=("state",))
def selective_state_update_op(
    state: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Opt, z: Opt,
    dt_bias: Opt, dt_softplus: bool,
) -> Tensor:
    if x.device.type == "cuda":
        return lowering().state_update(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus)
    return torch.ops.mamba_compiled.selective_state_update_cpu(
        state, x, dt, A, B, C, D, z, dt_bias, dt_softplus
    )


@public_op("mamba_compiled::conv_x_proj", mutates_args=())
def conv_x_proj_op(
    conv_state: Tensor, conv_x: Tensor, conv_weight: Tensor, conv_bias: Opt, x_proj_weight: Tensor
) -> Tensor:
    if conv_x.device.type == "cuda":
        return lowering().conv_x_proj(conv_state, conv_x, conv_weight, conv_bias, x_proj_weight)
    u = conv_step(conv_state, conv_x, conv_weight, conv_bias)
    acc = torch.float64 if conv_x.dtype == torch.float64 else torch.float32
    return (u.to(acc) @ x_proj_weight.to(acc).t())[None]  # one partial sum


@public_op("mamba_compiled::ssm_decode_step", mutates_args=("state", "conv_state"))
def ssm_decode_step_op(
    state: Tensor, conv_state: Tensor, conv_x: Tensor, conv_weight: Tensor, conv_bias: Opt,
    x_dbl: Tensor, dt_weight: Tensor, A: Tensor, D: Opt, z: Opt, dt_bias: Opt,
    dt_softplus: bool,
) -> Tensor:
    if conv_x.device.type == "cuda":
        return lowering().state_update(
            state, None, None, A, None, None, D, z, dt_bias, dt_softplus, dt_weight, conv_state,
            conv_x, conv_weight, conv_bias, x_dbl,
        )  # fmt: skip
    rank, dstate = dt_weight.shape[1], A.shape[1]
    xd = x_dbl.to(state.dtype).sum(0).to(conv_x.dtype)  # rounded as the model rounds x_proj
    dt_low, B, C = torch.split(xd, [rank, dstate, dstate], dim=-1)
    u = conv_step(conv_state, conv_x, conv_weight, conv_bias)
    dt = dt_low.to(state.dtype) @ dt_weight.to(state.dtype).t()  # in fp32, as the kernel
    out = torch.ops.mamba_compiled.selective_state_update_cpu(
        state, u, dt, A, B[:, None].contiguous(), C[:, None].contiguous(), D, z, dt_bias,
        dt_softplus,
    )  # fmt: skip
    conv_state.copy_(torch.cat([conv_state[:, :, 1:], conv_x[:, :, None]], dim=-1))
    return out


def conv_step(
    conv_state: Tensor, x: Tensor, conv_weight: Tensor, conv_bias: Tensor | None
) -> Tensor:
    """One step of the causal depthwise conv and its SiLU, in float32 (float64 for float64),
    rounded to x's dtype: the window is conv_state's (batch, dim, width) last width - 1 columns,
    then x (batch, dim); conv_weight (dim, width), conv_bias (dim,). What `ssm_decode_step`
    computes; a model's decode step uses it for x_proj's input, so that both agree. Written
    without a cat: under torch.compile it then folds into the prologue of x_proj's reduction
    (a cat is stored: one kernel more per layer and token, seen on the H200)."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    w = conv_weight.to(acc)
    u = (conv_state[:, :, 1:].to(acc) * w[:, :-1]).sum(-1) + x.to(acc) * w[:, -1]
    if conv_bias is not None:
        u = u + conv_bias.to(acc)
    return F.silu(u).to(x.dtype)


# --------------------------------------------------------------------------------------------
# Autograd: the backward is the registered backward op.


def _setup_context(ctx, inputs, output):
    u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus, save_checkpoints = inputs
    ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, initial_state, output[2])
    ctx.delta_softplus = delta_softplus
    ctx.save_checkpoints = save_checkpoints
    # an unused output's gradient comes as None: no zeros the size of the checkpoints (the
    # checkpoints' gradient is never used; at 8x4096x2048 bf16 a 0.27 GB fill per backward)
    ctx.set_materialize_grads(False)


def _backward(ctx, dout, dlast_state, _dcheckpoints):
    return _gradients(ctx, dout, dlast_state, torch.ops.mamba_compiled.selective_scan_bwd)


def _gradients(ctx, dout, dlast_state, scan_bwd):
    """The 11 gradients of the forward's inputs, by `scan_bwd` (the op, or its body)."""
    if not ctx.save_checkpoints:
        raise RuntimeError(
            "selective_scan_fwd ran with save_checkpoints=False (inference): it kept nothing for "
            "a backward; call it with save_checkpoints=True on inputs that need gradients"
        )
    u, delta, A, B, C, D, z, delta_bias, initial_state, checkpoints = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(u)
    # dout may have any strides (e.g. out_proj's gradient, transposed): both kernels take them.
    if dlast_state is not None:
        dlast_state = dlast_state.contiguous()
    du, ddelta, dA, dB, dC, dD, dz, ddelta_bias, dinitial_state = scan_bwd(
        dout, dlast_state, u, delta, A, B, C, D, z, delta_bias, initial_state, checkpoints,
        ctx.delta_softplus, torch.are_deterministic_algorithms_enabled(),
    )  # fmt: skip
    return (
        du, ddelta, dA, dB, dC,
        dD if D is not None else None,
        dz if z is not None else None,
        ddelta_bias if delta_bias is not None else None,
        dinitial_state if initial_state is not None else None,
        None,
        None,
    )


selective_scan_fwd.register_autograd(_backward, setup_context=_setup_context)


class _EagerScan(torch.autograd.Function):
    """`selective_scan_fn` in eager: the op's kernels and autograd formula, called directly.

    Through torch.library an eager call of the op and of its backward costs ~0.3-0.5 ms of host
    time each (the custom op's autograd wrapper, redispatch and alias checks), as much as the
    GPU's work at 8x2048x2048: such calls were host-bound (perf/NOTES.md, Run 20). Whenever
    anything could be watching (torch.compile, export, fake or functional tensors, a torch
    function or dispatch mode, functorch), `selective_scan_fn` calls the op instead.
    """

    @staticmethod
    def forward(ctx, *args):
        u = args[0]
        scan_fwd = lowering().scan_fwd if u.device.type == "cuda" else cpu.scan_fwd
        out, last_state, checkpoints = scan_fwd(*args)
        _setup_context(ctx, args, (out, last_state, checkpoints))
        return out, last_state

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout, dlast_state):
        return _gradients(ctx, dout, dlast_state, _scan_bwd)


_PLAIN = (Tensor, torch.nn.Parameter)  # a model's D and delta_bias are parameters


def _watched(args) -> bool:
    """Whether a call may be traced or intercepted: then it must go through the op."""
    return (
        torch.compiler.is_compiling()
        or any(t is not None and type(t) not in _PLAIN for t in args)
        or torch._C._is_torch_function_mode_enabled()
        or torch._C._len_torch_dispatch_stack() > 0
        or torch._C._are_functorch_transforms_active()
    )


# --------------------------------------------------------------------------------------------
# The public API, drop-in for mamba_ssm's names.


def selective_scan_fn(
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
    *,
    initial_state: Tensor | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """The selective scan (Mamba-1, real A), as mamba_ssm's `selective_scan_fn`.

    u, delta, z: (batch, dim, seqlen), float32/float16/bfloat16 (one dtype);
    A: (dim, dstate) float32; B, C: (dim, dstate) shared, (batch, dstate, seqlen) per step, or
    (batch, groups, dstate, seqlen) grouped; D, delta_bias: (dim,) float32;
    initial_state: (batch, dim, dstate) float32, the state before the first step (differentiable).

    Returns out (batch, dim, seqlen) in u's dtype, and with return_last_state also the state after
    the last step, (batch, dim, dstate) float32.
    """
    args = check_scan_inputs(u, delta, A, B, C, D, z, delta_bias, initial_state)
    # checkpoints for the backward only when one can follow (under no_grad / inference_mode, or
    # on inputs that need no gradient, the kernel writes none: a third of its bytes at bf16)
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in args)
    if _watched(args):
        out, last_state, _ = torch.ops.mamba_compiled.selective_scan_fwd(
            *args, bool(delta_softplus), grad
        )
    else:
        out, last_state = _EagerScan.apply(*args, bool(delta_softplus), grad)
    return (out, last_state) if return_last_state else out


def selective_state_update(
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
) -> Tensor:
    """One decode step of the scan: updates `state` in place and returns the output.

    state: (batch, dim, dstate) float32, contiguous; x, dt, z: (batch, dim); A: (dim, dstate);
    B, C: (batch, dstate) or (batch, groups, dstate); D, dt_bias: (dim,).
    Returns out (batch, dim) in x's dtype. Equal to one step of `selective_scan_fn` started from
    `state`, whose last state is written back into `state`.
    """
    args = check_state_update_inputs(state, x, dt, A, B, C, D, z, dt_bias)
    return torch.ops.mamba_compiled.selective_state_update(state, *args, bool(dt_softplus))


def conv_x_proj(
    conv_state: Tensor,
    conv_x: Tensor,
    conv_weight: Tensor,
    x_proj_weight: Tensor,
    conv_bias: Tensor | None = None,
) -> Tensor:
    """The conv's step and x_proj for one decoding step, as partial sums (one kernel on CUDA).

    u = `conv_step(conv_state, conv_x, conv_weight, conv_bias)` (conv_state (batch, dim,
    d_conv), conv_x (batch, dim), conv_weight (dim, d_conv), conv_bias (dim,)), then
    u @ x_proj_weight.T (x_proj_weight (rows, dim)) as x_dbl (P, batch, rows) in float32
    (float64 for float64 inputs): P partial sums over slices of the channels (P = 1 on CPU)
    whose sum is x_proj's output.
    `ssm_decode_step` takes x_dbl as it is. conv_state is not changed.
    """
    args = check_conv_x_proj_inputs(conv_state, conv_x, conv_weight, conv_bias, x_proj_weight)
    if pdl.use_pdl(conv_x):
        return torch.ops.mamba_compiled.conv_x_proj_pdl(*args)
    return torch.ops.mamba_compiled.conv_x_proj(*args)


def ssm_decode_step(
    state: Tensor,
    conv_state: Tensor,
    conv_x: Tensor,
    conv_weight: Tensor,
    x_dbl: Tensor,
    dt_weight: Tensor,
    A: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    dt_bias: Tensor | None = None,
    dt_softplus: bool = False,
    conv_bias: Tensor | None = None,
) -> Tensor:
    """The Mamba mixer's decode step after x_proj, one kernel on CUDA.

    x_dbl (P, batch, dt_rank + 2·dstate): x_proj's output as P partial sums (`conv_x_proj`'s
    output, or x_proj's output with a leading dimension of 1), summed in float32 and rounded to
    conv_x's dtype, then split into dt_low, B and C (batch, dstate). Computes u =
    `conv_step(conv_state, conv_x, conv_weight, conv_bias)` (conv_x (batch, dim), this step's
    conv input; conv_weight (dim, d_conv), conv_bias (dim,)) and dt = dt_low @ dt_weight.T
    (dt_proj without its bias, in float32; dt_weight (dim, dt_rank)), then
    `selective_state_update(state, u, dt, A, B, C, D, z, dt_bias, dt_softplus)`, and shifts the
    conv window: conv_state (batch, dim, d_conv) <- its last d_conv - 1 columns, then conv_x.
    Updates `state` and `conv_state` in place; returns out (batch, dim) in conv_x's dtype.
    """
    args = check_decode_step_inputs(
        state, conv_state, conv_x, conv_weight, conv_bias, x_dbl, dt_weight, A, D, z, dt_bias
    )
    conv_x, conv_weight, conv_bias, x_dbl, dt_weight, A, D, z, dt_bias = args
    op = (
        torch.ops.mamba_compiled.ssm_decode_step_pdl
        if pdl.use_pdl(conv_x)
        else torch.ops.mamba_compiled.ssm_decode_step
    )
    return op(
        state, conv_state, conv_x, conv_weight, conv_bias, x_dbl, dt_weight, A, D, z,
        dt_bias, bool(dt_softplus),
    )  # fmt: skip
