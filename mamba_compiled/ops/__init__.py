"""Op contracts: the selective scan, its decode step, decoding's linear layer and the mixer's
conv with its SiLU, registered
with torch.library.

Importing this package registers `torch.ops.mamba_compiled.*`. The oracle lives in
`mamba_compiled.ops.reference` and is never registered.
"""

from mamba_compiled.ops.conv import conv1d_silu, set_conv_kernels
from mamba_compiled.ops.linear import decode_linear
from mamba_compiled.ops.pdl import programmatic_dependent_launch
from mamba_compiled.ops.scan import (
    conv_x_proj,
    selective_scan_fn,
    selective_state_update,
    ssm_decode_step,
)

__all__ = [
    "conv1d_silu",
    "conv_x_proj",
    "decode_linear",
    "programmatic_dependent_launch",
    "selective_scan_fn",
    "selective_state_update",
    "set_conv_kernels",
    "ssm_decode_step",
]
