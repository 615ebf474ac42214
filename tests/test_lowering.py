"""The Triton launchers against the float64 oracle, on CPU under TRITON_INTERPRET=1.

The interpreter runs the same kernels as the GPU with tiny launch configurations (a checkpoint
interval of 4 steps, 4-channel blocks, segments of 8 steps once there are under 16 programs), so
short sequences already cross several chunks and segments. Outputs are allocated NaN-filled
(poison): an element a kernel forgets to write fails the comparison. On a CUDA machine the same
tests run the real configurations on the GPU.
"""

from __future__ import annotations

import dataclasses
import importlib.util

import pytest
import torch
from scan_inputs import run_decode_step

from mamba_compiled.ops.reference import (
    decode_linear_ref,
    selective_scan_ref,
    selective_state_update_ref,
)

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None, reason="the kernels need triton"
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    """torch.empty and torch.empty_like return NaN-filled floating tensors while a test runs."""

    def nan_filled(alloc):
        def poisoned(*args, **kwargs):
            t = alloc(*args, **kwargs)
            return t.fill_(float("nan")) if t.is_floating_point() else t

        return poisoned

    monkeypatch.setattr(torch, "empty", nan_filled(torch.empty))
    monkeypatch.setattr(torch, "empty_like", nan_filled(torch.empty_like))


@dataclasses.dataclass
class Case:
    batch: int = 2
    dim: int = 8
    seqlen: int = 13
    dstate: int = 4
    B: str = "var"  # "var" (batch, 1, dstate, L), "shared" (dim, dstate), "g2" (batch, 2, ...)
    C: str = "var"
    D: bool = True
    z: bool = True
    bias: bool = True
    softplus: bool = True
    h0: bool = True
    dlast: bool = True
    dtype: torch.dtype = torch.float32
    strided: bool = False  # u and z as halves of one (batch, 2·dim, L) tensor, like x and z
    dout_t_stride: bool = False  # dout with stride(-1) != 1
    channel_major: bool = False  # u, delta, z, B, C as (batch, c, L) views of (c, batch, L) memory
    deterministic: bool = False  # per-block dB/dC partial sums instead of atomics
    bwd_rs: bool = True  # interpreter: backward dB/dC by the reduce-scatter (else tl.sum)
    bc_f32: bool = False  # interpreter: per-step B, C staged in fp32 by the launchers
    pipe: int = 1  # interpreter: the forward's chunk loops through Triton's pipeliner (stages)
    fwd_t2: bool = False  # interpreter: forward chunks of two checkpoint intervals (as on GPUs)
    ck: int | None = None  # checkpoint interval (8: two chunks of 4 per checkpoint)
    balance: bool = True  # look-back: local pass shared evenly (else by segment)
    bwd_resident: int | None = None  # backward programs resident at once (interpreter: 4)
    head: int = 0  # forward: a long first segment (head / 10 times the others), else balanced

    def bc(self, layout: str) -> torch.Tensor:
        b, d, n, L = self.batch, self.dim, self.dstate, self.seqlen
        shape = {"var": (b, 1, n, L), "shared": (d, n), "g2": (b, 2, n, L)}[layout]
        dtype = torch.float32 if layout == "shared" else self.dtype
        return torch.randn(shape, device=DEVICE).to(dtype)

    def inputs(self) -> dict:
        b, d, n, L = self.batch, self.dim, self.dstate, self.seqlen
        act = dict(device=DEVICE, dtype=self.dtype)
        if self.strided:
            xz = torch.randn(b, 2 * d, L, **act)
            u, z = xz[:, :d], xz[:, d:]
        elif self.channel_major:  # the model's layout
            xz = torch.randn(2 * d, b, L, **act)
            u, z = xz[:d].permute(1, 0, 2), xz[d:].permute(1, 0, 2)
        else:
            u, z = torch.randn(b, d, L, **act), torch.randn(b, d, L, **act)
        f32 = dict(device=DEVICE, dtype=torch.float32)
        delta = (0.5 * torch.rand(b, d, L, **f32) - 0.1).to(self.dtype)
        B, C = self.bc(self.B), self.bc(self.C)
        if self.channel_major:
            delta = delta.permute(1, 0, 2).contiguous().permute(1, 0, 2)
            B, C = (M.permute(1, 2, 0, 3).contiguous().permute(2, 0, 1, 3) for M in (B, C))
        return dict(
            u=u,
            delta=delta,
            A=-0.5 * torch.rand(d, n, **f32) - 0.1,
            B=B,
            C=C,
            D=torch.randn(d, **f32) if self.D else None,
            z=z if self.z else None,
            delta_bias=0.5 * torch.rand(d, **f32) if self.bias else None,
            initial_state=torch.randn(b, d, n, **f32) if self.h0 else None,
        )


CASES = [
    pytest.param(Case(), id="all-options-L13"),
    pytest.param(Case(deterministic=True), id="all-options-L13-deterministic"),
    pytest.param(Case(seqlen=1), id="L1"),
    pytest.param(Case(seqlen=4), id="one-chunk"),
    pytest.param(Case(seqlen=24, batch=1), id="L24-chunk-multiple"),
    pytest.param(Case(B="shared", C="shared", z=False), id="shared-BC-no-z"),
    pytest.param(Case(B="g2", C="g2", seqlen=9), id="groups2"),
    pytest.param(Case(B="g2", C="var", seqlen=9, deterministic=True), id="groups2-deterministic"),
    pytest.param(Case(B="shared", C="g2"), id="shared-B-grouped-C"),
    pytest.param(
        Case(D=False, z=False, bias=False, softplus=False, h0=False, dlast=False, seqlen=7),
        id="no-options",
    ),
    pytest.param(Case(dim=6, dstate=3, seqlen=10), id="dim6-dstate3-padding"),
    pytest.param(Case(strided=True, dout_t_stride=True, seqlen=11), id="strided-x-z-dout"),
    pytest.param(Case(dtype=torch.bfloat16, seqlen=10), id="bf16"),
    pytest.param(Case(channel_major=True, dout_t_stride=True, seqlen=19), id="channel-major"),
    pytest.param(Case(dtype=torch.float16, B="g2", C="shared", seqlen=10), id="fp16"),
    pytest.param(Case(batch=1, seqlen=38), id="segments5-tail"),
    pytest.param(Case(batch=1, seqlen=38, dtype=torch.bfloat16), id="segments5-bf16"),
    pytest.param(Case(batch=1, seqlen=38, deterministic=True, bwd_rs=False), id="segments5-sum"),
    # 4 programs, as many as `bwd_resident` says run at once: the backward's segments chained
    # without the adjoint-only pass (the cases above with batch 1 have 2 programs: with it)
    pytest.param(Case(batch=2, seqlen=38, dtype=torch.bfloat16), id="segments4-chained-bf16"),
    pytest.param(Case(batch=2, seqlen=37, deterministic=True), id="segments4-chained-tail"),
    pytest.param(Case(B="g2", C="g2", seqlen=11, bwd_rs=False), id="groups2-sum"),
    pytest.param(Case(dtype=torch.bfloat16, B="g2", seqlen=10, bc_f32=True), id="bf16-bc-fp32"),
    pytest.param(Case(batch=1, seqlen=38, pipe=3), id="segments5-pipe3"),
    # the GPU default's forward: a checkpoint in the middle of each chunk, the pipeline, fp32
    # B/C, segments (balanced, and with a long first segment)
    pytest.param(Case(batch=1, seqlen=45, dtype=torch.bfloat16, pipe=3, bc_f32=True, fwd_t2=True),
                 id="segments-t2-pipe3-bc-fp32"),
    pytest.param(Case(batch=1, seqlen=203, dtype=torch.bfloat16, pipe=3, bc_f32=True, fwd_t2=True,
                      head=17), id="segments-t2-pipe3-bc-fp32-head"),
    # 8 segments of 13 chunks: the balanced look-back (each program scans 11-12 chunks before
    # the chain), and the look-back by segment
    pytest.param(Case(batch=1, seqlen=403, dtype=torch.bfloat16), id="segments8-balanced"),
    pytest.param(Case(batch=1, seqlen=403, balance=False), id="segments8-by-segment"),
    # the backward's balanced look-back takes at most a wave (`bwd_resident`) of programs: here
    # 8 segments for its 2 programs per segment (4 under the interpreter's default)
    pytest.param(Case(batch=1, seqlen=403, bwd_resident=16, deterministic=True),
                 id="segments8-bwd-balanced"),
    # the forward's look-back with a long first segment (1.8 times the others')
    pytest.param(Case(batch=1, seqlen=403, head=18), id="segments8-head"),
    pytest.param(Case(batch=1, seqlen=38, head=18, dtype=torch.bfloat16), id="segments5-head"),
    pytest.param(Case(batch=1, seqlen=403, head=18, pipe=3), id="segments8-head-pipe3"),
    # a checkpoint every two chunks: odd chunks start from the state after the even one
    pytest.param(Case(ck=8), id="ck2chunks-L13-tail-odd"),
    pytest.param(Case(ck=8, seqlen=21, B="shared", deterministic=True), id="ck2chunks-shared-B"),
    pytest.param(Case(ck=8, batch=1, seqlen=38, dtype=torch.bfloat16), id="ck2chunks-segments"),
]


def _f64(t):
    return None if t is None else t.detach().double().requires_grad_()


def _reference(case: Case, kw: dict, dout: torch.Tensor, dlast: torch.Tensor | None):
    """Forward and all gradients through the oracle in float64 (joint loss on out, last_state).
    B and C per-step (batch, 1, dstate, L) go to the oracle as (batch, dstate, L) like the op."""
    ref_in = {k: _f64(v) for k, v in kw.items()}
    f64 = dict(dtype=torch.float64, device=DEVICE, requires_grad=True)
    zero_D = ref_in["D"] if case.D else torch.zeros(case.dim, **f64)
    zero_bias = ref_in["delta_bias"] if case.bias else torch.zeros(case.dim, **f64)
    zero_h0 = (
        ref_in["initial_state"]
        if case.h0
        else torch.zeros(case.batch, case.dim, case.dstate, **f64)
    )
    out, last = selective_scan_ref(
        ref_in["u"], ref_in["delta"], ref_in["A"], ref_in["B"], ref_in["C"], zero_D,
        ref_in["z"], zero_bias, case.softplus, return_last_state=True, initial_state=zero_h0,
    )  # fmt: skip
    loss = (out * dout.double()).sum()
    if dlast is not None:
        loss = loss + (last * dlast.double()).sum()
    loss.backward()
    grads = dict(
        u=ref_in["u"].grad, delta=ref_in["delta"].grad, A=ref_in["A"].grad, B=ref_in["B"].grad,
        C=ref_in["C"].grad, D=zero_D.grad, delta_bias=zero_bias.grad, initial_state=zero_h0.grad,
    )  # fmt: skip
    if case.z:
        grads["z"] = ref_in["z"].grad
    return out.detach(), last.detach(), grads


def _close(name: str, got: torch.Tensor, ref: torch.Tensor, tol: float):
    assert got.shape == ref.shape, f"{name}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    assert not torch.isnan(got).any(), f"{name}: NaN (an element was not written)"
    err = (got.double() - ref).abs().max().item()
    scale = ref.abs().max().item() + 1e-6
    assert err <= tol * scale, f"{name}: max error {err:.3g} > {tol} x max|ref| {scale:.3g}"


TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 3e-3}


def test_checkpoint_dtype_leaves_the_forward_alone(request):
    """bf16 checkpoints (16-bit inputs) against fp32 ones: the forward's output and last state
    are bit-identical (segments pass their states in fp32), the gradients agree to bf16."""
    from mamba_compiled.lowering import common, scan_bwd, scan_fwd

    request.addfinalizer(common.set_override)
    case = Case(batch=1, seqlen=38, dtype=torch.bfloat16)  # 5 segments under the interpreter
    kw = case.inputs()
    args = [kw[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")]
    dout = torch.randn_like(kw["u"])
    results = []
    for ck_fp32 in (False, True):
        common.set_override(ck_fp32=ck_fp32)
        out, last, ck = scan_fwd(*args, True)
        assert ck.dtype == (torch.float32 if ck_fp32 else torch.bfloat16)
        grads = scan_bwd(dout, None, *args, ck, True, True)
        results.append((out, last, grads))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
    for name, g16, g32 in zip("u delta A B C D z bias h0".split(), results[0][2], results[1][2],
                              strict=True):  # fmt: skip
        _close(f"d{name}", g16, g32.double(), TOL[torch.bfloat16])


def test_forward_without_checkpoints():
    """save_checkpoints=False (inference): the kernel stores no checkpoint, and the output and
    last state are those of the forward that does, bit for bit (segments included)."""
    from mamba_compiled.lowering import scan_fwd

    case = Case(batch=1, seqlen=38, dtype=torch.bfloat16)  # 5 segments under the interpreter
    kw = case.inputs()
    args = [kw[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")]
    out, last, ck = scan_fwd(*args, True)
    out_ng, last_ng, ck_ng = scan_fwd(*args, True, False)
    assert ck.numel() > 0 and ck_ng.shape == (1, 0, *ck.shape[2:])
    assert torch.equal(out_ng, out) and torch.equal(last_ng, last)


def test_softplus_split_is_exact(request):
    """The forward with each softplus computed by one of a channel's two state lanes and shared
    (`ScanConfig.sp_split`) returns the same output, last state and checkpoints, bit for bit
    (segments included)."""
    from mamba_compiled.lowering import common, scan_fwd

    request.addfinalizer(common.set_override)
    case = Case(batch=1, seqlen=38, dtype=torch.bfloat16)  # 5 segments under the interpreter
    kw = case.inputs()
    args = [kw[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")]
    fwd = common.fwd_config(case.dim, case.dstate, (1, 1))
    assert fwd.N_B == 2
    results = []
    for split in (False, True):
        common.set_override(fwd=dataclasses.replace(fwd, sp_split=split))
        results.append(scan_fwd(*args, True))
    for name, a, b in zip(("out", "last", "checkpoints"), *results, strict=True):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("case", CASES)
def test_scan_forward_backward(case: Case, request):
    from mamba_compiled.lowering import common, scan_bwd, scan_fwd
    from mamba_compiled.lowering.common import checkpoint_dtype, checkpoint_interval

    if case.ck is not None or case.bwd_resident is not None:
        common.set_override(ck=case.ck, bwd_resident=case.bwd_resident)
        request.addfinalizer(common.set_override)
    if DEVICE == "cpu" and (
        not case.bwd_rs or case.bc_f32 or case.pipe > 1 or case.fwd_t2 or not case.balance
        or case.head
    ):
        fwd = common.fwd_config(case.dim, case.dstate, (1, 1))
        bwd = common.bwd_config(case.dim, case.dstate, (1, 1))
        common.set_override(
            fwd=dataclasses.replace(fwd, bc_f32=case.bc_f32, pipe=case.pipe,
                                    T=2 * fwd.T if case.fwd_t2 else fwd.T,
                                    balance=case.balance, head=case.head),
            bwd=dataclasses.replace(bwd, rs=case.bwd_rs, bc_f32=case.bc_f32,
                                    balance=case.balance),
            ck=case.ck, bwd_resident=case.bwd_resident,
        )  # fmt: skip
        request.addfinalizer(common.set_override)
    kw = case.inputs()
    b, d, n, L = case.batch, case.dim, case.dstate, case.seqlen
    out, last, ck = scan_fwd(
        kw["u"], kw["delta"], kw["A"], kw["B"], kw["C"], kw["D"], kw["z"], kw["delta_bias"],
        kw["initial_state"], case.softplus,
    )  # fmt: skip
    if case.dout_t_stride:
        dout = torch.randn(b, L, d, device=DEVICE).to(case.dtype).transpose(1, 2)
        assert dout.stride(-1) != 1
    else:
        dout = torch.randn(b, d, L, device=DEVICE).to(case.dtype)
    dlast = torch.randn(b, d, n, device=DEVICE) if case.dlast else None
    ref_out, ref_last, ref_grads = _reference(case, kw, dout, dlast)
    tol = TOL[case.dtype]

    assert out.dtype == case.dtype
    # out takes u's layout when u is dense (the model's channel-major memory), else contiguous
    assert out.stride() == (kw["u"].stride() if case.channel_major else out.contiguous().stride())
    _close("out", out, ref_out, tol)
    _close("last_state", last, ref_last, tol)
    # checkpoints: the state before steps 0, CK, 2·CK, ... then the last state
    ck_every = checkpoint_interval()
    n_ck = -(-L // ck_every)
    assert ck.shape == (b, n_ck + 1, d, n)
    assert ck.dtype == checkpoint_dtype(case.dtype)  # bf16 for 16-bit inputs
    ck_tol = TOL[ck.dtype]
    h0 = kw["initial_state"] if case.h0 else torch.zeros(b, d, n, device=DEVICE)
    _close("checkpoint 0", ck[:, 0], h0.double(), ck_tol)
    _close("checkpoint last", ck[:, n_ck], ref_last, ck_tol)
    if n_ck > 1:
        per_step = lambda k, v: v is not None and (k in ("u", "delta", "z") or v.dim() == 4)  # noqa: E731
        upto = {k: v[..., :ck_every] if per_step(k, v) else v for k, v in kw.items()}
        _, h_ck1 = selective_scan_ref(
            **{k: _f64(v) for k, v in upto.items()}, delta_softplus=case.softplus,
            return_last_state=True,
        )  # fmt: skip
        _close("checkpoint 1", ck[:, 1], h_ck1.detach(), ck_tol)

    grads = scan_bwd(
        dout, dlast, kw["u"], kw["delta"], kw["A"], kw["B"], kw["C"], kw["D"], kw["z"],
        kw["delta_bias"], kw["initial_state"], ck, case.softplus, case.deterministic,
    )  # fmt: skip
    names = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state"]
    got = dict(zip(names, grads, strict=True))
    for name in names:
        if name == "z" and not case.z:
            assert got["z"].numel() == 0
            continue
        ref = ref_grads[name]
        like = kw[name] if kw[name] is not None else ref
        if kw[name] is not None:
            assert got[name].dtype == like.dtype, f"d{name}: dtype {got[name].dtype}"
        if name in ("u", "delta", "z"):  # in u's layout (the channel-major case's too)
            assert got[name].stride() == torch.empty_like(kw["u"]).stride(), f"d{name} strides"
        _close(f"d{name}", got[name], ref, 4 * tol)


def test_segments_are_used():
    """The segment cases above really run several segments (programs chained by the look-back)
    under the interpreter's configuration, forward and backward."""
    from mamba_compiled.lowering import common

    if DEVICE != "cpu":
        pytest.skip("interpreter configuration")
    for cfg in (common.fwd_config(8, 4, (1, 1)), common.bwd_config(8, 4, (1, 1))):
        assert common.segments(1 * (8 // cfg.BD), 38, cfg) == (5, 8)
        assert common.segments(2 * (8 // cfg.BD), 13, cfg) == (2, 8)
        assert common.segments(2 * (8 // cfg.BD), 4, cfg)[0] == 1


def test_register_cap_only_where_it_helps(monkeypatch):
    """The forward's `maxnreg` goes to eager launches of 16-bit inputs only: not to fp32 tiles
    (they spill), not under the interpreter (no registers), not to traced launches
    (wrap_triton takes no maxnreg)."""
    from mamba_compiled.lowering import common

    cfg = common.ScanConfig(16, 8, 2, 1, maxnreg=128, maxnreg_from=0)
    expected = dict(num_warps=1, num_stages=1)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert common.launch_options(cfg, torch.zeros(2, dtype=torch.bfloat16), 10**6) == expected
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert common.launch_options(cfg, torch.zeros(2), 10**6) == expected  # fp32
    with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
        fake = mode.from_tensor(torch.zeros(2, dtype=torch.bfloat16))
        assert common.launch_options(cfg, fake, 10**6) == expected


def test_segments_add_no_guards():
    """The number of segments comes from batch and seqlen by integer arithmetic on sizes only:
    symbolic sizes (torch.compile, export with dynamic batch and seqlen) get no guards, and the
    buffers sized by it neither."""
    from torch._dynamo.source import ConstantSource
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv

    from mamba_compiled.lowering.common import ScanConfig, segments

    env = ShapeEnv()

    def sym(name, hint):
        src = ConstantSource(name)
        return env.create_symintnode(
            env.create_symbol(hint, source=src, dynamic_dim=DimDynamic.DYNAMIC), hint=hint,
            source=src,
        )  # fmt: skip

    batch, seqlen = sym("batch", 3), sym("seqlen", 5000)
    cfg = ScanConfig(BD=16, T=8, N_B=4, num_warps=2, target=1024, min_seg=1024)
    n_seg, seg_len = segments(batch * 256, seqlen, cfg)
    with FakeTensorMode(shape_env=env):
        flags = torch.zeros((1 + (n_seg + 1) * batch * 256,), dtype=torch.int32)
        part = torch.empty((n_seg + 1, batch, 64, 16)).sum((0, 1))
    assert flags.dim() == 1 and part.shape == (64, 16)
    assert not env.guards, env.guards
    assert segments(3 * 256, 5000, cfg) == (2, 2504)
    # min_split 3: no segments where 2 would do, unchanged from 3 on
    few = ScanConfig(BD=16, T=8, N_B=2, num_warps=1, target=1024, min_seg=128, min_split=3)
    assert segments(768, 2048, few) == (1, 2048)
    assert segments(512, 2048, few) == (1, 2048)
    assert segments(511, 2048, few) == (3, 688)
    assert segments(96, 2048, few) == segments(96, 2048, dataclasses.replace(few, min_split=2))
    n_seg, _ = segments(batch * 256, seqlen, few)
    assert not env.guards, env.guards
    # the backward's cap (at most a wave of programs unless chained), as its launcher forms it
    programs = batch * 256
    chained = torch.sym_min(1, programs // 1056)
    n_seg, _ = segments(programs, seqlen, cfg, torch.sym_max(chained * (1 << 30), 1056 // programs))
    assert not env.guards, env.guards
    bwd = ScanConfig(BD=8, T=8, N_B=4, num_warps=1, target=4096, min_seg=1024)
    assert segments(512, 65536, bwd, 1056 // 512) == (2, 32768)
    assert segments(512, 65536, bwd) == (8, 8192)


def test_backward_deterministic_bitwise():
    from mamba_compiled.lowering import scan_bwd, scan_fwd

    case = Case(B="g2", C="shared", seqlen=9)
    kw = case.inputs()
    args = [kw[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")]
    _, _, ck = scan_fwd(*args, True)
    dout = torch.randn_like(kw["u"])
    first = scan_bwd(dout, None, *args, ck, True, True)
    second = scan_bwd(dout, None, *args, ck, True, True)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


@dataclasses.dataclass
class StepCase:
    batch: int = 3
    dim: int = 8
    dstate: int = 4
    groups: int = 1
    D: bool = True
    z: bool = True
    bias: bool = True
    softplus: bool = True
    dtype: torch.dtype = torch.float32


STEP_CASES = [
    pytest.param(StepCase(), id="all-options"),
    pytest.param(StepCase(groups=2, dim=6, dstate=3), id="groups2-padding"),
    pytest.param(StepCase(D=False, z=False, bias=False, softplus=False), id="no-options"),
    pytest.param(StepCase(dtype=torch.bfloat16), id="bf16"),
]


@pytest.mark.parametrize("case", STEP_CASES)
def test_state_update(case: StepCase):
    from mamba_compiled.lowering import state_update

    b, d, n, g = case.batch, case.dim, case.dstate, case.groups
    f32 = dict(device=DEVICE, dtype=torch.float32)
    act = dict(device=DEVICE, dtype=case.dtype)
    cache = torch.randn(b, d, 2 * n, **f32)
    state = cache[..., :n]  # a strided state, like a slice of a bigger cache
    x, dt = torch.randn(b, d, **act), (0.5 * torch.rand(b, d, **f32)).to(case.dtype)
    A = -0.5 * torch.rand(d, n, **f32)
    B, C = torch.randn(b, g, n, **act), torch.randn(b, g, n, **act)
    D = torch.randn(d, **f32) if case.D else None
    z = torch.randn(b, d, **act) if case.z else None
    bias = 0.5 * torch.rand(d, **f32) if case.bias else None
    f = lambda t: None if t is None else t.double()  # noqa: E731
    ref_out, ref_state = selective_state_update_ref(
        f(state), f(x), f(dt), f(A), f(B), f(C), f(D), f(z), f(bias), case.softplus
    )
    other_half = cache[..., n:].clone()
    out = state_update(state, x, dt, A, B, C, D, z, bias, case.softplus)
    tol = TOL[case.dtype]
    assert out.dtype == case.dtype
    _close("out", out, ref_out, tol)
    _close("state (in place)", state, ref_state, 1e-5 if case.dtype == torch.float32 else tol)
    assert torch.equal(cache[..., n:], other_half), "wrote outside the state slice"


def test_state_update_steps_equal_scan():
    """Decoding L steps one at a time equals one scan over the L steps."""
    from mamba_compiled.lowering import scan_fwd, state_update

    b, d, n, L = 2, 8, 4, 6
    f32 = dict(device=DEVICE, dtype=torch.float32)
    u, delta, z = (torch.randn(b, d, L, **f32), torch.rand(b, d, L, **f32),
                   torch.randn(b, d, L, **f32))  # fmt: skip
    A, D, bias = -torch.rand(d, n, **f32), torch.randn(d, **f32), torch.rand(d, **f32)
    B, C = torch.randn(b, 1, n, L, **f32), torch.randn(b, 1, n, L, **f32)
    h0 = torch.randn(b, d, n, **f32)
    out, last, _ = scan_fwd(u, delta, A, B, C, D, z, bias, h0, True)
    state = h0.clone()
    steps = [
        state_update(
            state, u[..., t], delta[..., t], A, B[..., t], C[..., t], D, z[..., t], bias, True
        )
        for t in range(L)
    ]
    torch.testing.assert_close(torch.stack(steps, -1), out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(state, last, rtol=1e-5, atol=1e-5)


def test_package_imports_without_triton():
    """`mamba_compiled.lowering` imports where triton is absent (no top-level triton import)."""
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['triton'] = None\n"  # any `import triton` now fails
        "import mamba_compiled.lowering as l; print(l.__all__)"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)


def test_kernels_compile_for_hopper():
    """The GPU configurations compile to sm_90 machine code (no GPU needed: Triton's bundled
    ptxas). The interpreter accepts code the compiler rejects (e.g. non-constexpr globals). Runs
    in a fresh process: under TRITON_INTERPRET=1 the kernels cannot be compiled."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run(
        [sys.executable, "-m", "mamba_compiled.lowering.compile_check"],
        env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr


def _decode_inputs(batch, d, n, width, rank, parts, dtype, conv_bias):
    """Fresh inputs of the model's decode step: state, conv_state, conv_x, z, conv_w, conv_b,
    x_dbl (parts partial sums), dt_weight, A, D, bias."""
    f32 = dict(device=DEVICE, dtype=torch.float32)
    act = dict(device=DEVICE, dtype=dtype)
    return (
        torch.randn(batch, d, n, **f32), torch.randn(batch, d, width, **act),
        torch.randn(batch, d, **act), torch.randn(batch, d, **act),
        (0.5 * torch.randn(d, width, **f32)).to(dtype),
        torch.randn(d, **f32).to(dtype) if conv_bias else None,
        0.3 * torch.randn(parts, batch, rank + 2 * n, **f32),
        (0.3 * torch.randn(d, rank, **f32)).to(dtype),
        -0.5 * torch.rand(d, n, **f32), torch.randn(d, **f32), torch.rand(d, **f32),
    )  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("rank,width,conv_bias,parts", [(3, 4, True, 3), (5, 2, False, 1)])
@pytest.mark.parametrize("batch,dim", [(3, 12), (20, 40)], ids=["batch3", "batch20"])
def test_decode_step_fused(dtype, rank, width, conv_bias, parts, batch, dim):
    """x_proj's partial sums summed, the conv's step, dt_proj, the state update and the
    conv-window shift in one kernel: equal to the oracle's state update fed with the conv
    output, dt, B and C computed in float64 (each rounded where the model rounds it), and to
    the window shifted by torch. From batch 9 (here 20) dt_proj runs first as decode_linear's
    tl.dot kernel (fp32 out) and the state-update kernel takes dt."""
    n = 4
    inputs = _decode_inputs(batch, dim, n, width, rank, parts, dtype, conv_bias)
    state, conv_state = inputs[:2]
    out, ref_out, ref_state, ref_conv = run_decode_step(inputs)
    tol = TOL[dtype]
    _close("out", out, ref_out, tol)
    _close("state (in place)", state, ref_state, 1e-5 if dtype == torch.float32 else tol)
    assert torch.equal(conv_state, ref_conv), "conv window not shifted exactly"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(
    "dim,rows,width,conv_bias", [(40, 11, 4, True), (100, 70, 3, False), (8, 11, 4, True)]
)  # (8 channels: one slice, below 9 rows still the one-kernel form)
@pytest.mark.parametrize("b", [2, 12])  # from 9 rows on, the conv's kernel, then tl.dot
def test_conv_x_proj(dtype, dim, rows, width, conv_bias, b):
    """The conv's step and x_proj as partial sums over slices of channels (a partial slice at
    the end when 32 does not divide dim, rows beyond one 64-row block): their sum equals
    silu(conv) rounded to the activation dtype, times x_proj's weight, in float64; the conv
    state is read, not changed."""
    from mamba_compiled.lowering import conv_x_proj
    from mamba_compiled.lowering.decode_step import conv_x_proj_parts

    act = dict(device=DEVICE, dtype=dtype)
    conv_state, conv_x = torch.randn(b, dim, width, **act), torch.randn(b, dim, **act)
    conv_w = 0.5 * torch.randn(dim, width, **act)
    conv_b = torch.randn(dim, **act) if conv_bias else None
    x_proj_w = 0.3 * torch.randn(rows, dim, **act)
    before = conv_state.clone()
    parts = conv_x_proj(conv_state, conv_x, conv_w, conv_b, x_proj_w)
    parts_n = conv_x_proj_parts(b, dim, dtype)
    assert parts.shape == (parts_n, b, rows) and parts.dtype == torch.float32
    f = lambda t: t.double()  # noqa: E731
    window = torch.cat([f(conv_state[:, :, 1:]), f(conv_x)[:, :, None]], dim=-1)
    u = (window * f(conv_w)).sum(-1) + (f(conv_b) if conv_bias else 0)
    u = f(torch.nn.functional.silu(u).to(dtype))
    _close("x_dbl", parts.sum(0), u @ f(x_proj_w).t(), 1e-5 if dtype == torch.float32 else 1e-2)
    assert torch.equal(conv_state, before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    "batch,N,K,norm,bias,residual",
    [
        (1, 70, 48, True, False, False),  # in_proj with the norm; K not a power of two
        (3, 33, 100, False, True, True),  # out_proj with the residual add; rows past the batch
        (9, 17, 64, True, True, True),  # tl.dot tiles from 9 rows on
        (12, 70, 48, True, False, False),  # in_proj above 8 rows: the norm's kernel, then tl.dot
        (40, 100, 200, True, True, True),  # rows and K past the tiles
        (64, 80, 1536, False, False, False),  # x_proj at batch 64: K split, partial sums
    ],
)
def test_decode_linear(dtype, batch, N, K, norm, bias, residual):
    """Decoding's linear layer (RMSNorm before, residual add after) against float64, with the
    model's roundings: the norm's output and the product in the weight's dtype."""
    from mamba_compiled.lowering import decode_linear

    act = dict(device=DEVICE, dtype=dtype)
    x = torch.randn(batch, K, device=DEVICE, dtype=torch.float32 if norm else dtype)
    w = torch.randn(N, K, **act) / K**0.5
    b = torch.randn(N, **act) if bias else None
    nw = (1 + 0.1 * torch.randn(K, **act)) if norm else None
    r = torch.randn(batch, N, device=DEVICE) if residual else None
    got = decode_linear(x, w, b, nw, 1e-5, r)
    assert got.dtype == (torch.float32 if residual else dtype)
    _close("out", got, decode_linear_ref(x, w, b, nw, 1e-5, r), TOL[dtype])


@pytest.mark.parametrize("split", [1, 3])
def test_decode_linear_dot_configs(split):
    """decode_linear's tl.dot kernel in configurations its heuristic does not pick: several
    row blocks, and K split in pieces that do not divide it (the last one short)."""
    from mamba_compiled.lowering.linear import DotConfig, decode_linear

    M, N, K = 40, 48, 300
    x = torch.randn(M, K, device=DEVICE)
    w = torch.randn(N, K, device=DEVICE) / K**0.5
    b, r = torch.randn(N, device=DEVICE), torch.randn(M, N, device=DEVICE)
    nw = 1 + 0.1 * torch.randn(K, device=DEVICE)
    got = decode_linear(x, w, b, nw, 1e-5, r, DotConfig(16, 16, 64, split))
    _close("out", got, decode_linear_ref(x, w, b, nw, 1e-5, r), TOL[torch.float32])


def test_launchers_trace_with_a_symbolic_seqlen_and_no_guards():
    """What torch.compile and export do to the CUDA launchers, on CPU: fake tensors with a
    symbolic seqlen through the scan's and the conv's forward and backward launchers (and the
    decode launchers at fixed shapes) allocate and launch without a guard on the seqlen (a
    guard would be a recompile per length under dynamic=True) and without calling anything
    that is not there (a function of the lowering package shadowed by its submodule once
    failed only on the GPU). In a fresh process without TRITON_INTERPRET: the interpreter runs
    kernels even on fake tensors."""
    import os
    import subprocess
    import sys

    code = "import test_lowering; test_lowering._trace_launchers()"
    env = dict(os.environ, TRITON_INTERPRET="0")
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=os.path.dirname(__file__), env=env,
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]


def _trace_launchers():
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import (
        DimDynamic,
        ShapeEnv,
        StatelessSymbolicContext,
    )

    from mamba_compiled import lowering

    env = ShapeEnv()
    mode = FakeTensorMode(shape_env=env)

    def fake(t, dynamic_last=False):
        dims = [DimDynamic.STATIC] * t.dim()
        if dynamic_last:
            dims[-1] = DimDynamic.DYNAMIC
        return mode.from_tensor(t, symbolic_context=StatelessSymbolicContext(dynamic_sizes=dims))

    b, d, n, L, bf = 2, 64, 16, 300, torch.bfloat16
    u, delta, z = (fake(torch.randn(b, d, L, dtype=bf), True) for _ in range(3))
    B, C = (fake(torch.randn(b, 1, n, L, dtype=bf), True) for _ in range(2))
    A, D, bias = fake(-torch.rand(d, n)), fake(torch.randn(d)), fake(torch.rand(d))
    rank, width = 4, 4
    with mode:
        out, last, ck = lowering.scan_fwd(u, delta, A, B, C, D, z, bias, None, True)
        grads = lowering.scan_bwd(
            torch.empty_like(out), None, u, delta, A, B, C, D, z, bias, None, ck, True, False
        )
        assert grads[0].shape == u.shape and ck.dtype == torch.bfloat16
        state, conv = torch.empty(b, d, n), torch.empty(b, d, width, dtype=bf)
        cx, cw = torch.empty(b, d, dtype=bf), torch.empty(d, width, dtype=bf)
        x_dbl = lowering.conv_x_proj(conv, cx, cw, None, torch.empty(rank + 2 * n, d, dtype=bf))
        y = lowering.state_update(
            state, None, None, A, None, None, D, cx, bias, True, torch.empty(d, rank, dtype=bf),
            conv, cx, cw, None, x_dbl,
        )  # fmt: skip
        h = lowering.decode_linear(torch.empty(b, 32), torch.empty(2 * d, 32, dtype=bf), None,
                                   torch.empty(32, dtype=bf), 1e-5, None)  # fmt: skip
        assert y.shape == (b, d) and h.shape == (b, 2 * d)
        # the conv on the model's (channels, b, L) memory: a view of u's
        xc = u.permute(1, 0, 2)
        cw32 = torch.empty(d, width)
        uc = lowering.conv_silu_fwd(xc, cw32, bias)
        dxc, dwc, _ = lowering.conv_silu_bwd(torch.empty_like(uc), xc, cw32, bias)
        assert uc.shape == dxc.shape == xc.shape and dwc.shape == (d, width)
    assert not env.guards, [str(g.expr) for g in env.guards]


@pytest.mark.parametrize(
    "E,b,L,W,bias,dtype",
    [
        (6, 2, 300, 4, True, torch.float32),  # two time blocks, a partial one
        (5, 3, 1, 4, True, torch.float32),  # shorter than the conv
        (3, 2, 7, 1, False, torch.float32),
        (4, 3, 260, 4, True, torch.bfloat16),
        (4, 2, 33, 4, True, torch.float16),
        (2, 1, 2600, 4, True, torch.float32),  # more step blocks than the backward's programs
        # the models' widths, on the GPU only (`pytest -m cuda` through perf/gpu_check.sh)
        *(pytest.param(*case, marks=pytest.mark.cuda) for case in [
            (1536, 2, 2048, 4, True, torch.bfloat16),  # 130M: 8 step blocks, 4 per g program
            (4096, 1, 2600, 4, True, torch.bfloat16),  # 1.4B: a partial last step block
            (768, 3, 333, 4, True, torch.float16),
            (512, 2, 1000, 4, True, torch.float32),
        ]),
    ],
)
def test_conv_silu_kernels(E, b, L, W, bias, dtype):
    """The conv + SiLU kernels (forward, g with dw/dbias partial sums, dx) against float64 on
    the model's (channels, batch, L) memory: the same inputs, weights rounded as the kernels
    round them. On the GPU these were otherwise checked only compiled against eager."""
    from mamba_compiled.lowering import conv_silu_bwd, conv_silu_fwd
    from mamba_compiled.ops.conv import _ConvSiLU

    x = torch.randn(b, E, L, device=DEVICE).to(dtype).permute(1, 0, 2)
    w = torch.randn(E, W, device=DEVICE)
    bs = torch.randn(E, device=DEVICE) if bias else None
    du = torch.randn(E, b, L, device=DEVICE).to(dtype)
    xr = x.double().requires_grad_(True)
    wr = w.to(dtype).double().requires_grad_(True)
    br = bs.to(dtype).double().requires_grad_(True) if bias else None
    ref = _ConvSiLU.apply(xr, wr, br)
    ref.backward(du.double())

    u = conv_silu_fwd(x, w, bs)
    dx, dw, dbias = conv_silu_bwd(du, x, w, bs)
    assert u.stride() == x.stride() and dx.stride() == x.stride()  # x's layout
    assert u.dtype == dx.dtype == dtype and dw.dtype == dbias.dtype == torch.float32
    tol = TOL[dtype]
    _close("u", u, ref.detach(), tol)
    _close("dx", dx, xr.grad, tol)
    # dw, dbias: sums over b·L of g rounded to the input dtype (as the plain version rounds it)
    _close("dw", dw, wr.grad, 5 * tol)
    if bias:
        _close("dbias", dbias, br.grad, 5 * tol)
