"""Benchmark the selective scan and its decode step.

    python perf/bench_scan.py [--out DIR] [--sweep] [--rows 0,1,...] [--skip-refs]
                              [--skip-plot] [--skip-decode] [--quick] [--workers N]
                              [--wait-for FILE]

On CUDA: forward and forward+backward for every shape of shared/ANCHORS.md through the public op
(`mamba_compiled.ops.selective_scan_fn`), each after a correctness check on fresh random inputs
(a few channels against a float64 reference); milliseconds (triton.testing.do_bench medians),
ratio to mamba_ssm's time, fraction of the floor, peak memory of forward+backward; reference
points (the eager oracle and a torch associative_scan formulation, on smaller sizes, scaled);
time against L from 512 to 2^20 (PNG); the decode step in eager and in a CUDA graph.
--sweep first checks every launch configuration of sweep_space() against a float64 reference
(all outputs and gradients; segmented, masked and deterministic cases) in --workers processes
that also compile its kernels in parallel (Triton's cache is shared), then times the verified
ones on the first shape and at batch 1 (1x4096x65536) and keeps the fastest verified forward
and backward settings for the table, which then comes after it. --wait-for FILE: start timing
only once FILE exists (e.g. when tests run beside the checks).

On CPU: forward and forward+backward at batch 2, dim 1536, L 2048, dstate 16, fp32 through the
public op, against the oracle and a torch.compile'd sequential reference (both at shorter L,
scaled linearly, as labelled).

Markdown goes to stdout and, with --out, to DIR/bench_scan.md (plus DIR/scan_vs_L.png).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import itertools
import pathlib
import platform
import resource
import sys
import time
import traceback

import torch
import torch.nn.functional as F

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mamba_compiled.ops import selective_scan_fn, selective_state_update  # noqa: E402
from mamba_compiled.ops.reference import selective_scan_ref  # noqa: E402

# shared/ANCHORS.md, H200, mamba_ssm 2.3.2: (batch, dim, L, dstate, dtype,
#   mamba fwd ms, mamba fwd+bwd ms, mamba peak GB, floor fwd ms, target fwd, target fwd+bwd)
ANCHORS = [
    (8, 4096, 2048, 16, torch.bfloat16, 1.16, 5.68, 1.65, 0.26, 0.55, 3.0),
    (8, 2048, 2048, 16, torch.bfloat16, 0.59, 2.88, 0.85, 0.13, 0.30, 1.5),
    (16, 1536, 4096, 16, torch.bfloat16, 1.72, 8.52, 2.48, 0.39, 0.85, 4.5),
    (1, 4096, 65536, 16, torch.bfloat16, 5.85, 25.7, 6.51, 2.1, 3.0, 13.0),
    (8, 4096, 2048, 16, torch.float32, 2.29, 7.55, 3.27, 0.26, 1.2, 4.0),
]
NAIVE_ROW0_FWD_MS = 126.5  # ANCHORS: the naive PyTorch loop, first row's forward
MAMBA_DECODE_US = 50.0  # ANCHORS: mamba_ssm's Triton decode step, eager, B <= 64, dim 4096


def sweep_space():
    """Launch configurations compared by --sweep: (name, overrides for common.set_override).
    Forward and backward settings are independent (the backward's T is the checkpoint interval,
    and the forward's T must be a multiple of it). The variants measured until the seventeenth
    session, and what they gave, are in perf/NOTES.md (Runs 3-21)."""
    from mamba_compiled.lowering.common import ScanConfig as S

    seg = dict(target=1024, min_seg=128, min_split=3)  # the default's segments
    fwd = dict(bc_f32=True, pipe=3, sp_split=True)  # the default's pipeline, B/C, softplus
    return [
        ("default", {}),
        # the look-back with a long first segment (head / 10 times the others), whose program
        # publishes its state during its full forward; the other programs each scan the segment
        # before theirs (1 x 4096 x 65536: ~7 % less time than the balanced look-back predicted
        # for a local pass 0.9 times as slow per chunk as the full one, ~5 % for 0.66)
        *((f"fwd head segment {h / 10:.1f} times the others",
           dict(fwd=S(16, 16, 2, 1, **seg, **fwd, head=h))) for h in (15, 17, 19, 21)),
        ("default again (run-to-run noise)", {}),
    ]  # fmt: skip


# ------------------------------------------------------------------------------------------
# helpers


def scan_reference(u, delta, A, B, C, D, z, delta_bias, softplus):
    """float64 scan by recursive doubling over L (materializes (b, d, n, L): use few channels).
    B, C per step (batch, dstate, L)."""
    u, delta, A, B, C = (t.double() for t in (u, delta, A, B, C))
    dt = delta + delta_bias.double()[:, None]
    if softplus:
        dt = torch.where(dt <= 20.0, F.softplus(dt), dt)
    a = torch.exp(dt[:, :, None] * A[None, :, :, None])
    x = dt[:, :, None] * B[:, None] * u[:, :, None]
    s, L = 1, u.shape[-1]
    while s < L:
        x = torch.cat([x[..., :s], a[..., s:] * x[..., :-s] + x[..., s:]], -1)
        a = torch.cat([a[..., :s], a[..., s:] * a[..., :-s]], -1)
        s *= 2
    y = (x * C[:, None]).sum(2) + D.double()[:, None] * u
    return y * F.silu(z.double())


def make_inputs(batch, dim, L, dstate, dtype, device, requires_grad=False):
    g = dict(device=device)
    kw = dict(
        u=torch.randn(batch, dim, L, **g).to(dtype),
        # softplus(delta + bias) about 0.02 to 0.08, the range of Mamba's dt
        delta=(0.5 * torch.rand(batch, dim, L, **g) - 4.0).to(dtype),
        A=-torch.arange(1, dstate + 1, **g, dtype=torch.float32).repeat(dim, 1),  # S4D-real
        B=torch.randn(batch, dstate, L, **g).to(dtype),
        C=torch.randn(batch, dstate, L, **g).to(dtype),
        D=torch.randn(dim, **g),
        z=torch.randn(batch, dim, L, **g).to(dtype),
        delta_bias=torch.rand(dim, **g),
    )
    if requires_grad:
        for t in kw.values():
            t.requires_grad_(True)
    return kw


def call(kw):
    return selective_scan_fn(**kw, delta_softplus=True)


def check_channels(kw, out, dout=None, channels=(0, 1, -2, -1)):
    """Max error of out (and du, ddelta if dout) on a few channels of batch 0, relative to the
    largest reference value, against the float64 reference."""
    dim = kw["u"].shape[1]
    ch = [c % dim for c in channels]
    sub = {k: v.detach() for k, v in kw.items()}
    sub = dict(
        u=sub["u"][:1, ch], delta=sub["delta"][:1, ch], A=sub["A"][ch], B=sub["B"][:1],
        C=sub["C"][:1], D=sub["D"][ch], z=sub["z"][:1, ch], delta_bias=sub["delta_bias"][ch],
    )  # fmt: skip
    leaves = {k: v.double().requires_grad_(k in ("u", "delta")) for k, v in sub.items()}
    ref = scan_reference(**leaves, softplus=True)
    rel = lambda got, want: ((got.double() - want).abs().max() / want.abs().max()).item()  # noqa: E731
    errs = {"out": rel(out[:1, ch], ref.detach())}
    if dout is not None:
        (ref * dout[:1, ch].double()).sum().backward()
        errs["du"] = rel(kw["u"].grad[:1, ch], leaves["u"].grad)
        errs["ddelta"] = rel(kw["delta"].grad[:1, ch], leaves["delta"].grad)
    return errs


def bench_ms(fn, grad_to_none=None):
    import triton

    return triton.testing.do_bench(fn, warmup=25, rep=100, grad_to_none=grad_to_none,
                                   return_mode="median")  # fmt: skip


def graph_ms(fn, grad_to_none=None, rep: int = 100) -> float | None:
    """GPU time of fn without its host time: calls replayed from one CUDA graph, each after the
    same L2 flush as do_bench's, minus the flush alone. do_bench (ANCHORS' method) times the
    host's launches too once they take longer than the GPU's work, as the op's eager launches
    do at the smaller rows (perf/NOTES.md, Run 15). None if fn cannot be captured."""
    import triton

    flush = torch.empty(256 * 2**20, dtype=torch.int8, device="cuda")
    try:
        both = triton.testing.do_bench_cudagraph(
            lambda: (flush.zero_(), fn()), rep=rep, grad_to_none=grad_to_none,
            return_mode="median")  # fmt: skip
        alone = triton.testing.do_bench_cudagraph(flush.zero_, rep=rep, return_mode="median")
    except Exception as exc:  # reported as n/a in the table
        print(f"graph_ms: {type(exc).__name__}: {exc}", file=sys.stderr)
        return None
    return both - alone


class Report:
    """Markdown lines to stdout and, line by line, to a file (kept if the run is cut short)."""

    def __init__(self, path: pathlib.Path | None):
        self.path = path
        self.failed: list[str] = []
        if path is not None:
            path.write_text("")

    def __call__(self, line: str = ""):
        print(line, flush=True)
        if self.path is not None:
            with self.path.open("a") as f:
                f.write(line + "\n")

    @contextlib.contextmanager
    def section(self, name):
        try:
            yield
        except Exception as exc:  # report and go on to the next section; exit status says so
            self(f"\n**FAILED: {name}: {type(exc).__name__}: {exc}**")
            traceback.print_exc()
            self.failed.append(name)


# ------------------------------------------------------------------------------------------
# CUDA


# (batch, dim, L, dstate, dtype, B/C layout, deterministic): a masked tail, segments at batch
# 1 (4099 steps, 64 channels), groups, shared B/C, the deterministic dB/dC path
VERIFY_CASES = [
    (2, 256, 1000, 16, torch.bfloat16, "var", False),
    (1, 64, 4099, 16, torch.float32, "var", False),
    (2, 128, 777, 16, torch.bfloat16, "g2", True),
    (1, 96, 2500, 16, torch.float32, "shared", False),
]
VERIFY_TOL = {torch.float32: 1e-3, torch.bfloat16: 5e-2}  # max error / max |ref|


def _reference_full(kw, dout, dlast):
    """Forward and every gradient in float64 by a doubling scan over L (GPU), joint loss on out
    and last_state, like tests/test_lowering_cuda.py."""
    ref = {k: None if v is None else v.detach().double().requires_grad_() for k, v in kw.items()}
    u, delta, A, B, C = (ref[k] for k in ("u", "delta", "A", "B", "C"))
    dim, L = u.shape[1], u.shape[2]
    dt = F.softplus(delta + ref["delta_bias"][:, None])

    def per_step(M):
        return M[None, :, :, None] if M.dim() == 2 else M.repeat_interleave(dim // M.shape[1], 1)

    a = torch.exp(dt[:, :, None] * A[None, :, :, None])
    x = dt[:, :, None] * per_step(B) * u[:, :, None]
    x = torch.cat([x[..., :1] + a[..., :1] * ref["initial_state"][..., None], x[..., 1:]], -1)
    s = 1
    while s < L:
        x = torch.cat([x[..., :s], a[..., s:] * x[..., :-s] + x[..., s:]], -1)
        a = torch.cat([a[..., :s], a[..., s:] * a[..., :-s]], -1)
        s *= 2
    y = (x * per_step(C)).sum(2) + ref["D"][:, None] * u
    out = y * F.silu(ref["z"])
    ((out * dout.double()).sum() + (x[..., -1] * dlast.double()).sum()).backward()
    return out.detach(), x[..., -1].detach(), {k: v.grad for k, v in ref.items()}


def verify_config(overrides, cases=VERIFY_CASES, device="cuda", warm=True) -> dict:
    """Max relative errors of the launchers under `overrides` on `cases` against float64; raises
    AssertionError past VERIFY_TOL. warm: also run the shapes timed later (compiles them)."""
    from mamba_compiled.lowering import common, scan_bwd, scan_fwd

    order = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")
    worst: dict[str, float] = {}
    common.set_override(**overrides)
    try:
        for batch, dim, L, N, dtype, layout, deterministic in cases:
            g = dict(device=device)
            bc_shape = {"var": (batch, 1, N, L), "g2": (batch, 2, N, L), "shared": (dim, N)}[layout]
            # fp32 cases: small Δ·A, a memory of thousands of steps across the segments
            slow = dtype == torch.float32
            kw = dict(
                u=torch.randn(batch, dim, L, **g).to(dtype),
                delta=(0.5 * torch.rand(batch, dim, L, **g) - (5.0 if slow else 1.0)).to(dtype),
                A=-torch.rand(dim, N, **g) * (0.1 if slow else 1.0) - 0.01,
                B=torch.randn(bc_shape, **g).to(dtype if layout != "shared" else torch.float32),
                C=torch.randn(bc_shape, **g).to(dtype if layout != "shared" else torch.float32),
                D=torch.randn(dim, **g), z=torch.randn(batch, dim, L, **g).to(dtype),
                delta_bias=0.5 * torch.rand(dim, **g),
                initial_state=torch.randn(batch, dim, N, **g),
            )  # fmt: skip
            args = [kw[k] for k in order]
            out, last, ck = scan_fwd(*args, True)
            dout, dlast = torch.randn_like(out), torch.randn_like(last)
            grads = scan_bwd(dout, dlast, *args, ck, True, deterministic)
            ref_out, ref_last, ref_grads = _reference_full(kw, dout, dlast)
            got = dict(out=out, last=last)
            got.update({f"d{k}": v for k, v in zip(order, grads, strict=True)})
            want = dict(out=ref_out, last=ref_last)
            want.update({f"d{k}": ref_grads[k] for k in order})
            for name, w in want.items():
                err = ((got[name].double() - w).abs().max() / (w.abs().max() + 1e-12)).item()
                assert err == err and err < VERIFY_TOL[dtype], (
                    f"{name} at {batch}x{dim}x{L} {str(dtype)[6:]} {layout}: error {err:.2e}"
                )
                worst[name] = max(worst.get(name, 0.0), err)
        # the shapes timed later, so that their kernels compile here
        for batch, dim, L in ((8, 4096, 2048), (1, 4096, 16384), (8, 1536, 2048)) if warm else ():
            kw = make_inputs(batch, dim, L, 16, torch.bfloat16, "cuda", requires_grad=True)
            call(kw).backward(torch.randn(batch, dim, L, device="cuda", dtype=torch.bfloat16))
            torch.cuda.synchronize()
    finally:
        common.set_override()
    return worst


def _verify_worker(name: str) -> tuple[str, dict | str]:
    """In a fresh process (spawned): verify one sweep configuration by name."""
    overrides = dict(sweep_space())[name]
    try:
        return name, verify_config(overrides)
    except Exception as exc:  # reported in the sweep table; the configuration is not timed
        return name, f"{type(exc).__name__}: {str(exc)[:160]}"


def _time_fwd_fb(kw: dict, dout: torch.Tensor) -> tuple[float, float]:
    """(forward ms without autograd, forward + backward ms) of the public op on kw."""
    for t in kw.values():
        t.grad = None
    with torch.no_grad():
        fwd = bench_ms(lambda: call(kw))
    return fwd, bench_ms(lambda: call(kw).backward(dout), grad_to_none=list(kw.values()))


def cuda_sweep(
    rep: Report,
    workers: int,
    wait_for: pathlib.Path | None,
    timeout_s: float = 200,
    only: tuple[str, ...] = (),
):
    """Verify every configuration of sweep_space() (those whose names contain one of `only`, and
    the default, when given) in parallel processes (which also compiles
    them into Triton's shared cache), then time the verified ones here; keep the fastest
    verified forward and backward settings for the rest of the run."""
    import concurrent.futures
    import multiprocessing

    from mamba_compiled.lowering import common

    space = [
        (n, ov)
        for n, ov in sweep_space()
        if n == "default" or not only or any(o in n for o in only)
    ]
    t0 = time.perf_counter()
    ctx = multiprocessing.get_context("spawn")
    pool = concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx)
    futures = [pool.submit(_verify_worker, name) for name, _ in space]
    verified = {name: f"TIMEOUT after {timeout_s} s (a kernel never ended?)" for name, _ in space}
    try:
        for fut in concurrent.futures.as_completed(futures, timeout=timeout_s):
            name, result = fut.result()
            verified[name] = result
            print(f"checked {name}: {result}", flush=True)
    except concurrent.futures.TimeoutError:
        for proc in list(pool._processes.values()):  # a hung kernel dies with its process
            proc.kill()
    pool.shutdown(wait=False, cancel_futures=True)
    rep(f"\n### Config sweep: checked against float64 in {time.perf_counter() - t0:.0f} s "
        f"({workers} processes; cases {[c[:4] for c in VERIFY_CASES]})\n")  # fmt: skip
    if wait_for is not None:
        while not wait_for.exists():
            time.sleep(1.0)
    # Every bf16 ANCHORS row (scored against its targets), then the 130M model's training
    # shape (8 x 2048 tokens, d_inner 1536; timed, not scored). The eleventh session chose by
    # rows 1 and 4 alone and took a forward that was 1.5 times slower on rows 2 and 3.
    shapes = [(a[:3], a[9:11]) for a in ANCHORS if a[4] == torch.bfloat16]
    shapes.append(((8, 1536, 2048), None))
    inputs = []
    for (b, d, L), _ in shapes:
        kw = make_inputs(b, d, L, 16, torch.bfloat16, "cuda", requires_grad=True)
        inputs.append((kw, torch.randn(b, d, L, device="cuda", dtype=torch.bfloat16)))
    names = [f"{b}x{d}x{L}" for (b, d, L), _ in shapes]
    rep("| config | " + " | ".join(f"{n} fwd | fwd+bwd" for n in names)
        + " | worst error (out, du, dB, dA) |")  # fmt: skip
    rep("|---|" + "---|---|" * len(shapes) + "---|")
    results = []
    for name, ov in space:
        errs = verified[name]
        if isinstance(errs, str):
            rep(f"| {name} | FAILED CHECK: {errs} |")
            continue
        common.set_override(**ov)
        try:
            times = [_time_fwd_fb(kw, dout) for kw, dout in inputs]
        except Exception as exc:
            rep(f"| {name} | FAILED: {type(exc).__name__}: {str(exc)[:80]} |")
            traceback.print_exc()
            continue
        finally:
            common.set_override()
        # scores: the sums over the scored shapes of time / target, forward and fwd+bwd
        scored = [(t, tg) for t, (_, tg) in zip(times, shapes, strict=True) if tg is not None]
        results.append((name, ov, sum(f / tf for (f, _), (tf, _) in scored),
                        sum(fb / tfb for (_, fb), (_, tfb) in scored)))  # fmt: skip
        rep(
            f"| {name} | "
            + " | ".join(f"{f:.3f} | {fb:.3f}" for f, fb in times)
            + f" | {errs['out']:.1e}, {errs['du']:.1e}, {errs['dB']:.1e}, {errs['dA']:.1e} |"
        )
    inputs.clear()
    torch.cuda.empty_cache()
    # forward settings by the forward score, backward by the fwd+bwd score with the default
    # forward (ck variants carry both and compete on fwd+bwd)
    fwd_only = [r for r in results if set(r[1]) <= {"fwd"}]
    bwd_only = [r for r in results if set(r[1]) <= {"bwd"}]
    best_fwd = min(fwd_only, key=lambda r: r[2])
    best_bwd = min(bwd_only, key=lambda r: r[3])
    chosen = {**best_fwd[1], **best_bwd[1]}
    for r in results:
        if "ck" in r[1] and r[3] < best_bwd[3]:
            chosen = dict(r[1])
    rep(f"\nKept for the table: fwd from '{best_fwd[0]}', bwd from '{best_bwd[0]}': "
        f"{chosen or 'defaults'}")  # fmt: skip
    common.set_override(**chosen)


def cuda_table(rep: Report, rows):
    rep("\n### Selective scan (public op, u/delta/z/B/C in the row's dtype, z, delta_softplus, "
        "delta_bias, D, per-step B/C)\n\nfwd: under torch.no_grad, as inference runs it (no "
        "checkpoints written for a backward); fwd+bwd: the training forward (with checkpoints) "
        "and the backward.\n")  # fmt: skip
    rep(
        "| shape, dtype | fwd ms | vs mamba_ssm | of floor | fwd+bwd ms | vs mamba_ssm | "
        "peak GB fwd+bwd (mamba_ssm) | target fwd / fwd+bwd | max err out, du, ddelta | "
        "GPU ms fwd / fwd+bwd (CUDA graph) |"
    )
    rep("|---|---|---|---|---|---|---|---|---|---|")
    for i in rows:
        torch.cuda.empty_cache()
        _table_row(rep, *ANCHORS[i])


def _table_row(rep, batch, dim, L, N, dtype, m_f, m_fb, m_mem, floor, t_f, t_fb):
    name = f"{batch}×{dim}×{L}×{N} {str(dtype)[6:]}"
    kw = make_inputs(batch, dim, L, N, dtype, "cuda", requires_grad=True)
    dout = torch.randn(batch, dim, L, device="cuda", dtype=dtype)
    with torch.no_grad():
        out = call(kw)
    call(kw).backward(dout)
    errs = check_channels(kw, out, dout)
    del out
    for t in kw.values():
        t.grad = None
    with torch.no_grad():
        fwd = bench_ms(lambda: call(kw))
    fb = bench_ms(lambda: call(kw).backward(dout), grad_to_none=list(kw.values()))
    with torch.no_grad():
        fwd_g = graph_ms(lambda: call(kw))
    fb_g = graph_ms(lambda: call(kw).backward(dout), grad_to_none=list(kw.values()))
    gpu = " / ".join("n/a" if t is None else f"{t:.3f}" for t in (fwd_g, fb_g))
    for t in kw.values():
        t.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    call(kw).backward(dout)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() / 1e9
    ok = lambda t, target: "✓" if t <= target else "✗"  # noqa: E731
    rep(
        f"| {name} | {fwd:.3f} | {m_f / fwd:.2f}x faster | {floor / fwd:.0%} | {fb:.3f} | "
        f"{m_fb / fb:.2f}x faster | {peak:.2f} ({m_mem}) | {t_f} {ok(fwd, t_f)} / {t_fb} "
        f"{ok(fb, t_fb)} | {errs['out']:.1e}, {errs['du']:.1e}, {errs['ddelta']:.1e} | {gpu} |"
    )


def cuda_refs(rep: Report):
    """The eager oracle and torch's associative_scan on the first row's shape, smaller, scaled."""
    batch, dim, L, N, dtype = ANCHORS[0][:5]
    rep("\n### Reference points, first row's shape (forward)\n")
    rep("| implementation | measured at | ms measured | ms scaled to 8×4096×2048×16 |")
    rep("|---|---|---|---|")
    Ls = 128
    kw = make_inputs(batch, dim, Ls, N, dtype, "cuda")
    with torch.no_grad():
        ms = bench_ms(lambda: selective_scan_ref(**kw, delta_softplus=True))
    rep(f"| eager oracle (Python loop over L, fp32) | L={Ls} | {ms:.2f} | {ms * L / Ls:.1f} "
        f"(ANCHORS: naive loop {NAIVE_ROW0_FWD_MS}) |")  # fmt: skip

    from torch._higher_order_ops.associative_scan import associative_scan

    def combine(x, y):
        return (x[0] * y[0], y[0] * x[1] + y[1])

    def assoc_scan(u, delta, A, B, C, D, z, delta_bias):
        dt = F.softplus(delta.float() + delta_bias[:, None])
        dA = torch.exp(dt[..., None] * A[:, None, :])  # (b, d, L, n)
        dBu = dt[..., None] * B.float().transpose(1, 2)[:, None] * u.float()[..., None]
        _, h = associative_scan(combine, (dA, dBu), dim=2, combine_mode="pointwise")
        y = (h * C.float().transpose(1, 2)[:, None]).sum(-1) + D[:, None] * u.float()
        return (y * F.silu(z.float())).to(u.dtype)

    b1 = 1
    kw = make_inputs(b1, dim, L, N, dtype, "cuda")
    compiled = torch.compile(assoc_scan, fullgraph=True)
    with torch.no_grad():
        t0 = time.perf_counter()
        compiled(**kw)
        torch.cuda.synchronize()
        compile_s = time.perf_counter() - t0
        ms = bench_ms(lambda: compiled(**kw))
    rep(
        f"| torch associative_scan, torch.compile (materializes (B, D, L, N); compile "
        f"{compile_s:.0f} s) | batch {b1} | {ms:.2f} | {ms * batch / b1:.1f} |"
    )


def cuda_plot(rep: Report, out_dir):
    """Time against L at batch 1, dim 2048, dstate 16, bf16, through the launchers."""
    dim, N, dtype = 2048, 16, torch.bfloat16
    Ls = [512, 2048, 8192, 32768, 131072, 524288, 1048576]
    rep(f"\n### Time against L (launchers, batch 1, dim {dim}, dstate {N}, bf16)\n")
    rep("| L | fwd ms | fwd+bwd ms | fwd ns per token·channel |")
    rep("|---|---|---|---|")
    fwds, fbs = [], []
    for L in Ls:
        torch.cuda.empty_cache()
        fwd, both = _time_launchers(1, dim, L, N, dtype)
        fwds.append(fwd)
        fbs.append(both)
        rep(f"| {L} | {fwd:.3f} | {both:.3f} | {fwd * 1e6 / (L * dim):.3f} |")
    if out_dir is not None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        ax.loglog(Ls, fwds, "o-", label="forward")
        ax.loglog(Ls, fbs, "s-", label="forward + backward")
        ax.loglog(Ls, [fwds[-1] * L / Ls[-1] for L in Ls], "k:", label="linear in L")
        ax.set_xlabel("sequence length L")
        ax.set_ylabel("ms (median)")
        ax.set_title(f"selective scan, batch 1, dim {dim}, dstate {N}, bf16, "
                     f"{torch.cuda.get_device_name()}", fontsize=8)  # fmt: skip
        ax.legend()
        ax.grid(True, which="both", alpha=0.3)
        fig.tight_layout()
        fig.savefig(out_dir / "scan_vs_L.png", dpi=120)
        rep("\n![time vs L](scan_vs_L.png)")


def _time_launchers(batch, dim, L, N, dtype):
    from mamba_compiled.lowering import scan_bwd, scan_fwd

    kw = make_inputs(batch, dim, L, N, dtype, "cuda")
    kw["B"], kw["C"] = kw["B"][:, None], kw["C"][:, None]
    args = [kw[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")] + [None]
    dout = torch.randn(batch, dim, L, device="cuda", dtype=dtype)

    def fb():
        _, _, ck = scan_fwd(*args, True)
        scan_bwd(dout, None, *args, ck, True, False)

    return bench_ms(lambda: scan_fwd(*args, True)), bench_ms(fb)


def cuda_host_overhead(rep: Report):
    """Host time per call at a tiny size (the GPU idles): launcher vs public op, and where the
    launcher's time goes (cProfile, to stdout only)."""
    import cProfile
    import pstats

    from mamba_compiled.lowering import scan_fwd, state_update

    kw = make_inputs(1, 64, 16, 16, torch.bfloat16, "cuda")
    B4, C4 = kw["B"][:, None], kw["C"][:, None]
    args = (kw["u"], kw["delta"], kw["A"], B4, C4, kw["D"], kw["z"], kw["delta_bias"], None, True)
    st = torch.randn(1, 64, 16, device="cuda")
    x1, B1 = kw["u"][..., 0], kw["B"][..., 0]
    sargs = (x1, x1, kw["A"], B1[:, None], B1[:, None], kw["D"], x1, kw["delta_bias"], True)

    def per_call_us(fn, n=200):
        fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
        return (time.perf_counter() - t0) / n * 1e6

    rep("\n### Host time per call (tiny sizes, µs)\n")
    rep("| call | µs |")
    rep("|---|---|")
    with torch.no_grad():
        rep(f"| scan_fwd launcher | {per_call_us(lambda: scan_fwd(*args)):.1f} |")
        rep(f"| selective_scan_fn (op) forward | {per_call_us(lambda: call(kw)):.1f} |")
        rep(f"| state_update launcher | {per_call_us(lambda: state_update(st, *sargs)):.1f} |")
        rep(f"| selective_state_update (op) | "
            f"{per_call_us(lambda: selective_state_update(st, x1, x1, kw['A'], B1, B1, kw['D'], x1, kw['delta_bias'], True)):.1f} |")  # noqa: E501  # fmt: skip
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(200):
            scan_fwd(*args)
        prof.disable()
    pstats.Stats(prof, stream=sys.stdout).sort_stats("cumulative").print_stats(14)


DECODE_TABLES = ("step", "linear", "chain", "configs")


def cuda_decode(rep: Report, tables=DECODE_TABLES):
    """The decode tables named in `tables` (`--decode-tables`), then the host overhead."""
    if "linear" in tables:
        _decode_linear(rep)
    if "chain" in tables:
        _decode_chain(rep)
    if "configs" in tables:
        _decode_configs(rep)
        _decode_rows(rep)
    if "step" in tables:
        _decode_step_table(rep)


def _decode_step_table(rep: Report):
    dim, N, dtype = 4096, 16, torch.float16
    rep(f"\n### Decode step (selective_state_update, dim {dim}, dstate {N}, fp16)\n")
    rep(
        f"| batch | eager µs per call (mamba_ssm ≈ {MAMBA_DECODE_US:.0f}) "
        "| CUDA graph µs per call |"
    )
    rep("|---|---|---|")
    for batch in (1, 64):
        eager_us, graph_us = _time_decode(batch, dim, N, dtype)
        rep(f"| {batch} | {eager_us:.1f} | {graph_us:.2f} |")


def _graph_us(step, n=100) -> float:
    """µs per call of `step` (run once first) replayed from a CUDA graph of n calls."""
    step()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(n):
            step()
    graph.replay()
    torch.cuda.synchronize()
    return bench_ms(graph.replay) * 1e3 / n


L2_FLUSH_BYTES = 256 << 20  # weights cycled through per timing: several times the H200's L2
# (name, out_features, in_features, norm, residual): the decode step's linear layers
LINEARS = [
    ("130M in_proj + norm", 3072, 768, True, False),
    ("130M in_proj", 3072, 768, False, False),
    ("130M out_proj + residual", 768, 1536, False, True),
    ("130M x_proj", 80, 1536, False, False),
    ("130M LM head + norm", 50280, 768, True, False),
    ("130M LM head", 50280, 768, False, False),
    ("1.4B in_proj + norm", 8192, 2048, True, False),
    ("1.4B in_proj", 8192, 2048, False, False),
    ("1.4B out_proj + residual", 2048, 4096, False, True),
    ("1.4B x_proj", 160, 4096, False, False),
    ("1.4B dt_proj", 4096, 128, False, False),
    ("1.4B LM head + norm", 50280, 2048, True, False),
]
DOT_SWEEP_BATCH = 64


def _dot_configs():
    from mamba_compiled.lowering.linear import DotConfig

    configs = [DotConfig(64, bn, 64, split) for bn in (16, 32, 64, 128) for split in (1, 2, 4, 8)]
    configs += [DotConfig(64, bn, 128) for bn in (16, 32, 64)] + [DotConfig(64, 32, 64, 1, 8, 3)]
    # pipelines and warps for out_proj at 1.4B (the sweep's best, 64x64/8, 1.7 TB/s)
    configs += [DotConfig(64, 64, 64, 8, 8, 4), DotConfig(64, 64, 128, 4, 4, 3),
                DotConfig(64, 64, 128, 4, 8, 3), DotConfig(64, 128, 64, 4, 8, 4)]  # fmt: skip
    # eighth session's questions: longer K steps for out_proj (16x64 -> 16x128 took 16.1 ->
    # 10.9 µs at 1.4B), more K pieces for x_proj (8 pieces, the most swept, was the best)
    return configs + [DotConfig(64, 16, 256, 1, 4, 3), DotConfig(64, 32, 256, 1, 4, 2),
                      DotConfig(64, 16, 256, 1, 8, 3), DotConfig(64, 16, 64, 16),
                      DotConfig(64, 16, 64, 32), DotConfig(64, 32, 64, 16)]  # fmt: skip


def _cycled(fn, argsets):
    """A function of no arguments calling fn on the next of argsets (cyclically) each time."""
    it = itertools.cycle(argsets)
    return lambda: fn(*next(it))


def _decode_linear(rep: Report, dtype=torch.float16, device="cuda"):
    """`decode_linear` (one kernel: RMSNorm, the product, the residual add; a GEMV per row up to
    batch 8, `tl.dot` tiles from 9 rows on) against cuBLAS's product alone and against what the
    compiled model runs without it (the norm, the product, the residual add under
    `torch.compile`: an Inductor reduction up to batch 8, cuBLAS above), batch 1, 8 and 64, in
    CUDA graphs; then its launch configurations at batch 1 and at batch 64. Checked against
    float64 first (`decode_linear_ref`). GB/s: the weight's bytes over the time, each call on
    another copy of the weight (from HBM)."""
    from triton.runtime.errors import OutOfResources

    from mamba_compiled.lowering.linear import (
        decode_dot_config,
        decode_linear,
        decode_linear_config,
    )
    from mamba_compiled.ops.linear import rms_norm
    from mamba_compiled.ops.reference import decode_linear_ref

    def model_math(x, w, nw, r):
        h = x if nw is None else rms_norm(x.to(nw.dtype), nw, 1e-5)
        out = (h[:, None, :] * w).sum(-1) if h.shape[0] <= 8 else F.linear(h, w)
        return out if r is None else r + out

    configs = [(tile, warps) for tile in (8192, 16384, 32768) for warps in (4, 8)]
    dots = _dot_configs()
    table = ["| layer | batch | decode_linear | cuBLAS product alone | compiled model math |",
             "|---|---|---|---|---|"]  # fmt: skip
    sweep = ["| layer | " + " | ".join(f"{t // 1024}K, {w} warps" for t, w in configs) + " |",
             "|---|" + "---|" * len(configs)]  # fmt: skip
    dot_sweep = ["| layer | default | " + " | ".join(
        f"{c.BN}x{c.BK}/{c.SPLIT}" + ("" if (c.num_warps, c.num_stages) == (4, 4)
                                      else f" {c.num_warps}w{c.num_stages}s")
        for c in dots) + " |", "|---|---|" + "---|" * len(dots)]  # fmt: skip
    g = dict(device=device)
    for name, N, K, norm, residual in LINEARS:
        for batch in (1, 8, DOT_SWEEP_BATCH):
            x = torch.randn(batch, K, **g)
            x = x if norm else x.to(dtype)
            w = (torch.randn(N, K, **g) / K**0.5).to(dtype)
            nw = (1 + 0.1 * torch.randn(K, **g)).to(dtype) if norm else None
            r = torch.randn(batch, N, **g) if residual else None
            want = decode_linear_ref(x, w, None, nw, 1e-5, r)
            torch._dynamo.reset()  # a graph per shape, past the recompile limit
            compiled = torch.compile(model_math, dynamic=False)
            if batch == 1:
                cfgs = [decode_linear_config(batch, N, K, t, nw_) for t, nw_ in configs]
            else:
                cfgs = dots if batch == DOT_SWEEP_BATCH and "LM head" not in name else []
            for cfg in [None, *cfgs]:
                try:
                    got = decode_linear(x, w, None, nw, 1e-5, r, cfg)
                except OutOfResources:
                    continue
                err = ((got.double() - want).abs().max() / want.abs().max()).item()
                if not err < 1e-2:
                    raise AssertionError(
                        f"decode_linear {name} batch {batch} {cfg}: error {err:.2e}"
                    )
            # copies of the weight, cycled through, so that each call reads it from HBM as the
            # model does (one weight in the 50 MB L2, replayed, measured L2: up to 4.8 TB/s)
            ws = [w] + [w.clone() for _ in range(max(1, -(-L2_FLUSH_BYTES // w.nbytes) - 1))]
            times = [
                _graph_us(_cycled(decode_linear, [(x, w_, None, nw, 1e-5, r) for w_ in ws])),
                _graph_us(_cycled(F.linear, [(x.to(dtype), w_) for w_ in ws])),
                _graph_us(_cycled(compiled, [(x, w_, nw, r) for w_ in ws])),
            ]
            gbs = [w.numel() * w.element_size() / (t * 1e3) for t in times]
            cells = " | ".join(f"{t:.2f} ({b:.0f})" for t, b in zip(times, gbs, strict=True))
            table.append(f"| {name} | {batch} | {cells} |")
            us = []
            for c in cfgs:
                try:
                    us.append(
                        _graph_us(
                            _cycled(decode_linear, [(x, w_, None, nw, 1e-5, r, c) for w_ in ws])
                        )
                    )
                except OutOfResources:  # shared memory of the larger tiles
                    us.append(float("nan"))
            if batch == 1:
                sweep.append(f"| {name} | " + " | ".join(f"{t:.2f}" for t in us) + " |")
            elif cfgs:
                d = decode_dot_config(batch, N, K)
                dot_sweep.append(
                    f"| {name} | {d.BN}x{d.BK}/{d.SPLIT} {times[0]:.2f} | "
                    + " | ".join(f"{t:.2f}" for t in us)
                    + " |"
                )
    rep(f"\n### Decoding's linear layers ({dtype}), CUDA graph µs per call (GB/s of the weight)\n")
    rep("\n".join(table))
    rep("\n### decode_linear's configurations at batch 1 (weight elements per program, warps)\n")
    rep("\n".join(sweep))
    rep(
        f"\n### decode_linear's tl.dot configurations at batch {DOT_SWEEP_BATCH} "
        "(BN x BK / split-K; 4 warps, 4 stages unless said), CUDA graph µs\n"
    )
    rep("\n".join(dot_sweep))


# (name, layers, d_model, d_inner, dt_rank): the models whose decode step `_decode_chain` runs
CHAINS = [("130M", 24, 768, 1536, 48), ("1.4B", 48, 2048, 4096, 128)]


def _chain_layers(n_layer, d_model, d_inner, rank, N, width, dtype, device):
    """Random parameters of n_layer Mamba blocks, each its own (so that each is read from HBM)."""

    def param(*shape, scale=1.0):
        return (scale * torch.randn(*shape, device=device)).to(dtype)

    return [
        dict(
            nw=1 + param(d_model, scale=0.1),
            in_w=param(2 * d_inner, d_model, scale=0.03),
            cw=param(d_inner, width, scale=0.5),
            cb=param(d_inner, scale=0.1),
            xw=param(rank + 2 * N, d_inner, scale=0.03),
            dtw=param(d_inner, rank, scale=0.1),
            A=-torch.rand(d_inner, N, device=device),
            D=torch.randn(d_inner, device=device),
            bias=torch.rand(d_inner, device=device),
            out_w=param(d_model, d_inner, scale=0.03),
        )
        for _ in range(n_layer)
    ]


def _chain_step(layers, x, convs, ssms, pdl=False):
    """One decode step through `layers` with the package's kernels: x (1, d_model) float32;
    `pdl`: the kernels launched with programmatic dependent launch."""
    from mamba_compiled.lowering import conv_x_proj, decode_linear, state_update

    for p, conv, ssm in zip(layers, convs, ssms, strict=True):
        d_inner = p["cw"].shape[0]
        xz = decode_linear(x, p["in_w"], None, p["nw"], 1e-5, None, pdl)
        u_in, z = xz[:, :d_inner], xz[:, d_inner:]
        x_dbl = conv_x_proj(conv, u_in, p["cw"], p["cb"], p["xw"], pdl)
        y = state_update(
            ssm, None, None, p["A"], None, None, p["D"], z, p["bias"], True, p["dtw"], conv,
            u_in, p["cw"], p["cb"], x_dbl, pdl,
        )  # fmt: skip
        x = decode_linear(y, p["out_w"], None, None, 1e-5, x, pdl)
    return x


def _decode_chain(rep: Report, dtype=torch.float16, N=16, width=4, device="cuda"):
    """The model's decode step at batch 1 as the package's kernels alone, layer after layer
    (`decode_linear` with the norm for in_proj, `conv_x_proj`, the state update, `decode_linear`
    with the residual for out_proj), replayed from a CUDA graph: with and without programmatic
    dependent launch (`pdl_launch` of the launchers: each kernel loads its weights while the
    previous one finishes). Both must give the same hidden state before timing.
    No LM head, no embedding."""
    rep("\n### The decode step's kernels alone, batch 1 (CUDA graph µs per step)\n")
    rep("| model | without PDL | with PDL | µs per kernel saved |")
    rep("|---|---|---|---|")
    for name, n_layer, d_model, d_inner, rank in CHAINS:
        layers = _chain_layers(n_layer, d_model, d_inner, rank, N, width, dtype, device)
        x0 = torch.randn(1, d_model, device=device)
        conv0 = [torch.randn(1, d_inner, width, device=device).to(dtype) for _ in layers]
        ssm0 = [torch.randn(1, d_inner, N, device=device) for _ in layers]
        results, times = [], []
        for on in (False, True):
            convs, ssms = [c.clone() for c in conv0], [h.clone() for h in ssm0]
            results.append(_chain_step(layers, x0, convs, ssms, on))
            step = functools.partial(_chain_step, layers, x0, convs, ssms, on)
            times.append(_graph_us(step, n=1))
        # a race (a read before the previous kernel's write) gives garbage, not rounding
        torch.testing.assert_close(results[1], results[0], rtol=1e-3, atol=1e-3)
        saved = (times[0] - times[1]) / (4 * n_layer)
        rep(f"| {name} ({n_layer} layers) | {times[0]:.1f} | {times[1]:.1f} | {saved:.2f} |")


DECODE_CONFIGS = [(bd, w) for bd in (8, 16, 32, 64) for w in (1, 2, 4, 8) if bd * 16 >= 32 * w]


def _model_decode_step(state, conv, A, D, z, bias, dtw, cx, cw, x_dbl):
    """`ssm_decode_step`'s kernel (the state update in the model's form), from the launcher."""
    from mamba_compiled.lowering import state_update

    return state_update(
        state, None, None, A, None, None, D, z, bias, True, dtw, conv, cx, cw, None, x_dbl
    )


def _decode_sweep(run, state, conv, configs) -> list[float]:
    """CUDA graph µs per call of run(state, conv) for each (BD, num_warps) in configs (None: the
    default), each checked against the default first; timed on copies of the states (every
    call advances them)."""
    from mamba_compiled.lowering import common

    want = run(state.clone(), conv.clone())
    times = []
    for cfg in configs:
        common.set_override(decode=cfg)
        try:
            got = run(state.clone(), conv.clone())
            torch.testing.assert_close(got, want, rtol=2e-3, atol=2e-3)
            times.append(_graph_us(functools.partial(run, state.clone(), conv.clone())))
        finally:
            common.set_override()
    return times


def _decode_configs(rep: Report, N=16, width=4, dtype=torch.float16, device="cuda"):
    """The state-update kernel at the 130M and 1.4B sizes for every (channels per program,
    warps) in DECODE_CONFIGS (`common.set_override(decode=...)`), each checked against the
    default configuration first; CUDA graph µs per call. Rows "fused", batch 1:
    `ssm_decode_step`'s kernel as the model runs it (the conv, dt_proj and the state update,
    x_proj's output as `conv_x_proj`'s partial sums). Rows "dt given", batch 64:
    `selective_state_update` (the seventh session's 1.4B path above batch 8; `_decode_rows`
    times the model's step there now)."""
    from mamba_compiled.lowering.decode_step import conv_x_proj_slices
    from mamba_compiled.models.mamba import GEMV_MAX_BATCH

    rep("\n### The decode step's state-update kernel by (channels, warps), CUDA graph µs\n")
    rep(
        "| dim, dt_rank | kernel | batch | "
        + " | ".join(f"{bd}, {w}" for bd, w in DECODE_CONFIGS)
        + " |"
    )
    rep("|---|---|---|" + "---|" * len(DECODE_CONFIGS))
    g = dict(device=device)
    for dim, rank in ((1536, 48), (4096, 128)):
        for kernel, batch in (("fused", 1), ("dt given", 64)):
            state = torch.randn(batch, dim, N, **g)
            conv = torch.randn(batch, dim, width, **g).to(dtype)
            cx, z = (torch.randn(batch, dim, **g).to(dtype) for _ in range(2))
            cw = (0.5 * torch.randn(dim, width, **g)).to(dtype)
            n_part = conv_x_proj_slices(dim)[1] if batch <= GEMV_MAX_BATCH else 1
            x_dbl = 0.1 * torch.randn(n_part, batch, rank + 2 * N, **g)
            dtw = (0.1 * torch.randn(dim, rank, **g)).to(dtype)
            A, D, bias = -torch.rand(dim, N, **g), torch.randn(dim, **g), torch.rand(dim, **g)
            dt = torch.rand(batch, dim, **g).to(dtype)
            B, C = (torch.randn(batch, N, **g).to(dtype) for _ in range(2))

            if kernel == "fused":
                rest = (A, D, z, bias, dtw, cx, cw, x_dbl)

                def run(state, conv, rest=rest):
                    return _model_decode_step(state, conv, *rest)
            else:

                def run(state, conv, cx=cx, dt=dt, A=A, B=B, C=C, D=D, z=z, bias=bias):
                    return selective_state_update(state, cx, dt, A, B, C, D, z, bias, True)

            times = _decode_sweep(run, state, conv, DECODE_CONFIGS)
            rep(
                f"| {dim}, {rank} | {kernel} | {batch} | "
                + " | ".join(f"{t:.2f}" for t in times)
                + " |"
            )


BATCHED_CONFIGS = [(16, 2), (32, 2), (32, 4), (64, 2), (64, 4), (64, 8), (128, 4), (128, 8)]


def _decode_rows(
    rep: Report, N=16, width=4, dtype=torch.float16, device="cuda",
    sizes=((1536, 48), (4096, 128)), batches=(16, 64),
):  # fmt: skip
    """The model's decode step above batch 8 (`state_update` with conv_weight and x_dbl: dt_proj
    as `decode_linear`'s tl.dot product in fp32, then the state-update kernel with the conv's
    step and the window's shift) for every (channels per program, warps) in BATCHED_CONFIGS
    (`common.set_override(decode=...)`), each checked against the default first, and what it
    replaced at 1.4B (seventh session): dt_proj rounded to fp16, the window's shift as cat +
    copy, `selective_state_update`. CUDA graph µs per call, inputs as the model passes them
    (x_proj's output as one sum in fp16)."""
    from mamba_compiled.lowering import decode_linear

    rep("\n### The decode step above batch 8 by (channels, warps), CUDA graph µs\n")
    heads = " | ".join(f"{bd}, {w}" for bd, w in BATCHED_CONFIGS)
    rep(f"| dim, dt_rank | batch | default | {heads} | before (3 kernels + shift) |")
    rep("|---|---|---|" + "---|" * (len(BATCHED_CONFIGS) + 1))
    g = dict(device=device)
    for dim, rank in sizes:
        for batch in batches:
            state = torch.randn(batch, dim, N, **g)
            conv = torch.randn(batch, dim, width, **g).to(dtype)
            cx, z = (torch.randn(batch, dim, **g).to(dtype) for _ in range(2))
            cw = (0.5 * torch.randn(dim, width, **g)).to(dtype)
            x_dbl = (0.1 * torch.randn(1, batch, rank + 2 * N, **g)).to(dtype)
            dtw = (0.1 * torch.randn(dim, rank, **g)).to(dtype)
            A, D, bias = -torch.rand(dim, N, **g), torch.randn(dim, **g), torch.rand(dim, **g)
            rest = (A, D, z, bias, dtw, cx, cw, x_dbl)

            def run(state, conv, rest=rest):
                return _model_decode_step(state, conv, *rest)

            times = _decode_sweep(run, state, conv, [None, *BATCHED_CONFIGS])
            u = torch.randn(batch, dim, **g).to(dtype)
            dt_low, B, C = torch.split(x_dbl[0], [rank, N, N], dim=-1)

            def before(state, conv, a=(u, dt_low, B, C, dtw, A, D, z, bias, cx)):
                u, dt_low, B, C, dtw, A, D, z, bias, cx = a
                dt = decode_linear(dt_low, dtw, None, None, 1e-5, None)
                conv.copy_(torch.cat([conv[:, :, 1:], cx[:, :, None]], dim=-1))
                return selective_state_update(state, u, dt, A, B, C, D, z, bias, True)

            times.append(_graph_us(functools.partial(before, state.clone(), conv.clone())))
            rep(f"| {dim}, {rank} | {batch} | " + " | ".join(f"{t:.2f}" for t in times) + " |")


def _time_decode(batch, dim, N, dtype, n=100):
    g = dict(device="cuda")
    state = torch.randn(batch, dim, N, **g)
    args = dict(
        x=torch.randn(batch, dim, **g).to(dtype), dt=torch.rand(batch, dim, **g).to(dtype),
        A=-torch.rand(dim, N, **g), B=torch.randn(batch, N, **g).to(dtype),
        C=torch.randn(batch, N, **g).to(dtype), D=torch.randn(dim, **g),
        z=torch.randn(batch, dim, **g).to(dtype), dt_bias=torch.rand(dim, **g),
    )  # fmt: skip

    def step():
        return selective_state_update(state, **args, dt_softplus=True)

    step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        step()
    torch.cuda.synchronize()
    eager_us = (time.perf_counter() - t0) / n * 1e6
    return eager_us, _graph_us(step, n)


# ------------------------------------------------------------------------------------------
# CPU


def cpu_bench(rep: Report, quick: bool):
    batch, dim, L, N = (2, 1536, 2048, 16) if not quick else (1, 64, 256, 16)
    reps = 3 if not quick else 1
    rep(f"\n### CPU: batch {batch}, dim {dim}, L {L}, dstate {N}, fp32 "
        f"({torch.get_num_threads()} threads)\n")  # fmt: skip
    rep("| implementation | fwd ms | fwd+bwd ms | peak RSS growth MB |")
    rep("|---|---|---|---|")

    def timed(fn, n=reps):
        fn()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        return (time.perf_counter() - t0) / n * 1e3

    def rss_mb():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    kw = make_inputs(batch, dim, L, N, torch.float32, "cpu", requires_grad=True)
    dout = torch.randn(batch, dim, L)
    with torch.no_grad():
        fwd = timed(lambda: call(kw))
    before = rss_mb()
    fb = timed(lambda: call(kw).backward(dout))
    rep(f"| mamba_compiled op (CPU kernel) | {fwd:.0f} | {fb:.0f} | {rss_mb() - before:.0f} |")

    Ls = min(L, 128)
    kws = make_inputs(batch, dim, Ls, N, torch.float32, "cpu", requires_grad=True)
    douts = torch.randn(batch, dim, Ls)
    with torch.no_grad():
        fwd = timed(lambda: selective_scan_ref(**kws, delta_softplus=True), n=1)
    fb = timed(lambda: selective_scan_ref(**kws, delta_softplus=True).backward(douts), n=1)
    rep(f"| oracle (eager loop), at L={Ls}, ×{L // Ls} | {fwd * L / Ls:.0f} | "
        f"{fb * L / Ls:.0f} | |")  # fmt: skip

    Lc = min(L, 16)  # the loop unrolls into the graph: compile time grows with L
    kwc = make_inputs(batch, dim, Lc, N, torch.float32, "cpu", requires_grad=True)
    doutc = torch.randn(batch, dim, Lc)
    compiled = torch.compile(lambda **k: selective_scan_ref(**k, delta_softplus=True))
    t0 = time.perf_counter()
    compiled(**kwc).backward(doutc)
    with torch.no_grad():
        compiled(**kwc)
    compile_s = time.perf_counter() - t0
    with torch.no_grad():
        fwd = timed(lambda: compiled(**kwc), n=2 * reps)
    fb = timed(lambda: compiled(**kwc).backward(doutc), n=2 * reps)
    rep(
        f"| oracle under torch.compile (loop unrolled; compile {compile_s:.0f} s), at L={Lc}, "
        f"×{L // Lc} | {fwd * L / Lc:.0f} | {fb * L / Lc:.0f} | |"
    )


# ------------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=pathlib.Path, default=None)
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--rows", default=",".join(str(i) for i in range(len(ANCHORS))))
    parser.add_argument("--skip-refs", action="store_true")
    parser.add_argument("--skip-plot", action="store_true")
    parser.add_argument("--skip-decode", action="store_true")
    parser.add_argument(
        "--decode-tables",
        default=",".join(DECODE_TABLES),
        help=f"the decode tables to run, of {','.join(DECODE_TABLES)}",
    )
    parser.add_argument("--quick", action="store_true", help="CPU: a small shape")
    parser.add_argument("--workers", type=int, default=8, help="--sweep: checking processes")
    parser.add_argument(
        "--sweep-only", default="", help="--sweep: only configs whose names contain one of these"
    )
    parser.add_argument("--wait-for", type=pathlib.Path, default=None)
    args = parser.parse_args()
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
    rep = Report(args.out / "bench_scan.md" if args.out is not None else None)
    rep(f"# bench_scan ({time.strftime('%Y-%m-%d')})\n")
    if torch.cuda.is_available():
        import triton

        rep(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton "
            f"{triton.__version__}; command: `python {' '.join(sys.argv)}`")  # fmt: skip
        if args.sweep:
            with rep.section("config sweep"):
                only = tuple(o for o in args.sweep_only.split(",") if o)
                cuda_sweep(rep, args.workers, args.wait_for, only=only)
        elif args.wait_for is not None:
            while not args.wait_for.exists():
                time.sleep(1.0)
        with rep.section("selective scan table"):
            cuda_table(rep, [int(r) for r in args.rows.split(",") if r])
        if not args.skip_decode:
            with rep.section("decode step"):
                cuda_decode(rep, args.decode_tables.split(","))
            if "step" in args.decode_tables.split(","):
                with rep.section("host overhead"):
                    cuda_host_overhead(rep)
        if not args.skip_plot:
            with rep.section("time against L"):
                cuda_plot(rep, args.out)
        if not args.skip_refs:
            with rep.section("reference points"):
                cuda_refs(rep)
    else:
        rep(f"CPU ({platform.processor() or platform.machine()}), torch {torch.__version__}; "
            f"command: `python {' '.join(sys.argv)}`")  # fmt: skip
        with rep.section("cpu"):
            cpu_bench(rep, args.quick)
    if rep.failed:
        print(f"failed sections: {rep.failed}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
