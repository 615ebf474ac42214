"""Compile the kernels' GPU configurations for a CUDA target without a GPU.

    python -m mamba_compiled.lowering.compile_check [--arch 90] [--res] [--sass DIR]

Uses Triton's bundled ptxas, so it runs on any machine with triton installed (not under
TRITON_INTERPRET=1). Compiles each kernel as the JIT specializes it for the first ANCHORS row, for
a one-step sequence at batch 1 (value-1 arguments become constants) and, for the scans, for the
fourth row (segments). Prints each kernel's
configuration; --res adds registers, stack (spills)
and shared memory (from the bundled cuobjdump); --sass writes each kernel's SASS to DIR.

Also checks that the variants torch.compile and AOTInductor put into graphs (every kernel but the
eager-only backward, see common.traced) hold no inline assembly: torch cannot analyze which
arguments such a kernel writes.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from . import common
from .conv import DEFAULT_TILES, _conv_bwd_dx_kernel, _conv_bwd_g_kernel, _conv_fwd_kernel
from .decode_step import _conv_step_kernel, _conv_x_proj_kernel, _state_update_kernel
from .linear import (
    _decode_dot_kernel,
    _decode_linear_kernel,
    _rms_norm_rows_kernel,
    _split_epilogue_kernel,
)
from .scan_backward import _scan_bwd_kernel
from .scan_forward import _scan_fwd_kernel

F32_PTRS = {
    "A_ptr", "D_ptr", "bias_ptr", "h0_ptr", "last_ptr", "carry_ptr", "dlast_ptr",
    "dA_ptr", "dD_ptr", "dbias_ptr", "dh0_ptr", "dBp_ptr", "dCp_ptr", "state_ptr", "seg_ptr",
    "xdbl_ptr", "part_ptr", "res_ptr", "cw_ptr", "dcw_ptr",
}  # fmt: skip
F32_SCALARS = {"eps"}
I32_PTRS = {"sync_ptr"}


def jobs(dim: int = 4096, dstate: int = 16):
    """(name, kernel, constexprs, num_warps) for the default configurations, every option on."""
    fwd = common.fwd_config(dim, dstate, (1, 1))
    bwd = common.bwd_config(dim, dstate, (1, 1))
    n = common.next_power_of_2(dstate)
    flags = dict(HAS_D=True, HAS_Z=True, HAS_BIAS=True, SOFTPLUS=True, FAST_MATH=True, N=n)
    scan = dict(flags, B_SHARED=False, C_SHARED=False, EVEN_D=dim % 16 == 0, EVEN_N=n == dstate)
    ck = common.checkpoint_interval()
    dot = dict(HAS_BIAS=False, RESIDUAL=False, PARTIAL=False, EVEN_K=True, BM=64, BN=32, BK=64,
               PRECISION="tf32", DOT_F32=False, ROUND=True, GDC=False)  # fmt: skip
    cf, cg, cd = (DEFAULT_TILES[k] for k in ("fwd", "g", "dx"))
    return [
        ("scan_fwd", _scan_fwd_kernel,
         dict(scan, HAS_H0=True, BD=fwd.BD, T=fwd.T, CK=ck, N_B=fwd.N_B, STORE_CK=True,
              PIPE=fwd.pipe, SP_SPLIT=fwd.sp_split, HEAD=False), fwd.num_warps),
        ("scan_fwd_inference", _scan_fwd_kernel,
         dict(scan, HAS_H0=True, BD=fwd.BD, T=fwd.T, CK=ck, N_B=fwd.N_B, STORE_CK=False,
              PIPE=fwd.pipe, SP_SPLIT=fwd.sp_split, HEAD=False), fwd.num_warps),
        # the look-back with a long first segment (eager launches with several segments)
        ("scan_fwd_head", _scan_fwd_kernel,
         dict(scan, HAS_H0=True, BD=fwd.BD, T=fwd.T, CK=ck, N_B=fwd.N_B, STORE_CK=True,
              PIPE=fwd.pipe, SP_SPLIT=fwd.sp_split, HEAD=True), fwd.num_warps),
        ("scan_bwd", _scan_bwd_kernel,
         dict(scan, HAS_DLAST=True, ATOMIC_BC=True, RS=bwd.rs, BD=bwd.BD, T=bwd.T, R=1,
              N_B=bwd.N_B),
         bwd.num_warps),
        ("scan_fwd_ck2chunks", _scan_fwd_kernel,
         dict(scan, HAS_H0=True, BD=fwd.BD, T=fwd.T, CK=2 * fwd.T, N_B=fwd.N_B, STORE_CK=True,
              PIPE=fwd.pipe, SP_SPLIT=fwd.sp_split, HEAD=False), fwd.num_warps),
        ("scan_bwd_ck2chunks", _scan_bwd_kernel,
         dict(scan, HAS_DLAST=True, ATOMIC_BC=True, RS=bwd.rs, BD=bwd.BD, T=bwd.T, R=2,
              N_B=bwd.N_B), bwd.num_warps),
        ("scan_bwd_deterministic", _scan_bwd_kernel,
         dict(scan, HAS_DLAST=True, ATOMIC_BC=False, RS=bwd.rs, BD=bwd.BD, T=bwd.T, R=1,
              N_B=bwd.N_B),
         bwd.num_warps),
        ("scan_bwd_traced", _scan_bwd_kernel,
         dict(scan, HAS_DLAST=True, ATOMIC_BC=True, RS=False, BD=bwd.BD, T=bwd.T, R=1, N_B=bwd.N_B),
         bwd.num_warps),
        ("state_update", _state_update_kernel,
         dict(flags, BD=max(1, 512 // n), DT_PROJ=False, R=1, CONV=False, W=1, CONV_U=False,
              HAS_CB=False, XDBL=False, P=1, GDC=False), 4),
        ("decode_step", _state_update_kernel,
         dict(flags, BD=max(1, 512 // n), DT_PROJ=True, R=128, CONV=True, W=4, CONV_U=True,
              HAS_CB=True, XDBL=True, P=64, GDC=False), 4),
        ("decode_step_pdl", _state_update_kernel,
         dict(flags, BD=max(1, 512 // n), DT_PROJ=True, R=128, CONV=True, W=4, CONV_U=True,
              HAS_CB=True, XDBL=True, P=64, GDC=True), 4),
        ("decode_step_dt_given_pdl", _state_update_kernel,
         dict(flags, BD=max(1, 1024 // n), DT_PROJ=False, R=1, CONV=True, W=4, CONV_U=True,
              HAS_CB=True, XDBL=True, P=1, GDC=True), 4),
        ("conv_step_pdl", _conv_step_kernel, dict(HAS_CB=True, W=4, BE=256, GDC=True), 4),
        ("conv_x_proj", _conv_x_proj_kernel,
         dict(HAS_CB=True, W=4, BE=64, ROWS=256, GDC=False), 8),
        ("conv_x_proj_pdl", _conv_x_proj_kernel,
         dict(HAS_CB=True, W=4, BE=64, ROWS=256, GDC=True), 8),
        ("decode_linear_norm", _decode_linear_kernel,
         dict(HAS_BIAS=False, NORM=True, RESIDUAL=False, BN=4, KP=2048, GDC=False), 4),
        ("decode_linear_residual_pdl", _decode_linear_kernel,
         dict(HAS_BIAS=True, NORM=False, RESIDUAL=True, BN=2, KP=4096, GDC=True), 4),
        ("rms_norm_rows", _rms_norm_rows_kernel, dict(KP=2048, GDC=False), 4),
        ("rms_norm_rows_pdl", _rms_norm_rows_kernel, dict(KP=4096, GDC=True), 4),
        ("decode_dot_residual_pdl", _decode_dot_kernel,
         dict(dot, HAS_BIAS=True, RESIDUAL=True, GDC=True), 4),
        ("decode_dot_split", _decode_dot_kernel, dict(dot, PARTIAL=True, EVEN_K=False), 4),
        ("split_epilogue_pdl", _split_epilogue_kernel,
         dict(HAS_BIAS=True, RESIDUAL=True, S=4, BN=256, ROUND=True, GDC=True), 4),
        ("conv_fwd", _conv_fwd_kernel, dict(W=4, HAS_BIAS=True, BR=cf.BR, BL=cf.BL),
         cf.num_warps),
        ("conv_bwd_g", _conv_bwd_g_kernel,
         dict(W=4, HAS_BIAS=True, BR=cg.BR, BL=cg.BL, NT=cg.NT, WP=8), cg.num_warps),
        ("conv_bwd_dx", _conv_bwd_dx_kernel, dict(W=4, BR=cd.BR, BL=cd.BL), cd.num_warps),
    ]  # fmt: skip


# Integer arguments of the first ANCHORS row (8 x 4096 x 2048 x 16, contiguous, one segment),
# specialized as Triton's JIT does at launch: value 1 -> a constant, multiples of 16 -> known
# divisible (pointers are 16-byte aligned), which is what lets unmasked loads vectorize.
ROW1_INTS = dict(
    batch=8, dim=4096, dstate=16, seqlen=2048, n_seg=1, seg_len=2048, head_len=2048, chained=1,
    B_per_group=4096, C_per_group=4096, s_ub=4096 * 2048, s_ud=2048, s_db=4096 * 2048,
    s_dd=2048, s_zb=4096 * 2048, s_zd=2048, s_ob=4096 * 2048, s_od=2048, s_ot=1,
    s_Bb=16 * 2048, s_Bg=16 * 2048, s_Bn=2048,
    s_Cb=16 * 2048, s_Cg=16 * 2048, s_Cn=2048,
    N=8192, K=2048, s_xb=2048, s_wn=2048, s_rb=8192,  # decode_linear: 1.4B's in_proj
    M=64, k_per_split=2048, s_xm=2048, s_rm=8192, s_om=8192, s_op=64 * 8192,  # at batch 64
    n_split=4, s_pp=64 * 8192, s_pm=8192,
    n_rows=4096 * 8, nb=8, s_xe=8 * 2048, s_oe=8 * 2048, s_ue=8 * 2048,
    s_dxe=8 * 2048, s_dxb=2048,  # the conv: (4096, 8, 2048), the model's (channels, b, L)
)  # fmt: skip


# A one-step sequence at batch 1 (L = 1, n_ck = 1): arguments equal to 1 become Python ints in
# the kernel, which the interpreter never shows (e.g. `n_ck.to(...)` fails to compile).
ONE_INTS = dict(ROW1_INTS, batch=1, seqlen=1, n_ck=1, seg_len=8, head_len=8, s_ub=4096, s_ud=1,
                s_db=4096, s_dd=1, s_zb=4096, s_zd=1, s_ob=4096, s_od=1, s_Bb=16, s_Bg=16, s_Bn=1,
                s_Cb=16, s_Cg=16, s_Cn=1)  # fmt: skip


# The fourth ANCHORS row (1 x 4096 x 65536 x 16): segments chained by the look-back, whose code
# the first row's n_seg = 1 (a constant) compiles away. The backward's look-back (`chained` 0).
_L4 = 65536
ROW4_INTS = dict(ROW1_INTS, batch=1, seqlen=_L4, n_seg=4, seg_len=_L4 // 4, head_len=_L4 // 4,
                 balance=1, chained=0,
                 s_ub=4096 * _L4, s_ud=_L4, s_db=4096 * _L4, s_dd=_L4, s_zb=4096 * _L4, s_zd=_L4,
                 s_ob=4096 * _L4, s_od=_L4, s_Bb=16 * _L4, s_Bg=16 * _L4, s_Bn=_L4,
                 s_Cb=16 * _L4, s_Cg=16 * _L4, s_Cn=_L4)  # fmt: skip


def compile_kernel(kernel, constexprs: dict, num_warps: int, arch: int, dtype: str = "bf16",
                   ints: dict | None = None, maxnreg: int | None = None):  # fmt: skip
    """Compile for GPUTarget(cuda, arch). ints: values of integer arguments to specialize on as
    the JIT would (1 -> constant, multiple of 16 -> divisibility); others stay generic i32.
    maxnreg: the register cap the launch passes (the forward's on the first row, an H200)."""
    ints = ROW1_INTS if ints is None else ints
    signature, attrs, constexprs = {}, {}, dict(constexprs)
    for i, param in enumerate(kernel.params):
        name = param.name
        if param.is_constexpr:
            if name not in constexprs:
                raise KeyError(f"no value for constexpr {name} of {kernel.fn.__name__}")
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = (
                "*fp32" if name in F32_PTRS else "*i32" if name in I32_PTRS else f"*{dtype}"
            )
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in F32_SCALARS:
            signature[name] = "fp32"
        elif ints.get(name) == 1:
            signature[name] = "constexpr"
            constexprs[name] = 1
        else:
            signature[name] = "i32"
            if name in ints and ints[name] % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return triton.compile(
        ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs),
        target=GPUTarget("cuda", arch, 32),
        options={"num_warps": num_warps, **({"maxnreg": maxnreg} if maxnreg else {})},
    )


def _cuobjdump(bin_dir: pathlib.Path, flag: str, cubin: pathlib.Path) -> str:
    done = subprocess.run([str(bin_dir / "cuobjdump"), flag, str(cubin)], capture_output=True,
                          text=True, check=True)  # fmt: skip
    return done.stdout


def main() -> int:
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("unset TRITON_INTERPRET: interpreted kernels cannot be compiled", file=sys.stderr)
        return 2
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--res", action="store_true")
    parser.add_argument("--sass", type=pathlib.Path, default=None)
    args = parser.parse_args()
    bin_dir = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    failed = []
    # the first row's 2048 forward programs are over maxnreg_from per SM on an H200: capped
    cap = common.fwd_config(4096, 16, (1, 1)).maxnreg
    for name, kernel, constexprs, num_warps in jobs():
        maxnreg = cap if kernel is _scan_fwd_kernel else None
        compile_kernel(kernel, constexprs, num_warps, args.arch, ints=ONE_INTS, maxnreg=maxnreg)
        if kernel in (_scan_fwd_kernel, _scan_bwd_kernel):
            compile_kernel(kernel, constexprs, num_warps, args.arch, ints=ROW4_INTS,
                           maxnreg=maxnreg)  # fmt: skip
        compiled = compile_kernel(kernel, constexprs, num_warps, args.arch, maxnreg=maxnreg)
        meta = compiled.metadata
        print(f"{name}: {constexprs} warps={num_warps} maxnreg={maxnreg} shared={meta.shared}B")
        # inline assembly only in eager-launched variants: the reduce-scatter and PDL's wait
        eager_only = constexprs.get("RS") is True or constexprs.get("GDC") is True
        if not eager_only and "inline_asm" in compiled.asm["ttir"]:
            failed.append(name)
        if not (args.res or args.sass):
            continue
        with tempfile.TemporaryDirectory() as tmp:
            cubin = pathlib.Path(tmp) / f"{name}.cubin"
            cubin.write_bytes(compiled.asm["cubin"])
            if args.res:
                res = _cuobjdump(bin_dir, "-res-usage", cubin).splitlines()
                print("   ", " ".join(line.strip() for line in res if "REG" in line))
            if args.sass is not None:
                args.sass.mkdir(parents=True, exist_ok=True)
                (args.sass / f"{name}.sass").write_text(_cuobjdump(bin_dir, "-sass", cubin))
    if failed:
        print(f"inline assembly in kernels that compiled graphs use: {failed}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
