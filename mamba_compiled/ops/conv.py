"""The causal depthwise conv and its SiLU over a whole sequence (the Mamba mixer's, in the
model's (channels, batch, L) memory): Triton kernels on CUDA, plain PyTorch elsewhere (and on
CUDA after `set_conv_kernels(False)`).

Why kernels on CUDA although the compiler fuses the plain version: the kernels
(`mamba_compiled.lowering.conv`) store SiLU's gradient once in the backward, which Inductor's
code for the plain version does not, and with `recompute` the compiled plain version kept a
padded copy of the conv's input per layer. On an H200 (eleventh session, perf/RESULTS.md):
the 130M training step 72.7 -> 68.9 ms, the 1.4B step with `recompute` 63.3 -> 56.7 GB peak.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from mamba_compiled.ops.cpu import acc_dtype
from mamba_compiled.ops.registry import Opt, layout_of, lowering, public_op

_KERNELS = {"on": True}


def set_conv_kernels(on: bool) -> bool:
    """CUDA tensors through `conv1d_silu` run the Triton kernels (on, the default) or the plain
    PyTorch version (off); returns the previous setting. For comparisons: a compiled graph
    keeps the choice it was traced with (and the compile caches do not see it: tag them, as
    perf/bench_train.py does)."""
    previous, _KERNELS["on"] = _KERNELS["on"], bool(on)
    return previous


def conv1d_silu(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """silu(causal depthwise conv(x)) for x (d_inner, b, l), zeros before the sequence;
    weight (d_inner, W), bias (d_inner,) or None. Differentiable in all three."""
    if x.is_cuda and _KERNELS["on"]:
        return torch.ops.mamba_compiled.conv1d_silu(x, weight, bias)
    return _ConvSiLU.apply(x, weight, bias)


def causal_conv(xp: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """Causal depthwise conv of a left-extended input (d_inner, b, W-1+l) -> (d_inner, b, l);
    weight (d_inner, W), bias (d_inner,), both taken in xp's dtype.

    Written as W shifted multiply-adds rather than F.conv1d: the compiler fuses them with the
    SiLU around them, and no convolution backend is chosen by shape.
    """
    W = weight.shape[1]
    l = xp.shape[-1] - (W - 1)
    w = weight.to(xp.dtype)[:, :, None]  # (d_inner, W, 1)
    out = xp[:, :, 0:l] * w[:, 0:1]
    for k in range(1, W):
        out = out + xp[:, :, k : k + l] * w[:, k : k + 1]
    if bias is not None:
        out = out + bias.to(xp.dtype)[:, None, None]
    return out


def _conv_silu(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """silu(causal_conv(x after W-1 zeros))."""
    return F.silu(causal_conv(F.pad(x, (weight.shape[1] - 1, 0)), weight, bias))


class _ConvSiLU(torch.autograd.Function):
    """silu(causal depthwise conv(x)) for x (d_inner, b, l) after zeros, with its backward
    written out in plain PyTorch (the compiler traces and fuses both).

    Autograd's own backward of `causal_conv` became three Inductor kernels that each recomputed
    SiLU's gradient g (the dx kernel once per tap, on the padded length W-1+l), 0.37 ms per
    layer of the 130M training step on an H200. From this backward Inductor makes two: the conv
    recomputed from the padded input it keeps, then dx, dw and dbias in one reduction kernel per
    channel (g still recomputed per tap there); 0.25 ms per layer (perf/NOTES.md, Run 13). The
    backward below recomputes the conv from x, but the joint graph merges that with the
    forward's, so Inductor keeps the padded input rather than x. With `recompute` the 1.4B
    step's peak grew by 6.6 GB: 48 times that input's 138 MB (its rows padded to 2112), so
    likely kept per layer there. Recomputing in float32 instead (not merged: x alone is kept)
    measured slower at 130M (74.6 against 72.7 ms); its 1.4B memory was not measured.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        ctx.save_for_backward(x, weight, bias)
        return _conv_silu(x, weight, bias)

    @staticmethod
    def backward(ctx, du: Tensor):
        x, weight, bias = ctx.saved_tensors
        dx, dw, dbias = _ConvSiLU.grads(du, x, weight, bias)
        return dx, dw.to(weight.dtype), dbias

    @staticmethod
    def grads(du: Tensor, x: Tensor, weight: Tensor, bias: Tensor | None):
        """(dx, dweight in fp32, dbias in bias's dtype or None)."""
        W, l = weight.shape[1], x.shape[-1]
        acc = acc_dtype(x.dtype)
        xp = F.pad(x, (W - 1, 0))
        pre = causal_conv(xp, weight, bias).to(acc)
        s = torch.sigmoid(pre)
        g = (du.to(acc) * s * (1 + pre * (1 - s))).to(x.dtype)
        # out[t] = sum_k w_k xp[t + k]: dx[t] = sum_k w_k g[t + W-1-k], zero past the end
        gp = F.pad(g, (0, W - 1))
        w = weight.to(x.dtype)
        dx = gp[:, :, 0:l] * w[:, W - 1, None, None]
        for k in range(W - 1):
            dx = dx + gp[:, :, W - 1 - k : W - 1 - k + l] * w[:, k, None, None]
        ga = g.to(acc)
        dw = torch.stack([(ga * xp[:, :, k : k + l].to(acc)).sum((1, 2)) for k in range(W)], 1)
        dbias = ga.sum((1, 2)).to(bias.dtype) if bias is not None else None
        return dx, dw, dbias


# --------------------------------------------------------------------------------------------
# The kernels as ops (CUDA; the CPU branch is the plain version, for opcheck and CPU tests).


@public_op("mamba_compiled::conv1d_silu", mutates_args=())
def conv1d_silu_op(x: Tensor, weight: Tensor, bias: Opt) -> Tensor:
    if x.device.type == "cuda":
        return lowering().conv_silu_fwd(x, weight, bias)
    return _conv_silu(x, weight, bias)


@public_op("mamba_compiled::conv1d_silu_bwd", mutates_args=())
def conv1d_silu_bwd_op(
    du: Tensor, x: Tensor, weight: Tensor, bias: Opt
) -> tuple[Tensor, Tensor, Tensor]:
    """(dx in x's layout (`empty_like`) and dtype, dweight and dbias (always, (d_inner,)) in
    fp32)."""
    if x.device.type == "cuda":
        return lowering().conv_silu_bwd(du, x, weight, bias)
    acc = acc_dtype(x.dtype)
    dx, dw, dbias = _ConvSiLU.grads(du, x, weight, bias)
    if dbias is None:
        dbias = du.new_zeros(weight.shape[0], dtype=acc)
    return layout_of(dx, x), dw.to(acc), dbias.to(acc)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, du):
    x, weight, bias = ctx.saved_tensors
    dx, dw, dbias = torch.ops.mamba_compiled.conv1d_silu_bwd(du, x, weight, bias)
    return dx, dw.to(weight.dtype), None if bias is None else dbias.to(bias.dtype)


conv1d_silu_op.register_autograd(_backward, setup_context=_setup_context)
