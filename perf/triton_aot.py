"""The scan kernels as another Triton version compiles them, timed on a machine that has a
different one (a measurement, not a code path of the package; perf/NOTES.md, Run 18).

The H200 image has triton 3.6; CI and a fresh `pip install torch` have triton 3.9, whose code for
the scan forward is ~27 % shorter (SASS of the whole-chunk loop: 604 against 823 instructions).
Its wheel (286 MB) cannot travel to the device, but the kernels it compiles can:

    python perf/triton_aot.py build --out perf/aot          # here: triton 3.9, no GPU needed
    python perf/triton_aot.py bench --aot perf/aot --out DIR  # there: triton 3.6, the H200
    python perf/triton_aot.py profile --aot perf/aot          # under ncu (gpu_check.sh ncu-aot)

`build` runs the launchers `lowering.scan_fwd` / `scan_bwd` on CPU tensors of each ANCHORS row
with the kernel launch recorded instead of run, specializes every argument as Triton's JIT does
(ints equal to 1 become constants, multiples of 16 and 16-byte aligned pointers are marked
divisible), compiles for sm_90 and writes the cubins and an index. `bench` runs the same
launchers on CUDA tensors twice: as they are (the device's Triton JIT) and with each launch
replaced by the prebuilt cubin (loaded and launched through the CUDA driver API); it checks that
both give the same outputs and gradients and that they match float64 on a few channels, then
times both with do_bench (median ms). A launch whose arguments differ from what was compiled
raises: no fallback. `--fwd-maxnreg N` (both commands): the forward capped at N registers in
every launch, 0 for none; without it, the package's rule (capped from 10 programs per SM).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import pathlib
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from mamba_compiled.lowering import common, scan_backward, scan_forward  # noqa: E402

ROWS = [  # (batch, dim, L, dstate, dtype): shared/ANCHORS.md's scan rows
    (8, 4096, 2048, 16, "bf16"),
    (8, 2048, 2048, 16, "bf16"),
    (16, 1536, 4096, 16, "bf16"),
    (1, 4096, 65536, 16, "bf16"),
    (8, 4096, 2048, 16, "fp32"),
]
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
H200_SMS = 132


class Recorder:
    """Stands in for `common.launcher`: records (kernel, grid, args, kwargs) instead of running."""

    def __init__(self):
        self.launches: list = []

    def __call__(self, kernel, like):
        def index(grid):
            def run(*args, **kwargs):
                self.launches.append((kernel, tuple(grid), args, kwargs))

            return run

        return _Indexable(index)


class _Indexable:
    def __init__(self, fn):
        self.fn = fn

    def __getitem__(self, grid):
        return self.fn(grid)


def _inputs(batch, dim, L, dstate, dtype, device):
    import bench_scan

    kw = bench_scan.make_inputs(batch, dim, L, dstate, DTYPES[dtype], device)
    kw["B"], kw["C"] = kw["B"][:, None].contiguous(), kw["C"][:, None].contiguous()
    return kw


def _fwd(kw):
    return scan_forward.scan_fwd(
        kw["u"], kw["delta"], kw["A"], kw["B"], kw["C"], kw["D"], kw["z"], kw["delta_bias"],
        None, True,
    )  # fmt: skip


def _bwd(kw, dout, checkpoints):
    return scan_backward.scan_bwd(
        dout, None, kw["u"], kw["delta"], kw["A"], kw["B"], kw["C"], kw["D"], kw["z"],
        kw["delta_bias"], None, checkpoints, True, False,
    )  # fmt: skip


def _specialize(kernel, args, kwargs):
    """(signature, constexprs, attrs, options, key) as the JIT specializes this launch; key: per
    parameter (name, type, specialization), what a prebuilt kernel must match to be launched."""
    from triton.backends.compiler import BaseBackend
    from triton.runtime.jit import native_specialize_impl

    signature, constexprs, attrs, key = {}, {}, {}, []
    names = [p.name for p in kernel.params]
    values = dict(zip(names, args, strict=False))  # constexprs come as kwargs
    options = {k: kwargs[k] for k in ("num_warps", "num_stages", "maxnreg") if k in kwargs}
    for i, p in enumerate(kernel.params):
        if p.is_constexpr:
            signature[p.name] = "constexpr"
            constexprs[p.name] = kwargs[p.name]
            continue
        v = values[p.name]
        ty, spec = native_specialize_impl(BaseBackend, v, False, True, True)
        if ty == "constexpr":
            signature[p.name] = "constexpr"
            constexprs[p.name] = spec
        else:
            signature[p.name] = ty
            if spec == "D":
                attrs[(i,)] = [["tt.divisibility", 16]]
        key.append((p.name, ty, spec))
    return signature, constexprs, attrs, options, key


def _fwd_cap(n: int | None):
    """The forward's config for `--fwd-maxnreg n`: n > 0 caps every launch at n registers, 0
    leaves every launch uncapped, None keeps the package's rule (ScanConfig.maxnreg_from)."""
    import dataclasses

    if n is None:
        return None  # set_override drops it
    return dataclasses.replace(
        common.fwd_config(4096, 16, (1, 1)), maxnreg=n or None, maxnreg_from=0
    )


def build(out: pathlib.Path, fwd_maxnreg: int | None = None) -> None:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    out.mkdir(parents=True, exist_ok=True)
    # the H200's, where the launchers would ask the GPU: backward residency, SMs for the cap
    common.set_override(bwd_resident=8 * H200_SMS, fwd=_fwd_cap(fwd_maxnreg))
    common._sm_count = lambda index: H200_SMS
    index = []
    for row in ROWS:
        rec = Recorder()
        scan_forward.launcher, scan_backward.launcher = rec, rec
        kw = _inputs(*row, device="cpu")
        out_, _, checkpoints = _fwd(kw)
        _bwd(kw, torch.randn_like(out_), checkpoints)
        for j, (kernel, grid, args, kwargs) in enumerate(rec.launches):
            signature, constexprs, attrs, options, key = _specialize(kernel, args, kwargs)
            compiled = triton.compile(
                ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs),
                target=GPUTarget("cuda", 90, 32),
                options=options,
            )
            meta = compiled.metadata
            name = f"{'x'.join(map(str, row))}-{j}-{kernel.fn.__name__}"
            (out / f"{name}.cubin").write_bytes(compiled.asm["cubin"])
            index.append(dict(
                row=list(row), kernel=kernel.fn.__name__, function=meta.name, cubin=f"{name}.cubin",
                key=key, constexprs={k: v for k, v in constexprs.items()}, grid=list(grid),
                num_warps=meta.num_warps, maxnreg=options.get("maxnreg"), shared=meta.shared,
                global_scratch=meta.global_scratch_size, profile_scratch=meta.profile_scratch_size,
            ))  # fmt: skip
            print(
                f"{name}: grid {grid}, {meta.num_warps} warps, shared {meta.shared} B", flush=True
            )
    (out / "index.json").write_text(json.dumps(dict(triton=triton.__version__, kernels=index)))


class Cubins:
    """Prebuilt kernels launched through the CUDA driver API (libcuda, ctypes)."""

    def __init__(self, aot: pathlib.Path, driver: bool = True):
        self.cuda = ctypes.CDLL("libcuda.so.1") if driver else None
        if driver:
            c, u, p = ctypes.c_void_p, ctypes.c_uint, ctypes.POINTER(ctypes.c_void_p)
            self.cuda.cuModuleLoadData.argtypes = [p, ctypes.c_char_p]
            self.cuda.cuModuleGetFunction.argtypes = [p, c, ctypes.c_char_p]
            self.cuda.cuLaunchKernel.argtypes = [c, u, u, u, u, u, u, u, c, p, p]
        self.index = json.loads((aot / "index.json").read_text())
        self.dir = aot
        self.loaded: dict = {}

    def _check(self, res, what):
        if res != 0:
            raise RuntimeError(f"{what} failed: CUresult {res}")

    def function(self, entry):
        if entry["cubin"] not in self.loaded:
            image = (self.dir / entry["cubin"]).read_bytes()
            module, fn = ctypes.c_void_p(), ctypes.c_void_p()
            self._check(self.cuda.cuModuleLoadData(ctypes.byref(module), image), "cuModuleLoadData")
            self._check(
                self.cuda.cuModuleGetFunction(ctypes.byref(fn), module, entry["function"].encode()),
                "cuModuleGetFunction",
            )
            self.loaded[entry["cubin"]] = (module, fn, image)
        return self.loaded[entry["cubin"]][1]

    def launcher(self, kernel, like):
        def index(grid):
            def run(*args, **kwargs):
                self.launch(kernel, tuple(grid), args, kwargs)

            return run

        return _Indexable(index)

    def entry_for(self, kernel, args, kwargs):
        """(the prebuilt kernel compiled for this launch's specialization, its parameters)."""
        _, constexprs, _, options, key = _specialize(kernel, args, kwargs)
        key = [list(k) for k in key]
        for entry in self.index["kernels"]:
            if (
                entry["kernel"] == kernel.fn.__name__
                and entry["key"] == key
                and entry["maxnreg"] == options.get("maxnreg")
                and all(entry["constexprs"].get(k) == v for k, v in constexprs.items())
            ):
                break
        else:
            raise KeyError(f"no prebuilt {kernel.fn.__name__} for this launch: {key}")
        if entry["global_scratch"] or entry["profile_scratch"]:
            raise NotImplementedError("kernels with scratch memory")
        values = dict(zip((p.name for p in kernel.params), args, strict=False))
        params = []
        for name, ty, _ in entry["key"]:
            if ty == "constexpr":
                continue
            v = values[name]
            if ty.startswith("*"):
                params.append(ctypes.c_uint64(v.data_ptr()))
            elif ty == "i32":
                params.append(ctypes.c_int32(v))
            elif ty == "i64":
                params.append(ctypes.c_int64(v))
            else:
                raise NotImplementedError(f"argument {name} of type {ty}")
        return entry, params + [ctypes.c_uint64(0), ctypes.c_uint64(0)]  # global, profile scratch

    def launch(self, kernel, grid, args, kwargs):
        entry, params = self.entry_for(kernel, args, kwargs)
        argv = (ctypes.c_void_p * len(params))(
            *[ctypes.cast(ctypes.pointer(p), ctypes.c_void_p) for p in params]
        )
        gx, gy, gz = (list(grid) + [1, 1])[:3]
        stream = torch.cuda.current_stream().cuda_stream
        self._check(
            self.cuda.cuLaunchKernel(
                self.function(entry), gx, gy, gz, 32 * entry["num_warps"], 1, 1,
                entry["shared"], ctypes.c_void_p(stream), argv, None,
            ),
            "cuLaunchKernel",
        )  # fmt: skip


def _ms(fn) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def _bench_row(row, launchers: dict) -> str:
    """One table line: both launch paths on the same fresh inputs, checked, then timed."""
    import bench_scan

    kw = _inputs(*row, device="cuda")
    dout = torch.randn_like(kw["u"])
    got, ms = {}, {}
    for mode, launcher in launchers.items():
        scan_forward.launcher, scan_backward.launcher = launcher
        out, _, checkpoints = _fwd(kw)
        du, ddelta, dA, dB = _bwd(kw, dout, checkpoints)[:4]
        got[mode] = (out, du, ddelta, dA, dB)
        ms[mode] = (_ms(lambda: _fwd(kw)), _ms(lambda: _bwd(kw, dout, _fwd(kw)[2])))
    jit, aot = got["jit"], got["prebuilt"]
    diff = [(a.float() - b.float()).abs().max().item() for a, b in zip(aot, jit, strict=True)]
    # the prebuilt forward against float64 on four channels of batch 0 (bench_scan's check)
    err = bench_scan.check_channels(dict(kw, B=kw["B"][:, 0], C=kw["C"][:, 0]), aot[0])["out"]
    (fj, fbj), (fa, fba) = ms["jit"], ms["prebuilt"]
    return (
        f"| {'x'.join(map(str, row[:4]))} {row[4]} | {fj:.3f} | {fa:.3f} | {fbj:.3f} | "
        f"{fba:.3f} | {' / '.join(f'{d:.1e}' for d in diff)} | {err:.1e} |"
    )


def bench(aot: pathlib.Path, out: pathlib.Path | None, fwd_maxnreg: int | None = None) -> None:
    import triton

    common.set_override(fwd=_fwd_cap(fwd_maxnreg))
    cubins = Cubins(aot)
    launchers = {
        "jit": (scan_forward.launcher, scan_backward.launcher),
        "prebuilt": (cubins.launcher, cubins.launcher),
    }
    lines = [
        f"prebuilt with triton {cubins.index['triton']}; JIT here: triton {triton.__version__}, "
        f"torch {torch.__version__}, {torch.cuda.get_device_name()}; forward maxnreg "
        f"{fwd_maxnreg or 'unset'}",
        "",
        "| shape, dtype | fwd ms, JIT | fwd ms, prebuilt | fwd+bwd ms, JIT | fwd+bwd ms, prebuilt "
        "| max diff out / du / ddelta / dA / dB (prebuilt - JIT) | max err vs float64 (prebuilt) |",
        "|---|---|---|---|---|---|---|",
    ]
    print("\n".join(lines), flush=True)
    try:
        for row in ROWS:
            torch.cuda.empty_cache()
            lines.append(_bench_row(row, launchers))
            print(lines[-1], flush=True)
    finally:
        scan_forward.launcher, scan_backward.launcher = launchers["jit"]
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
            (out / "triton_aot.md").write_text("\n".join(lines) + "\n")


def profile(aot: pathlib.Path) -> None:
    """The first row's forward twice through the JIT, then twice prebuilt: for Nsight Compute
    (`ncu --kernel-name _scan_fwd_kernel --launch-count 4`; gpu_check.sh's ncu-aot)."""
    cubins = Cubins(aot)
    kw = _inputs(*ROWS[0], device="cuda")
    for launcher in (scan_forward.launcher, cubins.launcher):
        scan_forward.launcher = launcher
        for _ in range(2):
            _fwd(kw)
    torch.cuda.synchronize()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build")
    b.add_argument("--out", type=pathlib.Path, default=pathlib.Path("perf/aot"))
    b.add_argument("--fwd-maxnreg", type=int, default=None, help="0: uncapped")
    r = sub.add_parser("bench")
    r.add_argument("--aot", type=pathlib.Path, default=pathlib.Path("perf/aot"))
    r.add_argument("--out", type=pathlib.Path, default=None)
    r.add_argument("--fwd-maxnreg", type=int, default=None, help="0: uncapped")
    f = sub.add_parser("profile")
    f.add_argument("--aot", type=pathlib.Path, default=pathlib.Path("perf/aot"))
    args = p.parse_args()
    if args.cmd == "build":
        build(args.out, args.fwd_maxnreg)
    elif args.cmd == "bench":
        bench(args.aot, args.out, args.fwd_maxnreg)
    else:
        profile(args.aot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
