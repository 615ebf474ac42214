"""Two CPU processes on gloo (torchrun) take the same steps as one process with the same global
batch, under DDP and under FSDP2; only rank 0 writes; an FSDP2 checkpoint resumes in one process."""

import os
import shutil
import subprocess
import sys

import pytest

from mamba_compiled import checkpointing, metrics
from mamba_compiled.training import make_config, resume_config, train

ARGS = [
    "--preset",
    "tiny",
    "--steps",
    "4",
    "--batch-size",
    "8",
    "--log-every",
    "1",
    "--ckpt-every",
    "2",
    "--keep-checkpoints",
    "5",
    "--no-compile",
    "--no-progress",
]


def losses(out_dir):
    return [
        (r["step"], r["loss"])
        for r in metrics.read(out_dir / "metrics.jsonl")
        if r["kind"] == "train"
    ]


def torchrun(*argv, timeout=300):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--standalone",
        "-m",
        "mamba_compiled",
        *argv,
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "run"
    config = make_config(
        "selective-copying",
        "tiny",
        steps=4,
        batch_size=8,
        log_every=1,
        out_dir=str(out),
        compile=False,
        progress=False,
    )
    train(config)
    return losses(out)


@pytest.mark.parametrize(
    "mode",
    [
        pytest.param([], id="ddp"),
        pytest.param(["--fsdp"], id="fsdp"),
        # compiled inside DDP: Dynamo's DDP optimizer splits the graph at the gradient buckets
        pytest.param(["compiled"], id="ddp-compiled"),
    ],
)
def test_two_processes_equal_one(tmp_path, single, mode):
    out = tmp_path / "run"
    compiled = mode == ["compiled"]
    args = [a for a in ARGS if a != "--no-compile"] if compiled else [*ARGS, *mode]
    stdout = torchrun("train", *args, "--out", str(out))
    assert "2 x cpu" in stdout and stdout.count("eval loss") == 1  # rank 0 alone reports
    two = losses(out)
    assert [s for s, _ in two] == [s for s, _ in single] == [1, 2, 3, 4]
    rel = 1e-4 if compiled else 1e-5  # Inductor's kernels round differently
    for (_, a), (_, b) in zip(two, single, strict=True):
        assert a == pytest.approx(b, rel=rel)
    assert [s for s, _ in checkpointing.list_checkpoints(out / "checkpoints")] == [2, 4]
    assert not list(out.glob("**/.tmp-*"))

    # The sharded run's checkpoint (gathered to rank 0) continues in a single process.
    shutil.copytree(out, tmp_path / "cut")
    shutil.rmtree(tmp_path / "cut" / "checkpoints" / "step_00000004")
    config = resume_config(tmp_path / "cut", {"out_dir": str(tmp_path / "cut"), "fsdp": False})
    train(config, resume_from=tmp_path / "cut")
    for (_, a), (_, b) in zip(losses(tmp_path / "cut"), two, strict=True):
        assert a == pytest.approx(b, rel=1e-5)
