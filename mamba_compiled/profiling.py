"""Profiling: NVTX ranges named after the model's parts, readable kernel names, a profile command.

    nvtx_ranges(model)   a context manager: while open, each block, mixer, scan call, the
                         embedding, the final norm and the LM head run inside a range named
                         `mamba/<layer>/<part>` (mamba/layers.3, mamba/layers.3/mixer,
                         mamba/layers.3/scan, mamba/layers.3/scan_bwd, mamba/lm_head, ...)
    nvtx_range(name)     one range, e.g. around a compiled call (never inside one)

Ranges are off by default: `nvtx_ranges(model)` installs nothing unless `enabled=True` or the
environment has MAMBA_COMPILED_NVTX=1. They are applied from outside the model, by wrapping the
`forward` and `step` of its modules for the duration of the `with` block (the model file holds no
profiling code), and each wrapper skips itself while torch.compile traces: NVTX inside a
`fullgraph=True` region is an error, so compiled code is named by Inductor and the profiler
instead (see `readable_kernels`). The scan's range comes from a TorchFunctionMode entered only
while an eager mixer runs; its backward gets a range from hooks on the op's autograd node.

Each range goes to NVTX (the `nvtx` package when installed, which adds colours and domains, else
`torch.cuda.nvtx`; nothing without CUDA) and, while torch.profiler records, to the profiler as a
`record_function` of the same name. Range names contain '/', which Nsight Compute's filter syntax
reads as nesting: escape it, `ncu --nvtx --nvtx-include 'mamba\\/layers.0\\/scan/'`.

The `mamba-compiled profile` command is `add_arguments` + `run`; `profile_trace.py` reads traces.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from mamba_compiled.models import MambaConfig, MambaLMHeadModel
from mamba_compiled.models.lm import Block
from mamba_compiled.models.mamba import Mamba

ENV_VAR = "MAMBA_COMPILED_NVTX"
_MISSING = object()


def ranges_enabled(enabled: bool | None = None) -> bool:
    """`enabled` if given, else the environment: MAMBA_COMPILED_NVTX=1 on, unset or 0 off."""
    if enabled is not None:
        return bool(enabled)
    value = os.environ.get(ENV_VAR, "0")
    if value not in ("0", "1"):
        raise ValueError(f"{ENV_VAR} must be 0 or 1, got {value!r}")
    return value == "1"


# ---- NVTX backends -----------------------------------------------------------------------------


class _NvtxPackage:
    """The `nvtx` package: colours, and an optional domain (None: the default domain)."""

    def __init__(self, module, domain: str | None):
        self.nvtx, self.domain = module, domain

    def push(self, name: str, color: str) -> None:
        self.nvtx.push_range(message=name, color=color, domain=self.domain)

    def pop(self) -> None:
        self.nvtx.pop_range(domain=self.domain)


class _TorchNvtx:
    def push(self, name: str, color: str) -> None:
        torch.cuda.nvtx.range_push(name)

    def pop(self) -> None:
        torch.cuda.nvtx.range_pop()


def nvtx_backend(domain: str | None = None):
    """What emits NVTX here: the nvtx package, torch.cuda.nvtx, or None (no CUDA: no NVTX)."""
    if not torch.cuda.is_available():
        return None
    try:
        import nvtx
    except ImportError:
        if domain is not None:
            raise ImportError(
                f"an NVTX domain ({domain!r}) needs the nvtx package: pip install nvtx "
                "(or 'mamba-compiled[cuda]'), or pass domain=None"
            ) from None
        return _TorchNvtx()
    return _NvtxPackage(nvtx, domain)


def _kineto_recording() -> bool:
    """torch.profiler records (not emit_nvtx, whose record_function ranges would repeat ours)."""
    kineto = torch._C._profiler.ActiveProfilerType.KINETO
    return torch._C._autograd._profiler_type() == kineto


class _Span:
    """One range: NVTX push/pop, plus a record_function while torch.profiler records."""

    __slots__ = ("backend", "name", "color", "record")

    def __init__(self, backend, name: str, color: str):
        self.backend, self.name, self.color, self.record = backend, name, color, None

    def __enter__(self) -> _Span:
        if self.backend is not None:
            self.backend.push(self.name, self.color)
        if _kineto_recording():
            self.record = torch.autograd.profiler.record_function(self.name)
            self.record.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.record is not None:
            self.record.__exit__(None, None, None)
            self.record = None
        if self.backend is not None:
            self.backend.pop()


@contextlib.contextmanager
def nvtx_range(name: str, color: str = "orange", domain: str | None = None) -> Iterator[None]:
    """A range around eager code or a compiled call; a no-op while torch.compile traces."""
    if torch.compiler.is_compiling():
        yield
        return
    with _Span(nvtx_backend(domain), name, color):
        yield


# ---- ranges around the model's parts -----------------------------------------------------------


def _scan_ops() -> tuple:
    import mamba_compiled.ops.pdl  # noqa: F401  (registers the decode step's PDL twin)

    ops = torch.ops.mamba_compiled
    # the decode step's PDL twin too: the generator opens PDL on sm_90+ GPUs, and without it
    # CUDA decoding had no scan range (test_profiling_cuda's decode case, eighteenth session)
    packets = (ops.selective_scan_fwd, ops.selective_state_update, ops.ssm_decode_step,
               ops.ssm_decode_step_pdl)  # fmt: skip
    return packets + tuple(p.default for p in packets)


class _ScanRanges(TorchFunctionMode):
    """Active while one eager mixer runs: a range around each scan op call, and one around the
    op's backward (autograd node hooks, which run wherever the backward runs)."""

    def __init__(self, backend, prefix: str):
        super().__init__()
        self.backend, self.prefix, self.ops = backend, prefix, _scan_ops()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not any(func is op for op in self.ops):
            return func(*args, **kwargs)
        with _Span(self.backend, f"{self.prefix}/scan", "red"):
            out = func(*args, **kwargs)
        node = next((t.grad_fn for t in _tensors(out) if t.grad_fn is not None), None)
        if node is not None:
            open_spans: list[_Span] = []
            name = f"{self.prefix}/scan_bwd"
            node.register_prehook(
                lambda grads: open_spans.append(_Span(self.backend, name, "red").__enter__())
            )
            node.register_hook(
                lambda grads_in, grads_out: open_spans.pop().__exit__(None, None, None)
            )
        return out


def _tensors(out) -> list:
    if isinstance(out, torch.Tensor):
        return [out]
    return [t for t in out if isinstance(t, torch.Tensor)]


def _targets(model: nn.Module) -> Iterator[tuple[nn.Module, str, str, str | None]]:
    """(module, range name, colour, scan prefix or None) for each part that gets a range."""
    for m in model.modules():
        if isinstance(m, MambaLMHeadModel):
            yield m, "mamba/model", "white", None
            yield m.backbone.embedding, "mamba/embedding", "green", None
            yield m.backbone.norm_f, "mamba/norm_f", "green", None
            yield m.lm_head, "mamba/lm_head", "green", None
        elif isinstance(m, Block):
            yield m, f"mamba/layers.{m.layer_idx}", "blue", None
        elif isinstance(m, Mamba):
            prefix = "mamba" if m.layer_idx is None else f"mamba/layers.{m.layer_idx}"
            yield m, f"{prefix}/mixer", "purple", prefix


def _wrap(original: Callable, backend, name: str, color: str, scan_prefix: str | None) -> Callable:
    def wrapper(*args, **kwargs):
        if torch.compiler.is_compiling():  # compiled code is named by Inductor, not by NVTX
            return original(*args, **kwargs)
        with _Span(backend, name, color):
            if scan_prefix is None:
                return original(*args, **kwargs)
            with _ScanRanges(backend, scan_prefix):
                return original(*args, **kwargs)

    return wrapper


@contextlib.contextmanager
def nvtx_ranges(
    model: nn.Module, enabled: bool | None = None, domain: str | None = None
) -> Iterator[list[str]]:
    """Name the model's parts with ranges while the block is open; yields the range names.

    Off (nothing installed; yields []) unless `enabled`, or `enabled=None` and
    MAMBA_COMPILED_NVTX=1. Enter it before compiling: it replaces modules' `forward`, `step`
    and `ssm_step`.
    `model` is a MambaLMHeadModel or any module holding one (or holding Mamba blocks).
    `domain` puts the ranges in an NVTX domain (needs the nvtx package); the default domain
    keeps Nsight filters the same with or without it.
    """
    if not ranges_enabled(enabled):
        yield []
        return
    targets = list(_targets(model))
    if not targets:
        raise TypeError(
            f"nvtx_ranges: {type(model).__name__} holds no MambaLMHeadModel or Mamba block"
        )
    backend = nvtx_backend(domain)
    installed: list[tuple[nn.Module, str, object]] = []
    try:
        for module, name, color, scan_prefix in targets:
            # ssm_step: a mixer's decode step between its projections, which the block calls
            # when it runs them as `decode_linear` (CUDA, batch 1)
            for method in ("forward", "step", "ssm_step"):
                if not hasattr(module, method):
                    continue
                installed.append((module, method, module.__dict__.get(method, _MISSING)))
                setattr(
                    module,
                    method,
                    _wrap(getattr(module, method), backend, name, color, scan_prefix),
                )
        yield [name for _, name, _, _ in targets]
    finally:
        for module, method, previous in reversed(installed):
            if previous is _MISSING:
                delattr(module, method)
            else:
                setattr(module, method, previous)


# ---- Inductor settings for reading kernels -----------------------------------------------------


def readable_kernels(device_type: str, training: bool) -> dict:
    """torch._inductor.config options that make compiled kernels readable in a profile:
    names after the aten ops they fuse, unique per kernel, C++ kernels recorded by the profiler,
    and (CUDA training) NVTX ranges around the forward and backward graphs. For
    `torch._inductor.config.patch(...)` around compilation, never set globally."""
    import torch._inductor.config as inductor_config

    options = {
        "triton.descriptive_names": "original_aten",
        "triton.unique_kernel_names": True,
        "cpp.descriptive_names": "original_aten",
        "cpp.enable_kernel_profile": True,
    }
    if device_type == "cuda" and training:
        options["annotate_training"] = True  # TORCHINDUCTOR_ANNOTATE_TRAINING=1
    missing = [k for k in options if not _has_option(inductor_config, k)]
    if missing:
        raise RuntimeError(f"torch {torch.__version__} has no Inductor option(s) {missing}")
    return options


def _has_option(config, dotted: str) -> bool:
    obj = config
    for part in dotted.split("."):
        if not hasattr(obj, part):
            return False
        obj = getattr(obj, part)
    return True


# ---- the profile command -----------------------------------------------------------------------

MODES = ("train", "prefill", "decode")
TINY = dict(d_model=32, n_layer=2, vocab_size=256)  # `--model tiny`: seconds on a CPU
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def model_config(name: str) -> MambaConfig:
    if name == "tiny":
        return MambaConfig(**TINY)
    try:
        return MambaConfig.from_name(name)
    except ValueError as e:
        raise ValueError(f"{e}, or 'tiny'") from None


def build_step(
    model: MambaLMHeadModel, mode: str, batch: int, seqlen: int, compile: bool,
    pdl: bool | None = None,
) -> Callable[[], None]:  # fmt: skip
    """What one step runs, as the project runs it: the training objective (compiled whole, as
    `mamba-compiled train` does) with backward and AdamW; or MambaGenerator's prefill of `seqlen`
    tokens, or its decode step (CUDA graphs when compiled on CUDA) from a zeroed cache; `pdl`
    as MambaGenerator's."""
    device = model.lm_head.weight.device
    ids = torch.randint(0, model.config.vocab_size, (batch, seqlen + 1), device=device)
    if mode == "train":
        from mamba_compiled.evaluation import autocast
        from mamba_compiled.training import Objective

        objective = Objective(model)
        if compile:
            objective.compile(fullgraph=True)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
        inputs, targets = ids[:, :-1], ids[:, 1:]

        def train_step() -> None:
            with autocast(device):
                loss, _ = objective(inputs, targets)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        return train_step
    from mamba_compiled.generation import MambaGenerator

    generator = MambaGenerator(model, batch, compile=compile, pdl=pdl)
    if mode == "prefill":
        prompt = ids[:, :seqlen]
        return lambda: generator.prefill(prompt)
    token = ids[:, 0].clone()  # dense: the generator copies views (a kernel more per step)
    return lambda: generator.step(token)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # fmt: off
    parser.add_argument("--model", default="130m",
                        help="tiny, 130m, 370m, 790m, 1.4b or 2.8b (random weights)")
    parser.add_argument("--mode", choices=MODES, default="decode")
    parser.add_argument("--batch", type=int, default=None, help="default: 8 for train, else 1")
    parser.add_argument("--seqlen", type=int, default=2048, help="tokens per row (train, prefill)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="prefill/decode weights (default float16 on CUDA, float32 on CPU); "
                        "train keeps float32 weights with bf16 autocast on CUDA")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--warmup", type=int, default=3, help="steps before the profiled one")
    parser.add_argument("--nvtx", action=argparse.BooleanOptionalAction, default=None,
                        help=f"ranges around the model's parts (default: {ENV_VAR})")
    parser.add_argument("--pdl", action=argparse.BooleanOptionalAction, default=None,
                        help="decode kernels with programmatic dependent launch (default: on "
                        "sm_90+). Under PDL a kernel starts before the previous one ends and "
                        "waits inside, so the trace's per-kernel times include that wait: "
                        "profile with --no-pdl to attribute time to kernels")
    parser.add_argument("--torch-profiler", action=argparse.BooleanOptionalAction, default=True,
                        help="--no-torch-profiler only runs the steps (under nsys or ncu)")
    parser.add_argument("--out", type=Path, default=None,
                        help="default: runs/profile/<model>-<mode>-<compiled|eager>")
    # fmt: on


def run(args: argparse.Namespace) -> int:
    """Warm up, profile one step, write DIR/trace.json and DIR/profile.md, print the report."""
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available; pass --device cpu")
    batch = args.batch if args.batch is not None else (8 if args.mode == "train" else 1)
    if batch < 1 or args.seqlen < 1 or args.warmup < 0:
        raise ValueError("--batch and --seqlen must be >= 1, --warmup >= 0")
    if args.mode == "train" and args.dtype is not None:
        raise ValueError("--dtype is for prefill and decode; train uses float32 weights")
    device = torch.device(args.device)
    default_dtype = torch.float16 if device.type == "cuda" else torch.float32
    dtype = DTYPES[args.dtype] if args.dtype else default_dtype
    dtype = torch.float32 if args.mode == "train" else dtype
    config = model_config(args.model)  # raises on an unknown name
    variant = "compiled" if args.compile else "eager"
    out = args.out or Path("runs/profile") / f"{args.model}-{args.mode}-{variant}"
    step_name = f"mamba/{args.mode}_step"

    import torch._inductor.config as inductor_config

    torch.manual_seed(0)
    with inductor_config.patch(readable_kernels(device.type, args.mode == "train")):
        model = MambaLMHeadModel(config, device=device, dtype=dtype)
        with nvtx_ranges(model, enabled=args.nvtx):
            step = build_step(model, args.mode, batch, args.seqlen, args.compile, args.pdl)
            start = time.perf_counter()
            for _ in range(args.warmup):  # compiles, autotunes, records CUDA graphs
                step()
            _sync(device)
            warmup_s = time.perf_counter() - start
            activities = [torch.profiler.ProfilerActivity.CPU]
            if device.type == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            profiler = (
                torch.profiler.profile(activities=activities) if args.torch_profiler else None
            )
            with profiler or contextlib.nullcontext(), nvtx_range(step_name):
                step()
                _sync(device)
    if profiler is None:
        print(f"{args.warmup} warm-up steps ({warmup_s:.1f} s) and one step, no torch.profiler")
        return 0
    out.mkdir(parents=True, exist_ok=True)
    trace_path = out / "trace.json"
    profiler.export_chrome_trace(str(trace_path))

    from mamba_compiled.profile_trace import summarize, to_markdown

    summary = summarize(json.loads(trace_path.read_text()), step_name)
    hardware = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    shape = f"batch {batch}" + ("" if args.mode == "decode" else f", seqlen {args.seqlen}")
    context = (
        f"{hardware}, torch {torch.__version__}; {shape}, {str(dtype)[len('torch.') :]}; "
        f"{args.warmup} warm-up steps ({warmup_s:.1f} s); "
        f"NVTX ranges {'on' if ranges_enabled(args.nvtx) else 'off'}; trace: {trace_path}"
    )
    title = f"{args.model} {args.mode} step, {variant}, {device.type}"
    report = to_markdown(summary, title, context)
    (out / "profile.md").write_text(report)
    print(report, end="")
    return 0
