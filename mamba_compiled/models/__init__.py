"""Mamba-1 models: config, mixer, language model, checkpoints (mamba_ssm's names throughout)."""

from mamba_compiled.models.config import MambaConfig
from mamba_compiled.models.lm import Block, CausalLMOutput, MambaLMHeadModel, MixerModel, RMSNorm
from mamba_compiled.models.mamba import Mamba, set_recompute

__all__ = [
    "Block",
    "CausalLMOutput",
    "Mamba",
    "MambaConfig",
    "MambaLMHeadModel",
    "MixerModel",
    "RMSNorm",
    "set_recompute",
]
