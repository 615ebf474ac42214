"""Probe (seventeenth session): the host time of the op's eager forward + backward.

    python perf/probes/host_fb.py [ROW]     # ANCHORS row, default 1 (8x2048x2048 bf16)

At 8x2048x2048 do_bench read fwd+bwd 1.67 ms where CUDA-graph replays of the same calls take
1.37: the host's launches are on the critical path. This prints, for the row's fwd+bwd as
bench_scan times it, the host time per call (the GPU idle before each call), the do_bench and
CUDA-graph medians, and the top of a cProfile of the host side.
"""

from __future__ import annotations

import cProfile
import pathlib
import pstats
import sys
import time

import torch
import triton

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "perf"))

from bench_scan import ANCHORS, bench_ms, call, graph_ms, make_inputs  # noqa: E402


def main() -> None:
    row = int(sys.argv[1]) if len(sys.argv) > 1 else 1
    b, d, L, n, dtype, *_ = ANCHORS[row]
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}"
          f"; row {row}: {b}x{d}x{L}x{n} {dtype}")  # fmt: skip
    kw = make_inputs(b, d, L, n, dtype, "cuda", requires_grad=True)
    dout = torch.randn(b, d, L, device="cuda", dtype=dtype)
    leaves = list(kw.values())

    def fb():
        call(kw).backward(dout)

    def fwd():
        with torch.no_grad():
            call(kw)

    for f in (fwd, fb):
        for _ in range(5):
            f()
        host = []
        for _ in range(30):
            for t in leaves:
                t.grad = None
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            f()
            host.append(time.perf_counter() - t0)
        torch.cuda.synchronize()
        host.sort()
        bench = bench_ms(f, grad_to_none=leaves)
        graph = graph_ms(f, grad_to_none=leaves)
        print(
            f"{f.__name__}: host {1e3 * host[len(host) // 2]:.3f} ms per call (median of 30),"
            f" do_bench {bench:.3f} ms, CUDA graph {graph:.3f} ms",
            flush=True,
        )
    # does the host wait for the GPU? time each call behind ~20 ms of queued GPU sleep: a call
    # that returns in well under 20 ms never waited
    for name, f in (("fwd (no_grad)", fwd), ("fwd+bwd", fb)):
        for t in leaves:
            t.grad = None
        torch.cuda.synchronize()
        torch.cuda._sleep(40_000_000)
        t0 = time.perf_counter()
        f()
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        print(f"{name} behind a queued GPU sleep: host {1e3 * (t1 - t0):.3f} ms", flush=True)
    prof = cProfile.Profile()
    torch.cuda.synchronize()
    torch.cuda._sleep(400_000_000)  # the GPU stays busy: only host time is profiled
    prof.enable()
    for _ in range(20):
        for t in leaves:
            t.grad = None
        fb()
    prof.disable()
    torch.cuda.synchronize()
    st = pstats.Stats(prof)
    st.sort_stats("tottime").print_stats(30)
    st.sort_stats("cumulative").print_stats(40)


if __name__ == "__main__":
    main()
