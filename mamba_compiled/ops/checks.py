"""Input checks for the selective-scan ops: run before any kernel, name the argument and the fix.

Every check raises TypeError (not a tensor, wrong dtype) or ValueError (wrong rank or size, mixed
devices) with the argument's name and the expected shape. After the checks, inputs are normalized
to what the kernels take: the last dimension unit-strided, per-step B/C as one group.
"""

from __future__ import annotations

import torch
from torch import Tensor

ACTIVATION_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
SUPPORTED_DEVICES = ("cpu", "cuda")


def _is_tensor(name: str, t: object, optional: bool = False) -> None:
    if t is None and optional:
        return
    if not isinstance(t, Tensor):
        kind = "a torch.Tensor or None" if optional else "a torch.Tensor"
        raise TypeError(f"{name} must be {kind}, got {type(t).__name__}")


def _shape(name: str, t: Tensor, expected: tuple, names: str) -> None:
    """t.shape must equal `expected` (None = any size); `names` spells it, e.g. "(batch, dim)".

    The message is built only on failure: formatting a symbolic size under torch.compile
    would specialize it.
    """
    if t.dim() != len(expected) or any(
        e is not None and s != e for s, e in zip(t.shape, expected, strict=False)
    ):
        raise ValueError(
            f"{name} must have shape {names} = {_spell(expected)}, got {tuple(t.shape)}"
        )


def _spell(expected: tuple) -> str:
    return "(" + ", ".join("*" if e is None else str(e) for e in expected) + ")"


def _param_dtype(name: str, t: Tensor, act_dtype: torch.dtype) -> None:
    # Parameters and states hold the fp32 accumulators; float64 only for a float64 (test) run.
    allowed = (torch.float64,) if act_dtype == torch.float64 else (torch.float32,)
    if t.dtype not in allowed:
        raise TypeError(
            f"{name} must be {allowed[0]} (the scan accumulates in it), got {t.dtype}; "
            f"cast it with {name}.float()"
        )


def _unit_stride(t: Tensor | None) -> Tensor | None:
    """Kernels index the last dimension densely; other strides are passed through."""
    if t is None or t.stride(-1) == 1:
        return t
    return t.contiguous()


def _same_device(named: dict[str, Tensor | None], lead: str, device: torch.device) -> None:
    for name, t in named.items():
        if t is not None and t.device != device:
            raise ValueError(
                f"{name} is on {t.device} but {lead} is on {device}; "
                f"move it with .to({lead}.device)"
            )
    if device.type not in SUPPORTED_DEVICES:
        raise ValueError(f"inputs are on {device}: the selective scan runs on cpu and cuda only")


def _check_bc(name: str, M: Tensor, batch: int, dim: int, dstate: int, seqlen: int | None,
              act_dtype: torch.dtype) -> Tensor:
    """B or C in any of its layouts; returns the shared (dim, dstate) or grouped form."""
    tail = () if seqlen is None else (seqlen,)
    step = "" if seqlen is None else ", seqlen"
    if M.dim() == 2 and seqlen is not None:
        _shape(name, M, (dim, dstate), "(dim, dstate)")
    elif M.dim() == 2 + len(tail):
        _shape(name, M, (batch, dstate, *tail), f"(batch, dstate{step})")
        M = M.unsqueeze(1)
    elif M.dim() == 3 + len(tail):
        _shape(name, M, (batch, None, dstate, *tail), f"(batch, groups, dstate{step})")
        groups = M.shape[1]
        if groups == 0 or dim % groups != 0:
            raise ValueError(f"{name} has {groups} groups, which must divide dim = {dim}")
    else:
        layouts = f"(batch, dstate{step}) or (batch, groups, dstate{step})"
        if seqlen is not None:
            layouts = "(dim, dstate), " + layouts
        raise ValueError(f"{name} must have shape {layouts}, got {tuple(M.shape)}")
    if M.dtype not in (act_dtype, torch.float32):
        raise TypeError(f"{name} must be float32 or {act_dtype} like u, got {M.dtype}")
    return _unit_stride(M)


def check_scan_inputs(u, delta, A, B, C, D, z, delta_bias, initial_state):
    """Validates the scan's inputs; returns them normalized for the kernels."""
    for name, t, opt in (
        ("u", u, False), ("delta", delta, False), ("A", A, False), ("B", B, False),
        ("C", C, False), ("D", D, True), ("z", z, True), ("delta_bias", delta_bias, True),
        ("initial_state", initial_state, True),
    ):
        _is_tensor(name, t, opt)
    if u.dim() != 3:
        raise ValueError(f"u must have shape (batch, dim, seqlen), got {tuple(u.shape)}")
    batch, dim, seqlen = u.shape
    if batch == 0 or dim == 0 or seqlen == 0:
        raise ValueError(
            f"u must have a non-empty (batch, dim, seqlen), got {tuple(u.shape)}"
        )
    if u.dtype not in ACTIVATION_DTYPES:
        raise TypeError(f"u must be float32, float16 or bfloat16, got {u.dtype}")
    _same_device(
        {"delta": delta, "A": A, "B": B, "C": C, "D": D, "z": z, "delta_bias": delta_bias,
         "initial_state": initial_state},
        "u", u.device,
    )
    _shape("A", A, (dim, None), "(dim, dstate)")
    dstate = A.shape[1]
    if dstate == 0:
        raise ValueError("A must have shape (dim, dstate) with dstate > 0, got dstate = 0")
    _param_dtype("A", A, u.dtype)
    for name, t in (("delta", delta), ("z", z)):
        if t is None:
            continue
        _shape(name, t, (batch, dim, seqlen), "(batch, dim, seqlen) like u")
        if t.dtype != u.dtype:
            raise TypeError(f"{name} must have u's dtype {u.dtype}, got {t.dtype}")
    for name, t in (("D", D), ("delta_bias", delta_bias)):
        if t is None:
            continue
        _shape(name, t, (dim,), "(dim,)")
        _param_dtype(name, t, u.dtype)
    if initial_state is not None:
        _shape("initial_state", initial_state, (batch, dim, dstate), "(batch, dim, dstate)")
        _param_dtype("initial_state", initial_state, u.dtype)
    B = _check_bc("B", B, batch, dim, dstate, seqlen, u.dtype)
    C = _check_bc("C", C, batch, dim, dstate, seqlen, u.dtype)
    if u.device.type == "cuda" and u.dtype == torch.float64:
        raise TypeError(
            "u is float64 on cuda: the Triton kernels take float32, float16 or bfloat16"
        )
    return (
        _unit_stride(u), _unit_stride(delta), A.contiguous(), B, C,
        None if D is None else D.contiguous(), _unit_stride(z),
        None if delta_bias is None else delta_bias.contiguous(),
        None if initial_state is None else initial_state.contiguous(),
    )


def _decode_activation(name: str, t: Tensor) -> tuple[int, int]:
    """A decode step's (batch, dim) activation: 2-d, non-empty, an activation dtype."""
    if t.dim() != 2:
        raise ValueError(f"{name} must have shape (batch, dim), got {tuple(t.shape)}")
    batch, dim = t.shape
    if batch == 0 or dim == 0:
        raise ValueError(f"{name} must have a non-empty (batch, dim), got {tuple(t.shape)}")
    if t.dtype not in ACTIVATION_DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")
    return batch, dim


def check_state_update_inputs(state, x, dt, A, B, C, D, z, dt_bias):
    """Validates one decode step's inputs; returns them normalized (B, C as (batch, groups,
    dstate))."""
    for name, t, opt in (
        ("state", state, False), ("x", x, False), ("dt", dt, False), ("A", A, False),
        ("B", B, False), ("C", C, False), ("D", D, True), ("z", z, True),
        ("dt_bias", dt_bias, True),
    ):
        _is_tensor(name, t, opt)
    batch, dim = _decode_activation("x", x)
    _same_device(
        {"state": state, "dt": dt, "A": A, "B": B, "C": C, "D": D, "z": z, "dt_bias": dt_bias},
        "x", x.device,
    )
    _shape("A", A, (dim, None), "(dim, dstate)")
    dstate = A.shape[1]
    if dstate == 0:
        raise ValueError("A must have shape (dim, dstate) with dstate > 0, got dstate = 0")
    _param_dtype("A", A, x.dtype)
    _shape("state", state, (batch, dim, dstate), "(batch, dim, dstate)")
    _param_dtype("state", state, x.dtype)
    if not state.is_contiguous():
        raise ValueError("state must be contiguous: it is updated in place")
    for name, t in (("dt", dt), ("z", z)):
        if t is None:
            continue
        _shape(name, t, (batch, dim), "(batch, dim) like x")
        if t.dtype != x.dtype:
            raise TypeError(f"{name} must have x's dtype {x.dtype}, got {t.dtype}")
    for name, t in (("D", D), ("dt_bias", dt_bias)):
        if t is None:
            continue
        _shape(name, t, (dim,), "(dim,)")
        _param_dtype(name, t, x.dtype)
    B = _check_bc("B", B, batch, dim, dstate, None, x.dtype)
    C = _check_bc("C", C, batch, dim, dstate, None, x.dtype)
    if x.device.type == "cuda" and x.dtype == torch.float64:
        raise TypeError(
            "x is float64 on cuda: the Triton kernels take float32, float16 or bfloat16"
        )
    return (
        _unit_stride(x), _unit_stride(dt), A.contiguous(), B, C,
        None if D is None else D.contiguous(), _unit_stride(z),
        None if dt_bias is None else dt_bias.contiguous(),
    )


def _check_conv_step_inputs(conv_state, conv_x, conv_weight, conv_bias):
    """The conv's step inputs (see `conv_step`): shapes, dtypes, devices."""
    for name, t in (("conv_state", conv_state), ("conv_x", conv_x), ("conv_weight", conv_weight)):
        _is_tensor(name, t)
    _is_tensor("conv_bias", conv_bias, True)
    batch, dim = _decode_activation("conv_x", conv_x)
    _same_device(
        {"conv_state": conv_state, "conv_weight": conv_weight, "conv_bias": conv_bias},
        "conv_x", conv_x.device,
    )  # fmt: skip
    _shape("conv_state", conv_state, (batch, dim, None), "(batch, dim, d_conv)")
    width = conv_state.shape[2]
    if width == 0:
        raise ValueError("conv_state must have shape (batch, dim, d_conv) with d_conv > 0")
    if conv_state.dtype != conv_x.dtype:
        raise TypeError(
            f"conv_state must have conv_x's dtype {conv_x.dtype}, got {conv_state.dtype}"
        )
    _shape("conv_weight", conv_weight, (dim, width), "(dim, d_conv) like conv_state")
    if conv_bias is not None:
        _shape("conv_bias", conv_bias, (dim,), "(dim,)")
    for name, t in (("conv_weight", conv_weight), ("conv_bias", conv_bias)):
        if t is not None and not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    return _unit_stride(conv_weight), None if conv_bias is None else conv_bias.contiguous()


def check_conv_x_proj_inputs(conv_state, conv_x, conv_weight, conv_bias, x_proj_weight):
    """Validates `conv_x_proj`'s inputs; returns them normalized."""
    conv_weight, conv_bias = _check_conv_step_inputs(conv_state, conv_x, conv_weight, conv_bias)
    _is_tensor("x_proj_weight", x_proj_weight)
    _same_device({"x_proj_weight": x_proj_weight}, "conv_x", conv_x.device)
    _shape("x_proj_weight", x_proj_weight, (None, conv_x.shape[1]), "(rows, dim)")
    if x_proj_weight.shape[0] == 0 or not x_proj_weight.is_floating_point():
        raise ValueError(
            f"x_proj_weight must be a floating-point (rows, dim) with rows > 0, got "
            f"{x_proj_weight.dtype} {tuple(x_proj_weight.shape)}"
        )
    return conv_state, conv_x, conv_weight, conv_bias, _unit_stride(x_proj_weight)


def check_decode_step_inputs(state, conv_state, conv_x, conv_weight, conv_bias, x_dbl,
                             dt_weight, A, D, z, dt_bias):  # fmt: skip
    """Validates the model's fused decode step (see `ssm_decode_step`); returns them normalized."""
    conv_weight, conv_bias = _check_conv_step_inputs(conv_state, conv_x, conv_weight, conv_bias)
    for name, t in (("x_dbl", x_dbl), ("dt_weight", dt_weight), ("A", A)):
        _is_tensor(name, t)
    batch, dim = conv_x.shape
    dstate = A.shape[-1] if A.dim() else 1
    # the state update's own checks, with conv_x for x and dt and placeholders for B and C
    bc = torch.empty(batch, dstate, dtype=conv_x.dtype, device=conv_x.device)
    conv_x, _, A, _, _, D, z, dt_bias = check_state_update_inputs(
        state, conv_x, conv_x, A, bc, bc, D, z, dt_bias
    )
    _same_device({"x_dbl": x_dbl, "dt_weight": dt_weight}, "conv_x", conv_x.device)
    if dt_weight.dim() != 2 or dt_weight.shape[0] != dim or dt_weight.shape[1] == 0:
        raise ValueError(f"dt_weight must have shape (dim, dt_rank), got {tuple(dt_weight.shape)}")
    rows = dt_weight.shape[1] + 2 * dstate
    if x_dbl.dim() != 3 or x_dbl.shape[0] == 0 or tuple(x_dbl.shape[1:]) != (batch, rows):
        raise ValueError(
            f"x_dbl must have shape (P, batch, dt_rank + 2*dstate) = (P, {batch}, {rows}) with "
            f"P >= 1, got {tuple(x_dbl.shape)}"
        )
    for name, t in (("x_dbl", x_dbl), ("dt_weight", dt_weight)):
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    x_dbl = x_dbl if x_dbl.stride(2) == 1 else x_dbl.contiguous()
    return (
        conv_x, conv_weight, conv_bias, x_dbl, _unit_stride(dt_weight), A, D, z, dt_bias,
    )  # fmt: skip


def check_decode_linear_inputs(x, weight, bias, norm_weight, eps, residual):
    """Validates `decode_linear`'s inputs; returns them normalized."""
    _is_tensor("x", x)
    _is_tensor("weight", weight)
    for name, t in (("bias", bias), ("norm_weight", norm_weight), ("residual", residual)):
        _is_tensor(name, t, True)
    batch, K = _decode_activation("x", x)
    _same_device(
        {"weight": weight, "bias": bias, "norm_weight": norm_weight, "residual": residual},
        "x", x.device,
    )  # fmt: skip
    _shape("weight", weight, (None, K), "(out_features, in_features) with x's in_features")
    N = weight.shape[0]
    if N == 0 or weight.dtype not in ACTIVATION_DTYPES:
        raise ValueError(
            f"weight must be a floating-point (out_features, in_features) with out_features > 0, "
            f"got {weight.dtype} {tuple(weight.shape)}"
        )
    for name, t, shape, names in (
        ("bias", bias, (N,), "(out_features,)"),
        ("norm_weight", norm_weight, (K,), "(in_features,)"),
    ):
        if t is None:
            continue
        _shape(name, t, shape, names)
        if t.dtype != weight.dtype:
            raise TypeError(f"{name} must have weight's dtype {weight.dtype}, got {t.dtype}")
    if norm_weight is None and x.dtype != weight.dtype:
        raise TypeError(f"x must have weight's dtype {weight.dtype} (no norm), got {x.dtype}")
    if norm_weight is not None and not (isinstance(eps, float) and eps > 0):
        raise ValueError(f"eps must be a float > 0, got {eps!r}")
    if residual is not None:
        _shape("residual", residual, (batch, N), "(batch, out_features)")
        if residual.dtype not in ACTIVATION_DTYPES:
            raise TypeError(f"residual must be a floating-point tensor, got {residual.dtype}")
    if x.device.type == "cuda" and torch.float64 in (x.dtype, weight.dtype):
        raise TypeError("float64 on cuda: the Triton kernels take float32, float16 or bfloat16")
    return (
        _unit_stride(x), _unit_stride(weight), None if bias is None else bias.contiguous(),
        None if norm_weight is None else norm_weight.contiguous(), float(eps),
        _unit_stride(residual),
    )  # fmt: skip
