"""Where compiled decoding with programmatic dependent launch (PDL) departs from decoding without.

    python perf/pdl_check.py [--out DIR]

The CUDA test `test_decode_with_programmatic_dependent_launch_equals_without[compiled]` failed on
the H200 (logits up to 1.2e-2 apart in fp16; eager with PDL passed). This runs the test's tiny
model teacher-forced through: eager (E), eager with PDL (EP), compiled (C), compiled with the PDL
twins launched without PDL (CT), and compiled with PDL twice over the same tokens (CP1, CP2), and
prints each one's largest difference from the others. Bit-identical C and CT with CP apart means
PDL itself (a race); CP1 against CP2 shows whether it varies between runs.
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
from pathlib import Path

import torch

from mamba_compiled.generation import MambaGenerator
from mamba_compiled.lowering import decode_step as decode_step_module
from mamba_compiled.lowering import linear as linear_module
from mamba_compiled.models import MambaConfig, MambaLMHeadModel


def tiny_model() -> MambaLMHeadModel:
    model = MambaLMHeadModel(MambaConfig(d_model=64, n_layer=3, vocab_size=64, d_state=16))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        return MambaLMHeadModel.from_pretrained(tmp, device="cuda", dtype=torch.float16).eval()


@contextlib.contextmanager
def launches_without_pdl():
    """The twins' kernels launched plainly (their GDC path off)."""
    saved = linear_module.pdl, decode_step_module.pdl
    plain = lambda like, launch: {"GDC": False}  # noqa: E731
    linear_module.pdl = decode_step_module.pdl = plain
    try:
        yield
    finally:
        linear_module.pdl, decode_step_module.pdl = saved


def teacher_forced(gen: MambaGenerator, ids: torch.Tensor, start: int = 5) -> torch.Tensor:
    steps = [gen.prefill(ids[:, :start]).float()]
    steps += [gen.step(ids[:, t]).float().clone() for t in range(start, ids.shape[1])]
    return torch.stack(steps, 1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--tokens", type=int, default=30)
    args = p.parse_args()
    torch.manual_seed(0)
    model = tiny_model()
    ids = torch.randint(0, 64, (1, args.tokens), device="cuda")
    runs: dict[str, torch.Tensor] = {}
    runs["E"] = teacher_forced(MambaGenerator(model, 1, compile=False), ids)
    runs["EP"] = teacher_forced(MambaGenerator(model, 1, compile=False, pdl=True), ids)
    runs["C"] = teacher_forced(MambaGenerator(model, 1, compile=True), ids)
    torch._dynamo.reset()
    with launches_without_pdl():
        runs["CT"] = teacher_forced(MambaGenerator(model, 1, compile=True, pdl=True), ids)
    torch._dynamo.reset()
    gen = MambaGenerator(model, 1, compile=True, pdl=True)
    runs["CP1"] = teacher_forced(gen, ids)
    runs["CP2"] = teacher_forced(gen, ids)
    names = list(runs)
    lines = [
        "# PDL check: largest |difference| of teacher-forced fp16 logits (0 = bit-identical)",
        "",
        "| | " + " | ".join(names) + " |",
        "|---" * (len(names) + 1) + "|",
    ]
    for a in names:
        cells = [f"{(runs[a] - runs[b]).abs().max().item():.2e}" for b in names]
        lines.append(f"| {a} | " + " | ".join(cells) + " |")
    first = {}  # the first step (0: the prefill) whose logits differ from C's
    for a in names:
        differs = (runs[a] != runs["C"]).any(-1)[0]
        first[a] = int(differs.float().argmax()) if differs.any() else -1
    lines += ["", "first step that differs from C (-1: none): " + str(first)]
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "pdl_check.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
