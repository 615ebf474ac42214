"""What the ops modules share: registering a public op, reaching the Triton launchers.

Imports neither triton nor the ops modules (scan, linear, pdl import this one).
"""

from __future__ import annotations

import importlib.util

import torch
from torch import Tensor
from torch.library import custom_op, triton_op

Opt = Tensor | None


HAS_TRITON = importlib.util.find_spec("triton") is not None


def public_op(name: str, mutates_args: tuple[str, ...]):
    """Registers a public op whose body branches on the inputs' device.

    With triton installed: a `triton_op`, so that compiled graphs see the CUDA branch's Triton
    kernels. Without triton there are no Triton kernels to see, and the same body registered as a
    `custom_op` with itself as the fake is the same op (torch's `triton_op` would log a warning
    per op on every import); CUDA tensors then fail in `lowering` with the install command.
    """

    def register(fn):
        if HAS_TRITON:
            return triton_op(name, mutates_args=mutates_args)(fn)
        op = custom_op(name, mutates_args=mutates_args)(fn)
        op.register_fake(fn)
        return op

    return register


def lowering():
    """The Triton launchers (`mamba_compiled.lowering`), imported on the first CUDA call."""
    if not HAS_TRITON:
        raise RuntimeError(
            "CUDA tensors run on Triton kernels, and triton is not installed: "
            "pip install 'mamba-compiled[cuda]'"
        )
    from mamba_compiled import lowering as launchers

    return launchers


def empty(shape, like: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """An uninitialized tensor on like's device, in like's dtype unless `dtype`."""
    return torch.empty(shape, dtype=dtype or like.dtype, device=like.device)


def layout_of(t: Tensor, like: Tensor) -> Tensor:
    """t (like's shape and dtype) with the strides of torch.empty_like(like), as the ops' fakes
    promise for gradients in an input's layout; t itself when it has them."""
    out = torch.empty_like(like)
    return t if out.stride() == t.stride() else out.copy_(t)
