"""The training step as one CUDA graph (`cuda_graph`): the same steps as without it, resumable.

Run with `pytest -m cuda` (perf/gpu_check.sh); skipped without a GPU.
"""

import shutil

import pytest
import torch

from mamba_compiled import metrics
from mamba_compiled.models import MambaLMHeadModel
from mamba_compiled.training import make_config, resume_config, train

pytestmark = pytest.mark.cuda


def config(tmp_path, name, **overrides):
    """Tiny selective copying on CUDA, compiled, with everything the graph must capture: two
    micro-batches, a warmup schedule (the lr tensor changes every step), active clipping."""
    kw = dict(
        out_dir=str(tmp_path / name), device="cuda", compile=True, progress=False, log_every=1,
        steps=6, grad_accum=2, warmup_steps=2, grad_clip=0.05, ckpt_every=3, keep_checkpoints=3,
    )  # fmt: skip
    return make_config("selective-copying", "tiny", **{**kw, **overrides})


def records(out_dir):
    return [r for r in metrics.read(out_dir / "metrics.jsonl") if r["kind"] == "train"]


def assert_same_steps(a, b):
    """Equal up to the scan backward's float atomics (the order of its dB/dC sums)."""
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for x, y in zip(a, b, strict=True):
        assert x["lr"] == pytest.approx(y["lr"], rel=1e-6), x["step"]
        for key in ("loss", "grad_norm"):
            assert x[key] == pytest.approx(y[key], rel=1e-3), (key, x["step"])


def assert_same_weights(a_dir, b_dir, step=6):
    a, b = (
        MambaLMHeadModel.from_pretrained(d / "checkpoints" / f"step_{step:08d}" / "model")
        for d in (a_dir, b_dir)
    )
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        torch.testing.assert_close(x, y, rtol=1e-3, atol=1e-5, msg=name)


def test_graphed_steps_equal_ungraphed(tmp_path):
    train(config(tmp_path, "plain"))
    summary = train(config(tmp_path, "graphed", cuda_graph=True))
    assert summary["finished"]
    plain, graphed = records(tmp_path / "plain"), records(tmp_path / "graphed")
    assert len(plain) == 6 and max(r["grad_norm"] for r in plain) > 0.05  # clipping was active
    assert_same_steps(plain, graphed)
    assert_same_weights(tmp_path / "plain", tmp_path / "graphed")


def test_graphed_run_resumes(tmp_path):
    """Stopped after its first step and resumed graphed; cut back to step 3 and resumed without
    the graph: both equal the straight graphed run (warm-up steps leave no trace)."""
    train(config(tmp_path, "straight", cuda_graph=True))
    straight = records(tmp_path / "straight")

    first = train(config(tmp_path, "stopped", cuda_graph=True, time_limit=1e-9))
    assert not first["finished"] and first["steps"] == 1
    resumed = resume_config(tmp_path / "stopped", {"time_limit": 0.0})
    assert train(resumed, resume_from=tmp_path / "stopped")["finished"]
    assert_same_steps(records(tmp_path / "stopped"), straight)
    assert_same_weights(tmp_path / "stopped", tmp_path / "straight")

    shutil.copytree(tmp_path / "straight", tmp_path / "cut")
    shutil.rmtree(tmp_path / "cut" / "checkpoints" / "step_00000006")
    cut = resume_config(tmp_path / "cut", {"out_dir": str(tmp_path / "cut"), "cuda_graph": False})
    train(cut, resume_from=tmp_path / "cut")
    assert_same_steps(records(tmp_path / "cut"), straight)
    assert_same_weights(tmp_path / "cut", tmp_path / "straight")
