"""Profiling on CPU: NVTX ranges (off by default, no-ops without CUDA, invisible to torch.compile),
the profile command on a tiny model, and the trace reader on CPU and CUDA-shaped traces."""

import argparse
import json
import sys
import types

import pytest
import torch

from mamba_compiled import profiling
from mamba_compiled.models import MambaConfig, MambaLMHeadModel
from mamba_compiled.profile_trace import summarize, to_markdown

TINY = MambaConfig(d_model=16, n_layer=2, vocab_size=64)


class FakeNvtx:
    """Stands in for an NVTX backend: records pushes and pops."""

    def __init__(self):
        self.calls = []

    def push(self, name, color):
        self.calls.append(("push", name))

    def pop(self):
        self.calls.append(("pop", None))

    def pushed(self):
        return [name for kind, name in self.calls if kind == "push"]

    def balanced(self):
        depth = 0
        for kind, _ in self.calls:
            depth += 1 if kind == "push" else -1
            if depth < 0:
                return False
        return depth == 0


@pytest.fixture
def fake_nvtx(monkeypatch):
    fake = FakeNvtx()
    monkeypatch.setattr(profiling, "nvtx_backend", lambda domain=None: fake)
    return fake


def wrapped(model):
    return [
        (name, method)
        for name, m in model.named_modules()
        for method in ("forward", "step")
        if method in m.__dict__
    ]


def run_profile(tmp_path, *argv):
    parser = argparse.ArgumentParser()
    profiling.add_arguments(parser)
    args = parser.parse_args(["--model", "tiny", "--device", "cpu", "--out", str(tmp_path), *argv])
    assert profiling.run(args) == 0
    trace = json.loads((tmp_path / "trace.json").read_text())
    return trace, summarize(trace, f"mamba/{args.mode}_step")


# ---- ranges ------------------------------------------------------------------------------------


def test_ranges_are_off_by_default(monkeypatch):
    monkeypatch.delenv(profiling.ENV_VAR, raising=False)
    model = MambaLMHeadModel(TINY)
    with profiling.nvtx_ranges(model) as names:
        assert names == []
        assert wrapped(model) == []
    with profiling.nvtx_ranges(model, enabled=False) as names:
        assert names == [] and wrapped(model) == []


def test_env_var_switches_ranges_on_and_exit_removes_them(monkeypatch):
    model = MambaLMHeadModel(TINY)
    monkeypatch.setenv(profiling.ENV_VAR, "1")
    with profiling.nvtx_ranges(model) as names:
        assert "mamba/layers.1/mixer" in names
        assert ("backbone.layers.0.mixer", "step") in wrapped(model)
    assert wrapped(model) == []
    monkeypatch.setenv(profiling.ENV_VAR, "yes")
    with pytest.raises(ValueError, match="must be 0 or 1"):
        profiling.ranges_enabled()


def test_range_names_nest_and_balance_in_forward_backward_and_step(fake_nvtx):
    model = MambaLMHeadModel(TINY)
    ids = torch.randint(0, 64, (2, 7))
    with profiling.nvtx_ranges(model, enabled=True):
        model(ids).logits.sum().backward()
        forward_backward = fake_nvtx.pushed()
        assert fake_nvtx.balanced()
        fake_nvtx.calls.clear()
        states = [(torch.zeros(2, 32, 4), torch.zeros(2, 32, 16)) for _ in range(2)]
        with torch.no_grad():
            model.step(ids[:, 0], states)
        step = fake_nvtx.pushed()
        assert fake_nvtx.balanced()
    forward = ["mamba/model", "mamba/embedding"]
    for i in range(2):
        forward += [f"mamba/layers.{i}", f"mamba/layers.{i}/mixer", f"mamba/layers.{i}/scan"]
    forward += ["mamba/norm_f", "mamba/lm_head"]
    assert forward_backward == forward + ["mamba/layers.1/scan_bwd", "mamba/layers.0/scan_bwd"]
    assert step == forward
    # The ranges nest: block, mixer, scan; the scan pops first.
    assert fake_nvtx.calls[3:9] == [
        ("push", "mamba/layers.0"), ("push", "mamba/layers.0/mixer"),
        ("push", "mamba/layers.0/scan"), ("pop", None), ("pop", None), ("pop", None),
    ]  # fmt: skip


def test_fused_decode_step_keeps_mixer_and_scan_ranges(fake_nvtx, monkeypatch):
    """The decode step as CUDA runs it at batch 1 (projections as `decode_linear`, outside the
    mixer's `step`): each mixer's range and its scan's still nest in the block's."""
    from mamba_compiled.models import lm

    monkeypatch.setattr(lm, "fused_decoding", lambda x: True)
    model = MambaLMHeadModel(TINY)
    states = [(torch.zeros(1, 32, 4), torch.zeros(1, 32, 16)) for _ in range(2)]
    with profiling.nvtx_ranges(model, enabled=True), torch.no_grad():
        model.step(torch.randint(0, 64, (1,)), states)
    assert fake_nvtx.balanced()
    layers = [[f"mamba/layers.{i}", f"mamba/layers.{i}/mixer", f"mamba/layers.{i}/scan"]
              for i in range(2)]  # fmt: skip
    assert fake_nvtx.pushed() == ["mamba/model", "mamba/embedding", *layers[0], *layers[1]]


def test_ranges_never_break_fullgraph_compile(fake_nvtx):
    torch._dynamo.reset()
    model = MambaLMHeadModel(MambaConfig(d_model=16, n_layer=1, vocab_size=64))
    ids = torch.randint(0, 64, (1, 9))
    with profiling.nvtx_ranges(model, enabled=True):
        eager = model(ids).logits
        fake_nvtx.calls.clear()
        compiled = torch.compile(model, fullgraph=True)(ids).logits  # a graph break would raise
        assert fake_nvtx.calls == []  # nothing inside the compiled region
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)


def test_nvtx_is_a_no_op_without_cuda(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("checks the CPU-only behaviour")

    def fail(*args):
        raise AssertionError("torch.cuda.nvtx called without CUDA")

    monkeypatch.setattr(torch.cuda.nvtx, "range_push", fail)
    monkeypatch.setattr(torch.cuda.nvtx, "range_pop", fail)
    assert profiling.nvtx_backend() is None
    model = MambaLMHeadModel(TINY)
    with profiling.nvtx_ranges(model, enabled=True), profiling.nvtx_range("mamba/step"):
        model(torch.randint(0, 64, (1, 5)))


def test_backend_choice(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    fake = types.SimpleNamespace(
        push_range=lambda message, color, domain: None, pop_range=lambda domain: None
    )
    monkeypatch.setitem(sys.modules, "nvtx", fake)
    backend = profiling.nvtx_backend("mamba")
    assert isinstance(backend, profiling._NvtxPackage) and backend.domain == "mamba"
    monkeypatch.setitem(sys.modules, "nvtx", None)  # not installed
    assert isinstance(profiling.nvtx_backend(), profiling._TorchNvtx)
    with pytest.raises(ImportError, match="pip install nvtx"):
        profiling.nvtx_backend("mamba")


def test_ranges_need_a_mamba_model():
    with pytest.raises(TypeError, match="holds no MambaLMHeadModel"):
        with profiling.nvtx_ranges(torch.nn.Linear(2, 2), enabled=True):
            pass


# ---- the profile command -----------------------------------------------------------------------


SCAN_FWD = "mamba_compiled::selective_scan_fwd"


@pytest.mark.parametrize(
    "mode, ops_in_ranges",
    [
        pytest.param("train", {"scan": SCAN_FWD, "scan_bwd": "mamba_compiled::selective_scan_bwd"},
                     id="train"),
        pytest.param("prefill", {"scan": SCAN_FWD}, id="prefill"),
        pytest.param("decode", {"scan": "mamba_compiled::ssm_decode_step"}, id="decode"),
    ],
)  # fmt: skip
def test_profile_command_eager(tmp_path, capsys, mode, ops_in_ranges):
    trace, summary = run_profile(tmp_path, "--mode", mode, "--no-compile", "--nvtx",
                                 "--seqlen", "17", "--batch", "2", "--warmup", "1")  # fmt: skip
    events = trace["traceEvents"]
    for part, op_name in ops_in_ranges.items():
        # The trace names the scan op, and the op runs inside its range (as the profiler saw it).
        ranges = [e for e in events if e["name"] == f"mamba/layers.0/{part}"]
        ops = [e for e in events if e["name"] == op_name]
        assert ranges and ops
        assert any(r["ts"] <= op["ts"] and op["ts"] + op["dur"] <= r["ts"] + r["dur"]
                   for r in ranges for op in ops)  # fmt: skip
    assert summary.device == "cpu" and summary.kernels > 0 and 0 < summary.scan_share < 1
    report = (tmp_path / "profile.md").read_text()
    assert report == capsys.readouterr().out
    assert "| scan |" in report and "| op | calls | total µs |" in report


def test_profile_command_decode_compiled_has_fewer_ops(tmp_path):
    torch._dynamo.reset()
    _, eager = run_profile(tmp_path / "eager", "--no-compile", "--warmup", "1")
    trace, compiled = run_profile(tmp_path / "compiled", "--compile", "--nvtx", "--warmup", "2")
    names = {e["name"] for e in trace["traceEvents"]}
    assert "mamba_compiled::selective_state_update_cpu" in names
    assert any("cpp_fused" in n for n in names)  # Inductor's C++ kernels, named and recorded
    assert compiled.kernels < eager.kernels
    assert compiled.scan_us > 0


def test_profile_command_leaves_inductor_config_alone(tmp_path):
    import torch._inductor.config as inductor_config

    before = inductor_config.cpp.enable_kernel_profile
    run_profile(tmp_path, "--mode", "prefill", "--no-compile", "--seqlen", "5", "--warmup", "0")
    assert inductor_config.cpp.enable_kernel_profile == before
    assert set(profiling.readable_kernels("cuda", training=True)) > set(
        profiling.readable_kernels("cpu", training=True)
    )


@pytest.mark.parametrize(
    "argv, message",
    [
        pytest.param(["--device", "cuda"], "no CUDA device", id="no-cuda"),
        pytest.param(["--model", "7b"], "unknown model name .* or 'tiny'", id="model"),
        pytest.param(["--mode", "train", "--dtype", "float16"], "--dtype is for", id="dtype"),
        pytest.param(["--batch", "0"], "must be >= 1", id="batch"),
    ],
)
def test_profile_command_rejects_bad_arguments(tmp_path, argv, message):
    if torch.cuda.is_available() and argv[:2] == ["--device", "cuda"]:
        pytest.skip("CUDA is available")
    parser = argparse.ArgumentParser()
    profiling.add_arguments(parser)
    args = parser.parse_args(["--model", "tiny", "--device", "cpu", "--out", str(tmp_path), *argv])
    with pytest.raises(ValueError, match=message):
        profiling.run(args)


# ---- the trace reader on a CUDA-shaped trace ---------------------------------------------------


def _x(name, cat, ts, dur, tid=1, **args):
    return {"ph": "X", "name": name, "cat": cat, "ts": ts, "dur": dur, "tid": tid, "args": args}


def test_summarize_cuda_trace():
    events = [
        _x("mamba/decode_step", "user_annotation", 0, 100),
        _x("aten::mm", "cpu_op", 1, 5),
        _x("cudaLaunchKernel", "cuda_runtime", 2, 1, correlation=1),
        _x("mamba_compiled::selective_state_update", "cpu_op", 10, 20),
        _x("cudaMemsetAsync", "cuda_runtime", 11, 1, correlation=2),
        _x("cuLaunchKernel", "cuda_driver", 12, 1, correlation=3),
        _x("cudaGraphLaunch", "cuda_runtime", 40, 2, correlation=4),
        _x("sm90_gemm", "kernel", 3, 10, tid=7, correlation=1),
        _x("Memset (Device)", "gpu_memset", 13, 2, tid=7, correlation=2),
        _x("_state_update_kernel", "kernel", 15, 8, tid=7, correlation=3),
        _x("triton_poi_fused_add_0", "kernel", 42, 4, tid=7, correlation=4),
        _x("triton_poi_fused_add_0", "kernel", 47, 6, tid=7, correlation=4),
    ]
    s = summarize({"traceEvents": events}, "mamba/decode_step")
    assert (s.device, s.kernels, s.launches, s.step_us, s.work_us) == ("cuda", 4, 4, 100, 30)
    assert s.scan_us == 10  # the scan kernel and the memset launched inside the scan op
    assert [(r.name, r.calls, r.total_us) for r in s.rows][:2] == [
        ("sm90_gemm", 1, 10), ("triton_poi_fused_add_0", 2, 10)
    ]  # fmt: skip
    report = to_markdown(s, "t", "c", top=2)
    assert "| kernels per step | 4 |" in report and "| (2 more) | 2 | 10.0 | 33.3 % |" in report
    with pytest.raises(ValueError, match="expected one"):
        summarize({"traceEvents": events}, "mamba/train_step")
