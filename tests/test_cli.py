"""The `mamba-compiled` command: help everywhere, one-line errors with status 2, train and eval."""

import json
import subprocess
import sys

import pytest

from mamba_compiled import cli, metrics

COMMANDS = ["demo", "train", "eval", "generate", "export", "bench", "profile"]


def run_cli(capsys, *argv):
    """(status, stdout, stderr) of `mamba-compiled argv` run in this process."""
    try:
        status = cli.main(list(argv))
    except SystemExit as e:  # argparse's --help and parse errors
        status = e.code
    out, err = capsys.readouterr()
    return status, out, err


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_help(capsys, command):
    argv = ["--help"] if command is None else [command, "--help"]
    status, out, _ = run_cli(capsys, *argv)
    assert status == 0 and "usage: mamba-compiled" in out


def test_every_listed_command_exists(capsys):
    _, out, _ = run_cli(capsys, "--help")
    for command in COMMANDS:
        assert command in out


@pytest.mark.parametrize(
    "argv, names",
    [
        pytest.param([], "required", id="no-command"),
        pytest.param(["fly"], "fly", id="unknown-command"),
        pytest.param(["train", "--steps", "0"], "--steps", id="steps-zero"),
        pytest.param(["train", "--lr", "fast"], "--lr", id="lr-text"),
        pytest.param(["train", "--task", "chess"], "--task", id="task"),
        pytest.param(["train", "--preset", "huge"], "preset 'huge'", id="preset"),
        pytest.param(["train", "--batch-size", "6", "--grad-accum", "4"], "grad_accum", id="accum"),
        pytest.param(["train", "--eval-lengths", "2^9..2^3"], "--eval-lengths", id="lengths"),
        pytest.param(["train", "--resume", "--overwrite"], "contradict", id="resume-overwrite"),
        pytest.param(["train", "--bogus"], "--bogus", id="unknown-option"),
        pytest.param(["train", "--beta2", "1"], "--beta2", id="beta2"),
        pytest.param(["train", "--answer-format", "echo"], "--answer-format", id="answer-format"),
        pytest.param(["eval"], "checkpoint", id="eval-no-checkpoint"),
        pytest.param(["bench", "nope"], "nope", id="bench-unknown"),
    ],
)
def test_bad_arguments_one_line_status_2(capsys, argv, names):
    status, _, err = run_cli(capsys, *argv)
    assert status == 2
    assert len(err.strip().splitlines()) == 1, err
    assert "error:" in err and names in err and "Traceback" not in err


def test_missing_checkpoint_one_line(capsys, tmp_path):
    status, _, err = run_cli(capsys, "train", "--resume", "--out", str(tmp_path / "none"))
    assert status == 1 and len(err.strip().splitlines()) == 1 and "no checkpoint" in err


def test_console_entry_prints_no_traceback():
    r = subprocess.run(
        [sys.executable, "-m", "mamba_compiled", "train", "--steps", "-3"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "--steps" in r.stderr, r.stderr


def test_train_resume_and_eval(capsys, tmp_path):
    out = tmp_path / "run"
    common = ["--preset", "tiny", "--out", str(out), "--no-compile", "--no-progress"]
    status, stdout, _ = run_cli(capsys, "train", *common, "--steps", "4", "--time-limit", "1e-9")
    assert status == 0 and "continue with --resume" in stdout
    resume = ["train", "--resume", "--out", str(out), "--no-progress", "--time-limit", "0"]
    status, stdout, _ = run_cli(capsys, *resume)
    assert status == 0 and "resumed at step 1" in stdout
    assert [r["step"] for r in metrics.read(out / "metrics.jsonl") if r["kind"] == "train"] == [
        1,
        2,
        3,
        4,
    ]
    # The configuration of a resumed run is the checkpoint's.
    status, _, err = run_cli(capsys, "train", "--resume", "--out", str(out), "--lr", "0.5")
    assert status == 2 and "lr=0.5 differs" in err

    status, stdout, _ = run_cli(
        capsys, "eval", str(out), "--sequences", "8", "--json", str(tmp_path / "e.json")
    )
    assert status == 0 and "selective-copying, length 32: accuracy" in stdout
    result = json.loads((tmp_path / "e.json").read_text())
    assert result["sequences"] == 8 and 0 <= result["accuracy"] <= 1
    # A bare model directory needs the task named; then longer sequences can be tried.
    model_dir = out / "checkpoints" / "step_00000004" / "model"
    status, _, err = run_cli(capsys, "eval", str(model_dir))
    assert status == 2 and "--task" in err
    status, stdout, _ = run_cli(
        capsys,
        "eval",
        str(model_dir),
        "--task",
        "selective-copying",
        "--seq-len",
        "48",
        "--num-tokens",
        "4",
        "--sequences",
        "4",
    )
    assert status == 0 and "length 48" in stdout


def test_eval_length_sweep(capsys, tmp_path):
    out = tmp_path / "ih"
    args = ["--task", "induction-heads", "--preset", "tiny", "--steps", "2", "--out", str(out)]
    assert run_cli(capsys, "train", *args, "--no-compile", "--no-progress")[0] == 0
    status, stdout, _ = run_cli(
        capsys,
        "eval",
        str(out),
        "--sequences",
        "4",
        "--lengths",
        "2^4..2^6,100",
        "--token-budget",
        "32",
    )
    assert status == 0
    for n in (16, 32, 64, 100):  # 64 and 100 exceed the budget: chunked prefill
        assert f"length {n:>8}" in stdout


def test_bench_lists_the_scripts(capsys):
    status, out, _ = run_cli(capsys, "bench")
    assert status == 0 and "train" in out and "scan" in out


def test_demo_runs_every_stage(capsys, tmp_path):
    """The main job's flow on a few steps (its accuracy is measured in docs/training.md); three
    steps do not reach --min-accuracy 1.0, so the job reports the failure with status 1."""
    argv = ["demo", "--out", str(tmp_path / "demo"), "--steps", "3", "--min-accuracy", "1.0"]
    status, out, _ = run_cli(capsys, *argv, "--no-progress", "--samples", "2")
    for stage in ("[1/4] training", "[2/4] checkpoint", "[3/4] exported", "[4/4] generated"):
        assert stage in out
    assert "differ from the model's by at most 0.0e+00" in out
    assert (tmp_path / "demo" / "model.pt2").is_file()
    assert status == 1 and "main job FAILED (below 100%)" in out
