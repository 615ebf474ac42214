"""mamba-compiled: the Mamba selective state-space model, built compiler-first.

Importing the package registers the ops `torch.ops.mamba_compiled.*`, which is all that loading an
exported program needs.
"""

from mamba_compiled.models import Mamba, MambaConfig, MambaLMHeadModel
from mamba_compiled.ops import selective_scan_fn, selective_state_update

__version__ = "0.1.0"

__all__ = [
    "Mamba",
    "MambaConfig",
    "MambaLMHeadModel",
    "selective_scan_fn",
    "selective_state_update",
]
