"""MambaConfig: the sizes of a Mamba language model, with mamba_ssm's field names and defaults.

A gpt-fast style dataclass: the fields a user sets, derived sizes filled in `__post_init__`, and
the paper's named sizes behind `MambaConfig.from_name`. It also reads and writes the two
`config.json` dialects that checkpoints come in: mamba_ssm's (`d_model`, `n_layer`, `ssm_cfg`)
and Hugging Face transformers' (`model_type: "mamba"`, `hidden_size`, `num_hidden_layers`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

# The sizes of the paper's released checkpoints (Gu & Dao 2023, Table 12); vocabulary of the
# GPT-NeoX tokenizer (50277, padded to 50280 in the embedding).
_NAMED_SIZES: dict[str, dict[str, int]] = {
    "130m": dict(d_model=768, n_layer=24),
    "370m": dict(d_model=1024, n_layer=48),
    "790m": dict(d_model=1536, n_layer=48),
    "1.4b": dict(d_model=2048, n_layer=48),
    "2.8b": dict(d_model=2560, n_layer=64),
}

# mamba_ssm's Mamba(...) keyword arguments, stored under "ssm_cfg" in its config.json.
_SSM_CFG_FIELDS = (
    "d_state",
    "d_conv",
    "expand",
    "dt_rank",
    "dt_min",
    "dt_max",
    "dt_init",
    "dt_scale",
    "dt_init_floor",
    "conv_bias",
    "bias",
)

# Hugging Face MambaConfig name -> ours.
_HF_FIELDS = {
    "hidden_size": "d_model",
    "num_hidden_layers": "n_layer",
    "vocab_size": "vocab_size",
    "state_size": "d_state",
    "conv_kernel": "d_conv",
    "expand": "expand",
    "time_step_rank": "dt_rank",
    "time_step_min": "dt_min",
    "time_step_max": "dt_max",
    "time_step_init_scheme": "dt_init",
    "time_step_scale": "dt_scale",
    "time_step_floor": "dt_init_floor",
    "use_conv_bias": "conv_bias",
    "use_bias": "bias",
    "layer_norm_epsilon": "norm_epsilon",
    "residual_in_fp32": "residual_in_fp32",
    "tie_word_embeddings": "tie_embeddings",
    "initializer_range": "initializer_range",
}


@dataclass
class MambaConfig:
    """Sizes and options of a Mamba-1 language model (defaults: mamba_ssm's, the 2.8B model)."""

    d_model: int = 2560
    n_layer: int = 64
    vocab_size: int = 50277
    d_state: int = 16  # N, the state size per channel
    d_conv: int = 4  # width of the causal depthwise convolution
    expand: int = 2  # d_inner = expand * d_model
    dt_rank: int | str = "auto"  # rank of the Δ projection; "auto" = ceil(d_model / 16)
    dt_min: float = (
        0.001  # initial Δ = softplus(dt bias) is drawn log-uniformly in [dt_min, dt_max]
    )
    dt_max: float = 0.1
    dt_init: str = "random"  # dt_proj.weight: "random" (uniform) or "constant"
    dt_scale: float = 1.0
    dt_init_floor: float = 1e-4
    conv_bias: bool = True
    bias: bool = False  # biases of in_proj and out_proj
    rms_norm: bool = True  # RMSNorm, else LayerNorm
    norm_epsilon: float = 1e-5
    residual_in_fp32: bool = True
    pad_vocab_size_multiple: int = 8
    tie_embeddings: bool = True
    initializer_range: float = 0.02  # std of the embedding at init
    rescale_prenorm_residual: bool = True  # out_proj.weight /= sqrt(n_layer) at init

    def __post_init__(self) -> None:
        for name in (
            "d_model",
            "n_layer",
            "vocab_size",
            "d_state",
            "d_conv",
            "expand",
            "pad_vocab_size_multiple",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"MambaConfig.{name} must be a positive int, got {value!r}")
        if self.dt_rank == "auto":
            self.dt_rank = math.ceil(self.d_model / 16)
        if isinstance(self.dt_rank, bool) or not isinstance(self.dt_rank, int) or self.dt_rank < 1:
            raise ValueError(
                f"MambaConfig.dt_rank must be 'auto' or a positive int, got {self.dt_rank!r}"
            )
        if not 0 < self.dt_min <= self.dt_max:
            raise ValueError(
                f"MambaConfig needs 0 < dt_min <= dt_max, got dt_min={self.dt_min}, "
                f"dt_max={self.dt_max}"
            )
        if self.dt_init not in ("random", "constant"):
            raise ValueError(
                f"MambaConfig.dt_init must be 'random' or 'constant', got {self.dt_init!r}"
            )
        if not self.norm_epsilon > 0:
            raise ValueError(f"MambaConfig.norm_epsilon must be > 0, got {self.norm_epsilon!r}")

    # Derived sizes. Properties rather than fields so that `dataclasses.replace` keeps them right.
    @property
    def d_inner(self) -> int:
        return self.expand * self.d_model

    @property
    def padded_vocab_size(self) -> int:
        """Rows of the embedding and of the logits: vocab_size rounded up (mamba_ssm pads to 8)."""
        m = self.pad_vocab_size_multiple
        return (self.vocab_size + m - 1) // m * m

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> MambaConfig:
        """One of the paper's sizes, "130m", "370m", "790m", "1.4b" or "2.8b"; overrides win."""
        key = name.lower()
        if key not in _NAMED_SIZES:
            raise ValueError(f"unknown model name {name!r}; choose one of {sorted(_NAMED_SIZES)}")
        return cls(**{"vocab_size": 50277, **_NAMED_SIZES[key], **overrides})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    # ---- config.json dialects ------------------------------------------------------------------

    @classmethod
    def from_json_dict(cls, data: dict[str, Any], source: str = "config.json") -> MambaConfig:
        """Either dialect: Hugging Face's (model_type "mamba") or mamba_ssm's (has "d_model")."""
        if not isinstance(data, dict):
            raise ValueError(f"{source}: expected a JSON object, got {type(data).__name__}")
        if "model_type" in data:
            if data["model_type"] != "mamba":
                raise ValueError(
                    f"{source}: model_type is {data['model_type']!r}; only Mamba-1 ('mamba') loads"
                )
            return cls.from_hf_dict(data, source)
        if "d_model" in data:
            return cls.from_mamba_ssm_dict(data, source)
        raise ValueError(
            f"{source}: neither a mamba_ssm config (no 'd_model') nor a Hugging Face Mamba config "
            "(no 'model_type': 'mamba')"
        )

    @classmethod
    def from_mamba_ssm_dict(cls, data: dict[str, Any], source: str = "config.json") -> MambaConfig:
        data = dict(data)
        if data.pop("d_intermediate", 0):
            raise ValueError(
                f"{source}: d_intermediate > 0 (an MLP after each mixer) is not supported"
            )
        if data.pop("attn_layer_idx", None):
            raise ValueError(f"{source}: attention layers (attn_layer_idx) are not supported")
        data.pop("attn_cfg", None)
        data.pop("fused_add_norm", None)  # a kernel choice in mamba_ssm; the math is the same
        ssm_cfg = dict(data.pop("ssm_cfg", None) or {})
        layer = ssm_cfg.pop("layer", "Mamba1")
        if layer != "Mamba1":
            raise ValueError(f"{source}: ssm_cfg.layer is {layer!r}; only 'Mamba1' is supported")
        for key in ssm_cfg:
            if key not in _SSM_CFG_FIELDS:
                raise ValueError(f"{source}: unsupported ssm_cfg key {key!r}")
        fields = {f.name for f in dataclasses.fields(cls)}
        for key in data:
            if key not in fields:
                raise ValueError(f"{source}: unknown mamba_ssm config key {key!r}")
        return cls(**data, **ssm_cfg)

    def to_mamba_ssm_dict(self) -> dict[str, Any]:
        """mamba_ssm's config.json: what `mamba_ssm.MambaLMHeadModel(MambaConfig(**it))` reads."""
        if self.norm_epsilon != 1e-5:
            raise ValueError(
                f"norm_epsilon={self.norm_epsilon} cannot be written in mamba_ssm's format "
                "(fixed at 1e-5 there); save with format='hf'"
            )
        return {
            "d_model": self.d_model,
            "d_intermediate": 0,
            "n_layer": self.n_layer,
            "vocab_size": self.vocab_size,
            "ssm_cfg": {"layer": "Mamba1", **{k: getattr(self, k) for k in _SSM_CFG_FIELDS}},
            "attn_layer_idx": [],
            "attn_cfg": {},
            "rms_norm": self.rms_norm,
            "residual_in_fp32": self.residual_in_fp32,
            "fused_add_norm": True,
            "pad_vocab_size_multiple": self.pad_vocab_size_multiple,
            "tie_embeddings": self.tie_embeddings,
        }

    @classmethod
    def from_hf_dict(cls, data: dict[str, Any], source: str = "config.json") -> MambaConfig:
        act = data.get("hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise ValueError(f"{source}: hidden_act {act!r} is not supported (Mamba uses 'silu')")
        kwargs = {ours: data[hf] for hf, ours in _HF_FIELDS.items() if hf in data}
        for required in ("hidden_size", "num_hidden_layers", "vocab_size"):
            if required not in data:
                raise ValueError(f"{source}: missing key {required!r}")
        # Hugging Face stores the embedding's size; there is no further padding.
        config = cls(
            **kwargs,
            pad_vocab_size_multiple=1,
            rms_norm=True,
            rescale_prenorm_residual=bool(data.get("rescale_prenorm_residual", False)),
        )
        inner = data.get("intermediate_size")
        if inner is not None and inner != config.d_inner:
            raise ValueError(
                f"{source}: intermediate_size {inner} != expand * hidden_size = {config.d_inner}"
            )
        return config

    def to_hf_dict(self) -> dict[str, Any]:
        """transformers' MambaConfig as JSON: what `MambaForCausalLM.from_pretrained` reads."""
        if not self.rms_norm:
            raise ValueError(
                "rms_norm=False (LayerNorm) cannot be written in Hugging Face's format"
            )
        out: dict[str, Any] = {"architectures": ["MambaForCausalLM"], "model_type": "mamba"}
        for hf, ours in _HF_FIELDS.items():
            out[hf] = getattr(self, ours)
        out["vocab_size"] = self.padded_vocab_size
        out["intermediate_size"] = self.d_inner
        out["hidden_act"] = "silu"
        # Init-only, but transformers 5.24 applies it to *loaded* weights too (out_proj /=
        # sqrt(n_layer) after loading), so a checkpoint must say false to load as saved.
        out["rescale_prenorm_residual"] = False
        return out
