"""The Mamba mixer (Gu & Dao 2023, Section 3.4, Algorithm 2): plain PyTorch around the scan op.

    in_proj -> (x, z);  x -> causal depthwise conv1d -> SiLU -> u
    u -> x_proj -> (Δ, B, C);  Δ -> dt_proj (its bias and the softplus run inside the scan)
    y = selective_scan(u, Δ, A, B, C, D, z)  =  SSM(u) * SiLU(z)
    out_proj(y)

Everything but the scan is ordinary PyTorch for the compiler to fuse; the scan is the registered
op `selective_scan_fn` (one decode step: `conv_x_proj`, the conv's step and x_proj as partial
sums, then `ssm_decode_step`, the state update with dt_proj and the conv-window shift), whichever
kernel serves it. The conv and its SiLU over a sequence go through `ops.conv1d_silu`: Triton
kernels on CUDA (measured faster and lighter than Inductor's code for it; `ops.set_conv_kernels`),
plain PyTorch with a written-out backward elsewhere.

Glossary (code -> paper): b batch, l sequence length, d_model D, d_inner E·D, d_state N,
dt / delta Δ, A_log log(-A), D the skip connection, z the gate.

Parameter names, shapes and initialization are mamba_ssm's (`mamba_ssm/modules/mamba_simple.py`),
so its state dicts load with strict=True. A_log and D stay float32 whatever the model's dtype.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from mamba_compiled.models.config import MambaConfig
from mamba_compiled.ops import conv1d_silu, conv_x_proj, selective_scan_fn, ssm_decode_step
from mamba_compiled.ops.conv import causal_conv

# Decoding batches up to this size project with reductions under the compiler (see `_gemv`).
GEMV_MAX_BATCH = 8
# Decoding batches up to FUSED_MAX_BATCH, and from GEMV_MAX_BATCH + 1 to DOT_MAX_BATCH, run their
# projections as `decode_linear` on CUDA (see `fused_decoding`). Its batch-1 kernel reads the
# weights once per row, so batches 2 to 8 stay with the compiler's reductions (`_gemv`); from 9
# rows on it multiplies tiles with tl.dot and reads each weight once for 64 rows.
FUSED_MAX_BATCH = 1
DOT_MAX_BATCH = 64


def fused_decoding(x: Tensor) -> bool:
    """Whether a decode step on x (b, d_model) runs each block's RMSNorm and in_proj, and its
    out_proj and residual add, as `decode_linear` (two kernels per block, and the final norm
    with the LM head as one up to GEMV_MAX_BATCH): on CUDA, for batches up to FUSED_MAX_BATCH
    and from GEMV_MAX_BATCH + 1 to DOT_MAX_BATCH. Otherwise the modules' own math (`_gemv`
    under the compiler, cuBLAS above DOT_MAX_BATCH). x_proj and dt_proj are inside the decode
    ops (`conv_x_proj`, `ssm_decode_step`) at every batch."""
    b = x.shape[0]
    return x.is_cuda and (b <= FUSED_MAX_BATCH or GEMV_MAX_BATCH < b <= DOT_MAX_BATCH)


def set_recompute(model: nn.Module, on: bool = True) -> nn.Module:
    """Sets `recompute` on every Mamba mixer of `model` (see `Mamba.__init__`); returns model."""
    for module in model.modules():
        if isinstance(module, Mamba):
            module.recompute = on
    return model


def _gemv(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """`F.linear(x, weight, bias)` for one decoding step, x (b, in).

    Under torch.compile, small batches multiply as an explicit reduction, which Inductor turns
    into its own Triton kernel (weights read once, coalesced, with fp32 accumulation) and can fuse
    with what produces x. cuBLAS's kernels for these skinny shapes take 4-6 us each on an H200 for
    a few MB of weights (profile of the 130M decode step in perf/RESULTS.md). In eager, and for
    larger batches, it is the plain linear layer.

    The reduction stores in x's dtype (Inductor still multiplies and accumulates in fp32): a
    float32 result cast afterwards is a separate node, which Inductor recomputed and stored once
    per view that our kernel reads (dt, B, C of x_proj; z of in_proj): 4 kernels more per layer
    and token in the 130M decode step (243 against 153 kernels, 114 against 97 ms for 100 + 200
    tokens; perf/RESULTS.md, third session). Don't put a pointwise epilogue between such a
    reduction and the views either (an RMSNorm folded in as rsqrt(mean(x²)) · (x·g) @ W.T did
    that: Inductor kept the epilogue out of the reduction kernel and stored z separately again).
    """
    if not torch.compiler.is_compiling() or x.shape[0] > GEMV_MAX_BATCH:
        return F.linear(x, weight, bias)
    out = (x[:, None, :] * weight).sum(-1)
    return out if bias is None else out + bias


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The scan's parameter and state dtype: float32, or float64 for a float64 model (tests)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class Mamba(nn.Module):
    def __init__(self, config: MambaConfig, layer_idx: int | None = None, device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.layer_idx = layer_idx
        self.d_model = config.d_model
        self.d_state = config.d_state
        self.d_conv = config.d_conv
        self.d_inner = config.d_inner
        self.dt_rank = config.dt_rank

        self.in_proj = nn.Linear(self.d_model, 2 * self.d_inner, bias=config.bias, **factory)
        self.conv1d = nn.Conv1d(
            self.d_inner,
            self.d_inner,
            kernel_size=self.d_conv,
            groups=self.d_inner,
            padding=self.d_conv - 1,
            bias=config.conv_bias,
            **factory,
        )
        self.x_proj = nn.Linear(
            self.d_inner, self.dt_rank + 2 * self.d_state, bias=False, **factory
        )
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True, **factory)
        # S4D-real initialization A = -(1, 2, ..., N) per channel, stored as log(-A) in float32.
        A = torch.arange(1, self.d_state + 1, dtype=torch.float32, device=device)
        self.A_log = nn.Parameter(torch.log(A).repeat(self.d_inner, 1))  # (d_inner, N)
        self.D = nn.Parameter(torch.ones(self.d_inner, dtype=torch.float32, device=device))
        self.out_proj = nn.Linear(self.d_inner, self.d_model, bias=config.bias, **factory)
        # Training memory against time: when set, the conv, x_proj and dt_proj are recomputed in
        # the backward instead of keeping their outputs (about 3 (b·l, d_inner) tensors per
        # layer; mamba_ssm's checkpoint_lvl=1 does the same). Not part of the config.
        self.recompute = False
        self._init_dt(config)
        self.tag_parameters()

    def tag_parameters(self) -> None:
        """mamba_ssm's parameter flags, read by optimizers and init: A_log and D take no weight
        decay; dt_proj.bias keeps its special init. (Call again after replacing parameters.)"""
        self.A_log._no_weight_decay = True
        self.D._no_weight_decay = True
        self.dt_proj.bias._no_reinit = True

    @torch.no_grad()
    def _init_dt(self, config: MambaConfig) -> None:
        # dt_proj.weight keeps the variance of Δ at init; its bias is softplus⁻¹ of a log-uniform
        # draw in [dt_min, dt_max], so that Δ = softplus(dt_proj(.) + bias) starts in that range.
        std = self.dt_rank**-0.5 * config.dt_scale
        if config.dt_init == "constant":
            nn.init.constant_(self.dt_proj.weight, std)
        else:
            nn.init.uniform_(self.dt_proj.weight, -std, std)
        dt = torch.exp(
            torch.rand(self.d_inner, device=self.dt_proj.bias.device)
            * (math.log(config.dt_max) - math.log(config.dt_min))
            + math.log(config.dt_min)
        ).clamp(min=config.dt_init_floor)
        self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse of softplus

    def forward(
        self,
        hidden_states: Tensor,
        conv_state: Tensor | None = None,
        ssm_state: Tensor | None = None,
        mask: Tensor | None = None,
    ) -> Tensor:
        """(b, l, d_model) -> (b, l, d_model).

        With `conv_state` (b, d_inner, d_conv) and `ssm_state` (b, d_inner, N) float32, the sequence
        continues from them and they are overwritten with the state after its last step (prefill,
        chunked prefill). `mask` (b, l), 1 for tokens and 0 for left padding, zeroes the conv and
        scan inputs at padded positions, so that padding leaves a zero state behind it.
        """
        b, l, _ = hidden_states.shape
        E, R, N = self.d_inner, self.dt_rank, self.d_state
        # Memory layout (channels, b, l), time contiguous, from in_proj to out_proj: every
        # projection is one plain GEMM over b*l columns (mamba_ssm's mamba_inner_fn does the same),
        # the conv and the elementwise kernels read along time, and the scan takes its inputs and
        # writes its output as (b, channels, l) views of that memory, without a transpose.
        # x and z as two products, not views of one: the scan saves z for its backward, and a
        # view would keep all of in_proj's output alive until then (perf/NOTES.md, Run 7)
        h = hidden_states.reshape(b * l, -1).t()
        w, bias = self.in_proj.weight, self.in_proj.bias
        x, z = w[:E] @ h, w[E:] @ h  # (E, b*l) each
        if bias is not None:
            x, z = x + bias[:E, None], z + bias[E:, None]
        x, z = x.view(E, b, l), z.view(E, b, l)
        if mask is not None:
            mask = mask[None, :, :].to(x.dtype)  # (1, b, l)
            x = x * mask
        if self.recompute and conv_state is None and torch.is_grad_enabled():
            # the conv, x_proj and dt_proj run again in the backward, from x: the padded conv
            # input, u and Δ are not kept for it (the scan's backward reads u and Δ)
            u, x_dbl, dt = checkpoint(
                self._conv_and_projections, x, None, mask, use_reentrant=False
            )
        else:
            u, x_dbl, dt = self._conv_and_projections(x, conv_state, mask)

        def per_batch(t: Tensor) -> Tensor:  # (c, b*l) -> the view (b, c, l)
            return t.view(t.shape[0], b, l).permute(1, 0, 2)

        acc = _acc_dtype(u.dtype)
        A = -torch.exp(self.A_log.to(acc))  # (E, N)
        B, C = per_batch(x_dbl[R : R + N]), per_batch(x_dbl[R + N :])  # (b, N, l)
        scan_args = (per_batch(u), per_batch(dt), A, B, C, self.D.to(acc))
        scan_kwargs = dict(
            z=z.permute(1, 0, 2), delta_bias=self.dt_proj.bias.to(acc), delta_softplus=True
        )
        if ssm_state is None:
            y = selective_scan_fn(*scan_args, **scan_kwargs)  # (b, E, l)
        else:
            y, last_state = selective_scan_fn(
                *scan_args, **scan_kwargs, return_last_state=True, initial_state=ssm_state
            )
            ssm_state.copy_(last_state)
        # y comes back in u's layout on CUDA, so this reshape is a view there
        y = y.permute(1, 0, 2).reshape(E, b * l)
        return F.linear(y.t(), self.out_proj.weight, self.out_proj.bias).view(b, l, -1)

    def _conv_and_projections(
        self, x: Tensor, conv_state: Tensor | None, mask: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """x (E, b, l), in_proj's x half -> u (E, b*l), the causal conv and its SiLU; x_dbl
        (R + 2N, b*l), x_proj's output; dt (E, b*l), dt_proj's without its bias."""
        W, E, R = self.d_conv, self.d_inner, self.dt_rank
        # Causal conv: the W-1 inputs before this sequence (zeros, or the cache) on the left.
        weight, bias = self.conv1d.weight[:, 0, :], self.conv1d.bias  # (E, W), (E,)
        if conv_state is None:
            u = conv1d_silu(x, weight, bias)  # (E, b, l)
        else:
            window = conv_state.permute(1, 0, 2)  # (E, b, W)
            xp = torch.cat([window[:, :, 1:].to(x.dtype), x], dim=-1)
            window.copy_(xp[:, :, -W:])  # the last W inputs, what `step` expects
            u = F.silu(causal_conv(xp, weight, bias))
        if mask is not None:
            u = u * mask
        u = u.view(E, -1)
        x_dbl = self.x_proj.weight @ u  # (R + 2N, b*l)
        dt = self.dt_proj.weight @ x_dbl[:R]  # (E, b*l); its bias is added in the scan
        return u, x_dbl, dt

    def scan_constants(self, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor, Tensor]:
        """(A, D, dt_bias) as the scan takes them: A = -exp(A_log), all in the accumulation dtype.

        A decoding loop computes these once per sequence and passes them to `step`, which saves
        a few tiny kernels per layer and token (they count inside a CUDA graph).
        """
        acc = _acc_dtype(dtype)
        return -torch.exp(self.A_log.to(acc)), self.D.to(acc), self.dt_proj.bias.to(acc)

    def step(
        self,
        hidden_states: Tensor,
        conv_state: Tensor,
        ssm_state: Tensor,
        constants: tuple[Tensor, Tensor, Tensor] | None = None,
    ) -> Tensor:
        """One decoding step, (b, d_model) -> (b, d_model); updates both states in place.

        `constants`: `scan_constants()` computed ahead (must be current with the parameters).
        """
        xz = _gemv(hidden_states, self.in_proj.weight, self.in_proj.bias)
        y = self._ssm_step(xz, conv_state, ssm_state, constants)
        return _gemv(y, self.out_proj.weight, self.out_proj.bias)

    def ssm_step(
        self,
        xz: Tensor,
        conv_state: Tensor,
        ssm_state: Tensor,
        constants: tuple[Tensor, Tensor, Tensor] | None = None,
    ) -> Tensor:
        """`step` between in_proj and out_proj: in_proj's output xz (b, 2·d_inner) -> the gated
        SSM output y (b, d_inner); updates both states in place."""
        return self._ssm_step(xz, conv_state, ssm_state, constants)

    def _ssm_step(self, xz, conv_state, ssm_state, constants):
        x, z = xz.chunk(2, dim=-1)  # (b, d_inner) each
        x = x.to(conv_state.dtype)
        # conv_state holds the last W inputs; this step's window is its last W-1 and x.
        w = self.conv1d.weight[:, 0, :]  # (d_inner, W)
        A, D, dt_bias = self.scan_constants(x.dtype) if constants is None else constants
        # the conv's step and x_proj as one op (`conv_x_proj`): up to 8 rows one kernel on CUDA,
        # partial sums over slices of the channels, which the decode kernel sums (Inductor had
        # stored the conv's output in a kernel of its own before x_proj's reduction); above, the
        # conv's step as a kernel and x_proj as a tl.dot product. Then x_proj's sum, the conv,
        # dt_proj (its weight; the bias in the softplus), the state update, the gate and the
        # conv shift: one kernel on CUDA; above batch 8, dt_proj first as a tl.dot product read
        # once for all rows (1.4B, batch 64, H200: 11.8 against 19.0 us per layer for dt_proj,
        # `selective_state_update` and the window's shift as `cat` + copy; perf/RESULTS.md,
        # eighth session)
        x_dbl = conv_x_proj(conv_state, x, w, self.x_proj.weight, self.conv1d.bias)
        y = ssm_decode_step(
            ssm_state,
            conv_state,
            x,
            w,
            x_dbl,
            self.dt_proj.weight,
            A,
            D,
            z=z,
            dt_bias=dt_bias,
            dt_softplus=True,
            conv_bias=self.conv1d.bias,
        )
        return y  # (b, d_inner)
