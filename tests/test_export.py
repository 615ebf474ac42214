"""torch.export of the language model: dynamic batch and length, save, load in a fresh process."""

import argparse
import subprocess
import sys
import textwrap

import pytest
import torch

from mamba_compiled import export
from mamba_compiled.models import MambaConfig, MambaLMHeadModel

SIZES = [(1, 1), (2, 16), (3, 37), (5, 130)]


def tiny() -> MambaLMHeadModel:
    return MambaLMHeadModel(MambaConfig(d_model=32, n_layer=2, vocab_size=20, d_state=8)).eval()


def run_fresh(code: str) -> None:
    """Run `code` in a new interpreter that imports only torch and mamba_compiled."""
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_export_dynamic_save_and_load_in_fresh_process(tmp_path):
    model = tiny()
    program = export.export_model(model)
    inputs = [torch.randint(0, 20, size) for size in SIZES]
    with torch.no_grad():
        expected = [model(ids).logits for ids in inputs]
        for ids, ref in zip(inputs, expected, strict=True):
            torch.testing.assert_close(program.module()(ids).logits, ref, atol=1e-5, rtol=1e-5)
    names = {
        n.target.name()
        for n in program.graph.nodes
        if n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload)
    }
    assert any(name.startswith("mamba_compiled::") for name in names), names

    torch.export.save(program, tmp_path / "model.pt2")
    torch.save({"inputs": inputs, "expected": expected}, tmp_path / "io.pt")
    run_fresh(f"""
        import torch
        import mamba_compiled
        program = torch.export.load({str(tmp_path / "model.pt2")!r})
        io = torch.load({str(tmp_path / "io.pt")!r})
        for ids, ref in zip(io["inputs"], io["expected"]):
            out = program.module()(ids)
            torch.testing.assert_close(out.logits, ref, atol=1e-5, rtol=1e-5)
            assert type(out).__name__ == "CausalLMOutput"
    """)


def test_aoti_package_on_cpu_runs_in_fresh_process(tmp_path):
    """An AOTInductor package (C++ wrapper, the scan as the opaque CPU op) at dynamic sizes."""
    model = tiny()
    package = export.aoti_package(export.export_model(model), tmp_path / "model_aoti.pt2")
    inputs = [torch.randint(0, 20, size) for size in SIZES[1:]]
    with torch.no_grad():
        expected = [model(ids).logits for ids in inputs]
    torch.save({"inputs": inputs, "expected": expected}, tmp_path / "io.pt")
    run_fresh(f"""
        import torch
        import mamba_compiled
        run = torch._inductor.aoti_load_package({str(package)!r})
        io = torch.load({str(tmp_path / "io.pt")!r})
        for ids, ref in zip(io["inputs"], io["expected"]):
            torch.testing.assert_close(run(ids).logits, ref, atol=1e-5, rtol=1e-5)
    """)


def test_export_command_writes_pt2(tmp_path, capsys):
    model = tiny()
    model.save_pretrained(tmp_path / "ckpt")
    parser = argparse.ArgumentParser()
    export.add_arguments(parser)
    args = parser.parse_args(
        [str(tmp_path / "ckpt"), "-o", str(tmp_path / "out" / "m.pt2"), "--device", "cpu"]
    )
    assert export.run(args) == 0
    assert "exported" in capsys.readouterr().out
    program = torch.export.load(tmp_path / "out" / "m.pt2")
    ids = torch.randint(0, 20, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(
            program.module()(ids).logits, model(ids).logits, atol=1e-5, rtol=1e-5
        )


def test_export_bad_arguments():
    with pytest.raises(TypeError, match="MambaLMHeadModel"):
        export.export_model(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="example_seqlen"):
        export.export_model(tiny(), example_seqlen=1)
