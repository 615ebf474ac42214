"""The `mamba-compiled` command.

    mamba-compiled demo                     the main job: train, evaluate, save, export, generate
    mamba-compiled train [options]          train on a task (torchrun for several processes)
    mamba-compiled eval CHECKPOINT          accuracy / perplexity, and accuracy per length
    mamba-compiled generate CHECKPOINT ...  sample from a checkpoint (mamba_compiled.generation)
    mamba-compiled export CHECKPOINT -o F   torch.export a checkpoint (mamba_compiled.export)
    mamba-compiled bench NAME [-- ARGS]     run perf/bench_NAME.py from a source checkout
    mamba-compiled profile ...              profile a model (mamba_compiled.profiling)

Bad arguments print one line, `mamba-compiled <command>: error: ...`, and exit with status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import re
import subprocess
import sys
from pathlib import Path

import mamba_compiled

# Subcommands whose options and behaviour live in their own modules: add_arguments(parser) and
# run(args) -> exit status.
DELEGATED = {
    "generate": ("mamba_compiled.generation", "generate tokens from a checkpoint"),
    "export": ("mamba_compiled.export", "export a checkpoint with torch.export"),
    "profile": ("mamba_compiled.profiling", "profile a model's step (NVTX ranges, trace)"),
}


class UsageError(Exception):
    """A bad argument found after parsing (a bad value, a bad combination)."""


class _Parser(argparse.ArgumentParser):
    """argparse, with errors on one line: `prog: error: message (see prog --help)`."""

    def error(self, message: str):  # noqa: D102  (argparse's hook)
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# ---- value parsers -------------------------------------------------------------------------------


def _int_at_least(minimum: int, what: str):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = minimum - 1
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected a {what} integer, got {text!r}")
        return value

    return parse


_positive_int = _int_at_least(1, "positive")
_count = _int_at_least(0, "non-negative")


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite non-negative number, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    value = _non_negative_float(text)
    if value == 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def _unit_interval(text: str) -> float:
    value = _non_negative_float(text)
    if value >= 1:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text!r}")
    return value


def _lengths(text: str) -> list[int]:
    """'64,128,1024', '2^6..2^20' (every power of two in between) or a mix, comma-separated."""
    out: list[int] = []
    for part in text.split(","):
        part = part.strip()
        m = re.fullmatch(r"2\^(\d+)\.\.2\^(\d+)", part)
        try:
            if m:
                lo, hi = int(m[1]), int(m[2])
                if lo > hi:
                    raise ValueError
                out += [2**k for k in range(lo, hi + 1)]
            elif part.startswith("2^"):
                out.append(2 ** int(part[2:]))
            else:
                out.append(int(part))
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected lengths like 64,128 or 2^6..2^20, got {text!r}"
            ) from None
    if any(n < 3 for n in out):
        raise argparse.ArgumentTypeError(f"lengths must be at least 3, got {text!r}")
    return out


# ---- train ---------------------------------------------------------------------------------------

# Options spelled as TrainConfig fields (--seq-len -> seq_len); --out is out_dir.
# fmt: off
_TRAIN_FIELDS = (
    "seq_len", "vocab_size", "num_tokens", "answer_format", "data", "model_size", "d_model",
    "n_layer", "d_state", "expand", "steps", "batch_size", "grad_accum", "lr", "schedule",
    "warmup_steps", "min_lr_ratio", "weight_decay", "beta1", "beta2", "grad_clip", "eval_every",
    "eval_sequences", "eval_lengths", "eval_token_budget", "target_accuracy", "seed", "log_every",
    "ckpt_every", "keep_checkpoints", "device", "fsdp", "cuda_graph", "time_limit", "compile",
    "progress",
)
# fmt: on


def _add_train_arguments(p: argparse.ArgumentParser) -> None:
    from mamba_compiled.tasks import TASKS
    from mamba_compiled.tasks.selective_copying import ANSWER_FORMATS
    from mamba_compiled.training import DEFAULT_PRESET, PRESETS

    presets = "; ".join(
        f"{t}: {', '.join(PRESETS[t])} (default {DEFAULT_PRESET[t]})" for t in TASKS
    )
    # Defaults are None: an option left out takes the preset's value (or, with --resume, the
    # checkpoint's), so only what the user typed overrides anything.
    g = p.add_argument_group("task")
    g.add_argument("--task", choices=sorted(TASKS), default=None, help="default: selective-copying")
    g.add_argument("--preset", default=None, help=f"named settings per task: {presets}")
    g.add_argument("--seq-len", type=_positive_int, help="training sequence length")
    g.add_argument("--vocab-size", type=_positive_int, help="synthetic tasks' vocabulary")
    g.add_argument("--num-tokens", type=_positive_int, help="selective copying: tokens to memorize")
    g.add_argument(
        "--answer-format",
        choices=ANSWER_FORMATS,
        help="selective copying: answers after a separator, teacher-forced (copy; can be "
        "sampled with generate), or read at M marker tokens (markers: the paper's data)",
    )
    g.add_argument("--data", help="bytes: a text file or folder (default: Python's stdlib)")
    g = p.add_argument_group("model")
    g.add_argument(
        "--model-size",
        choices=["130m", "370m", "790m", "1.4b", "2.8b"],
        help="a named size (instead of --d-model / --n-layer)",
    )
    g.add_argument("--d-model", type=_positive_int)
    g.add_argument("--n-layer", type=_positive_int)
    g.add_argument("--d-state", type=_positive_int)
    g.add_argument("--expand", type=_positive_int)
    g = p.add_argument_group("optimization")
    g.add_argument("--steps", type=_positive_int, help="optimizer steps in all")
    g.add_argument(
        "--batch-size",
        type=_positive_int,
        help="sequences per step over all processes (global batch)",
    )
    g.add_argument("--grad-accum", type=_positive_int, help="micro-batches per step and process")
    g.add_argument("--lr", type=_positive_float, help="peak learning rate")
    g.add_argument("--schedule", choices=["cosine", "constant"])
    g.add_argument("--warmup-steps", type=_count)
    g.add_argument("--min-lr-ratio", type=_non_negative_float, help="cosine floor, x peak lr")
    g.add_argument("--weight-decay", type=_non_negative_float)
    g.add_argument("--beta1", type=_unit_interval, help="AdamW's beta1, in [0, 1)")
    g.add_argument("--beta2", type=_unit_interval, help="AdamW's beta2, in [0, 1)")
    g.add_argument("--grad-clip", type=_non_negative_float, help="max gradient norm; 0: off")
    g = p.add_argument_group("evaluation")
    g.add_argument("--eval-every", type=_count, help="steps between evaluations; 0: at the end")
    g.add_argument("--eval-sequences", type=_positive_int)
    g.add_argument(
        "--eval-lengths",
        type=_lengths,
        help="induction heads: lengths to test at the end, e.g. 2^6..2^20",
    )
    g.add_argument(
        "--eval-token-budget",
        type=_positive_int,
        help="tokens per forward in the length sweep (longer: chunked prefill)",
    )
    g.add_argument(
        "--target-accuracy",
        type=_non_negative_float,
        help="finish once an evaluation reaches this accuracy (a fraction, e.g. 0.99)",
    )
    g = p.add_argument_group("run")
    g.add_argument("--out", help="run directory (default: runs/<task>-<preset>)")
    g.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=None,
        metavar="CHECKPOINT",
        help="continue the run in --out (or from CHECKPOINT: a run, checkpoints or "
        "step directory) from its newest checkpoint",
    )
    g.add_argument("--overwrite", action="store_true", help="replace the checkpoints in --out")
    g.add_argument("--device", choices=["auto", "cpu", "cuda"], help="default: auto")
    g.add_argument(
        "--fsdp",
        action="store_true",
        default=None,
        help="shard with FSDP2 (under torchrun) instead of DDP",
    )
    g.add_argument(
        "--cuda-graph",
        action="store_true",
        default=None,
        help="replay each optimizer step as one CUDA graph (one process on CUDA): for small, "
        "host-bound models such as the paper tasks'",
    )
    g.add_argument(
        "--no-compile",
        dest="compile",
        action="store_false",
        default=None,
        help="run eagerly (default: torch.compile, fullgraph)",
    )
    g.add_argument("--seed", type=_count)
    g.add_argument("--log-every", type=_positive_int)
    g.add_argument("--ckpt-every", type=_count, help="steps between checkpoints; 0: at the end")
    g.add_argument("--keep-checkpoints", type=_positive_int)
    g.add_argument(
        "--time-limit",
        type=_non_negative_float,
        metavar="MINUTES",
        help="stop with a checkpoint after this long; continue with --resume",
    )
    g.add_argument("--no-progress", dest="progress", action="store_false", default=None)


def _train_overrides(args: argparse.Namespace) -> dict:
    out = {name: getattr(args, name) for name in _TRAIN_FIELDS}
    out["out_dir"] = args.out
    return {k: v for k, v in out.items() if v is not None}


def _train_config(args: argparse.Namespace):
    """The TrainConfig and checkpoint to resume from (or None) that `args` ask for."""
    from mamba_compiled import checkpointing
    from mamba_compiled.training import DEFAULT_PRESET, make_config, resume_config

    overrides = _train_overrides(args)
    task = args.task or "selective-copying"
    preset = args.preset or DEFAULT_PRESET[task]
    overrides.setdefault("out_dir", f"runs/{task}-{preset}")
    if args.resume is not None:
        if args.overwrite:
            raise UsageError("--resume and --overwrite contradict each other")
        where = Path(overrides["out_dir"]) if args.resume is True else Path(args.resume)
        checkpoint = checkpointing.resolve(where)
        config = resume_config(checkpoint, overrides)
        for name, given in (("task", args.task), ("preset", args.preset)):
            if given is not None and given != getattr(config, name):
                raise UsageError(
                    f"--{name} {given} differs from the checkpoint's {getattr(config, name)}"
                )
        return config, checkpoint
    return make_config(task, preset, **overrides), None


def cmd_train(args: argparse.Namespace) -> int:
    from mamba_compiled.training import train

    config, checkpoint = _train_config(args)
    summary = train(config, resume_from=checkpoint, overwrite=args.overwrite)
    return 0 if summary is not None else 1


# ---- eval ----------------------------------------------------------------------------------------


def _add_eval_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "checkpoint",
        type=Path,
        help="a training run, checkpoints or step directory (its task settings are "
        "read from it), or a model directory with --task and the task options",
    )
    p.add_argument("--task", choices=["selective-copying", "induction-heads", "bytes"])
    p.add_argument("--seq-len", type=_positive_int)
    p.add_argument("--num-tokens", type=_positive_int)
    p.add_argument("--data")
    p.add_argument(
        "--sequences",
        type=_positive_int,
        default=None,
        help="sequences to evaluate (default: the run's eval_sequences, else 256)",
    )
    p.add_argument("--batch-size", type=_positive_int, default=32)
    p.add_argument(
        "--lengths",
        type=_lengths,
        default=None,
        help="also accuracy per length, e.g. 2^6..2^20 (induction heads)",
    )
    p.add_argument(
        "--token-budget",
        type=_positive_int,
        default=1 << 20,
        help="tokens per forward in the length sweep (longer: chunked prefill)",
    )
    p.add_argument("--seed", type=_count, default=None, help="default: the run's seed, else 0")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument(
        "--precision",
        choices=["bf16", "fp32"],
        default="bf16",
        help="bf16 autocast on CUDA as in training (default), or fp32 throughout",
    )
    p.add_argument("--json", type=Path, help="also write the results to this file")


def cmd_eval(args: argparse.Namespace) -> int:
    import json

    import torch

    from mamba_compiled import checkpointing, distributed
    from mamba_compiled.evaluation import eval_batches, evaluate, length_sweep
    from mamba_compiled.models import MambaLMHeadModel
    from mamba_compiled.tasks import ByteLM
    from mamba_compiled.training import TrainConfig, build_task, make_config

    path: Path = args.checkpoint
    given = {"seq_len": args.seq_len, "num_tokens": args.num_tokens, "data": args.data}
    given = {k: v for k, v in given.items() if v is not None}
    if (
        (path / "config.json").is_file()
        and not (path / checkpointing.MANIFEST).exists()
        and ((path / "model.safetensors").exists() or (path / "pytorch_model.bin").exists())
    ):
        model_dir, config = path, None  # a bare model directory
        if args.task is None:
            raise UsageError(f"{path} is a model directory: pass --task (and the task's options)")
    else:
        step_dir = checkpointing.resolve(path)
        checkpointing.verify(step_dir)
        config = TrainConfig(**checkpointing.load_trainer_state(step_dir)["config"])
        model_dir = step_dir / checkpointing.MODEL_DIR
        if args.task is not None and args.task != config.task:
            raise UsageError(f"--task {args.task} differs from the checkpoint's {config.task}")
    env = distributed.DistEnv(0, 1, 0, distributed.resolve_device(args.device), initialized=False)
    model = MambaLMHeadModel.from_pretrained(model_dir, device=env.device)
    if config is None:
        config = make_config(args.task, **given, vocab_size=model.config.vocab_size)
    else:
        config = dataclasses.replace(config, **given)
    task = build_task(config)
    if task.vocab_size > model.config.padded_vocab_size:
        raise UsageError(
            f"the task's vocabulary ({task.vocab_size}) exceeds the model's "
            f"({model.config.padded_vocab_size})"
        )
    sequences = args.sequences or config.eval_sequences
    seed = config.seed if args.seed is None else args.seed
    batches = eval_batches(task, sequences, args.batch_size, seed, env)
    result = {"checkpoint": str(path), "task": config.task, "seq_len": config.seq_len}
    result["precision"] = args.precision if env.device.type == "cuda" else "fp32"
    result.update(
        evaluate(model, batches, env, isinstance(task, ByteLM), precision=args.precision)
    )
    line = f"{config.task}, length {config.seq_len}: accuracy {100 * result['accuracy']:.2f}%"
    line += f", loss {result['loss']:.4f} ({result['sequences']} sequences)"
    if "bits_per_byte" in result:
        line += f", {result['bits_per_byte']:.3f} bits/byte, perplexity {result['perplexity']:.2f}"
    print(line, flush=True)
    if args.lengths:
        if not hasattr(task, "split_for_generation") or config.task != "induction-heads":
            raise UsageError("--lengths is for the induction-heads task")
        result["lengths"] = []
        sweep = length_sweep(
            model, task, args.lengths, sequences, seed, env, args.token_budget, args.precision
        )
        for r in sweep:
            result["lengths"].append(r)
            print(
                f"  length {r['length']:>8}: accuracy {100 * r['accuracy']:6.2f}% "
                f"({r['sequences']} sequences)",
                flush=True,
            )
        if env.device.type == "cuda":
            result["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 1e9
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


# ---- bench ---------------------------------------------------------------------------------------


def _perf_dir() -> Path:
    return Path(mamba_compiled.__file__).resolve().parent.parent / "perf"


def _add_bench_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", nargs="?", help="run perf/bench_NAME.py (omit to list them)")
    p.add_argument(
        "script_args",
        nargs=argparse.REMAINDER,
        help="arguments for the script (after --, e.g. bench train -- --help)",
    )


def cmd_bench(args: argparse.Namespace) -> int:
    perf = _perf_dir()
    if not perf.is_dir():
        raise UsageError(
            f"bench runs the scripts in perf/ of a source checkout; {perf} does not exist "
            "(install with pip install -e from a clone of the repository)"
        )
    scripts = {p.stem[len("bench_") :]: p for p in sorted(perf.glob("bench_*.py"))}
    if args.name is None:
        print("benchmarks (mamba-compiled bench NAME [-- ARGS]):")
        for name, script in scripts.items():
            print(f"  {name:<12} {script}")
        return 0
    if args.name not in scripts:
        raise UsageError(f"no benchmark {args.name!r}; choose from {', '.join(scripts)}")
    rest = args.script_args[1:] if args.script_args[:1] == ["--"] else args.script_args
    return subprocess.call([sys.executable, str(scripts[args.name]), *rest])


# ---- the parser ----------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from mamba_compiled import demo

    parser = _Parser(
        prog="mamba-compiled",
        description="Mamba (selective state spaces), compiled: train, evaluate, generate, export.",
    )
    parser.add_argument("--version", action="version", version=mamba_compiled.__version__)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    p = sub.add_parser(
        "demo",
        help="the main job: train, evaluate, checkpoint, export, generate",
        description=demo.__doc__.split("\n\n")[0],
    )
    demo.add_arguments(p)
    p.set_defaults(func=demo.run)

    p = sub.add_parser(
        "train",
        help="train a model on a task",
        description="Train on selective copying, induction heads or bytes; under "
        "torchrun each process takes a share of the global batch (DDP or --fsdp).",
    )
    _add_train_arguments(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "eval",
        help="evaluate a checkpoint",
        description="Accuracy (and perplexity for bytes) of a checkpoint; with "
        "--lengths, accuracy at each length (induction heads).",
    )
    _add_eval_arguments(p)
    p.set_defaults(func=cmd_eval)

    for name, (module_name, help_text) in DELEGATED.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name != module_name:
                raise
            continue  # not part of this version of the package
        p = sub.add_parser(name, help=help_text)
        module.add_arguments(p)
        p.set_defaults(func=module.run)

    p = sub.add_parser(
        "bench",
        help="run a benchmark script from perf/",
        description="Run perf/bench_NAME.py with the arguments after --.",
    )
    _add_bench_arguments(p)
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    from mamba_compiled.checkpointing import CheckpointError

    parser = build_parser()
    args = parser.parse_args(argv)
    prog = f"mamba-compiled {args.command}"
    try:
        return int(args.func(args) or 0)
    except (UsageError, ValueError, TypeError) as e:
        # Raised for bad argument values and combinations before any work starts.
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except (CheckpointError, FileNotFoundError, ImportError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
