"""A linear layer for decoding's few rows, with the block's RMSNorm before it and the residual
add after it, as a torch.library op (namespace `mamba_compiled`).

    decode_linear(x, weight, bias?, norm_weight?, eps, residual?) -> out
        out = [residual +] linear([rms_norm(x) · norm_weight], weight, bias)

A decode step at batch 1 is a chain of matrix-vector products, each bound by reading its weight
once (and, at small sizes, by the latency of its first loads). On CUDA this is one Triton kernel
(`mamba_compiled.lowering.linear`) that issues every weight load first and does the norm (in its
prologue) and the residual add (in its epilogue), so a Mamba block's decode step is four
kernels: this op for in_proj with the norm, `conv_x_proj`, `ssm_decode_step`, this op for
out_proj with the residual (perf/RESULTS.md, fifth session: 1.4B's decode step 1.57 -> 1.40 ms
per token on an H200). On CPU the body is
plain PyTorch with the model's own rounding (the norm's output and the linear layer's output in
the model dtype).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from mamba_compiled.ops import pdl
from mamba_compiled.ops.checks import check_decode_linear_inputs
from mamba_compiled.ops.registry import Opt, lowering, public_op


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """RMSNorm: x / sqrt(mean(x²) + eps) · weight over the last dimension, computed in float32
    (float64 for float64), returned in x's dtype."""
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (xf * weight.to(xf.dtype)).to(x.dtype)


@public_op("mamba_compiled::decode_linear", mutates_args=())
def decode_linear_op(
    x: Tensor, weight: Tensor, bias: Opt, norm_weight: Opt, eps: float, residual: Opt
) -> Tensor:
    if x.device.type == "cuda":
        return lowering().decode_linear(x, weight, bias, norm_weight, eps, residual)
    h = x if norm_weight is None else rms_norm(x.to(norm_weight.dtype), norm_weight, eps)
    out = F.linear(h, weight, bias)
    return out if residual is None else (residual + out).to(residual.dtype)


def decode_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    *,
    norm_weight: Tensor | None = None,
    eps: float = 1e-5,
    residual: Tensor | None = None,
) -> Tensor:
    """A linear layer for a decoding step's rows, with an RMSNorm before it and a residual add
    after it (one kernel on CUDA).

    x (batch, in_features); weight (out_features, in_features), bias (out_features,) and
    norm_weight (in_features,) in weight's dtype; residual (batch, out_features).
    With norm_weight, x (any floating dtype, e.g. the float32 residual stream) is first
    normalized as the model's RMSNorm does (`rms_norm(x, norm_weight, eps)`); without it, x must
    have weight's dtype. The product accumulates in float32 and is rounded to weight's dtype;
    with residual, out = residual + that, in residual's dtype. Returns (batch, out_features).
    On CUDA, batches up to 8 run one row per program (each row reads the weight, from L2 after
    the first), larger ones `tl.dot` tiles of up to 64 rows; correct for any batch.
    """
    args = check_decode_linear_inputs(x, weight, bias, norm_weight, eps, residual)
    if pdl.use_pdl(x):
        return torch.ops.mamba_compiled.decode_linear_pdl(*args)
    return torch.ops.mamba_compiled.decode_linear(*args)
