"""Probe (sixteenth session): the scan forward's time against its checkpoint interval.

    python perf/probes/fwd_ck.py
    python perf/probes/fwd_ck.py --launch ROW    # ROW's forward 4 times, for Nsight Compute

The forward writes the state every CK steps for the backward (bf16, a third of its bytes at
row 1). Under torch.no_grad nothing needs them: this times `lowering.scan_fwd` alone at CK 8
(the default), 16, 64 and 2048 (about none), and with save_checkpoints=False (none: the
kernel's STORE_CK=False variant, what no_grad runs), on every ANCHORS row, after checking that
the outputs agree (bitwise across CK; the STORE_CK=False kernel is compiled apart, and its
rounding may differ).
"""

from __future__ import annotations

import pathlib
import sys

import torch
import triton

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "perf"))

from bench_scan import ANCHORS, make_inputs  # noqa: E402

from mamba_compiled.lowering import common, scan_fwd  # noqa: E402


def launch(row: int) -> None:
    """Row `row`'s forward twice with checkpoints, then twice without: for Nsight Compute
    (`gpu_check.sh ncu-fwd`)."""
    b, d, L, n, dtype, *_ = ANCHORS[row]
    kw = make_inputs(b, d, L, n, dtype, "cuda")
    kw["B"], kw["C"] = kw["B"][:, None], kw["C"][:, None]
    args = [kw[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")]
    for save in (True, True, False, False):
        scan_fwd(*args, None, True, save)
    torch.cuda.synchronize()


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--launch":
        return launch(int(sys.argv[2]))
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    variants = [(8, True), (16, True), (64, True), (2048, True), (8, False)]
    print("| row | " + " | ".join(f"CK {ck} ms" if save else "none ms" for ck, save in variants)
          + " |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for b, d, L, n, dtype, *_ in ANCHORS:
        kw = make_inputs(b, d, L, n, dtype, "cuda")
        kw["B"], kw["C"] = kw["B"][:, None], kw["C"][:, None]  # (batch, groups, dstate, L)
        args = [kw[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")]
        times, ref = [], None
        for ck, save in variants:
            common.set_override(ck=ck)
            try:
                out = scan_fwd(*args, None, True, save)[0]
                if ref is None:
                    ref = out
                if save:
                    assert torch.equal(out, ref), f"CK {ck}: output differs"
                else:
                    torch.testing.assert_close(out, ref, rtol=2e-2, atol=2e-2)
                run = lambda a=args, s=save: scan_fwd(*a, None, True, s)  # noqa: E731
                times.append(triton.testing.do_bench(run, warmup=25, rep=100,
                                                     return_mode="median"))  # fmt: skip
            finally:
                common.set_override()
        print(
            f"| {b}x{d}x{L} {str(dtype)[6:]} | " + " | ".join(f"{t:.3f}" for t in times) + " |",
            flush=True,
        )


if __name__ == "__main__":
    main()
