"""Reading a torch.profiler Chrome trace of one step: kernels, kernels per step, the scan's share.

The trace is the JSON that `torch.profiler.profile.export_chrome_trace` writes: complete events
("ph": "X") with a category. The step is the user annotation the profile command puts around it.

    CUDA  the table lists GPU work (kernels, memcpy, memset) by total time; shares are of the
          summed GPU time; "kernels per step" counts kernel events (kernels inside a CUDA graph
          are counted one by one), "launches" the host calls that started GPU work.
    CPU   there are no kernels, so the table lists the leaf ops (profiler ops with no op inside,
          Inductor's C++ kernels included, view and allocation ops left out) by time; the
          scan ops count as one leaf each; shares are of the step's wall time.

The scan is its ops (`mamba_compiled::selective_scan_fwd`/`_bwd`/`selective_state_update`/
`ssm_decode_step` and their `_cpu` kernels) on CPU, its Triton kernels on CUDA.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field

SCAN_OP = re.compile(
    r"^mamba_compiled::(selective_scan_fwd|selective_scan_bwd|selective_state_update|ssm_decode_step)"
)
SCAN_KERNEL = re.compile(r"_scan_fwd_kernel|_scan_bwd_kernel|_state_update_kernel")
_GPU_WORK = ("kernel", "gpu_memcpy", "gpu_memset")
_LAUNCH = re.compile(r"LaunchKernel|GraphLaunch|Memcpy.*Async|Memset.*Async")
# Ops that only make views or allocate: not work a "kernel" count should see.
_NOT_WORK = re.compile(
    r"^aten::(empty\w*|view\w*|_unsafe_view|as_strided|t|transpose|expand\w*|reshape|_reshape_alias|"
    r"slice|select|unsqueeze|squeeze|permute|detach\w*|alias|split\w*|chunk|narrow|unbind|"
    r"lift_fresh|resolve_conj|resolve_neg|result_type|item|_local_scalar_dense|set_|resize_|to|"
    r"contiguous|conj|_conj|broadcast_tensors|unflatten|flatten|numpy_T)$"
)


@dataclass
class Row:
    name: str
    calls: int
    total_us: float


@dataclass
class Summary:
    device: str  # "cuda" or "cpu"
    step_us: float  # wall time of the step (host side, through the final synchronize)
    work_us: float  # the table's denominator: summed GPU time (CUDA) or step wall time (CPU)
    kernels: int  # kernels (CUDA) or leaf ops (CPU) in the step
    launches: int  # host launch calls (CUDA); 0 on CPU
    scan_us: float
    rows: list[Row] = field(default_factory=list)

    @property
    def scan_share(self) -> float:
        return self.scan_us / self.work_us if self.work_us else 0.0


def summarize(trace: dict, step_name: str) -> Summary:
    """The Summary of the step annotated `step_name` in a Chrome trace (a loaded JSON dict)."""
    events = [e for e in trace["traceEvents"] if e.get("ph") == "X" and "dur" in e]
    steps = [e for e in events if e.get("cat") == "user_annotation" and e["name"] == step_name]
    if len(steps) != 1:
        raise ValueError(f"expected one {step_name!r} annotation in the trace, found {len(steps)}")
    step = steps[0]
    gpu = [e for e in events if e.get("cat") in _GPU_WORK]
    if gpu:
        return _summarize_cuda(events, gpu, step)
    return _summarize_cpu(events, step)


def _rows(items: list[tuple[str, float]]) -> list[Row]:
    acc: dict[str, list] = defaultdict(lambda: [0, 0.0])
    for name, dur in items:
        acc[name][0] += 1
        acc[name][1] += dur
    return sorted((Row(n, c, t) for n, (c, t) in acc.items()), key=lambda r: -r.total_us)


def _summarize_cuda(events: list[dict], gpu: list[dict], step: dict) -> Summary:
    launches = [e for e in events if e.get("cat") in ("cuda_runtime", "cuda_driver")
                and _LAUNCH.search(e["name"])]  # fmt: skip
    # Kernels launched from inside a scan op (helpers included) or named as the scan's kernels.
    scan_ops = [e for e in events if e.get("cat") == "cpu_op" and SCAN_OP.match(e["name"])]
    scan_corr = {
        launch["args"].get("correlation")
        for launch in launches
        if any(_inside(launch, op) for op in scan_ops)
    }
    scan_us = sum(
        e["dur"] for e in gpu
        if SCAN_KERNEL.search(e["name"]) or e.get("args", {}).get("correlation") in scan_corr
    )  # fmt: skip
    return Summary(
        device="cuda",
        step_us=step["dur"],
        work_us=sum(e["dur"] for e in gpu),
        kernels=sum(1 for e in gpu if e["cat"] == "kernel"),
        launches=len(launches),
        scan_us=scan_us,
        rows=_rows([(e["name"], e["dur"]) for e in gpu]),
    )


def _inside(e: dict, outer: dict) -> bool:
    return (e.get("tid") == outer.get("tid") and outer["ts"] <= e["ts"]
            and e["ts"] + e["dur"] <= outer["ts"] + outer["dur"])  # fmt: skip


def _summarize_cpu(events: list[dict], step: dict) -> Summary:
    ops = sorted(
        (e for e in events if e.get("cat") == "cpu_op" and _inside_window(e, step)),
        key=lambda e: (e.get("tid"), e["ts"], -e["dur"]),
    )
    # Ops with no work inside, per thread; a scan op is one (what runs inside it is the scan).
    parents, scans, kept, stack = set(), [], [], []
    for e in ops:
        while stack and not _inside(e, stack[-1]):
            stack.pop()
        if any(SCAN_OP.match(s["name"]) for s in stack):
            continue
        if _is_work(e["name"]):
            parents.update(id(s) for s in stack)
        stack.append(e)
        kept.append(e)
        if SCAN_OP.match(e["name"]):
            scans.append(e)
    work = [e for e in kept if id(e) not in parents and _is_work(e["name"])]
    return Summary(
        device="cpu",
        step_us=step["dur"],
        work_us=step["dur"],
        kernels=len(work),
        launches=0,
        scan_us=sum(e["dur"] for e in scans),
        rows=_rows([(e["name"], e["dur"]) for e in work]),
    )


def _is_work(name: str) -> bool:
    """An op (namespaced, e.g. aten::mm) or an Inductor C++ kernel; not a view, an allocation
    or the compiled code's own bookkeeping (TorchDynamo Cache Lookup, ...)."""
    return ("::" in name or "cpp_fused" in name) and not _NOT_WORK.match(name)


def _inside_window(e: dict, step: dict) -> bool:
    return step["ts"] <= e["ts"] and e["ts"] + e["dur"] <= step["ts"] + step["dur"]


def to_markdown(s: Summary, title: str, context: str, top: int = 25) -> str:
    """The report: a summary table, then the kernels (ops on CPU) by time."""
    unit = "kernel" if s.device == "cuda" else "op"
    denominator = "GPU time" if s.device == "cuda" else "step wall time"
    lines = [f"# {title}", "", context, "", "| metric | value |", "|---|---|",
             f"| step wall time | {s.step_us:,.1f} µs |"]  # fmt: skip
    if s.device == "cuda":
        lines.append(f"| GPU time (kernels, memcpy, memset) | {s.work_us:,.1f} µs |")
        lines.append(f"| kernels per step | {s.kernels} |")
        lines.append(f"| launch calls per step | {s.launches} |")
    else:
        lines.append(f"| ops per step (leaf ops, views left out) | {s.kernels} |")
    lines.append(f"| scan | {s.scan_us:,.1f} µs = {100 * s.scan_share:.1f} % of {denominator} |")
    lines += ["", f"| {unit} | calls | total µs | share of {denominator} |", "|---|---:|---:|---:|"]
    for r in s.rows[:top]:
        share = r.total_us / s.work_us if s.work_us else 0.0
        lines.append(f"| {_cell(r.name)} | {r.calls} | {r.total_us:,.1f} | {100 * share:.1f} % |")
    rest = s.rows[top:]
    if rest:
        us = sum(r.total_us for r in rest)
        share = us / s.work_us if s.work_us else 0.0
        calls = sum(r.calls for r in rest)
        lines.append(f"| ({len(rest)} more) | {calls} | {us:,.1f} | {100 * share:.1f} % |")
    return "\n".join(lines) + "\n"


def _cell(name: str, width: int = 90) -> str:
    """Long names (Inductor's fused kernels) keep their start and their unique suffix."""
    if len(name) > width:
        name = name[: width - 31] + "…" + name[-30:]
    return name.replace("|", "\\|")
