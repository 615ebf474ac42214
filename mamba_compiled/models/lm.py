"""The Mamba language model: embedding, a homogeneous stack of pre-norm residual blocks, a final
norm and a (tied) LM head. Module tree and parameter names are mamba_ssm's
(`mamba_ssm/models/mixer_seq_simple.py`):

    MambaLMHeadModel
      backbone: MixerModel
        embedding            Embedding(padded_vocab_size, d_model): an nn.Embedding
        layers[i]: Block
          norm               RMSNorm (or LayerNorm)
          mixer: Mamba       in_proj, conv1d, x_proj, dt_proj, A_log, D, out_proj
        norm_f
      lm_head                nn.Linear(d_model, padded_vocab_size), tied to the embedding

Plain modules: no kernels, no compiler switches. Compile from outside (`torch.compile(model)`).
"""

from __future__ import annotations

import math
from collections import namedtuple
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mamba_compiled.models import checkpoints
from mamba_compiled.models.config import MambaConfig
from mamba_compiled.models.mamba import GEMV_MAX_BATCH, Mamba, fused_decoding
from mamba_compiled.ops import decode_linear
from mamba_compiled.ops.linear import rms_norm

# What mamba_ssm's MambaLMHeadModel.forward returns. Defined once and registered under a stable
# name so that a torch.export'ed model (whose output is this tuple) can be saved and loaded.
CausalLMOutput = namedtuple("CausalLMOutput", ["logits"])
torch.utils._pytree._register_namedtuple(
    CausalLMOutput, serialized_type_name="mamba_compiled.models.CausalLMOutput"
)

# (conv_state (b, d_inner, d_conv), ssm_state (b, d_inner, d_state) float32), one pair per layer.
LayerStates = Sequence[tuple[Tensor, Tensor]]


class RMSNorm(nn.Module):
    """x / sqrt(mean(x²) + eps) · weight, computed in float32 (float64 for float64), returned in
    the input's dtype."""

    def __init__(self, dim: int, eps: float = 1e-5, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class Block(nn.Module):
    """Pre-norm residual block: x + mixer(norm(x)). The residual stream is float32 when
    residual_in_fp32 (as mamba_ssm's Block, without its fused add+norm kernel)."""

    def __init__(self, config: MambaConfig, layer_idx: int, device=None, dtype=None):
        super().__init__()
        norm_cls = RMSNorm if config.rms_norm else nn.LayerNorm
        self.norm = norm_cls(config.d_model, eps=config.norm_epsilon, device=device, dtype=dtype)
        self.mixer = Mamba(config, layer_idx=layer_idx, device=device, dtype=dtype)
        self.layer_idx = layer_idx

    def forward(self, x: Tensor, conv_state=None, ssm_state=None, mask=None) -> Tensor:
        h = self.norm(x.to(self.norm.weight.dtype))
        return x + self.mixer(h, conv_state, ssm_state, mask)

    def step(self, x: Tensor, conv_state: Tensor, ssm_state: Tensor, constants=None) -> Tensor:
        mixer = self.mixer
        if isinstance(self.norm, RMSNorm) and fused_decoding(x):
            # the norm with in_proj (inside its kernel up to GEMV_MAX_BATCH rows, a kernel of
            # its own before the product above), out_proj with the residual add
            xz = decode_linear(
                x, mixer.in_proj.weight, mixer.in_proj.bias, norm_weight=self.norm.weight,
                eps=self.norm.eps,
            )  # fmt: skip
            y = mixer.ssm_step(xz, conv_state, ssm_state, constants)
            return decode_linear(y, mixer.out_proj.weight, mixer.out_proj.bias, residual=x)
        h = self.norm(x.to(self.norm.weight.dtype))
        return x + mixer.step(h, conv_state, ssm_state, constants)


SMALL_VOCAB = 256  # embeddings of at most this many rows take their gradient as a matmul


class _SmallEmbedding(torch.autograd.Function):
    """F.embedding whose weight gradient is one_hot(ids)^T @ grad, a matmul, instead of a scatter
    of atomic adds. With few rows (the synthetic tasks' 16 tokens, bytes' 256) every row takes
    thousands of atomic adds to the same addresses: Inductor's scatter took 1.25 ms of a 10.7 ms
    Selective Copying step (64 x 4096 tokens, vocabulary 16) on an H200 (perf/NOTES.md)."""

    @staticmethod
    def forward(ids: Tensor, weight: Tensor) -> Tensor:
        return F.embedding(ids, weight)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ids, weight = inputs
        ctx.save_for_backward(ids)
        ctx.rows = weight.shape[0]

    @staticmethod
    def backward(ctx, grad: Tensor):
        (ids,) = ctx.saved_tensors
        one_hot = F.one_hot(ids.reshape(-1), ctx.rows).to(grad.dtype)  # (tokens, rows)
        return None, one_hot.t() @ grad.reshape(-1, grad.shape[-1])


class Embedding(nn.Embedding):
    """nn.Embedding (same parameters and state dict) whose weight gradient, for vocabularies of
    at most SMALL_VOCAB rows, is `_SmallEmbedding`'s matmul when training (the plain lookup
    only: with padding_idx, max_norm, scale_grad_by_freq or sparse, nn.Embedding's own)."""

    def forward(self, ids: Tensor) -> Tensor:
        w = self.weight
        plain = self.padding_idx is None and self.max_norm is None
        plain = plain and not (self.scale_grad_by_freq or self.sparse)
        if plain and w.shape[0] <= SMALL_VOCAB and w.requires_grad and torch.is_grad_enabled():
            return _SmallEmbedding.apply(ids, w)
        return super().forward(ids)


class MixerModel(nn.Module):
    def __init__(self, config: MambaConfig, device=None, dtype=None):
        super().__init__()
        self.residual_in_fp32 = config.residual_in_fp32
        self.embedding = Embedding(
            config.padded_vocab_size, config.d_model, device=device, dtype=dtype
        )
        self.layers = nn.ModuleList(
            Block(config, i, device=device, dtype=dtype) for i in range(config.n_layer)
        )
        norm_cls = RMSNorm if config.rms_norm else nn.LayerNorm
        self.norm_f = norm_cls(config.d_model, eps=config.norm_epsilon, device=device, dtype=dtype)

    def _residual(self, x: Tensor) -> Tensor:
        return x.float() if self.residual_in_fp32 else x

    def forward(self, input_ids: Tensor, states: LayerStates | None = None, mask=None) -> Tensor:
        """(b, l) token ids -> (b, l, d_model) normalized hidden states."""
        x = self._residual(self.embedding(input_ids))  # (b, l, d_model)
        for i, layer in enumerate(self.layers):
            conv_state, ssm_state = (None, None) if states is None else states[i]
            x = layer(x, conv_state, ssm_state, mask)
        return self.norm_f(x.to(self.norm_f.weight.dtype))

    def step(self, input_ids: Tensor, states: LayerStates, constants=None) -> Tensor:
        """(b,) token ids -> (b, d_model), advancing every layer's states in place.
        `constants`: each layer's `mixer.scan_constants()`, precomputed (or None)."""
        x = self.step_residual(input_ids, states, constants)
        return self.norm_f(x.to(self.norm_f.weight.dtype))

    def step_residual(self, input_ids: Tensor, states: LayerStates, constants=None) -> Tensor:
        """`step` before the final norm: the residual stream after the last block."""
        x = self._residual(self.embedding(input_ids))  # (b, d_model)
        constants = [None] * len(self.layers) if constants is None else constants
        for layer, (conv_state, ssm_state), c in zip(self.layers, states, constants, strict=True):
            x = layer.step(x, conv_state, ssm_state, c)
        return x


def _init_weights(module: nn.Module, n_layer: int, initializer_range: float, rescale: bool) -> None:
    """mamba_ssm's `_init_weights`: zero Linear biases (but dt_proj's), N(0, 0.02) embedding,
    out_proj rescaled by 1/sqrt(n_layer) (GPT-2's scheme for residual branches)."""
    if isinstance(module, nn.Linear) and module.bias is not None:
        if not getattr(module.bias, "_no_reinit", False):
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=initializer_range)
    if rescale and isinstance(module, Mamba):
        p = module.out_proj.weight
        nn.init.kaiming_uniform_(p, a=math.sqrt(5))
        with torch.no_grad():
            p /= math.sqrt(n_layer)


class MambaLMHeadModel(nn.Module):
    def __init__(self, config: MambaConfig, device=None, dtype=None):
        super().__init__()
        if not isinstance(config, MambaConfig):
            raise TypeError(f"config must be a MambaConfig, got {type(config).__name__}")
        self.config = config
        self.backbone = MixerModel(config, device=device, dtype=dtype)
        self.lm_head = nn.Linear(
            config.d_model, config.padded_vocab_size, bias=False, device=device, dtype=dtype
        )
        with torch.no_grad():
            self.apply(
                partial(
                    _init_weights,
                    n_layer=config.n_layer,
                    initializer_range=config.initializer_range,
                    rescale=config.rescale_prenorm_residual,
                )
            )
        if config.tie_embeddings:
            self.tie_weights()

    def tie_weights(self) -> None:
        self.lm_head.weight = self.backbone.embedding.weight

    def forward(
        self,
        input_ids: Tensor,
        position_ids: Tensor | None = None,
        inference_params=None,
        num_last_tokens: int = 0,
        *,
        states: LayerStates | None = None,
        attention_mask: Tensor | None = None,
    ) -> CausalLMOutput:
        """input_ids (b, l) -> CausalLMOutput(logits (b, l or num_last_tokens, padded_vocab_size)).

        position_ids is accepted and ignored, as in mamba_ssm (Mamba has no positions).
        `states` (one (conv_state, ssm_state) pair per layer) makes this a prefill: the sequence
        continues from them and they are updated in place; `mamba_compiled.generation` manages them.
        `attention_mask` (b, l), 1 for tokens and 0 for *left* padding: padded positions leave the
        recurrent state at zero, so each row computes what it would alone.
        """
        if inference_params is not None:
            raise TypeError(
                "inference_params (mamba_ssm's decoding cache) is not supported; use "
                "mamba_compiled.generation (model.generate or MambaCache) for cached decoding"
            )
        self._check_input_ids(input_ids)
        mask = None
        if attention_mask is not None:
            if attention_mask.shape != input_ids.shape:
                raise ValueError(
                    f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)}, "
                    f"got {tuple(attention_mask.shape)}"
                )
            mask = attention_mask
        if states is not None and len(states) != len(self.backbone.layers):
            raise ValueError(f"states must hold one pair per layer ({len(self.backbone.layers)})")
        hidden = self.backbone(input_ids, states, mask)  # (b, l, d_model)
        if num_last_tokens > 0:
            hidden = hidden[:, -num_last_tokens:]
        return CausalLMOutput(logits=self.lm_head(hidden))

    def step(self, input_ids: Tensor, states: LayerStates, constants=None) -> Tensor:
        """One decoding step: input_ids (b,) -> logits (b, padded_vocab_size); states advance.
        `constants` (optional): each layer's `mixer.scan_constants()`, computed ahead."""
        x = self.backbone.step_residual(input_ids, states, constants)
        norm = self.backbone.norm_f
        # the final norm with the LM head as decode_linear up to GEMV_MAX_BATCH rows; above, the
        # norm, then cuBLAS (130M, batch 64, H200: cuBLAS's product 24.5 us, decode_linear
        # with the norm 76; perf/RESULTS.md, seventh session)
        if isinstance(norm, RMSNorm) and fused_decoding(x) and x.shape[0] <= GEMV_MAX_BATCH:
            return decode_linear(
                x, self.lm_head.weight, self.lm_head.bias, norm_weight=norm.weight, eps=norm.eps
            )
        return self.lm_head(norm(x.to(norm.weight.dtype)))

    def _check_input_ids(self, input_ids: Tensor) -> None:
        if not isinstance(input_ids, Tensor):
            raise TypeError(f"input_ids must be a torch.Tensor, got {type(input_ids).__name__}")
        if input_ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"input_ids must hold token ids as torch.long, got {input_ids.dtype}")
        if input_ids.dim() != 2:
            raise ValueError(
                f"input_ids must be (batch, seqlen), got shape {tuple(input_ids.shape)}"
            )
        if input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
            raise ValueError(f"input_ids is empty: shape {tuple(input_ids.shape)}")
        # A value check reads the data; compiled and exported graphs skip it (the embedding's own
        # bounds check still fires there).
        if not torch.compiler.is_compiling():
            n = self.backbone.embedding.num_embeddings
            lo, hi = int(input_ids.min()), int(input_ids.max())
            if lo < 0 or hi >= n:
                raise ValueError(
                    f"input_ids out of range: values in [{lo}, {hi}], the vocabulary has {n} rows"
                )

    # ---- checkpoints and generation: see checkpoints.py and mamba_compiled/generation.py --------

    @classmethod
    def from_pretrained(cls, path: str | Path, device=None, dtype=None) -> MambaLMHeadModel:
        """Load a local directory in mamba_ssm's or Hugging Face's format (no hub downloads)."""
        return checkpoints.load_pretrained(cls, path, device=device, dtype=dtype)

    def save_pretrained(
        self, path: str | Path, format: str = "mamba_ssm", safe_serialization: bool = True
    ) -> None:
        """Write config.json and the weights in mamba_ssm's or Hugging Face's format."""
        checkpoints.save_pretrained(
            self, path, format=format, safe_serialization=safe_serialization
        )

    def generate(self, input_ids: Tensor, *args, **kwargs) -> Tensor:
        """Recurrent decoding; see `mamba_compiled.generation.generate` for the arguments."""
        from mamba_compiled.generation import generate  # generation sits above the models

        return generate(self, input_ids, *args, **kwargs)
