"""Export a Mamba language model with torch.export (dynamic batch and length), and optionally
compile it ahead of time into an AOTInductor package.

    ep = export_model(model)                      # torch.export.ExportedProgram
    torch.export.save(ep, "model.pt2")
    # elsewhere: import mamba_compiled; ep = torch.export.load("model.pt2"); ep.module()(ids).logits

The exported program calls the registered ops (`torch.ops.mamba_compiled.*`), so loading it needs
only `import mamba_compiled`. The `mamba-compiled export` command is `add_arguments` + `run`.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch.export import Dim, ExportedProgram

from mamba_compiled.models import MambaLMHeadModel

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def export_model(
    model: MambaLMHeadModel,
    *,
    example_batch: int = 2,
    example_seqlen: int = 16,
    max_batch: int | None = None,
    max_seqlen: int | None = None,
) -> ExportedProgram:
    """torch.export of `model.forward(input_ids)` with batch and sequence length dynamic.

    The program returns CausalLMOutput(logits) like the model. Sizes from 1 up to max_batch and
    max_seqlen (unbounded when None) run without re-export.
    """
    if not isinstance(model, MambaLMHeadModel):
        raise TypeError(f"model must be a MambaLMHeadModel, got {type(model).__name__}")
    for name, value in (("example_batch", example_batch), ("example_seqlen", example_seqlen)):
        if value < 2:
            raise ValueError(f"{name} must be >= 2 (sizes 0 and 1 are specialized), got {value}")
    device = model.lm_head.weight.device
    ids = torch.randint(0, model.config.vocab_size, (example_batch, example_seqlen), device=device)
    batch = Dim("batch", min=1, max=max_batch) if max_batch else Dim("batch", min=1)
    seqlen = Dim("seqlen", min=1, max=max_seqlen) if max_seqlen else Dim("seqlen", min=1)
    with torch.no_grad():
        return torch.export.export(
            model, (ids,), dynamic_shapes={"input_ids": {0: batch, 1: seqlen}}, strict=False
        )


def aoti_package(program: ExportedProgram, path: str | Path) -> Path:
    """Compile an exported program ahead of time (AOTInductor) into a .pt2 package; load it with
    `torch._inductor.aoti_load_package(path)` after `import mamba_compiled`."""
    from torch._inductor import aoti_compile_and_package

    return Path(aoti_compile_and_package(program, package_path=str(path)))


# ---- the `mamba-compiled export` command -------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = "Export a checkpoint with torch.export (dynamic batch and length)."
    parser.add_argument(
        "checkpoint", type=Path, help="checkpoint directory (mamba_ssm or HF format)"
    )
    parser.add_argument("-o", "--output", type=Path, required=True, help="the .pt2 file to write")
    parser.add_argument(
        "--aoti",
        type=Path,
        default=None,
        help="also write an AOTInductor package here (compiled for --device)",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--max-batch", type=int, default=None, help="largest batch (default: any)")
    parser.add_argument(
        "--max-seqlen", type=int, default=None, help="longest sequence (default: any)"
    )


def run(args: argparse.Namespace) -> int:
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available; pass --device cpu")
    model = MambaLMHeadModel.from_pretrained(
        args.checkpoint, device=args.device, dtype=DTYPES[args.dtype]
    ).eval()
    start = time.perf_counter()
    program = export_model(model, max_batch=args.max_batch, max_seqlen=args.max_seqlen)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    torch.export.save(program, args.output)
    print(f"exported {args.checkpoint} to {args.output} in {time.perf_counter() - start:.1f} s")
    if args.aoti is not None:
        start = time.perf_counter()
        path = aoti_package(program, args.aoti)
        print(f"AOTInductor package {path} in {time.perf_counter() - start:.1f} s")
    return 0
