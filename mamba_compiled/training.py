"""Training: configuration and presets, the optimizer recipe, the training loop.

The loop, one optimizer step:

    batch   = task.sample(batch_size, generator(seed, "train", step))   # the global batch, on CPU
    share   = this process's rows of it, split into grad_accum micro-batches
    for each micro-batch:
        loss_sum, stats = objective(inputs, targets)        # compiled: model + cross-entropy
        (loss_sum * world_size / answers in the global batch).backward()
    clip the gradient norm, AdamW step, learning-rate schedule step

With `cuda_graph` the micro-batches, clipping and AdamW are one captured CUDA graph, replayed on
each batch (graphed_step.py).

Scaling each process's summed loss by world_size / (answers in the global batch) makes the averaged
gradient the gradient of the mean loss over the global batch, whatever the number of processes
and micro-batches: one process with batch 8 and two with 4 each take the same step.

The recipe (Gu & Dao 2023, Appendix E.2): AdamW with betas (0.9, 0.95), weight decay 0.1 except on
A_log, D, biases, norms and embeddings, linear warmup then cosine decay to 10 % of the peak
(or a constant rate, as in the synthetic tasks), gradient clipping at 1.0, bf16 autocast on CUDA.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from mamba_compiled import checkpointing, distributed, metrics
from mamba_compiled.distributed import DistEnv
from mamba_compiled.evaluation import answer_stats, autocast, eval_batches, evaluate, length_sweep
from mamba_compiled.graphed_step import GraphedStep
from mamba_compiled.models import MambaConfig, MambaLMHeadModel
from mamba_compiled.tasks import IGNORE, TASKS, ByteLM, generator
from mamba_compiled.tasks.selective_copying import ANSWER_FORMATS


@dataclass
class TrainConfig:
    """Everything that defines a run. Saved in every checkpoint; `--resume` reads it back."""

    task: str = "selective-copying"  # one of TASKS
    preset: str | None = None  # the preset these values started from (informational)
    # the task
    seq_len: int = 256
    vocab_size: int = 16  # synthetic tasks (byte-level LM: always 256)
    num_tokens: int = 16  # selective copying: data tokens to memorize
    answer_format: str = "copy"  # selective copying: "copy" or "markers" (tasks/selective_copying)
    data: str | None = None  # byte-level LM: a text file or folder (default: Python's stdlib)
    # the model
    model_size: str | None = None  # a named size ("130m", ...) instead of d_model / n_layer
    d_model: int = 64
    n_layer: int = 2
    d_state: int = 16
    expand: int = 2
    # optimization
    steps: int = 1000
    batch_size: int = 64  # sequences per optimizer step, over all processes
    grad_accum: int = 1  # micro-batches per optimizer step and process
    lr: float = 1e-3
    schedule: str = "cosine"  # "cosine" (warmup, then cosine to min_lr_ratio * lr) or "constant"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0 disables clipping
    # evaluation
    eval_every: int = 0  # steps; 0: only at the end
    eval_sequences: int = 256
    eval_lengths: list[int] = field(default_factory=list)  # induction heads: lengths to test
    eval_token_budget: int = 1 << 20  # tokens per forward in the length sweep
    # the run
    seed: int = 0
    log_every: int = 10
    ckpt_every: int = 0  # steps; 0: only at the end
    keep_checkpoints: int = 2
    out_dir: str = "runs/train"
    device: str = "auto"  # auto, cpu, cuda
    compile: bool = True
    fsdp: bool = False
    cuda_graph: bool = False  # the step as one CUDA graph (one process on CUDA; graphed_step.py)
    time_limit: float = 0.0  # minutes; stop (with a checkpoint) once exceeded; 0: no limit
    target_accuracy: float = 0.0  # finish early once an evaluation reaches it; 0: never
    progress: bool = True


# Fields a resumed run may change: where and how it runs, not what it computes.
# fmt: off
RUN_CONTROL = frozenset({
    "out_dir", "device", "compile", "fsdp", "cuda_graph", "time_limit", "target_accuracy",
    "progress", "log_every", "ckpt_every", "keep_checkpoints", "eval_every", "eval_sequences",
    "eval_lengths", "eval_token_budget",
})

# Named starting points per task. "paper" is the paper's setting (Appendix E.1: 2 layers of
# d_model 64, constant learning rate); "cpu" and "small" are sized for a 2-core CPU, "cpu" of
# selective copying being the main job's; "tiny" is for tests.
PRESETS: dict[str, dict[str, dict]] = {
    "selective-copying": {
        "paper": dict(seq_len=4096, vocab_size=16, num_tokens=16, answer_format="markers",
                      d_model=64, n_layer=2, batch_size=64, lr=1e-4, schedule="constant",
                      warmup_steps=0, steps=400_000, eval_every=2000, ckpt_every=2000,
                      log_every=100, eval_sequences=1024),
        "cpu": dict(seq_len=32, vocab_size=16, num_tokens=4, d_model=64, n_layer=2,
                    batch_size=128, lr=1e-2, schedule="cosine", warmup_steps=20, steps=1000,
                    eval_every=50, ckpt_every=200, log_every=10, eval_sequences=512,
                    target_accuracy=0.99),
        "tiny": dict(seq_len=32, vocab_size=8, num_tokens=4, d_model=16, n_layer=1,
                     batch_size=8, lr=3e-3, steps=20, eval_sequences=16, log_every=1),
    },
    "induction-heads": {
        "paper": dict(seq_len=256, vocab_size=16, d_model=64, n_layer=2, batch_size=8, lr=1e-3,
                      schedule="constant", warmup_steps=0, weight_decay=0.0, beta2=0.999,
                      steps=25 * 8192, eval_every=2048, ckpt_every=8192, log_every=256,
                      eval_sequences=512, eval_lengths=[2**k for k in range(6, 21)]),
        "cpu": dict(seq_len=64, vocab_size=16, d_model=64, n_layer=2, batch_size=16, lr=1e-3,
                    schedule="constant", weight_decay=0.0, beta2=0.999, steps=2000,
                    eval_every=250, ckpt_every=500, log_every=25, eval_sequences=256,
                    eval_lengths=[2**k for k in range(6, 13)]),
        "tiny": dict(seq_len=16, vocab_size=8, d_model=16, n_layer=1, batch_size=8, steps=20,
                     eval_sequences=16, eval_lengths=[16, 64], log_every=1),
    },
    "bytes": {
        "small": dict(seq_len=256, d_model=128, n_layer=4, batch_size=16, lr=2e-3,
                      warmup_steps=100, steps=2000, eval_every=500, ckpt_every=500,
                      eval_sequences=128, log_every=20),
        "130m": dict(model_size="130m", seq_len=2048, batch_size=16, lr=6e-4, warmup_steps=500,
                     steps=20_000, eval_every=1000, ckpt_every=1000, eval_sequences=64,
                     log_every=50),
        "tiny": dict(seq_len=32, d_model=16, n_layer=1, batch_size=8, steps=20,
                     eval_sequences=16, log_every=1),
    },
}
# fmt: on

DEFAULT_PRESET = {"selective-copying": "cpu", "induction-heads": "cpu", "bytes": "small"}


def make_config(
    task: str = "selective-copying", preset: str | None = None, **overrides
) -> TrainConfig:
    """The config of `preset` (the task's default if None) with `overrides` applied."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {sorted(TASKS)}, got {task!r}")
    preset = DEFAULT_PRESET[task] if preset is None else preset
    if preset not in PRESETS[task]:
        raise ValueError(
            f"preset {preset!r} does not exist for task {task}; choose from {sorted(PRESETS[task])}"
        )
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise ValueError(f"unknown TrainConfig field(s): {', '.join(unknown)}")
    config = TrainConfig(task=task, preset=preset, **{**PRESETS[task][preset], **overrides})
    validate(config)
    return config


def validate(c: TrainConfig) -> None:
    """Raise ValueError naming the first bad field."""
    for name in (
        "seq_len",
        "vocab_size",
        "num_tokens",
        "d_model",
        "n_layer",
        "d_state",
        "expand",
        "steps",
        "batch_size",
        "grad_accum",
        "eval_sequences",
        "log_every",
        "keep_checkpoints",
        "eval_token_budget",
    ):
        value = getattr(c, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    for name in ("warmup_steps", "eval_every", "ckpt_every", "seed"):
        value = getattr(c, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    for name in (
        "lr",
        "weight_decay",
        "grad_clip",
        "time_limit",
        "min_lr_ratio",
        "target_accuracy",
    ):
        value = getattr(c, name)
        if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ValueError(f"{name} must be a finite non-negative number, got {value!r}")
    if c.lr == 0:
        raise ValueError("lr must be positive, got 0")
    for name in ("beta1", "beta2"):
        if not 0 <= getattr(c, name) < 1:
            raise ValueError(f"{name} must be in [0, 1), got {getattr(c, name)!r}")
    if c.task not in TASKS:
        raise ValueError(f"task must be one of {sorted(TASKS)}, got {c.task!r}")
    if c.answer_format not in ANSWER_FORMATS:
        raise ValueError(f"answer_format must be one of {ANSWER_FORMATS}, got {c.answer_format!r}")
    if c.schedule not in ("cosine", "constant"):
        raise ValueError(f"schedule must be 'cosine' or 'constant', got {c.schedule!r}")
    if c.warmup_steps > c.steps:
        raise ValueError(f"warmup_steps ({c.warmup_steps}) exceeds steps ({c.steps})")
    if c.batch_size % c.grad_accum:
        raise ValueError(
            f"batch_size ({c.batch_size}) must be a multiple of grad_accum ({c.grad_accum})"
        )
    if any(not isinstance(n, int) or n < 3 for n in c.eval_lengths):
        raise ValueError(f"eval_lengths must be integers >= 3, got {c.eval_lengths}")
    if c.eval_lengths and c.task != "induction-heads":
        raise ValueError("eval_lengths is for the induction-heads task")
    if c.model_size is not None:
        MambaConfig.from_name(c.model_size)  # raises on an unknown name
    if c.cuda_graph and c.fsdp:
        raise ValueError("cuda_graph runs one process: it does not combine with fsdp")


def build_task(c: TrainConfig):
    if c.task == "selective-copying":
        return TASKS[c.task](
            seq_len=c.seq_len,
            vocab_size=c.vocab_size,
            num_tokens=c.num_tokens,
            answer_format=c.answer_format,
        )
    if c.task == "induction-heads":
        return TASKS[c.task](seq_len=c.seq_len, vocab_size=c.vocab_size)
    return TASKS[c.task](seq_len=c.seq_len, data=c.data)


def model_config(c: TrainConfig, vocab_size: int) -> MambaConfig:
    if c.model_size is not None:
        return MambaConfig.from_name(c.model_size, vocab_size=vocab_size, d_state=c.d_state)
    return MambaConfig(
        d_model=c.d_model,
        n_layer=c.n_layer,
        vocab_size=vocab_size,
        d_state=c.d_state,
        expand=c.expand,
    )


class Objective(nn.Module):
    """The summed cross-entropy of a batch and its answer statistics: what training compiles.

    Returns (loss_sum, stats) with stats = [correct answers, answers, fully right sequences,
    sequences]; cross-entropy and argmax run in float32 on the logits at every position.
    """

    def __init__(self, model: MambaLMHeadModel):
        super().__init__()
        self.model = model

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor):
        logits = self.model(inputs).logits.float()  # (b, l, V)
        loss_sum = F.cross_entropy(
            logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE, reduction="sum"
        )
        return loss_sum, answer_stats(logits.detach(), targets)


def _no_weight_decay(name: str, p: torch.Tensor) -> bool:
    """The paper's recipe: no decay on A_log, D, biases, norm weights and embeddings."""
    return (
        getattr(p, "_no_weight_decay", False)
        or p.ndim < 2
        or name.endswith(("A_log", ".D", "bias"))
        or "norm" in name
        or "embedding" in name
    )


def build_optimizer(module: nn.Module, c: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW over `module`'s parameters in two groups (decayed or not), fused on CUDA."""
    decay, no_decay = [], []
    for name, p in module.named_parameters():  # a tied lm_head appears once, as the embedding
        if p.requires_grad:
            (no_decay if _no_weight_decay(name, p) else decay).append(p)
    groups = [
        {"params": decay, "weight_decay": c.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=c.lr, betas=(c.beta1, c.beta2), fused=device.type == "cuda")


def set_runtime_options(optimizer: torch.optim.Optimizer, c: TrainConfig, device) -> None:
    """How this run's AdamW executes, whatever a loaded checkpoint's groups say: fused on CUDA;
    with `cuda_graph`, capturable and the learning rate a device tensor (the graph reads it; the
    scheduler fills it). `initial_lr` stays a float, so the scheduler computes on the host.
    Applied after the scheduler exists and a checkpoint is loaded (both expect float rates)."""
    graphed = c.cuda_graph
    for group in optimizer.param_groups:
        lr = float(group["lr"])
        group["lr"] = torch.tensor(lr, device=device) if graphed else lr
        group["initial_lr"] = float(group.get("initial_lr", lr))
        group["fused"] = device.type == "cuda"
        group["foreach"] = None
        group["capturable"] = graphed


def lr_factor(step: int, c: TrainConfig) -> float:
    """Multiplier of the peak lr at `step` (0-based): linear warmup, then cosine or constant."""
    if step < c.warmup_steps:
        return (step + 1) / c.warmup_steps
    if c.schedule == "constant":
        return 1.0
    progress = (step - c.warmup_steps) / max(1, c.steps - c.warmup_steps)
    return c.min_lr_ratio + (1 - c.min_lr_ratio) * 0.5 * (
        1 + math.cos(math.pi * min(progress, 1.0))
    )


def _rng_state() -> dict:
    version, internal, gauss = random.getstate()
    state = {"torch": torch.get_rng_state(), "python": [version, list(internal), gauss]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])


def resume_config(checkpoint: Path, overrides: dict) -> TrainConfig:
    """The configuration saved in `checkpoint` with `overrides` applied. Only run-control fields
    (RUN_CONTROL: where and how the run executes) may differ from the saved values."""
    checkpoint = checkpointing.resolve(checkpoint)
    checkpointing.verify(checkpoint)
    saved = TrainConfig(**checkpointing.load_trainer_state(checkpoint)["config"])
    changes = {}
    for name, value in overrides.items():
        if name not in RUN_CONTROL and value != getattr(saved, name):
            raise ValueError(
                f"{name}={value!r} differs from the checkpoint's {getattr(saved, name)!r}; a "
                f"resumed run keeps its configuration (only {', '.join(sorted(RUN_CONTROL))} "
                "may change)"
            )
        changes[name] = value
    config = dataclasses.replace(saved, **changes)
    validate(config)
    return config


def _require(module: str, why: str) -> None:
    """Fail before training, not after it, when an optional package is missing."""
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise ImportError(
            f"training needs {module} for {why}: pip install {module} "
            "(or pip install 'mamba-compiled[train]')"
        )


class Trainer:
    """One training run. `Trainer(config).run()`; see the module docstring for the step."""

    def __init__(
        self,
        config: TrainConfig,
        resume_from: str | Path | None = None,
        overwrite: bool = False,
        env: DistEnv | None = None,
    ):
        validate(config)
        self.config = c = config
        _require("matplotlib", "the plot of its curves")
        _require("safetensors", "its checkpoints")
        if c.progress:
            _require("tqdm", "the progress bar (or pass --no-progress)")
        self.env = env if env is not None else distributed.init(c.device)
        if c.cuda_graph and (self.env.device.type != "cuda" or self.env.world_size > 1):
            raise ValueError(
                "cuda_graph needs one process on a CUDA device, got "
                f"{self.env.world_size} x {self.env.device.type}"
            )
        self.out = Path(c.out_dir)
        self.ckpt_root = self.out / "checkpoints"
        per_process, rem = divmod(c.batch_size, self.env.world_size)
        if rem or per_process % c.grad_accum:
            raise ValueError(
                f"batch_size ({c.batch_size}) must split evenly over {self.env.world_size} "
                f"process(es) x grad_accum {c.grad_accum}"
            )
        self.micro_batch = per_process // c.grad_accum
        self.task = build_task(c)

        self.start_step = 0
        trainer_state = None
        if resume_from is not None:
            ckpt = checkpointing.resolve(resume_from)
            checkpointing.verify(ckpt)
            trainer_state = checkpointing.load_trainer_state(ckpt)
            saved = TrainConfig(**trainer_state["config"])
            for f in dataclasses.fields(TrainConfig):
                if f.name not in RUN_CONTROL and getattr(saved, f.name) != getattr(c, f.name):
                    raise ValueError(
                        f"{f.name}={getattr(c, f.name)!r} differs from the checkpoint's "
                        f"{getattr(saved, f.name)!r} ({ckpt}); a resumed run keeps its settings"
                    )
            self.start_step = int(trainer_state["step"])
            model = MambaLMHeadModel.from_pretrained(
                ckpt / checkpointing.MODEL_DIR, device=self.env.device
            )
            self.resumed_from = ckpt
        else:
            existing = checkpointing.list_checkpoints(self.ckpt_root)
            if existing and not overwrite:
                raise ValueError(
                    f"--out {self.out} already holds checkpoints (up to step {existing[-1][0]}); "
                    "pass --resume to continue that run, --overwrite to replace it, or a new --out"
                )
            if self.env.is_main and overwrite:  # the files a run writes, nothing else
                shutil.rmtree(self.ckpt_root, ignore_errors=True)
                for name in ("metrics.jsonl", "summary.json", "curves.png", "config.json"):
                    (self.out / name).unlink(missing_ok=True)
            distributed.barrier(self.env)
            torch.manual_seed(c.seed)  # the same initial weights on every process
            model = MambaLMHeadModel(model_config(c, self.task.vocab_size), device=self.env.device)
            self.resumed_from = None
        self.model = model
        self.objective = Objective(model)
        self.train_module = distributed.wrap(
            self.objective, self.env, fsdp=c.fsdp, compile=c.compile
        )
        self.optimizer = build_optimizer(self.train_module, c, self.env.device)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: lr_factor(step, c)
        )
        if trainer_state is not None:
            self._load_trainer_state(trainer_state)
        set_runtime_options(self.optimizer, c, self.env.device)
        self.graphed = None
        if c.cuda_graph:
            self.graphed = GraphedStep(
                self.train_module, self.optimizer, c.grad_accum, self.micro_batch, c.seq_len,
                c.grad_clip, self.env.device,
            )  # fmt: skip
        self.log = metrics.MetricsLog(
            self.out / "metrics.jsonl",
            enabled=self.env.is_main,
            resume_step=self.start_step if trainer_state is not None else None,
        )

    # ---- checkpoints ------------------------------------------------------------------------

    def _state_options(self):
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        return StateDictOptions(full_state_dict=True, cpu_offload=True)

    def _load_trainer_state(self, state: dict) -> None:
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        set_optimizer_state_dict(
            self.objective,
            self.optimizer,
            optim_state_dict=state["optimizer"],
            options=self._state_options(),
        )
        self.scheduler.load_state_dict(state["scheduler"])
        _set_rng_state(state["rng"])

    def save_checkpoint(self, step: int) -> Path | None:
        """Every process takes part (FSDP gathers the full state); the main process writes."""
        from torch.distributed.checkpoint.state_dict import (
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        opts = self._state_options()
        optim_state = get_optimizer_state_dict(self.objective, self.optimizer, options=opts)
        if self.config.fsdp:
            model_state = get_model_state_dict(self.model, options=opts)
        path = None
        if self.env.is_main:
            if self.config.fsdp:  # a full, unsharded copy on CPU to save_pretrained from
                with torch.device("meta"):
                    full = MambaLMHeadModel(self.model.config)
                full = full.to_empty(device="cpu")
                if self.model.config.tie_embeddings:
                    full.tie_weights()
                full.load_state_dict(model_state)
                save_model = full.save_pretrained
            else:
                save_model = self.model.save_pretrained
            state = {
                "step": step,
                "optimizer": optim_state,
                "scheduler": self.scheduler.state_dict(),
                "rng": _rng_state(),
                "config": dataclasses.asdict(self.config),
            }
            path = checkpointing.save(
                self.ckpt_root, step, save_model, state, keep_last=self.config.keep_checkpoints
            )
        distributed.barrier(self.env)
        return path

    # ---- evaluation -------------------------------------------------------------------------

    def evaluate(self, step: int, final: bool = False) -> dict:
        c = self.config
        batches = eval_batches(self.task, c.eval_sequences, self.micro_batch, c.seed, self.env)
        result = evaluate(self.model, batches, self.env, per_byte=isinstance(self.task, ByteLM))
        if c.fsdp:
            distributed.reshard(self.model)
        self.log.write({"kind": "eval", "step": step, **result})
        if c.eval_lengths and final:  # the length sweep: at the end only
            for r in length_sweep(
                self.model,
                self.task,
                c.eval_lengths,
                c.eval_sequences,
                c.seed,
                self.env,
                c.eval_token_budget,
            ):
                self.log.write({"kind": "length", "step": step, **r})
                result.setdefault("lengths", []).append(r)
            if c.fsdp:
                distributed.reshard(self.model)
        return result

    # ---- the loop ---------------------------------------------------------------------------

    def train_step(self, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One optimizer step; returns (loss_sum, stats, grad_norm) of this process, on device."""
        c, env = self.config, self.env
        batch = self.task.sample(c.batch_size, generator(c.seed, "train", step))
        scale = env.world_size / batch.num_targets
        share = batch.slice(
            env.rank * c.batch_size // env.world_size,
            (env.rank + 1) * c.batch_size // env.world_size,
        )
        if self.graphed is not None:
            outputs = self.graphed.step(share, scale)
            self.scheduler.step()
            return outputs
        loss_sum = torch.zeros((), device=env.device)
        stats = torch.zeros(4, dtype=torch.float64, device=env.device)
        for i in range(c.grad_accum):
            micro = share.slice(i * self.micro_batch, (i + 1) * self.micro_batch).to(env.device)
            sync = i == c.grad_accum - 1
            with distributed.gradient_sync(self.train_module, sync), autocast(env.device):
                micro_loss, micro_stats = self.train_module(micro.inputs, micro.targets)
            (micro_loss * scale).backward()
            loss_sum += micro_loss.detach()
            stats += micro_stats
        if c.grad_clip > 0:
            grad_norm = nn.utils.clip_grad_norm_(self.train_module.parameters(), c.grad_clip)
        else:
            grad_norm = torch.zeros((), device=env.device)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss_sum, stats, grad_norm

    def run(self) -> dict:
        c, env = self.config, self.env
        tokens_per_step = c.batch_size * c.seq_len
        if env.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.json").write_text(
                json.dumps(dataclasses.asdict(c), indent=2) + "\n"
            )
            n_params = sum(p.numel() for p in self.model.parameters())
            where = f"{env.world_size} x {env.device.type}" + (" FSDP" if c.fsdp else "")
            print(
                f"{c.task} ({c.preset}): {n_params / 1e6:.2f}M parameters, seq_len {c.seq_len}, "
                f"batch {c.batch_size}, {c.steps} steps on {where}"
                + (f", resumed at step {self.start_step}" if self.start_step else ""),
                flush=True,
            )
        progress = None
        if c.progress and env.is_main:
            from tqdm.auto import tqdm

            # disable=None: a bar on a terminal; in a log file the evaluation lines only
            progress = tqdm(
                total=c.steps,
                initial=self.start_step,
                unit="step",
                dynamic_ncols=True,
                disable=None,
            )

        t_start = time.perf_counter()
        # Interval accumulators, flushed into a "train" record every log_every steps (and at every
        # evaluation, checkpoint and stop, so a resumed run's records equal the straight run's).
        acc_loss = torch.zeros((), device=env.device)
        acc_stats = torch.zeros(4, dtype=torch.float64, device=env.device)
        steps_since_log, timed_steps, t_log = 0, 0, t_start
        summary: dict = {"task": c.task, "preset": c.preset, "out_dir": str(self.out)}
        step = self.start_step
        finished = step >= c.steps
        last_eval = None
        while step < c.steps:
            loss_sum, stats, grad_norm = self.train_step(step)
            step += 1
            acc_loss += loss_sum
            acc_stats += stats
            steps_since_log += 1
            if "first_step_s" not in summary:  # the first step compiles: time it on its own
                loss_sum.item()  # wait for the device
                summary["first_step_s"] = time.perf_counter() - t_start
                t_log = time.perf_counter()
            else:
                timed_steps += 1
            done = step == c.steps
            is_ckpt = bool(c.ckpt_every) and step % c.ckpt_every == 0 and not done
            is_eval = bool(c.eval_every) and step % c.eval_every == 0 and not done
            out_of_time = c.time_limit > 0 and distributed.any_process(
                time.perf_counter() - t_start > c.time_limit * 60, env
            )
            if step % c.log_every == 0 or is_ckpt or is_eval or out_of_time or done:
                self._log_train(
                    step,
                    acc_loss,
                    acc_stats,
                    grad_norm,
                    steps_since_log,
                    timed_steps * tokens_per_step,
                    time.perf_counter() - t_log,
                    t_start,
                    progress,
                )
                acc_loss.zero_()
                acc_stats.zero_()
                steps_since_log, timed_steps, t_log = 0, 0, time.perf_counter()
            if progress is not None:
                progress.update(1)
            reached = False
            if is_eval:
                last_eval = self.evaluate(step)
                self._print_eval(step, last_eval, progress)
                reached = 0 < c.target_accuracy <= last_eval["accuracy"]
            if reached:
                if env.is_main:
                    msg = f"target accuracy {100 * c.target_accuracy:g}% reached at step {step}"
                    (progress.write if progress else print)(msg)
                summary["reached_target"] = True
                finished = True
                break
            if is_ckpt or (out_of_time and not done):
                self.save_checkpoint(step)
            if out_of_time and not done:
                if env.is_main:
                    msg = (
                        f"time limit of {c.time_limit} min reached at step {step}/{c.steps}; "
                        f"continue with --resume --out {self.out}"
                    )
                    (progress.write if progress else print)(msg)
                break
            finished = done
            if is_eval or is_ckpt:
                t_log = time.perf_counter()  # evaluation and saving are not training time
        if progress is not None:
            progress.close()
        summary["steps"] = step
        summary["finished"] = finished
        summary["train_s"] = time.perf_counter() - t_start
        if finished:
            if not summary.get("reached_target") or c.eval_lengths:
                last_eval = self.evaluate(step, final=True)
                self._print_eval(step, last_eval, None)
            summary["checkpoint"] = str(self.save_checkpoint(step))
        if last_eval is not None:
            summary["eval"] = last_eval
        if env.is_main:
            records = metrics.read(self.out / "metrics.jsonl")
            if records:
                summary["plot"] = str(
                    metrics.plot(records, self.out / "curves.png", title=f"{c.task} ({c.preset})")
                )
            if finished:
                (self.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        return summary

    def _log_train(
        self, step, loss_sum, stats, grad_norm, n_steps, timed_tokens, dt, t_start, progress
    ) -> None:
        """Write the "train" record of the last `n_steps` steps (sums over all processes)."""
        env = self.env
        packed = torch.cat([loss_sum.double().reshape(1), stats])
        distributed.all_reduce_sum(packed, env)
        loss_sum_v, correct, answers, _, _ = packed.tolist()
        if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP
            grad_norm = grad_norm.full_tensor()
        record = {
            "kind": "train",
            "step": step,
            "loss": loss_sum_v / answers,
            "accuracy": correct / answers,
            "lr": float(self.scheduler.get_last_lr()[0]),  # a tensor with cuda_graph
            "grad_norm": float(grad_norm),
            "steps": n_steps,
            "tokens_per_s": timed_tokens / dt if timed_tokens else None,
            "elapsed_s": time.perf_counter() - t_start,
        }
        self.log.write(record)
        self.last_train = record
        if progress is not None:
            progress.set_postfix(
                loss=f"{record['loss']:.4f}",
                acc=f"{100 * record['accuracy']:.1f}%",
                tok_s=f"{record['tokens_per_s'] or 0:.0f}",
            )

    def _print_eval(self, step: int, result: dict, progress) -> None:
        if not self.env.is_main:
            return
        line = (
            f"step {step}: eval loss {result['loss']:.4f}, accuracy {100 * result['accuracy']:.2f}%"
            f" ({result['sequences']} sequences)"
        )
        if "bits_per_byte" in result:
            line += (
                f", {result['bits_per_byte']:.3f} bits/byte, perplexity {result['perplexity']:.2f}"
            )
        last = getattr(self, "last_train", None)
        if last is not None and last["tokens_per_s"]:
            line += f"; train loss {last['loss']:.4f}, {last['tokens_per_s']:,.0f} tokens/s"
        for r in result.get("lengths", []):
            line += f"\n  length {r['length']:>8}: accuracy {100 * r['accuracy']:.2f}%"
        (progress.write if progress is not None else print)(line)


def train(
    config: TrainConfig, resume_from: str | Path | None = None, overwrite: bool = False
) -> dict:
    """Run `config` to completion (or its time limit) and return the summary; see `Trainer`."""
    trainer = Trainer(config, resume_from=resume_from, overwrite=overwrite)
    try:
        return trainer.run()
    finally:
        distributed.shutdown(trainer.env)
