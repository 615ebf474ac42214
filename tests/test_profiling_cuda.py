"""Profiling on the GPU: the scan kernel runs inside its range (torch.profiler's view of the
range, and Nsight Compute's NVTX filter when ncu is installed), emit_nvtx coexists with the
ranges, and the profile command counts fewer kernels per decode step compiled than eager.

Run with `pytest -m cuda` (perf/gpu_check.sh); skipped without a GPU.
"""

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from torch._dynamo.utils import counters

from mamba_compiled import profiling
from mamba_compiled.models import MambaConfig, MambaLMHeadModel
from mamba_compiled.profile_trace import SCAN_KERNEL, summarize

pytestmark = pytest.mark.cuda
# The profile command in a process of its own (for ncu), without going through the CLI module.
PROFILE_MAIN = (
    "import argparse, sys; from mamba_compiled import profiling; "
    "parser = argparse.ArgumentParser(); profiling.add_arguments(parser); "
    "sys.exit(profiling.run(parser.parse_args()))"
)


def run_profile(tmp_path, *argv):
    parser = argparse.ArgumentParser()
    profiling.add_arguments(parser)
    args = parser.parse_args(["--model", "tiny", "--device", "cuda", "--out", str(tmp_path), *argv])
    assert profiling.run(args) == 0
    trace = json.loads((tmp_path / "trace.json").read_text())
    return trace, summarize(trace, f"mamba/{args.mode}_step")


def within(inner, outer):
    return outer["ts"] <= inner["ts"] and inner["ts"] + inner["dur"] <= outer["ts"] + outer["dur"]


@pytest.mark.parametrize(
    "mode, part, kernel",
    [
        pytest.param("prefill", "scan", "_scan_fwd_kernel", id="prefill"),
        pytest.param("decode", "scan", "_state_update_kernel", id="decode"),
        pytest.param("train", "scan_bwd", "_scan_bwd_kernel", id="train-backward"),
    ],
)
def test_scan_kernel_runs_inside_its_range(tmp_path, mode, part, kernel):
    trace, summary = run_profile(tmp_path, "--mode", mode, "--no-compile", "--nvtx",
                                 "--seqlen", "300", "--batch", "2", "--warmup", "1")  # fmt: skip
    events = [e for e in trace["traceEvents"] if e.get("ph") == "X"]
    name = f"mamba/layers.0/{part}"
    kernels = [e for e in events if e.get("cat") == "kernel" and kernel in e["name"]]
    assert len(kernels) == 2  # one per layer
    # Layer 0's kernel: the first one launched, or the last one in the backward (which runs the
    # layers in reverse).
    first = (max if part == "scan_bwd" else min)(kernels, key=lambda e: e["ts"])
    # Host side: the launch of layer 0's kernel happens inside the range.
    host = [e for e in events if e.get("cat") in ("cuda_runtime", "cuda_driver")]
    launch = next(e for e in host if e["args"].get("correlation") == first["args"]["correlation"])
    cpu_ranges = [e for e in events if e.get("cat") == "user_annotation" and e["name"] == name]
    assert any(within(launch, r) for r in cpu_ranges)
    # Device side: the profiler projects the range onto the GPU timeline around the kernel.
    gpu_ranges = [e for e in events if e.get("cat") == "gpu_user_annotation" and e["name"] == name]
    assert any(within(first, r) for r in gpu_ranges)
    assert summary.device == "cuda" and 0 < summary.scan_share < 1


def test_emit_nvtx_and_ranges_together():
    model = MambaLMHeadModel(MambaConfig(d_model=64, n_layer=2, vocab_size=64), device="cuda")
    ids = torch.randint(0, 64, (2, 33), device="cuda")
    with torch.autograd.profiler.emit_nvtx(), profiling.nvtx_ranges(model, enabled=True):
        model(ids).logits.sum().backward()
    torch.cuda.synchronize()
    assert isinstance(profiling.nvtx_backend(), (profiling._NvtxPackage, profiling._TorchNvtx))


def test_decode_kernels_per_step_compiled_vs_eager(tmp_path):
    _, eager = run_profile(tmp_path / "eager", "--mode", "decode", "--no-compile", "--warmup", "2")
    torch._dynamo.reset()
    counters.clear()
    trace, compiled = run_profile(tmp_path / "compiled", "--mode", "decode", "--compile", "--nvtx",
                                  "--warmup", "3")  # fmt: skip
    assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])
    # At batch 1 eager already runs the decode step as the package's kernels (decode_linear,
    # conv_x_proj, ssm_decode_step): compiled runs no more of them, as one CUDA graph replay.
    assert compiled.kernels <= eager.kernels
    assert compiled.launches < eager.launches
    assert any(SCAN_KERNEL.search(r.name) for r in compiled.rows) and compiled.scan_us > 0
    assert any(e.get("name", "").startswith("triton_") for e in trace["traceEvents"])


def test_compiled_train_step_names_both_scan_kernels(tmp_path):
    torch._dynamo.reset()
    _, summary = run_profile(tmp_path, "--mode", "train", "--compile", "--seqlen", "256",
                             "--batch", "2", "--warmup", "2")  # fmt: skip
    names = {r.name for r in summary.rows}
    assert any("_scan_fwd_kernel" in n for n in names)
    assert any("_scan_bwd_kernel" in n for n in names)
    assert 0 < summary.scan_share < 1


@pytest.mark.skipif(shutil.which("ncu") is None, reason="needs Nsight Compute (ncu) on PATH")
def test_ncu_nvtx_filter_selects_the_scan_kernel(tmp_path):
    # '/' separates nested ranges in ncu's filter syntax: the name's own slashes are escaped.
    command = [
        "ncu", "--nvtx", "--nvtx-include", r"mamba\/layers.0\/scan/", "--clock-control", "none",
        "--metrics", "gpu__time_duration.sum", "--csv",
        sys.executable, "-c", PROFILE_MAIN, "--model", "tiny",
        "--mode", "prefill", "--seqlen", "300", "--no-compile", "--nvtx", "--no-torch-profiler",
        "--warmup", "0", "--device", "cuda", "--out", str(tmp_path),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=os.environ)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = list(csv.reader(line for line in result.stdout.splitlines() if line.startswith('"')))
    assert rows, result.stdout[-3000:]  # ncu prints "No kernels were profiled" when none matched
    column = rows[0].index("Kernel Name")
    names = {row[column] for row in rows[1:]}
    assert any("_scan_fwd_kernel" in n for n in names), names
    assert not any("gemm" in n.lower() or "cutlass" in n.lower() for n in names), names
