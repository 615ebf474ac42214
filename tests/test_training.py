"""The training loop: recipe, schedule, accumulation, compiled = eager, resume, checkpoints."""

import json
import math
import shutil

import pytest
import torch

from mamba_compiled import checkpointing, metrics
from mamba_compiled.checkpointing import CheckpointError
from mamba_compiled.models import MambaConfig, MambaLMHeadModel
from mamba_compiled.training import (
    Objective,
    TrainConfig,
    build_optimizer,
    lr_factor,
    make_config,
    resume_config,
    train,
)


def tiny(tmp_path, name="run", **overrides):
    """The tiny selective-copying preset, eager (compiled once, in its own test), quiet."""
    kw = dict(out_dir=str(tmp_path / name), compile=False, progress=False, log_every=1)
    kw.update(overrides)
    return make_config("selective-copying", "tiny", **kw)


def losses(out_dir):
    return [
        (r["step"], r["loss"])
        for r in metrics.read(out_dir / "metrics.jsonl")
        if r["kind"] == "train"
    ]


def test_lr_schedule():
    c = TrainConfig(steps=110, warmup_steps=10, lr=1.0, min_lr_ratio=0.1)
    assert lr_factor(0, c) == pytest.approx(0.1) and lr_factor(9, c) == pytest.approx(1.0)
    assert lr_factor(10, c) == pytest.approx(1.0)
    assert lr_factor(60, c) == pytest.approx(0.55)  # halfway down the cosine
    assert lr_factor(110, c) == pytest.approx(0.1)
    const = TrainConfig(steps=100, warmup_steps=0, schedule="constant")
    assert {lr_factor(s, const) for s in (0, 50, 99)} == {1.0}


def test_weight_decay_groups_follow_the_recipe():
    model = MambaLMHeadModel(MambaConfig(d_model=16, n_layer=2, vocab_size=8))
    opt = build_optimizer(Objective(model), TrainConfig(weight_decay=0.1), torch.device("cpu"))
    names = {id(p): n for n, p in model.named_parameters()}
    decay = {names[id(p)] for p in opt.param_groups[0]["params"]}
    no_decay = {names[id(p)] for p in opt.param_groups[1]["params"]}
    assert opt.param_groups[0]["weight_decay"] == 0.1 and opt.param_groups[1]["weight_decay"] == 0
    assert opt.param_groups[0]["betas"] == (0.9, 0.95)
    for n in no_decay:
        assert n.endswith(
            ("A_log", ".D", "bias", "norm.weight", "norm_f.weight", "embedding.weight")
        )
    for n in decay:
        assert n.endswith(
            (
                "in_proj.weight",
                "conv1d.weight",
                "x_proj.weight",
                "dt_proj.weight",
                "out_proj.weight",
            )
        )
    assert len(decay) + len(no_decay) == len(list(model.parameters()))  # lm_head is tied, once


@pytest.mark.parametrize(
    "overrides, match",
    [
        pytest.param({"steps": 0}, "steps", id="steps"),
        pytest.param({"lr": -1.0}, "lr", id="lr"),
        pytest.param({"batch_size": 6, "grad_accum": 4}, "grad_accum", id="accum"),
        pytest.param({"schedule": "linear"}, "schedule", id="schedule"),
        pytest.param({"warmup_steps": 50, "steps": 10}, "warmup_steps", id="warmup"),
        pytest.param({"beta2": 1.0}, "beta2", id="beta2"),
        pytest.param({"answer_format": "echo"}, "answer_format", id="answer-format"),
        pytest.param({"model_size": "7b"}, "7b", id="size"),
        pytest.param({"eval_lengths": [64]}, "eval_lengths", id="lengths"),
        pytest.param({"colour": "red"}, "colour", id="unknown"),
        pytest.param({"cuda_graph": True, "fsdp": True}, "cuda_graph", id="graph-fsdp"),
    ],
)
def test_bad_config(overrides, match):
    with pytest.raises(ValueError, match=match):
        make_config("selective-copying", "tiny", **overrides)


def test_paper_preset_reads_answers_at_markers():
    """The paper's Selective Copying data ends with markers; the small presets keep `copy`, which
    the main job samples with generate. A config saved before the option existed loads as copy."""
    assert make_config("selective-copying", "paper").answer_format == "markers"
    assert make_config("selective-copying", "cpu").answer_format == "copy"
    assert TrainConfig().answer_format == "copy"


def test_unknown_preset():
    with pytest.raises(ValueError, match="preset 'huge'"):
        make_config("induction-heads", "huge")


def test_cuda_graph_needs_cuda(tmp_path):
    with pytest.raises(ValueError, match="cuda_graph needs one process on a CUDA device"):
        train(tiny(tmp_path, device="cpu", cuda_graph=True))


def test_optimizer_runs_this_runs_way_after_loading_a_checkpoint():
    """A checkpoint written by a graphed CUDA run (capturable, tensor lr) loads into a CPU run
    as a plain AdamW with a float lr, and the other way round (the groups' runtime options are
    this run's, whatever the checkpoint says)."""
    from mamba_compiled.training import set_runtime_options

    model = MambaLMHeadModel(MambaConfig(d_model=16, n_layer=1, vocab_size=8))
    opt = build_optimizer(Objective(model), TrainConfig(lr=0.25), torch.device("cpu"))
    for group in opt.param_groups:
        group.update(lr=torch.tensor(0.125), initial_lr=torch.tensor(0.25), capturable=True)
        group.update(fused=True)
    set_runtime_options(opt, TrainConfig(lr=0.25), torch.device("cpu"))
    for group in opt.param_groups:
        assert group["lr"] == 0.125 and isinstance(group["lr"], float)
        assert group["initial_lr"] == 0.25 and isinstance(group["initial_lr"], float)
        assert not group["capturable"] and not group["fused"]
    model(torch.randint(0, 8, (2, 8))).logits.sum().backward()
    opt.step()  # a plain CPU step with these options


def test_grad_accumulation_takes_the_same_steps(tmp_path):
    train(tiny(tmp_path, "one", steps=4))
    train(tiny(tmp_path, "acc", steps=4, grad_accum=4))
    a, b = losses(tmp_path / "one"), losses(tmp_path / "acc")
    assert [s for s, _ in a] == [1, 2, 3, 4]
    for (_, x), (_, y) in zip(a, b, strict=True):
        assert x == pytest.approx(y, rel=1e-5)


def test_compiled_training_equals_eager(tmp_path):
    eager = train(tiny(tmp_path, "eager", steps=3))
    compiled = train(tiny(tmp_path, "compiled", steps=3, compile=True))
    for (_, x), (_, y) in zip(
        losses(tmp_path / "eager"), losses(tmp_path / "compiled"), strict=True
    ):
        assert x == pytest.approx(y, rel=1e-4)
    assert compiled["eval"]["loss"] == pytest.approx(eager["eval"]["loss"], rel=1e-4)


def test_run_outputs(tmp_path):
    summary = train(tiny(tmp_path, steps=4, ckpt_every=2, eval_every=2, keep_checkpoints=5))
    out = tmp_path / "run"
    assert summary["finished"] and summary["steps"] == 4
    assert 0 <= summary["eval"]["accuracy"] <= 1 and math.isfinite(summary["eval"]["loss"])
    assert [s for s, _ in checkpointing.list_checkpoints(out / "checkpoints")] == [2, 4]
    assert json.loads((out / "summary.json").read_text())["steps"] == 4
    assert (out / "curves.png").stat().st_size > 1000
    kinds = [r["kind"] for r in metrics.read(out / "metrics.jsonl")]
    assert kinds == ["train", "train", "eval", "train", "train", "eval"]
    model = MambaLMHeadModel.from_pretrained(out / "checkpoints" / "step_00000004" / "model")
    assert model.config.d_model == 16


def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    """8 steps straight; the same run stopped after its first step (time limit), and a copy cut
    back to its step-4 checkpoint, each resumed to step 8: the same losses, step for step."""
    config = tiny(tmp_path, "straight", steps=8, ckpt_every=4, keep_checkpoints=3)
    train(config)
    straight = losses(tmp_path / "straight")
    assert len(straight) == 8

    stopped = tiny(tmp_path, "stopped", steps=8, ckpt_every=4, time_limit=1e-9)
    first = train(stopped)
    assert not first["finished"] and first["steps"] == 1
    resumed = resume_config(tmp_path / "stopped", {"time_limit": 0.0})
    assert train(resumed, resume_from=tmp_path / "stopped")["finished"]
    assert losses(tmp_path / "stopped") == straight

    shutil.copytree(tmp_path / "straight", tmp_path / "cut")
    shutil.rmtree(tmp_path / "cut" / "checkpoints" / "step_00000008")
    cut = resume_config(tmp_path / "cut", {"out_dir": str(tmp_path / "cut")})
    train(cut, resume_from=tmp_path / "cut")
    assert losses(tmp_path / "cut") == straight
    a = MambaLMHeadModel.from_pretrained(
        tmp_path / "cut" / "checkpoints" / "step_00000008" / "model"
    )
    b = MambaLMHeadModel.from_pretrained(
        tmp_path / "straight" / "checkpoints" / "step_00000008" / "model"
    )
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(x, y), name


def test_resume_keeps_the_configuration(tmp_path):
    train(tiny(tmp_path, steps=2))
    with pytest.raises(ValueError, match="lr=0.5 differs"):
        resume_config(tmp_path / "run", {"lr": 0.5})
    changed = tiny(tmp_path, steps=2, lr=0.5)
    with pytest.raises(ValueError, match="lr=0.5 differs"):
        train(changed, resume_from=tmp_path / "run")


def test_fresh_run_refuses_an_existing_run(tmp_path):
    train(tiny(tmp_path, steps=2))
    with pytest.raises(ValueError, match="--resume"):
        train(tiny(tmp_path, steps=2))
    assert train(tiny(tmp_path, steps=2), overwrite=True)["finished"]


@pytest.fixture
def run_with_checkpoints(tmp_path):
    train(tiny(tmp_path, steps=4, ckpt_every=2, keep_checkpoints=5))
    return tmp_path / "run" / "checkpoints"


def _corrupt_truncate(step):
    f = step / "model" / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-10])
    return "model/model.safetensors has"


def _corrupt_flip(step):
    f = step / "trainer.pt"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    return "trainer.pt fails its sha256 check"


def _corrupt_manifest(step):
    (step / "manifest.json").unlink()
    return "incomplete: no manifest.json"


def _corrupt_missing(step):
    (step / "model" / "config.json").unlink()
    return "model/config.json is missing"


@pytest.mark.parametrize(
    "corrupt", [_corrupt_truncate, _corrupt_flip, _corrupt_manifest, _corrupt_missing]
)
def test_corrupt_checkpoint_is_refused(run_with_checkpoints, corrupt):
    newest = run_with_checkpoints / "step_00000004"
    message = corrupt(newest)
    for attempt in (
        lambda: checkpointing.verify(newest),
        lambda: resume_config(run_with_checkpoints.parent, {}),
    ):
        with pytest.raises(CheckpointError, match=message) as e:
            attempt()
        assert "--resume" in str(e.value) and "step_00000002" in str(e.value)  # the way out


def test_checkpoint_writes_are_atomic(run_with_checkpoints):
    root = run_with_checkpoints
    (root / ".tmp-step_00000006").mkdir()  # what a run killed while saving leaves behind
    (root / ".tmp-step_00000006" / "trainer.pt").write_bytes(b"partial")
    assert checkpointing.resolve(root.parent) == root / "step_00000004"
    model = MambaLMHeadModel.from_pretrained(root / "step_00000004" / "model")
    checkpointing.save(root, 6, model.save_pretrained, {"step": 6}, keep_last=2)
    names = sorted(p.name for p in root.iterdir())
    assert names == ["step_00000004", "step_00000006"]
    assert checkpointing.verify(root / "step_00000006")["step"] == 6


def test_target_accuracy_finishes_early(tmp_path):
    summary = train(tiny(tmp_path, steps=8, eval_every=2, target_accuracy=1e-6))
    assert summary["finished"] and summary["reached_target"] and summary["steps"] == 2
    assert [s for s, _ in checkpointing.list_checkpoints(tmp_path / "run" / "checkpoints")] == [2]
