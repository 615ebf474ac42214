"""The Triton launchers on the GPU, at the real launch configurations (skipped without CUDA).

References are float64 on the GPU: a log-depth (doubling) scan over the whole sequence, exact
enough and fast for long sequences, with gradients by autograd (joint loss on out and
last_state). Tolerances are mamba_ssm's (rtol, atol) for outputs; gradients are compared by
their max error relative to the largest reference value. The 2^20-token run checks int64
indexing by comparing one launch over all 2048 channels with two launches over halves.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

pytestmark = pytest.mark.cuda

TOL = {torch.float32: (6e-4, 2e-3), torch.float16: (3e-3, 5e-3), torch.bfloat16: (3e-2, 5e-2)}
GRAD_TOL = {torch.float32: 1e-3, torch.float16: 1e-2, torch.bfloat16: 5e-2}


def scan_reference(u, delta, A, B, C, D, z, delta_bias, softplus, h0):
    """The scan in float64 by recursive doubling over L: (out, last_state), differentiable."""
    u, delta, A, B, C = (t.double() for t in (u, delta, A, B, C))
    batch, dim, L = u.shape
    dt = delta + delta_bias.double()[:, None]
    if softplus:
        dt = torch.where(dt <= 20.0, F.softplus(dt), dt)

    def per_step(M):
        if M.dim() == 2:
            return M[None, :, :, None]
        return M.repeat_interleave(dim // M.shape[1], dim=1)

    a = torch.exp(dt[:, :, None] * A[None, :, :, None])  # (b, d, n, L)
    x = dt[:, :, None] * per_step(B) * u[:, :, None]
    x = torch.cat([x[..., :1] + a[..., :1] * h0.double()[..., None], x[..., 1:]], -1)
    s = 1
    while s < L:
        x = torch.cat([x[..., :s], a[..., s:] * x[..., :-s] + x[..., s:]], -1)
        a = torch.cat([a[..., :s], a[..., s:] * a[..., :-s]], -1)
        s *= 2
    y = (x * per_step(C)).sum(2) + D.double()[:, None] * u
    if z is not None:
        y = y * F.silu(z.double())
    return y, x[..., -1]


def make_inputs(batch, dim, L, dstate, dtype, B_layout="var", C_layout="var", z=True,
                bc_dtype=None, slow=False):  # fmt: skip
    """slow: small Δ·A, so that the state remembers thousands of steps (across segments)."""
    dev = "cuda"

    def bc(layout):
        shape = {"var": (batch, 1, dstate, L), "shared": (dim, dstate),
                 "g2": (batch, 2, dstate, L)}[layout]  # fmt: skip
        return torch.randn(shape, device=dev).to(
            torch.float32 if layout == "shared" else bc_dtype or dtype
        )

    return dict(
        u=torch.randn(batch, dim, L, device=dev).to(dtype),
        delta=(0.5 * torch.rand(batch, dim, L, device=dev) - (6.0 if slow else 0.0)).to(dtype),
        A=-0.5 * torch.rand(dim, dstate, device=dev) * (0.1 if slow else 1.0),
        B=bc(B_layout),
        C=bc(C_layout),
        D=torch.randn(dim, device=dev),
        z=torch.randn(batch, dim, L, device=dev).to(dtype) if z else None,
        delta_bias=0.5 * torch.rand(dim, device=dev),
        initial_state=torch.randn(batch, dim, dstate, device=dev),
    )


ORDER = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")


def check(kw, softplus=True, deterministic=False):
    """Forward and every gradient of the launchers against scan_reference."""
    from mamba_compiled.lowering import scan_bwd, scan_fwd

    args = [kw[k] for k in ORDER]
    dtype = kw["u"].dtype
    out, last, ck = scan_fwd(*args, softplus)
    dout = torch.randn_like(out)
    dlast = torch.randn_like(last)
    grads = dict(zip(ORDER, scan_bwd(dout, dlast, *args, ck, softplus, deterministic), strict=True))

    ref_in = {k: None if v is None else v.detach().double().requires_grad_() for k, v in kw.items()}
    ref_out, ref_last = scan_reference(*[ref_in[k] for k in ORDER[:8]], softplus,
                                       ref_in["initial_state"])  # fmt: skip
    ((ref_out * dout.double()).sum() + (ref_last * dlast.double()).sum()).backward()

    rtol, atol = TOL[dtype]
    torch.testing.assert_close(out.double(), ref_out.detach(), rtol=rtol, atol=atol)
    torch.testing.assert_close(last.double(), ref_last.detach(), rtol=rtol, atol=atol)
    for name in ORDER:
        if kw[name] is None:
            continue
        ref = ref_in[name].grad
        got = grads[name]
        assert got.shape == ref.shape and got.dtype == kw[name].dtype, name
        err = (got.double() - ref).abs().max().item() / (ref.abs().max().item() + 1e-12)
        assert err < GRAD_TOL[dtype], f"d{name}: relative max error {err:.2e}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16],
                         ids=["fp32", "fp16", "bf16"])  # fmt: skip
@pytest.mark.parametrize("L", [1, 7, 128, 257, 1000, 2048, 4096])
def test_scan_lengths(dtype, L):
    check(make_inputs(2, 64, L, 16, dtype))


@pytest.mark.parametrize(
    "B_layout, C_layout, z, softplus",
    [
        pytest.param("shared", "shared", False, True, id="shared-BC-no-z"),
        pytest.param("g2", "g2", True, True, id="groups2"),
        pytest.param("shared", "var", True, False, id="shared-B-no-softplus"),
    ],
)
def test_scan_layouts(B_layout, C_layout, z, softplus):
    check(make_inputs(2, 64, 300, 16, torch.float32, B_layout, C_layout, z), softplus=softplus)


def test_scan_odd_sizes():
    check(make_inputs(3, 40, 333, 5, torch.float32))  # dim not a block multiple, dstate padded


def test_scan_deterministic_mode():
    check(make_inputs(2, 64, 500, 16, torch.bfloat16), deterministic=True)


def test_scan_65536():
    check(make_inputs(1, 16, 65536, 16, torch.float32))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_scan_segments_long_memory(dtype):
    """Batch 1, 64 channels, 20001 steps: tens of segments chained by the look-back, forward
    and backward, with a memory (Δ·A small) that spans many segments."""
    from mamba_compiled.lowering import common

    batch, dim, L = 1, 64, 20001
    fwd, bwd = common.fwd_config(dim, 16, (1, 1)), common.bwd_config(dim, 16, (1, 1))
    assert common.segments(batch * dim // fwd.BD, L, fwd)[0] > 8
    assert common.segments(batch * dim // bwd.BD, L, bwd)[0] > 8
    check(make_inputs(batch, dim, L, 16, dtype, slow=True))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_scan_segments_chained(dtype, request):
    """The backward's segments chained without the adjoint-only pass (what it does once a
    segment's programs fill the GPU, e.g. the 130M training step's 8 x 1536 x 2048): forced
    here at batch 1 by `bwd_resident=1`, so tens of segments wait for each other in turn."""
    from mamba_compiled.lowering import common

    common.set_override(bwd_resident=1)
    request.addfinalizer(common.set_override)
    check(make_inputs(1, 64, 20001, 16, dtype, slow=True))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("batch, L", [(2, 1000), (1, 20001)], ids=["L1000", "segments"])
def test_scan_checkpoint_every_two_chunks(dtype, batch, L, request):
    """`set_override(ck=16)`: a checkpoint every two chunks of 8 steps, the backward recomputing
    every other chunk's start state (also across the look-back's segments)."""
    from mamba_compiled.lowering import common

    common.set_override(ck=16)
    request.addfinalizer(common.set_override)
    assert common.chunk_length() == 8
    check(make_inputs(batch, 64, L, 16, dtype, slow=L > 10000))


def test_deterministic_bitwise():
    from mamba_compiled.lowering import scan_bwd, scan_fwd

    kw = make_inputs(2, 256, 2048, 16, torch.bfloat16)
    args = [kw[k] for k in ORDER]
    _, _, ck = scan_fwd(*args, True)
    dout = torch.randn(2, 256, 2048, device="cuda", dtype=torch.bfloat16)
    first = scan_bwd(dout, None, *args, ck, True, True)
    second = scan_bwd(dout, None, *args, ck, True, True)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


def test_2pow20_tokens_dim2048():
    """2^20 tokens at dim 2048 (offsets past 2^31 in the checkpoints and dB partials): one
    launch over all channels equals two launches over channel halves; the forward of a few
    channels, the last ones included, equals the float64 reference."""
    from mamba_compiled.lowering import common

    L, dim, half = 1 << 20, 2048, 1024
    # the same 16 segments for the full launch and the halves (segments otherwise follow the
    # number of programs, and their boundaries change the rounding)
    pin = dict(target=1 << 20, min_seg=1 << 16)
    common.set_override(
        fwd=dataclasses.replace(common.fwd_config(dim, 16, (1, 1)), **pin),
        bwd=dataclasses.replace(common.bwd_config(dim, 16, (1, 1)), **pin),
        bwd_resident=1 << 20,  # no cap of the backward's segments at a wave of programs
    )
    try:
        _check_2pow20(L, dim, half)
    finally:
        common.set_override()


def _check_2pow20(L, dim, half):
    from mamba_compiled.lowering import scan_bwd, scan_fwd

    kw = make_inputs(1, dim, L, 16, torch.bfloat16, bc_dtype=torch.float32)  # dB, dC in fp32
    args = [kw[k] for k in ORDER]
    out, last, ck = scan_fwd(*args, True)
    dout = torch.randn_like(out)
    full = scan_bwd(dout, None, *args, ck, True, False)
    del ck

    per_channel = {"u", "delta", "A", "D", "z", "delta_bias", "initial_state"}

    def part(name, v, sl):
        if v is None or name not in per_channel:
            return v
        return v[:, sl] if name in ("u", "delta", "z", "initial_state") else v[sl]

    dB = torch.zeros_like(full[3], dtype=torch.float32)
    dC = torch.zeros_like(full[4], dtype=torch.float32)
    for sl in (slice(0, half), slice(half, dim)):
        sub = [part(k, kw[k], sl) for k in ORDER]
        o, s, c = scan_fwd(*sub, True)
        assert torch.equal(o, out[:, sl]) and torch.equal(s, last[:, sl])
        g = scan_bwd(dout[:, sl].contiguous(), None, *sub, c, True, False)
        del c
        for i, name in enumerate(ORDER):
            if name in ("B", "C"):
                continue
            expect = full[i][:, sl] if full[i].dim() == 3 else full[i][sl]
            torch.testing.assert_close(g[i], expect, rtol=0, atol=0, msg=f"d{name}")
        dB += g[3].float()
        dC += g[4].float()
    for name, got, want in (("dB", full[3], dB), ("dC", full[4], dC)):  # atomics: order differs
        err = ((got - want).abs().max() / want.abs().max()).item()
        assert err < 1e-5, f"{name}: full launch vs halves, relative max error {err:.2e}"

    channels = [0, 1, dim - 2, dim - 1]
    sub = [part(k, kw[k], channels) for k in ORDER]
    ref_out, ref_last = scan_reference(*sub[:8], True, sub[8])
    rtol, atol = TOL[torch.bfloat16]
    torch.testing.assert_close(out[:, channels].double(), ref_out, rtol=rtol, atol=atol)
    torch.testing.assert_close(last[:, channels].double(), ref_last, rtol=rtol, atol=atol)


def _step_inputs(batch, dim, dstate, dtype, groups=1):
    dev = "cuda"
    return dict(
        state=torch.randn(batch, dim, dstate, device=dev),
        x=torch.randn(batch, dim, device=dev).to(dtype),
        dt=(0.5 * torch.rand(batch, dim, device=dev)).to(dtype),
        A=-0.5 * torch.rand(dim, dstate, device=dev),
        B=torch.randn(batch, groups, dstate, device=dev).to(dtype),
        C=torch.randn(batch, groups, dstate, device=dev).to(dtype),
        D=torch.randn(dim, device=dev),
        z=torch.randn(batch, dim, device=dev).to(dtype),
        dt_bias=0.5 * torch.rand(dim, device=dev),
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("batch, groups", [(1, 1), (64, 1), (3, 2)])
def test_state_update(dtype, batch, groups):
    from mamba_compiled.lowering import state_update
    from mamba_compiled.ops.reference import selective_state_update_ref

    kw = _step_inputs(batch, 4096, 16, dtype, groups)
    ref_out, ref_state = selective_state_update_ref(
        *[kw[k].double() for k in ("state", "x", "dt", "A", "B", "C", "D", "z", "dt_bias")], True
    )
    out = state_update(*kw.values(), True)
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(out.double(), ref_out, rtol=rtol, atol=atol)
    torch.testing.assert_close(kw["state"].double(), ref_state, rtol=1e-5, atol=1e-5)


def test_state_update_cuda_graph():
    """Capture the decode step in a CUDA graph; replays equal eager calls."""
    from mamba_compiled.lowering import state_update

    kw = _step_inputs(8, 4096, 16, torch.float16)
    eager_state = kw["state"].clone()
    rest = [kw[k] for k in ("x", "dt", "A", "B", "C", "D", "z", "dt_bias")]
    state_update(eager_state.clone(), *rest, True)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    graph_state = kw["state"].clone()
    with torch.cuda.graph(graph):
        graph_out = state_update(graph_state, *rest, True)
    for _ in range(3):
        eager_out = state_update(eager_state, *rest, True)
        graph.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(graph_out, eager_out, rtol=0, atol=0)
        torch.testing.assert_close(graph_state, eager_state, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("batch", [1, 12, 64])  # from 9 rows on, dt_proj as tl.dot first
@pytest.mark.parametrize("dim, rank", [(1536, 48), (4096, 128)], ids=["130m", "1.4b"])
def test_decode_step_model_sizes(dtype, batch, dim, rank):
    """The model's decode step (`ssm_decode_step`'s kernels) at the 130M and 1.4B sizes, x_proj's
    output given as 24 fp32 partial sums (batch 1), or one sum in the model's dtype (batch 12)
    or in fp32 (batch 64, as `conv_x_proj` gives it), against float64 with the model's
    roundings; the conv window shifted exactly."""
    from scan_inputs import run_decode_step

    dev, N, width = "cuda", 16, 4
    act = dict(device=dev, dtype=dtype)
    parts = 1 if batch > 8 else 24
    x_dbl = 0.3 * torch.randn(parts, batch, rank + 2 * N, device=dev)
    x_dbl = x_dbl.to(dtype) if batch == 12 else x_dbl  # one sum: in the model dtype, or fp32
    inputs = (
        torch.randn(batch, dim, N, device=dev), torch.randn(batch, dim, width, **act),
        torch.randn(batch, dim, **act), torch.randn(batch, dim, **act),
        (0.5 * torch.randn(dim, width, device=dev)).to(dtype), torch.randn(dim, **act), x_dbl,
        (0.3 * torch.randn(dim, rank, device=dev)).to(dtype),
        -0.5 * torch.rand(dim, N, device=dev), torch.randn(dim, device=dev),
        torch.rand(dim, device=dev),
    )  # fmt: skip
    state, conv_state = inputs[:2]
    out, ref_out, ref_state, ref_conv = run_decode_step(inputs)
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(out.double(), ref_out, rtol=rtol, atol=atol)
    # a 16-bit u may round the other way than float64's (one ulp), and the state moves with it
    rtol, atol = (1e-4, 1e-4) if dtype == torch.float32 else (rtol, atol)
    torch.testing.assert_close(state.double(), ref_state, rtol=rtol, atol=atol)
    assert torch.equal(conv_state, ref_conv), "conv window not shifted exactly"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("batch", [1, 12, 64])  # from 9 rows on, a conv kernel, then tl.dot
@pytest.mark.parametrize("dim, rows", [(1536, 80), (4096, 160)], ids=["130m", "1.4b"])
def test_conv_x_proj_model_sizes(dtype, batch, dim, rows):
    """The conv's step and x_proj (`conv_x_proj`) at the models' sizes: the partial sums' sum
    equals silu(conv) rounded to the activation dtype, times x_proj's weight, in float64."""
    from mamba_compiled.lowering import conv_x_proj

    dev, width = "cuda", 4
    act = dict(device=dev, dtype=dtype)
    conv_state, conv_x = torch.randn(batch, dim, width, **act), torch.randn(batch, dim, **act)
    conv_w, conv_b = 0.5 * torch.randn(dim, width, **act), torch.randn(dim, **act)
    x_proj_w = torch.randn(rows, dim, **act) / dim**0.5
    before = conv_state.clone()
    parts = conv_x_proj(conv_state, conv_x, conv_w, conv_b, x_proj_w)
    f = lambda t: t.double()  # noqa: E731
    window = torch.cat([f(conv_state[:, :, 1:]), f(conv_x)[:, :, None]], dim=-1)
    u = F.silu((window * f(conv_w)).sum(-1) + f(conv_b)).to(dtype)
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(parts.sum(0).double(), f(u) @ f(x_proj_w).t(), rtol=rtol, atol=atol)
    assert torch.equal(conv_state, before)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("batch", [1, 5, 8, 16, 64])  # from 9 rows on, tl.dot tiles
@pytest.mark.parametrize(
    "N,K,norm,residual",
    [(3072, 768, True, False), (768, 1536, False, True), (50280, 768, True, False),
     (2048, 4096, False, True), (160, 4096, False, False)],
    ids=["in_proj", "out_proj", "lm_head", "out_proj_1.4b", "x_proj_1.4b"],
)  # fmt: skip
def test_decode_linear(dtype, batch, N, K, norm, residual):
    """Decoding's linear layer at the models' sizes (the norm before it, the residual add after
    it) against float64 with the model's roundings."""
    from mamba_compiled.lowering import decode_linear
    from mamba_compiled.ops.reference import decode_linear_ref

    dev = "cuda"
    x = torch.randn(batch, K, device=dev)
    x = x if norm else x.to(dtype)
    w = (torch.randn(N, K, device=dev) / K**0.5).to(dtype)
    bias = None if norm else torch.randn(N, device=dev).to(dtype)
    nw = (1 + 0.1 * torch.randn(K, device=dev)).to(dtype) if norm else None
    r = torch.randn(batch, N, device=dev) if residual else None
    out = decode_linear(x, w, bias, nw, 1e-5, r)
    ref = decode_linear_ref(x, w, bias, nw, 1e-5, r)
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(out.double(), ref, rtol=rtol, atol=atol)


@pytest.mark.parametrize(
    "batch,d_model,d_inner,rank", [(1, 768, 1536, 48), (64, 768, 1536, 48), (64, 2048, 4096, 128)]
)
def test_decode_kernels_with_programmatic_dependent_launch(batch, d_model, d_inner, rank):
    """The decode step's kernels launched with PDL (each loads its weights while the previous
    kernel runs, then waits for it) compute what they compute without, over a chain of layers
    where each kernel reads the previous one's output. At batch 64 as the model runs it there:
    the norm's kernel, the conv's kernel, x_proj and dt_proj as decode_linear's tl.dot kernel
    (x_proj split along K and its pieces summed by a second kernel; at the 1.4B sizes out_proj
    too), the state-update kernel."""
    from mamba_compiled.lowering import conv_x_proj, decode_linear, state_update

    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("programmatic dependent launch needs sm_90")
    dev, N, width = "cuda", 16, 4
    h = lambda *s, scale=1.0: (scale * torch.randn(*s, device=dev)).half()  # noqa: E731
    layers = [
        (1 + h(d_model, scale=0.1), h(2 * d_inner, d_model, scale=0.03), h(d_inner, width),
         h(d_inner), h(rank + 2 * N, d_inner, scale=0.03), h(d_inner, rank, scale=0.1),
         -torch.rand(d_inner, N, device=dev), h(d_model, d_inner, scale=0.03))
        for _ in range(3)
    ]  # fmt: skip
    x0 = torch.randn(batch, d_model, device=dev)
    conv0 = h(len(layers), batch, d_inner, width)
    ssm0 = torch.randn(len(layers), batch, d_inner, N, device=dev)
    results = []
    for on in (False, True):
        x, convs, ssms = x0, conv0.clone(), ssm0.clone()
        for i, (nw, in_w, cw, cb, xw, dtw, A, out_w) in enumerate(layers):
            xz = decode_linear(x, in_w, None, nw, 1e-5, None, on)
            u, z = xz[:, :d_inner], xz[:, d_inner:]
            x_dbl = conv_x_proj(convs[i], u, cw, cb, xw, on)
            y = state_update(ssms[i], None, None, A, None, None, None, z, None, True, dtw,
                             convs[i], u, cw, cb, x_dbl, on)  # fmt: skip
            x = decode_linear(y, out_w, None, None, 1e-5, x, on)
        results.append((x, convs, ssms))
    for without, with_pdl in zip(results[0], results[1], strict=True):
        torch.testing.assert_close(with_pdl, without, rtol=1e-3, atol=1e-3)
